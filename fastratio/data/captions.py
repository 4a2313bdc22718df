"""Captioned training data for text-to-image runs, streamed from disk: prompts alone, or image-caption
(or latent-caption) pairs in WebDataset tar shards.

    prompts  a ``.txt`` file (one prompt a line, UTF-8) or a ``.jsonl`` file (one object a line; the
             prompt is its ``caption``, ``prompt`` or ``text`` field, the first of those present).
             Blank lines (ASCII whitespace only) are not prompts and are left out of the index; a
             .txt prompt loses surrounding ASCII whitespace (a CRLF file reads like an LF one).
    pairs    WebDataset shards as img2dataset writes them for LAION or COCO: ``KEY.jpg|jpeg|png|webp``
             and ``KEY.txt`` (``KEY.json`` and other members are ignored), or latent shards with
             ``KEY.npy`` (float16/float32 [C, h, w], already multiplied by the VAE's scaling factor,
             0.18215 for SD v1.5) instead of the image, and optionally ``KEY.emb.npy``, the caption's
             text-encoder output (float16/float32 [77, D]; fastratio.tools.encode_sd_latents
             --text-embeddings), which then stands in for running the text encoder in training. A key is a member's name up to the first dot
             of its basename, and a sample is a run of consecutive members with one key, as
             ``webdataset`` groups them. ``data.path`` is a folder of ``*.tar`` shards (read in sorted
             order), one ``.tar``, or a numeric brace pattern such as ``shards/{00000..00009}.tar``.
             Shards must be uncompressed tars: members are read at their offsets.

Nothing is read whole. One scan at start-up builds a numpy index (prompts: each line's byte offset
and length, 12 bytes a prompt; pairs: shard, key, member offsets and sizes, ~40 bytes a sample), and
the step's samples are read with ``os.pread`` when drawn. The scan checks what it can without decoding
(every line's length, UTF-8 and JSON; every tar header, member type and name, that every member lies
inside its shard and that the shard ends with tar's end-of-archive block, so a truncated shard is
refused instead of silently read short); every problem is one UserError line naming the file and
line, or the shard and member, and nothing is ever extracted. Images are decoded in DataLoader
workers as ``fastratio.data.stream`` does (an unreadable one stops the run in one line, or with
``skip_corrupt`` is replaced by the next readable sample and counted); prompts are read in the main
process (a batch is a few small reads, less than handing it over from a worker would cost).

Order and caption dropout are functions of (seed, global position) only (``fastratio.data.order``
and ``dropped``), so ranks read their rows of one global batch and a run resumed at a checkpoint's
position reads and drops exactly what an uninterrupted run does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import state_count
from ..errors import UserError
from ..shard import Shard
from .formats import MAX_MEMBER_BYTES, _decode_array, dataset_path, open_image
from .order import EpochOrder, ShardedBatches
from .stream import _REFERENCE_SEED, _iterate, count_skipped, first_readable, make_loader, next_batch

MAX_PROMPTS = 50_000_000  # lines in one prompt file (the index: 12 bytes a prompt, 600 MB at the limit)
MAX_PROMPT_BYTES = 65_536  # one prompt line or caption member; CLIP reads 77 tokens, a few hundred bytes
MAX_SAMPLES = 50_000_000  # image-caption pairs over all shards (the index: ~40 bytes each)
MAX_SHARDS = 100_000  # shards in a folder or brace pattern (LAION-2B-en at 10,000 a shard: 232,000)
_CHUNK = 1 << 20  # bytes a prompt-file scan reads at once (its numpy temporaries: ~10x that)
_SPACE = b" \t\r\n\v\f"  # what a blank line holds
_STRIP = _SPACE.decode()  # what a .txt prompt or caption loses at either end
_FIELDS = ("caption", "prompt", "text")  # a .jsonl line's prompt field, in order of preference
_SUFFIXES = ("jpg", "jpeg", "png", "webp", "npy")  # a sample's data member; its index is the stored code
_NPY = _SUFFIXES.index("npy")
_EMBEDDING = "emb.npy"  # a sample's precomputed text embedding
_EMBEDDING_AXES = "[tokens, width]"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: (key, suffix)
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_TAR_TYPES = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "character device",
              tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO", tarfile.GNUTYPE_SPARSE: "sparse file"}
_DROP_BLOCK = 4096  # positions per caption-dropout draw


# -- prompt files ---------------------------------------------------------------------------------
def _json_prompt(line: bytes) -> str:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"not JSON ({getattr(err, 'msg', type(err).__name__)})") from None
    field = next((f for f in _FIELDS if isinstance(obj, dict) and f in obj), None)
    if field is None or not isinstance(obj[field], str):
        raise ValueError("no string 'caption', 'prompt' or 'text' field")
    return obj[field]


def _count_lines(f, path: Path) -> None:
    """Refuse a file of more than MAX_PROMPTS lines where the count passes the limit, before any of
    it is indexed (bytes.count: a second or two a GB, against a scan's tens)."""
    newlines = 0
    while block := f.read(_CHUNK):
        newlines += block.count(b"\n")
        if newlines + (block[-1] != 10) > MAX_PROMPTS:  # a line the block ends inside counts too
            raise UserError(f"{path}: more than {MAX_PROMPTS:,} lines; split the file")


class PromptFile:
    """The non-blank lines of a ``.txt`` or ``.jsonl`` prompt file, indexed by one scan in blocks of
    ``_CHUNK`` bytes (lines found and checked with numpy; no Python object kept a line) and read on
    demand."""

    def __init__(self, path: Path, max_items: int = 0):
        self.path, self.jsonl = path, path.suffix.lower() == ".jsonl"
        starts, lengths, count, lines = [], [], 0, 0  # lines: scanned so far, for messages
        try:
            with path.open("rb") as f:
                base = 3 if f.read(3) == b"\xef\xbb\xbf" else 0  # a UTF-8 byte-order mark (Windows editors)
                if not 0 < max_items <= MAX_PROMPTS:
                    _count_lines(f, path)
                f.seek(base)
                data = b""
                while not max_items or count < max_items:
                    block = f.read(_CHUNK)
                    data += block
                    end = data.rfind(b"\n") + 1 if block else len(data)  # whole lines; at the end, the rest
                    if not data:
                        break
                    if not end:
                        if len(data) > MAX_PROMPT_BYTES:
                            raise UserError(f"{path}:{lines + 1}: a line of more than {MAX_PROMPT_BYTES} bytes is not a prompt")
                        continue
                    s, n = self._scan(data[:end], base, lines)
                    starts.append(s)
                    lengths.append(n)
                    count, lines = count + len(s), lines + data.count(b"\n", 0, end) + (data[end - 1] != 10)
                    base, data = base + end, data[end:]
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror})") from None
        self.starts = np.concatenate(starts or [np.zeros(0, np.int64)])[: max_items or None]
        self.lengths = np.concatenate(lengths or [np.zeros(0, np.int32)])[: max_items or None]
        if not len(self.starts):
            raise UserError(f"{path}: no prompts (the file is empty or blank)")

    def _scan(self, data: bytes, base: int, lines: int) -> tuple[np.ndarray, np.ndarray]:
        """(file offsets, lengths) of the non-blank lines of ``data``, whole lines at file offset
        ``base`` after ``lines`` lines, each checked: length, UTF-8 and, in a .jsonl, its field."""
        buf = np.frombuffer(data, np.uint8)
        ends = np.flatnonzero(buf == 10)
        if buf[-1] != 10:
            ends = np.append(ends, len(buf))
        starts = np.concatenate(([0], ends[:-1] + 1))
        long = np.flatnonzero(ends - starts > MAX_PROMPT_BYTES)
        if len(long):
            raise UserError(f"{self.path}:{lines + long[0] + 1}: a line of {ends[long[0]] - starts[long[0]]} bytes is not a prompt "
                            f"(at most {MAX_PROMPT_BYTES})")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{self.path}:{lines + np.searchsorted(ends, err.start) + 1}: not UTF-8") from None
        filled = np.concatenate(([0], np.cumsum(~np.isin(buf, np.frombuffer(_SPACE, np.uint8)), dtype=np.int32)))
        keep = np.flatnonzero(filled[ends] > filled[starts])
        if self.jsonl:
            for k in keep.tolist():
                try:
                    _json_prompt(data[starts[k] : ends[k]])
                except ValueError as err:
                    raise UserError(f"{self.path}:{lines + k + 1}: {err}") from None
        return (base + starts[keep]).astype(np.int64), (ends[keep] - starts[keep]).astype(np.int32)

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, items) -> list[str]:
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                raws = [os.pread(fd, int(self.lengths[i]), int(self.starts[i])) for i in items]
            finally:
                os.close(fd)
            return [_json_prompt(raw) if self.jsonl else raw.decode("utf-8").strip(_STRIP) for raw in raws]
        except (OSError, ValueError) as err:
            raise UserError(f"{self.path}: changed since the run indexed it ({type(err).__name__})") from None


