"""Every kernel specialisation the trainer can launch, compiled for real GPUs on a machine without one.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's whole pipeline
to PTX and a cubin; the ``ptxas`` that ships in the triton wheel, run with ``-v`` on the PTX, reports
registers, spills, stack and shared memory (a cubin's own ``n_regs`` stays empty until it is loaded
on a device). For each variant ``build`` returns those figures plus what the PTX says about memory
access: vectorised global loads (``ld.global.v4`` = 128 bits, ``.v2``), whether the row index enters
a 32-bit multiply, and whether any ``min``/``max`` drops NaN (PTX ``min.f32`` returns the other operand
for a NaN). ``problems`` turns those into the targets: no spills, at most 32 registers per thread
(full occupancy at 8 warps), 128-bit loads for aligned fp32 (64-bit for bf16: 4 elements per thread),
no NaN-dropping min/max in the weighted kernels, 64-bit row offsets.

Variants: each objective of the two weighted kernels, fp32 and bf16 data, pointers and sizes
divisible by 16 (aligned: Triton may vectorise) or not, and 32- or 64-bit integer sizes (Triton
specialises an int argument by its width). The trainer itself passes fp32 (it casts network outputs
to float before the kernels); bf16 is part of the launchers' API. ``DEFAULT`` is the subset the
default CI run compiles; ``variants(full=True)`` is all of them (the slow test and
``bench/kernel_speed.py --compile-report``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

# A100 and H100 SMs: 64K 32-bit registers shared by at most 2048 resident threads.
REGISTERS_PER_SM, THREADS_PER_SM = 65536, 2048
FULL_OCCUPANCY_REGISTERS = REGISTERS_PER_SM // THREADS_PER_SM  # 32
ARCHS = {"sm_90": 90, "sm_80": 80}


@dataclass(frozen=True)
class Variant:
    kernel: str
    objective: str | None
    dtype: str  # fp32 | bf16
    aligned: bool
    index_bits: int  # width of the size arguments (n / n_feat, noise offset)
    constexprs: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def name(self) -> str:
        parts = [self.kernel, self.objective, self.dtype, "aligned" if self.aligned else "unaligned", f"i{self.index_bits}"]
        return "/".join(p for p in parts if p)


def _kernels() -> dict[str, tuple[Any, dict[str, str]]]:
    """kernel name -> (jit function, signature template: D = data pointer, P = per-sample fp32
    pointer, I = size int, F = fp32 scalar, C = constexpr, S = seed pointer)."""
    from .generator_surrogate import _surrogate_backward_kernel, _surrogate_forward_kernel
    from .noise_injection import _inject_backward_kernel, _inject_kernel
    from .ratio_weighting import _ratio_weighting_kernel

    return {
        "ratio_weighting": (_ratio_weighting_kernel, {"logit_ptr": "D", "label_ptr": "D", "wsig_ptr": "D", "loss_ptr": "P", "dlogit_ptr": "P",
                                                      "scale_ptr": "P", "n": "I", "sba_lambda": "F", "max_log_weight": "F", "OBJECTIVE": "C", "BLOCK_SIZE": "C"}),
        "surrogate_forward": (_surrogate_forward_kernel, {"x0_ptr": "D", "glogit_ptr": "D", "logit_ptr": "P", "wsig_ptr": "P", "alpha_ptr": "P", "out_ptr": "P",
                                                          "n_feat": "I", "sba_lambda": "F", "max_log_weight": "F", "OBJECTIVE": "C", "BLOCK_SIZE": "C"}),
        "surrogate_backward": (_surrogate_backward_kernel, {"grad_ptr": "P", "glogit_ptr": "D", "logit_ptr": "P", "wsig_ptr": "P", "alpha_ptr": "P",
                                                            "grad_x0_ptr": "D", "n_feat": "I", "sba_lambda": "F", "max_log_weight": "F", "OBJECTIVE": "C", "BLOCK_SIZE": "C"}),
        "noise_inject": (_inject_kernel, {"x0_ptr": "D", "alpha_ptr": "P", "std_ptr": "P", "out_ptr": "D", "n_feat": "I", "seed_ptr": "S",
                                          "noise_offset": "I", "BLOCK_SIZE": "C"}),
        "noise_inject_backward": (_inject_backward_kernel, {"grad_ptr": "D", "x0_ptr": "D", "alpha_ptr": "P", "grad_x0_ptr": "D", "grad_alpha_ptr": "P",
                                                            "grad_std_ptr": "P", "n_feat": "I", "seed_ptr": "S", "noise_offset": "I", "BLOCK_SIZE": "C"}),
    }


_WEIGHTED = ("ratio_weighting", "surrogate_forward", "surrogate_backward")


def variants(full: bool = True) -> list[Variant]:
    from .ratio_weighting import OBJECTIVE_CODES

    objectives = sorted(set(OBJECTIVE_CODES), key=lambda o: OBJECTIVE_CODES[o])
    objectives = [o for o in objectives if o not in ("kl", "lr")]  # same code as dikl, dijs
    out = []
    for kernel in _kernels():
        if kernel == "ratio_weighting":
            widths = (32,)  # a 1-D kernel over N logits: N < 2^31 always
        else:
            widths = (32, 64)
        for objective in objectives if kernel in _WEIGHTED else [None]:
            for dtype in ("fp32", "bf16"):
                for aligned in (True, False):
                    for bits in widths:
                        out.append(Variant(kernel, objective, dtype, aligned, bits))
    if full:
        return out
    # Default CI subset: every kernel, its most complex objective (sba) and dijs, both dtypes and
    # alignments, 32-bit sizes; the 64-bit sizes for the row kernels in fp32 aligned.
    keep = {None, "sba", "dijs"}
    return [v for v in out if v.objective in keep and (v.index_bits == 32 or (v.dtype == "fp32" and v.aligned))]


def _signature(template: dict[str, str], v: Variant) -> tuple[dict[str, str], dict[tuple, list]]:
    data = "*fp32" if v.dtype == "fp32" else "*bf16"
    kinds = {"D": data, "P": "*fp32", "I": f"i{v.index_bits}", "F": "fp32", "C": "constexpr", "S": "*i64"}
    signature = {name: kinds[kind] for name, kind in template.items()}
    attrs = {}
    if v.aligned:  # 16-byte aligned pointers, sizes divisible by 16: what Triton needs to vectorise
        attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(template.values()) if kind in "DPIS"}
    return signature, attrs


def ptxas_path() -> str:
    from triton.backends import nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, spill bytes, stack and shared memory from ``ptxas -v`` (the wheel's own ptxas)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas_path(), f"-arch={gpu}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:400]}")
    text = proc.stderr

    def number(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame"),
            "shared": number(r"(\d+) bytes smem")}


def build(v: Variant, arch: int, fn: Any = None, signature: dict | None = None, constexprs: dict | None = None) -> dict[str, Any]:
    """Compile one variant for ``arch`` and describe it (see module doc). ``fn``/``signature``/
    ``constexprs`` override the variant's kernel (tests use it to check that the checks can fail)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .ratio_weighting import OBJECTIVE_CODES
    from .rows import LAUNCH

    block, num_warps, max_registers = LAUNCH
    if fn is None:
        fn, template = _kernels()[v.kernel]
        signature, attrs = _signature(template, v)
        constexprs = {"BLOCK_SIZE": block, **({"OBJECTIVE": OBJECTIVE_CODES[v.objective]} if v.objective else {})}
    else:
        attrs = {}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "maxnreg": max_registers})
    ptx = compiled.asm["ptx"]
    global_loads = [line for line in ptx.splitlines() if "ld.global" in line]
    return {
        "variant": v.name, "arch": f"sm_{arch}", "num_warps": num_warps, "block": block,
        **ptxas_report(ptx, arch),
        "ld_global": len(global_loads),
        "ld_global_v4": sum(".v4" in line for line in global_loads),
        "ld_global_v2": sum(".v2" in line for line in global_loads),
        "nan_dropping_minmax": len(re.findall(r"\b(min|max)\.(f32|f16|bf16)\b", ptx)),
        "row_index_32bit": _row_index_32bit(ptx),
    }


