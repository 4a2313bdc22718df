"""Dataset loaders on small fixtures written in each real format (CIFAR-10 python tarball and folder,
EDM image zip/folder with dataset.json, IDX, npz), and their one-line errors."""

import functools
import gzip
import io
import json
import operator
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from testkit import idx_bytes, png_bytes

from fastratio.data.formats import load_dataset, read_idx
from fastratio.errors import UserError

RNG = np.random.default_rng(0)


def _cifar_batches(n=3):
    """CIFAR-10's python batches: dicts with bytes keys, data uint8 [n, 3072] (planar RGB)."""
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n) + i) % 10]
        batches[name] = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
    return batches


def _write_cifar_tar(path, batches, payload=None):
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            raw = payload if (payload is not None and name == "data_batch_1") else pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_cifar10_tarball_and_folder(tmp_path):
    batches = _cifar_batches()
    _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", batches)
    data = load_dataset("cifar10", str(tmp_path / "cifar-10-python.tar.gz"))
    train = [batches[f"data_batch_{k}"] for k in range(1, 6)]
    want = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    assert data.images.shape == (15, 3, 32, 32) and np.array_equal(data.images.numpy(), want)
    assert data.labels.tolist() == functools.reduce(operator.iadd, (b[b"labels"] for b in train), [])
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    folder = load_dataset("cifar10", str(tmp_path / "extracted"))
    assert np.array_equal(folder.images.numpy(), want)
    test = load_dataset("cifar10", str(tmp_path / "extracted" / "cifar-10-batches-py"), split="test")
    assert np.array_equal(test.images.numpy(), batches["test_batch"][b"data"].reshape(-1, 3, 32, 32))


class Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_cifar10_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="data.path: .*not found; download cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(tmp_path / "nope.tar.gz"))
    good = tmp_path / "good.tar.gz"
    _write_cifar_tar(good, _cifar_batches())
    corrupt = tmp_path / "corrupt.tar.gz"
    corrupt.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="corrupt.tar.gz: corrupt or unreadable tarball"):
        load_dataset("cifar10", str(corrupt))
    evil = tmp_path / "evil.tar.gz"
    _write_cifar_tar(evil, _cifar_batches(), payload=pickle.dumps(Evil()))
    with pytest.raises(UserError, match=r"data_batch_1: refusing to load global (posix|os)\.system"):
        load_dataset("cifar10", str(evil))


def test_image_folder_and_zip_with_labels(tmp_path):
    images = RNG.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    names = [f"{i // 3:05d}/img{i:08d}.png" for i in range(5)]
    meta = json.dumps({"labels": [[n, i % 3] for i, n in enumerate(names)]})
    folder = tmp_path / "folder"
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        for n, arr in zip(names, images):
            (folder / n).parent.mkdir(parents=True, exist_ok=True)
            (folder / n).write_bytes(png_bytes(arr))
            z.writestr(n, png_bytes(arr))
        z.writestr("dataset.json", meta)
    (folder / "dataset.json").write_text(meta)
    for path in (folder, tmp_path / "data.zip"):
        data = load_dataset("folder", str(path))
        assert np.array_equal(data.images.numpy(), images.transpose(0, 3, 1, 2))
        assert data.labels.tolist() == [0, 1, 2, 0, 1] and data.num_classes == 3
    assert load_dataset("folder", str(folder), max_images=2).images.shape == (2, 3, 8, 8)
    gray = tmp_path / "gray"
    gray.mkdir()
    (gray / "a.png").write_bytes(png_bytes(images[0, :, :, 0]))
    assert load_dataset("folder", str(gray)).images.shape == (1, 1, 8, 8)


def test_image_folder_bad_inputs(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (mixed / "b.png").write_bytes(png_bytes(np.zeros((9, 8, 3), np.uint8)))
    with pytest.raises(UserError, match=r"b\.png: image shape \(3, 9, 8\) differs"):
        load_dataset("folder", str(mixed))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no images"):
        load_dataset("folder", str(tmp_path / "empty"))
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    (unlabeled / "a.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    (unlabeled / "dataset.json").write_text(json.dumps({"labels": [["other.png", 0]]}))
    with pytest.raises(UserError, match="dataset.json: no label for a.png"):
        load_dataset("folder", str(unlabeled))
    (unlabeled / "dataset.json").write_text(json.dumps({"labels": [["a.png", -1]]}))
    with pytest.raises(UserError, match="labels must be non-negative"):
        load_dataset("folder", str(unlabeled))
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.zip: not a readable zip"):
        load_dataset("folder", str(tmp_path / "bad.zip"))


def test_idx_with_labels(tmp_path):
    images = RNG.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1], dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    data = load_dataset("idx", str(tmp_path / "train-images-idx3-ubyte.gz"))
    assert np.array_equal(data.images.numpy(), images[:, None]) and data.labels.tolist() == [3, 1, 4, 1]
    assert data.num_classes == 5
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(idx_bytes(images, code=0x0D))
    with pytest.raises(UserError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "bad-images-idx3-ubyte")
    (tmp_path / "short-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(UserError, match=r"header says \(4, 28, 28\)"):
        read_idx(tmp_path / "short-images-idx3-ubyte")


def test_npz_layouts(tmp_path):
    images = RNG.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=images, labels=np.array([0, 1, 1]))
    data = load_dataset("npz", str(tmp_path / "nhwc.npz"))
    assert np.array_equal(data.images.numpy(), images.transpose(0, 3, 1, 2)) and data.labels.tolist() == [0, 1, 1]
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32))
    with pytest.raises(UserError, match="'images' must be uint8"):
        load_dataset("npz", str(tmp_path / "float.npz"))
    np.savez(tmp_path / "mismatch.npz", images=images, labels=np.array([0, 1]))
    with pytest.raises(UserError, match="2 labels for 3 images"):
        load_dataset("npz", str(tmp_path / "mismatch.npz"))


def test_sklearn_digits_are_real_8x8_images():
    train, test = load_dataset("digits", ""), load_dataset("digits", "", split="test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype.is_floating_point is False
    assert train.num_classes == 10 and int(train.images.max()) == 255 and int(train.images.min()) == 0
    from sklearn.datasets import load_digits

    # The two splits are sklearn's 1,797 images in order, split 80/20, none shared or lost.
    whole = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    assert np.array_equal(torch.cat([train.images, test.images])[:, 0].numpy(), whole)
    assert np.array_equal(torch.cat([train.labels, test.labels]).numpy(), load_digits().target)


def test_sixteen_bit_png_is_read_at_full_depth_and_scaled_to_8_bits(tmp_path):
    from PIL import Image

    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]] * 2, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")  # written by Pillow as a 16-bit greyscale PNG
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    data = load_dataset("folder", str(tmp_path))
    want = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert data.images.shape == (1, 1, 4, 4) and np.array_equal(data.images[0, 0].numpy(), want)


def test_an_idx_header_claiming_gigabytes_costs_memory_only_as_data_arrives(tmp_path):
    # read(n) allocates n bytes before reading: a 2 GiB claim (inside the stated limit) over a 76-byte file
    # asked for 2 GiB at once, plain or gzipped.
    import tracemalloc

    head = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2048, 2048, 512))
    for name, raw in {"claims-images-idx3-ubyte": head + bytes(64), "claims-images-idx3-ubyte.gz": gzip.compress(head + bytes(64))}.items():
        (tmp_path / name).write_bytes(raw)
        tracemalloc.start()
        try:
            with pytest.raises(UserError, match=r"header says \(2048, 2048, 512\) \(2147483648 bytes\) but fewer follow"):
                read_idx(tmp_path / name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 << 20, (name, peak)