# -- tar shards -----------------------------------------------------------------------------------
def shard_paths(path: str) -> list[Path]:
    """The shards ``data.path`` names: a brace pattern's expansion (``{000..009}``: zero-padded to the
    longer bound when a bound has a leading zero, as the ``braceexpand`` package does), the sorted
    ``*.tar`` files of a folder, or one ``.tar``."""
    parts = _RANGE.split(path)
    if len(parts) > 1:
        bounds = [(parts[i], parts[i + 1]) for i in range(1, len(parts), 3)]
        if any(int(a) > int(b) for a, b in bounds) or math.prod(int(b) - int(a) + 1 for a, b in bounds) > MAX_SHARDS:
            raise UserError(f"data.path: {path} is a reversed range or names more than {MAX_SHARDS:,} shards")
        pads = [max(len(a), len(b)) if any(len(v) > 1 and v[0] == "0" for v in (a, b)) else 0 for a, b in bounds]
        ranges = [[str(v).zfill(pad) for v in range(int(a), int(b) + 1)] for (a, b), pad in zip(bounds, pads)]
        paths = [Path("".join(p + v for p, v in zip(parts[::3], (*pick, "")))) for pick in itertools.product(*ranges)]
        missing = next((p for p in paths if not p.is_file()), None)
        if missing:
            raise UserError(f"data.path: {path} names {missing}, which is not a file")
        return paths
    root = dataset_path("pairs", path)
    if root.is_dir():
        paths = sorted(p for p in root.glob("*.tar") if p.is_file())
        if not paths or len(paths) > MAX_SHARDS:
            raise UserError(f"data.path: {root} holds {len(paths)} .tar shards (expected 1 to {MAX_SHARDS:,})")
        return paths
    if root.suffix != ".tar":
        raise UserError(f"data.path: {root} is not an uncompressed .tar shard (members are read at their offsets)")
    return [root]


