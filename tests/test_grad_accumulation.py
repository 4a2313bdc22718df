"""optim.batch_gpu (gradient accumulation, EDM's --batch-gpu): a step whose updates run as 4 micro-batches
of batch_gpu samples equals the unsplit step. Every update is split (ratio, fake score, shared encoder,
generator, stage-1 teacher); the random numbers are the unsplit step's (the generator ends in the same
state); on the toy and a tiny UNet, losses, gradient norms and every weight (and the EMAs) agree to 1e-5
in float32, eagerly and in a compiled step; the text-to-image path to its own rounding floor. Under DDP
the gradients are all-reduced once per update; 2 gloo ranks in micro-batches equal one unsplit process;
nothing syncs with the host. Refusals name optim.batch_gpu; the step-cost model's peak falls with
batch_gpu."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastratio import checkpoint, config
from fastratio.draws import Draws
from fastratio.networks.denoisers import build_denoiser
from fastratio.runner import StepRunner
from fastratio.shard import SINGLE, Shard
from fastratio.step import Networks, TeacherStep, TrainStep
from fastratio.tasks import build_task
from fastratio.tasks.image import network_kwargs
from fastratio.train import build_averages, build_optimizers

ROOT = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-5, "atol": 1e-5}
TOY = ["optim.batch_size=32", "model.gen_hidden=16", "model.ratio_hidden=16", "model.score_hidden=16", "method.teacher_steps=1",
       "run.kernels=torch", "run.device=cpu", "run.progress=false", "optim.grad_clip=1.0", "noise.schedule=vp"]


def _roles(nets: Networks) -> list[str]:
    return [r for r in ("generator", "ratio", "teacher", "fake_score") if getattr(nets, r) is not None]


def _run(cfg: config.Config, steps: int = 2) -> tuple[list[dict], dict, torch.Tensor]:
    """(per-step metrics, every weight of every network and EMA, the random generator's state) after
    ``steps`` iterations of the trainer's runner (data sampling, the step, the EMA updates)."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    task = build_task(cfg, device)
    nets = task.build_networks()
    opts = build_optimizers(nets, cfg)
    rng = torch.Generator(device).manual_seed(1)
    step = (TeacherStep if cfg.method.name == "teacher" else TrainStep)(cfg, nets, opts, Draws(rng), SINGLE, None)
    ema, ratio_ema, averages = build_averages(nets, cfg)
    runner = StepRunner(cfg, task, nets, step, SINGLE, device, averages, optimizers=opts)
    metrics = [{k: float(v) for k, v in runner().items()} for _ in range(steps)]
    weights = {f"{role}.{k}": v.detach().clone() for role in _roles(nets) for k, v in getattr(nets, role).state_dict().items()}
    for name, average in (("ema", ema), ("ratio_ema", ratio_ema)):
        if average is not None:
            weights.update({f"{name}.{k}": v.detach().clone() for k, v in average.module.state_dict().items()})
    return metrics, weights, rng.get_state()


def _assert_same(unsplit, split) -> None:
    for step, (a, b) in enumerate(zip(unsplit[0], split[0], strict=True)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=TOL["rtol"], abs=TOL["atol"]), (step, key, a[key], b[key])
    assert unsplit[1].keys() == split[1].keys()
    for key, value in unsplit[1].items():
        torch.testing.assert_close(split[1][key], value, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert torch.equal(unsplit[2], split[2])  # the same random numbers were drawn, no more


def _split_equals_unsplit(path: Path, overrides: list[str], micro: int, steps: int = 2) -> dict:
    unsplit = _run(config.load(path, overrides), steps)
    split = _run(config.load(path, [*overrides, f"optim.batch_gpu={micro}"]), steps)
    _assert_same(unsplit, split)
    return split[0][-1]


TOY_CASES = {
    "dijs": ["method.name=diffratio", "method.objective=dijs", "method.ratio_steps=2"],
    "dijs-r1-gan": ["method.name=diffratio", "method.objective=dijs", "method.r1_gamma=0.5", "method.gan_weight=0.1"],
    # the fused Triton kernels (interpreted on the CPU): Philox noise per micro-batch row offset, surrogate, classifier
    "dijs-triton": ["method.name=diffratio", "method.objective=dijs", "run.kernels=triton"],
    "vsd": ["method.name=vsd", "method.fake_score_steps=2"],
    "vsd-dmd": ["method.name=vsd", "noise.weighting=dmd"],  # DMD's per-sample normalisation
    "dibregman": ["method.name=dibregman", "method.objective=sba", "method.ratio_steps=2", "method.fake_score_steps=1"],
}


@pytest.mark.parametrize("case", sorted(TOY_CASES))
def test_toy_step_in_four_micro_batches_equals_the_unsplit_step(case):
    last = _split_equals_unsplit(ROOT / "configs" / "toy2d.yaml", [*TOY, *TOY_CASES[case]], micro=8)
    assert last["gen_grad_norm"] > 0


def test_toy_stage_one_teacher_update_in_micro_batches_equals_the_unsplit_update():
    """The toy's stage 1 (fastratio.train.pretrain_teacher) runs TeacherStep on the task's teacher."""

    def fit(micro):
        cfg = config.load(ROOT / "configs" / "toy2d.yaml", [*TOY, "method.name=vsd", f"optim.batch_gpu={micro}"])
        torch.manual_seed(0)
        task = build_task(cfg, torch.device("cpu"))
        teacher = task.build_teacher()
        opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
        rng = torch.Generator().manual_seed(3)
        step = TeacherStep(cfg, Networks(teacher=teacher), {"teacher": opt}, Draws(rng))
        metrics = [{k: float(v) for k, v in step(task.sample_real(32, rng)[0]).items()} for _ in range(2)]
        return metrics, {k: v.clone() for k, v in teacher.state_dict().items()}, rng.get_state()

    _assert_same(fit(0), fit(8))


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A tiny conditional image set (1x8x8, 2 classes) and a random DDPM++ teacher checkpoint with
    augmentation labels, in the stage-1 format."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    np.savez(root / "d.npz", images=rng.integers(0, 256, (64, 1, 8, 8), dtype=np.uint8), labels=np.arange(64) % 2)
    cfg = config.load(ROOT / "configs" / "fashion_mnist_teacher.yaml", _image(root, "teacher"))
    kwargs = network_kwargs(cfg, (1, 8, 8), 2)
    torch.manual_seed(0)
    checkpoint.save({"network_kwargs": kwargs, "config": config.to_dict(cfg), "ema": build_denoiser(kwargs).state_dict()}, root / "teacher.pt")
    return root


def _image(root: Path, method: str) -> list[str]:
    return ["model.channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]", "model.dropout=0",
            "data.kind=npz", f"data.path={root / 'd.npz'}", "data.conditional=true", "model.augment_dim=9", "augment.p=0.5",
            "optim.batch_size=16", "run.progress=false", "run.plot_every=0", "run.eval_every=100", "run.precision=fp32",
            "run.kernels=torch", "run.device=cpu", "optim.grad_clip=1.0", f"run.out_dir={root / method}",
            *([] if method == "teacher" else [f"teacher.checkpoint={root / 'teacher.pt'}", f"method.name={method}"])]


IMAGE_CASES = {
    "teacher": ("fashion_mnist_teacher.yaml", []),
    "dijs": ("fashion_mnist.yaml", ["method.objective=dijs"]),
    "vsd": ("fashion_mnist.yaml", []),
    "dibregman": ("fashion_mnist.yaml", ["method.objective=sba"]),
    # the ratio read off the fake score's encoder: one update trains both losses
    "dibregman-shared": ("fashion_mnist.yaml", ["method.objective=sba", "model.shared_encoder=true", "method.ratio_steps=1",
                                                "method.fake_score_steps=1"]),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_tiny_unet_step_in_four_micro_batches_equals_the_unsplit_step(image_files, case):
    """Conditional, augmented (the augmentation's draws are sliced per micro-batch too)."""
    name, extra = IMAGE_CASES[case]
    method = "teacher" if case == "teacher" else {"dijs": "diffratio"}.get(case, case.split("-")[0])
    _split_equals_unsplit(ROOT / "configs" / name, [*_image(image_files, method), *extra], micro=4)


@pytest.mark.parametrize("method", ["dibregman", "vsd"])
def test_text_to_image_step_in_micro_batches_equals_the_unsplit_step(tmp_path, method):
    """The text-to-image path (tiny SD1.5-layout UNet, CLIP embeddings sliced with the rows): Di-Bregman
    with the shared encoder on latent pairs; VSD with guidance (cfg 1.75) and DMD's weighting."""
    from test_text2image import _overrides

    from fastratio.runlog import read_jsonl
    from fastratio.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube on a table\na blue ball on grass\nthe sea at night\ntwo cats\n")
    runs = [train(config.load(None, _overrides(method, tmp_path / name, prompts, "run.steps=2", "run.ckpt_every=2", *extra)))
            for name, extra in (("whole", []), ("split", ["optim.batch_gpu=1"]))]
    # 2e-4: this path's own rounding floor. The unsplit Di-Bregman (SBA, exponential weights) run
    # moves its second step's gen_grad_norm by 5e-5 when only torch's thread count goes from 2 to 1.
    for a, b in zip(*(read_jsonl(r / "metrics.jsonl") for r in runs), strict=True):
        for key in a:
            if key.endswith(("_loss", "_norm", "_potential")):
                assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-5), (a["step"], key)
    # Adam's first steps move a weight by about +-lr whatever its gradient's size, so a gradient element
    # near 0 flips with rounding (the same thread-count change moves a few weights by 2 lr = 2e-4).
    # Nearly every weight agrees to 1e-5; none is further apart than those flips.
    sa, sb = (checkpoint.load(checkpoint.list_checkpoints(r)[-1]) for r in runs)
    apart = total = 0
    for role in sa["nets"]:
        for key, value in sa["nets"][role].items():
            if value.is_floating_point():
                apart += int((~torch.isclose(sb["nets"][role][key], value, **TOL)).sum())
                total += value.numel()
                assert (sb["nets"][role][key] - value).abs().max() <= 2.5e-4, (role, key)
    assert apart <= 1e-4 * total, (apart, total)
    assert torch.equal(sa["rng"]["train"], sb["rng"]["train"])


# A cold whole-step compile on 2 shared cores: ~70 s for 2 micro-batches, ~120 s for 4 (the graph is unrolled).
@pytest.mark.parametrize("micro", [16, pytest.param(8, marks=pytest.mark.slow)])
def test_compiled_step_in_micro_batches_equals_the_eager_unsplit_step(micro):
    """The accumulation loop is unrolled into the one compiled graph (no break, no recompile): step 1
    records the draws eagerly, step 2 compiles, step 3 replays the compiled step."""
    overrides = [*TOY, *TOY_CASES["dijs"], "method.ratio_steps=1"]
    unsplit = _run(config.load(ROOT / "configs" / "toy2d.yaml", overrides), steps=3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    split = _run(config.load(ROOT / "configs" / "toy2d.yaml", [*overrides, "step.mode=compile", f"optim.batch_gpu={micro}"]), steps=3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    _assert_same(unsplit, split)


@pytest.mark.parametrize("method", ["diffratio", "dibregman"])
def test_split_iteration_has_no_host_sync(method):
    """The accumulation loop reads nothing back to the host (it is captured whole in graph mode)."""
    from test_no_host_sync import _run_without_sync

    cfg = config.load(ROOT / "configs" / "toy2d.yaml", [*TOY, f"method.name={method}", "optim.lr_schedule=constant", "optim.batch_gpu=8"])
    torch.manual_seed(0)
    task = build_task(cfg, torch.device("cpu"))
    nets = task.build_networks()
    opts = build_optimizers(nets, cfg)
    step = TrainStep(cfg, nets, opts, Draws(torch.Generator().manual_seed(0)), SINGLE, None)
    _run_without_sync(StepRunner(cfg, task, nets, step, SINGLE, torch.device("cpu"), build_averages(nets, cfg)[2], optimizers=opts))


def test_ddp_all_reduces_once_per_update_not_per_micro_batch(tmp_path):
    """Under DDP every micro-batch but the last runs in no_sync: a split update all-reduces its
    gradient buckets exactly as often as the unsplit one (a one-rank gloo group, in process)."""
    import torch.distributed as dist

    from fastratio import distributed

    def reductions(micro):
        calls = []

        def counting(name):
            def hook(state, bucket):
                calls.append(name)
                done = torch.futures.Future()
                done.set_result(bucket.buffer())
                return done

            return hook

        cfg = config.load(ROOT / "configs" / "toy2d.yaml", [*TOY, "method.name=dibregman", "method.ratio_steps=2", f"optim.batch_gpu={micro}"])
        torch.manual_seed(0)
        task = build_task(cfg, torch.device("cpu"))
        nets = task.build_networks()
        opts = build_optimizers(nets, cfg)
        ctx = distributed.Context(0, 2, 0, torch.device("cpu"))  # world 2: wrap() builds the DDP wrappers
        wrapped = {name: distributed.wrap(getattr(nets, name), ctx) for name in opts}
        for name, ddp in wrapped.items():
            ddp.register_comm_hook(None, counting(name))
        rng = torch.Generator().manual_seed(0)
        step = TrainStep(cfg, nets, opts, Draws(rng), SINGLE, wrapped)
        x, labels = task.sample_real(32, rng)
        z, labels_fake = task.sample_latent(32, rng)
        metrics = step(x, z, labels, labels_fake)
        return calls, {k: float(v) for k, v in metrics.items()}

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        calls_unsplit, unsplit = reductions(0)
        calls_split, split = reductions(8)
    finally:
        dist.destroy_process_group()
    assert calls_unsplit == calls_split and set(calls_split) == {"ratio", "fake_score", "generator"}
    for key, value in unsplit.items():
        assert split[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_two_gloo_ranks_in_micro_batches_equal_one_unsplit_process(tmp_path):
    """torchrun, 2 ranks x 4 micro-batches of 4 against one process with the whole batch of 32."""
    from test_distributed import _run as run_torchrun
    from test_distributed import assert_same_runs


    args = ("method.name=diffratio", "run.kernels=torch")
    one = run_torchrun(tmp_path / "one", 1, *args)
    two = run_torchrun(tmp_path / "two", 2, *args, "optim.batch_gpu=4")
    assert_same_runs(one, two)


def test_a_batch_gpu_that_does_not_divide_the_batch_per_gpu_is_refused_under_torchrun(tmp_path, monkeypatch):
    from fastratio import distributed
    from fastratio import train as train_mod
    from fastratio.errors import UserError

    ctx = distributed.Context(0, 4, 0, torch.device("cpu"))
    monkeypatch.setattr(train_mod.distributed, "setup", lambda *a, **k: ctx)
    monkeypatch.setattr(train_mod.distributed, "teardown", lambda c: None)
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", [*TOY, f"run.out_dir={tmp_path}", "optim.batch_gpu=16"])
    with pytest.raises(UserError, match=r"optim.batch_gpu: 16 does not divide the batch per GPU, 8 \(optim.batch_size 32 over 4 ranks\)"):
        train_mod.train(cfg)


def test_micro_batch_shards_cut_the_global_draw_into_the_unsplit_rows():
    """Rank r's micro-batch k takes rows [r n + k m, r n + (k + 1) m) of a global draw; the Philox
    kernel's row offset points at the same rows."""
    draw = torch.arange(24)
    for rank in range(2):
        whole = Shard(rank, 2).take(draw)
        parts = [Shard(rank, 2).micro_batch(k, 3) for k in range(3)]
        assert torch.equal(torch.cat([p.take(draw) for p in parts]), whole)
        assert [p.row_offset(4) for p in parts] == [rank * 12 + 4 * k for k in range(3)]
        assert torch.equal(torch.cat([p.local(whole) for p in parts]), whole)
        assert all(p.rows(4) == 24 for p in parts)


def test_micro_batches_that_draw_differently_stop_the_step():
    draws = Draws(torch.Generator().manual_seed(0))
    kept = draws.keep_served()
    draws.randn((4,), torch.device("cpu"))
    draws.serve_again(kept)
    with pytest.raises(RuntimeError, match="micro-batch random request 0"):
        draws.randn((5,), torch.device("cpu"))
    draws.serve_normally()
    kept = draws.keep_served()
    draws.randn((4,), torch.device("cpu"))
    draws.serve_again(kept)
    with pytest.raises(RuntimeError, match="used 0 of the first micro-batch's 1 random tensors"):
        draws.serve_normally()


@pytest.mark.parametrize("overrides, message", [
    (["optim.batch_size=32", "optim.batch_gpu=12"], "optim.batch_gpu: 12 does not divide optim.batch_size 32"),
    (["optim.batch_size=32", "optim.batch_gpu=64"], "optim.batch_gpu: 64 does not divide optim.batch_size 32"),
    (["optim.batch_gpu=-8"], "optim.batch_gpu: must be >= 0, got -8"),
])
def test_a_batch_gpu_that_does_not_divide_the_batch_is_refused_by_name(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(ROOT / "configs" / "toy2d.yaml", overrides)


def test_step_cost_peak_falls_with_batch_gpu():
    """bench/step_cost.py --batch-gpu: the trainer's own split step under fake tensors; the same FLOPs
    (the same work, in micro-batches) at a lower peak."""
    sys.path.insert(0, str(ROOT / "bench"))
    import step_cost

    full = step_cost.count_step("tiny", "diffratio", "dijs", 16, "fp32", False)
    split = step_cost.count_step("tiny", "diffratio", "dijs", 16, "fp32", False, batch_gpu=4)
    assert split["batch_gpu"] == 4 and full["batch_gpu"] == 16
    assert split["peak_bytes"] < full["peak_bytes"]
    assert split["peak_split"]["activations_and_temporaries"] < full["peak_split"]["activations_and_temporaries"] / 2
    assert split["flops"] == pytest.approx(full["flops"], rel=0.02)
