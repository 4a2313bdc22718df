"""Streaming data: EDM dataset_tool files read exactly, the (seed, position) order, ranks and resume,
bad members and dead workers in one line, and host memory that does not grow with the set."""

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from testkit import on_gpu

from fastratio import checkpoint
from fastratio.data.formats import Archive, load_dataset
from fastratio.data.order import EpochOrder, ShardedBatches
from fastratio.data.stream import StreamSource, loader_failure
from fastratio.data.write import write_dataset_zip
from fastratio.errors import UserError
from fastratio.runlog import TIMING_KEYS, read_jsonl
from fastratio.shard import SINGLE, Shard

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "edm_dataset"
SOURCES = np.load(FIX / "sources.npz")
RGB = SOURCES["rgb"].transpose(0, 3, 1, 2)  # the pixels EDM's tool was given, [N, C, H, W]
GRAY = SOURCES["gray"].transpose(0, 3, 1, 2)


def _source(path, batch=4, shard=SINGLE, seed=0, workers=1, **kw):
    args = {"max_items": 0, "global_batch": batch, "shard": shard, "seed": seed, "device": torch.device("cpu"), "conditional": False,
            "workers": workers, "prefetch": 2, "timeout_s": 60, "skip_corrupt": False}
    return StreamSource(str(path), **{**args, **kw})


def _take(source, steps):
    out = []
    for _ in range(steps):
        source.advance()
        images, labels = source.draw(source.global_batch, None, source.shard)
        out.append((images.clone(), None if labels is None else labels.clone()))
    return out


# -- formats: what EDM's dataset_tool.py wrote ----------------------------------------------------
def test_edm_dataset_tool_zip_and_folder_decode_to_their_sources():
    cond = Archive(FIX / "cond-rgb16.zip")
    assert len(cond) == 12 and cond.labels.tolist() == SOURCES["rgb_labels"].tolist()
    assert np.array_equal(np.stack([cond.decode(i) for i in range(12)]), RGB)
    folder = Archive(FIX / "uncond-gray16")
    assert folder.labels is None  # EDM writes {"labels": null}
    assert np.array_equal(np.stack([folder.decode(i) for i in range(10)]), GRAY)
    # The memory source reads the same files to the same pixels.
    data = load_dataset("folder", str(FIX / "cond-rgb16.zip"))
    assert np.array_equal(data.images.numpy(), RGB) and data.num_classes == 4


def test_writer_reproduces_edm_dataset_tool_byte_for_byte(tmp_path):
    ours = write_dataset_zip(tmp_path / "ours.zip", RGB, SOURCES["rgb_labels"])
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(FIX / "cond-rgb16.zip") as b:
        assert a.namelist() == b.namelist()
        assert all(a.read(n) == b.read(n) for n in a.namelist())


def test_npy_latent_members_read_as_stored_arrays(tmp_path):
    latents = np.random.default_rng(0).standard_normal((5, 8, 4, 4)).astype(np.float32)
    path = write_dataset_zip(tmp_path / "latents.zip", latents, [0, 1, 0, 1, 1])
    archive = Archive(path)
    assert archive.names[0].decode() == "00000/img-mean-std-00000000.npy"  # EDM2 dataset_tool.py encode's name
    assert np.array_equal(np.stack([archive.decode(i) for i in range(5)]), latents)
    with zipfile.ZipFile(tmp_path / "pickled.zip", "w") as z:  # an object array needs pickle: refused, never loaded
        import io

        buf = io.BytesIO()
        np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        z.writestr("00000/img00000000.npy", buf.getvalue())
    with pytest.raises(UserError, match=r"pickled.zip/00000/img00000000.npy: cannot read .npy"):
        Archive(tmp_path / "pickled.zip").decode(0)


# -- order ----------------------------------------------------------------------------------------
def test_epoch_order_visits_every_item_once_per_epoch_and_depends_only_on_seed_and_position():
    order = EpochOrder(10, seed=3)
    walk = order.items(0, 35)
    for e in range(3):
        assert sorted(walk[10 * e : 10 * e + 10].tolist()) == list(range(10))
    assert not np.array_equal(walk[:10], walk[10:20])  # a fresh permutation each epoch
    assert np.array_equal(EpochOrder(10, seed=3).items(13, 9), walk[13:22])  # any position, any fresh instance
    assert not np.array_equal(EpochOrder(10, seed=4).items(0, 10), walk[:10])


def test_ranks_read_their_rows_of_the_single_process_global_batch():
    order = EpochOrder(7, seed=1)
    one = iter(ShardedBatches(order, 6, SINGLE, start=5))
    ranks = [iter(ShardedBatches(order, 6, Shard(k, 3), start=5)) for k in range(3)]
    for _ in range(5):  # across several epoch boundaries (7 items, 6 per step)
        assert next(one) == [i for r in ranks for i in next(r)]


