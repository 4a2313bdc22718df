"""bench/step_cost.py: the trainer's own step counted under fake tensors agrees with a real CPU run
(FLOPs exactly), and at the tiny size the counts have the structure the README relies on."""

import sys
from pathlib import Path

import torch

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


def test_text_to_image_counts_through_build_networks_at_a_tiny_sd_size():
    """--size sd15's path (fastratio.tasks.text2image.build_networks on SD-layout parts under fake tensors)
    at a tiny UNet config: the ratio net is the UNet's encoder half plus its head, VSD's step outweighs
    DiffRatio's, and the memory the task holds outside the networks is counted."""
    diffusers = step_cost._import_diffusers()
    size = step_cost.SD_SIZES["sd-tiny"]
    dijs = step_cost.count_step("sd-tiny", "diffratio", "dijs", None, "bf16", False, aux_updates=1)
    vsd = step_cost.count_step("sd-tiny", "vsd", None, None, "bf16", False, aux_updates=1)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**size["unet"])
    encoder = sum(p.numel() for name in ("conv_in", "time_embedding", "down_blocks", "mid_block") for p in getattr(unet, name).parameters())
    channels = size["unet"]["block_out_channels"][-1]
    assert dijs["parameters"]["ratio"] == encoder + 2 * channels + channels + 1  # + GroupNorm and Linear head
    assert dijs["parameters"]["generator"] == vsd["parameters"]["fake_score"] == sum(p.numel() for p in unet.parameters())
    assert vsd["flops"] > dijs["flops"] > 0 and vsd["peak_bytes"] > dijs["peak_bytes"]
    assert {"ratio update", "generator update"} <= set(dijs["phases"]) and "fake-score update" in vsd["phases"]
    assert set(dijs["resident_parameters"]) == {"teacher_unet", "vae", "text_encoder"}
    split = vsd["peak_split"]
    assert sum(split.values()) == vsd["peak_bytes"] and split["optimizer_state"] > 0
    assert vsd["cfg_scale"] == 1.75 and dijs["cfg_scale"] == 1.0  # configs/sd15_*.yaml
    assert dijs["text_shape"] == [77, size["text"]["hidden_size"]] and dijs["fits_h100_80gb"]
