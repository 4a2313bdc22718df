"""Image datasets in their published formats, loaded whole into one uint8 tensor [N, C, H, W].

Formats (``data.kind``):
  cifar10  the python release: ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py``
           folder (pickled dicts of numpy arrays, read by fastratio.safe_pickle, not pickle.load)
  folder   an image folder or an EDM ``dataset_tool.py`` zip; labels from ``dataset.json``
           ({"labels": [[relative path, class], ...]}) when present
  idx      MNIST-family IDX files (``*-images-idx3-ubyte[.gz]``; labels from the sibling
           ``*-labels-idx1-ubyte[.gz]``)
  npz      ``images`` uint8 NHWC or NCHW and optional ``labels``: subsets carried to another machine
  digits   scikit-learn's 8x8 digits (needs scikit-learn), 0..16 rescaled to 0..255; split train = the
           first 1,437, test = the last 360
Every problem (missing file, corrupt archive, mixed sizes, bad labels) is a UserError naming the file.
Small datasets (CIFAR-10 is 150 MB as uint8) live on the training device and batches are drawn by
index there, with no loader processes and no host round trip.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import struct
import tarfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import safe_pickle
from ..errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; a label beyond this is a corrupt file, not a class
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192: refuse decompression bombs before decoding
MAX_MEMBER_BYTES = 1 << 30  # one archive member (a CIFAR-10 batch is 31 MB, an image a few MB)
_READ_CHUNK = 1 << 26  # bytes read at once where a header's claim is not yet backed by data
DATASET_KINDS = ("cifar10", "folder", "idx", "npz", "digits")
_WHERE = {
    "cifar10": "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and set data.path to it",
    "folder": "set data.path to a folder of images or an EDM dataset_tool.py zip",
    "idx": "set data.path to an *-images-idx3-ubyte(.gz) file (Fashion-MNIST: Debian package dataset-fashion-mnist)",
    "npz": "set data.path to an .npz with an 'images' array",
    "prompts": "set data.path to a .txt (one prompt a line) or .jsonl file",
    "pairs": "set data.path to a folder of WebDataset .tar shards, one .tar, or a pattern like shards/{00000..00009}.tar",
}


@dataclass
class ImageData:
    images: torch.Tensor  # uint8 [N, C, H, W]; float raw latents [N, 2C, h, w] for an EDM2 latent set
    labels: torch.Tensor | None  # int64 [N] in [0, num_classes), None when the source has none
    num_classes: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


def check_labels(labels: np.ndarray, count: int, source: str) -> tuple[np.ndarray, int]:
    """(labels as int64, the class count): one integer class index in [0, MAX_CLASSES) for each of
    ``count`` items. The memory source (``_finish``) and the stream source both refuse labels through
    this one check. An object array of Python ints (dataset.json's, which may exceed int64) is bounded
    before it is converted."""
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise UserError(f"{source}: {labels.shape[0] if labels.ndim else 0} labels for {count} images")
    exact = labels.dtype == object and all(type(v) is int for v in labels.tolist())
    if not (np.issubdtype(labels.dtype, np.integer) or exact):
        raise UserError(f"{source}: labels must be non-negative integers (got {labels.dtype})")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise UserError(f"{source}: labels must be non-negative integers (got {labels.dtype if not exact else 'int'}, min {low})")
    if high >= MAX_CLASSES:
        raise UserError(f"{source}: label {high} implies {high + 1} classes; at most {MAX_CLASSES} are supported")
    return labels.astype(np.int64), high + 1


def _finish(images: np.ndarray, labels: np.ndarray | None, source: str) -> ImageData:
    if images.shape[0] == 0:
        raise UserError(f"{source}: dataset is empty")
    images_t = torch.from_numpy(np.array(images, order="C"))  # a writable copy (IDX arrays are read-only views)
    if labels is None:
        return ImageData(images_t, None, 0, source)
    labels, classes = check_labels(labels, images.shape[0], source)
    return ImageData(images_t, torch.from_numpy(labels), classes, source)


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


@contextmanager
def open_image(raw: bytes, name: str):
    """``raw`` as a PIL image, not yet decoded, refused above MAX_IMAGE_PIXELS (a decompression bomb
    claims its size in the header); any failure inside the block is one UserError naming ``name``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{name}: {img.width}x{img.height} pixels is more than an image dataset holds (decompression bomb?)")
            yield img
    except UserError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, before ours when the claim is extreme
        raise UserError(f"{name}: {_claimed_size(raw)} pixels is more than an image dataset holds (decompression bomb?)") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"{name}: cannot decode image ({type(err).__name__})") from None


