"""Run-time logging: metric accumulation off the hot path and JSONL lines.

The training step returns 0-dim device tensors; ``MetricAccumulator`` sums them on the device and
the loop converts them to floats only every ``log_every`` steps (one host sync per log line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .atomic import atomic_write, open_regular
from .errors import UserError, os_error


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
