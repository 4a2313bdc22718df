"""Fused noise injection under TRITON_INTERPRET=1 (and compiled, on a GPU): Philox noise, forward and
backward vs float64."""

import pytest
import torch
from testkit import DEVICES, assert_compiles_like_eager

from fastratio.kernels.noise_injection import noise_inject, noise_inject_reference

SHAPES = [(1, 1), (7, 1151), (3, 3 * 1023), (3, 3, 5, 7)]
# bf16 outputs: one rounding of a float32 value. The Triton 3.8 interpreter truncates fp32 -> bf16 on
# store (toward zero) where the compiled PTX rounds to nearest (cvt.rn), so interpreter results can sit
# one bf16 ulp (2^-7 relative) low: the tolerance allows a full ulp, not half.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 1e-2)]


def _eps(shape, seed, device="cpu"):
    """The kernel's own noise: alpha = 0, std = 1 (on the host)."""
    b = shape[0]
    return noise_inject(torch.zeros(shape, device=device), torch.zeros(b, device=device), torch.ones(b, device=device), seed).cpu()


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    alpha, std = torch.rand(shape[0], generator=g) + 0.5, torch.rand(shape[0], generator=g) * 3
    return x0, alpha, std


@pytest.mark.parametrize("device", DEVICES)
def test_noise_is_standard_normal_and_seeded(device):
    eps = _eps((4, 65536), 123, device).double()
    assert abs(float(eps.mean())) < 0.01 and abs(float(eps.std()) - 1) < 0.01
    assert abs(float((eps**3).mean())) < 0.03 and abs(float((eps**4).mean()) - 3) < 0.05
    assert torch.equal(_eps((4, 65536), 123, device), _eps((4, 65536), 123, device))
    other = _eps((4, 65536), 124, device).double()
    assert abs(float((eps * other).mean())) < 0.01  # a new seed gives independent noise
    assert abs(float((eps[0] * eps[1]).mean())) < 0.02  # rows do not repeat each other


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_reference(shape, dtype, atol, rtol, device):
    x0, alpha, std = _inputs(shape, dtype)
    got = noise_inject(x0.to(device), alpha.to(device), std.to(device), seed=7).cpu()
    want = noise_inject_reference(x0.double(), alpha.double(), std.double(), _eps(shape, 7, device).double())
    assert got.dtype == dtype and got.shape == x0.shape
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_regenerates_noise(shape, dtype, device):
    x0, alpha, std = _inputs(shape, dtype, seed=1)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    leaves = [t.to(device, copy=True).requires_grad_(True) for t in (x0, alpha, std)]
    got = torch.autograd.grad(noise_inject(*leaves, seed=11), leaves, upstream.to(device))
    ref_leaves = [t.double().requires_grad_(True) for t in (x0, alpha, std)]
    want = torch.autograd.grad(noise_inject_reference(*ref_leaves, _eps(shape, 11, device).double()), ref_leaves, upstream.double())
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    for name, a, b in zip(("x0", "alpha", "std"), got, want):
        torch.testing.assert_close(a.cpu().double(), b, **tol, msg=lambda m, name=name: f"grad {name}: {m}")


def test_shape_checks_name_the_argument():
    x0, alpha, std = _inputs((3, 5), torch.float32)
    with pytest.raises(ValueError, match="std"):
        noise_inject(x0, alpha, std[:2], 0)
    with pytest.raises(ValueError, match="x0"):
        noise_inject(x0.double(), alpha, std, 0)
    with pytest.raises(ValueError, match="seed"):
        noise_inject(x0, alpha, std, torch.tensor([1, 2]))


def test_device_seed_tensor_equals_int_seed():
    x0, alpha, std = _inputs((3, 37), torch.float32)
    assert torch.equal(noise_inject(x0, alpha, std, torch.tensor([9])), noise_inject(x0, alpha, std, 9))


def test_opcheck():
    x0, alpha, std = _inputs((3, 37), torch.float32)
    args = (x0.requires_grad_(True), alpha.requires_grad_(True), std.requires_grad_(True), torch.tensor([5]), 2)
    torch.library.opcheck(torch.ops.fastratio.noise_inject.default, args)


def test_row_offset_gives_the_rows_of_a_larger_batch():
    """A data-parallel rank with row_offset r gets rows [r, r + B) of the global batch's noise."""
    x0, alpha, std = _inputs((6, 37), torch.float32)
    full = noise_inject(x0, alpha, std, 3)
    for start in (0, 2, 4):
        part = noise_inject(x0[start : start + 2], alpha[start : start + 2], std[start : start + 2], 3, row_offset=start)
        assert torch.equal(part, full[start : start + 2])
    upstream = torch.randn(2, 37)
    leaves = [t[4:6].clone().requires_grad_(True) for t in (x0, alpha, std)]
    got = torch.autograd.grad(noise_inject(*leaves, 3, row_offset=4), leaves, upstream)
    full_leaves = [t.clone().requires_grad_(True) for t in (x0, alpha, std)]
    want = torch.autograd.grad(noise_inject(*full_leaves, 3), full_leaves, torch.cat([torch.zeros(4, 37), upstream]))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b[4:6])


def test_compiles_without_graph_break_forward_and_backward():
    """As the trainer calls it: a device seed tensor and a row offset, inside a fullgraph region."""
    x0, alpha, std = _inputs((4, 37), torch.float32)
    seed = torch.tensor([11])

    def f(x):
        return (noise_inject(x * 2, alpha, std, seed, row_offset=3) ** 2).sum()

    assert_compiles_like_eager(f, x0)


def test_launcher_errors_name_the_argument(monkeypatch):
    x0, alpha, std = torch.zeros(2, 1024), torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match="seed: must lie in \\[0, 2\\^63\\)"):
        noise_inject(x0, alpha, std, 2**63)
    with pytest.raises(ValueError, match="x0: .* noise elements in the global batch exceed 2\\^31"):
        noise_inject(x0, alpha, std, 0, row_offset=2**21)
    with pytest.raises(ValueError, match="alpha: dtype torch.complex64 not supported"):
        noise_inject(x0, alpha.to(torch.complex64), std, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x0: on cpu; the Triton kernels need a CUDA device"):
        noise_inject(x0, alpha, std, 0)
