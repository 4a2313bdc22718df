"""Image datasets in their published formats, loaded whole into one uint8 tensor [N, C, H, W].

Formats (``data.kind``):
  cifar10  the python release: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py``
           folder (pickled dicts of numpy arrays, read by fastratio.safe_pickle, not pickle.load)
  folder   an image folder or an EDM ``dataset_tool.py`` zip; labels from ``dataset.json``
           ({"labels": [[relative path, class], ...]}) when present
  idx      MNIST-family IDX files (``*-images-idx3-ubyte[.gz]``; labels from the sibling
           ``*-labels-idx1-ubyte[.gz]``)
  npz      ``images`` uint8 NHWC or NCHW and optional ``labels``: subsets carried to another machine
  digits   scikit-learn's 8x8 digits (needs scikit-learn), 0..16 rescaled to 0..255
Every problem (missing file, corrupt archive, mixed sizes, bad labels) is a UserError naming the file.
Small datasets (CIFAR-10 is 150 MB as uint8) live on the training device and batches are drawn by
index there, with no loader processes and no host round trip.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import safe_pickle
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a label beyond this is a corrupt file, not a class
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192: refuse decompression bombs before decoding
MAX_MEMBER_BYTES = 1 << 30  # one archive member (a CIFAR-10 batch is 31 MB, an image a few MB)
DATASET_KINDS = ("cifar10", "folder", "idx", "npz", "digits")
_WHERE = {
    "cifar10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and set data.path to it",
    "folder": "set data.path to a folder of images or an EDM dataset_tool.py zip",
    "idx": "set data.path to an *-images-idx3-ubyte(.gz) file (Fashion-MNIST: Debian package dataset-fashion-mnist)",
    "npz": "set data.path to an .npz with an 'images' array",
}


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor | None  # int64 [N] in [0, num_classes), None when the source has none
    num_classes: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def _finish(images: np.ndarray, labels: np.ndarray | None, source: str) -> ImageData:
    if images.shape[0] == 0:
        raise UserError(f"{source}: dataset is empty")
    images_t = torch.from_numpy(np.array(images, order="C"))  # a writable copy (IDX arrays are read-only views)
    if labels is None:
        return ImageData(images_t, None, 0, source)
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise UserError(f"{source}: {labels.shape[0] if labels.ndim else 0} labels for {images.shape[0]} images")
    if not np.issubdtype(labels.dtype, np.integer) or (labels < 0).any():
        raise UserError(f"{source}: labels must be non-negative integers (got {labels.dtype}, min {labels.min()})")
    if labels.max() >= MAX_CLASSES:
        raise UserError(f"{source}: label {labels.max()} implies {labels.max() + 1} classes; at most {MAX_CLASSES} are supported")
    return ImageData(images_t, torch.from_numpy(labels.astype(np.int64)), int(labels.max()) + 1, source)


# -- CIFAR-10 -------------------------------------------------------------------------------------
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = safe_pickle.load(raw, safe_pickle.NUMPY_HANDLERS, name, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except safe_pickle.MalformedPickleError as err:
        raise UserError(f"{name}: not a CIFAR-10 python batch ({str(err).removeprefix(f'{name}: ')})") from None
    except safe_pickle.UnsafePickleError as err:
        raise UserError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - any decoding failure is a corrupt batch
        raise UserError(f"{name}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from None
    return data, labels


def load_cifar10(path: Path, split: str) -> ImageData:
    members: dict[str, bytes] = {}
    if path.is_dir():
        root = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
        for name in _CIFAR_BATCHES[split]:
            if not (root / name).is_file():
                raise UserError(f"{root / name}: CIFAR-10 batch missing")
            members[name] = (root / name).read_bytes()
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                by_name = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                for name in _CIFAR_BATCHES[split]:
                    if name not in by_name:
                        raise UserError(f"{path}: no {name} inside (is this cifar-10-python.tar.gz?)")
                    if by_name[name].size > MAX_MEMBER_BYTES:
                        raise UserError(f"{path}: {name} claims {by_name[name].size} bytes; a CIFAR-10 batch is 31 MB")
                    members[name] = tar.extractfile(by_name[name]).read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            raise UserError(f"{path}: corrupt or unreadable tarball ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    parts = [_cifar_batch(raw, f"{path}:{name}") for name, raw in members.items()]
    return _finish(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), str(path))


# -- image folder / zip ---------------------------------------------------------------------------
def _claimed_size(raw: bytes) -> str:
    """The size a PNG header claims, for the error message (Pillow refuses before reporting it)."""
    ihdr = raw.find(b"IHDR")
    return f"{int.from_bytes(raw[ihdr + 4 : ihdr + 8], 'big')}x{int.from_bytes(raw[ihdr + 8 : ihdr + 12], 'big')}" if ihdr >= 0 else "too many"


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes for 16-bit grey PNGs


def _decode_image(raw: bytes, name: str) -> np.ndarray:
    """uint8 [C, H, W], C 1 or 3. 16-bit grey images are scaled to 8 bits (v * 255 / 65535, rounded),
    not clipped; palette, alpha and CMYK images become RGB."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{name}: {img.width}x{img.height} pixels is more than an image dataset holds (decompression bomb?)")
            img.load()
            if img.mode in _SIXTEEN_BIT:
                wide = np.asarray(img).astype(np.int64)
                if wide.min() < 0 or wide.max() > 65535:
                    raise UserError(f"{name}: {img.mode} pixel values outside 0..65535")
                arr = ((wide * 255 + 32767) // 65535).astype(np.uint8)
            else:
                if img.mode not in ("L", "RGB"):
                    img = img.convert("L" if img.mode == "1" else "RGB")
                arr = np.asarray(img)
    except UserError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, before ours when the claim is extreme
        raise UserError(f"{name}: {_claimed_size(raw)} pixels is more than an image dataset holds (decompression bomb?)") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"{name}: cannot decode image ({type(err).__name__})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _folder_labels(meta: bytes | None, names: list[str], source: str) -> np.ndarray | None:
    if meta is None:
        return None
    try:
        entries = json.loads(meta)["labels"]
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        raise UserError(f"{source}/dataset.json: expected {{'labels': [[path, class], ...]}} ({type(err).__name__})") from None
    if entries is None:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in entries):
        raise UserError(f"{source}/dataset.json: 'labels' must be a list of [path, class] pairs (EDM's dataset_tool.py layout)")
    table = {k.replace("\\", "/"): v for k, v in entries}
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f"{source}/dataset.json: no label for {missing[0]} ({len(missing)} images unlabeled)")
    labels = [table[n] for n in names]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        raise UserError(f"{source}/dataset.json: labels must be integer class indices")
    return np.asarray(labels, dtype=np.int64)


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_MEMBER_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes is not an image")
    return path.read_bytes()


