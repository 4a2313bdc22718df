"""What one training step costs, counted without computing it: FLOPs, memory traffic, peak memory,
kernel launches, per phase and role, for every method, and a roofline time estimate for an H100.

    python bench/step_cost.py [--size tiny|cifar10|imagenet64|...] [--batch B ...] [--precision fp32|bf16] [--checkpointing]
    python bench/step_cost.py --size sd15 [--checkpointing]    # SD1.5 text-to-image, batch 8 16 32 (docs/text2image.md)
    python bench/step_cost.py --size cifar10 --batch 64 --batch-gpu 16 32   # the peak per micro-batch size (docs/batch.md)

The trainer's own code runs (fastratio.tasks.image builds the networks, TrainStep/StepRunner run
the iteration: data sampling, every update, backward and Adam step, the EMA updates) under torch's
FakeTensorMode, so no tensor holds data and a CIFAR-10-size step takes seconds on a CPU. The teacher
is built from its kwargs instead of being read from a file (loading is not part of a step). Two
iterations run; the second, with the optimizer state in place, is the one reported. Counted by a
dispatch mode around every aten op:
  FLOPs       torch.utils.flop_counter's formulas (matmul, convolution, attention, their backwards;
              the CPU flash-attention kernel that fake and CPU tensors dispatch to gets the CUDA
              kernels' formula, which flop_counter lacks)
  bytes       inputs + outputs of every non-view op: an upper bound on eager memory traffic
              (compiled steps fuse elementwise chains and move less)
  peak        live tensor storages (weakrefs on every op output and on the state alive before the
              step, so that what the step frees, such as a network's previous gradients, leaves the
              count), split at the peak into parameters (live and EMA), gradients, optimizer state and
              the rest (activations, temporaries)
  launches    non-view ops: one kernel each in eager mode (a few ops launch several, some none)
Roofline estimate on an H100 SXM (stated assumptions, not a measurement): each op takes
max(FLOPs / peak, bytes / bandwidth), peak 989 TFLOP/s for bf16 tensor-core ops, 495 TFLOP/s for
fp32 convolutions (TF32, torch's default for convolutions), 67 TFLOP/s for other fp32 math, HBM
3.35 TB/s; eager adds 6 us of launch and dispatch overhead per kernel, a CUDA graph 1.5 us.
Prints ratios against VSD and writes JSON rows (device-independent: versions, commit, config).
``--check`` cross-checks the counts against a real CPU run at the tiny size (``--size sd-tiny``: the
text-to-image path).

``--size sd15``: fastratio.tasks.text2image.build_networks on Stable Diffusion v1.5-size parts built from
their configs (SD15_UNET etc. below; no download, no weights), 512x512 images as 4x64x64 latents, CLIP
text embeddings [B, 77, 768] in the label slots, each method as configs/sd15_<method>.yaml sets it (its
auxiliary updates per generator update, noise law, weighting, Adam, clipping, EMA, shared encoder) at
the given per-GPU batch on one process. Counted: the step (every UNet forward, backward and Adam step,
the EMAs). Not counted, stated in the rows: the VAE (latents precomputed) and the frozen text encoder
(run in the task's advance(), before the step; its FLOPs per prompt are a field of each row); both are
in memory, as the task holds them on the device. As on a GPU: Adam's foreach implementation, and CUDA
autocast's fp32 rule for GroupNorm/LayerNorm (CPU autocast would run them in bf16 and hold smaller
activations). Each row says whether the peak fits an H100 80GB, alone and with DDP's gradient buckets.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
import weakref
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SIZES, _config

from fastratio.draws import Draws
from fastratio.hf import import_diffusers
from fastratio.networks.denoisers import build_denoiser
from fastratio.runinfo import environment, write_result
from fastratio.runner import StepRunner
from fastratio.shard import SINGLE
from fastratio.step import TeacherStep, TrainStep
from fastratio.tasks import build_task
from fastratio.tasks import image as image_task
from fastratio.tasks.image import network_kwargs
from fastratio.train import build_averages, build_optimizers

H100 = {"bf16_tflops": 989.4, "tf32_conv_tflops": 494.7, "fp32_tflops": 66.9, "hbm_tb_s": 3.35, "eager_launch_us": 6.0, "graph_launch_us": 1.5}
METHODS = [("teacher", None), ("diffratio", "dijs"), ("diffratio", "dikl"), ("diffratio", "dirm"), ("diffratio", "sba"),
           ("dibregman", "sba"), ("vsd", None)]
_CONV = {torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default}
# F.scaled_dot_product_attention on a CPU (fake or real) tensor dispatches to the CPU flash kernel,
# which torch.utils.flop_counter has no formula for (it counts the CUDA flash/efficient/cudnn ops):
# without these its attention FLOPs were counted as 0. The same formulas as the CUDA kernels'.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default:
        lambda q, k, v, *args, **kwargs: sdpa_flop_count(tuple(q.shape), tuple(k.shape), tuple(v.shape)),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        lambda g, q, k, v, *args, **kwargs: sdpa_backward_flop_count(tuple(g.shape), tuple(q.shape), tuple(k.shape), tuple(v.shape)),
}
_IGNORED = {torch.ops.aten.detach.default, torch.ops.prim.device.default} if hasattr(torch.ops, "prim") else {torch.ops.aten.detach.default}


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class StepCost(TorchDispatchMode):
    """Counts every op dispatched while active (see module doc)."""

    def __init__(self, state_tensors):
        super().__init__()
        self.phase, self.roles = "step", []
        self.counts = defaultdict(lambda: {"flops": 0, "bytes": 0, "launches": 0, "seconds_eager": 0.0, "seconds_graph": 0.0})
        self.live: dict[int, list] = {}  # storage id -> [nbytes, live tensors]
        self.live_bytes = 0
        self.peak = (0, "none")
        self.state_tensors = state_tensors  # () -> (params, grads, optimizer state) lists at the peak
        self.peak_split = {}
        self.finalizers: list[weakref.finalize] = []

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.live_bytes += storage.nbytes()
        self.finalizers.append(weakref.finalize(t, self._release, key))

    def close(self) -> None:
        """Drop the weakref callbacks still pending (tensors alive after the count), so that none fires
        into this mode later (the next count's garbage collection, interpreter exit)."""
        for f in self.finalizers:
            f.detach()
        self.finalizers.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _IGNORED:
            return out
        role = self.roles[-1] if self.roles else "backward/optimizer/other"
        row = self.counts[(self.phase, role)]
        outputs = _tensors(out)
        if not func.is_view:
            nbytes = sum(t.untyped_storage().nbytes() if t.dim() == 0 else t.numel() * t.element_size() for t in _tensors((args, kwargs)) + outputs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                flops = formula(*args, **kwargs, out_val=out)
            else:
                flops = _CPU_ATTENTION[func](*args, **kwargs) if func in _CPU_ATTENTION else 0
            row["flops"] += flops
            row["bytes"] += nbytes
            row["launches"] += 1
            low = any(t.dtype in (torch.bfloat16, torch.float16) for t in _tensors(args))
            peak = H100["bf16_tflops"] if low else H100["tf32_conv_tflops"] if func in _CONV else H100["fp32_tflops"]
            busy = max(flops / (peak * 1e12), nbytes / (H100["hbm_tb_s"] * 1e12))
            row["seconds_eager"] += busy + H100["eager_launch_us"] * 1e-6
            row["seconds_graph"] += busy + H100["graph_launch_us"] * 1e-6
        for t in outputs:
            self._track(t)
        if self.live_bytes > self.peak[0] * 1.001:
            self.peak = (self.live_bytes, f"{self.phase}/{role}")
            self.peak_split = self.state_tensors()
        return out


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


@contextlib.contextmanager
def _phases(mode: StepCost, runner: StepRunner, nets):
    """Name the phase (which update) and role (which network's forward) of every op."""
    step, patched = runner.step_fn, []

    def wrap(obj, name, phase):
        original = getattr(obj, name)

        def wrapped(*a, **k):
            previous, mode.phase = mode.phase, phase
            try:
                return original(*a, **k)
            finally:
                mode.phase = previous

        setattr(obj, name, wrapped)
        patched.append((obj, name, original))

    for name, phase in (("ratio_update", "ratio update"), ("fake_score_update", "fake-score update"), ("shared_update", "fake-score + ratio update"),
                        ("generator_update", "generator update")):
        if hasattr(step, name):
            wrap(step, name, phase)
    if isinstance(step, TeacherStep):
        wrap(runner, "_step", "teacher update")
    wrap(runner, "_average", "EMA")
    wrap(runner, "_batch", "data")
    handles = []
    for role in ("generator", "ratio", "teacher", "fake_score"):
        net = getattr(nets, role)
        if net is not None:
            handles.append(net.register_forward_pre_hook(lambda *_, role=role: mode.roles.append(f"{role} forward") and None))
            handles.append(net.register_forward_hook(lambda *_: mode.roles.pop() and None))
    try:
        yield
    finally:
        for obj, name, original in patched:
            setattr(obj, name, original)
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _fake_foreach(fake: bool):
    """Let fake tensors take torch's foreach paths where real ones do (clip_grad_norm_'s _foreach_norm;
    it checks the tensors' exact type): otherwise a clipped step is counted with one norm and one
    scale per parameter tensor, a GPU (or a real CPU run) launching a handful."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils import _foreach_utils

    types = _foreach_utils._foreach_supported_types
    added = fake and FakeTensor not in types
    if added:
        types.append(FakeTensor)
    try:
        yield
    finally:
        if added:
            types.remove(FakeTensor)


def _measure(cfg, build, fake: bool = True, adam_foreach: bool = False) -> dict:
    """Build the run (``build() -> (task, nets, resident)``, under FakeTensorMode unless ``fake`` is
    False), run one iteration to create the optimizer state, count the second. ``resident``: modules
    the task holds on the device outside the networks (counted as parameters: they are in memory).
    ``adam_foreach``: Adam's multi-tensor implementation, which torch picks by default on CUDA (on a
    CPU it loops per tensor); its step allocates one temporary the size of the network's parameters."""
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), _fake_foreach(fake):
        torch.manual_seed(0)
        task, nets, resident = build()
        opts = build_optimizers(nets, cfg)
        if adam_foreach:
            for opt in opts.values():
                for group in opt.param_groups:
                    group["foreach"] = True
        ema, ratio_ema, averages = build_averages(nets, cfg)
        step_cls = TeacherStep if cfg.method.name == "teacher" else TrainStep
        step = step_cls(cfg, nets, opts, Draws(torch.Generator().manual_seed(0)), SINGLE, None)
        runner = StepRunner(cfg, task, nets, step, SINGLE, torch.device("cpu"), averages, optimizers=opts)
        runner()  # creates the optimizer state
        modules = [getattr(nets, r) for r in ("generator", "ratio", "teacher", "fake_score") if getattr(nets, r) is not None]
        modules += [e.module for e in (ema, ratio_ema) if e is not None]
        modules += list(resident.values())
        resident_counts = {name: sum(p.numel() for p in m.parameters()) for name, m in resident.items()}
        params = [p for m in modules for p in (*m.parameters(), *m.buffers())]
        trained = [p for m in modules for p in m.parameters() if p.requires_grad]

        def state_tensors():
            return {"parameters": _bytes(params), "gradients": _bytes([p.grad for p in trained if p.grad is not None]),
                    "optimizer_state": _bytes([t for o in opts.values() for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)])}

        # The state alive before the measured step (weights, gradients left by the last step, Adam's
        # state) is tracked like the step's own allocations, so that what the step frees (a network's
        # old gradients, set to None before its backward) leaves the live count when it is freed.
        before = state_tensors()
        mode = StepCost(state_tensors)
        for t in (*params, *(p.grad for p in trained if p.grad is not None),
                  *(t for o in opts.values() for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor))):
            mode._track(t)
        mode.peak = (mode.live_bytes, "start")
        t0 = time.perf_counter()
        with _phases(mode, runner, nets), mode:
            runner()
        seconds = time.perf_counter() - t0
        mode.close()
    peak = mode.peak[0]
    split = dict(mode.peak_split) if mode.peak_split else dict(before)
    split["activations_and_temporaries"] = peak - sum(split.values())
    per = [{"phase": phase, "role": role, **v} for (phase, role), v in sorted(mode.counts.items())]
    total = {k: sum(r[k] for r in per) for k in ("flops", "bytes", "launches", "seconds_eager", "seconds_graph")}
    phase_totals = defaultdict(lambda: defaultdict(float))
    for r in per:
        for k in ("flops", "bytes", "launches"):
            phase_totals[r["phase"]][k] += r[k]
    params_per_role = {r: sum(p.numel() for p in getattr(nets, r).parameters()) for r in ("generator", "ratio", "teacher", "fake_score") if getattr(nets, r) is not None}
    return {
        "flops": total["flops"], "bytes": total["bytes"], "launches": total["launches"],
        "peak_bytes": peak, "peak_at": mode.peak[1], "peak_split": split,
        "est_ms_eager_h100": total["seconds_eager"] * 1e3, "est_ms_graph_h100": total["seconds_graph"] * 1e3,
        "phases": {p: dict(v) for p, v in phase_totals.items()}, "per_phase_role": per, "parameters": params_per_role,
        **({"resident_parameters": resident_counts} if resident_counts else {}), "count_seconds": seconds,
    }