def _check_member(info: tarfile.TarInfo, path: Path, size: int) -> None:
    """Refuse members that would be dangerous to extract or cannot be read at an offset (absolute or
    '..' names, links, devices, FIFOs, sparse files) and a member running past the end of the file
    (a truncated shard). Nothing is extracted either way."""
    name = f"{path}/{info.name}"
    if info.name.startswith("/") or ".." in info.name.split("/"):
        raise UserError(f"{name}: absolute or '..' member name in a shard")
    if not (info.isfile() or info.isdir()) or info.issparse():
        raise UserError(f"{name}: a {_TAR_TYPES.get(info.type, f'type {info.type!r}')} member; shards hold regular files")
    if info.offset_data + info.size > size:
        raise UserError(f"{name}: runs past the end of the shard ({size} bytes; truncated?)")


def _sample(path: Path, key: str, members: dict[str, tuple[int, int]]) -> tuple:
    """The index row of one key's members: (key, data suffix code, data offset, size, caption offset, size,
    text-embedding offset, size: -1 and 0 without one)."""
    found = [s for s in _SUFFIXES if s in members]
    if len(found) != 1 or "txt" not in members:
        what = f"both .{found[0]} and .{found[1]}" if len(found) > 1 else "no caption (.txt)" if found else "no image or .npy"
        raise UserError(f"{path}/{key}: {what}; a sample is one KEY.jpg|jpeg|png|webp|npy and one KEY.txt")
    (at, size), (text_at, text_size) = members[found[0]], members["txt"]
    emb_at, emb_size = members.get(_EMBEDDING, (-1, 0))
    if max(size, emb_size) > MAX_MEMBER_BYTES or text_size > MAX_PROMPT_BYTES:
        raise UserError(f"{path}/{key}: a {size}-byte .{found[0]}, {emb_size}-byte .{_EMBEDDING} or {text_size}-byte caption "
                        f"is beyond the limits ({MAX_MEMBER_BYTES}, {MAX_PROMPT_BYTES})")
    return key.encode(), _SUFFIXES.index(found[0]), at, size, text_at, text_size, emb_at, emb_size