# -- the streaming source -------------------------------------------------------------------------
def test_stream_batches_are_the_order_s_members_with_their_labels():
    source = _source(FIX / "cond-rgb16.zip", batch=5, conditional=True, seed=7, workers=2)
    want = EpochOrder(12, 7).items(0, 20)
    for step, (images, labels) in enumerate(_take(source, 4)):
        idx = want[5 * step : 5 * step + 5]
        assert torch.equal(images, torch.from_numpy(RGB[idx]))
        assert labels.tolist() == SOURCES["rgb_labels"][idx].tolist()
    assert source.state() == {"position": 20, "size": 12, "skipped": 0}


def test_the_step_reads_fixed_buffers_that_advance_refills_in_place():
    # What a captured CUDA graph needs (step.mode=graph): the same device memory every step, new content.
    source = _source(FIX / "cond-rgb16.zip", batch=4, conditional=True)
    source.advance()
    images, labels = source.draw(4, None, SINGLE)
    pointers, first = (images.data_ptr(), labels.data_ptr()), images.clone()
    source.advance()
    again, labels_again = source.draw(4, None, SINGLE)
    assert (again.data_ptr(), labels_again.data_ptr()) == pointers and not torch.equal(again, first)


@on_gpu
def test_a_captured_graph_reads_each_batch_advance_copies_in():
    """step.mode=graph's contract on a GPU: the graph, captured once, sees every later batch that
    advance() copies (non-blocking, from pinned memory) into the device buffers."""
    want = _take(_source(FIX / "cond-rgb16.zip", batch=4, conditional=True), 4)
    source = _source(FIX / "cond-rgb16.zip", batch=4, conditional=True, device=torch.device("cuda"))
    source.advance()
    images, labels = source.draw(4, None, SINGLE)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sums, label_copy = images.float().sum((1, 2, 3)), labels + 0  # integers: exact in float32
    for step in range(4):
        if step:
            source.advance()
        graph.replay()
        assert torch.equal(sums.cpu(), want[step][0].float().sum((1, 2, 3))) and torch.equal(label_copy.cpu(), want[step][1])


def test_two_rank_sources_together_read_the_one_process_batches():
    one = _take(_source(FIX / "cond-rgb16.zip", batch=4, workers=2), 5)
    ranks = [_take(_source(FIX / "cond-rgb16.zip", batch=4, shard=Shard(k, 2), workers=1), 5) for k in range(2)]
    for step in range(5):
        assert torch.equal(one[step][0], torch.cat([ranks[0][step][0], ranks[1][step][0]]))


def test_a_source_resumed_at_a_saved_position_reads_what_an_uninterrupted_one_reads():
    straight = _take(_source(FIX / "cond-rgb16.zip", batch=5, workers=2), 7)
    first = _source(FIX / "cond-rgb16.zip", batch=5, workers=2)
    _take(first, 3)
    resumed = _source(FIX / "cond-rgb16.zip", batch=5, workers=2)
    resumed.load_state(first.state(), "ckpt")
    for a, b in zip(straight[3:], _take(resumed, 4)):
        assert torch.equal(a[0], b[0])
    with pytest.raises(UserError, match="set of 12 members, data.path has 10"):
        _source(FIX / "cond-rgb16.zip", max_items=10).load_state(first.state(), "ckpt")


def _with_corrupt_member(tmp_path) -> Path:
    path = write_dataset_zip(tmp_path / "bad.zip", RGB[:6], SOURCES["rgb_labels"][:6])
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("00000/img00000002.png")
    start = info.header_offset + 30 + len(info.filename)
    raw[start + 100 : start + 110] = b"\xff" * 10  # inside the stored PNG: the CRC-32 no longer matches
    path.write_bytes(bytes(raw))
    return path


def test_an_unreadable_member_stops_naming_it_or_is_skipped_and_counted(tmp_path):
    path = _with_corrupt_member(tmp_path)
    with pytest.raises(UserError, match=r"bad.zip/00000/img00000002.png: corrupt zip member .*data.skip_corrupt"):
        _take(_source(path, batch=6, workers=1), 1)
    source = _source(path, batch=6, workers=1, skip_corrupt=True)
    (images, _), = _take(source, 1)
    order = EpochOrder(6, 0).items(0, 6).tolist()
    k = order.index(2)
    assert torch.equal(images[k], torch.from_numpy(RGB[3]))  # replaced by the next readable member
    assert source.state()["skipped"] == 1