def count_step(size_name: str, method: str, objective: str | None, batch: int | None, precision: str, checkpointing: bool,
               fake: bool = True, variant: str | None = None, aux_updates: int | None = None, batch_gpu: int = 0) -> dict:
    """``batch_gpu`` (image sizes): optim.batch_gpu, every update of the step in micro-batches of that
    size (0: the whole per-GPU batch at once); the row's peak is then that of one micro-batch's work."""
    if size_name in SD_SIZES:
        if batch_gpu:
            raise ValueError("batch_gpu: for the image sizes (sd sizes: not yet)")
        if variant not in (None, "separate"):
            raise ValueError(f"variant {variant!r}: sd sizes know 'separate' (dibregman with its own ratio net)")
        return count_sd_step(size_name, method, objective, batch, precision, checkpointing, fake,
                             shared_encoder=False if variant == "separate" else None, aux_updates=aux_updates)
    if variant is not None or aux_updates is not None:
        raise ValueError("variant, aux_updates: for the sd sizes (the image sizes take step_time's config)")
    size = dict(SIZES[size_name])
    if batch:
        size["batch"] = batch
    c, h, w = size["shape"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        np.savez(root / "data.npz", images=np.random.default_rng(0).integers(0, 256, size=(16, c, h, w), dtype=np.uint8))
        teacher_cfg = _config(root, root / "data.npz", None, size, size["model"], "teacher", "eager", precision)
        kwargs = network_kwargs(teacher_cfg, (c, h, w), 0)

        def teacher_from_kwargs(path, device):
            net = build_denoiser(kwargs)
            net.init_kwargs = kwargs
            return net

        cfg = _config(root, root / "data.npz", root / "teacher.pt", size, {**size["model"], "checkpointing": checkpointing}, method, "eager", precision)
        if objective:
            cfg.method.objective = objective
        if batch_gpu and size["batch"] % batch_gpu:
            raise ValueError(f"batch_gpu: {batch_gpu} does not divide the batch {size['batch']}")
        cfg.optim.batch_gpu = batch_gpu

        def build():
            task = build_task(cfg, torch.device("cpu"))
            return task, task.build_networks(), {}

        original = image_task.load_teacher
        image_task.load_teacher = teacher_from_kwargs
        try:
            with _cuda_autocast_rules() if precision == "bf16" else contextlib.nullcontext():
                counted = _measure(cfg, build, fake)
        finally:
            image_task.load_teacher = original
    return {"size": size_name, "method": method, "objective": objective, "batch": size["batch"], "batch_gpu": batch_gpu or size["batch"],
            "precision": precision, "checkpointing": checkpointing, **counted}


# -- Stable Diffusion v1.5 text-to-image (fastratio.tasks.text2image) ------------------------------
# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json, every architectural field written out
# (most are diffusers' UNet2DConditionModel defaults; cross_attention_dim 768 and sample_size 64 are not):
# 859,520,964 parameters.
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8,
}
# vae/config.json (AutoencoderKL, 83,653,863 parameters): the task holds it on the device (decoding
# samples, encoding pixel pairs); with precomputed latents it is no part of the step.
SD15_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2, "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32,
}
# text_encoder/config.json: CLIP ViT-L/14's text model (123,060,480 parameters), frozen; it encodes the
# batch's captions and prompts in the task's host-side advance(), before the step: not in the step's counts.
SD15_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# scheduler/scheduler_config.json's betas, as fastratio.networks.sd.read_schedule turns them into alphas_cumprod.
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_SIZES = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT, "batches": [8, 16, 32]},
    # the same code path at a size that counts in seconds (tests)
    "sd-tiny": {"unet": {**SD15_UNET, "sample_size": 8, "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                         "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                         "cross_attention_dim": 32},
                "vae": {**SD15_VAE, "sample_size": 64, "layers_per_block": 1, "block_out_channels": [8, 8], "norm_num_groups": 4,
                        "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2},
                "text": {**SD15_TEXT, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "projection_dim": 32},
                "batches": [4]},
}
# configs/sd15_<method>.yaml; the last: Di-Bregman with a separate encoder-half ratio net (model.shared_encoder false)
SD_METHODS = [("diffratio", "dijs"), ("vsd", None), ("dibregman", "sba"), ("dibregman", "sba", "separate")]
# "Fits" on an H100 80GB: torch reports 79.11 GiB; 3 GiB of it is left for the CUDA context, cuBLAS and NCCL
# workspaces and the caching allocator's fragmentation (the count is of live tensors, not reserved blocks).
H100_MEMORY = {"capacity_gib": 79.11, "reserve_gib": 3.0}