def _scan_shard(path: Path, room: int) -> list[tuple]:
    """Index rows of the first ``room`` samples of one shard, from its headers alone."""
    rows, key, members, last, ended = [], None, {}, None, False
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:
            while len(rows) < room:
                info = tar.next()
                tar.members.clear()  # tarfile keeps every header it reads; the index needs none
                if info is None:
                    ended = True
                    break
                _check_member(info, path, size)
                last, parts = info.name, _KEY.match(info.name)
                if info.isdir() or parts is None:  # webdataset skips a name without a suffix too
                    continue
                if parts.group(1) != key:
                    rows += [_sample(path, key, members)] if key is not None else []
                    key, members = parts.group(1), {}
                suffix = parts.group(2).lower()
                if suffix in members:
                    raise UserError(f"{path}/{info.name}: a second .{suffix} for key {key}")
                members[suffix] = (info.offset_data, info.size)
            if ended:
                # tarfile stops quietly at a header it cannot read (cut short, bad checksum) as at the end
                # block; only an all-zero block there is the end of a whole shard.
                tar.fileobj.seek(tar.offset)
                if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                    raise UserError(f"{path}: no valid tar header at byte {tar.offset}{f', after {last}' if last else ''} "
                                    "(truncated or corrupt shard)")
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{path}: not a readable uncompressed tar{f', after {last}' if last else ''} ({type(err).__name__}: {err})") from None
    if ended and key is not None:
        rows.append(_sample(path, key, members))
    return rows


