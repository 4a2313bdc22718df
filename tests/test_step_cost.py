"""bench/step_cost.py: the trainer's own step counted under fake tensors agrees with a real CPU run
(FLOPs exactly), and at the tiny size the counts have the structure the README relies on."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import step_cost


def test_fake_counts_agree_with_a_real_cpu_run():
    assert step_cost.cross_check("tiny", "fp32")


def test_diffratio_step_is_lighter_than_vsd_and_checkpointing_lowers_the_peak():
    dijs = step_cost.count_step("tiny", "diffratio", "dijs", None, "fp32", False)
    vsd = step_cost.count_step("tiny", "vsd", None, None, "fp32", False)
    ckpt = step_cost.count_step("tiny", "diffratio", "dijs", None, "fp32", True)
    assert dijs["flops"] < vsd["flops"] and dijs["peak_bytes"] < vsd["peak_bytes"]
    assert ckpt["peak_bytes"] < dijs["peak_bytes"] and ckpt["flops"] > dijs["flops"]  # recomputed blocks
    phases = dijs["phases"]
    assert {"ratio update", "generator update", "EMA", "data"} <= set(phases)
    assert dijs["parameters"]["ratio"] < dijs["parameters"]["generator"]
    split = dijs["peak_split"]
    assert sum(split.values()) == dijs["peak_bytes"] and split["optimizer_state"] > 0 and split["parameters"] > 0
