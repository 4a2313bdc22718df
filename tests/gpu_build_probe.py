"""Run by tests/test_kernel_gpu_build.py in a process without TRITON_INTERPRET: kernels that break
one target each, compiled for sm_90 through fastratio.kernels.gpu_build, to show its checks can fail."""

import json

import triton
import triton.language as tl

from fastratio.kernels.gpu_build import Variant, build, problems


@triton.jit
def spills(x_ptr, y_ptr, BLOCK_SIZE: tl.constexpr):
    # 64 values per thread kept live across a block max: far beyond the 32-register budget.
    offs = tl.arange(0, BLOCK_SIZE)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, tl.exp(x - tl.max(x, axis=0)))


@triton.jit
def drops_nan(x_ptr, y_ptr, BLOCK_SIZE: tl.constexpr):
    offs = tl.arange(0, BLOCK_SIZE)
    tl.store(y_ptr + offs, tl.exp(tl.minimum(tl.load(x_ptr + offs), 80.0)))


@triton.jit
def row_index_32bit(x_ptr, y_ptr, n_feat, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    idx = row * n_feat + cols
    tl.store(y_ptr + idx, tl.load(x_ptr + idx, mask=cols < n_feat), mask=cols < n_feat)


def main():
    out = {}
    cases = {
        "spills": (spills, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK_SIZE": "constexpr"}, {"BLOCK_SIZE": 16384}, "ratio_weighting"),
        "drops_nan": (drops_nan, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK_SIZE": "constexpr"}, {"BLOCK_SIZE": 1024}, "ratio_weighting"),
        "row_index_32bit": (row_index_32bit, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n_feat": "i32", "BLOCK_SIZE": "constexpr"}, {"BLOCK_SIZE": 1024}, "surrogate_forward"),
    }
    for name, (fn, signature, constexprs, as_kernel) in cases.items():
        v = Variant(as_kernel, "sba", "fp32", False, 32)
        out[name] = problems(build(v, 90, fn, signature, constexprs), v)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