def _text_encoder(size_name: str) -> torch.nn.Module:
    """The frozen CLIP text model, on the meta device (shapes only). Built or run under FakeTensorMode,
    transformers' CLIPTextModel corrupted the heap now and then (torch 2.14, transformers 5.25: a
    segfault a few counts later); on the meta device it does not."""
    import_diffusers("bench")  # the kernels shadowing workaround before transformers loads its models
    import transformers

    with torch.device("meta"):
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD_SIZES[size_name]["text"])).eval().requires_grad_(False)


class _TextStandIn:
    """What the networks read of fastratio.networks.sd.TextEncoder: the empty prompt's embedding [1, 77, D]
    (zeros: costs do not depend on values), and ``model``, one frozen tensor of the text encoder's size
    (fp32, on the device as load_sd puts it), so that its memory counts."""

    def __init__(self, parameters: int, text_shape: tuple):
        self.model = torch.nn.Module()
        self.model.weights = torch.nn.Parameter(torch.zeros(parameters), requires_grad=False)
        self.empty = torch.zeros((1, *text_shape))


def _in_place(cls: type) -> type:
    """build_networks moves a new ratio net with ``.to(device)``; a move to where it already is still swaps
    every parameter and buffer, which fails on fake tensors (fastratio.tasks.image._on skips it for that
    reason). The same skip here; any other move is ``Module.to``."""

    class InPlace(cls):
        def to(self, *args, **kwargs):
            device = torch._C._nn._parse_to(*args, **kwargs)[0]
            if len(args) == 1 and not kwargs and all(t.device == device for t in (*self.parameters(), *self.buffers())):
                return self
            return super().to(*args, **kwargs)

    InPlace.__name__ = InPlace.__qualname__ = cls.__name__
    return InPlace