def _row_index_32bit(ptx: str) -> bool:
    """Does the program's row id (%ctaid.x) enter a 32-bit multiply (row * n_feat, wrapping at 2^31)?"""
    m = re.search(r"mov\.u32\s+(%r\d+),\s*%ctaid\.x;", ptx)
    return bool(m) and bool(re.search(rf"(mul|mad)\.lo\.s32\s+[^;]*{re.escape(m.group(1))}\b", ptx))


def problems(row: dict[str, Any], v: Variant) -> list[str]:
    """What a compiled variant gets wrong against the targets in the module doc (empty: fine)."""
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    if row["registers"] > FULL_OCCUPANCY_REGISTERS:
        out.append(f"{row['registers']} registers per thread > {FULL_OCCUPANCY_REGISTERS} (full occupancy at {row['num_warps']} warps)")
    if v.aligned and v.dtype == "fp32" and row["ld_global_v4"] == 0:
        out.append("aligned fp32 data but no 128-bit ld.global.v4")
    if v.aligned and v.dtype == "bf16" and row["ld_global_v2"] + row["ld_global_v4"] == 0:
        out.append("aligned bf16 data but no vectorised load")
    # Weighted kernels only: a NaN logit must reach the output. (tl.randn clamps its uniforms with a
    # plain max, on values that are never NaN.)
    if v.kernel in _WEIGHTED and row["nan_dropping_minmax"]:
        out.append(f"{row['nan_dropping_minmax']} NaN-dropping min/max (PTX min.f32/max.f32)")
    if row["row_index_32bit"]:
        out.append("32-bit row index (row * n_feat wraps at 2^31 elements)")
    return out
