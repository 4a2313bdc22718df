"""Kill, preemption and divergence: at most one checkpoint interval is lost, resumed runs continue
the same loss sequence, and a NaN stops the run naming the step and the last good checkpoint."""

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastratio import checkpoint, config
from fastratio.guard import TrainingDiverged
from fastratio.runlog import TIMING_KEYS, read_jsonl
from fastratio.step import TrainStep
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run.progress=false", "run.log_every=1", "run.eval_every=1000", "run.plot_every=0", "run.ckpt_every=20",
    "run.steps=150", "optim.batch_size=32", "model.gen_hidden=32", "model.ratio_hidden=32", "run.kernels=torch",
    "run.device=cpu", "model.score_hidden=32", "method.teacher_steps=20",
]


def _cmd(out: Path, *extra: str) -> list[str]:
    sets = [arg for kv in [*SMALL, f"run.out_dir={out}"] for arg in ("--set", kv)]
    return [sys.executable, "-m", "fastratio.train", "configs/toy2d.yaml", *sets, *extra]


def _wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not checkpoint.checkpoint_path(run, step).exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.05)


def _losses(run: Path) -> dict[int, tuple]:
    return {r["step"]: tuple(v for k, v in sorted(r.items()) if k not in TIMING_KEYS) for r in read_jsonl(run / "metrics.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(_cmd(out), cwd=ROOT, check=True, capture_output=True, timeout=300)
    return _losses(out)


def test_sigkill_loses_at_most_one_interval_and_resume_continues_the_run(tmp_path, reference):
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint.list_checkpoints(run)[-1]
    saved_step = checkpoint.load(saved)["step"]
    logged = max(_losses(run))
    assert logged < 150 and logged - saved_step < 20  # lost: fewer than ckpt_every steps
    assert not list(run.glob("*.tmp"))  # no half-written checkpoint left visible

    subprocess.run(_cmd(run, "--resume", "auto"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert _losses(run) == reference  # identical metrics for every step, before and after the kill


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path, reference):
    run = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(run, 20, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM at step" in out
    stopped = int(out.split("stopped by SIGTERM at step")[1].split(";")[0])
    newest = checkpoint.list_checkpoints(run)[-1]
    assert checkpoint.load(newest)["step"] == stopped and max(_losses(run)) == stopped  # nothing lost
    subprocess.run(_cmd(run, "--resume", "auto"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert _losses(run) == reference


def test_nan_stops_with_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    original = TrainStep.__call__
    calls = {"n": 0}

    def poisoned(self, *args):
        calls["n"] += 1
        metrics = original(self, *args)
        if calls["n"] == 27:
            metrics["ratio_loss"] = metrics["ratio_loss"] * math.nan
        return metrics

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", SMALL + [f"run.out_dir={tmp_path}", "run.log_every=10"])
    with pytest.raises(TrainingDiverged, match=r"non-finite ratio_loss first at step 27 \(stopped at step 30\); last good checkpoint: .*ckpt-000000020.pt \(kept\)"):
        train(cfg)
    assert [checkpoint.load(p)["step"] for p in checkpoint.list_checkpoints(tmp_path)] == [20]


def test_nan_parameters_are_never_checkpointed(tmp_path, monkeypatch):
    original = TrainStep.__call__

    def poison_weights(self, *args):
        metrics = original(self, *args)
        with torch.no_grad():
            next(self.nets.generator.parameters()).fill_(math.inf)
        return metrics

    monkeypatch.setattr(TrainStep, "__call__", poison_weights)
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", SMALL + [f"run.out_dir={tmp_path}", "run.log_every=50"])
    with pytest.raises(TrainingDiverged, match="non-finite .* last good checkpoint: none yet"):
        train(cfg)
    assert checkpoint.list_checkpoints(tmp_path) == []


def test_a_finite_explosion_stops_naming_the_metric_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    """Nothing NaN, but the generator's gradient norm jumps by 10^9 (as a diverging two-score run did)."""
    original = TrainStep.__call__
    calls = {"n": 0}

    def exploding(self, *args):
        calls["n"] += 1
        metrics = original(self, *args)
        if calls["n"] >= 33:
            metrics["gen_grad_norm"] = metrics["gen_grad_norm"] * 1e9
        return metrics

    monkeypatch.setattr(TrainStep, "__call__", exploding)
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", SMALL + [f"run.out_dir={tmp_path}", "run.log_every=5"])
    with pytest.raises(TrainingDiverged, match=r"gen_grad_norm exploded to .* at step 35, .*x its median .* \(run.explode_factor 1e\+06\); "
                                               r"last good checkpoint: .*ckpt-000000020.pt \(kept\)"):
        train(cfg)
    assert [checkpoint.load(p)["step"] for p in checkpoint.list_checkpoints(tmp_path)] == [20]
    # An explosion between the first and the second log line stops too.
    calls["n"] = 27  # the 33rd call is step 6: the first log line (step 5) is normal
    with pytest.raises(TrainingDiverged, match=r"gen_grad_norm exploded to .* at step 10, "):
        train(config.load(ROOT / "configs" / "toy2d.yaml", SMALL + [f"run.out_dir={tmp_path / 'early'}", "run.log_every=5"]))
    # The factor is the user's: 0 turns the check off.
    calls["n"] = 0
    train(config.load(ROOT / "configs" / "toy2d.yaml", SMALL + [f"run.out_dir={tmp_path / 'off'}", "run.log_every=5", "run.explode_factor=0"]))
    # And a normal run never trips the default.
    monkeypatch.setattr(TrainStep, "__call__", original)
    train(config.load(ROOT / "configs" / "toy2d.yaml", SMALL + [f"run.out_dir={tmp_path / 'normal'}", "run.log_every=5"]))


def test_a_second_ctrl_c_stops_at_once_in_one_line_without_a_traceback(capsys):
    """The first SIGINT asks for a checkpoint and a clean stop; the second interrupts at once. Both here
    are real signals to this process, through the trainer's handler (StopRequest) and its CLI wrapper."""
    import os

    from fastratio.errors import run_cli
    from fastratio.guard import StopRequest

    def main(argv):
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.time() + 10
            while not stop.requested and time.time() < deadline:
                time.sleep(0.01)
            assert stop.signal_name == "SIGINT"  # the first one: a flag, the loop goes on to its checkpoint
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # interrupted well before
        return 0

    before = signal.getsignal(signal.SIGINT)
    try:
        status = run_cli(main, [])
    except KeyboardInterrupt:
        pytest.fail("the second Ctrl-C escaped as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 130 and len(err) == 1 and err[0].startswith("error: interrupted by Ctrl-C; stopped at once"), err
    assert signal.getsignal(signal.SIGINT) is before  # StopRequest put the earlier handler back


def test_evaluation_and_plots_draw_nothing_from_the_training_rng(tmp_path, monkeypatch):
    """The step's dropout reads the global RNG. An evaluation drew there (torch-fidelity's loader takes
    its seed from it, and a resumed process reads the real set's features again at its first evaluation),
    which moved every later mask: what a checkpoint saves of that RNG must not depend on evaluations."""
    from fastratio.tasks.toy2d import Toy2DTask

    def saved_rng(out: Path) -> torch.Tensor:
        sets = [*SMALL, f"run.out_dir={out}", "run.steps=2", "run.ckpt_every=2", "run.eval_every=1", "run.plot_every=2",
                "method.teacher_steps=2", "data.eval_samples=64"]
        train(config.load(ROOT / "configs" / "toy2d.yaml", sets))
        return checkpoint.load(checkpoint.checkpoint_path(out, 2))["rng"]["torch_cpu"]

    quiet = saved_rng(tmp_path / "quiet")
    evaluate, plot = Toy2DTask.evaluate, Toy2DTask.plot
    monkeypatch.setattr(Toy2DTask, "evaluate", lambda self, model: (torch.rand(3), evaluate(self, model))[1])
    monkeypatch.setattr(Toy2DTask, "plot", lambda self, model, path: (torch.rand(3), plot(self, model, path))[1])
    assert torch.equal(saved_rng(tmp_path / "drawing"), quiet)
