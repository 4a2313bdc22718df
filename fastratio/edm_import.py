"""Load NVlabs/edm and NVlabs/edm2 snapshots (``network-snapshot-*.pkl``, the released ``edm-*.pkl`` and
``edm2-*.pkl``, EDM2's post-hoc EMA pickles) without running their code.

EDM's training loop pickles ``dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)``;
EDM2's ``dict(ema=net (fp16), loss_fn=..., encoder=..., dataset_kwargs=...)``, and its
``reconstruct_phema.py`` writes the same layout.
Each EDM class (``torch_utils.persistence``) is stored as a call ``_reconstruct_persistent_obj(meta)``
whose ``meta`` holds the class name, the *source code of its whole module* (which EDM's loader
exec()s) and the object's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``).
Plain ``torch.nn`` containers (the UNets' ``ModuleDict``) come through ``NEWOBJ`` (or
``copyreg._reconstructor`` at protocols 0-1) plus ``BUILD``; tensors through
``torch._utils._rebuild_tensor_v2`` over storages that are small legacy ``torch.save`` archives
(``torch.storage._load_from_bytes``).

``fastratio.safe_pickle`` runs the pickle with handlers that only record data: the module source
stays a string, storages are read by ``torch.load(weights_only=True)``, and every other name is
refused. The record tree is then checked (types, depth, cycles, sizes) and becomes constructor
kwargs plus a flat state_dict that ``fastratio.networks.unet`` loads strictly. Supported:
``EDMPrecond`` over DDPM++/NCSN++ (``SongUNet``) or ADM (``DhariwalUNet``), which covers every
released ``edm-*`` network, the ``VPPrecond``/``VEPrecond`` baselines, and EDM2's ``Precond`` over its
magnitude-preserving ``UNet`` (every ``edm2-img512-*``/``edm2-img64-*`` network; fp16 weights load
into fp32). ``iDDPMPrecond`` (learned variance, discrete noise levels) is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import safe_pickle
from .errors import UserError
from .networks.denoisers import PRECONDS, build_denoiser

_MAX_DEPTH = 64  # module nesting and kwargs nesting; EDM's deepest is about 5
_CONTAINERS = ("ModuleDict", "ModuleList", "Sequential")


class PersistentRecord(safe_pickle.Record):
    """An EDM persistent object as data: class name, source text (never run), state."""

    def __init__(self, meta: Any):
        if type(meta) is not dict or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
            raise safe_pickle.UnsafePickleError("unexpected persistence record")
        self.class_name = meta["class_name"]
        self.module_src = meta.get("module_src")
        self.state = meta.get("state") if meta.get("state") is not None else {}


class ModuleRecord(safe_pickle.Record):
    """A plain torch.nn container rebuilt as a bare record of its ``__dict__``."""

    def __init__(self, class_name: str):
        self.class_name, self.state = class_name, {}

    def build(self, state: Any) -> ModuleRecord:
        if type(state) is not dict:
            raise safe_pickle.UnsafePickleError(f"{self.class_name} state is a {type(state).__name__}, not a dict")
        self.state = state
        return self


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)


def _handlers() -> safe_pickle.Handlers:
    table: safe_pickle.Handlers = {**safe_pickle.NUMPY_HANDLERS, **safe_pickle.TORCH_HANDLERS}
    table[("torch_utils.persistence", "_reconstruct_persistent_obj")] = PersistentRecord
    table[("dnnlib.util", "EasyDict")] = _plain_dict
    for name in _CONTAINERS:
        table[("torch.nn.modules.container", name)] = lambda *args, _name=name: ModuleRecord(_name)
    return table


def _collect(root: PersistentRecord, path: Path) -> dict[str, torch.Tensor]:
    """Flatten a record tree into state_dict entries (parameters, persistent buffers), without
    recursion; refuses cycles, depth beyond _MAX_DEPTH and anything that is not a record or tensor."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    todo: list[tuple[Any, str, int]] = [(root, "", 0)]
    while todo:
        node, prefix, depth = todo.pop()
        where = prefix.rstrip(".") or "the network"
        if not isinstance(node, PersistentRecord | ModuleRecord):
            raise UserError(f"{path}: {where} is a {type(node).__name__}, not a module")
        if id(node) in seen:
            raise UserError(f"{path}: {where} appears twice in the module tree (shared or cyclic modules)")
        if depth > _MAX_DEPTH:
            raise UserError(f"{path}: module tree deeper than {_MAX_DEPTH} levels")
        seen.add(id(node))
        state = node.state
        if type(state) is not dict:
            raise UserError(f"{path}: {where} has no module state")
        skip = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, set | frozenset):
            raise UserError(f"{path}: {where}._non_persistent_buffers_set is not a set")
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if type(entries) is not dict:
                raise UserError(f"{path}: {where}.{group} is not a dict")
            for name, value in entries.items():
                if value is None or name in skip:
                    continue
                if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                    raise UserError(f"{path}: {where}.{group} holds a {type(value).__name__} under {str(name)[:40]!r}")
                out[prefix + name] = value
        children = state.get("_modules") or {}
        if type(children) is not dict:
            raise UserError(f"{path}: {where}._modules is not a dict")
        for name, child in reversed(list(children.items())):
            if not isinstance(name, str):
                raise UserError(f"{path}: {where}._modules has a non-string key")
            if child is not None:
                todo.append((child, f"{prefix}{name}.", depth + 1))
    return out


