"""Run-time logging: metric accumulation off the hot path, JSONL lines, the status line, TensorBoard.

The training step returns 0-dim device tensors; ``MetricAccumulator`` sums them on the device and
the loop converts them to floats only every ``log_every`` steps (one host sync per log line). On those
steps the loop also reads the clocks and memory peaks (``Progress``), writes the record to
metrics.jsonl (``JsonlLog``), prints EDM's status line to stdout and ``<run>/log.txt`` (``Console``)
and, with ``run.tensorboard``, writes the record to event files (``TensorBoard``). docs/logging.md
lists the fields.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import atomic_write, open_regular
from .errors import UserError, os_error

# Fields of a metrics.jsonl record that measure the machine, not the training: two runs of one config
# (or a run and its resumed copy) differ in them, so comparisons of runs leave them out.
TIMING_KEYS = ("images_per_s", "sec_per_kimg", "time_s", "maintenance_s", "maintenance_share", "cpumem_gb",
               "gpumem_gb", "reserved_gb", "eta_s")


class MetricAccumulator:
    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            if key in self._sums:
                self._sums[key] += value
            else:
                self._sums[key] = value.clone()
        self._count += 1

    def pop_means(self) -> dict[str, float]:
        """Means since the last call, as floats (syncs once), and reset."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        values = (torch.stack([self._sums[k] for k in keys]) / self._count).tolist()
        self._sums, self._count = {}, 0
        return dict(zip(keys, values))


class JsonlLog:
    """Appends one JSON object per line. At start the file is rewritten atomically with what it keeps
    (on resume, the lines up to the resumed step; a partial last line from a crash mid-append is
    dropped), which also replaces a symlink at its name; appends never follow a symlink."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.is_file() and not self.path.is_symlink():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        atomic_write(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record), "run.out_dir", create=False)


def append_line(path: Path, line: str, culprit: str, create: bool = True) -> None:
    """Append ``line`` and a newline to ``path`` in place, never through a symlink, into a FIFO or
    device, or into a file hard-linked from elsewhere (``atomic.open_regular``); any failure is one
    line naming ``culprit`` (the config key or flag that chose the file) and the file."""
    try:
        fd = open_regular(Path(path), os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0))
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
    except OSError as err:
        raise os_error(f"{culprit}: cannot append to {path}", err) from None


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a partial last line (a crash mid-append) is ignored, any other
    line that is not a JSON object is a one-line error naming it."""
    lines = Path(path).read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise UserError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def plot_losses(rows: list[dict], path: Path) -> Path:
    """One panel per logged ``*_loss`` metric against step (log scale where all values are positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for r in rows for k in r if k.endswith("_loss")})
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(4 * max(len(keys), 1), 3), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1)
        if all(p[1] > 0 for p in points):
            ax.set_yscale("log")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


# -- status line ---------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """EDM's ``dnnlib.util.format_time``: 42s, 3m 07s, 2h 03m 07s, 1d 02h 03m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s // 60 % 60:02d}m {s % 60:02d}s"
    return f"{s // 86400}d {s // 3600 % 24:02d}h {s // 60 % 60:02d}m"