# CUDA autocast's "fp32" and "fp32_set_opt_dtype" lists (aten/src/ATen/autocast_mode.cpp, KERNEL_CUDA):
# their floating inputs run in fp32 on a GPU, where CPU autocast runs most of them in the input's bf16.
# The overloads the trainer's steps dispatch to (an op whose every overload is listed is given as its
# name alone); tests/test_step_cost.py checks the emulation against real CUDA autocast on fake CUDA
# tensors, call by call. Matmuls, convolutions and attention are bf16 under both.
_CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh", "tan",
    "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm", "group_norm",
    "frobenius_norm.dim", "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss",
    "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
    "upsample_trilinear3d", "upsample_bicubic2d",
    # fp32_set_opt_dtype: fp32 unless the call names an output dtype
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm", "linalg_matrix_norm",
    "sum", "sum.dim_IntList", "norm.Scalar", "norm.ScalarOpt_dim",
)


def _overload(name: str):
    op, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, op), overload or "default")


@contextlib.contextmanager
def _cuda_autocast_rules():
    """CPU autocast with CUDA's fp32 rules (_CUDA_FP32_OPS): those ops' floating inputs cast to fp32 and
    fp32 out, as on the GPU (so, among others, GroupNorm-SiLU and upsampling keep fp32 activations for the
    backward, which CPU autocast would hold in bf16). Registered for the duration only."""
    guard = torch._C._ExcludeDispatchKeyGuard
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def fp32(op):
        def kernel(*args, **kwargs):
            def cast(t):
                return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t

            with guard(keys):
                return op(*tree_map(cast, args), **tree_map(cast, kwargs))

        return kernel

    lib = torch.library.Library("aten", "IMPL")
    try:
        for name in _CUDA_FP32_OPS:
            lib.impl(name, fp32(_overload(name)), "AutocastCPU")
        yield
    finally:
        lib._destroy()


