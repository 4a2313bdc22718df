"""The bench scripts at tiny sizes: each runs the real code and writes valid rows (step_time, data_throughput, toy_family,
vsd_direction_error)."""

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


def test_toy_family_rows_carry_the_final_evaluation_and_the_criterions_verdict(tmp_path):
    from fastratio import toy
    from fastratio.runlog import read_jsonl

    tiny = ["--set", "run.steps=40", "--set", "method.teacher_steps=20", "--set", "run.eval_every=20", "--set", "run.log_every=10",
            "--set", "model.score_hidden=16", "--set", "data.eval_samples=200"]
    out = tmp_path / "family.json"
    cmd = [sys.executable, "bench/toy_family.py", "--mixtures", "ring8", "--work", str(tmp_path / "runs"), "--out", str(out), *tiny]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    rows = json.loads(out.read_text())
    assert [(r["mixture"], r["method"], r["step"]) for r in rows] == [("ring8", "dijs", 40), ("ring8", "vsd", 40)]
    for r in rows:
        final = read_jsonl(tmp_path / "runs" / f"ring8_{r['method']}_seed0" / "metrics.jsonl")[-1]
        assert r["energy_distance_ratio"] == final["eval_energy_distance"] / final["eval_energy_distance_true"]
        assert r["failures"] == toy.criterion_failures(final) and r["modes"] == 8 and r["commit"]
        # Every evaluation (steps 20 and 40), the last one being the row's.
        assert [e["step"] for e in r["evaluations"]] == [20, 40]
        assert r["evaluations"][-1]["energy_distance_ratio"] == r["energy_distance_ratio"]
        assert r["evaluations"][-1]["modes_covered"] == r["modes_covered"]
    # 40 steps do not fit a mixture: the exit status says a cell failed.
    assert proc.returncode == (1 if any(r["failures"] for r in rows) else 0)
    # A run the divergence guard stops is a failed row naming why, not a crash of the benchmark.
    stopped = tmp_path / "stopped.json"
    cmd = [sys.executable, "bench/toy_family.py", "--mixtures", "ring8", "--methods", "dijs", "--work", str(tmp_path / "runs2"),
           "--out", str(stopped), *tiny, "--set", "run.explode_factor=1e-12"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (row,) = json.loads(stopped.read_text())
    assert "step" not in row and len(row["failures"]) == 1
    assert row["failures"][0].startswith("run stopped (exit 2): error: ") and "exploded" in row["failures"][0]


def test_vsd_direction_error_splits_the_error_between_teacher_and_fake_score(tmp_path):
    """With the exact teacher (model.exact_teacher) the teacher's term is zero and VSD's error is the
    fake score's; a DiJS run is refused in one line."""
    from fastratio import config
    from fastratio.train import train

    base = ["model.score_hidden=16", "method.teacher_steps=3", "optim.batch_size=16", "data.eval_samples=100",
            "run.progress=false", "run.plot_every=0", "run.kernels=torch", "run.steps=4", "run.eval_every=4", "run.ckpt_every=4"]
    run = train(config.load(None, [*base, "method.name=vsd", "model.exact_teacher=true", f"run.out_dir={tmp_path / 'vsd'}"]))
    out = tmp_path / "errors.json"
    cmd = [sys.executable, "bench/vsd_direction_error.py", str(run), "--samples", "2000", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(out.read_text())
    assert [r["sigma"] for r in rows] == [0.01, 0.02, 0.05, 0.1, 0.3, 1.0, 3.0]
    for r in rows:
        assert r["step"] == 4 and r["exact_teacher"] and r["commit"]
        assert r["teacher_error"] < 1e-5 and r["fake_error"] > 1e-3
        assert abs(r["vsd_error"] - r["fake_error"]) < 1e-5
    dijs = train(config.load(None, [*base, f"run.out_dir={tmp_path / 'dijs'}"]))
    proc = subprocess.run([sys.executable, "bench/vsd_direction_error.py", str(dijs)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "a toy VSD run" in proc.stderr