def _read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """One zip member, its CRC checked, refusing encrypted members, unknown compression and sizes no
    image has (a zip bomb's member claims what it inflates to; the read stops at the claimed size)."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise UserError(f"{path}/{name}: encrypted zip member")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UserError(f"{path}/{name}: zip compression method {info.compress_type} is not stored or deflate")
    if info.file_size > MAX_MEMBER_BYTES:
        raise UserError(f"{path}/{name}: claims {info.file_size} bytes uncompressed")
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as err:
        raise UserError(f"{path}/{name}: corrupt zip member ({type(err).__name__}: {str(err)[:80]})") from None


def load_folder(path: Path, max_images: int) -> ImageData:
    if path.is_dir():
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        read = lambda name: _read_file(path / name)
        meta = _read_file(path / "dataset.json") if (path / "dataset.json").exists() else None
        archive = None
    else:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise UserError(f"{path}: not a readable zip ({err})") from None
        names = set(archive.namelist())
        files = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)
        read = lambda name: _read_member(archive, name, path)
        meta = read("dataset.json") if "dataset.json" in names else None
    try:
        labels = _folder_labels(meta, files, str(path))
        if max_images:
            files = files[:max_images]
            labels = None if labels is None else labels[:max_images]
        images = []
        for name in files:
            arr = _decode_image(read(name), f"{path}/{name}")
            if images and arr.shape != images[0].shape:
                raise UserError(f"{path}/{name}: image shape {arr.shape} differs from {images[0].shape} of {files[0]}")
            images.append(arr)
    finally:
        if archive is not None:
            archive.close()
    if not images:
        raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return _finish(np.stack(images), labels, str(path))


# -- IDX ------------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX array (MNIST format: zero bytes, type code, rank, big-endian dims, data); .gz allowed.
    Reads exactly what the header promises (a .gz is inflated no further), so a decompression bomb
    or a lying header stops with one line."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic {head.hex()})")
            rank = head[3]
            if not 1 <= rank <= 4:
                raise UserError(f"{path}: IDX rank {rank}; image files have rank 3 and label files rank 1")
            raw_dims = f.read(4 * rank)
            dims = tuple(int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(rank))
            size = math.prod(dims)
            if len(raw_dims) < 4 * rank or size > MAX_MEMBER_BYTES * 16:
                raise UserError(f"{path}: IDX header claims {dims}, more than any image set here")
            raw = f.read(size)
            extra = len(f.read(1))
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {str(err)[:80]})") from None
    if len(raw) != size or extra:
        raise UserError(f"{path}: header says {dims} ({size} bytes) but {'fewer' if len(raw) < size else 'more'} follow")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def load_idx(path: Path) -> ImageData:
    images = read_idx(path)
    if images.ndim != 3:
        raise UserError(f"{path}: expected a rank-3 image array [N, H, W], got rank {images.ndim}")
    label_path = path.with_name(path.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1"))
    labels = read_idx(label_path) if label_path != path and label_path.is_file() else None
    return _finish(images[:, None], labels, str(path))


# -- npz / digits ---------------------------------------------------------------------------------
def _check_npy_header(path: Path) -> None:
    """The images array's header must describe exactly the bytes stored (a crafted header claiming
    10^12 elements would otherwise be an allocation failure)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "images.npy" not in archive.namelist():
                return  # named in load_npz's own error
            info = archive.getinfo("images.npy")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                header = f.tell() if f.seekable() else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"{path}: not a readable .npz ({type(err).__name__}: {str(err)[:80]})") from None
    need = math.prod(shape) * dtype.itemsize
    if header is not None and need != info.file_size - header:
        raise UserError(f"{path}: images header says {shape} {dtype} ({need} bytes) but {info.file_size - header} are stored")


