"""fastratio.evaluate's papers' metrics and protocol: IS and FID of a folder (or an ADM .npz) equal
torch-fidelity's own on it; EDM's three-draw protocol, each draw equal to the folder fastratio.sample
writes for its seeds; Clean-FID's resize equal to the clean-fid package's and fed to torch-fidelity's
Inception; bad input as one line. Features come from tiny registered extractors (the Inception weights
are not in CI) and, for the clean resize, from torch-fidelity's Inception with random weights."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from test_sample_seeds import train_tiny
from testkit import tiny_feature_extractor, tiny_features

from fastratio.errors import UserError, run_cli
from fastratio.evaluate import main as evaluate_main
from fastratio.fid import clean_resize, metric_features
from fastratio.inception import inception_skeleton
from fastratio.sample import main as sample_main

TINY = tiny_feature_extractor(8, logits=10)


def _pictures(n: int, seed: int, size=(16, 16)) -> np.ndarray:
    """uint8 [n, H, W, 3]: a random colour per image plus noise, so the sets have spread."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 180, size=(n, 1, 1, 3))
    return (base + rng.integers(0, 70, size=(n, *size, 3))).astype(np.uint8)


def _folder(path, images: np.ndarray, subfolders: bool = False):
    for i, image in enumerate(images):
        file = path / (f"{i - i % 10:06d}/{i:06d}.png" if subfolders else f"{i:06d}.png")
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(file)
    return path


def _evaluate(tmp_path, *argv) -> dict:
    out = tmp_path / "rows.jsonl"
    out.unlink(missing_ok=True)
    assert evaluate_main([*argv, "--feature-extractor", TINY, "--isc", "--batch", "64", "--out", str(out), "--device", "cpu"]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    return row


def test_is_and_fid_of_a_folder_or_npz_equal_torch_fidelitys_own(tmp_path):
    fake, real = _pictures(30, 0), _pictures(40, 1)
    folder, reals = _folder(tmp_path / "fake", fake), _folder(tmp_path / "real", real)
    theirs = torch_fidelity.calculate_metrics(input1=str(folder), input2=str(reals), isc=True, fid=True, kid=True, feature_extractor=TINY,
                                              kid_subset_size=30, cache=False, verbose=False, cuda=False,
                                              save_cpu_ram=True)  # no forked loader workers: a fork after other tests' threads can hang
    want = {"fid": theirs["frechet_inception_distance"], "kid": theirs["kernel_inception_distance_mean"],
            "is": theirs["inception_score_mean"], "is_std": theirs["inception_score_std"]}
    assert want["fid"] > 1 and want["is"] > 1.5  # a non-trivial check
    against_real = ("--data-kind", "folder", "--data-path", str(reals))
    row = _evaluate(tmp_path, "--images", str(folder), *against_real)
    assert {k: row[k] for k in want} == pytest.approx(want, rel=1e-9)
    assert row["n"] == 30 and row["real_images"] == 40 and row["resize"] == "tensorflow"
    # The same images as EDM's subfolders, and as the ADM evaluator's .npz.
    nested = _folder(tmp_path / "nested", fake, subfolders=True)
    np.savez(tmp_path / "fake.npz", arr_0=fake)
    for source in (nested, tmp_path / "fake.npz"):
        assert {k: _evaluate(tmp_path, "--images", str(source), *against_real)[k] for k in want} == pytest.approx(want, rel=1e-9)
    # Against reference statistics of the real set's features (FID and IS from one pass).
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(tiny_features(torch.from_numpy(real).permute(0, 3, 1, 2), 8).double())
    np.savez(tmp_path / "ref.npz", mu=stats["mu"], sigma=stats["sigma"])
    row = _evaluate(tmp_path, "--images", str(folder), "--fid-ref", str(tmp_path / "ref.npz"))
    assert row["fid"] == pytest.approx(want["fid"], rel=1e-6) and row["is"] == pytest.approx(want["is"], rel=1e-9)
    assert row["real"] == f"statistics:{tmp_path / 'ref.npz'}"


def test_edm_protocol_reports_three_draws_and_each_equals_the_folder_sample_writes(tmp_path, capsys):
    ckpt, _ = train_tiny(tmp_path)
    data = tmp_path / "train-images-idx3-ubyte.gz"
    out = tmp_path / "edm.jsonl"
    assert evaluate_main([str(ckpt), "--protocol", "edm", "--n", "12", "--batch", "5", "--feature-extractor", TINY, "--isc",
                          "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seeds"], r["protocol"]) for r in rows] == [("0-11", "edm"), ("12-23", "edm"), ("24-35", "edm")]
    assert len({r["fid"] for r in rows}) == 3 and all(r["is"] > 0 for r in rows)
    assert f"EDM protocol, FID min {min(r['fid'] for r in rows):.3f}" in capsys.readouterr().out
    assert sample_main([str(ckpt), "--seeds", "12-23", "--outdir", str(tmp_path / "draw1"), "--device", "cpu"]) == 0
    row = _evaluate(tmp_path, "--images", str(tmp_path / "draw1"), "--data-kind", "idx", "--data-path", str(data))
    assert (row["fid"], row["kid"], row["is"]) == (rows[1]["fid"], rows[1]["kid"], rows[1]["is"])
    capsys.readouterr()
    assert run_cli(evaluate_main, [str(ckpt), "--protocol", "edm", "--seeds", "2", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: --protocol edm: 3 draws; leave out --seeds 2\n"


def _test_pictures() -> list[np.ndarray]:
    """uint8 [H, W, 3] images of odd and common sizes, smooth and sharp, down- and upscaled by the resize."""
    yy, xx = np.mgrid[0:300, 0:400]
    smooth = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, ((xx + yy) * 0.3) % 256], -1).astype(np.uint8)
    shapes = [(32, 32), (17, 23), (64, 48), (299, 299)]
    return [smooth, *(_pictures(1, i, size)[0] for i, size in enumerate(shapes)), np.full((9, 9, 3), 255, np.uint8)]