class TarShards:
    """The samples of WebDataset shards in shard order, as numpy arrays: ~40 bytes a sample, shared
    by forked workers as ``formats.Archive``'s index is. Each read opens its shard, since thousands of
    shards are more descriptors than a process may hold, and an open costs microseconds beside a
    decode's milliseconds."""

    def __init__(self, paths: list[Path], max_items: int = 0):
        self.paths = [str(p) for p in paths]
        columns = []
        total = 0
        for sid, path in enumerate(paths):
            rows = _scan_shard(path, (max_items or MAX_SAMPLES + 1) - total)
            total += len(rows)
            if total > MAX_SAMPLES:
                raise UserError(f"data.path: more than {MAX_SAMPLES:,} samples (at {path}); read fewer shards or a max_items subset")
            if rows:
                keys, codes, data_at, data_size, text_at, text_size, emb_at, emb_size = zip(*rows)
                columns.append((np.full(len(rows), sid, np.int32), np.array(keys), np.array(codes, np.uint8), np.array(data_at, np.int64),
                                np.array(data_size, np.int32), np.array(text_at, np.int64), np.array(text_size, np.int32),
                                np.array(emb_at, np.int64), np.array(emb_size, np.int32)))
            if max_items and total >= max_items:
                break
        if not columns:
            raise UserError(f"data.path: no samples in {paths[0]}{' ...' if len(paths) > 1 else ''}")
        (self.shard, self.keys, self.suffix, self.data_at, self.data_size, self.text_at, self.text_size,
         self.emb_at, self.emb_size) = (np.concatenate(c) for c in zip(*columns))
        latent, embedded = self.suffix == _NPY, self.emb_at >= 0
        for mask, what in ((latent, "images and .npy latents"), (embedded, f"samples with and without .{_EMBEDDING}")):
            if mask.any() and not mask.all():
                raise UserError(f"data.path: holds both {what} ({self.member(int(np.argmin(mask)))}, "
                                f"{self.member(int(np.argmax(mask)))}); a set is one or the other")
        self.latent, self.embedded = bool(latent[0]), bool(embedded[0])

    def __len__(self) -> int:
        return len(self.keys)

    def member(self, i: int, suffix: str = "") -> str:
        return f"{self.paths[self.shard[i]]}/{self.keys[i].decode()}.{suffix or _SUFFIXES[self.suffix[i]]}"

    def read(self, i: int) -> tuple[bytes, str]:
        """Sample i's data member and its caption (UTF-8, less surrounding ASCII whitespace)."""
        raw, text = self._pread(i, (self.data_at[i], self.data_size[i]), (self.text_at[i], self.text_size[i]))
        try:
            return raw, text.decode("utf-8").strip(_STRIP)
        except UnicodeDecodeError:
            raise UserError(f"{self.member(i, 'txt')}: caption is not UTF-8") from None

    def embedding(self, i: int) -> np.ndarray:
        """Sample i's precomputed text embedding [tokens, width] (a set with ``embedded``)."""
        (raw,) = self._pread(i, (self.emb_at[i], self.emb_size[i]))
        return _decode_array(raw, self.member(i, _EMBEDDING), _EMBEDDING_AXES)

    def _pread(self, i: int, *spans: tuple[int, int]) -> list[bytes]:
        try:
            fd = os.open(self.paths[self.shard[i]], os.O_RDONLY)
            try:
                out = [os.pread(fd, int(size), int(at)) for at, size in spans]
            finally:
                os.close(fd)
        except OSError as err:
            raise UserError(f"{self.member(i)}: cannot read ({err.strerror})") from None
        if any(len(got) != size for got, (_, size) in zip(out, spans, strict=True)):
            raise UserError(f"{self.member(i)}: the shard ends inside it (changed since the run indexed it?)")
        return out


# -- decoding -------------------------------------------------------------------------------------
def resize_center_crop(img, size: int):
    """torchvision's ``Resize(size, BILINEAR)`` then ``CenterCrop(size)`` on a PIL image, as diffusers'
    examples/text_to_image/train_text_to_image.py applies them, in the same arithmetic
    (torchvision.transforms.functional ``_compute_resized_output_size`` and ``center_crop``): the
    short side becomes ``size`` and the long side ``int(size * long / short)`` (truncated; a square
    counts its width as the short side), resized by PIL's ``Image.resize(..., BILINEAR)`` (Pillow's
    default reducing_gap=None; an unchanged size is a copy); then the crop's top-left corner is
    ``int(round((side - size) / 2.0))`` on each axis: Python's round, half to even, so a margin of
    4k + 1 puts the extra column right of the crop and 4k + 3 left of it."""
    from PIL import Image

    w, h = img.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)  # round(float) is an int, half to even
    return img.crop((left, top, left + size, top + size))


def decode_image(raw: bytes, name: str, size: int) -> np.ndarray:
    """uint8 [3, size, size]: refused above formats.MAX_IMAGE_PIXELS before decoding, converted to RGB
    (as diffusers' ``image.convert("RGB")``), then ``resize_center_crop``."""
    with open_image(raw, name) as img:
        arr = np.asarray(resize_center_crop(img.convert("RGB"), size))
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _same_as_first(arr: np.ndarray, first: tuple[tuple[int, ...], np.dtype], name: str) -> np.ndarray:
    if (arr.shape, arr.dtype) != first:
        raise UserError(f"{name}: {arr.dtype} {arr.shape} differs from the first sample's {first[1]} {first[0]}")
    return arr.astype(np.float32)


