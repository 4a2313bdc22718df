"""``fastratio.sample --seeds``: one PNG per seed as EDM's generate.py writes them, the same bytes for a
seed whether drawn alone, in a batch of 64 or on 2 gloo ranks; class labels per seed; restartable;
the ADM evaluator's .npz; bad input as one line."""

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from testkit import idx_bytes

from fastratio import checkpoint
from fastratio.errors import UserError, run_cli
from fastratio.inference import seed_draw
from fastratio.sample import main as sample_main
from fastratio.sample import parse_seeds, seed_path
from fastratio.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 3


def train_tiny(root: Path) -> tuple[Path, Path]:
    """(stage-2 DiJS checkpoint, its teacher's checkpoint) of a class-conditional 8x8 grey set, 2 steps each."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 8, 8), dtype=np.uint8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.arange(40, dtype=np.uint8) % CLASSES)))
    common = ["run.progress=false", "run.steps=2", "run.plot_every=0", "run.eval_every=100", "data.eval_samples=4",
              "optim.batch_size=4", "teacher.sample_steps=1", "model.channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1",
              "model.attn_resolutions=[]", "data.conditional=true", "run.precision=fp32", f"data.path={root / 'train-images-idx3-ubyte.gz'}"]
    sets = lambda *kv: [a for item in (*common, *kv) for a in ("--set", item)]
    assert train_main([str(ROOT / "configs" / "fashion_mnist_teacher.yaml"), *sets(f"run.out_dir={root / 't'}")]) == 0
    teacher = checkpoint.list_checkpoints(root / "t")[-1]
    assert train_main([str(ROOT / "configs" / "fashion_mnist.yaml"), *sets(f"run.out_dir={root / 's'}", f"teacher.checkpoint={teacher}")]) == 0
    return checkpoint.list_checkpoints(root / "s")[-1], teacher


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("seeds"))


def _files(outdir: Path) -> dict[str, bytes]:
    return {p.relative_to(outdir).as_posix(): p.read_bytes() for p in sorted(outdir.rglob("*.png"))}


def test_parse_seeds_reads_edms_syntax_and_refuses_the_rest():
    assert parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert parse_seeds("7") == [7] and parse_seeds("5, 2-3, 5") == [5, 2, 3]
    assert len(parse_seeds("0-49999")) == 50000
    for bad, why in [("", "is not a seed"), ("a-b", "is not a seed"), ("1,,2", "is not a seed"), ("-1", "is not a seed"),
                     ("3-1", "is empty"), ("4294967296", "above"), ("0-99999999", "more than")]:
        with pytest.raises(UserError, match=f"^--seeds: .*{why}"):
            parse_seeds(bad)


def test_a_seeds_image_is_the_same_alone_in_a_batch_of_64_and_on_two_gloo_ranks(tiny, tmp_path):
    ckpt, _ = tiny
    common = ["--device", "cpu"]
    assert sample_main([str(ckpt), "--seeds", "0-69", "--outdir", str(tmp_path / "b64"), "--batch", "64",
                        "--npz", str(tmp_path / "s.npz"), *common]) == 0
    batched = _files(tmp_path / "b64")
    assert sorted(batched)[:2] == ["000000/000000.png", "000000/000001.png"] and len(batched) == 70  # EDM's names
    for seed in (0, 37, 69):
        assert sample_main([str(ckpt), "--seeds", str(seed), "--outdir", str(tmp_path / "alone"), *common]) == 0
    alone = _files(tmp_path / "alone")
    assert len(alone) == 3 and all(alone[k] == batched[k] for k in alone)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastratio.sample",
                           str(ckpt), "--seeds", "0-69", "--outdir", str(tmp_path / "ranks"), "--batch", "5", *common],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0: wrote 35 images" in proc.stdout and "rank 1: wrote 35 images" in proc.stdout
    assert _files(tmp_path / "ranks") == batched
    assert len(set(batched.values())) == 70  # every seed its own image
    # The ADM evaluator's layout: the PNGs in seed order, grey as RGB, and each seed's class as EDM draws it.
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (70, 8, 8, 3) and labels.dtype == np.int64
    first = np.asarray(Image.open(seed_path(tmp_path / "b64", 37)))
    assert np.array_equal(images[37], np.repeat(first[..., None], 3, axis=2))
    assert labels.tolist() == [seed_draw(s, (1, 8, 8), CLASSES)[1] for s in range(70)] and set(labels.tolist()) == {0, 1, 2}


def test_a_stopped_run_restarts_where_it_was_and_class_fixes_the_label(tiny, tmp_path):
    ckpt, teacher = tiny
    out = tmp_path / "out"
    argv = [str(ckpt), "--seeds", "0-9", "--outdir", str(out), "--batch", "4", "--device", "cpu"]
    assert sample_main(argv) == 0
    first = _files(out)
    seed_path(out, 3).unlink()
    seed_path(out, 5).write_bytes(b"kept")  # an existing file is never redrawn
    assert sample_main(argv) == 0
    again = _files(out)
    assert again["000000/000003.png"] == first["000000/000003.png"] and again["000000/000005.png"] == b"kept"
    assert sample_main([*argv[:4], str(tmp_path / "c"), "--class", "2", "--npz", str(tmp_path / "c.npz"), "--device", "cpu"]) == 0
    with np.load(tmp_path / "c.npz") as f:
        assert f["arr_1"].tolist() == [2] * 10
    # A teacher checkpoint (Heun) follows the same rule.
    for name, batch in (("t1", "1"), ("t3", "3")):
        assert sample_main([str(teacher), "--seeds", "4-6", "--steps", "2", "--outdir", str(tmp_path / name), "--batch", batch,
                            "--device", "cpu"]) == 0
    assert _files(tmp_path / "t1") == _files(tmp_path / "t3")
    assert sample_main([str(ckpt), "--n", "4", "--out", str(tmp_path / "grid.png"), "--device", "cpu"]) == 0  # the grid mode still works


def test_best_of_n_by_either_rule_gives_a_seed_the_same_image_whatever_its_batch(tiny, tmp_path):
    ckpt, _ = tiny
    files = {}
    for rule in ("max", "resample"):
        for batch in ("1", "16"):
            out = tmp_path / f"{rule}{batch}"
            assert sample_main([str(ckpt), "--seeds", "0-15", "--outdir", str(out), "--batch", batch, "--best-of", "4",
                                "--select", rule, "--device", "cpu"]) == 0
            files[rule, batch] = _files(out)
        assert files[rule, "1"] == files[rule, "16"]
    # The same candidates, kept by another rule: most seeds keep the same one, some another.
    assert 0 < sum(files["max", "1"][k] != files["resample", "1"][k] for k in files["max", "1"]) < 16


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "3-1", "--outdir", "D"], "--seeds: the range 3-1 is empty"),
    (["--seeds", "x", "--outdir", "D"], "--seeds: 'x' is not a seed"),
    (["--seeds", "0-3"], "--seeds: give --outdir"),
    (["--outdir", "D"], "--outdir/--npz: they write one image per seed; give --seeds too"),
    (["--seeds", "0-3", "--outdir", "D", "--batch", "0"], "--batch: must be >= 1"),
    (["--seeds", "0-3", "--outdir", "D", "--class", "7"], "--class: 7 outside [0, 3)"),
])
def test_bad_seed_arguments_are_one_line(tiny, tmp_path, capsys, argv, message):
    ckpt, _ = tiny
    argv = [a.replace("D", str(tmp_path / "d")) if a == "D" else a for a in argv]
    assert run_cli(sample_main, [str(ckpt), *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.png"))


def test_text_to_image_seeds_take_prompt_seed_mod_count_whatever_the_batch(tmp_path):
    from test_text2image import PROMPTS, _overrides

    from fastratio import config
    from fastratio.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    run = train(config.load(None, _overrides("vsd", tmp_path / "run", prompts, "run.steps=2")))
    ckpt = str(checkpoint.list_checkpoints(run)[-1])
    assert sample_main([ckpt, "--seeds", "0-5", "--prompts", str(prompts), "--outdir", str(tmp_path / "a"), "--batch", "4",
                        "--npz", str(tmp_path / "a.npz"), "--device", "cpu"]) == 0
    assert sample_main([ckpt, "--seeds", "4", "--prompts", str(prompts), "--outdir", str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert sample_main([ckpt, "--seeds", "4", "--prompt", PROMPTS[1], "--outdir", str(tmp_path / "c"), "--device", "cpu"]) == 0
    batched = _files(tmp_path / "a")
    assert len(batched) == 6 and _files(tmp_path / "b") == _files(tmp_path / "c") == {"000000/000004.png": batched["000000/000004.png"]}
    assert batched["000000/000001.png"] != batched["000000/000004.png"]  # the same prompt, another seed's noise
    with np.load(tmp_path / "a.npz") as f:
        assert f.files == ["arr_0"] and f["arr_0"].shape[0] == 6 and f["arr_0"].shape[-1] == 3
