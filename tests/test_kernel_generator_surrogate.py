"""Fused generator surrogate under TRITON_INTERPRET=1 (and compiled, on a GPU) against a float64 reference."""

import pytest
import torch
from testkit import DEVICES, assert_compiles_like_eager

from fastratio.kernels.generator_surrogate import generator_surrogate, generator_surrogate_reference

SHAPES = [(1, 1), (7, 1151), (3, 3 * 1023), (3, 3, 5, 7)]
OBJECTIVES = ["dikl", "dijs", "dirm", "be", "ls", "sba"]


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x0 = torch.randn(shape, generator=g).to(dtype)
    grad_logit = torch.randn(shape, generator=g).to(dtype)
    logit = torch.randn(b, generator=g) * 3
    w, alpha = torch.rand(b, generator=g) * 2, torch.rand(b, generator=g) + 0.5
    return x0, grad_logit, logit, w, alpha


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 1e-4, 1e-4)])
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_match_float64(shape, objective, dtype, atol, rtol, device):
    x0, grad_logit, logit, w, alpha = _inputs(shape, dtype)
    upstream = torch.randn(shape[0], generator=torch.Generator().manual_seed(9))
    x = x0.to(device, copy=True).requires_grad_(True)
    got = generator_surrogate(x, *(t.to(device) for t in (grad_logit, logit, w, alpha)), objective, 1.7)
    (got_grad,) = torch.autograd.grad(got, x, upstream.to(device))
    got, got_grad = got.cpu(), got_grad.cpu()
    xr = x0.double().requires_grad_(True)
    want = generator_surrogate_reference(xr, grad_logit.double(), logit.double(), w.double(), alpha.double(), objective, 1.7)
    (want_grad,) = torch.autograd.grad(want, xr, upstream.double())
    torch.testing.assert_close(got.double(), want, atol=atol * max(1, shape[-1] ** 0.5), rtol=rtol)
    # bf16 gradients are rounded once on output.
    grad_tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.double(), want_grad, **grad_tol)


def test_extreme_logits_are_finite():
    x0, grad_logit, _, w, alpha = _inputs((7, 33), torch.float32)
    logit = torch.tensor([-1000.0, -80.0, -1.0, 0.0, 1.0, 80.0, 1000.0])
    for objective in OBJECTIVES:
        x = x0.clone().requires_grad_(True)
        out = generator_surrogate(x, grad_logit, logit, w, alpha, objective, 5.0)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), objective


def test_shape_checks_name_the_argument():
    x0, grad_logit, logit, w, alpha = _inputs((3, 5), torch.float32)
    with pytest.raises(ValueError, match="grad_logit"):
        generator_surrogate(x0, grad_logit[:, :4], logit, w, alpha, "dijs")
    with pytest.raises(ValueError, match="alpha"):
        generator_surrogate(x0, grad_logit, logit, w, alpha[:2], "dijs")


def test_opcheck():
    x0, grad_logit, logit, w, alpha = _inputs((3, 37), torch.float32)
    args = (x0.requires_grad_(True), grad_logit, logit, w, alpha, 1, 2.0)
    torch.library.opcheck(torch.ops.fastratio.generator_surrogate.default, args)


def test_compiles_without_graph_break_forward_and_backward():
    x0, grad_logit, logit, w, alpha = _inputs((3, 37), torch.float32, seed=4)

    def f(x):
        return generator_surrogate(x * 2, grad_logit, logit, w, alpha, "dijs").sum()

    assert_compiles_like_eager(f, x0)


def test_dirm_and_nan_rows_in_the_surrogate():
    """Large-logit dirm rows keep their relative accuracy and a NaN logit row stays NaN (both kernels
    share the weight helper with the ratio-weighting kernel)."""
    x0 = torch.ones(3, 4)
    grad_logit = torch.ones(3, 4)
    logit = torch.tensor([30.0, float("nan"), 2.0])
    out = generator_surrogate(x0, grad_logit, logit, torch.ones(3), torch.ones(3), "dirm")
    torch.testing.assert_close(out[0].double(), -4 * torch.sigmoid(torch.tensor(-30.0, dtype=torch.float64)), rtol=1e-5, atol=0)
    assert torch.isnan(out[1]) and torch.isfinite(out[2])
    out = generator_surrogate(x0, grad_logit, logit, torch.ones(3), torch.ones(3), "sba", 5.0)
    assert torch.isnan(out[1])
