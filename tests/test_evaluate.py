"""FID/KID through torch-fidelity with a tiny registered feature extractor (the Inception weights
are not in CI): a set against itself gives 0, a shifted copy more, and the evaluate CLI writes
per-seed, per-N rows and the FID-vs-N report for a real stage-2 checkpoint."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import idx_bytes, tiny_feature_extractor

from fastratio import checkpoint
from fastratio.data.formats import load_dataset
from fastratio.evaluate import main as evaluate_main
from fastratio.fid import fidelity_metrics
from fastratio.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY_NAME = tiny_feature_extractor(8)  # 8 fixed projections of 4x4-pooled pixels


def _images(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 1, generator=g) * 150 + torch.rand(n, 3, 12, 12, generator=g) * 60
    return base.round().clamp(0, 255).to(torch.uint8)


def test_fid_is_zero_against_itself_and_grows_with_a_shift():
    real = _images()
    same = fidelity_metrics(real, real, feature_extractor=TINY_NAME, batch=100)
    assert abs(same["fid"]) < 1e-3  # (KID's unbiased estimate is not 0 for a set against itself)
    shifted = [fidelity_metrics((real.int() + s).clamp(0, 255).to(torch.uint8), real, feature_extractor=TINY_NAME, batch=100) for s in (10, 30)]
    assert 0.01 < shifted[0]["fid"] < shifted[1]["fid"] and shifted[0]["kid"] < shifted[1]["kid"]
    other = fidelity_metrics(_images(seed=1), real, feature_extractor=TINY_NAME, batch=100)
    # a fresh draw of the same distribution is closer than a shifted copy
    assert other["fid"] < shifted[0]["fid"] and other["kid"] < shifted[0]["kid"]


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    images = np.random.default_rng(0).integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    (d / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    common = ["run.progress=false", "run.steps=2", "run.plot_every=0", "run.eval_every=2", "data.eval_samples=4",
              "optim.batch_size=4", "teacher.sample_steps=1", "model.channels=8", "model.channel_mult=[1,2]",
              "model.num_blocks=1", "model.attn_resolutions=[]", f"data.path={d / 'train-images-idx3-ubyte.gz'}"]
    sets = lambda *kv: [a for item in (*common, *kv) for a in ("--set", item)]
    assert train_main([str(ROOT / "configs" / "fashion_mnist_teacher.yaml"), *sets(f"run.out_dir={d / 't'}")]) == 0
    teacher = checkpoint.list_checkpoints(d / "t")[-1]
    assert train_main([str(ROOT / "configs" / "fashion_mnist.yaml"), *sets(f"run.out_dir={d / 's'}", f"teacher.checkpoint={teacher}")]) == 0
    return checkpoint.list_checkpoints(d / "s")[-1], teacher


def test_evaluate_cli_rows_per_seed_and_n_and_report(stage2, tmp_path):
    ckpt, teacher = stage2
    out = tmp_path / "eval.jsonl"
    argv = [str(ckpt), "--n", "24", "--batch", "12", "--seeds", "2", "--best-of", "1", "4", "--feature-extractor", TINY_NAME,
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert evaluate_main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["best_of"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (4, 0), (4, 1)]
    assert all(r["fid"] >= 0 and r["n"] == 24 and r["real_images"] == 40 and r["commit"] for r in rows)
    assert rows[0]["fid"] != rows[1]["fid"]  # seeds draw different images
    assert out.with_suffix(".png").stat().st_size > 0
    # A teacher checkpoint is evaluated through its Heun sampler.
    assert evaluate_main([str(teacher), "--n", "12", "--batch", "12", "--steps", "2", "--feature-extractor", TINY_NAME,
                          "--out", str(tmp_path / "t.jsonl"), "--no-progress", "--device", "cpu"]) == 0


class _Marker:
    """A pickle that creates a file when unpickled: proof that a loader ran it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_in_loop_fid_is_logged_and_the_best_snapshot_kept(stage2, tmp_path):
    _ckpt, teacher = stage2
    data = checkpoint.load(teacher)["config"]["data"]["path"]
    # A feature cache planted in the run folder under the names torch-fidelity would look up there.
    n_real = load_dataset("idx", data).images.shape[0]
    planted = tmp_path / "fid-cache"
    planted.mkdir()
    prefix = f"real-{TINY_NAME}-{n_real}-{TINY_NAME}"
    for name in (f"{prefix}-features-feat.pt", f"{prefix}-stat-fid-feat.pt"):
        torch.save(_Marker(tmp_path / "MARKER"), planted / name)
    sets = ["run.progress=false", "run.steps=4", "run.plot_every=0", "run.eval_every=2", "run.log_every=2", "data.eval_samples=4",
            "optim.batch_size=4", "model.channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[]",
            f"data.path={data}", f"teacher.checkpoint={teacher}", f"run.out_dir={tmp_path}", "eval.fid_samples=16",
            f"eval.feature_extractor={TINY_NAME}"]
    assert train_main([str(ROOT / "configs" / "fashion_mnist.yaml"), *[a for kv in sets for a in ("--set", kv)]]) == 0
    from fastratio.runlog import read_jsonl

    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval_fid" in r]
    assert [r["step"] for r in rows] == [2, 4] and all(r["eval_fid"] >= 0 and "eval_kid" in r for r in rows)
    best = min(rows, key=lambda r: r["eval_fid"])
    assert checkpoint.load(tmp_path / "best.pt")["step"] == best["step"]
    assert not (tmp_path / "MARKER").exists()  # the run never read a cache from its folder


