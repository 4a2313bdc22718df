"""Zero-shot text-to-image metrics (fastratio.t2i_metrics) on CPU with the tiny Stable Diffusion folder, a
tiny registered feature extractor and a tiny open_clip model: FID equals torch-fidelity's own on the two
folders of 256x256 PNGs (the real ones cropped and resized by torchvision, as GigaGAN does), the CLIP
score equals open_clip's own computation, images do not depend on the batch, CLIP weights are read as
data from a local file with no network, and bad inputs are one error line."""

from __future__ import annotations

import json
import pickle
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from testkit import tiny_feature_extractor

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

from fastratio import checkpoint, config
from fastratio.errors import UserError, run_cli
from fastratio.t2i_metrics import ClipScorer, center_crop_resize, main
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "sd15" / "tiny-sd15"
CAPTIONS = ["a red cube on a table", "a blue ball on grass", "the sea at night", "two cats", "a city street in rain",
            "a bowl of fruit", "a train at a station", "a dog on a sofa", "snow on a mountain", "a plate of pasta"]
TRAIN = [
    "data.kind=text2image", "data.source=stream", "data.workers=0", "data.eval_samples=4", "data.resolution=32", "model.arch=sd",
    "model.sigma_init=14.6146", f"teacher.checkpoint={TINY}", "noise.schedule=vp", "noise.sigma_min=0.138", "noise.sigma_max=13.04",
    "method.name=vsd", "method.cfg_scale=1.75", "noise.weighting=dmd", "method.fake_score_steps=1", "optim.batch_size=4",
    "optim.gen_lr=1e-4", "optim.ratio_lr=1e-4", "optim.lr_schedule=constant", "run.device=cpu", "run.kernels=torch",
    "run.progress=false", "run.log_every=1", "run.eval_every=100", "run.plot_every=0", "run.ckpt_every=2", "run.steps=2",
    "run.explode_factor=0",
]
FEATURES = tiny_feature_extractor(8)
CLIP = "fastratio-tiny-clip"
PREFIX = "A photo depicts "