def peak_host_memory_gb() -> float:
    """Peak resident memory of this process so far (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


class Progress:
    """Time, speed and memory for the status line, split as EDM's training loop splits wall time:
    training, and maintenance (checkpoints, evaluation, plots: the ``maintenance()`` blocks).

    ``fields`` is called on log steps only, after the loop has read the metrics back (its one host
    sync), so the clock covers the device work of the steps it counts; ``maintenance`` synchronises at
    its ends, on steps that read back to the host anyway (a checkpoint copies the weights, a plot the
    samples). ``earlier_s`` is the wall time of the sessions before a resume (the kept record's time_s)."""

    def __init__(self, step: int, total_steps: int, global_batch: int, device: torch.device, earlier_s: float = 0.0):
        self.total, self.batch, self.device = total_steps, global_batch, device
        valid = isinstance(earlier_s, int | float) and math.isfinite(earlier_s) and earlier_s >= 0  # read from metrics.jsonl
        self.earlier_s = float(earlier_s) if valid else 0.0
        self.started = self.last = time.perf_counter()
        self.last_step = step
        self.maintenance_since_last = self.maintenance_total = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def maintenance(self):
        self._sync()  # the steps queued before it are training time
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            spent = time.perf_counter() - start
            self.maintenance_since_last += spent
            self.maintenance_total += spent

    def fields(self, step: int) -> dict[str, float]:
        """The record's timing fields (``TIMING_KEYS``) since the previous call, and reset the interval
        (and the device's memory peaks)."""
        now = time.perf_counter()
        wall, maintenance = now - self.last, self.maintenance_since_last
        train_s = max(wall - maintenance, 1e-9)
        images = self.batch * max(step - self.last_step, 1)
        session = max(now - self.started, 1e-9)
        # Time left: the latest training speed, stretched by this session's share of maintenance.
        train_share = max(1.0 - self.maintenance_total / session, 1e-3)
        out = {
            "images_per_s": images / train_s,
            "sec_per_kimg": train_s / (images / 1000),
            "time_s": self.earlier_s + session,
            "maintenance_s": maintenance,
            "maintenance_share": maintenance / max(wall, 1e-9),
            "cpumem_gb": peak_host_memory_gb(),
        }
        if self.device.type == "cuda":  # peaks since the previous line, as EDM's gpumem and reserved
            out["gpumem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
        out["eta_s"] = (self.total - step) * train_s / images * self.batch / train_share
        self.last, self.last_step, self.maintenance_since_last = now, step, 0.0
        return out

    def line(self, record: dict) -> str:
        return status_line(record, self.total)


def status_line(record: dict, total_steps: int) -> str:
    """EDM's status line (``training/training_loop.py``) for one record, with the step and the time left:
    ``step 1200/400000  kimg 614.4  time 1h 02m 03s  sec/kimg 5.12  img/s 195.3  maintenance 1.2s 0.8%
    cpumem 3.21  gpumem 10.52  reserved 11.00  eta 2d 03h 04m`` (memory in GiB; no GPU fields on a CPU)."""
    r = record
    steps = f"{r['step']}/{total_steps}"
    maintenance = f"{r['maintenance_s']:.1f}s {100 * r['maintenance_share']:.1f}%"
    parts = [
        f"step {steps:<14s}", f"kimg {r['kimg']:<9.1f}", f"time {format_duration(r['time_s']):<12s}",
        f"sec/kimg {r['sec_per_kimg']:<8.3g}", f"img/s {r['images_per_s']:<8.1f}", f"maintenance {maintenance:<12s}",
        f"cpumem {r['cpumem_gb']:<6.2f}",
    ]
    if "gpumem_gb" in r:
        parts += [f"gpumem {r['gpumem_gb']:<6.2f}", f"reserved {r['reserved_gb']:<6.2f}"]
    parts.append(f"eta {format_duration(r['eta_s'])}")
    return " ".join(parts)


class Console:
    """Lines for the person running the job (the status line, resumes, stops): stdout, through
    ``tqdm.write`` while the progress bar shows so the bar is redrawn below the line instead of
    garbling it, and appended to ``<run>/log.txt`` (never through a link: ``append_line``)."""

    def __init__(self, path: Path, progress_bar: bool):
        self.path, self.progress_bar = Path(path), progress_bar

    def write(self, line: str) -> None:
        if self.progress_bar:
            tqdm.write(line)
        else:
            print(line, flush=True)
        append_line(self.path, line, "run.out_dir")


# -- TensorBoard ---------------------------------------------------------------------------------
def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; without the tensorboard package, one line naming
    ``run.tensorboard`` and the extra that installs it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception as err:  # noqa: BLE001 - missing package, or one torch cannot use (protobuf)
        reason = (str(err).splitlines() or [type(err).__name__])[0][:100]
        raise UserError(f'run.tensorboard: needs the tensorboard package: pip install -e ".[tensorboard]" ({reason})') from None
    return SummaryWriter


_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


class TensorBoard:
    """``run.tensorboard``: every field of each metrics.jsonl record as a scalar (tag = the field's
    name) and every sample grid as an image (tag ``samples``), in event files under
    ``<run>/tensorboard/``; main rank only; flushed after each write, as metrics.jsonl is appended.

    Resuming: event files are append-only, and a killed run may have logged steps past its checkpoint
    that the resumed run logs again (metrics.jsonl is cut back to the checkpoint's step instead,
    ``JsonlLog``). Each session therefore writes a new event file that opens with TensorBoard's
    ``purge_step`` at the first step it will log: readers (TensorBoard, ``EventAccumulator``) drop the
    earlier files' events from that step on, so each step is shown once, with the resumed run's
    values. Nothing is deleted or rewritten, and a TensorBoard already watching the folder follows.
    Readers take the files in name order (the name starts with the creation second), so the new file
    is created in a later second than every file already there."""

    @staticmethod
    def require(run_dir: Path) -> Path:
        """The event folder; one line now (before a run changes its folder) if the package is missing or
        the folder is a link."""
        summary_writer_class()
        folder = Path(run_dir) / "tensorboard"
        if folder.is_symlink():
            raise UserError(f"run.out_dir: {folder} is a symbolic link; remove it (a run writes nothing through a link)")
        return folder

    def __init__(self, run_dir: Path, first_step: int):
        writer_cls = summary_writer_class()
        self.folder = self.require(run_dir)
        newest = max((int(m.group(1)) for p in (self.folder.iterdir() if self.folder.is_dir() else ())
                      if (m := _EVENT_FILE.match(p.name))), default=0)
        wait = newest + 1 - time.time()
        if 0 < wait <= 5:  # a resume in the second of the last file; a larger skew is a clock set back
            time.sleep(wait)
        try:
            self.writer = writer_cls(str(self.folder), purge_step=first_step)
        except OSError as err:
            raise os_error(f"run.tensorboard: cannot write {self.folder}", err) from None

    def __enter__(self) -> TensorBoard:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _writing(self):
        """Writes end with a flush; a failed write (the writer thread's, surfacing at the next call) is one line."""
        try:
            yield
            self.writer.flush()
        except OSError as err:
            raise os_error(f"run.tensorboard: cannot write {self.folder}", err) from None

    def scalars(self, record: dict) -> None:
        """Every numeric field of a metrics.jsonl record but ``step``, at its step."""
        step = record["step"]
        with self._writing():
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def image(self, step: int, png: Path, tag: str = "samples") -> None:
        """A PNG the run wrote (a sample grid), at ``step``."""
        import numpy as np
        from PIL import Image

        with Image.open(png) as img:
            pixels = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
        with self._writing():
            self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        with contextlib.suppress(OSError):  # closing after a failed write: the failure was reported
            self.writer.close()
