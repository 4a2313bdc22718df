"""EDM2's latent pipeline against EDM2's own code (tests/fixtures/edm2/make_fixtures.py): a small
randomly initialised diffusers AutoencoderKL, EDM2's StabilityVAEEncoder and ``dataset_tool.py
encode`` output. The VAE is loaded from safetensors only."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import tiny_feature_extractor, tiny_features

from fastratio.data.formats import Archive
from fastratio.data.write import write_dataset_zip
from fastratio.errors import UserError, run_cli
from fastratio.latents import LatentScaling, decode, encode_pixels, load_vae
from fastratio.tools.encode_latents import main as encode_main

FIX = Path(__file__).resolve().parent / "fixtures" / "edm2"
EDM2 = torch.load(FIX / "vae_outputs.pt", weights_only=True)
LABELS = [0, 3, 1, 3, 2]  # make_fixtures.py's dataset.json


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """The fixture VAE as a diffusers folder (config.json + safetensors), as a downloaded one is."""
    from fastratio.hf import import_diffusers

    diffusers = import_diffusers("test", extra="latent")

    saved = torch.load(FIX / "vae.pt", weights_only=True)
    vae = diffusers.AutoencoderKL(**saved["config"])
    vae.load_state_dict(saved["state_dict"])
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def test_encoding_scaling_and_decoding_equal_edm2_s_stability_vae_encoder(vae_folder):
    vae = load_vae(str(vae_folder), torch.device("cpu"))
    raw = encode_pixels(vae, EDM2["pixels"])
    torch.testing.assert_close(raw, EDM2["raw"], rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)  # EDM2's encode_latents draws randn_like(mean) of the strided half, from the global generator
    eps = torch.randn_like(EDM2["raw"].chunk(2, dim=1)[0])
    final = LatentScaling().to_final(EDM2["raw"], eps)
    torch.testing.assert_close(final, EDM2["final"], rtol=1e-6, atol=1e-6)
    assert torch.equal(decode(vae, EDM2["final"], LatentScaling()), EDM2["decoded"])


def test_encode_latents_cli_writes_what_edm2_dataset_tool_encode_writes(vae_folder, tmp_path):
    images = write_dataset_zip(tmp_path / "pixels.zip", EDM2["pixels"].numpy(), LABELS)
    out = tmp_path / "latents.zip"
    assert run_cli(encode_main, [str(images), str(out), "--vae", str(vae_folder), "--batch", "2", "--no-progress", "--device", "cpu"]) == 0
    with zipfile.ZipFile(out) as ours, zipfile.ZipFile(FIX / "latents.zip") as theirs:
        assert ours.namelist() == theirs.namelist()
        assert json.loads(ours.read("dataset.json")) == json.loads(theirs.read("dataset.json"))
    a, b = Archive(out), Archive(FIX / "latents.zip")
    for i in range(len(b)):
        np.testing.assert_allclose(a.decode(i), b.decode(i), rtol=1e-5, atol=1e-6)
    assert run_cli(encode_main, [str(images), str(out), "--vae", str(vae_folder)]) == 2  # never replaces a dataset


def test_a_pickled_vae_is_refused_and_never_unpickled(tmp_path, vae_folder, capsys):
    import shutil

    class Marker:
        def __reduce__(self):
            return open, (str(tmp_path / "MARKER"), "w")

    folder = tmp_path / "pickled-vae"
    folder.mkdir()
    shutil.copy(vae_folder / "config.json", folder / "config.json")
    torch.save({"x": Marker()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"data.vae: cannot load an AutoencoderKL from the folder .*pickled-vae"):
        load_vae(str(folder), torch.device("cpu"))
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        load_vae("nobody/no-such-vae", torch.device("cpu"))
    assert not (tmp_path / "MARKER").exists()


def test_fid_against_edm2_reference_statistics_read_as_data(tmp_path):
    from fastratio.fid import fid_against_reference, fidelity_metrics, read_reference_stats

    name = tiny_feature_extractor(16)
    images = torch.load(FIX / "ref_images.pt", weights_only=True)["images"]
    ref = read_reference_stats(FIX / "ref-stats.pkl")  # written by EDM2's calculate_metrics code
    feats = tiny_features(images, 16)
    np.testing.assert_allclose(ref["mu"], feats.double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-9)
    assert fid_against_reference(images, ref, feature_extractor=name) == pytest.approx(0, abs=1e-5)
    shifted = (images.int() + 40).clamp(0, 255).to(torch.uint8)
    direct = fidelity_metrics(shifted, images, feature_extractor=name)["fid"]  # torch-fidelity on both image sets
    assert fid_against_reference(shifted, ref, feature_extractor=name) == pytest.approx(direct, rel=1e-4) and direct > 0.01
    np.savez(tmp_path / "edm.npz", mu=ref["mu"], sigma=ref["sigma"])  # EDM's fid-refs layout
    assert read_reference_stats(tmp_path / "edm.npz")["mu"].shape == (16,)


def test_hostile_reference_statistics_are_refused(tmp_path):
    import pickle

    from fastratio.fid import read_reference_stats

    class Marker:
        def __reduce__(self):
            return open, (str(tmp_path / "MARKER"), "w")

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": {"mu": Marker(), "sigma": 0}}))
    with pytest.raises(UserError, match="evil.pkl is not reference statistics readable as data"):
        read_reference_stats(tmp_path / "evil.pkl")
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.zeros((2, 2))}}))
    with pytest.raises(UserError, match=r"mu \(3,\) and sigma \(2, 2\)"):
        read_reference_stats(tmp_path / "bad.pkl")
    assert not (tmp_path / "MARKER").exists()


def test_the_whole_latent_pipeline_on_cpu(vae_folder, tmp_path):
    """Encode pixels with the VAE, DiJS stage 2 from an EDM2-written latent teacher on the streamed
    latents (configs/imagenet512.yaml, shrunk), grids decoded, in-loop FID against reference
    statistics, then the sample and evaluate CLIs on the checkpoint."""
    from PIL import Image

    from fastratio import checkpoint, config
    from fastratio.evaluate import main as evaluate_main
    from fastratio.runlog import read_jsonl
    from fastratio.sample import main as sample_main
    from fastratio.train import train

    name = tiny_feature_extractor(16)
    pixels = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (20, 3, 16, 16), dtype=np.uint8))
    images = write_dataset_zip(tmp_path / "pixels.zip", pixels.numpy(), [i % 10 for i in range(20)])
    latents = tmp_path / "latents.zip"
    assert run_cli(encode_main, [str(images), str(latents), "--vae", str(vae_folder), "--no-progress", "--device", "cpu"]) == 0
    feats = tiny_features(pixels, 16)
    np.savez(tmp_path / "ref.npz", mu=feats.double().mean(0).numpy(), sigma=np.cov(feats.double().numpy(), rowvar=False))
    teacher = FIX / "edm2-latent-cond" / "edm2-latent-cond-0000008-0.070.pkl"  # EDM2's latent net: 4 x 8 x 8, 10 classes
    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "imagenet512.yaml", [
        f"run.out_dir={tmp_path / 'run'}", f"data.path={latents}", f"data.vae={vae_folder}", f"teacher.checkpoint={teacher}",
        "data.workers=1", "run.steps=2", "run.log_every=1", "run.eval_every=2", "run.plot_every=2", "run.ckpt_every=2",
        "run.progress=false", "run.precision=fp32", "run.device=cpu", "step.mode=eager", "optim.batch_size=4", "data.eval_samples=8",
        "eval.fid_samples=8", f"eval.fid_ref={tmp_path / 'ref.npz'}", f"eval.feature_extractor={name}",
    ])
    run = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["ratio_loss"]) for r in rows)
    assert rows[-1]["eval_fid"] > 0 and np.isfinite(rows[-1]["eval_latent_std_gap"])
    assert Image.open(run / "samples-000000002.png").size[0] >= 16 * 8  # 64 decoded 16x16 images
    state = checkpoint.load(run / "ckpt-000000002.pt")
    assert state["latent"]["vae"] == str(vae_folder) and state["latent"]["final_std"] == 0.5
    assert run_cli(sample_main, [str(run / "ckpt-000000002.pt"), "--n", "4", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
    assert Image.open(tmp_path / "s.png").size[0] >= 2 * 16  # decoded pixels, not 8x8 latents
    out = tmp_path / "eval.jsonl"
    assert run_cli(evaluate_main, [str(run / "ckpt-000000002.pt"), "--n", "8", "--batch", "8", "--fid-ref", str(tmp_path / "ref.npz"),
                                   "--feature-extractor", name, "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["fid"] > 0 and row["real"].startswith("statistics:")
