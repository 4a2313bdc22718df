"""Helpers shared by the tests: bytes of real file formats, compile-vs-eager parity, and the GPU marks."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image


def _no_gpu_reason() -> str:
    if not torch.cuda.is_available():
        return "no CUDA"
    # tests/conftest.py turns Triton's interpreter on; it would run the kernels on host copies of the
    # CUDA tensors, so a pass would say nothing about the compiled kernels.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: run the GPU tests as TRITON_INTERPRET=0 python -m pytest -m gpu"
    return ""


# The checks only a GPU can make (bench/gpu_check.py runs `-m gpu`); skipped elsewhere with the reason.
_NO_GPU = _no_gpu_reason()
GPU = (pytest.mark.gpu, pytest.mark.skipif(bool(_NO_GPU), reason=_NO_GPU or "-"))
# A test run on the CPU (under the interpreter) and, with the GPU marks, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=GPU)]


def on_gpu(test):
    """Decorator: the GPU marks on a test."""
    for mark in GPU:
        test = mark(test)
    return test


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """An IDX file (MNIST format): two zero bytes, type code (0x08 unsigned byte), rank, big-endian dims, data."""
    return bytes([0, 0, code, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def assert_compiles_like_eager(f, x: torch.Tensor) -> None:
    """f(x) -> scalar under torch.compile(fullgraph=True) (no graph break allowed) equals eager, value and grad."""
    x_eager, x_compiled = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = f(x_eager)
    want.backward()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x_compiled)
    got.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)


def tiny_features(images: torch.Tensor, dim: int) -> torch.Tensor:
    """dim fixed random projections of 4x4-pooled pixels: cheap features with real image statistics
    (tests/fixtures/edm2/make_fixtures.py gave EDM2's statistics code the same 16-dim one)."""
    proj = torch.randn(48, dim, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1) @ proj.to(images.device)


def tiny_feature_extractor(dim: int, logits: int = 0) -> str:
    """Register ``tiny_features`` of width dim with torch-fidelity (the Inception weights are not in CI); returns its name.
    With ``logits``, also that many class logits (``logits_unbiased``: the Inception Score's input)."""
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class Extractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):  # torch-fidelity passes its whole kwargs along
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("feat", "logits_unbiased") if logits else ("feat",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "logits_unbiased" if metric == "isc" else "feat"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            found = {"feat": lambda: tiny_features(x, dim), "logits_unbiased": lambda: 20 * tiny_features(x, logits)}
            return tuple(found[name]() for name in self.features_list)

    name = f"fastratio-tiny{dim}" + (f"-isc{logits}" if logits else "")
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(name, Extractor)
    return name