def _latent_task(shape: tuple, batch: int, text_shape: tuple):
    """The text-to-image task as the step sees it: the device buffers ``advance`` fills (latents and text
    embeddings, zeros here: costs do not depend on values) read through TextToImageTask's own
    ``sample_real``/``sample_latent``. ``advance`` itself (reading shards, the VAE on pixel pairs, the
    text encoder) is host-side work before the step and is not counted."""
    from fastratio.tasks.text2image import TextToImageTask

    class LatentBuffers:
        sample_real = TextToImageTask.sample_real
        sample_latent = TextToImageTask.sample_latent

        def __init__(self):
            self.shape, self.device = shape, torch.device("cpu")
            self.x_real = torch.zeros((batch, *shape))
            self.text_real = torch.zeros((batch, *text_shape))
            self.text_fake = torch.zeros((batch, *text_shape))

        def advance(self):
            pass

    return LatentBuffers()


def _sd_schedule() -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas_cumprod, sigma grid), float64 [1000], from diffusers' DDPMScheduler as read_schedule builds it."""
    from fastratio.networks.sd import sigma_grid

    abar = import_diffusers("bench").DDPMScheduler(**SD15_SCHEDULE).alphas_cumprod.to(torch.float64)
    return abar, sigma_grid(abar)


def _sd_config(method: str, objective: str | None, batch: int, precision: str, checkpointing: bool, shared_encoder: bool | None,
               aux_updates: int | None):
    """configs/sd15_<method>.yaml (its noise law, weighting, auxiliary updates per generator update, Adam,
    clipping, EMA, shared encoder) at ``batch`` per GPU on one process, ``precision``, ``checkpointing``;
    ``aux_updates`` replaces its ratio and fake-score updates per generator update."""
    from fastratio import config

    path = Path(__file__).resolve().parents[1] / "configs" / f"sd15_{method}.yaml"
    overrides = [f"optim.batch_size={batch}", f"run.precision={precision}", f"model.checkpointing={str(checkpointing).lower()}",
                 "run.device=cpu"]
    if objective:
        overrides.append(f"method.objective={objective}")
    if shared_encoder is not None:
        overrides.append(f"model.shared_encoder={str(shared_encoder).lower()}")
    if aux_updates is not None:
        overrides += [f"method.ratio_steps={aux_updates}", f"method.fake_score_steps={aux_updates}"]
    return config.load(path, overrides), path