def _plain(value: Any, path: Path, depth: int = 0) -> Any:
    """Built-in types only (dict subclasses, tuples converted), so the kwargs can be saved in a
    weights_only checkpoint; depth-bounded, so cyclic or absurdly nested kwargs stop with one line."""
    if depth > 8:
        raise UserError(f"{path}: network constructor kwargs nested deeper than 8 levels")
    if isinstance(value, dict):
        return {str(k): _plain(v, path, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) > 64:
            raise UserError(f"{path}: a network constructor kwarg holds a list of {len(value)} items")
        return [_plain(v, path, depth + 1) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise UserError(f"{path}: network constructor kwargs hold a {type(value).__name__}")


def _describe_keys(data: dict) -> str:
    return ", ".join(repr(k)[:40] for k in list(data)[:8]) + (" ..." if len(data) > 8 else "")


def _precond_name(net: PersistentRecord) -> str:
    """fastratio's name for the pickled class: EDM's class names as they are; EDM2's ``Precond`` (a
    name EDM does not use) over a ``UNet`` record is ``EDM2Precond``."""
    unet = (net.state.get("_modules") or {}).get("unet") if type(net.state) is dict else None
    if net.class_name == "Precond" and isinstance(unet, PersistentRecord) and unet.class_name == "UNet":
        return "EDM2Precond"
    return net.class_name


def read_edm_pickle(path: str | Path, key: str = "ema") -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(class name, constructor kwargs, state_dict) of ``data[key]`` in an EDM or EDM2 pickle; runs no
    code. The class name is fastratio's (``EDM2Precond`` for EDM2's ``Precond``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher.checkpoint: {path} not found")
    try:
        with path.open("rb") as f:
            data = safe_pickle.load(f, _handlers(), str(path))
    except safe_pickle.MalformedPickleError as err:
        raise UserError(f"{path}: not a readable EDM pickle ({str(err).removeprefix(f'{path}: ')})") from None
    except safe_pickle.UnsafePickleError as err:
        raise UserError(str(err)) from None
    except (OSError, RuntimeError, MemoryError) as err:  # unreadable file, or torch refusing a storage payload
        raise UserError(f"{path}: not a readable EDM pickle ({type(err).__name__}: {str(err)[:160]})") from None
    if type(data) is not dict:
        raise UserError(f"{path}: not an EDM snapshot (a {type(data).__name__}, not a dict)")
    if not isinstance(data.get(key), PersistentRecord):
        raise UserError(f"{path}: no EDM network under {key!r} (keys: {_describe_keys(data)})")
    net = data[key]
    if net.state.get("_init_args"):
        raise UserError(f"{path}: {net.class_name} was built with positional args; expected EDM's keyword-only construction")
    kwargs = net.state.get("_init_kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"{path}: {net.class_name}._init_kwargs is not a dict of names")
    return _precond_name(net), _plain(kwargs, path), _collect(net, path)


def load_edm_denoiser(path: str | Path, key: str = "ema") -> torch.nn.Module:
    """The denoiser of an EDM or EDM2 pickle with every tensor loaded (strict, as fp32), in eval mode
    and frozen. ``init_kwargs`` holds its constructor kwargs (with ``precond`` unless EDMPrecond),
    which fastratio checkpoints store as ``network_kwargs``."""
    path = Path(path)
    class_name, kwargs, state = read_edm_pickle(path, key)
    if class_name not in PRECONDS:
        raise UserError(f"{path}: the network is EDM's {class_name}; supported teachers are {', '.join(PRECONDS)} (EDM2's Precond)")
    if class_name != "EDMPrecond":
        kwargs["precond"] = class_name
    stored = sum(t.numel() for t in state.values())
    try:
        with torch.device("meta"):  # the size the kwargs imply, without allocating it
            implied = sum(t.numel() for t in build_denoiser(kwargs).state_dict().values())
        if implied != stored:
            raise ValueError(f"the kwargs describe {implied:,} weights, the file holds {stored:,}")
        net = build_denoiser(kwargs)
        net.load_state_dict(state, strict=True)  # copies into the fp32 parameters (EDM2 stores fp16)
    except (TypeError, ValueError, RuntimeError, KeyError) as err:
        raise UserError(f"{path}: EDM network does not fit fastratio's {class_name} ({str(err).splitlines()[0][:200]})") from None
    net.init_kwargs = kwargs
    return net.eval().requires_grad_(False)