def _decode_image(raw: bytes, name: str) -> np.ndarray:
    """uint8 [C, H, W], C 1 or 3. 16-bit grey images are scaled to 8 bits (v * 255 / 65535, rounded),
    not clipped; palette, alpha and CMYK images become RGB."""
    with open_image(raw, name) as img:
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
    return np.array(labels, dtype=object)  # JSON ints are unbounded (2**70): check_labels bounds them before int64


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    if path.stat().st_size > MAX_MEMBER_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes is not an image")
    return path.read_bytes()


def _check_member(info: zipfile.ZipInfo, path: Path) -> None:
    """Refuse encrypted members, unknown compression and sizes no image has (a zip bomb's member
    claims what it inflates to; reads stop at the claimed size)."""
    name = info.filename
    if info.flag_bits & 0x1:
        raise UserError(f"{path}/{name}: encrypted zip member")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UserError(f"{path}/{name}: zip compression method {info.compress_type} is not stored or deflate")
    if max(info.file_size, info.compress_size) > MAX_MEMBER_BYTES:
        raise UserError(f"{path}/{name}: claims {max(info.file_size, info.compress_size)} bytes "
                        f"{'uncompressed' if info.file_size > MAX_MEMBER_BYTES else 'compressed'}")


def _read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """One zip member through zipfile (its CRC checked), after ``_check_member``."""
    info = archive.getinfo(name)
    _check_member(info, path)
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as err:
        raise UserError(f"{path}/{name}: corrupt zip member ({type(err).__name__}: {str(err)[:80]})") from None


def _read_npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the ``.npy`` stream ``f``, which is left at the first data byte."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    return shape, dtype


_ARRAY_DTYPES = ("uint8", "float16", "float32", "float64")  # what torch holds: no float128, no complex


def _decode_array(raw: bytes, name: str, axes: str = "[C, H, W]") -> np.ndarray:
    """A ``.npy`` member (EDM2's latent datasets: one float32 [C, H, W] array per image; ``axes`` names
    another layout, such as a text embedding's [tokens, width]), read as data: ``allow_pickle=False``, and the header must describe exactly the bytes stored. Every source
    (memory, stream, latent-caption shards) decodes through here, so they read or refuse alike: a
    big-endian array comes back in native order (torch holds no other), and a dtype torch has no
    counterpart for (float128) or an empty array is refused from its header."""
    try:
        f = io.BytesIO(raw)
        shape, dtype = _read_npy_header(f)
        if dtype.hasobject or math.prod(shape) * dtype.itemsize != len(raw) - f.tell():
            raise ValueError(f"header says {shape} {dtype}, {len(raw) - f.tell()} bytes stored")
    except Exception as err:  # noqa: BLE001 - numpy raises many types for bad files
        raise UserError(f"{name}: cannot read .npy array ({type(err).__name__}: {str(err)[:80]})") from None
    if len(shape) != axes.count(",") + 1 or dtype.newbyteorder("=").name not in _ARRAY_DTYPES or 0 in shape:
        raise UserError(f"{name}: expected a {axes} array of {', '.join(_ARRAY_DTYPES)} with no empty axis, got {dtype.name} {shape}")
    arr = np.load(io.BytesIO(raw), allow_pickle=False)
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("="))


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, 22 bytes we do not need, name and extra lengths