class _Pairs(torch.utils.data.Dataset):
    """Sample i as (pixels or float32 latents, caption, float32 text embedding or an empty tensor, note),
    decoded in a worker; an unreadable sample comes back as zeros and "" with the problem noted
    (``stream.first_readable``)."""

    def __init__(self, shards: TarShards, resolution: int, first: tuple, first_text: tuple | None, skip: bool):
        self.shards, self.resolution, self.first, self.first_text, self.skip = shards, resolution, first, first_text, skip

    def __len__(self) -> int:
        return len(self.shards)

    def _read(self, i: int) -> tuple[np.ndarray, str, np.ndarray]:
        raw, caption = self.shards.read(i)
        name = self.shards.member(i)
        if self.shards.latent:
            value = _same_as_first(_decode_array(raw, name), self.first, name)
        else:
            value = decode_image(raw, name, self.resolution)
        text = np.zeros(0, np.float32)
        if self.first_text is not None:
            text = _same_as_first(self.shards.embedding(i), self.first_text, self.shards.member(i, _EMBEDDING))
        return value, caption, text

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, torch.Tensor, str]:
        value, _, note = first_readable(i, len(self.shards), self.skip, self._read)
        if value is None:
            text = torch.zeros(self.first_text[0] if self.first_text else 0)
            return torch.zeros(self.first[0], dtype=torch.float32 if self.shards.latent else torch.uint8), "", text, note
        return torch.from_numpy(value[0]), value[1], torch.from_numpy(value[2]), note


def _float_array(arr: np.ndarray, name: str, what: str) -> np.ndarray:
    if arr.dtype not in (np.float16, np.float32):
        raise UserError(f"{name}: {arr.dtype} {what}; expected float16 or float32")
    return arr


def dropped(seed: int, start: int, count: int, p: float) -> np.ndarray:
    """Whether the captions at global positions [start, start + count) are dropped (replaced by ""):
    u < p for uniforms drawn per block of ``_DROP_BLOCK`` positions from SeedSequence([seed, block, 1])
    (three words: apart from EpochOrder's [seed, epoch] streams). A function of (seed, position)
    alone, whatever the batch size, rank or resume point."""
    if p <= 0:
        return np.zeros(count, dtype=bool)
    first, last = start // _DROP_BLOCK, (start + count - 1) // _DROP_BLOCK
    u = np.concatenate([np.random.default_rng(np.random.SeedSequence([seed, b, 1])).random(_DROP_BLOCK) for b in range(first, last + 1)])
    return u[start - first * _DROP_BLOCK :][:count] < p


