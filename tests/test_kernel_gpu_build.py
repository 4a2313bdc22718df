"""Every Triton kernel compiled for H100 (sm_90) and A100 (sm_80) by Triton's own compiler and the
wheel's ptxas, on this GPU-less machine: no spills, registers within the full-occupancy budget,
128-bit loads for aligned fp32, NaN-propagating clamps, 64-bit row offsets (fastratio.kernels.gpu_build).
The default run compiles a subset of the variants; ``-m slow`` all of them. The compiles run in a
child process without TRITON_INTERPRET (the interpreter replaces the jit functions)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)


def _report(tmp_path, subset):
    out = tmp_path / "report.json"
    proc = _run(["bench/kernel_speed.py", "--compile-report", "--subset", subset, "--arch", "sm_90", "sm_80", "--out", str(out)], tmp_path)
    assert out.is_file(), proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def _check(proc, report, expected):
    rows = report["rows"]
    assert len(rows) == expected
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    bad = [(r["variant"], r["arch"], r["problems"]) for r in rows if r["problems"]]
    assert not bad and proc.returncode == 0, bad
    assert all(r["registers"] <= 32 and r["spill_stores"] == r["spill_loads"] == 0 for r in rows)
    assert all(r["ld_global_v4"] > 0 for r in rows if r["aligned"] and r["dtype"] == "fp32")


def test_default_variants_compile_for_h100_and_a100(tmp_path):
    from fastratio.kernels.gpu_build import variants

    proc, report = _report(tmp_path, "default")
    _check(proc, report, 2 * len(variants(full=False)))


@pytest.mark.slow
def test_every_variant_compiles_for_h100_and_a100(tmp_path):
    from fastratio.kernels.gpu_build import variants

    proc, report = _report(tmp_path, "full")
    _check(proc, report, 2 * len(variants(full=True)))


def test_the_checks_can_fail(tmp_path):
    """Kernels made to break one target each are flagged: a spilling one, a NaN-dropping clamp,
    a 32-bit row index."""
    proc = _run([str(ROOT / "tests" / "gpu_build_probe.py")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(p.startswith("spills") for p in found["spills"])
    assert any("NaN-dropping" in p for p in found["drops_nan"])
    assert any("32-bit row index" in p for p in found["row_index_32bit"])
