"""Hugging Face components (diffusers, transformers) loaded as data: local files only, safetensors only.

Every loader here reads a folder (or a Hugging Face cache entry, resolved without the network) and
refuses what would run code: pickled weights (``*.bin``, ``*.ckpt``, ``*.pt``: the libraries would
unpickle them), custom pipelines or tokenizers (``auto_map``/``trust_remote_code``). Configs are JSON,
bounded in size and checked before a library builds anything from them. Failures are one UserError
line naming the config key and the file.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

from .errors import UserError

_REPO = Path(__file__).resolve().parents[1]
_PICKLED = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MAX_CONFIG_BYTES = 1 << 20


def _unshadow_kernels(repo: Path = _REPO) -> None:
    """transformers >= 5 imports Hugging Face's ``kernels`` package. Run from this repository's root (as
    ``python -m`` and pytest put it on sys.path), Python would find the repository's own ``kernels/``
    folder (shipped as ``fastratio.kernels``) under that name; import the installed package instead, from
    the sys.path entries outside the repository, and drop the folder if something imported it as such."""
    def in_repo(origin) -> bool:  # a checkout's own files; a virtual environment inside it is not
        path = Path(origin or ".").resolve()
        return path.is_relative_to(repo) and not {"site-packages", "dist-packages"} & set(path.parts)

    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if not getattr(loaded, "__file__", None) or not in_repo(loaded.__file__):
            return
        del sys.modules["kernels"]
    spec = importlib.util.find_spec("kernels")
    if spec is None or not spec.origin or not in_repo(spec.origin):
        return
    path = [p for p in sys.path if not in_repo(p)]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    if spec is None:  # not installed: nothing will import it
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    spec.loader.exec_module(module)


def import_diffusers(key: str, extra: str = "sd"):
    """The diffusers module, quiet, or one line naming ``key`` and the extra to install. With
    ``extra="sd"`` transformers is required too (the text encoder and tokenizer)."""
    _unshadow_kernels()
    try:
        import diffusers

        if extra == "sd":
            import transformers
    except ImportError as err:
        raise UserError(f"{key}: needs {err.name or 'diffusers'} (pip install -e \".[{extra}]\")") from None
    # Their notices (no `accelerate`, ...) and per-file progress bars are not the user's business.
    diffusers.utils.logging.set_verbosity_error()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    return diffusers


def resolve_folder(name_or_path: str, key: str) -> Path:
    """A local folder, or a Hugging Face cache entry (``org/name``) resolved offline."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{key}: {name_or_path} is a file; give the model's folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - hub errors have no common base below Exception
        raise UserError(f"{key}: {name_or_path} is neither a folder nor in the Hugging Face cache "
                        f"({type(err).__name__}); download it on a machine with internet and give its folder") from None


def read_config(file: Path, key: str) -> dict:
    """A component's JSON config, bounded; a folder that asks for custom code is refused."""
    if not file.is_file():
        raise UserError(f"{key}: {file} not found (an SD folder holds unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"{key}: {file} is {file.stat().st_size} bytes, not a config")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{key}: {file} is not JSON ({str(err).splitlines()[0][:80]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {file} holds a {type(data).__name__}, not a config object")
    if "auto_map" in data:
        raise UserError(f"{key}: {file} asks for custom code (auto_map); fastratio runs no code from model folders")
    return data


def check_weights(folder: Path, key: str) -> None:
    """Safetensors present; a folder with only pickled weights is refused unread."""
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLED) if folder.is_dir() else []
    if pickled:
        raise UserError(f"{key}: {folder / pickled[0]} is a pickle, which would run code when loaded; "
                        "convert it to safetensors (save_pretrained(..., safe_serialization=True)) on a trusted machine")
    raise UserError(f"{key}: no .safetensors weights in {folder}")


def load_component(cls, folder: Path, key: str, **kwargs):
    """``cls.from_pretrained(folder)`` with local files and safetensors only, after the checks above."""
    read_config(folder / "config.json", key)
    check_weights(folder, key)
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise UserError(f"{key}: cannot load {cls.__name__} from {folder} ({str(err).splitlines()[0][:120]})") from None
