"""torchrun with 2 gloo ranks on CPU reproduces one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastratio import checkpoint
from fastratio.runlog import TIMING_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run.progress=false", "run.log_every=1", "run.eval_every=100", "run.plot_every=0", "run.ckpt_every=4",
    "run.steps=4", "optim.batch_size=32", "model.gen_hidden=32", "model.ratio_hidden=32", "run.device=cpu",
    "model.score_hidden=24", "method.teacher_steps=3",
]


def _run(out: Path, nproc: int, *overrides: str) -> Path:
    sets = [arg for kv in [*SMALL, f"run.out_dir={out}", *overrides] for arg in ("--set", kv)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, "-m", "fastratio.train", "configs/toy2d.yaml", *sets], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def assert_same_runs(one: Path, two: Path) -> tuple[dict, dict]:
    """Two runs' logged metrics (timing aside) and final networks agree to 1e-4; their last checkpoints."""
    for a, b in zip(read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl"), strict=True):
        for key in a:
            if key not in (*TIMING_KEYS, "step", "kimg"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    sa, sb = (checkpoint.load(checkpoint.list_checkpoints(r)[-1]) for r in (one, two))
    for role in sa["nets"]:
        for key, value in sa["nets"][role].items():
            torch.testing.assert_close(sb["nets"][role][key], value, rtol=1e-4, atol=1e-6, msg=lambda m, k=key, r=role: f"{r}.{k}: {m}")
    return sa, sb


@pytest.mark.parametrize("method, kernels, mode", [("diffratio", "triton", "eager"), ("vsd", "torch", "eager"), ("diffratio", "torch", "compile")])
def test_two_gloo_ranks_equal_one_process(tmp_path, method, kernels, mode):
    args = (f"method.name={method}", f"run.kernels={kernels}", f"step.mode={mode}")
    one = _run(tmp_path / "one", 1, *args)
    two = _run(tmp_path / "two", 2, *args)
    assert [r["step"] for r in read_jsonl(two / "metrics.jsonl")] == [1, 2, 3, 4]  # rank 0 alone writes the log
    sa, sb = assert_same_runs(one, two)
    for key, value in sa["ema"].items():
        torch.testing.assert_close(sb["ema"][key], value, rtol=1e-4, atol=1e-6)
