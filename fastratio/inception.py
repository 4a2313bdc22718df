"""torch-fidelity's FID Inception, and the weights file handed to it, checked as data first.

torch-fidelity loads ``feature_extractor_weights_path`` with ``torch.load(weights_only=False)``: a
crafted ``.pth`` would run code. So a user's weights file never reaches it. ``checked_weights`` reads
the file with ``torch.load(weights_only=True)``, requires exactly the tensors of torch-fidelity's
network (names, shapes, floating or integer as there), and writes them to a private temporary folder
(mode 0700, removed at exit) from which torch-fidelity loads a file this process wrote.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .atomic import write_errors_as_os_errors
from .errors import UserError, os_error

INCEPTION = "inception-v3-compat"
_CHECKED: dict[tuple, str] = {}  # (resolved path, size, mtime) -> the private copy


def inception_skeleton() -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with untouched random weights (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # the constructor's load is skipped
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Skeleton(INCEPTION, ["2048"], feature_extractor_weights_path=str(empty))


def _private_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="fastratio-"))  # mkdtemp: 0700, this user only
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def checked_weights(path: str, what: str = "--inception") -> str:
    """Path of a validated private copy of the Inception weights at ``path`` (see module doc)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what}: {path} not found (make one with python -m fastratio.tools.convert_inception)")
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return _CHECKED[key]
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - anything torch refuses to read as data
        raise UserError(f"{what}: {path} is not a weights file readable as data ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    want = inception_skeleton().state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{what}: {path} is not a dict of tensors")
    missing, extra = [k for k in want if k not in state], [str(k) for k in state if k not in want]
    if missing or extra:
        raise UserError(f"{what}: {path} is not torch-fidelity's Inception ({len(missing)} tensors missing, e.g. {missing[:1]}; "
                        f"{len(extra)} unexpected, e.g. {extra[:1]})")
    for name, ref in want.items():
        got = state[name]
        if got.shape != ref.shape or got.is_floating_point() != ref.is_floating_point():
            raise UserError(f"{what}: {path}: {name} is {got.dtype} {tuple(got.shape)}, expected {ref.dtype} {tuple(ref.shape)}")
    copy = _private_dir() / "inception.pth"
    try:
        with write_errors_as_os_errors():
            torch.save({k: state[k].to(ref.dtype).contiguous() for k, ref in want.items()}, copy)
    except OSError as err:
        raise os_error(f"{what}: cannot write the checked copy {copy}", err) from None
    _CHECKED[key] = str(copy)
    return str(copy)


def default_weights() -> str:
    """torch-fidelity's own Inception weights, checked like a user's file: torch-fidelity would load its
    torch-hub cache copy with weights_only=False, so a file planted there would run. Downloaded (with
    torch.hub's SHA-256 prefix check) when not cached."""
    import re
    from urllib.parse import urlparse

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    name = Path(urlparse(URL_INCEPTION_V3).path).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        prefix = re.search(r"-([a-f0-9]+)\.", name)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), hash_prefix=prefix.group(1) if prefix else None, progress=False)
        except Exception as err:  # noqa: BLE001 - offline, proxy, hash mismatch
            raise UserError(f"cannot download torch-fidelity's Inception weights ({type(err).__name__}); offline, give --inception / "
                            "eval.inception (python -m fastratio.tools.convert_inception)") from None
    return checked_weights(str(cached), "torch-fidelity's cached Inception weights")


def private_cache_dir() -> str:
    """A folder for torch-fidelity's feature cache that only this process writes (it reads its cache back
    with torch.load(weights_only=False), so the cache must never live in a run folder)."""
    return str(_private_dir())
