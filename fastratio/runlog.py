"""Run-time logging: metric accumulation off the hot path and JSONL lines.

The training step returns 0-dim device tensors; ``MetricAccumulator`` sums them on the device and
the loop converts them to floats only every ``log_every`` steps (one host sync per log line).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
    """Appends one JSON object per line; on resume, drops lines past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


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
    fig.savefig(path)
    plt.close(fig)
    return path
