"""Captioned data for text-to-image runs: WebDataset shards written by webdataset's own TarWriter read
back as diffusers' transforms of their members, the (seed, position) order, ranks, resume and caption
dropout, prompt files, and every hostile input refused in one line naming the file and member."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastratio.data import captions, formats
from fastratio.data.captions import CaptionSource, shard_paths
from fastratio.data.order import EpochOrder
from fastratio.errors import UserError
from fastratio.shard import SINGLE, Shard

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "webdataset"  # written by make_fixtures.py there
IMAGES, LATENTS = FIX / "images", FIX / "latents" / "00000.tar"


def _source(path, kind="pairs", batch=4, shard=SINGLE, seed=0, resolution=16, **kw):
    return CaptionSource(str(path), kind=kind, resolution=resolution, global_batch=batch, shard=shard, seed=seed, **kw)


def _take(source, steps):
    """(data, captions) of ``steps`` batches of a set without text embeddings."""
    batches = [source.advance() for _ in range(steps)]
    assert all(b[2] is None for b in batches)
    return [b[:2] for b in batches]


def _webdataset_samples(paths):
    """The samples as webdataset's own reader groups them (raw bytes per suffix)."""
    import webdataset as wds

    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))


def _refused(match: str, call, *args, **kw) -> str:
    with pytest.raises(UserError, match=match) as caught:
        call(*args, **kw)
    assert "\n" not in str(caught.value)
    return str(caught.value)


# -- the fixtures, read back ----------------------------------------------------------------------
def test_image_shards_read_back_as_diffusers_resize_and_center_crop_of_their_members():
    transforms = pytest.importorskip("torchvision.transforms")
    samples = _webdataset_samples(sorted(IMAGES.glob("*.tar")))
    assert len(samples) == 9 and {"jpg", "png"} <= {k for s in samples for k in s}
    for resolution in (16, 24):  # down, and up for the 16x16 and 21x16 images
        # diffusers examples/text_to_image/train_text_to_image.py, with --center_crop
        tf = transforms.Compose([transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                                 transforms.CenterCrop(resolution)])
        source = _source(IMAGES, batch=9, seed=3, resolution=resolution)
        pixels, texts, _ = source.advance()
        assert source.shape == (3, resolution, resolution) and not source.latent and pixels.dtype == torch.uint8
        for row, i in enumerate(EpochOrder(9, 3).items(0, 9)):
            raw = samples[i].get("jpg", samples[i].get("png"))
            want = np.asarray(tf(Image.open(io.BytesIO(raw)).convert("RGB"))).transpose(2, 0, 1)
            assert torch.equal(pixels[row], torch.from_numpy(want.copy())), (resolution, samples[i]["__key__"])
            assert texts[row] == samples[i]["txt"].decode()


def test_the_resize_rule_is_torchvision_s_on_odd_sizes():
    transforms = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    for w, h, size in [(35, 24, 16), (21, 16, 16), (19, 33, 16), (44, 20, 16), (17, 17, 9), (50, 13, 7), (13, 50, 8), (8, 6, 11)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR), transforms.CenterCrop(size)])
        assert np.array_equal(np.asarray(captions.resize_center_crop(img, size)), np.asarray(tf(img))), (w, h, size)


def test_latent_shard_reads_its_stored_arrays_as_float32():
    samples = _webdataset_samples([LATENTS])
    source = _source(LATENTS, batch=4, seed=1)
    latents, texts, embeddings = source.advance()
    assert embeddings is None  # this set holds no KEY.emb.npy
    assert source.latent and source.shape == (4, 8, 8) and latents.dtype == torch.float32
    for row, i in enumerate(EpochOrder(4, 1).items(0, 4)):
        stored = np.load(io.BytesIO(samples[i]["npy"]))
        assert stored.dtype == np.float16 and torch.equal(latents[row], torch.from_numpy(stored.astype(np.float32)))
        assert texts[row] == samples[i]["txt"].decode()