def _no_network(mp: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    import open_clip.pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    mp.setattr(huggingface_hub, "hf_hub_download", refuse)
    if hasattr(open_clip.pretrained, "hf_hub_download"):
        mp.setattr(open_clip.pretrained, "hf_hub_download", refuse)
    mp.setattr(open_clip.pretrained, "download_pretrained", refuse)
    mp.setattr(urllib.request, "urlopen", refuse)
    mp.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, captions) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train(config.load(None, [*TRAIN, f"data.prompts={captions}", f"run.out_dir={out}"]))
    return checkpoint.list_checkpoints(out)[-1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Real images of several sizes, shapes, modes and formats (one in a subfolder)."""
    folder = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 40), (64, 64), (300, 200), (37, 53), (256, 256), (512, 384), (20, 20), (90, 41), (33, 34), (48, 64), (260, 259)]
    for i, (w, h) in enumerate(sizes):
        arr = (rng.random((h, w, 3)) * 80 + rng.random((1, 1, 3)) * 170).astype(np.uint8)
        image = Image.fromarray(arr)
        if i == 3:
            image = image.convert("L")
        if i == 4:
            image = image.convert("RGBA")
        path = folder / ("sub" if i == 5 else "") / (f"real{i:02d}" + (".jpg" if i in (1, 7) else ".png"))
        path.parent.mkdir(exist_ok=True)
        image.save(path)
    return folder


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    """A tiny open_clip model (a registered config: open_clip's own text tower and tokenizer), saved with safetensors."""
    from safetensors.torch import save_file

    open_clip.factory._MODEL_CONFIGS[CLIP] = {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.create_model(CLIP, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, trained, captions, reference, clip_weights) -> tuple[dict, Path]:
    """One CLI run: FID against the folder, CLIP score, and the PNGs, with every network path refused."""
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "metrics.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        assert main([str(trained), "--captions", str(captions), "--n", "10", "--batch", "4", "--reference", str(reference),
                     "--feature-extractor", FEATURES, "--clip-weights", str(clip_weights), "--clip-model", CLIP,
                     "--clip-pretrained", "", "--clip-prefix", PREFIX, "--save-images", str(tmp / "images"),
                     "--save-ref-stats", str(tmp / "ref.npz"), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    return rows[0], tmp


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_fid_equals_torch_fidelity_on_the_two_folders_of_256_pngs(run, reference, tmp_path):
    import torch_fidelity
    from torchvision import transforms

    row, tmp = run
    generated = sorted((tmp / "images").glob("*.png"))
    assert [p.name for p in generated] == [f"{i:06d}.png" for i in range(10)]
    assert all(Image.open(p).size == (256, 256) and Image.open(p).mode == "RGB" for p in generated)
    # GigaGAN's evaluation transforms (CenterCropLongEdge, then Resize(256, LANCZOS)) on the real images.
    real = tmp_path / "real256"
    real.mkdir()
    files = sorted(p for p in reference.rglob("*") if p.is_file())
    for i, path in enumerate(files):
        image = Image.open(path).convert("RGB")
        image = transforms.Resize(256, interpolation=transforms.InterpolationMode.LANCZOS)(transforms.CenterCrop(min(image.size))(image))
        image.save(real / f"{i:02d}.png")
    want = torch_fidelity.calculate_metrics(input1=str(tmp / "images"), input2=str(real), fid=True, feature_extractor=FEATURES,
                                            cache=False, verbose=False, cuda=False, batch_size=5, save_cpu_ram=True)["frechet_inception_distance"]
    assert row["fid"] == pytest.approx(want, rel=1e-6, abs=1e-9) and row["fid"] > 0
    assert row["reference_images"] == 12 and row["n"] == 10 and row["resolution"] == 256 and row["images_written"] == 10
    # the saved reference statistics give the same FID on a later run
    from fastratio.fid import fid_of_features, image_features, read_reference_stats

    stats = read_reference_stats(tmp / "ref.npz")
    fake = torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in _pixels(tmp / "images")])
    assert fid_of_features(image_features(fake, feature_extractor=FEATURES), stats, FEATURES) == pytest.approx(want, rel=1e-6)


def test_clip_score_equals_open_clips_own_computation(run, clip_weights):
    row, tmp = run
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP, pretrained=str(clip_weights))  # open_clip's own loader
    model.eval()
    tokenizer = open_clip.get_tokenizer(CLIP)
    images = torch.stack([preprocess(Image.open(p)) for p in sorted((tmp / "images").glob("*.png"))])
    with torch.no_grad():
        image = model.encode_image(images)
        text = model.encode_text(tokenizer([PREFIX + c for c in CAPTIONS]))
    cos = torch.nn.functional.cosine_similarity(image, text, dim=-1).double()
    assert row["clip_cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert row["clip_score"] == pytest.approx(float(100 * cos.clamp(min=0).mean()), abs=1e-3)
    assert row["clip_model"] == CLIP and row["clip_prefix"] == PREFIX


def test_center_crop_and_resize_by_hand_and_as_torchvision():
    from torchvision import transforms

    arr = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)  # 3 high, 5 wide: columns 1..3
    assert np.array_equal(np.asarray(center_crop_resize(Image.fromarray(arr), 3)), arr[:, 1:4])
    wide = np.arange(3 * 4 * 3, dtype=np.uint8).reshape(3, 4, 3)  # offset round(0.5) = 0, as torchvision
    assert np.array_equal(np.asarray(center_crop_resize(Image.fromarray(wide), 3)), wide[:, 0:3])
    tall = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(6, 4, 3)  # 6 high, 4 wide: rows 1..4
    assert np.array_equal(np.asarray(center_crop_resize(Image.fromarray(tall), 4)), tall[1:5])
    flat = Image.new("RGB", (300, 200), (10, 200, 30))  # a constant image stays constant at 256 x 256
    assert np.all(np.asarray(center_crop_resize(flat)) == np.array([10, 200, 30], dtype=np.uint8))
    assert center_crop_resize(flat).size == (256, 256)
    rng = np.random.default_rng(1)
    for h, w in ((53, 37), (32, 32), (700, 513)):
        image = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        want = transforms.Resize(256, interpolation=transforms.InterpolationMode.LANCZOS)(transforms.CenterCrop(min(w, h))(image))
        assert np.array_equal(np.asarray(center_crop_resize(image)), np.asarray(want))


