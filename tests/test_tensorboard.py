"""``run.tensorboard``: every metrics.jsonl field and every sample grid in event files under
<run>/tensorboard/, read back with TensorBoard's own ``EventAccumulator``. A run killed with SIGKILL
after logging steps past its checkpoint and then resumed shows each logged step exactly once, with
metrics.jsonl's values; a missing package is one line naming the key and the extra."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastratio import checkpoint, config
from fastratio.errors import UserError, run_cli
from fastratio.runlog import read_jsonl

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run.progress=false", "run.log_every=1", "run.eval_every=1000", "run.plot_every=22", "run.ckpt_every=40",
    "run.steps=80", "optim.batch_size=32", "model.gen_hidden=32", "model.ratio_hidden=32", "run.kernels=torch",
    "run.device=cpu", "model.score_hidden=32", "method.teacher_steps=20", "run.tensorboard=true",
]


def _cmd(out: Path, *extra: str) -> list[str]:
    sets = [arg for kv in [*SMALL, f"run.out_dir={out}"] for arg in ("--set", kv)]
    return [sys.executable, "-m", "fastratio.train", "configs/toy2d.yaml", *sets, *extra]


def _accumulated(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    events.Reload()
    return events


def _assert_events_equal_metrics(run: Path) -> None:
    """Each field of metrics.jsonl is a scalar tag holding exactly its logged steps, once each, in
    order, with its values (float32, as event files store them)."""
    rows = read_jsonl(run / "metrics.jsonl")
    events = _accumulated(run)
    keys = {k for r in rows for k in r} - {"step"}
    assert set(events.Tags()["scalars"]) == keys
    for key in sorted(keys):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], float(np.float32(r[key]))) for r in rows if key in r]
        assert got == want, key


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"no {what} in time"
        time.sleep(0.02)


def _logged_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_jsonl(run / "metrics.jsonl")), default=0)
    except (OSError, UserError):
        return 0


def test_a_killed_and_resumed_run_holds_each_logged_step_once(tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Past the checkpoint at 40 and the sample grid at 44: both would be logged twice without the purge.
    _wait(lambda: checkpoint.checkpoint_path(run, 40).exists() and _logged_step(run) >= 46, proc, "steps past the checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = checkpoint.load(checkpoint.list_checkpoints(run)[-1])["step"]
    (killed_file,) = (run / "tensorboard").iterdir()
    raw = [e for e in EventFileLoader(str(killed_file)).Load() if e.HasField("summary")]
    past = {e.step for e in raw if e.step > saved}
    assert past and max(past) < 80, (saved, sorted(past))  # the killed session's file holds steps the resume redoes
    assert any(v.tag == "samples" for e in raw if e.step == 44 for v in e.summary.value)

    done = subprocess.run(_cmd(run, "--resume", "auto"), cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run / "tensorboard").iterdir())) == 2  # append-only: one file per session
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 81))
    _assert_events_equal_metrics(run)
    events = _accumulated(run)
    assert [e.step for e in events.Images("samples")] == [22, 44, 66, 80]
    assert all(e.width == e.height > 0 for e in events.Images("samples"))


def test_a_new_run_over_an_earlier_runs_events_shows_only_its_own(tmp_path):
    """--force sets an earlier run's metrics aside (it left no checkpoint); its event files stay but
    are purged from step 1 on."""
    from fastratio.train import train

    cfg = config.load(ROOT / "configs" / "toy2d.yaml", [*SMALL, f"run.out_dir={tmp_path}", "run.steps=6", "run.plot_every=0"])
    train(cfg)
    for path in checkpoint.list_checkpoints(tmp_path):
        path.unlink()
    train(config.load(ROOT / "configs" / "toy2d.yaml", [*SMALL, f"run.out_dir={tmp_path}", "run.steps=4", "run.plot_every=0",
                                                         "run.seed=1"]), force=True)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    _assert_events_equal_metrics(tmp_path)


def test_without_the_package_it_is_one_line_naming_the_key_and_the_extra(tmp_path, monkeypatch, capsys):
    from fastratio.train import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if tensorboard were absent
    sets = [arg for kv in [*SMALL, f"run.out_dir={tmp_path / 'run'}"] for arg in ("--set", kv)]
    assert run_cli(main, ["configs/toy2d.yaml", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.tensorboard: ") and '".[tensorboard]"' in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "config.yaml").exists()  # stopped before the run folder changed


def test_a_symlinked_event_folder_is_refused_and_nothing_is_written_through_it(tmp_path):
    from fastratio.train import train

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").symlink_to(elsewhere)
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", [*SMALL, f"run.out_dir={tmp_path / 'run'}", "run.steps=2"])
    with pytest.raises(UserError, match="tensorboard is a symbolic link"):
        train(cfg)
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "run" / "config.yaml").exists()