def count_sd_step(size_name: str, method: str, objective: str | None, batch: int | None, precision: str, checkpointing: bool,
                  fake: bool = True, shared_encoder: bool | None = None, aux_updates: int | None = None,
                  cuda_autocast: bool = True) -> dict:
    """One text-to-image step (fastratio.tasks.text2image.build_networks on SD1.5-size parts built from
    their configs: no download, no weights) counted as the image steps are. Adam runs its CUDA default
    (foreach). Adds what an H100 80GB holds: the fit of one GPU, and under DDP (every GPU holds every
    weight and Adam state, nothing is sharded) DDP's gradient buckets on top, one fp32 copy of each
    trained network's gradients (gradient_as_bucket_view is off)."""
    diffusers = import_diffusers("bench")
    from fastratio.networks.sd import SDParts
    from fastratio.tasks import text2image

    size = SD_SIZES[size_name]
    batch = batch or size["batches"][0]
    abar, grid = _sd_schedule()
    cfg, cfg_path = _sd_config(method, objective, batch, precision, checkpointing, shared_encoder, aux_updates)
    unet_cfg = size["unet"]
    shape = (unet_cfg["in_channels"], unet_cfg["sample_size"], unet_cfg["sample_size"])
    text_shape = (size["text"]["max_position_embeddings"], size["text"]["hidden_size"])
    # the grid step nearest model.sigma_init, as the task picks it (read here: under fake tensors it has no value)
    sigma_init = float(grid[int((grid.log() - math.log(cfg.model.sigma_init)).abs().argmin())])
    text_parameters = sum(p.numel() for p in _text_encoder(size_name).parameters())

    def build():
        unet = diffusers.UNet2DConditionModel(**unet_cfg)
        vae = diffusers.AutoencoderKL(**size["vae"]).requires_grad_(False).eval()
        text = _TextStandIn(text_parameters, text_shape)
        sd = SDParts(unet, vae, text, abar, "epsilon", Path(size_name))
        nets = text2image.build_networks(cfg, sd, sigma_init, torch.device("cpu"))
        # The task holds the teacher's UNet (diffratio reads no teacher, but the UNet stays loaded), VAE and text encoder.
        return _latent_task(shape, batch, text_shape), nets, {"teacher_unet": unet, "vae": vae, "text_encoder": text.model}

    originals = {name: getattr(text2image, name) for name in ("SDRatio", "SharedEncoderRatio")}
    for name, cls in originals.items():
        setattr(text2image, name, _in_place(cls))
    try:
        with _cuda_autocast_rules() if cuda_autocast else contextlib.nullcontext():
            counted = _measure(cfg, build, fake, adam_foreach=True)
    finally:
        for name, cls in originals.items():
            setattr(text2image, name, cls)
    trained = sum(counted["parameters"].get(r, 0) for r in ("generator", "ratio", "fake_score"))
    budget = (H100_MEMORY["capacity_gib"] - H100_MEMORY["reserve_gib"]) * 2**30
    ddp = 4 * trained  # fp32 gradient buckets
    return {"size": size_name, "method": method, "objective": objective, "batch": batch, "precision": precision,
            "checkpointing": checkpointing, "config": str(cfg_path.relative_to(cfg_path.parents[1])), "shared_encoder": cfg.model.shared_encoder,
            "aux_updates": max(cfg.method.ratio_steps if cfg.method.name != "vsd" else 0, cfg.method.fake_score_steps if cfg.method.name != "diffratio" else 0),
            "cfg_scale": cfg.method.cfg_scale, "latent_shape": list(shape), "text_shape": list(text_shape),
            **counted,
            "h100_budget_bytes": budget, "fits_h100_80gb": counted["peak_bytes"] <= budget,
            "ddp_bucket_bytes": ddp, "fits_h100_80gb_ddp": counted["peak_bytes"] + ddp <= budget}


