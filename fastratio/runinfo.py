"""What a measurement ran on (device, versions and commit, recorded beside every benchmark row), and
how its results file is written."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fastratio.atomic import atomic_write


def git_commit() -> str:
    """Short hash of HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "torch": torch.__version__, "python": sys.version.split()[0], "commit": git_commit()}


def write_result(path: Path, data) -> None:
    """A benchmark's results file as indented JSON, written whole or not at all (a killed benchmark
    leaves the previous file, never half of a new one)."""
    text = json.dumps(data, indent=1) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda f: f.write(text.encode()))
