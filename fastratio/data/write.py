"""Write a dataset zip in the layout EDM's and EDM2's ``dataset_tool.py`` write.

Members ``{i:08d}[:5]/img{i:08d}.png`` (uncompressed PNG, as EDM) or ``{i:08d}[:5]/img-mean-std-{i:08d}.npy``
(float arrays: EDM2's ``dataset_tool.py encode`` latents), stored without compression, then ``dataset.json`` with ``{"labels": [[name, class],
...]}`` or ``{"labels": null}``. tests/test_stream.py checks the result against a zip EDM's own tool
wrote. Used for synthetic sets (bench/data_throughput.py, tests) and by dataset tools.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..atomic import atomic_write


def member_name(index: int, array: bool) -> str:
    digits = f"{index:08d}"
    return f"{digits[:5]}/img-mean-std-{digits}.npy" if array else f"{digits[:5]}/img{digits}.png"


def _encode(item: np.ndarray) -> tuple[bytes, bool]:
    """[C, H, W] uint8 -> PNG bytes; any other dtype -> .npy bytes. Also whether it is an array."""
    if item.dtype != np.uint8:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(item), allow_pickle=False)
        return buf.getvalue(), True
    from PIL import Image

    channels = item.shape[0]
    img = Image.fromarray(item[0] if channels == 1 else item.transpose(1, 2, 0), {1: "L", 3: "RGB"}[channels])
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue(), False


def write_dataset_zip(dest: Path, items: Iterable[np.ndarray], labels: Iterable[int] | None = None) -> Path:
    """Write ``items`` ([C, H, W] arrays) and optional integer ``labels`` to the zip ``dest``, atomically."""

    def write(f) -> None:
        names = []
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED) as archive:
            for i, item in enumerate(items):
                raw, array = _encode(item)
                names.append(member_name(i, array))
                archive.writestr(names[-1], raw)
            entries = None if labels is None else [[n, int(c)] for n, c in zip(names, labels, strict=True)]
            archive.writestr("dataset.json", json.dumps({"labels": entries}))

    return atomic_write(Path(dest), write)