class Archive:
    """The members of an image folder or an EDM/EDM2 ``dataset_tool.py`` zip (``00000/img00000000.png``
    or ``.npy`` latents, labels in ``dataset.json``), in sorted name order, read one at a time.

    The index is a few numpy arrays (names as fixed-width bytes, zip offsets, sizes, CRCs: ~60 bytes a
    member, ~80 MB for ImageNet) rather than Python objects: DataLoader workers fork with it and a
    numpy array's pages stay shared, where a list of strings or ``ZipInfo`` objects is copied into
    every worker page by page as reference counts change. Members are read with ``os.pread`` from a
    descriptor opened in each reading process (a descriptor inherited across a fork would do too,
    pread has no shared offset, but a pickled Archive carries none).
    """

    def __init__(self, path: Path, max_items: int = 0):
        self.path, self.is_zip = path, not path.is_dir()
        self._fd, self._pid = -1, -1
        if self.is_zip:
            try:
                with zipfile.ZipFile(path) as archive:
                    infos = {info.filename: info for info in archive.infolist() if not info.is_dir()}
                    meta = _read_member(archive, "dataset.json", path) if "dataset.json" in infos else None
            except (zipfile.BadZipFile, OSError) as err:
                raise UserError(f"{path}: not a readable zip ({err})") from None
            names = set(infos)
        else:
            names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
            meta = _read_file(path / "dataset.json") if "dataset.json" in names else None
        images = sorted(n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES)
        arrays = sorted(n for n in names if Path(n).suffix.lower() == ".npy")
        if images and arrays:
            raise UserError(f"{path}: holds both images ({images[0]}) and .npy arrays ({arrays[0]}); a dataset is one or the other")
        chosen = images or arrays
        if not chosen:
            raise UserError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) or .npy arrays found")
        labels = _folder_labels(meta, chosen, str(path))
        if max_items:
            chosen = chosen[:max_items]
            labels = None if labels is None else labels[:max_items]
        self.names = np.array([n.encode() for n in chosen])
        self.arrays = bool(arrays)
        # dataset.json's labels, checked as the memory source checks them (formats._finish).
        self.labels, self.num_classes = check_labels(labels, len(chosen), str(path)) if labels is not None else (None, 0)
        if self.is_zip:
            zinfo = [infos[n] for n in chosen]
            size = path.stat().st_size
            for info in zinfo:
                _check_member(info, path)
                # Reads allocate what the directory claims: it must lie inside the file (a zip64 field can claim 2**40).
                if info.header_offset + _LOCAL_HEADER.size + info.compress_size > size:
                    raise UserError(f"{path}/{info.filename}: the zip directory places {info.compress_size} bytes at offset "
                                    f"{info.header_offset}, past the file's {size} bytes (corrupt or hostile zip)")
            self._offset = np.array([i.header_offset for i in zinfo], dtype=np.int64)
            self._stored = np.array([i.compress_size for i in zinfo], dtype=np.int64)
            self._size = np.array([i.file_size for i in zinfo], dtype=np.int64)
            self._deflated = np.array([i.compress_type == zipfile.ZIP_DEFLATED for i in zinfo])
            self._crc = np.array([i.CRC for i in zinfo], dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_pid": -1}

    def member(self, i: int) -> str:
        return f"{self.path}/{self.names[i].decode()}"

    def _zip_member(self, i: int) -> bytes:
        if self._pid != os.getpid():
            try:
                self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
            except OSError as err:
                raise UserError(f"{self.path}: cannot open ({err.strerror})") from None
        try:
            head = os.pread(self._fd, _LOCAL_HEADER.size, int(self._offset[i]))
            signature, name_len, extra_len = _LOCAL_HEADER.unpack(head) if len(head) == _LOCAL_HEADER.size else (b"", 0, 0)
            if signature != b"PK\x03\x04":
                raise ValueError("no local file header at its offset")
            stored = os.pread(self._fd, int(self._stored[i]), int(self._offset[i]) + _LOCAL_HEADER.size + name_len + extra_len)
            if len(stored) != self._stored[i]:
                raise ValueError("archive ends inside the member")
            raw = zlib.decompressobj(-15).decompress(stored, int(self._size[i])) if self._deflated[i] else stored
            if len(raw) != self._size[i] or zlib.crc32(raw) != self._crc[i]:
                raise ValueError("size or CRC-32 differs from the directory's")
        except (OSError, ValueError, zlib.error) as err:
            raise UserError(f"{self.member(i)}: corrupt zip member ({type(err).__name__}: {str(err)[:80]})") from None
        return raw

    def decode(self, i: int) -> np.ndarray:
        """Member i as [C, H, W]: uint8 pixels, or the stored array of a ``.npy`` member."""
        raw = self._zip_member(i) if self.is_zip else _read_file(self.path / self.names[i].decode())
        return _decode_array(raw, self.member(i)) if self.arrays else _decode_image(raw, self.member(i))

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = -1, -1


def check_budget(source: str, nbytes: int, budget_gb: float) -> None:
    """A set held whole in memory must fit the configured budget (checked before decoding a folder)."""
    if budget_gb and nbytes > budget_gb * 1e9:
        raise UserError(f"data.memory_budget_gb: {source} is {nbytes / 1e9:.1f} GB decoded, above the budget of {budget_gb:g} GB; "
                        "set data.source=stream to read it from disk")


def load_folder(path: Path, max_images: int, budget_gb: float = 0) -> ImageData:
    archive = Archive(path, max_images)
    try:
        images = []
        for i in range(len(archive)):
            arr = archive.decode(i)
            if i == 0:
                check_budget(str(path), arr.nbytes * len(archive), budget_gb)
            if images and arr.dtype != images[0].dtype:
                raise UserError(f"{archive.member(i)}: {arr.dtype} differs from {images[0].dtype} of {archive.member(0)}")
            if images and arr.shape != images[0].shape:
                raise UserError(f"{archive.member(i)}: image shape {arr.shape} differs from {images[0].shape} of {archive.member(0)}")
            images.append(arr)
    finally:
        archive.close()
    return _finish(np.stack(images), archive.labels, str(path))


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
            # read(n) allocates n bytes before reading: a header's claim costs memory only as data arrives.
            parts, left = [], size
            while left and (part := f.read(min(left, _READ_CHUNK))):
                parts.append(part)
                left -= len(part)
            raw = b"".join(parts)
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
def check_npz_headers(path: Path, names: tuple[str, ...], max_bytes: int = 0) -> None:
    """Each named array's header in the .npz must describe exactly the bytes stored, and with
    ``max_bytes`` claim no more: numpy allocates what a header claims before reading (a crafted header
    claiming 10^12 elements would otherwise be an allocation failure, and a deflated member can back a
    large claim with a small file). A name that is absent is left to the caller's own error."""
    try:
        with zipfile.ZipFile(path) as archive:
            for name in names:
                if f"{name}.npy" not in archive.namelist():
                    continue
                info = archive.getinfo(f"{name}.npy")
                with archive.open(info) as f:
                    shape, dtype = _read_npy_header(f)
                    header = f.tell() if f.seekable() else None
                need = math.prod(shape) * dtype.itemsize
                if header is not None and need != info.file_size - header:
                    raise UserError(f"{path}: {name} header says {shape} {dtype} ({need} bytes) but {info.file_size - header} are stored")
                if max_bytes and need > max_bytes:
                    raise UserError(f"{path}: {name} header says {shape} {dtype} ({need} bytes), above the {max_bytes} this file may hold")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise UserError(f"{path}: not a readable .npz ({type(err).__name__}: {str(err)[:80]})") from None


def load_npz(path: Path) -> ImageData:
    check_npz_headers(path, ("images", "labels"))
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


DIGITS_TEST = 360  # sklearn digits: the last 360 of the 1,797 images are the held-out test split (80/20)


def load_digits(split: str = "train") -> ImageData:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError:
        raise UserError("data.kind=digits needs scikit-learn (pip install scikit-learn)") from None
    digits = sk_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    part = slice(None, -DIGITS_TEST) if split == "train" else slice(-DIGITS_TEST, None)
    return _finish(images[part], digits.target.astype(np.int64)[part], f"sklearn digits ({split})")


def dataset_path(kind: str, path: str) -> Path:
    """``data.path`` as a Path to an existing file or folder, or one line saying where to get it."""
    p = Path(path).expanduser()
    if not path or not p.exists():
        raise UserError(f"data.path: {path or '(empty)'} not found; {_WHERE[kind]}")
    if not (p.is_file() or p.is_dir()):
        raise UserError(f"data.path: {path} is not a regular file or folder (a device or pipe is not a dataset)")
    return p


def load_dataset(kind: str, path: str, split: str = "train", max_images: int = 0, budget_gb: float = 0) -> ImageData:
    """Load a whole dataset; ``max_images`` > 0 keeps the first that many; above ``budget_gb`` (0: no
    limit) decoded it is refused."""
    if kind == "digits":
        data = load_digits(split)
    else:
        p = dataset_path(kind, path)
        loaders = {"cifar10": lambda: load_cifar10(p, split), "folder": lambda: load_folder(p, max_images, budget_gb), "idx": lambda: load_idx(p), "npz": lambda: load_npz(p)}
        data = loaders[kind]()
    if max_images and data.images.shape[0] > max_images:
        data.images = data.images[:max_images]
        data.labels = None if data.labels is None else data.labels[:max_images]
    check_budget(data.source, data.images.numel(), budget_gb)
    return data