# -- order, resume, ranks, dropout ----------------------------------------------------------------
def test_batches_follow_the_epoch_order_and_a_resumed_source_reads_the_uninterrupted_batches():
    names = [s["txt"].decode() for s in _webdataset_samples(sorted(IMAGES.glob("*.tar")))]
    plain = _take(_source(IMAGES, batch=4, seed=5), 7)  # 28 positions over 9 samples: epochs wrap inside batches
    order = EpochOrder(9, 5).items(0, 28)
    assert [c for _, texts in plain for c in texts] == [names[i] for i in order]
    straight = _take(_source(IMAGES, batch=4, seed=5, caption_dropout=0.3), 7)
    flat = [c for _, texts in straight for c in texts]
    assert 0 < flat.count("") < 28 and all(c in ("", names[i]) for c, i in zip(flat, order))
    first = _source(IMAGES, batch=4, seed=5, caption_dropout=0.3)
    _take(first, 3)
    assert first.state() == {"position": 12, "size": 9, "skipped": 0}
    resumed = _source(IMAGES, batch=4, seed=5, caption_dropout=0.3)
    resumed.load_state(first.state(), "ckpt")
    for (pixels, texts), (again, texts_again) in zip(straight[3:], _take(resumed, 4), strict=True):
        assert torch.equal(pixels, again) and texts == texts_again
    assert torch.equal(plain[3][0], straight[3][0])  # dropout touches captions only


def test_two_ranks_read_their_rows_of_the_one_process_batches():
    one = _take(_source(IMAGES, batch=4, seed=2, caption_dropout=0.5), 5)
    ranks = [_take(_source(IMAGES, batch=4, seed=2, shard=Shard(k, 2), caption_dropout=0.5), 5) for k in range(2)]
    for step in range(5):
        assert torch.equal(one[step][0], torch.cat([ranks[0][step][0], ranks[1][step][0]]))
        assert one[step][1] == ranks[0][step][1] + ranks[1][step][1]


def test_caption_dropout_is_a_function_of_seed_and_position_at_the_set_rate(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(20000)))
    source = _source(path, "prompts", batch=4000, seed=9, caption_dropout=0.2)
    flat = [c for _ in range(5) for c in source.advance()[1]]
    assert abs(flat.count("") / 20000 - 0.2) < 0.015  # binomial sd 0.0028
    assert all(c in ("", f"prompt {i}") for c, i in zip(flat, EpochOrder(20000, 9).items(0, 20000)))
    # Another batch size on rank 1 of 2 drops exactly the positions one process dropped.
    rank = _source(path, "prompts", batch=1000, seed=9, caption_dropout=0.2, shard=Shard(1, 2))
    for step in range(20):
        assert rank.advance()[1] == flat[1000 * step + 500 : 1000 * step + 1000]
    other_seed = [c for c in _source(path, "prompts", batch=4000, seed=10, caption_dropout=0.2).advance()[1]]
    assert [c == "" for c in other_seed] != [c == "" for c in flat[:4000]]
    assert "" not in _source(path, "prompts", batch=4000, caption_dropout=0).advance()[1]
    assert set(_source(path, "prompts", batch=4000, caption_dropout=1).advance()[1]) == {""}


# -- prompt files ---------------------------------------------------------------------------------
def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa cat\r\n\n   \nun café  \n\tlast, without newline".encode())
    source = _source(txt, "prompts", batch=3, seed=0, workers=2)  # workers are not used for prompts
    assert len(source) == 3 and source.shape is None and not source.latent
    assert source.index.read([0, 1, 2]) == ["a cat", "un café", "last, without newline"]
    pixels, texts, _ = source.advance()
    assert pixels is None and sorted(texts) == sorted(["a cat", "un café", "last, without newline"])
    lines = [{"caption": "c", "prompt": "p"}, {"prompt": "p2", "text": "t"}, {"text": "t3", "url": "x"}, None, {"caption": " spaced "}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join("" if line is None else json.dumps(line) for line in lines) + "\n")
    source = _source(jsonl, "prompts", batch=1, caption_dropout=1.0)
    assert source.index.read(range(4)) == ["c", "p2", "t3", " spaced "]
    assert len(_source(jsonl, "prompts", max_items=2)) == 2
    reference = source.reference(3)  # fixed, and never dropped
    assert reference == _source(jsonl, "prompts", seed=7).reference(3) and reference[0] is None and reference[2] is None and "" not in reference[1]


