"""Text-to-image runs end to end on CPU with the tiny Stable Diffusion folder and WebDataset shards written
by diffusers, transformers and webdataset (tests/fixtures/sd15, tests/fixtures/webdataset): each method
trains with finite losses, checkpoints, resumes after SIGKILL with the same losses; the export loads in
diffusers and reproduces the one-step output; the sample CLI; 2 gloo ranks equal one process."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastratio import checkpoint, config
from fastratio.runlog import TIMING_KEYS, read_jsonl
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "sd15" / "tiny-sd15"
PROMPTS = ["a red cube on a table", "a blue ball on grass", "the sea at night", "two cats", "a city street in rain"]
# Per method: its data (pixel pairs, latent pairs, or prompts only) and the settings it is run with.
METHODS = {
    "vsd": ["method.name=vsd", "method.cfg_scale=1.75", "noise.weighting=dmd", "data.resolution=32", "noise.sigma_dist=sd_steps"],
    "dibregman": ["method.name=dibregman", "method.objective=sba", "method.cfg_scale=1.75", "data.resolution=16",
                  f"data.path={FIX / 'webdataset' / 'latents'}", "model.shared_encoder=true"],
    "dibregman_ratio_net": ["method.name=dibregman", "method.objective=sba", "method.gan_weight=0.1", "data.resolution=32",
                            f"data.path={FIX / 'webdataset' / 'images'}"],
    "diffratio": ["method.name=diffratio", "data.caption_dropout=0.5", "data.resolution=32", f"data.path={FIX / 'webdataset' / 'images'}"],
}
BASE = [
    "data.kind=text2image", "data.source=stream", "data.workers=0", "data.eval_samples=4", "model.arch=sd",
    "model.sigma_init=14.6146", f"teacher.checkpoint={TINY}", "noise.schedule=vp", "noise.sigma_min=0.138", "noise.sigma_max=13.04",
    "method.ratio_steps=1", "method.fake_score_steps=1", "optim.batch_size=4", "optim.gen_lr=1e-4", "optim.ratio_lr=1e-4",
    "optim.lr_schedule=constant", "run.device=cpu", "run.kernels=torch", "run.progress=false", "run.log_every=1",
    "run.eval_every=100", "run.plot_every=0", "run.ckpt_every=2", "run.steps=4", "run.explode_factor=0",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _overrides(method: str, out: Path, prompts: Path, *extra: str) -> list[str]:
    data = [] if method == "diffratio" else [f"data.prompts={prompts}"]
    return [*BASE, *METHODS[method], *data, f"run.out_dir={out}", *extra]


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_jsonl(run / "metrics.jsonl")}


def _cmd(overrides: list[str], *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastratio.train", *[a for kv in overrides for a in ("--set", kv)], *extra]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_checkpoints_and_resumes_after_sigkill(tmp_path, prompts, method):
    reference = train(config.load(None, _overrides(method, tmp_path / "reference", prompts)))
    losses = _losses(reference)
    assert sorted(losses) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for row in losses.values() for v in row.values())
    assert {"gen_grad_norm", "gen_direction_norm"} <= set(losses[1])
    assert ("ratio_loss" in losses[1]) == (method != "vsd") and ("fake_dsm_loss" in losses[1]) == (method != "diffratio")
    assert ("ratio_grad_norm" in losses[1]) == (method in ("diffratio", "dibregman_ratio_net"))  # shared: one update
    state = checkpoint.load(checkpoint.list_checkpoints(reference)[-1])
    assert state["step"] == 4 and state["sd"]["t_init"] == 999

    run = tmp_path / "killed"
    # The killed process computes with this process's thread count (an xdist worker has fewer threads,
    # and float sums then round differently): the comparison below is exact.
    proc = subprocess.Popen(_cmd(_overrides(method, run, prompts, "run.steps=1000")), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.time() + 300
    while not checkpoint.checkpoint_path(run, 2).exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    train(config.load(None, _overrides(method, run, prompts)), resume="auto")
    assert _losses(run) == losses  # every logged step, before and after the kill, as the uninterrupted run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prompts) -> Path:
    out = tmp_path_factory.mktemp("trained")
    train(config.load(None, _overrides("vsd", out, prompts, "run.steps=2")))
    return checkpoint.list_checkpoints(out)[-1]


def test_export_loads_in_diffusers_and_reproduces_the_one_step_output(tmp_path, trained):
    from diffusers import UNet2DConditionModel

    from fastratio.export import export
    from fastratio.networks.sd import generator_from_checkpoint
    from fastratio.sample import one_step

    out = export(trained, tmp_path / "export")
    info = json.loads((out / "fastratio.json").read_text())
    assert info["timestep"] == 999 and info["prediction_type"] == "epsilon"
    unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True, use_safetensors=True).eval()
    model, parts = generator_from_checkpoint(checkpoint.load(trained), str(trained), torch.device("cpu"))
    ours = one_step(model, parts, ["a red cube", "two cats"], seed=3, shape=(4, 16, 16), device=torch.device("cpu"))
    # The docs' recipe (fastratio.export), in plain diffusers terms.
    z = torch.stack([torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(3 + i)) for i in range(2)])
    text = parts.text(["a red cube", "two cats"])
    x_t = info["input_scale"] * z
    with torch.no_grad():
        out_eps = unet(x_t, info["timestep"], encoder_hidden_states=text).sample
    abar = info["alphas_cumprod_t"]
    x0 = (x_t - math.sqrt(1 - abar) * out_eps) / math.sqrt(abar)
    torch.testing.assert_close(x0, ours, rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="exists"):
        export(trained, out)  # never overwrites


def test_sample_cli_writes_a_decoded_grid(tmp_path, trained, prompts, capsys):
    from PIL import Image

    from fastratio.errors import run_cli
    from fastratio.sample import main

    grid = tmp_path / "grid.png"
    assert main([str(trained), "--prompt", "a red cube", "--n", "4", "--out", str(grid), "--device", "cpu"]) == 0
    assert Image.open(grid).size[0] > 32
    from_file = tmp_path / "file.png"
    assert main([str(trained), "--prompts", str(prompts), "--n", "3", "--out", str(from_file), "--device", "cpu"]) == 0
    assert from_file.is_file()
    assert run_cli(main, [str(trained), "--prompt", "x" * 10**6, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "prompt of 1000000 characters" in err
    state = checkpoint.load(trained)
    state["sd"]["shape"] = [4, 10**9, 10**9]  # a hostile checkpoint: refused before anything is allocated
    checkpoint.save(state, tmp_path / "hostile.pt")
    assert run_cli(main, [str(tmp_path / "hostile.pt"), "--prompt", "a cat", "--device", "cpu"]) == 2
    assert "sd.shape" in capsys.readouterr().err


def test_two_gloo_ranks_equal_one_process(tmp_path, prompts):
    over = _overrides("diffratio", tmp_path / "one", prompts, "data.caption_dropout=0.25")
    subprocess.run(_cmd(over), cwd=ROOT, check=True, capture_output=True, timeout=600)
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *_cmd(_overrides("diffratio", two, prompts, "data.caption_dropout=0.25"))[1:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_rows, two_rows = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert len(one_rows) == len(two_rows) == 4
    for a, b in zip(one_rows, two_rows, strict=True):
        for key in a:
            if key not in (*TIMING_KEYS, "step", "kimg"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    sa, sb = (checkpoint.load(checkpoint.list_checkpoints(r)[-1]) for r in (tmp_path / "one", two))
    for key, value in sa["ema"].items():
        torch.testing.assert_close(sb["ema"][key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path, prompts):
    eager = train(config.load(None, _overrides("dibregman", tmp_path / "eager", prompts, "run.steps=3")))
    compiled = train(config.load(None, _overrides("dibregman", tmp_path / "compiled", prompts, "run.steps=3", "step.mode=compile")))
    for a, b in zip(read_jsonl(eager / "metrics.jsonl"), read_jsonl(compiled / "metrics.jsonl"), strict=True):
        for key in a:
            if key not in TIMING_KEYS:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), (a["step"], key)


def test_latent_shards_written_through_the_teacher_vae(tmp_path):
    """encode_sd_latents: SD's convention (posterior mean x scaling_factor), keys and captions kept,
    read back by the training source as latents; an existing folder is never replaced."""
    from fastratio.data.captions import CaptionSource, TarShards, decode_image, shard_paths
    from fastratio.errors import UserError
    from fastratio.networks.sd import load_sd
    from fastratio.shard import SINGLE
    from fastratio.tools.encode_sd_latents import main

    src = FIX / "webdataset" / "images"
    out = tmp_path / "latents"
    assert main([str(src), str(out), "--teacher", str(TINY), "--resolution", "16", "--per-shard", "4", "--no-progress", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    images, latents = TarShards(shard_paths(str(src))), TarShards(shard_paths(str(out)))
    assert latents.latent and list(latents.keys) == list(images.keys)
    vae = load_sd(str(TINY), torch.device("cpu")).vae
    source = CaptionSource(str(out), kind="pairs", resolution=16, global_batch=len(images), shard=SINGLE, seed=0)
    got, captions, embeddings = source.reference(len(images))
    assert embeddings is None and not latents.embedded
    for i in range(len(images)):
        raw, caption = images.read(i)
        pixels = torch.from_numpy(decode_image(raw, images.member(i), 16))[None].float() / 127.5 - 1
        with torch.no_grad():
            want = (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).half().float()[0]
        j = captions.index(caption)
        torch.testing.assert_close(got[j], want, rtol=2e-3, atol=1e-4)  # float16: batched vs single encodes may differ by an ulp
    with pytest.raises(UserError, match="exists"):
        main([str(src), str(out), "--teacher", str(TINY)])


def test_text_embeddings_precomputed_with_the_latents_replace_the_text_encoder(tmp_path, monkeypatch):
    """encode_sd_latents --text-embeddings stores each caption's text-encoder output (KEY.emb.npy, read
    back by webdataset as one sample with the latents); a run on those shards without data.prompts runs
    no text encoder per step, and its embeddings are the encoder's (float16), a dropped caption's the
    empty prompt's."""
    import numpy as np
    import webdataset as wds

    from fastratio.networks.sd import TextEncoder, load_sd
    from fastratio.tasks.text2image import TextToImageTask
    from fastratio.tools.encode_sd_latents import main

    out = tmp_path / "latents"
    assert main([str(FIX / "webdataset" / "images"), str(out), "--teacher", str(TINY), "--resolution", "16",
                 "--no-progress", "--device", "cpu", "--text-embeddings"]) == 0
    text = load_sd(str(TINY), torch.device("cpu")).text
    samples = list(wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False))
    assert samples and all(set(s) >= {"npy", "txt", "emb.npy"} for s in samples)
    for s in samples:
        stored = np.load(io.BytesIO(s["emb.npy"]))
        assert stored.dtype == np.float16 and stored.shape == tuple(text.empty.shape[1:])
        torch.testing.assert_close(torch.from_numpy(stored).float(), text([s["txt"].decode()])[0].half().float(), rtol=0, atol=0)

    cfg = config.load(None, [*BASE, *METHODS["diffratio"], f"data.path={out}", "data.resolution=16", "data.caption_dropout=0.5",
                             f"run.out_dir={tmp_path / 'run'}"])
    task = TextToImageTask(cfg, torch.device("cpu"))
    calls = []
    encode = TextEncoder.__call__
    monkeypatch.setattr(TextEncoder, "__call__", lambda self, prompts: (calls.append(prompts), encode(self, prompts))[1])
    by_caption = {s["txt"].decode(): torch.from_numpy(np.load(io.BytesIO(s["emb.npy"]))).float() for s in samples}
    dropped = kept = 0
    for _ in range(4):
        position = task.pairs.position
        task.advance()
        assert calls == []
        redo = type(task.pairs)(str(out), kind="pairs", resolution=16, global_batch=4, shard=task.shard, seed=cfg.run.seed,
                                caption_dropout=0.5)
        redo.position = position
        _, batch_captions, _ = redo.advance()
        for row, caption in enumerate(batch_captions):
            want = text.empty[0] if caption == "" else by_caption[caption]
            torch.testing.assert_close(task.text_real[row], want, rtol=0, atol=0)
            dropped, kept = dropped + (caption == ""), kept + (caption != "")
    assert dropped and kept and torch.equal(task.text_fake, task.text_real)


@pytest.mark.parametrize(("override", "key"), [
    ("noise.schedule=ve", "noise.schedule"),
    ("data.source=memory", "data.source"),
    ("method.name=teacher", "method.name"),
    ("augment.p=0.1", "augment.p"),
    ("data.caption_dropout=1.0", "data.caption_dropout"),
    ("model.arch=ddpmpp", "model.arch"),
])
def test_text2image_config_refusals_name_the_key(override, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [*BASE, *METHODS["vsd"], override])


@pytest.mark.parametrize(("overrides", "message"), [
    (["method.name=diffratio", "method.cfg_scale=1.0", "noise.weighting=sigma2"], "data.path: method.name=diffratio trains a ratio net"),
    (["noise.sigma_dist=loguniform", "noise.sigma_min=0.001"], "leaves the teacher's grid"),
    (["data.path=/nonexistent/shards"], "/nonexistent/shards"),
])
def test_text2image_task_refusals(tmp_path, prompts, overrides, message):
    from fastratio.errors import UserError
    from fastratio.tasks import build_task

    cfg = config.load(None, [*_overrides("vsd", tmp_path / "run", prompts), *overrides])
    with pytest.raises(UserError, match=message):
        build_task(cfg, torch.device("cpu"))