def test_inception_weights_are_checked_as_data_before_torch_fidelity(tmp_path):
    from fastratio.errors import UserError
    from fastratio.inception import checked_weights, inception_skeleton

    evil = tmp_path / "evil.pth"
    torch.save(_Marker(tmp_path / "MARKER"), evil)
    with pytest.raises(UserError, match="evil.pth is not a weights file readable as data"):
        checked_weights(str(evil))
    assert not (tmp_path / "MARKER").exists()
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(UserError, match="is not torch-fidelity's Inception"):
        checked_weights(str(wrong))
    good = tmp_path / "good.pth"
    want = {k: v.half() if v.is_floating_point() else v for k, v in inception_skeleton().state_dict().items()}
    torch.save(want, good)
    copy = checked_weights(str(good))
    assert copy != str(good) and Path(copy).parent.stat().st_mode & 0o077 == 0  # a private folder of this process
    got = torch.load(copy, weights_only=True)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    assert all(v.dtype != torch.float16 for v in got.values())


def test_torch_fidelitys_own_cached_weights_are_checked_too(tmp_path, monkeypatch):
    """Without --inception torch-fidelity would load its torch-hub cache copy as a pickle."""
    from fastratio.errors import UserError
    from fastratio.inception import default_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.save(_Marker(tmp_path / "MARKER"), tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth")
    with pytest.raises(UserError, match="cached Inception weights: .* is not a weights file readable as data"):
        default_weights()
    assert not (tmp_path / "MARKER").exists()


def test_a_streamed_run_evaluates_against_a_fixed_subset_read_by_workers(stage2, tmp_path):
    from fastratio.data.write import write_dataset_zip
    from fastratio.runlog import read_jsonl

    _ckpt, teacher = stage2
    data = load_dataset("idx", checkpoint.load(teacher)["config"]["data"]["path"])
    archive = write_dataset_zip(tmp_path / "data.zip", data.images.numpy(), None if data.labels is None else data.labels.tolist())
    run = tmp_path / "run"
    sets = ["run.progress=false", "run.steps=2", "run.plot_every=0", "run.eval_every=2", "run.log_every=2", "data.eval_samples=4",
            "optim.batch_size=4", "data.kind=folder", "data.source=stream", "data.workers=1", f"data.path={archive}",
            f"teacher.checkpoint={teacher}", f"run.out_dir={run}", "eval.fid_samples=16", f"eval.feature_extractor={TINY_NAME}"]
    assert train_main([str(ROOT / "configs" / "fashion_mnist.yaml"), *[a for kv in sets for a in ("--set", kv)]]) == 0
    (row,) = [r for r in read_jsonl(run / "metrics.jsonl") if "eval_fid" in r]
    assert row["eval_fid"] >= 0
    out = tmp_path / "eval.jsonl"
    assert evaluate_main([str(run / "ckpt-000000002.pt"), "--n", "12", "--batch", "12", "--real-n", "10", "--feature-extractor", TINY_NAME,
                          "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    (evaluated,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert evaluated["real_images"] == 10 and evaluated["fid"] >= 0
