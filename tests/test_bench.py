"""bench/step_time.py at its tiny CPU size: runs the real step in each mode and writes valid JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_tiny_emits_rows_for_every_configuration(tmp_path):
    out = tmp_path / "step_time.json"
    cmd = [sys.executable, "bench/step_time.py", "--size", "tiny", "--skip-compile", "--steps", "3", "--warmup", "1",
           "--out", str(out), "--profile", str(tmp_path / "trace.json")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "FASTRATIO_KERNELS": "torch"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["b_diffratio_eager", "d_vsd_eager"]
    for r in rows:
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"] and r["ms_median"] > 0
        assert r["images_per_s"] > 0 and r["peak_memory_mb"] > 0 and r["flops_per_step"] > 0
        assert 0 < r["mfu"] and r["commit"] and r["torch"] and r["device"]
        assert r["nvml"].startswith("no NVML")
    ratio, vsd = rows
    assert set(ratio["parameters"]) == {"generator", "ratio"} and set(vsd["parameters"]) == {"generator", "teacher", "fake_score"}
    assert vsd["time_vs_vsd_eager"] == 1.0 and ratio["time_vs_diffratio_eager"] == 1.0
    # The ratio net is the encoder half: smaller than the two score networks VSD carries.
    assert ratio["parameters"]["ratio"] < vsd["parameters"]["teacher"]
    assert (tmp_path / "trace.json").stat().st_size > 0


def test_data_throughput_measures_both_layouts_and_derives_workers_per_gpu(tmp_path):
    out = tmp_path / "data.json"
    cmd = [sys.executable, "bench/data_throughput.py", "--images", "200", "--latents", "100", "--workers", "0", "1",
           "--batch", "16", "--batches", "3", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["set"], r["workers"]) for r in rows] == [(s, w) for s in ("png 3x64x64", "npy 8x64x64 float32") for w in (0, 1)]
    assert all(r["images_per_s"] > 0 and r["members"] in (200, 100) for r in rows)
    per_worker = max(r["images_per_s_per_worker"] for r in rows if r["set"].startswith("png") and r["workers"])
    for need in result["needs"]:
        assert need["workers_per_gpu"] == -(-need["images_per_s_per_gpu"] // per_worker)
    assert result["environment"]["commit"] and result["peak_rss_mb"] > 0
