"""The status line of each log step (EDM's, with the step and the time left): its fields and their
arithmetic on a fake clock, one line per log step on stdout and in <run>/log.txt with the progress bar
on or off, the same numbers in metrics.jsonl, the clock read on log steps only, the time carried
across a resume, and the GPU memory peaks reset between lines."""

import re
from pathlib import Path

import pytest
import torch
from testkit import on_gpu

from fastratio import config, runlog
from fastratio.runlog import TIMING_KEYS, Progress, read_jsonl, status_line
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
TOY = ["run.log_every=2", "run.eval_every=1000", "run.plot_every=0", "run.ckpt_every=3", "optim.batch_size=32", "model.gen_hidden=32",
       "model.ratio_hidden=32", "model.score_hidden=32", "method.teacher_steps=20", "run.kernels=torch", "run.device=cpu"]
LINE = re.compile(r"^step (\d+)/(\d+) +kimg [\d.]+ +time \S+( \d\d\w)* +sec/kimg [\d.e+-]+ +img/s [\d.]+ +maintenance [\d.]+s [\d.]+% +"
                  r"cpumem [\d.]+ +eta \S+( \d\d\w)*$")


def _cfg(out: Path, *extra: str):
    return config.load(ROOT / "configs" / "toy2d.yaml", [*TOY, f"run.out_dir={out}", *extra])


def test_the_line_has_edms_fields_with_the_step_and_the_time_left():
    record = {"step": 1200, "kimg": 614.4, "time_s": 3723.0, "sec_per_kimg": 5.12, "images_per_s": 195.3, "maintenance_s": 1.23,
              "maintenance_share": 0.0081, "cpumem_gb": 3.214, "eta_s": 183840.0, "ratio_loss": 0.5}
    line = status_line(record, 400000)
    assert LINE.match(line), line
    assert re.sub(" +", " ", line) == ("step 1200/400000 kimg 614.4 time 1h 02m 03s sec/kimg 5.12 img/s 195.3 maintenance 1.2s 0.8% "
                                       "cpumem 3.21 eta 2d 03h 04m")
    gpu = status_line({**record, "gpumem_gb": 10.5, "reserved_gb": 11.0}, 400000)
    assert re.sub(" +", " ", gpu).endswith("cpumem 3.21 gpumem 10.50 reserved 11.00 eta 2d 03h 04m")
    assert [runlog.format_duration(s) for s in (42, 187, 7387, 93784)] == ["42s", "3m 07s", "2h 03m 07s", "1d 02h 03m"]


def test_wall_time_is_split_into_training_and_maintenance(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: clock[0])
    progress = Progress(step=0, total_steps=100, global_batch=10, device=torch.device("cpu"), earlier_s=5.0)
    clock[0] = 106.0
    with progress.maintenance():  # a checkpoint, a plot or an evaluation
        clock[0] = 108.0
    clock[0] = 110.0
    first = progress.fields(10)  # 10 s of wall time, 2 s of it maintenance, 100 images
    assert first["images_per_s"] == pytest.approx(100 / 8) and first["sec_per_kimg"] == pytest.approx(80.0)
    assert first["time_s"] == pytest.approx(15.0)  # 5 s before the resume + 10 s
    assert first["maintenance_s"] == pytest.approx(2.0) and first["maintenance_share"] == pytest.approx(0.2)
    assert first["eta_s"] == pytest.approx(90 * 0.8 / 0.8)  # 90 steps at 0.8 s of training, stretched by 20% maintenance
    assert first["cpumem_gb"] > 0 and "gpumem_gb" not in first
    clock[0] = 114.0
    second = progress.fields(15)  # 4 s, no maintenance: the interval was reset
    assert second["maintenance_s"] == 0 and second["images_per_s"] == pytest.approx(50 / 4)
    assert second["eta_s"] == pytest.approx(85 * 0.8 / (1 - 2 / 14))  # the session's maintenance share so far
    assert set(first) == set(TIMING_KEYS) - {"gpumem_gb", "reserved_gb"}


@pytest.mark.parametrize("bar", [False, True])
def test_each_log_step_prints_one_line_to_stdout_and_log_txt(tmp_path, capsys, monkeypatch, bar):
    through_tqdm = []
    monkeypatch.setattr(runlog.tqdm, "write", lambda line, *a, **k: (through_tqdm.append(line), print(line)))
    fields = []
    original = Progress.fields
    monkeypatch.setattr(Progress, "fields", lambda self, step: (fields.append(step), original(self, step))[1])
    run = train(_cfg(tmp_path, "run.steps=6", f"run.progress={str(bar).lower()}"))
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("step ")]
    assert [LINE.match(line).group(1, 2) for line in lines] == [("2", "6"), ("4", "6"), ("6", "6")]
    assert (run / "log.txt").read_text().splitlines() == lines
    assert through_tqdm == (lines if bar else [])  # above the bar while it shows, plain prints without it
    assert fields == [2, 4, 6]  # clocks and memory read on log steps only
    rows = read_jsonl(run / "metrics.jsonl")
    assert all(set(TIMING_KEYS) - {"gpumem_gb", "reserved_gb"} <= set(r) for r in rows)
    assert rows[-1]["eta_s"] == 0 and rows[0]["time_s"] < rows[1]["time_s"] < rows[2]["time_s"]
    assert all(f"kimg {r['kimg']:.1f}" in re.sub(" +", " ", line) for r, line in zip(rows, lines, strict=True))


def test_a_resumed_run_continues_the_time_and_says_so_in_the_log(tmp_path, capsys):
    run = train(_cfg(tmp_path, "run.steps=6", "run.progress=false"))
    before = read_jsonl(run / "metrics.jsonl")[-1]["time_s"]
    train(_cfg(tmp_path, "run.steps=8", "run.progress=false"), resume="auto")
    log = (run / "log.txt").read_text().splitlines()
    assert log[3] == f"resumed from {run / 'ckpt-000000006.pt'} at step 6" and log[4].startswith("step 8/8 ")
    assert read_jsonl(run / "metrics.jsonl")[-1]["time_s"] > before
    assert capsys.readouterr().out.count("resumed from") == 1


@on_gpu
def test_gpu_memory_peaks_are_reset_between_lines():
    device = torch.device("cuda")
    progress = Progress(step=0, total_steps=10, global_batch=1, device=device)
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)  # 0.25 GiB
    del big
    first = progress.fields(1)
    assert first["gpumem_gb"] >= 0.25 and first["reserved_gb"] >= first["gpumem_gb"]
    small = torch.empty(2**20, dtype=torch.uint8, device=device)
    second = progress.fields(2)
    assert second["gpumem_gb"] < 0.25  # the peak since the previous line, not since the start
    assert "gpumem" in status_line({"step": 2, "kimg": 0.0, **second}, 10)
    del small