def test_a_conditional_run_without_labels_stops_at_start_up():
    with pytest.raises(UserError, match=r"data.conditional: .*uncond-gray16 has no labels"):
        _source(FIX / "uncond-gray16", conditional=True)


def test_a_killed_worker_is_one_line_and_no_hang():
    source = _source(FIX / "cond-rgb16.zip", batch=2, workers=2)
    _take(source, 1)
    pid = source._batches._workers[0].pid
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    with pytest.raises(UserError) as caught:  # at a batch, never from a signal handler elsewhere
        for _ in range(100):
            _take(source, 1)
    assert time.time() - t0 < 30
    assert f"pid {pid}" in str(caught.value) and "data.workers" in str(caught.value) and "\n" not in str(caught.value)


def test_loader_failure_messages_of_torch():
    timeout = loader_failure(RuntimeError("DataLoader timed out after 5 seconds"))
    assert str(timeout).startswith("data.timeout_s: no batch from the loader workers in 5 seconds")
    assert loader_failure(RuntimeError("CUDA error: out of memory")) is None


def test_a_folder_over_the_memory_budget_is_refused_before_decoding(tmp_path):
    with pytest.raises(UserError, match=r"data.memory_budget_gb: .*cond-rgb16.zip is 0.0 GB decoded.*data.source=stream"):
        load_dataset("folder", str(FIX / "cond-rgb16.zip"), budget_gb=1e-6)


