"""The run folder loses nothing and writes nowhere else: one run at a time (a POSIX lock), validation before
any write, atomic writes that replace symlinks, pruning and resumes that never delete newer work,
corrupt checkpoints found by CRC, stale temp files cleaned, a partial metrics line tolerated."""

import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fastratio import checkpoint, config
from fastratio.errors import UserError, run_cli
from fastratio.runfolder import RunFolder
from fastratio.runlog import JsonlLog, read_jsonl
from fastratio.train import main as train_main
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "run.progress=false", "run.log_every=1", "run.eval_every=1000", "run.plot_every=0", "run.ckpt_every=2",
    "optim.batch_size=16", "model.gen_hidden=16", "model.ratio_hidden=16", "model.score_hidden=16", "method.teacher_steps=2",
    "run.kernels=torch", "run.device=cpu",
]


def _cfg(run, *extra, steps=4):
    return config.load(None, [*SMALL, f"run.out_dir={run}", f"run.steps={steps}", *extra])


def test_pruning_never_deletes_the_checkpoint_just_written_nor_newer_ones(tmp_path):
    for step in (10, 20, 30, 40):
        checkpoint.save({"step": step}, checkpoint.checkpoint_path(tmp_path, step))
    checkpoint.save({"step": 5}, checkpoint.checkpoint_path(tmp_path, 5), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [f"ckpt-{s:09d}.pt" for s in (5, 10, 20, 30, 40)]
    checkpoint.save({"step": 50}, checkpoint.checkpoint_path(tmp_path, 50), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [f"ckpt-{s:09d}.pt" for s in (40, 50)]


def test_resuming_an_older_checkpoint_needs_force_and_keeps_the_newer_ones(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "run.keep_ckpts=2", steps=6))
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["ckpt-000000004.pt", "ckpt-000000006.pt"]
    older = checkpoint.checkpoint_path(run, 4)
    with pytest.raises(UserError, match="holds 1 newer checkpoint.*--force"):
        train(_cfg(run, "run.keep_ckpts=2", steps=8), resume=str(older))
    assert checkpoint.checkpoint_path(run, 6).is_file()  # untouched by the refused resume
    train(_cfg(run, "run.keep_ckpts=2", steps=8), resume=str(older), force=True)
    aside = next(run.glob("superseded-*"))
    assert (aside / "ckpt-000000006.pt").is_file() and max(r["step"] for r in read_jsonl(aside / "metrics.jsonl")) == 6
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 9))


def test_resume_auto_with_only_unreadable_checkpoints_stops_and_keeps_the_metrics(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run))
    before = (run / "metrics.jsonl").read_bytes()
    for path in checkpoint.list_checkpoints(run):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="none of the 2 checkpoints .* is readable"):
        train(_cfg(run, steps=6), resume="auto")
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_rejected_resume_changes_no_file(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="does not match this config|holds networks"):
        train(_cfg(run, "model.score_hidden=24", steps=6), resume="auto")  # another architecture
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}


def test_a_new_run_never_erases_metrics_without_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "ratio_loss": 0.5}) + "\n")
    with pytest.raises(UserError, match="holds metrics.jsonl of an earlier run but no checkpoint"):
        train(_cfg(run))
    assert read_jsonl(run / "metrics.jsonl") == [{"step": 1, "ratio_loss": 0.5}]
    train(_cfg(run), force=True)
    assert read_jsonl(next(run.glob("superseded-*")) / "metrics.jsonl") == [{"step": 1, "ratio_loss": 0.5}]


def test_a_resume_must_match_the_checkpoints_method(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "method.name=diffratio"))
    with pytest.raises(UserError, match="written by method.name=diffratio; this config has method.name=vsd"):
        train(_cfg(run, "method.name=vsd", steps=6), resume="auto")


def test_symlinks_in_the_run_folder_are_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "losses.png", "samples-000000004.png"):
        (run / name).symlink_to(victim)
    train(_cfg(run, "run.plot_every=4"))
    assert victim.read_text() == "precious"
    assert not (run / "config.yaml").is_symlink() and (run / "losses.png").stat().st_size > 0


def test_metrics_symlink_is_never_appended_through(tmp_path):
    victim = tmp_path / "victim.jsonl"
    victim.write_text("")
    run = tmp_path / "run"
    train(_cfg(run))
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    train(_cfg(run, steps=6), resume="auto")
    assert victim.read_text() == "" and not (run / "metrics.jsonl").is_symlink()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    sets = [a for kv in [*SMALL, f"run.out_dir={run}", "run.steps=100000", "run.ckpt_every=1000"] for a in ("--set", kv)]
    first = subprocess.Popen([sys.executable, "-m", "fastratio.train", *sets], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "fastratio.train", *sets], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert second.returncode == 2
        assert f"is in use by pid {first.pid}" in second.stderr and second.stderr.count("\n") == 1
    finally:
        first.kill()
        first.wait()
    with RunFolder(run):  # the kernel released the dead holder's lock
        pass