def test_clean_resize_equals_clean_fids_resizer():
    from cleanfid.resize import make_resizer

    theirs = make_resizer("PIL", False, "bicubic", (299, 299))
    for picture in _test_pictures():
        ours = clean_resize(torch.from_numpy(picture).permute(2, 0, 1)[None])[0].permute(1, 2, 0)
        assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(theirs(picture))), picture.shape


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's Inception with random weights (the real ones cannot be downloaded here)."""
    path = tmp_path_factory.mktemp("inception") / "random.pth"
    torch.manual_seed(0)
    torch.save(inception_skeleton().state_dict(), path)
    return path


def test_the_clean_resize_feeds_torch_fidelitys_inception(random_inception, tmp_path):
    features = {resize: metric_features(("fid",), weights=str(random_inception), batch=4, resize=resize) for resize in ("tensorflow", "clean")}
    at_299 = torch.from_numpy(_pictures(1, 5, (299, 299))).permute(0, 3, 1, 2)
    small = torch.from_numpy(_pictures(1, 6, (32, 32))).permute(0, 3, 1, 2)
    # At 299x299 both resizes are the identity: the clean path reaches the same network the same way.
    torch.testing.assert_close(features["clean"](at_299)["fid"], features["tensorflow"](at_299)["fid"], rtol=1e-6, atol=1e-12)
    clean, bilinear = features["clean"](small)["fid"], features["tensorflow"](small)["fid"]
    assert clean.shape == (1, 2048) and not torch.allclose(clean, bilinear, rtol=1e-3, atol=0)
    # Converted weights without the classifier: IS is refused rather than reported as 1.
    state = torch.load(random_inception, weights_only=True)
    torch.save({**state, "fc.weight": torch.zeros_like(state["fc.weight"])}, tmp_path / "no-fc.pth")
    with pytest.raises(UserError, match="^--isc: .*no-fc.pth holds no classifier"):
        metric_features(("fid", "isc"), weights=str(tmp_path / "no-fc.pth"))


@pytest.mark.parametrize("make, argv, message", [
    (lambda d: d.mkdir(), ["--images", "D", "--fid-ref", "R"], "--images: D: no images"),
    (lambda d: d.write_bytes(b"not a zip"), ["--images", "D.npz", "--fid-ref", "R"], "--images: D.npz: not a readable .npz"),
    (lambda d: np.savez(d, images=np.zeros((2, 4, 4, 3), np.uint8)), ["--images", "D.npz", "--fid-ref", "R"], "--images: D.npz has no arr_0"),
    (lambda d: np.savez(d, np.zeros((2, 4, 4, 3), np.float32)), ["--images", "D.npz", "--fid-ref", "R"], "--images: D.npz: arr_0 is float32"),
    (lambda d: None, ["--images", "D"], "--images: D not found"),
    (lambda d: _folder(d, _pictures(2, 0)), ["--images", "D"], "--images: no run to take the real images from"),
    (lambda d: None, [], "python -m fastratio.evaluate: give a checkpoint or --images"),
    (lambda d: _folder(d, _pictures(2, 0)), ["--images", "D", "--protocol", "edm"], "--protocol/--seeds: they draw from a checkpoint"),
])
def test_bad_evaluate_input_is_one_line(tmp_path, capsys, make, argv, message):
    target = tmp_path / ("d.npz" if "D.npz" in argv else "d")
    make(target)
    np.savez(tmp_path / "r.npz", mu=np.zeros(8), sigma=np.eye(8))
    names = {"D": str(tmp_path / "d"), "D.npz": str(tmp_path / "d.npz"), "R": str(tmp_path / "r.npz")}
    argv = [names.get(a, a) for a in argv]
    assert run_cli(evaluate_main, [*argv, "--feature-extractor", TINY, "--device", "cpu", "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    for short, full in names.items():
        message = message.replace(f" {short}", f" {full}")
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    shutil.rmtree(tmp_path / "d", ignore_errors=True)


def test_clean_resize_is_only_for_the_inception(tmp_path, capsys):
    _folder(tmp_path / "d", _pictures(2, 0))
    argv = ["--images", str(tmp_path / "d"), "--data-kind", "folder", "--data-path", str(tmp_path / "d"), "--resize", "clean",
            "--feature-extractor", TINY, "--device", "cpu", "--out", str(tmp_path / "o.jsonl")]
    assert run_cli(evaluate_main, argv) == 2
    assert capsys.readouterr().err == f"error: --resize clean: Clean-FID's resize feeds inception-v3-compat at 299x299, not {TINY}\n"
