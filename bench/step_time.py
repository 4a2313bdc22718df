"""Step time, memory and MFU of the real training step: DiffRatio in graph/eager/compile vs two-score VSD.

    python bench/step_time.py                      # CIFAR-10 DDPM++ size, batch 64 (GPU); tiny on CPU
    python bench/step_time.py --size tiny          # seconds on a CPU (CI)
    python bench/step_time.py --profile trace.json # also a torch.profiler trace of one eager step

Every configuration goes through the trainer's own code (fastratio.tasks.image, TrainStep,
StepRunner) on synthetic uint8 images of the target shape (timing does not depend on pixel values)
with a randomly initialised teacher written as a stage-1 checkpoint. In one process and one run:
  (a) DiffRatio/DiJS, step.mode=graph (CUDA only)   (a2) its eager step captured as a CUDA graph, no
  compile (CUDA only: graph launch savings without a cold compile)   (b) DiffRatio eager
  (c) DiffRatio compile   (d) VSD eager (generator + frozen teacher + trained fake score)
  (e) VSD compile (--vsd-compiled)
For each: median/p20/p80 ms per step after warm-up, images/s, peak memory (CUDA: max allocated;
CPU: the process's peak RSS so far, cumulative), compile or capture time, parameters per role,
FLOPs of one step (torch.utils.flop_counter) and achieved TFLOP/s, MFU against a matrix multiply
measured in the same run. Prints ratios vs (d) and writes JSON rows with device, versions, commit.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastratio import checkpoint, config
from fastratio.draws import Draws
from fastratio.runinfo import environment, write_result
from fastratio.runner import StepRunner
from fastratio.shard import SINGLE
from fastratio.step import TrainStep
from fastratio.tasks import build_task
from fastratio.tasks.image import network_kwargs
from fastratio.train import build_averages, build_optimizers, trained_role

sys.path.insert(0, str(Path(__file__).parent))
from timing import quantiles_ms

SIZES = {
    # DDPM++ as in EDM's CIFAR-10 config (55.7M-parameter teacher/generator, 19.6M ratio net)
    "cifar10": {"shape": (3, 32, 32), "batch": 64, "model": {"channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16]}},
    # ADM as in EDM's ImageNet-64 config (296M parameters; run unconditional here, the class embedding is 0.3% of the FLOPs)
    "imagenet64": {"shape": (3, 64, 64), "batch": 32, "model": {"arch": "adm", "channels": 192, "channel_mult": [1, 2, 3, 4], "num_blocks": 3, "attn_resolutions": [32, 16, 8]}},
    # EDM2's img512 networks on SD-VAE latents (4 x 64 x 64); XS 125M and XXL 1.5B parameters (EDM2's counts)
    "img512-xs": {"shape": (4, 64, 64), "batch": 32, "model": {"arch": "edm2", "size": "xs", "channel_mult": [1, 2, 3, 4], "num_blocks": 3, "attn_resolutions": [16, 8]}},
    "img512-xxl": {"shape": (4, 64, 64), "batch": 32, "model": {"arch": "edm2", "size": "xxl", "channel_mult": [1, 2, 3, 4], "num_blocks": 3, "attn_resolutions": [16, 8]}},
    "tiny": {"shape": (1, 8, 8), "batch": 8, "model": {"channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}},
}


def _fixtures(root: Path, size: dict, cfg_model: dict) -> tuple[Path, Path]:
    """Synthetic data (.npz) and a random teacher checkpoint in the stage-1 format."""
    c, h, w = size["shape"]
    data = root / "data.npz"
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, size=(512, c, h, w), dtype=np.uint8))
    cfg = _config(root, data, None, size, cfg_model, "teacher", "eager", "fp32")
    kwargs = network_kwargs(cfg, (c, h, w), 0)
    from fastratio.networks.denoisers import build_denoiser

    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    checkpoint.save({"network_kwargs": kwargs, "config": config.to_dict(cfg), "ema": build_denoiser(kwargs).state_dict()}, teacher)
    return data, teacher


def _config(root, data, teacher, size, cfg_model, method, mode, precision) -> config.Config:
    model = {"arch": "ddpmpp", "sigma_data": 0.5, "dropout": 0.0, **cfg_model}
    return config.from_dict({
        "run": {"out_dir": str(root / "run"), "device": "auto", "precision": precision, "progress": False},
        "data": {"kind": "npz", "path": str(data)},
        "model": model,
        "method": {"name": method, "objective": "dijs", "ratio_steps": 1, "fake_score_steps": 1},  # the papers' one ratio step per generator step
        "teacher": {"checkpoint": str(teacher) if teacher else "", "loss": "edm2" if model["arch"] == "edm2" else "edm"},
        "noise": {"schedule": "ve", "sigma_dist": "loguniform", "sigma_min": 0.002, "sigma_max": 80.0, "weighting": "sigma2"},
        "optim": {"batch_size": size["batch"], "gen_lr": 1e-5, "ratio_lr": 1e-5, "beta1": 0.0, "beta2": 0.999, "lr_schedule": "constant"},
        "step": {"mode": mode, "warmup_steps": 3},
    })


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _nvml(device: torch.device) -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return {"nvml": "ok", "driver": pynvml.nvmlSystemGetDriverVersion(), "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000, "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000}
    except Exception as err:  # noqa: BLE001 - no pynvml, no driver, no GPU: all mean "no NVML"
        return {"nvml": f"no NVML ({type(err).__name__})"}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# (name, method, mode). "graph_eager" is step.mode=graph with the step left uncompiled: StepRunner
# then warms up and captures the eager iteration (Adam capturable, as the graph config makes it).
CONFIGS = [("a_diffratio_graph", "diffratio", "graph"), ("a2_diffratio_graph_eager", "diffratio", "graph_eager"),
           ("b_diffratio_eager", "diffratio", "eager"), ("c_diffratio_compile", "diffratio", "compile"),
           ("d_vsd_eager", "vsd", "eager"), ("e_vsd_compile", "vsd", "compile")]


def _build(cfg: config.Config, device: torch.device, compile_step: bool = True):
    torch.manual_seed(0)
    task = build_task(cfg, device)
    nets = task.build_networks()
    opts = build_optimizers(nets, cfg)
    rng = torch.Generator(device).manual_seed(0)
    step = TrainStep(cfg, nets, opts, Draws(rng), SINGLE, None)
    runner = StepRunner(cfg, task, nets, step, SINGLE, device, build_averages(nets, cfg)[2], optimizers=opts)
    if not compile_step:
        runner.compiled_unit = None  # bench-only: _step runs the step eagerly, graph mode captures that
    return nets, runner


def _flops(cfg, device) -> int:
    """FLOPs of one eager step from torch's FLOP formulas (matmul, conv, attention and their
    backwards). A bare dispatch mode, not FlopCounterMode: the latter's module hooks do not allow the
    step's autograd.grad with respect to a leaf input."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Count.total += formula(*args, **kwargs, out_val=out)
            return out

    _, runner = _build(cfg, device)
    with Count():
        runner()
    return Count.total