def text_encoder_flops(size_name: str, prompts: int = 1) -> int:
    """FLOPs of the frozen text encoder's forward on ``prompts`` prompts of 77 tokens (outside the step;
    a step encodes its batch's captions, and as many prompts when data.prompts is given), counted on
    the meta device."""
    model = _text_encoder(size_name)
    mode = StepCost(dict)
    with torch.no_grad(), mode:
        model(torch.zeros((prompts, model.config.max_position_embeddings), dtype=torch.long, device="meta"), return_dict=False)
    mode.close()
    return sum(v["flops"] for v in mode.counts.values())


def cross_check(size: str, precision: str) -> bool:
    """The same counts from real tensors on the CPU. FLOPs must be equal; bytes within 5%, launches
    within 2%, the live-storage peak within 20%: the real CPU backward makes a few stride-matching
    gradient copies (new_empty_strided + copy_) that the fake kernels do not, which at the tiny size
    is most of the difference."""
    ok = True
    methods = SD_METHODS[:2] if size in SD_SIZES else (("diffratio", "dijs"), ("vsd", None), ("teacher", None))
    extra = {"aux_updates": 1} if size in SD_SIZES else {}
    for method, objective in methods:
        fake = count_step(size, method, objective, None, precision, False, fake=True, **extra)
        real = count_step(size, method, objective, None, precision, False, fake=False, **extra)
        checks = {"flops": fake["flops"] == real["flops"], "bytes": abs(fake["bytes"] / real["bytes"] - 1) <= 0.05,
                  "launches": abs(fake["launches"] / real["launches"] - 1) <= 0.02, "peak": abs(fake["peak_bytes"] / real["peak_bytes"] - 1) <= 0.20}
        ok &= all(checks.values())
        print(f"{method:<10} flops {fake['flops']} vs {real['flops']}, bytes {fake['bytes'] / real['bytes']:.3f}x, launches "
              f"{fake['launches'] / real['launches']:.3f}x, peak {fake['peak_bytes'] / real['peak_bytes']:.3f}x: "
              f"{'ok' if all(checks.values()) else 'MISMATCH ' + str([k for k, v in checks.items() if not v])}")
    return ok


def _print_rows(size: str, precision: str, checkpointing: bool, rows: list[dict]) -> None:
    vsd = next((r for r in rows if r["method"] == "vsd"), None)
    split = f" in micro-batches of {rows[0]['batch_gpu']} (optim.batch_gpu)" if rows[0].get("batch_gpu", rows[0]["batch"]) < rows[0]["batch"] else ""
    print(f"{size}, batch {rows[0]['batch']}{split}, {precision}{', generator checkpointing' if checkpointing else ''}  (fake tensors; H100 times are roofline estimates)")
    print(f"{'method':<22} {'GFLOP':>9} {'GB moved':>9} {'peak GB':>8} {'launches':>8} {'eager ms':>9} {'graph ms':>9}  vs VSD: flops  peak  graph/eagerVSD")
    for r in rows:
        name = r["method"] + (f"/{r['objective']}" if r["objective"] else "")
        ratios = ""
        if vsd is not None:
            ratios = f"{r['flops'] / vsd['flops']:.2f}x {r['peak_bytes'] / vsd['peak_bytes']:.2f}x {r['est_ms_graph_h100'] / vsd['est_ms_eager_h100']:.2f}x"
        print(f"{name:<22} {r['flops'] / 1e9:>9.1f} {r['bytes'] / 1e9:>9.2f} {r['peak_bytes'] / 1e9:>8.3f} {r['launches']:>8} "
              f"{r['est_ms_eager_h100']:>9.2f} {r['est_ms_graph_h100']:>9.2f}  {ratios}")


def _sd_name(r: dict) -> str:
    name = r["method"] + (f"/{r['objective']}" if r["objective"] else "")
    return name + (", own ratio" if r["method"] == "dibregman" and not r["shared_encoder"] else "")