def load_npz(path: Path) -> ImageData:
    _check_npy_header(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
            labels = f.get("labels", None)
    except KeyError:
        raise UserError(f"{path}: no 'images' array") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as err:
        raise UserError(f"{path}: not a readable .npz ({type(err).__name__}: {str(err)[:80]})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"{path}: 'images' must be uint8 [N, H, W(, C)] or [N, C, H, W], got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    return _finish(images, labels, str(path))


def load_digits() -> ImageData:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise UserError("data.kind=digits needs scikit-learn (pip install scikit-learn)") from None
    digits = sk_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return _finish(images, digits.target.astype(np.int64), "sklearn digits")


def load_dataset(kind: str, path: str, split: str = "train", max_images: int = 0) -> ImageData:
    """Load a whole dataset; ``max_images`` > 0 keeps the first that many."""
    if kind == "digits":
        data = load_digits()
    else:
        p = Path(path).expanduser()
        if not path or not p.exists():
            raise UserError(f"data.path: {path or '(empty)'} not found; {_WHERE[kind]}")
        if not (p.is_file() or p.is_dir()):
            raise UserError(f"data.path: {path} is not a regular file or folder (a device or pipe is not a dataset)")
        loaders = {"cifar10": lambda: load_cifar10(p, split), "folder": lambda: load_folder(p, max_images), "idx": lambda: load_idx(p), "npz": lambda: load_npz(p)}
        data = loaders[kind]()
    if max_images and data.images.shape[0] > max_images:
        data.images = data.images[:max_images]
        data.labels = None if data.labels is None else data.labels[:max_images]
    return data
