"""What one training step costs, counted without computing it: FLOPs, memory traffic, peak memory,
kernel launches, per phase and role, for every method, and a roofline time estimate for an H100.

    python bench/step_cost.py [--size tiny|cifar10|imagenet64] [--batch B] [--precision fp32|bf16] [--checkpointing]

The trainer's own code runs (fastratio.tasks.image builds the networks, TrainStep/StepRunner run
the iteration: data sampling, every update, backward and Adam step, the EMA updates) under torch's
FakeTensorMode, so no tensor holds data and a CIFAR-10-size step takes seconds on a CPU. The teacher
is built from its kwargs instead of being read from a file (loading is not part of a step). Two
iterations run; the second, with the optimizer state in place, is the one reported. Counted by a
dispatch mode around every aten op:
  FLOPs       torch.utils.flop_counter's formulas (matmul, convolution, attention, their backwards)
  bytes       inputs + outputs of every non-view op: an upper bound on eager memory traffic
              (compiled steps fuse elementwise chains and move less)
  peak        live tensor storages (weakrefs on every op output), split at the peak into parameters
              (live and EMA), gradients, optimizer state and the rest (activations, temporaries)
  launches    non-view ops: one kernel each in eager mode (a few ops launch several, some none)
Roofline estimate on an H100 SXM (stated assumptions, not a measurement): each op takes
max(FLOPs / peak, bytes / bandwidth), peak 989 TFLOP/s for bf16 tensor-core ops, 495 TFLOP/s for
fp32 convolutions (TF32, torch's default for convolutions), 67 TFLOP/s for other fp32 math, HBM
3.35 TB/s; eager adds 6 us of launch and dispatch overhead per kernel, a CUDA graph 1.5 us.
Prints ratios against VSD and writes JSON rows (device-independent: versions, commit, config).
``--check`` cross-checks the counts against a real CPU run at the tiny size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).parent))
from step_time import SIZES, _config

from fastratio.draws import Draws
from fastratio.networks.denoisers import build_denoiser
from fastratio.runinfo import environment
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
        weakref.finalize(t, self._release, key)

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
            flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
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

    for name, phase in (("ratio_update", "ratio update"), ("fake_score_update", "fake-score update"), ("generator_update", "generator update")):
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


def count_step(size_name: str, method: str, objective: str | None, batch: int | None, precision: str, checkpointing: bool,
               fake: bool = True) -> dict:
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
        original = image_task.load_teacher
        image_task.load_teacher = teacher_from_kwargs
        try:
            with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
                torch.manual_seed(0)
                task = build_task(cfg, torch.device("cpu"))
                nets = task.build_networks()
                opts = build_optimizers(nets, cfg)
                ema, ratio_ema, averages = build_averages(nets, cfg)
                step_cls = TeacherStep if method == "teacher" else TrainStep
                step = step_cls(cfg, nets, opts, Draws(torch.Generator().manual_seed(0)), SINGLE, None)
                runner = StepRunner(cfg, task, nets, step, SINGLE, torch.device("cpu"), averages, optimizers=opts)
                runner()  # creates the optimizer state
                modules = [getattr(nets, r) for r in ("generator", "ratio", "teacher", "fake_score") if getattr(nets, r) is not None]
                modules += [e.module for e in (ema, ratio_ema) if e is not None]
                params = [p for m in modules for p in (*m.parameters(), *m.buffers())]
                trained = [p for m in modules for p in m.parameters() if p.requires_grad]

                def state_tensors():
                    return {"parameters": _bytes(params), "gradients": _bytes([p.grad for p in trained if p.grad is not None]),
                            "optimizer_state": _bytes([t for o in opts.values() for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)])}

                # Everything alive before the measured step is in the baseline; its own allocations are tracked.
                before = state_tensors()
                mode = StepCost(state_tensors)
                t0 = time.perf_counter()
                with _phases(mode, runner, nets), mode:
                    runner()
                seconds = time.perf_counter() - t0
        finally:
            image_task.load_teacher = original
    baseline = sum(before.values())
    peak = baseline + mode.peak[0]
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
        "size": size_name, "method": method, "objective": objective, "batch": size["batch"], "precision": precision,
        "checkpointing": checkpointing, "flops": total["flops"], "bytes": total["bytes"], "launches": total["launches"],
        "peak_bytes": peak, "peak_at": mode.peak[1], "peak_split": split,
        "est_ms_eager_h100": total["seconds_eager"] * 1e3, "est_ms_graph_h100": total["seconds_graph"] * 1e3,
        "phases": {p: dict(v) for p, v in phase_totals.items()}, "per_phase_role": per, "parameters": params_per_role,
        "count_seconds": seconds,
    }


def cross_check(size: str, precision: str) -> bool:
    """The same counts from real tensors on the CPU. FLOPs must be equal; bytes within 5%, launches
    within 2%, the live-storage peak within 20%: the real CPU backward makes a few stride-matching
    gradient copies (new_empty_strided + copy_) that the fake kernels do not, which at the tiny size
    is most of the difference."""
    ok = True
    for method, objective in (("diffratio", "dijs"), ("vsd", None), ("teacher", None)):
        fake = count_step(size, method, objective, None, precision, False, fake=True)
        real = count_step(size, method, objective, None, precision, False, fake=False)
        checks = {"flops": fake["flops"] == real["flops"], "bytes": abs(fake["bytes"] / real["bytes"] - 1) <= 0.05,
                  "launches": abs(fake["launches"] / real["launches"] - 1) <= 0.02, "peak": abs(fake["peak_bytes"] / real["peak_bytes"] - 1) <= 0.20}
        ok &= all(checks.values())
        print(f"{method:<10} flops {fake['flops']} vs {real['flops']}, bytes {fake['bytes'] / real['bytes']:.3f}x, launches "
              f"{fake['launches'] / real['launches']:.3f}x, peak {fake['peak_bytes'] / real['peak_bytes']:.3f}x: "
              f"{'ok' if all(checks.values()) else 'MISMATCH ' + str([k for k, v in checks.items() if not v])}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cifar10")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the generator (model.checkpointing)")
    parser.add_argument("--methods", nargs="+", help="subset, e.g. diffratio:dijs vsd")
    parser.add_argument("--check", action="store_true", help="cross-check fake-tensor counts against a real CPU run (use with --size tiny)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.check:
        return 0 if cross_check(args.size, args.precision) else 1
    methods = METHODS if not args.methods else [(m.split(":")[0], m.split(":")[1] if ":" in m else None) for m in args.methods]
    rows = []
    env = environment(torch.device("cpu"))
    for method, objective in methods:
        row = count_step(args.size, method, objective, args.batch, args.precision, args.checkpointing)
        rows.append({**row, "torch": env["torch"], "commit": env["commit"], "assumptions": H100})
    vsd = next((r for r in rows if r["method"] == "vsd"), None)
    print(f"{args.size}, batch {rows[0]['batch']}, {args.precision}{', generator checkpointing' if args.checkpointing else ''}  (fake tensors; H100 times are roofline estimates)")
    print(f"{'method':<22} {'GFLOP':>9} {'GB moved':>9} {'peak GB':>8} {'launches':>8} {'eager ms':>9} {'graph ms':>9}  vs VSD: flops  peak  graph/eagerVSD")
    for r in rows:
        name = r["method"] + (f"/{r['objective']}" if r["objective"] else "")
        ratios = ""
        if vsd is not None:
            ratios = f"{r['flops'] / vsd['flops']:.2f}x {r['peak_bytes'] / vsd['peak_bytes']:.2f}x {r['est_ms_graph_h100'] / vsd['est_ms_eager_h100']:.2f}x"
        print(f"{name:<22} {r['flops'] / 1e9:>9.1f} {r['bytes'] / 1e9:>9.2f} {r['peak_bytes'] / 1e9:>8.3f} {r['launches']:>8} "
              f"{r['est_ms_eager_h100']:>9.2f} {r['est_ms_graph_h100']:>9.2f}  {ratios}")
    out = args.out or Path(f"bench/results/step_cost_{args.size}_{args.precision}{'_ckpt' if args.checkpointing else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
