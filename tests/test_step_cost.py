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
    diffusers = step_cost.import_diffusers("bench")
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


def _autocast_calls(device: str) -> dict:
    """Calls a step makes, on bf16 inputs (normalisations, softmax, reductions, upsampling, losses, matmuls)."""
    F = torch.nn.functional
    x = torch.randn(2, 8, 8, 8, device=device, dtype=torch.bfloat16)
    w = torch.randn(8, device=device, dtype=torch.bfloat16)
    q = torch.randn(2, 2, 16, 8, device=device, dtype=torch.bfloat16)
    return {
        "group_norm": lambda: F.group_norm(x, 2, w, w), "layer_norm": lambda: F.layer_norm(x, (8,), w, w),
        "softmax": lambda: torch.softmax(x, -1), "log_softmax": lambda: torch.log_softmax(x, -1),
        "softmax, bf16 asked": lambda: torch.softmax(x, -1, dtype=torch.bfloat16), "sum": lambda: x.sum(),
        "sum dim": lambda: x.sum((1, 2)), "mean": lambda: x.mean(), "norm": lambda: x.norm(), "vector_norm": lambda: torch.linalg.vector_norm(x),
        "exp": lambda: x.exp(), "pow": lambda: x.pow(2), "rsqrt": lambda: x.rsqrt(), "log": lambda: x.abs().log(),
        "softplus": lambda: F.softplus(x), "logsigmoid": lambda: F.logsigmoid(x), "cumsum": lambda: x.cumsum(0),
        "silu": lambda: F.silu(x), "gelu": lambda: F.gelu(x), "cos": lambda: x.cos(),
        "nearest x2": lambda: F.interpolate(x, scale_factor=2), "bilinear x2": lambda: F.interpolate(x, scale_factor=2, mode="bilinear"),
        "avg_pool": lambda: F.avg_pool2d(x, 2), "mse_loss": lambda: F.mse_loss(x, x), "bce_logits": lambda: F.binary_cross_entropy_with_logits(x, x),
        "cdist": lambda: torch.cdist(x[0], x[0]), "logsumexp": lambda: x.logsumexp(-1),
        "conv2d": lambda: F.conv2d(x.float(), torch.randn(8, 8, 3, 3, device=device)), "linear": lambda: F.linear(x.float(), torch.randn(8, 8, device=device)),
        "matmul": lambda: x @ x, "bmm": lambda: torch.bmm(q[0], q[0].transpose(1, 2)), "sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
        "einsum": lambda: torch.einsum("bchw,bcHW->bhwHW", x, x),
    }


def test_the_cost_models_autocast_emulation_decides_as_cuda_autocast_does():
    """Issue 27 item 6: counted under CPU autocast, group_norm, upsampling, softmax and reductions ran in
    bf16, where CUDA runs them in fp32 (and its activations are larger). The emulation's result dtype,
    call by call, against CUDA autocast itself run on fake CUDA tensors (no GPU needed); and every op it
    lists has a CUDA autocast kernel, so the list invents nothing."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in step_cost._CUDA_FP32_OPS:
        op = step_cost._overload(name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "AutocastCUDA"), name
    with FakeTensorMode():
        enabled, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        torch.set_autocast_enabled("cuda", True)  # torch.autocast("cuda") switches itself off without a GPU
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        try:
            cuda = {k: f().dtype for k, f in _autocast_calls("cuda").items()}
        finally:
            torch.set_autocast_enabled("cuda", enabled)
            torch.set_autocast_dtype("cuda", dtype)
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        cpu = {k: f().dtype for k, f in _autocast_calls("cpu").items()}
        with step_cost._cuda_autocast_rules():
            emulated = {k: f().dtype for k, f in _autocast_calls("cpu").items()}
    assert emulated == cuda
    assert cpu != cuda and cuda["group_norm"] == cuda["nearest x2"] == cuda["softmax"] == torch.float32 != cuda["conv2d"]