@pytest.mark.parametrize("name, content, match", [
    ("long.txt", b"a\nb\n" + b"y" * 10**6 + b"\n", r"long.txt:3: a line of 1000000 bytes is not a prompt"),
    ("endless.txt", b"z" * 2_000_000, r"endless.txt:1: a line of more than 65536 bytes"),
    ("latin1.txt", "ok\ncaf\xe9\n".encode("latin-1"), r"latin1.txt:2: not UTF-8"),
    ("bad.jsonl", b'{"caption": "a"}\n{"caption": \n', r"bad.jsonl:2: not JSON \(Expecting value\)"),
    ("field.jsonl", b'\n{"url": "a"}\n', r"field.jsonl:2: no string 'caption', 'prompt' or 'text' field"),
    ("number.jsonl", b'{"caption": 3}\n', r"number.jsonl:1: no string"),
    ("list.jsonl", b'["a cat"]\n', r"list.jsonl:1: no string"),
    ("deep.jsonl", b"[" * 60000 + b"\n", r"deep.jsonl:1: not JSON"),
    ("empty.txt", b"", r"empty.txt: no prompts"),
    ("blank.txt", b"\n  \r\n\t\n", r"blank.txt: no prompts"),
    ("prompts.csv", b"a,b\n", r"prompts.csv is not a .txt or .jsonl prompt file"),
], ids=lambda v: v if isinstance(v, str) and "." in v and ":" not in v else "")
def test_a_bad_prompt_file_is_one_line_naming_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    message = _refused(match, _source, tmp_path / name, "prompts")
    assert str(tmp_path / name) in message


def test_a_prompt_file_over_the_line_limit_is_refused_where_the_limit_passes(tmp_path, monkeypatch):
    monkeypatch.setattr(captions, "MAX_PROMPTS", 1000)
    monkeypatch.setattr(captions, "_CHUNK", 4096)
    path = tmp_path / "many.txt"
    # Non-UTF-8 bytes far past the limit: the scan stops at the limit, before reaching them.
    path.write_bytes(b"".join(b"prompt %d\n" % i for i in range(1500)) + b"x\n" * 20000 + b"\xff\n")
    _refused(rf"{path}: more than 1,000 lines; split the file", _source, path, "prompts")
    assert len(_source(path, "prompts", max_items=900)) == 900  # a subset below the limit reads


# -- hostile shards -------------------------------------------------------------------------------
_JPEG = (IMAGES / "00000.tar").read_bytes()[512 : 512 + 2176]  # 000000000.jpg's bytes (tar header: 512)


