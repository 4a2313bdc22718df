"""bench/gpu_check.py --dry-run: the GPU lease's one command end to end on the CPU at tiny sizes, with
the optional extras made unimportable (the GPU machine has no torch-fidelity or diffusers): every part
writes its rows as JSON lines, the environment first, CUDA-only items skipped saying so."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "failed", "skipped", "timeout"}
# Loaded before anything else in the child (sitecustomize): the extras look absent, as find_spec reports a missing module.
BLOCK = '''
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch_fidelity", "diffusers", "transformers"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
'''


def _cost_row(method, scale):
    return {"method": method, "objective": "dijs" if method == "diffratio" else None, "checkpointing": False, "flops": 2e9 * scale,
            "peak_bytes": 1e8 * scale, "est_ms_eager_h100": 3.0 * scale, "est_ms_graph_h100": 1.0 * scale, "commit": "abc"}


def test_dry_run_writes_every_part_in_order(tmp_path):
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(BLOCK)
    cost = tmp_path / "cost.json"  # cost-model rows for the tiny size, so the estimates table is built
    cost.write_text(json.dumps([_cost_row("teacher", 1), _cost_row("diffratio", 1), {**_cost_row("diffratio", 9), "checkpointing": True},
                                _cost_row("vsd", 2)]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "block"), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    # A generous budget: on a busy CI machine the parts end early anyway; nothing here may time out.
    cmd = [sys.executable, "bench/gpu_check.py", "--out", str(tmp_path / "out"), "--dry-run", "--budget-s", "200", "--cost-model", str(cost)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all({"part", "item", "status", "t_s"} <= r.keys() and r["status"] in STATUSES for r in rows)
    assert [r["t_s"] for r in rows] == sorted(r["t_s"] for r in rows)
    assert list(dict.fromkeys(r["part"] for r in rows)) == ["environment", "correctness", "headline", "extra", "summary"]
    assert not [r for r in rows if r["status"] in ("failed", "timeout")], [r for r in rows if r["status"] in ("failed", "timeout")]

    env_row = rows[0]
    assert env_row["item"] == "environment" and env_row["status"] == "ok" and env_row["dry_run"] and env_row["commit"]
    assert env_row["matmul_tflop_s"] > 0 and env_row["copy_gb_s"] > 0 and env_row["nvml"].startswith("no NVML")
    assert env_row["module_import_failures"] == {} and env_row["missing"] == {}
    assert {"torch_fidelity", "diffusers", "transformers"} <= set(env_row["optional_absent"])
    assert env_row["whole_step_traceable"] in (True, False)  # torch 2.11: False (compile falls back to per network)

    by = {(r["part"], r["item"]): r for r in rows}
    tests = [r for r in rows if r["part"] == "correctness" and r["item"].startswith("tests/")]
    # Each GPU check reported, skipped here with the reason; the step-mode parity tests among them.
    assert len(tests) >= 100 and all(r["status"] == "skipped" and r["reason"] == "no CUDA" for r in tests)
    assert any("test_graph_mode_replays_the_eager_unet_step[diffratio-graph_eager-bf16]" in r["item"] for r in tests)
    assert {Path(r["item"].split("::")[0]).name for r in tests} == {
        "test_step_modes.py", "test_stream.py", "test_no_host_sync.py", "test_kernel_ratio_weighting.py",
        "test_kernel_noise_injection.py", "test_kernel_generator_surrogate.py"}
    assert "::test_graph_mode_replays_the_eager_unet_step[" in tests[0]["item"] and "-graph_eager-" in tests[0]["item"]  # cheap first
    assert by[("correctness", "summary")]["tests"] == len(tests) and by[("correctness", "summary")]["returncode"] == 0

    for size, names in [("cifar10", ("b_diffratio_eager", "d_vsd_eager")), ("imagenet64", ("b_diffratio_eager", "d_vsd_eager")),
                        ("img512-xs", ("b_diffratio_eager", "d_vsd_eager"))]:
        for name in names:
            r = by[("headline" if size == "cifar10" else "extra", f"{size}/{name}")]
            assert r["status"] == "ok" and r["ms_p20"] <= r["ms_median"] <= r["ms_p80"] and r["flops_per_step"] > 0 and r["mfu"] > 0
        graph = by[("headline" if size == "cifar10" else "extra", f"{size}/a2_diffratio_graph_eager")]
        assert graph["status"] == "skipped" and graph["reason"] == "no CUDA"
    for name in ("c_diffratio_compile", "e_vsd_compile"):  # a cold whole-step compile takes minutes on 2 cores: over the plan
        assert by[("headline", f"cifar10/{name}")]["status"] == "skipped" and by[("headline", f"cifar10/{name}")]["reason"].startswith("planned")
    assert set(by[("headline", "table")]["rows"]) == {"b_diffratio_eager", "d_vsd_eager"}

    table = {r["quantity"]: r for r in by[("headline", "estimates")]["table"]}
    measured = {r["item"].split("/")[1]: r for r in rows if r["item"].startswith("cifar10/") and r["status"] == "ok"}
    assert table["GFLOP/step DiffRatio"]["estimated"] == 2 and table["GFLOP/step VSD"]["estimated"] == 4
    assert table["GFLOP/step DiffRatio"]["measured"] == measured["b_diffratio_eager"]["flops_per_step"] / 1e9
    assert table["time ratio DiffRatio/VSD eager"]["estimated"] == 0.5
    assert table["time ratio DiffRatio/VSD eager"]["measured"] == measured["b_diffratio_eager"]["ms_median"] / measured["d_vsd_eager"]["ms_median"]
    assert table["graph ms DiffRatio"]["measured"] is None and table["graph ms DiffRatio"]["estimated"] == 1

    kernels = by[("extra", "kernels")]
    assert {r["op"] for r in kernels["rows"]} == {"noise_inject", "ratio_weighting", "generator_surrogate"}
    assert by[("summary", "summary")]["counts"]["ok"] >= 10
