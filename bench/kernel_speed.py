"""Time each fused kernel against its PyTorch reference, eager and torch.compile'd; or compile every
kernel variant for real GPUs (no GPU needed) and report what ptxas says.

    python bench/kernel_speed.py [--batch 64] [--shape 3 32 32] [--out bench/results/kernels_<device>.json]
    python bench/kernel_speed.py --compile-report [--arch sm_90 sm_80] [--subset default|full] [--out bench/results/kernels_sm90.json]

``--compile-report`` (fastratio.kernels.gpu_build): registers, spills, stack, shared memory and
vector-load width per variant and architecture, and the targets each variant misses; exit status 1
when any misses one. Must run without TRITON_INTERPRET (the interpreter replaces the jit functions).

On a GPU: triton.testing.do_bench quantiles (median, 20th, 80th percentile), and GB/s against a
device-to-device copy of the same bytes measured in the same run. On the CPU only the references
run (Triton needs a GPU outside the interpreter), timed with a wall clock. Prints a table and writes
JSON rows with device, versions and commit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastratio.kernels.generator_surrogate import generator_surrogate, generator_surrogate_reference
from fastratio.kernels.noise_injection import noise_inject, noise_inject_reference
from fastratio.kernels.ratio_weighting import ratio_weighting, ratio_weighting_reference
from fastratio.runinfo import environment, write_result

sys.path.insert(0, str(Path(__file__).parent))
from timing import quantiles_ms


def _time(fn, cuda: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if cuda:
        import triton

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    for _ in range(3):
        fn()
    samples = []
    for _ in range(20):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles_ms(samples)


def compile_report(archs: list[str], subset: str, out: Path) -> int:
    from fastratio.kernels.gpu_build import ARCHS, build, problems, variants

    rows, bad = [], 0
    env = environment(torch.device("cpu"))
    t0 = time.perf_counter()
    print(f"{'variant':<48} {'arch':<6} {'regs':>4} {'spill':>5} {'v4':>3} {'v2':>3}  problems")
    for arch in archs:
        for v in variants(full=subset == "full"):
            row = build(v, ARCHS[arch])
            row["problems"] = problems(row, v)
            bad += bool(row["problems"])
            rows.append({**row, "kernel": v.kernel, "objective": v.objective, "dtype": v.dtype, "aligned": v.aligned, "index_bits": v.index_bits})
            print(f"{v.name:<48} {arch:<6} {row['registers']:>4} {row['spill_stores'] + row['spill_loads']:>5} {row['ld_global_v4']:>3} "
                  f"{row['ld_global_v2']:>3}  {'; '.join(row['problems']) or 'ok'}")
    import triton

    meta = {"torch": env["torch"], "triton": triton.__version__, "commit": env["commit"], "archs": archs, "subset": subset}
    write_result(out, {**meta, "ptxas": "triton wheel's bundled ptxas, -v", "seconds": time.perf_counter() - t0, "rows": rows})
    print(f"{len(rows)} variants, {bad} with problems; wrote {out}")
    return 1 if bad else 0


def copy_gb_s(device: torch.device, numel: int) -> float:
    """Device-to-device copy of numel fp32 elements, GB/s counting bytes read and written."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * numel * src.element_size() / _time(lambda: dst.copy_(src), device.type == "cuda")[0] / 1e6


def kernel_rows(batch: int, sample_shape: list[int], device: torch.device, compiled: bool = True) -> list[dict]:
    """Each kernel's Triton launch (CUDA), its reference eager and (``compiled``) torch.compile'd:
    rows with ms quantiles, GB/s of the fused kernel's bytes and the speed-up over eager; prints a table."""
    cuda = device.type == "cuda"
    b, shape = batch, (batch, *sample_shape)
    x0, grad_logit = torch.randn(shape, device=device), torch.randn(shape, device=device)
    logit, w = torch.randn(b, device=device) * 3, torch.rand(b, device=device)
    alpha, std, label = torch.ones(b, device=device), torch.rand(b, device=device), (torch.rand(b, device=device) < 0.5).float()
    elem = x0.element_size()

    # (name, bytes moved by the fused kernel, kernel, reference)
    cases = [
        ("noise_inject", 2 * x0.numel() * elem, lambda: noise_inject(x0, alpha, std, 7),
         lambda: noise_inject_reference(x0, alpha, std, torch.randn_like(x0))),
        ("ratio_weighting", 6 * b * 4, lambda: ratio_weighting(logit, label, w, "dijs"),
         lambda: ratio_weighting_reference(logit, label, w, "dijs")),
        ("generator_surrogate", 2 * x0.numel() * elem, lambda: generator_surrogate(x0, grad_logit, logit, w, alpha, "dijs"),
         lambda: generator_surrogate_reference(x0, grad_logit, logit, w, alpha, "dijs")),
    ]
    copy_gbs = copy_gb_s(device, x0.numel())  # the same bytes as the kernels: the ceiling at this size
    meta = {**environment(device), "dtype": "float32", "shape": list(shape), "copy_gb_s": copy_gbs}
    rows = []
    print(f"device {meta['device']}, copy {copy_gbs:.1f} GB/s")
    print(f"{'op':<20} {'impl':<10} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>8} {'vs eager':>9}")
    for name, nbytes, kernel, reference in cases:
        impls = {"eager": reference, **({"compiled": torch.compile(reference)} if compiled else {}), **({"triton": kernel} if cuda else {})}
        eager_ms = None
        for impl, fn in impls.items():
            med, p20, p80 = _time(fn, cuda)
            eager_ms = eager_ms or med
            row = {**meta, "op": name, "impl": impl, "ms_median": med, "ms_p20": p20, "ms_p80": p80,
                   "gb_s": nbytes / med / 1e6, "speedup_vs_eager": eager_ms / med}
            rows.append(row)
            print(f"{name:<20} {impl:<10} {med:>10.4f} {p20:>8.4f} {p80:>8.4f} {row['gb_s']:>8.1f} {row['speedup_vs_eager']:>8.2f}x")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs="+", default=[3, 32, 32])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compile-report", action="store_true", help="compile every kernel variant for GPUs and report ptxas figures")
    parser.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"], choices=["sm_90", "sm_80"])
    parser.add_argument("--subset", default="full", choices=["default", "full"])
    args = parser.parse_args()
    if args.compile_report:
        return compile_report(args.arch, args.subset, args.out or Path("bench/results/kernels_sm90.json"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = kernel_rows(args.batch, args.shape, device)
    out = args.out or Path(f"bench/results/kernels_{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    write_result(out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