def _largest_tensor_record(path: Path) -> int:
    """Offset of the first data byte of the checkpoint's largest tensor record (torch's zip format)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: name and extra-field lengths at bytes 26-29
    assert local[:4] == b"PK\x03\x04" and info.file_size > 200
    return info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


def test_a_flipped_bit_is_found_and_resume_falls_back(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run))
    newest = checkpoint.checkpoint_path(run, 4)
    raw = bytearray(newest.read_bytes())
    raw[_largest_tensor_record(newest) + 100] ^= 0x10  # inside a tensor's bytes, not the archive's padding
    newest.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CorruptCheckpoint):
        checkpoint.load(newest)
    with pytest.warns(UserWarning, match="unreadable checkpoint skipped"):
        train(_cfg(run, steps=6), resume="auto")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_stale_temp_files_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / "ckpt-000000020.pt.ab12cd_9.tmp", run / "config.yaml.zz99yy00.tmp"]
    for path in stale:
        path.write_bytes(b"x" * 1000)
    keep = run / "notes.tmp"
    keep.write_text("mine")
    train(_cfg(run))
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_a_partial_last_metrics_line_is_tolerated_and_dropped(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "ratio_lo')  # a crash mid-append
    train(_cfg(run, steps=6), resume="auto")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    import errno

    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o500)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # root ignores the mode bits; the kernel's answer to others
        if str(path).startswith(str(run)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    try:
        with pytest.raises(UserError, match="run.out_dir: cannot use .*run: Permission denied"):
            train(_cfg(run))
    finally:
        run.chmod(0o700)


def test_out_dir_that_is_a_file_or_below_one_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        train(_cfg(tmp_path / "file"))
    with pytest.raises(UserError, match="cannot use"):
        train(_cfg(tmp_path / "file" / "run"))


def test_a_full_disk_at_checkpoint_time_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="cannot write checkpoint .*ckpt-000000004.pt: No space left on device \\(disk full\\)"):
        train(_cfg(run))
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["ckpt-000000002.pt"]
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize("space_left, shown", [(1, r"write failed \(\[enforce fail at inline_container.cc:672\] . unexpected pos 704 vs 598\)"),
                                               (0, r"No space left on device \(disk full\)")])
def test_torch_saves_runtime_error_on_a_full_disk_is_one_line_status_2_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, capsys, space_left, shown):
    # torch's zip writer reports a short write as RuntimeError, not OSError: it escaped the one-line handler.
    run = tmp_path / "run"
    real_save, real_statvfs = torch.save, os.fstatvfs
    calls = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: type("Stat", (), {"f_bavail": space_left})() if calls["n"] >= 2 else real_statvfs(fd))
    argv = [a for kv in [*SMALL, f"run.out_dir={run}", "run.steps=4"] for a in ("--set", kv)]
    assert run_cli(train_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(f"error: run.out_dir: cannot write checkpoint .*ckpt-000000004.pt: {shown}", err[0]), err
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["ckpt-000000002.pt"] and not list(run.glob("*.tmp"))
    assert checkpoint.load(run / "ckpt-000000002.pt")["step"] == 2  # the earlier checkpoint is intact


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


@pytest.mark.parametrize("kind, shown", [("hard link", ".lock is a hard link shared with another file"),
                                         ("fifo", r".lock is not a regular file \(a FIFO or device\?\)"),
                                         ("symlink", ".lock is a symbolic link")])
def test_a_lock_file_that_is_a_link_or_a_fifo_is_refused_in_one_line_and_nothing_is_written(tmp_path, kind, shown):
    # A hard-linked .lock had its other file truncated and overwritten with the lock text; a FIFO was a traceback.
    victim, run = _victim(tmp_path), tmp_path / "run"
    run.mkdir()
    {"hard link": lambda lock: os.link(victim, lock), "fifo": os.mkfifo, "symlink": lambda lock: lock.symlink_to(victim)}[kind](run / ".lock")
    with pytest.raises(UserError, match=f"run.out_dir: cannot use .*run: {shown}; remove it"), RunFolder(run):
        pass
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("kind", ["hard link", "fifo"])
def test_metrics_appends_never_reach_a_hard_linked_file_nor_block_on_a_fifo(tmp_path, kind):
    # The metrics file is replaced at start; one swapped in later (by another user of a shared folder) is refused.
    victim, metrics = _victim(tmp_path), tmp_path / "metrics.jsonl"
    log = JsonlLog(metrics)
    metrics.unlink()
    os.link(victim, metrics) if kind == "hard link" else os.mkfifo(metrics)
    with pytest.raises(UserError, match="run.out_dir: cannot append to .*metrics.jsonl: metrics.jsonl is (a hard link|not a regular file)"):
        log.write({"step": 1})
    assert victim.read_text() == "precious"


def test_a_forced_resume_that_fails_validation_moves_nothing(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, "run.keep_ckpts=3", steps=6))
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UserError, match="does not match this config"):
        train(_cfg(run, "model.score_hidden=24", steps=8), resume=str(checkpoint.checkpoint_path(run, 2)), force=True)
    assert sorted(p.name for p in run.iterdir()) == before and not list(run.glob("superseded-*"))
