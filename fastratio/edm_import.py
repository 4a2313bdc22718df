"""Load NVlabs/edm snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``) without running their code.

EDM pickles its networks with ``torch_utils.persistence``: each network object is stored as a call
``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the class name, the *source code of the
whole module* (which EDM's loader exec()s) and the object's ``__dict__`` (``_parameters``,
``_buffers``, ``_modules``, ``_init_kwargs``, ...). Plain ``torch.nn`` containers come through
``copyreg._reconstructor``; tensors through ``torch._utils._rebuild_tensor_v2`` over storages that
are themselves small legacy ``torch.save`` archives (``torch.storage._load_from_bytes``).

Here the unpickler resolves those names to inert stand-ins that only record data: the module source
is kept as a string and never executed, storages are read with ``torch.load(weights_only=True)``,
and any other global (``os.system``, ``builtins.eval``, an unknown class) is refused with an error
naming it. The result is the network's constructor kwargs and a flat state_dict, which
``fastratio.networks.unet.EDMPrecond`` loads strictly.
"""

from __future__ import annotations

import collections
import io
from pathlib import Path
from typing import Any

import torch

from . import safe_pickle
from .errors import UserError
from .networks.unet import EDMPrecond


class PersistentRecord:
    """What EDM's persistent object holds, as data: class name, source text (never run), state."""

    def __init__(self, meta: dict):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise safe_pickle.UnsafePickleError(f"unexpected persistence record {type(meta).__name__}")
        self.class_name = str(meta.get("class_name"))
        self.module_src = meta.get("module_src")
        self.state = meta.get("state") or {}


class ModuleRecord:
    """A plain torch.nn container (ModuleDict, ModuleList, Sequential) rebuilt as a bare record."""

    def __init__(self, class_name: str):
        self.class_name, self.state = class_name, {}

    def __setstate__(self, state: dict) -> None:
        self.state = state


_CONTAINERS = {"ModuleDict", "ModuleList", "Sequential"}


def _reconstructor(cls: Any, base: Any, state: Any) -> ModuleRecord:
    if not isinstance(cls, _ContainerClass) or base is not object:
        raise safe_pickle.UnsafePickleError(f"copyreg reconstruction of {cls!r} refused")
    return ModuleRecord(cls.name)


class _ContainerClass:
    def __init__(self, name: str):
        self.name = name


class EasyDict(dict):
    """dnnlib.EasyDict read as a plain dict."""


def _load_storage(raw: bytes) -> Any:
    return torch.load(io.BytesIO(raw), weights_only=True)


def _allowed() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = dict(safe_pickle.NUMPY_GLOBALS)
    table[("torch_utils.persistence", "_reconstruct_persistent_obj")] = PersistentRecord
    table[("copyreg", "_reconstructor")] = _reconstructor
    table[("builtins", "object")] = object
    table[("builtins", "set")] = set
    table[("collections", "OrderedDict")] = collections.OrderedDict
    table[("dnnlib.util", "EasyDict")] = EasyDict
    table[("torch.storage", "_load_from_bytes")] = _load_storage
    # torch's own tensor/parameter rebuilders: the ones its weights_only loader also allows.
    table[("torch._utils", "_rebuild_tensor_v2")] = torch._utils._rebuild_tensor_v2
    table[("torch._utils", "_rebuild_parameter")] = torch._utils._rebuild_parameter
    for name in _CONTAINERS:
        table[("torch.nn.modules.container", name)] = _ContainerClass(name)
    return table


def _collect(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Flatten a record tree into state_dict entries (parameters, persistent buffers)."""
    state = node.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is not None and name not in skip:
                out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out)


def read_edm_pickle(path: str | Path, key: str = "ema") -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(class name, constructor kwargs, state_dict) of ``data[key]`` in an EDM pickle; runs no code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher.checkpoint: {path} not found")
    try:
        with path.open("rb") as f:
            data = safe_pickle.load(f, _allowed(), str(path))
    except safe_pickle.UnsafePickleError as err:
        raise UserError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - truncated or foreign file
        raise UserError(f"{path}: not a readable EDM pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), PersistentRecord):
        raise UserError(f"{path}: no EDM network under {key!r} (keys: {sorted(data) if isinstance(data, dict) else type(data).__name__})")
    net = data[key]
    state: dict[str, torch.Tensor] = {}
    _collect(net, "", state)
    kwargs = dict(net.state.get("_init_kwargs") or {})
    if net.state.get("_init_args"):
        raise UserError(f"{path}: {net.class_name} was built with positional args; expected EDM's keyword-only construction")
    return net.class_name, kwargs, state


def _plain(value: Any) -> Any:
    """Built-in types only (numpy scalars, tuples, dict subclasses converted), so the kwargs can be
    saved in a weights_only checkpoint."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, torch.Tensor):
        return value.item()
    return value


def load_edm_denoiser(path: str | Path, key: str = "ema") -> EDMPrecond:
    """An EDMPrecond with every tensor of the pickle's network (strict: a missing or extra one is an error)."""
    class_name, kwargs, state = read_edm_pickle(path, key)
    if class_name != "EDMPrecond":
        raise UserError(f"{path}: network is {class_name}; only EDMPrecond (EDM's own preconditioning) is supported")
    kwargs = {str(k): _plain(v) for k, v in kwargs.items()}
    try:
        net = EDMPrecond(**kwargs)
        net.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise UserError(f"{path}: EDM network does not fit fastratio's EDMPrecond ({str(err).splitlines()[0]})") from None
    net.init_kwargs = kwargs
    return net
