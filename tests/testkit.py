"""Helpers shared by the tests: bytes of real file formats, and compile-vs-eager parity."""

import io

import numpy as np
import torch
from PIL import Image


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