def test_images_depend_on_seed_and_index_only_and_existing_files_are_kept(run, trained, captions, tmp_path, capsys):
    _, tmp = run
    first = _pixels(tmp / "images")
    for batch in ("2", "3"):
        folder = tmp_path / f"b{batch}"
        assert main([str(trained), "--captions", str(captions), "--n", "5", "--batch", batch, "--save-images", str(folder),
                     "--out", str(tmp_path / "m.jsonl"), "--device", "cpu", "--no-progress"]) == 0
        got = _pixels(folder)
        assert len(got) == 5 and all(np.array_equal(a, b) for a, b in zip(got, first[:5], strict=True))
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["images_written"] == 5
    # seed 7 into the same folder: images 0..4 exist and are kept, image 5 is new and from seed 7 + 5
    assert main([str(trained), "--captions", str(captions), "--n", "6", "--seed", "7", "--save-images", str(tmp_path / "b3"),
                 "--out", str(tmp_path / "m.jsonl"), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images_written"] == 1
    kept = _pixels(tmp_path / "b3")
    assert all(np.array_equal(a, b) for a, b in zip(kept[:5], first[:5], strict=True)) and not np.array_equal(kept[5], first[5])


def _error(argv: list[str], capsys) -> str:
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_bad_inputs_are_one_line(trained, captions, reference, clip_weights, tmp_path, capsys):
    base = [str(trained), "--captions", str(captions), "--n", "2", "--device", "cpu", "--out", str(tmp_path / "m.jsonl"),
            "--feature-extractor", FEATURES, "--no-progress"]
    missing = tmp_path / "nope.txt"
    assert f"--captions: {missing} not found" in _error([*base[:2], str(missing), *base[3:], "--reference", str(reference)], capsys)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image suffix")
    assert f"--reference: {empty} holds no images" in _error([*base, "--reference", str(empty)], capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.new("RGB", (8, 8)).save(bad / "a.png")
    (bad / "b.png").write_bytes(b"this is not a PNG")
    assert f"{bad / 'b.png'}: cannot decode image" in _error([*base, "--reference", str(bad)], capsys)
    assert "--clip-weights:" in _error([*base, "--clip-weights", str(tmp_path / "none.safetensors"), "--clip-model", CLIP,
                                        "--clip-pretrained", ""], capsys)
    assert "nothing to do" in _error(base, capsys)
    with pytest.raises(UserError, match="not a built-in open_clip config"):
        ClipScorer("hf-hub:laion/CLIP-ViT-g-14-laion2B-s12B-b42K", clip_weights, torch.device("cpu"))
    with pytest.raises(UserError, match="--clip-pretrained"):
        ClipScorer(CLIP, clip_weights, torch.device("cpu"), pretrained="laion2b_s12b_b42k")


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_clip_weights_are_read_as_data_only_and_offline(clip_weights, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    torch.save({"visual.proj": _Payload(marker)}, tmp_path / "evil.bin")  # torch's zip format
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Payload(marker)))  # a bare pickle
    for name in ("evil.bin", "evil.pt"):
        with pytest.raises(UserError, match="not a weights file readable as data"):
            ClipScorer(CLIP, tmp_path / name, torch.device("cpu"), pretrained=None)
    assert not marker.exists()
    # a plain .bin state dict (open_clip's published format, with a DataParallel prefix) loads with weights_only
    from safetensors.torch import load_file

    state = load_file(str(clip_weights))
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "plain.bin")
    _no_network(monkeypatch)
    images = [Image.new("RGB", (256, 256), (200, 30, 30)), Image.new("RGB", (256, 256), (30, 30, 200))]
    a = ClipScorer(CLIP, tmp_path / "plain.bin", torch.device("cpu"), pretrained=None).cosines(images, ["red", "blue"])
    b = ClipScorer(CLIP, clip_weights, torch.device("cpu"), pretrained=None).cosines(images, ["red", "blue"])
    torch.testing.assert_close(a, b)
    wrong = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(wrong))
    with pytest.raises(UserError, match="does not fit"):
        ClipScorer(CLIP, wrong, torch.device("cpu"), pretrained=None)