def _print_sd_rows(rows: list[dict]) -> None:
    """Per batch: TFLOP, the peak and its split in GiB, the H100 80GB fit (one GPU; DDP), ratios to VSD."""
    gib = 2**30
    print(f"{'method':<26} {'batch':>5} {'aux':>3} {'TFLOP':>7} {'peak':>6} {'params':>6} {'grads':>6} {'adam':>6} {'act':>6}  "
          f"fits 1 GPU / DDP  vs VSD: flops peak")
    for r in rows:
        vsd = next((v for v in rows if v["method"] == "vsd" and v["batch"] == r["batch"]), None)
        sp = r["peak_split"]
        ratios = f"{r['flops'] / vsd['flops']:.2f}x {r['peak_bytes'] / vsd['peak_bytes']:.2f}x" if vsd else ""
        print(f"{_sd_name(r):<26} {r['batch']:>5} {r['aux_updates']:>3} {r['flops'] / 1e12:>7.2f} {r['peak_bytes'] / gib:>6.1f} "
              f"{sp['parameters'] / gib:>6.1f} {sp['gradients'] / gib:>6.1f} {sp['optimizer_state'] / gib:>6.1f} "
              f"{sp['activations_and_temporaries'] / gib:>6.1f}  {'yes' if r['fits_h100_80gb'] else 'NO':>5} / "
              f"{'yes' if r['fits_h100_80gb_ddp'] else 'NO':<5}  {ratios}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES) + sorted(SD_SIZES), default="cifar10")
    parser.add_argument("--batch", type=int, nargs="+", help="per-GPU batch(es); default: the size's (sd15: 8 16 32)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing (model.checkpointing): the generator; sd sizes: the generator's and fake score's UNets")
    parser.add_argument("--methods", nargs="+", help="subset, e.g. diffratio:dijs vsd (sd sizes: dibregman:sba:separate, its own ratio net)")
    parser.add_argument("--aux-updates", type=int, help="sd sizes: ratio/fake-score updates per generator update (default: the config's)")
    parser.add_argument("--batch-gpu", type=int, nargs="+", default=[0],
                        help="image sizes: optim.batch_gpu, micro-batch size(s) of gradient accumulation (0: none); a row each")
    parser.add_argument("--check", action="store_true", help="cross-check fake-tensor counts against a real CPU run (use with --size tiny or sd-tiny)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.check:
        return 0 if cross_check(args.size, args.precision) else 1
    sd = args.size in SD_SIZES
    if sd and any(args.batch_gpu):
        parser.error("--batch-gpu: counted for the image sizes (the sd sizes: not yet)")
    methods = (SD_METHODS if sd else METHODS) if not args.methods else [tuple(p or None for p in (m.split(":") + [""])[:3]) for m in args.methods]
    batches = args.batch or (SD_SIZES[args.size]["batches"] if sd else [None])
    rows = []
    env = environment(torch.device("cpu"))
    extra = {"text_encoder_flops_per_prompt": text_encoder_flops(args.size)} if sd else {}
    for batch in batches:
        for batch_gpu in args.batch_gpu:
            for method, objective, *variant in methods:
                row = count_step(args.size, method, objective, batch, args.precision, args.checkpointing, variant=(variant or [None])[0],
                                 aux_updates=args.aux_updates, **({"batch_gpu": batch_gpu} if batch_gpu else {}))
                rows.append({**row, **extra, "torch": env["torch"], "commit": env["commit"], "assumptions": {**H100, **(H100_MEMORY if sd else {})}})
                print(f"  counted {method} batch {row['batch']}{f' in micro-batches of {batch_gpu}' if batch_gpu else ''} "
                      f"in {row['count_seconds']:.1f} s", flush=True)
    if sd:
        print(f"{args.size}, {args.precision}{', checkpointing' if args.checkpointing else ''}  (fake tensors; peak in GiB; "
              f"fits: peak <= {H100_MEMORY['capacity_gib'] - H100_MEMORY['reserve_gib']:.2f} GiB)")
        _print_sd_rows(rows)
    else:
        for batch in batches:
            for batch_gpu in args.batch_gpu:
                _print_rows(args.size, args.precision, args.checkpointing,
                            [r for r in rows if (batch is None or r["batch"] == batch) and r["batch_gpu"] == (batch_gpu or r["batch"])])
    micro = "_batchgpu" + "-".join(map(str, args.batch_gpu)) if any(args.batch_gpu) else ""  # leave the unsplit table in place
    out = args.out or Path(f"bench/results/step_cost_{args.size}_{args.precision}{'_ckpt' if args.checkpointing else ''}{micro}.json")
    write_result(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
