"""Fused ratio weighting under TRITON_INTERPRET=1 (and compiled, on a GPU) against a float64 reference."""

import pytest
import torch
from testkit import DEVICES

from fastratio.kernels.ratio_weighting import OBJECTIVE_CODES, ratio_weighting, ratio_weighting_reference

# (dtype, atol, rtol): outputs are float32; bf16 inputs are exact in float32, so the kernel matches a
# float64 reference on the same rounded inputs to float32 accuracy whatever the input dtype. (bf16
# *outputs* would need a one-ulp allowance under the interpreter, which truncates fp32 -> bf16 stores
# where the GPU rounds to nearest; the backward test below has one.)
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-6, 1e-5)]
OBJECTIVES = ["dikl", "dijs", "dirm", "be", "ls", "sba"]


def _inputs(n, dtype, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logit = (torch.randn(n, generator=g) * scale).to(dtype)
    label = (torch.rand(n, generator=g) < 0.5).float()
    w = torch.rand(n, generator=g) * 3
    return logit, label, w


@pytest.mark.parametrize("n", [1, 7, 1151, 3 * 1023])
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_float64_reference(n, dtype, atol, rtol, objective, device):
    logit, label, w = _inputs(n, dtype)
    got = ratio_weighting(logit.to(device), label.to(device), w.to(device), objective, 1.7)
    want = ratio_weighting_reference(logit.double(), label.double(), w.double(), objective, 1.7)
    for name, a, b in zip(("loss", "dlogit", "scale"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.cpu().double(), b, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{objective} {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_with_upstream_gradient(dtype, device):
    logit, label, w = _inputs(1151, dtype, seed=1)
    upstream = torch.randn(1151, generator=torch.Generator().manual_seed(2))
    x = logit.to(device, copy=True).requires_grad_(True)
    loss, _, _ = ratio_weighting(x, label.to(device), w.to(device), "dijs")
    (got,) = torch.autograd.grad(loss, x, upstream.to(device))
    ref = logit.double().requires_grad_(True)
    ref_loss = torch.nn.functional.binary_cross_entropy_with_logits(ref, label.double(), reduction="none")
    (want,) = torch.autograd.grad(ref_loss, ref, upstream.double())
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite_and_exact(dtype):
    logit = torch.tensor([-1000.0, -80.0, -20.0, 0.0, 20.0, 80.0, 1000.0], dtype=dtype)
    label = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    w = torch.ones(7)
    for objective in OBJECTIVE_CODES:
        loss, dlogit, scale = ratio_weighting(logit, label, w, objective, 5.0)
        assert all(torch.isfinite(t).all() for t in (loss, dlogit, scale)), objective
    loss, dlogit, scale = ratio_weighting(logit, label, w, "dijs")
    assert loss[1].item() == pytest.approx(80.0) and loss[5].item() == pytest.approx(80.0)  # -log sigmoid(-80)
    assert dlogit[0].item() == -1.0 and dlogit[6].item() == 1.0 and scale[6].item() == -1.0


def test_shape_checks_name_the_argument():
    logit, label, w = _inputs(5, torch.float32)
    with pytest.raises(ValueError, match="label"):
        ratio_weighting(logit, label[:4], w, "dijs")
    with pytest.raises(ValueError, match="objective"):
        ratio_weighting(logit, label, w, "wgan")
    with pytest.raises(ValueError, match="logit"):
        ratio_weighting(logit.reshape(5, 1), label, w, "dijs")


def test_opcheck():
    logit, label, w = _inputs(37, torch.float32)
    torch.library.opcheck(torch.ops.fastratio.ratio_weighting.default, (logit.requires_grad_(True), label, w, 1, 2.0))


def test_compiles_without_graph_break():
    logit, label, w = _inputs(300, torch.float32, seed=3)

    def f(l, y, ws):
        loss, _, scale = ratio_weighting(l, y, ws, "dijs")
        return loss.mean() + scale.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logit, label, w), f(logit, label, w))


def test_dirm_weight_keeps_relative_accuracy_at_large_logits():
    """sigmoid(-l) for l up to 60: 1 - sigmoid(l) in fp32 cancels to 0 beyond l ~ 17 (47% off at 16)."""
    logit = torch.tensor([5.0, 16.0, 17.0, 25.0, 40.0, 60.0])
    _, _, scale = ratio_weighting(logit, torch.zeros(6), torch.ones(6), "dirm")
    want = -torch.sigmoid(-logit.double())
    torch.testing.assert_close(scale.double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("objective", ["dijs", "dirm", "be", "ls", "sba"])
def test_a_nan_logit_stays_nan(objective):
    """The divergence guard must see a NaN: clamping it to the bound would hide it (PTX min.f32)."""
    logit = torch.tensor([float("nan"), 1.0])
    loss, _, scale = ratio_weighting(logit, torch.ones(2), torch.ones(2), objective, 5.0)
    assert torch.isnan(scale[0]) and torch.isnan(loss[0]) and torch.isfinite(scale[1])
    _, _, scale = ratio_weighting(torch.tensor([1.0]), torch.ones(1), torch.ones(1), "sba", float("nan"))
    assert torch.isnan(scale[0])


def test_launcher_errors_name_the_argument(monkeypatch):
    logit = torch.zeros(3)
    with pytest.raises(ValueError, match="label: dtype torch.complex64 not supported"):
        ratio_weighting(logit, torch.zeros(3, dtype=torch.complex64), torch.ones(3), "dijs")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="logit: on cpu; the Triton kernels need a CUDA device, or TRITON_INTERPRET=1"):
        ratio_weighting(logit, torch.zeros(3), torch.ones(3), "dijs")