def measure(name: str, cfg: config.Config, device: torch.device, steps: int, warmup: int, peak_tflops: float, flops: int,
            compile_step: bool = True) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    nets, runner = _build(cfg, device, compile_step)
    t0 = time.perf_counter()
    # Untimed: compile's recording and compiling steps; graph's recording, warm-up and capture steps.
    needed = {"eager": 0, "compile": 2, "graph": 2 + cfg.step.warmup_steps}[cfg.step.mode]
    for _ in range(max(warmup, needed)):
        runner()
    _sync(device)
    setup_s = time.perf_counter() - t0
    samples = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            runner()
            samples.append((time.perf_counter() - t) * 1e3)
    med, p20, p80 = quantiles_ms(samples)
    achieved = flops / (med / 1e3) / 1e12
    params = {role: sum(p.numel() for p in getattr(nets, role).parameters()) for role in ("generator", "ratio", "teacher", "fake_score") if getattr(nets, role) is not None}
    return {
        "config": name, "method": cfg.method.name, "mode": cfg.step.mode, "compiled": runner.compiled_unit, "precision": cfg.run.precision,
        "batch": cfg.optim.batch_size, "ms_median": med, "ms_p20": p20, "ms_p80": p80,
        "images_per_s": cfg.optim.batch_size / (med / 1e3), "peak_memory_mb": _peak_memory_mb(device),
        "compile_s": runner.compile_seconds, "capture_s": runner.capture_seconds, "warmup_s": setup_s,
        "parameters": params, "trained_role": trained_role(cfg), "flops_per_step": flops,
        "tflop_s": achieved, "mfu": achieved / peak_tflops,
    }