def _tar(path: Path, members) -> Path:
    """A shard with members given as (name, bytes) or (name, tarfile type) for links, devices and FIFOs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE):
                info.type, info.linkname = data, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


_GOOD = [("000.jpg", _JPEG), ("000.txt", b"a cat")]


@pytest.mark.parametrize("members, match", [
    ([*_GOOD, ("../../escaped.jpg", _JPEG)], r"bad.tar/../../escaped.jpg: absolute or '..' member name"),
    ([("a/../../001.jpg", _JPEG), *_GOOD], r"bad.tar/a/../../001.jpg: absolute or '..'"),
    ([*_GOOD, ("/etc/001.jpg", _JPEG)], r"bad.tar//etc/001.jpg: absolute or '..'"),
    ([*_GOOD, ("001.jpg", tarfile.SYMTYPE), ("001.txt", b"x")], r"bad.tar/001.jpg: a symlink member; shards hold regular files"),
    ([*_GOOD, ("001.jpg", tarfile.LNKTYPE)], r"bad.tar/001.jpg: a hardlink member"),
    ([("001.txt", tarfile.FIFOTYPE), *_GOOD], r"bad.tar/001.txt: a FIFO member"),
    ([*_GOOD, ("001.jpg", tarfile.CHRTYPE)], r"bad.tar/001.jpg: a character device member"),
    ([*_GOOD, ("001.jpg", _JPEG), ("002.jpg", _JPEG), ("002.txt", b"b")], r"bad.tar/001: no caption \(.txt\)"),
    ([("001.txt", b"orphan"), ("001.json", b"{}"), *_GOOD], r"bad.tar/001: no image or .npy"),
    ([*_GOOD, ("001.jpg", _JPEG), ("001.png", _JPEG), ("001.txt", b"b")], r"bad.tar/001: both .jpg and .png"),
    ([("000.jpg", _JPEG), ("000.jpg", _JPEG), ("000.txt", b"a")], r"bad.tar/000.jpg: a second .jpg for key 000"),
    ([*_GOOD, ("001.jpg", _JPEG), ("001.txt", b"c" * 70000)], r"bad.tar/001: .*70000-byte caption is beyond the limits"),
])
def test_a_hostile_shard_member_is_one_line_naming_shard_and_member_and_nothing_is_written(tmp_path, monkeypatch, members, match):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder would land here
    path = _tar(tmp_path / "in" / "bad.tar", members)
    assert str(path) in _refused(match, _source, path)
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "in", path] and not (tmp_path.parent / "escaped.jpg").exists()


def _cut(tmp_path, name: str, at) -> Path:
    """images/00000.tar cut short at ``at(member)`` of the member ``name``."""
    source = IMAGES / "00000.tar"
    with tarfile.open(source) as tar:
        where = at(tar.getmember(name))
    path = tmp_path / "cut.tar"
    path.write_bytes(source.read_bytes()[:where])
    return path


@pytest.mark.parametrize("name, at, match", [
    ("000000001.png", lambda m: m.offset_data + m.size // 2, r"cut.tar/000000001.png: runs past the end of the shard \(7718 bytes; truncated"),
    ("000000002.jpg", lambda m: m.offset + 100, r"cut.tar: no valid tar header at byte 10240, after 000000001.txt \(truncated or corrupt"),
    ("000000003.json", lambda m: m.offset, r"cut.tar: no valid tar header at byte 14848, after 000000002.txt"),
    ("000000000.jpg", lambda m: 300, r"cut.tar: not a readable uncompressed tar \(ReadError"),
])
def test_a_truncated_shard_is_refused_naming_where_it_ends(tmp_path, name, at, match):
    _refused(match, _source, _cut(tmp_path, name, at))


def test_a_corrupt_header_a_compressed_or_empty_shard_is_refused(tmp_path):
    raw = bytearray((IMAGES / "00000.tar").read_bytes())
    raw[10240 + 20] ^= 0xFF  # 000000002.jpg's name field: its header checksum fails
    (tmp_path / "flip.tar").write_bytes(bytes(raw))
    _refused(r"flip.tar: no valid tar header at byte 10240, after 000000001.txt", _source, tmp_path / "flip.tar")
    shutil.copy(IMAGES / "00000.tar", tmp_path / "shard.tar.gz")
    _refused(r"shard.tar.gz is not an uncompressed .tar shard", _source, tmp_path / "shard.tar.gz")
    import gzip

    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "00000.tar").write_bytes(gzip.compress(bytes(raw)))
    _refused(r"gz/00000.tar: not a readable uncompressed tar", _source, tmp_path / "gz")
    (tmp_path / "empty.tar").write_bytes(b"")
    _refused(r"empty.tar: not a readable uncompressed tar \(ReadError: empty file\)", _source, tmp_path / "empty.tar")


def _with_bad_member(tmp_path, name: str, damage) -> Path:
    path = tmp_path / "shard.tar"
    raw = bytearray((IMAGES / "00000.tar").read_bytes())
    with tarfile.open(IMAGES / "00000.tar") as tar:
        info = tar.getmember(name)
    raw[info.offset_data : info.offset_data + info.size] = damage(raw[info.offset_data : info.offset_data + info.size])
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("name, damage, match", [
    ("000000002.jpg", lambda b: b[:2] + b"\0" * 38 + b[40:], r"shard.tar/000000002.jpg: cannot decode image \(UnidentifiedImageError\)"),
    ("000000002.txt", lambda b: b"\xff" + b[1:], r"shard.tar/000000002.txt: caption is not UTF-8"),
])
def test_an_unreadable_sample_stops_naming_it_or_is_skipped_and_counted(tmp_path, name, damage, match):
    path = _with_bad_member(tmp_path, name, damage)
    _refused(match + r" \(set data.skip_corrupt=true", _take, _source(path, batch=5), 1)
    (clean, clean_texts), = _take(_source(IMAGES / "00000.tar", batch=5), 1)
    source = _source(path, batch=5, skip_corrupt=True)
    (pixels, texts), = _take(source, 1)
    order = EpochOrder(5, 0).items(0, 5).tolist()
    bad, after = order.index(2), order.index(3)
    assert torch.equal(pixels[bad], clean[after]) and texts[bad] == clean_texts[after]  # the next readable sample
    keep = [r for r in range(5) if r != bad]
    assert torch.equal(pixels[keep], clean[keep]) and source.state()["skipped"] == 1


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(formats, "MAX_IMAGE_PIXELS", 1000)  # 40x28 = 1,120 pixels; the other four are smaller
    _refused(r"00000.tar/000000000.jpg: 40x28 pixels is more than an image dataset holds \(decompression bomb\?\)",
             _take, _source(IMAGES / "00000.tar", batch=5), 1)


def test_bad_latent_members_are_one_line_naming_shard_and_key(tmp_path):
    import webdataset as wds

    def shard(name, arrays, embeddings=()):
        with wds.TarWriter(str(tmp_path / name)) as sink:
            for i, arr in enumerate(arrays):
                extra = {"emb.npy": embeddings[i]} if i < len(embeddings) and embeddings[i] is not None else {}
                sink.write({"__key__": f"{i:03d}", "npy": arr, "txt": f"caption {i}", **extra})
        return tmp_path / name

    good = np.zeros((4, 8, 8), np.float16)
    path = shard("mixed.tar", [good, np.zeros((4, 8, 9), np.float16)])
    _refused(r"mixed.tar/001.npy: float16 \(4, 8, 9\) differs from the first sample's float16 \(4, 8, 8\)", _take, _source(path, batch=2), 1)
    path = shard("dtype.tar", [good, good.astype(np.float32)])
    _refused(r"dtype.tar/001.npy: float32 \(4, 8, 8\) differs", _take, _source(path, batch=2), 1)
    _refused(r"object.tar/000.npy: cannot read .npy array", _source, shard("object.tar", [np.array([{"a": 1}] * 4, dtype=object)]))
    _refused(r"bytes.tar/000.npy: uint8 latents; expected float16 or float32", _source, shard("bytes.tar", [good.astype(np.uint8)]))
    _refused(r"flat.tar/000.npy: expected a \[C, H, W\]", _source, shard("flat.tar", [np.zeros(8, np.float32)]))
    # A set is images or latents, never both.
    (tmp_path / "both").mkdir()
    shutil.copy(LATENTS, tmp_path / "both" / "a.tar")
    shutil.copy(IMAGES / "00000.tar", tmp_path / "both" / "b.tar")
    _refused(r"holds both images and .npy latents \(.*b.tar/000000000.jpg, .*a.tar/000000000.npy\)", _source, tmp_path / "both")
    # Precomputed text embeddings: every sample or none, each [tokens, width] of the first's dtype and shape.
    emb = np.zeros((77, 32), np.float16)
    _refused(r"holds both samples with and without .emb.npy \(.*part.tar/001.npy, .*part.tar/000.npy\)", _source,
             shard("part.tar", [good, good], [emb, None]))
    _refused(r"flat-emb.tar/000.emb.npy: expected a \[tokens, width\]", _source, shard("flat-emb.tar", [good], [np.zeros(8, np.float16)]))
    _refused(r"int-emb.tar/000.emb.npy: uint8 text embeddings; expected float16 or float32", _source,
             shard("int-emb.tar", [good], [np.zeros((77, 32), np.uint8)]))
    _refused(r"wide-emb.tar/001.emb.npy: float16 \(77, 64\) differs from the first sample's float16 \(77, 32\)", _take,
             _source(shard("wide-emb.tar", [good, good], [emb, np.zeros((77, 64), np.float16)]), batch=2), 1)


# -- data.path forms ------------------------------------------------------------------------------
def test_a_folder_a_brace_pattern_and_one_tar_name_the_same_shards(tmp_path):
    pattern = _source(f"{IMAGES}/{{00000..00001}}.tar", batch=9).advance()
    folder = _source(IMAGES, batch=9).advance()
    assert torch.equal(pattern[0], folder[0]) and pattern[1] == folder[1]
    assert len(_source(IMAGES / "00001.tar")) == 4 and len(_source(IMAGES, max_items=6)) == 6
    for name in ("s-08.tar", "s-09.tar", "s-10.tar", "s-7.tar"):
        shutil.copy(IMAGES / "00001.tar", tmp_path / name)
    assert [p.name for p in shard_paths(f"{tmp_path}/s-{{08..10}}.tar")] == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert [p.name for p in shard_paths(f"{tmp_path}/s-{{7..7}}.tar")] == ["s-7.tar"]
    _refused(r"s-\{7..8\}.tar names .*s-8.tar, which is not a file", shard_paths, f"{tmp_path}/s-{{7..8}}.tar")
    _refused(r"is a reversed range or names more than 100,000 shards", shard_paths, f"{tmp_path}/{{0..9999}}-{{0..99}}.tar")
    _refused(r"is a reversed range", shard_paths, f"{tmp_path}/{{5..1}}.tar")
    (tmp_path / "none").mkdir()
    _refused(r"none holds 0 .tar shards", shard_paths, str(tmp_path / "none"))
    _refused(r"data.path: .*missing not found; set data.path to a folder of WebDataset", shard_paths, str(tmp_path / "missing"))


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize("state, match", [
    ({"position": -4, "size": 9}, r"ckpt: data position -4 is not a non-negative integer"),
    ({"position": 1.5, "size": 9}, r"ckpt: data position 1.5 is not"),
    ({"position": True, "size": 9}, r"ckpt: data position True is not"),
    ({"position": "8", "size": 9}, r"ckpt: data position '8' is not"),
    ({"position": None, "size": 9}, r"ckpt: data position None is not"),
    ({"position": 8, "size": 9, "skipped": -1}, r"ckpt: data skipped -1 is not"),
    ({"position": 8, "size": 9.0}, r"ckpt: data size 9.0 is not"),
    ({"position": 8, "size": 12}, r"ckpt: the checkpoint read a set of 12 samples, data.path has 9"),
    ({"position": 8}, r"ckpt: the checkpoint has no caption-stream position and size"),
    ([8, 9], r"ckpt: the checkpoint has no caption-stream position"),
])
def test_load_state_refuses_bad_values_in_one_line(state, match):
    source = _source(IMAGES)
    _refused(match, source.load_state, state, "ckpt")
    assert source.state() == {"position": 0, "size": 9, "skipped": 0}


# -- worker processes -----------------------------------------------------------------------------
def test_worker_processes_read_the_same_batches_and_leave_the_global_torch_rng_alone():
    before = torch.random.get_rng_state()
    source = _source(IMAGES, batch=4, seed=4, workers=2, caption_dropout=0.5)
    batches = _take(source, 3)
    reference = source.reference(5)
    assert torch.equal(torch.random.get_rng_state(), before)
    inline = _source(IMAGES, batch=4, seed=4, caption_dropout=0.5)
    for (pixels, texts), (again, texts_again) in zip(batches, _take(inline, 3), strict=True):
        assert torch.equal(pixels, again) and texts == texts_again
    assert torch.equal(reference[0], inline.reference(5)[0]) and reference[1] == inline.reference(5)[1]
    assert torch.equal(torch.random.get_rng_state(), before)