class CaptionSource:
    """The training task's captioned data: ``advance()`` returns this rank's rows of the next global
    batch, on the host. ``kind`` is "prompts" (a prompt file: no images; ``workers`` is not used) or
    "pairs" (tar shards of images, or of latents when their members are ``.npy``)."""

    def __init__(self, path: str, *, kind: str, resolution: int, global_batch: int, shard: Shard, seed: int, max_items: int = 0,
                 caption_dropout: float = 0.0, workers: int = 0, prefetch: int = 2, timeout_s: float = 600.0, skip_corrupt: bool = False):
        if kind not in ("prompts", "pairs"):
            raise UserError(f"data.kind: {kind!r} is not prompts or pairs")
        if not 0 <= caption_dropout <= 1:
            raise UserError(f"data.caption_dropout: {caption_dropout} is not a probability")
        self.global_batch, self.shard, self.seed, self.caption_dropout = global_batch, shard, seed, caption_dropout
        self.workers, self.prefetch, self.timeout_s, self.skip_corrupt = workers, prefetch, timeout_s, skip_corrupt
        self._samples: _Pairs | None = None
        self.latent, self.shape, self.text_shape = False, None, None
        if kind == "prompts":
            file = dataset_path("prompts", path)
            if not file.is_file() or file.suffix.lower() not in (".txt", ".jsonl"):
                raise UserError(f"data.path: {file} is not a .txt or .jsonl prompt file")
            self.index: PromptFile | TarShards = PromptFile(file, max_items)
        else:
            self.index = TarShards(shard_paths(path), max_items)
            self.latent = self.index.latent
            if self.latent:
                first = _float_array(_decode_array(self.index.read(0)[0], self.index.member(0)), self.index.member(0), "latents")
                self.shape, stored = tuple(first.shape), first.dtype
            else:
                if resolution <= 0:
                    raise UserError(f"data.resolution: {resolution} is not a positive image size")
                self.shape, stored = (3, resolution, resolution), np.dtype(np.uint8)
            first_text = None
            if self.index.embedded:
                name = self.index.member(0, _EMBEDDING)
                text = _float_array(self.index.embedding(0), name, "text embeddings")
                self.text_shape, first_text = tuple(text.shape), (tuple(text.shape), text.dtype)
            self._samples = _Pairs(self.index, resolution, (self.shape, stored), first_text, skip_corrupt)
        self.order = EpochOrder(len(self.index), seed)
        self.local = ShardedBatches(self.order, global_batch, shard).local
        self.position = 0  # global samples consumed by completed advance() calls
        self.skipped = 0
        self._batches = None

    def __len__(self) -> int:
        return len(self.index)

    def _loader(self, batch_sampler, position: int, persistent: bool) -> torch.utils.data.DataLoader:
        return make_loader(self._samples, batch_sampler, seed=self.seed, position=position, workers=self.workers,
                           prefetch=self.prefetch, timeout_s=self.timeout_s, persistent=persistent)

    def _next(self, batches) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
        arrays, captions, texts, notes = next_batch(batches)
        self.skipped = count_skipped(notes, self.skip_corrupt, self.skipped)
        return arrays, list(captions), texts if self.text_shape else None

    def advance(self) -> tuple[torch.Tensor | None, list[str], torch.Tensor | None]:
        """This rank's rows of the next global batch, on the host: uint8 pixels [n, 3, R, R] or float32
        latents [n, C, h, w] (None for prompts), the n captions after caption dropout, and the captions'
        precomputed text embeddings [n, tokens, width] (None without them; a dropped caption's row is
        its caption's: the caller replaces the rows of "" captions by the empty prompt's)."""
        if self._batches is None:
            sampler = ShardedBatches(self.order, self.global_batch, self.shard, self.position)
            self._batches = iter(sampler) if self._samples is None else _iterate(self._loader(sampler, self.position, persistent=True))
        if self._samples is None:
            arrays, captions, texts = None, self.index.read(next(self._batches)), None
        else:
            arrays, captions, texts = self._next(self._batches)
        drop = dropped(self.seed, self.position + self.shard.row_offset(self.local), self.local, self.caption_dropout)
        self.position += self.global_batch
        return arrays, ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)], texts

    def reference(self, count: int) -> tuple[torch.Tensor | None, list[str], torch.Tensor | None]:
        """A fixed random subset of ``count`` samples (on the host, no caption dropout): the same
        subset for every run over this set, read once through the workers."""
        count = min(count, len(self.index))
        items = EpochOrder(len(self.index), _REFERENCE_SEED).items(0, count)
        if self._samples is None:
            return None, self.index.read(items), None
        chunk = max(1, min(256, count))
        batches = _iterate(self._loader([items[i : i + chunk].tolist() for i in range(0, count, chunk)], 0, persistent=False))
        arrays, captions, texts = zip(*(self._next(batches) for _ in range(0, count, chunk)), strict=True)
        return torch.cat(arrays), [c for part in captions for c in part], torch.cat(texts) if self.text_shape else None

    def state(self) -> dict:
        return {"position": self.position, "size": len(self.index), "skipped": self.skipped}

    def load_state(self, state: dict, source: str) -> None:
        if not isinstance(state, dict) or "position" not in state or "size" not in state:
            raise UserError(f"{source}: the checkpoint has no caption-stream position and size")
        position, size, skipped = (state_count(state.get(name, 0), f"data {name}", source) for name in ("position", "size", "skipped"))
        if size != len(self.index):
            raise UserError(f"{source}: the checkpoint read a set of {size} samples, data.path has {len(self.index)}; "
                            "its order cannot be continued")
        self.position, self.skipped, self._batches = position, skipped, None