def fixtures(root: Path, size: dict) -> tuple:
    """(root, data, teacher, size): what run_config needs, written under root (size: a SIZES entry)."""
    return (root, *_fixtures(root, size, size["model"]), size)


def run_config(name: str, method: str, mode: str, fix: tuple, precision: str, device: torch.device,
               steps: int, warmup: int, peak_tflops: float) -> dict:
    """One row: the FLOPs of an eager step, then the configuration timed in ``mode`` (a CONFIGS mode)."""
    root, data, teacher, size = fix
    step_mode = "graph" if mode == "graph_eager" else mode
    flops = _flops(_config(root, data, teacher, size, size["model"], method, "eager", precision), device)
    torch._dynamo.reset()
    cfg = _config(root, data, teacher, size, size["model"], method, step_mode, precision)
    return measure(name, cfg, device, steps, warmup, peak_tflops, flops, compile_step=mode != "graph_eager")


def add_ratios(rows: list[dict]) -> None:
    """Time and memory against VSD eager (d) and DiffRatio eager (b), where those rows exist."""
    by_name = {r["config"]: r for r in rows}
    base, eager = by_name.get("d_vsd_eager"), by_name.get("b_diffratio_eager")
    for r in rows:
        if base:
            r["time_vs_vsd_eager"] = r["ms_median"] / base["ms_median"]
            r["memory_vs_vsd_eager"] = r["peak_memory_mb"] / base["peak_memory_mb"]
        if eager:
            r["time_vs_diffratio_eager"] = r["ms_median"] / eager["ms_median"]


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<24} {'ms/step':>9} {'p20':>8} {'p80':>8} {'img/s':>9} {'peak MB':>9} {'TFLOP/s':>8} {'MFU':>6} {'time/VSD':>9} {'mem/VSD':>8} {'time/eager':>10}")
    for r in rows:
        print(f"{r['config']:<24} {r['ms_median']:>9.3f} {r['ms_p20']:>8.3f} {r['ms_p80']:>8.3f} {r['images_per_s']:>9.1f} "
              f"{r['peak_memory_mb']:>9.1f} {r['tflop_s']:>8.3f} {r['mfu']:>6.1%} {r.get('time_vs_vsd_eager', float('nan')):>8.2f}x "
              f"{r.get('memory_vs_vsd_eager', float('nan')):>7.2f}x {r.get('time_vs_diffratio_eager', float('nan')):>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="default: cifar10 on CUDA, tiny on CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--vsd-compiled", action="store_true", help="also time (e) VSD compiled")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the compiled configurations")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler chrome trace of one eager DiffRatio step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size_name = args.size or ("cifar10" if cuda else "tiny")
    size = SIZES[size_name]
    precision = args.precision or ("bf16" if cuda else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = _matmul_peak_tflops(device, dtype)
    meta = {**environment(device), **(_nvml(device) if cuda else {"nvml": "no NVML (CPU)"}), "size": size_name,
            "precision": precision, "matmul_peak_tflop_s": peak}
    print(f"{meta['device']} | torch {meta['torch']} | {size_name} batch {size['batch']} {precision} | matmul peak {peak:.2f} TFLOP/s | {meta['nvml']}")

    configs = [c for c in CONFIGS if cuda or not c[2].startswith("graph")]
    if not args.vsd_compiled:
        configs = [c for c in configs if c[0] != "e_vsd_compile"]
    if args.skip_compile:
        configs = [c for c in configs if c[2] not in ("compile", "graph")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fix = fixtures(Path(tmp), size)
        for name, method, mode in configs:
            rows.append({**meta, **run_config(name, method, mode, fix, precision, device, args.steps, args.warmup, peak)})
        if args.profile:
            cfg = _config(Path(tmp), *fix[1:3], size, size["model"], "diffratio", "eager", precision)
            _, runner = _build(cfg, device)
            runner()
            with torch.profiler.profile(record_shapes=True) as prof:
                runner()
                _sync(device)
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.profile))
            print(f"profile: {args.profile}")

    add_ratios(rows)
    print_table(rows)
    if not cuda:
        print("CPU: peak memory is the process's cumulative peak RSS, so later rows cannot read lower than earlier ones")
    out = args.out or Path(f"bench/results/step_time_{'gpu' if cuda else 'cpu'}_{size_name}.json")
    write_result(out, rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