# -- the two sources alike: one check, one decode, nothing a file says trusted unchecked ------------
def _refusal(call, *args, **kw) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kw)
    assert "\n" not in str(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("label", [-1, 10**12, 2**70])
def test_a_bad_label_is_refused_by_both_sources_with_the_same_line(tmp_path, label):
    # The stream source once trained label -1 as unlabelled (an all-zero one-hot) and overflowed on 2**70.
    path = write_dataset_zip(tmp_path / "set.zip", RGB[:4], [0, 1, label, 2])
    memory = _refusal(load_dataset, "folder", str(path))
    assert _refusal(_source, path, conditional=True, workers=0) == _refusal(_source, path, workers=0) == memory
    assert memory.startswith(str(path)) and str(label) in memory


def test_big_endian_latents_read_alike_and_float128_or_empty_ones_are_refused_alike(tmp_path):
    latents = np.random.default_rng(0).standard_normal((4, 4, 2, 2)).astype(">f4")
    path = write_dataset_zip(tmp_path / "big-endian.zip", latents)
    want = torch.from_numpy(latents.astype(np.float32))
    assert torch.equal(load_dataset("folder", str(path)).images, want)
    streamed = torch.cat([images for images, _ in _take(_source(path, batch=2), 2)])
    assert torch.equal(streamed, want[EpochOrder(4, 0).items(0, 4)])
    for name, arrays in {"float128": np.zeros((4, 4, 2, 2), np.longdouble), "empty": np.zeros((4, 8, 0, 0), np.float32)}.items():
        path = write_dataset_zip(tmp_path / f"{name}.zip", arrays)
        memory = _refusal(load_dataset, "folder", str(path))
        assert _refusal(_source, path, workers=0) == memory
        assert f"{name}.zip/00000/img-mean-std-00000000.npy: expected a [C, H, W] array of uint8, float16, float32, float64" in memory


def _zip_claiming(raw: bytes, name: str, claimed: int) -> bytes:
    """The zip ``raw`` with ``name``'s central-directory entry claiming ``claimed`` compressed bytes
    through a zip64 extra field, as a zip of members over 4 GiB holds them."""
    end = raw.rindex(b"PK\x05\x06")
    sig, disk, disk_cd, on_disk, count, _, start, _ = struct.unpack(zipfile.structEndArchive, raw[end : end + zipfile.sizeEndCentDir])
    pos, entries = start, []
    for _ in range(count):
        fields = list(struct.unpack(zipfile.structCentralDir, raw[pos : pos + zipfile.sizeCentralDir]))
        name_len, extra_len, comment_len = fields[12:15]
        at = pos + zipfile.sizeCentralDir
        member, extra, comment = raw[at : at + name_len], raw[at + name_len : at + name_len + extra_len], raw[at + name_len + extra_len :][:comment_len]
        if member == name.encode():
            fields[10] = 0xFFFFFFFF  # compressed size: read from the zip64 field
            extra = struct.pack("<HHQ", 1, 8, claimed) + extra
            fields[13] = len(extra)
        entries.append(struct.pack(zipfile.structCentralDir, *fields) + member + extra + comment)
        pos = at + name_len + extra_len + comment_len
    directory = b"".join(entries)
    return raw[:start] + directory + struct.pack(zipfile.structEndArchive, sig, disk, disk_cd, on_disk, count, len(directory), start, 0)


@pytest.mark.parametrize("claimed, match", [(2**40, "claims 1099511627776 bytes compressed"), (2**29, "past the file's")])
def test_a_zip_directory_claiming_more_than_the_file_holds_is_refused_before_reading(tmp_path, claimed, match):
    # os.pread allocates what it is asked for: 2**40 was a MemoryError, 2**29 half a gigabyte per read.
    raw = write_dataset_zip(tmp_path / "set.zip", RGB[:3], [0, 1, 2]).read_bytes()
    path = tmp_path / "claims.zip"
    path.write_bytes(_zip_claiming(raw, "00000/img00000000.png", claimed))
    memory = _refusal(load_dataset, "folder", str(path))
    assert _refusal(_source, path, workers=0) == memory
    assert memory.startswith(f"{path}/00000/img00000000.png: ") and match in memory


@pytest.mark.parametrize("state, match", [
    ({"position": 1.5, "size": 12}, "data position 1.5 is not a non-negative integer"),  # was truncated to 1, silently
    ({"position": -4, "size": 12}, "data position -4 is not"),
    ({"position": "8", "size": 12}, "data position '8' is not"),
    ({"position": True, "size": 12}, "data position True is not"),
    ({"position": 2**64, "size": 12}, "data position 18446744073709551616 is not"),
    ({"position": 8, "size": 12, "skipped": 0.5}, "data skipped 0.5 is not"),
    ({"position": 8, "size": "12"}, "data size '12' is not"),
    ({"position": 8}, "has no streaming position and size"),
])
def test_a_checkpoint_s_stream_state_is_checked_before_use(state, match):
    source = _source(FIX / "cond-rgb16.zip", workers=0)
    assert match in _refusal(source.load_state, state, "ckpt")
    assert source.state() == {"position": 0, "size": 12, "skipped": 0}


@pytest.mark.parametrize("workers", [0, 1])
def test_building_and_rebuilding_loaders_draws_nothing_from_the_global_torch_rng(workers):
    # The step's dropout draws from the global RNG; a DataLoader without a generator drew its workers'
    # base seed there each time an iterator was built (at start, after a resume, for the reference).
    before = torch.random.get_rng_state()
    source = _source(FIX / "cond-rgb16.zip", batch=4, conditional=True, workers=workers)
    _take(source, 2)
    source.load_state(source.state(), "ckpt")  # a resume: the next advance builds a new iterator
    _take(source, 2)
    source.reference(5)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc")
def test_loader_workers_leave_ctrl_c_and_sigterm_to_the_trainer():
    # Both reach the whole process group; a worker killed by them turned the trainer's clean stop into
    # a dead-worker error. The trainer alone stops (checkpoint, exit) and shuts its workers down.
    source = _source(FIX / "cond-rgb16.zip", batch=2, workers=1)
    _take(source, 1)
    pid = source._batches._workers[0].pid
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    assert ignored >> (signal.SIGINT - 1) & 1 and ignored >> (signal.SIGTERM - 1) & 1
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    assert len(_take(source, 8)) == 8 and source._batches._workers[0].is_alive()


# -- host memory ----------------------------------------------------------------------------------
_RSS = textwrap.dedent("""
    import resource, sys, torch
    from fastratio.data.formats import load_dataset
    from fastratio.data.stream import StreamSource
    from fastratio.shard import SINGLE
    path, source = sys.argv[1], sys.argv[2]
    if source == "stream":
        s = StreamSource(path, max_items=0, global_batch=64, shard=SINGLE, seed=0, device=torch.device("cpu"), conditional=True,
                         workers=1, prefetch=2, timeout_s=60, skip_corrupt=False)
        for _ in range(40):
            s.advance()
        del s
    else:
        data = load_dataset("folder", path)
    # VmHWM, not RUSAGE_SELF: Linux carries ru_maxrss across exec, so it would start at pytest's size.
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def _peak_rss_mb(path: Path, source: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _RSS, str(path), source], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    main, worker = (int(v) / 1024 for v in out.stdout.split())
    return main, worker


def test_streaming_host_memory_does_not_grow_with_the_set(tmp_path):
    rng = np.random.default_rng(0)
    paths = {}
    for n in (2000, 20000):  # 32x32 RGB: 6 MB and 61 MB decoded
        paths[n] = write_dataset_zip(tmp_path / f"set{n}.zip", (rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for _ in range(n)),
                                     [i % 10 for i in range(n)])
    small, large = (_peak_rss_mb(paths[n], "stream") for n in (2000, 20000))
    # Only the index grows with the set: ~60 bytes a member once built, under 1 KB at its start-up peak
    # (zipfile's directory and dataset.json's lists; measured 0.76 KB). The 3 KB images do not count.
    assert large[0] - small[0] < 18 and abs(large[1] - small[1]) < 4, (small, large)
    held_small, held_large = (_peak_rss_mb(paths[n], "memory")[0] for n in (2000, 20000))
    assert held_large - held_small > 55  # the same sets held in memory (>= 3 KB a member): the test can tell


# -- training runs that stream --------------------------------------------------------------------
# A tiny stage-1 run (the teacher reads real data every step) over EDM's zip: 12 images, batch 4, so
# epochs wrap every 3 steps. No dropout, so two ranks compute what one process does.
STREAM_RUN = [
    "run.progress=false", "run.log_every=1", "run.eval_every=1000", "run.plot_every=0", "run.ckpt_every=10",
    "run.precision=fp32", "run.device=cpu", "run.kernels=torch", "data.kind=folder", f"data.path={FIX / 'cond-rgb16.zip'}",
    "data.source=stream", "data.workers=1", "data.conditional=true", "model.channels=8", "model.channel_mult=[1,2]",
    "model.num_blocks=1", "model.attn_resolutions=[]", "model.dropout=0", "model.augment_dim=0", "augment.p=0",
    "optim.batch_size=4", "teacher.sample_steps=2", "data.eval_samples=8",
]


def _train_cmd(out: Path, steps: int, *extra: str, nproc: int = 1) -> list[str]:
    sets = [arg for kv in [*STREAM_RUN, f"run.out_dir={out}", f"run.steps={steps}"] for arg in ("--set", kv)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "fastratio.train", "configs/cifar10_teacher.yaml", *sets, *extra]


def _rows(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(run / "metrics.jsonl")}


def _killed_and_resumed(tmp_path: Path, steps: int, kill_after: int, *extra: str) -> tuple[Path, Path]:
    """(an uninterrupted run, the same run killed by SIGKILL once its checkpoint at ``kill_after`` exists
    and resumed with --resume auto): both folders."""
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, steps, *extra), cwd=ROOT, check=True, capture_output=True, timeout=300)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(run, steps, *extra), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not checkpoint.checkpoint_path(run, kill_after).exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    saved = checkpoint.load(checkpoint.list_checkpoints(run)[-1])
    assert saved["data"]["position"] == 4 * saved["step"] < 4 * steps
    subprocess.run(_train_cmd(run, steps, *extra, "--resume", "auto"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    return straight, run


# The configs' dropout: its masks come from the global RNG, which the loader once drew its workers' seed
# from when its iterator was rebuilt after a restore, so every loss after the resume point differed.
DROPOUT = ("--set", "model.dropout=0.1")


def test_sigkill_resume_with_streaming_and_dropout_reads_the_uninterrupted_batches_and_masks(tmp_path):
    straight, run = _killed_and_resumed(tmp_path, 60, 20, *DROPOUT)
    rows = _rows(straight)
    assert sorted(rows) == list(range(1, 61)) and _rows(run) == rows  # every step's loss, before and after the kill
    # The data order matters to the losses: a run that restarts its order at 0 reads other batches.
    restarted = tmp_path / "restarted"
    subprocess.run(_train_cmd(restarted, 20, *DROPOUT), cwd=ROOT, check=True, capture_output=True, timeout=300)
    state = checkpoint.load(checkpoint.list_checkpoints(restarted)[-1])
    state["data"]["position"] = 0
    checkpoint.save(state, checkpoint.checkpoint_path(restarted, 20))
    subprocess.run(_train_cmd(restarted, 30, *DROPOUT, "--resume", "auto"), cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert _rows(restarted)[21]["teacher_loss"] != _rows(straight)[21]["teacher_loss"]


def test_two_gloo_ranks_streaming_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        proc = subprocess.run(_train_cmd(out, 4, nproc=n), cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
    rows_one, rows_two = _rows(one), _rows(two)
    assert sorted(rows_two) == [1, 2, 3, 4]
    for step, row in rows_one.items():
        for key, value in row.items():
            assert rows_two[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (step, key)
    sa, sb = (checkpoint.load(checkpoint.list_checkpoints(r)[-1]) for r in (one, two))
    assert sa["data"] == sb["data"] == {"position": 16, "size": 12, "skipped": 0}
    for key, value in sa["nets"]["teacher"].items():
        torch.testing.assert_close(sb["nets"]["teacher"][key], value, rtol=1e-4, atol=1e-6)
