"""Training entry point: ``python -m fastratio.train CONFIG.yaml [--set a.b=v ...] [--resume auto|PATH]``.

Toy data: stage 1 fits the teacher by denoising score matching in the same run (unless no network
reads or starts from it); stage 2 trains the one-step generator with the configured method.
Images: stage 1 is its own run (``method.name: teacher``, an EDM denoiser with EMA); stage 2 reads
its checkpoint (or an EDM pickle) through ``teacher.checkpoint``. The run folder holds the resolved
config, metrics.jsonl, checkpoints (state_dicts only) and sample plots.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, distributed
from . import config as config_mod
from .checkpoint import state_count
from .config import Config
from .device import resolve_device
from .draws import Draws
from .ema import EMA, ema_beta
from .errors import ArgumentParser, UserError, os_error, run_cli
from .guard import DivergenceWatch, StopRequest
from .networks.from_denoiser import DenoiserScore
from .optim import make_adam
from .runfolder import RunFolder
from .runlog import Console, JsonlLog, MetricAccumulator, Progress, TensorBoard, plot_losses, read_jsonl
from .runner import StepRunner
from .shard import Shard
from .step import Networks, TeacherStep, TrainStep
from .tasks import build_task
from .tasks.toy2d import needs_teacher

_ROLES = ("generator", "ratio", "teacher", "fake_score")


def trained_role(cfg: Config) -> str:
    """The network a run trains and EMA-averages: the teacher in an image stage-1 run, else the generator."""
    return "teacher" if cfg.method.name == "teacher" else "generator"


def build_optimizers(nets: Networks, cfg: Config) -> dict[str, torch.optim.Optimizer]:
    if cfg.method.name == "teacher":
        return {"teacher": make_adam(nets.teacher.parameters(), cfg.optim.teacher_lr, cfg)}
    lrs = {"generator": cfg.optim.gen_lr, "ratio": cfg.optim.ratio_lr, "fake_score": cfg.optim.ratio_lr}
    # A ratio read off the fake score's encoder (model.shared_encoder) has no parameters of its own:
    # the fake score's update trains it.
    return {name: make_adam(getattr(nets, name).parameters(), lr, cfg) for name, lr in lrs.items()
            if getattr(nets, name) is not None and any(p.requires_grad for p in getattr(nets, name).parameters())}


def build_averages(nets: Networks, cfg: Config) -> tuple[EMA, EMA | None, tuple]:
    """(EMA of the trained network, EMA of the ratio net or None, the runner's (EMA, live, half-life) list)."""
    trained = getattr(nets, trained_role(cfg))
    ema = EMA(trained)
    averages = ((ema, trained, cfg.optim.ema_halflife_kimg),)
    ratio_ema = None
    if nets.ratio is not None and any(True for _ in nets.ratio.parameters()):  # read by the best-of-N verifier
        ratio_ema = EMA(nets.ratio)
        averages += ((ratio_ema, nets.ratio, cfg.optim.ratio_ema_halflife_kimg),)
    return ema, ratio_ema, averages


def pretrain_teacher(task, nets: Networks, cfg: Config, rng: torch.Generator) -> None:
    """Stage 1 (toy): fit the teacher denoiser on data with the images' stage-1 step (EDM's loss and
    sigma law, ``teacher.loss``), so that it is also trained at sigma_init, where the generator reads
    it; the fake score starts from it (as in VSD), and the generator and the ratio net unless the
    config says otherwise (as on images).

    The teacher is the EMA of the fit (half-life ``optim.ema_halflife_kimg``) with the learning rate
    decayed linearly to 0 over the second half, as a real teacher is a converged, averaged network:
    the last iterate of a constant-rate fit is noise-limited (standardised ring8, 10,000 steps, the
    noise-prediction fit of session 7: score error 24% of the exact score at sigma = 0.1 vs 7% with
    the decay; the default's fit here: 5%, README "Measured on the toy suite")."""
    # With model.exact_teacher the score read is the closed form: the fit only starts the networks.
    teacher = nets.teacher.denoiser if isinstance(nets.teacher, DenoiserScore) else task.build_teacher()
    lr, steps = cfg.optim.teacher_lr, cfg.method.teacher_steps
    opt = make_adam(teacher.parameters(), lr, cfg)
    fit = TeacherStep(cfg, Networks(teacher=teacher), {"teacher": opt}, Draws(rng))
    ema = EMA(teacher)
    beta = float(ema_beta(cfg.optim.batch_size, torch.zeros(()), cfg.optim.ema_halflife_kimg, rampup=0))
    for i in tqdm(range(steps), desc="teacher", disable=not cfg.run.progress):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, 2.0 * (1.0 - i / steps))
        fit(task.sample_real(cfg.optim.batch_size, rng)[0])
        ema.update(teacher, beta)
    teacher.load_state_dict(ema.module.state_dict())
    teacher.requires_grad_(False).eval()
    if nets.fake_score is not None:
        nets.fake_score.denoiser.load_state_dict(teacher.state_dict())
    if nets.ratio is not None and cfg.model.ratio_from_teacher:
        nets.ratio.load_trunk(teacher)
    if cfg.model.generator_from_teacher:
        nets.generator.denoiser.load_state_dict(teacher.state_dict())


def _state(step: int, nimg: int, cfg: Config, nets: Networks, ema: EMA, opts: dict, rng: torch.Generator, extras: dict,
           ratio_ema: EMA | None, data: dict) -> dict:
    return {
        **extras,
        "data": data,
        **({"ratio_ema": ratio_ema.module.state_dict()} if ratio_ema is not None else {}),
        "step": step,
        "nimg": nimg,
        "config": config_mod.to_dict(cfg),
        "nets": {name: getattr(nets, name).state_dict() for name in _ROLES if getattr(nets, name) is not None},
        "ema": ema.module.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in opts.items()},
        "rng": {"train": rng.get_state(), "torch_cpu": torch.get_rng_state(),
                **({"torch_cuda": torch.cuda.get_rng_state(rng.device)} if rng.device.type == "cuda" else {})},
    }


def _restore(state: dict, nets: Networks, ema: EMA, opts: dict, rng: torch.Generator, source: Path, ratio_ema: EMA | None) -> None:
    try:
        for name, sd in state["nets"].items():
            getattr(nets, name).load_state_dict(sd)
        ema.module.load_state_dict(state["ema"])
        if ratio_ema is not None:
            ratio_ema.module.load_state_dict(state["ratio_ema"])
        for name, sd in state["optimizers"].items():
            opts[name].load_state_dict(sd)
            _check_optimizer_state(opts[name], name, source)
        rng.set_state(state["rng"]["train"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        if "torch_cuda" in state["rng"] and rng.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["torch_cuda"], rng.device)
    except (KeyError, RuntimeError, AttributeError, ValueError, TypeError) as err:
        raise UserError(f"{source}: checkpoint does not match this config ({str(err).splitlines()[0]})") from None


def _check_optimizer_state(opt: torch.optim.Optimizer, name: str, source: Path) -> None:
    """Adam's moments must have their parameter's shape: load_state_dict does not check, and a
    mismatch would surface as a traceback at the first step."""
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise UserError(f"{source}: optimizer state {name}.{key} is {tuple(value.shape)} for a parameter of {tuple(param.shape)}")


def _find_resume(resume: str, run_dir: Path) -> tuple[Path, dict] | None:
    if resume == "auto":
        found = checkpoint.load_latest(run_dir)
        if found is None and checkpoint.list_checkpoints(run_dir):
            raise UserError(f"--resume auto: none of the {len(checkpoint.list_checkpoints(run_dir))} checkpoints in {run_dir} "
                            "is readable; nothing was changed (pass --resume PATH to pick one, or move them away to start over)")
        return found
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"--resume: checkpoint {path} not found")
    return path, checkpoint.load_or_fail(path, "--resume")


def _check_same_run(state: dict, cfg: Config, nets: Networks, source: Path) -> None:
    """A checkpoint resumes only the method and roles that wrote it (a VSD run continued as DiffRatio
    would start a fresh ratio net and drop the fake score without a word)."""
    written = state.get("config", {}).get("method", {}).get("name") if isinstance(state.get("config"), dict) else None
    if written != cfg.method.name:
        raise UserError(f"--resume: {source} was written by method.name={written}; this config has method.name={cfg.method.name}")
    roles = {name for name in _ROLES if getattr(nets, name) is not None}
    saved = set(state.get("nets", {})) if isinstance(state.get("nets"), dict) else set()
    if saved != roles:
        raise UserError(f"--resume: {source} holds networks {sorted(saved)}, this run trains {sorted(roles)}")


def _apart_from_training(device: torch.device):
    """Evaluation and plots run with the global RNGs (the stream of the step's dropout) restored after
    them: what they draw there (torch-fidelity's DataLoader takes its workers' seed from it, and a
    resumed process reads the real set's features again at its first evaluation) would otherwise
    shift every later dropout mask, and a resumed run's losses would part from an uninterrupted run's."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type="cuda")


def _save(state: dict, path: Path, keep: int | None = None) -> None:
    try:
        checkpoint.save(state, path, keep)
    except OSError as err:  # disk full, folder gone read-only: the previous checkpoint stays intact
        raise os_error(f"run.out_dir: cannot write checkpoint {path}", err) from None


def train(cfg: Config, resume: str | None = None, force: bool = False) -> Path:
    """Run (or continue) training; returns the run folder. Under torchrun, data parallel over ranks.
    ``force`` lets a resume supersede newer checkpoints (moved aside, never deleted)."""
    ctx = distributed.setup(cfg.run.device, resolve_device)
    try:
        # Rank 0 alone writes the run folder, so it alone holds the folder's lock.
        with RunFolder(Path(cfg.run.out_dir)) if ctx.is_main else contextlib.nullcontext() as folder:
            return _train(cfg, resume, ctx, folder, force)
    finally:
        distributed.teardown(ctx)


def _train(cfg: Config, resume: str | None, ctx: distributed.Context, folder: RunFolder | None, force: bool) -> Path:
    run_dir = Path(cfg.run.out_dir)
    if resume is None and checkpoint.list_checkpoints(run_dir):
        raise UserError(f"run.out_dir: {run_dir} already holds checkpoints; pass --resume auto or choose another folder")
    global_batch = cfg.optim.batch_size
    if global_batch % ctx.world:
        raise UserError(f"optim.batch_size: {global_batch} (the global batch) is not divisible by the {ctx.world} ranks")
    if cfg.run.tensorboard and ctx.is_main:
        TensorBoard.require(run_dir)  # a missing package stops here, before the run folder changes
    if cfg.optim.batch_gpu and (global_batch // ctx.world) % cfg.optim.batch_gpu:
        raise UserError(f"optim.batch_gpu: {cfg.optim.batch_gpu} does not divide the batch per GPU, {global_batch // ctx.world} "
                        f"(optim.batch_size {global_batch} over {ctx.world} ranks)")

    device = ctx.device
    shard = Shard(ctx.rank, ctx.world)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    task = build_task(cfg, device, shard)
    nets = task.build_networks()
    opts = build_optimizers(nets, cfg)
    rng = torch.Generator(device).manual_seed(cfg.run.seed)  # the shared stream (fastratio.shard)

    found = _find_resume(resume, run_dir) if resume is not None else None
    metrics_file = run_dir / "metrics.jsonl"
    earlier_history = found is None and ctx.is_main and (metrics_file.is_symlink() or (metrics_file.is_file() and metrics_file.stat().st_size))
    if earlier_history and not force:
        # A run killed before its first checkpoint, or another run's history: never erase it silently.
        raise UserError(f"run.out_dir: {run_dir} holds metrics.jsonl of an earlier run but no checkpoint to resume; "
                        "choose another folder, or pass --force to move it to superseded-*/")
    # Under --resume auto, newer checkpoints are the unreadable ones load_latest skipped.
    supersede = force or resume == "auto"
    if found is not None:
        _check_same_run(found[1], cfg, nets, found[0])
        if ctx.is_main:
            folder.check_newer(state_count(found[1].get("step"), "step", str(found[0])), supersede, found[0])
    toy_teacher = cfg.data.kind == "toy2d" and nets.teacher is not None
    if found is None and cfg.data.kind == "toy2d" and needs_teacher(cfg):
        pretrain_teacher(task, nets, cfg, rng)
    ema, ratio_ema, averages = build_averages(nets, cfg)
    start, nimg = 0, 0
    last_good = "none yet"
    # The default generators (dropout) differ per rank. One process resumes them exactly from the
    # checkpoint; under torchrun only rank 0's were saved, so every rank reseeds from (seed, rank, step).
    torch.manual_seed(cfg.run.seed + 1_000_003 * ctx.rank)
    if found is not None:
        path, state = found
        if toy_teacher:
            nets.teacher.requires_grad_(False).eval()
        _restore(state, nets, ema, opts, rng, path, ratio_ema)
        task.load_data_state(state.get("data", {}), str(path))
        start, nimg = (state_count(state.get(key), key, str(path)) for key in ("step", "nimg"))
        last_good = str(path)
        if ctx.world > 1:
            torch.manual_seed(cfg.run.seed + 1_000_003 * ctx.rank + start)

    # Everything is validated: only now does the run change its folder.
    if ctx.is_main:
        if earlier_history:
            folder.set_aside_history()
        if found is not None:
            folder.supersede_newer(found[1]["step"], supersede, found[0])
        folder.write_text("config.yaml", config_mod.dump(cfg))
    console = Console(run_dir / "log.txt", cfg.run.progress) if ctx.is_main else None
    if console is not None and found is not None:
        console.write(f"resumed from {found[0]} at step {start}")
    wrapped = {name: distributed.wrap(getattr(nets, name), ctx) for name in opts}
    step_cls = TeacherStep if cfg.method.name == "teacher" else TrainStep
    step_fn = step_cls(cfg, nets, opts, Draws(rng), shard, wrapped)
    runner = StepRunner(cfg, task, nets, step_fn, shard, device, averages, nimg, opts)
    extras = task.checkpoint_extras()
    log = JsonlLog(run_dir / "metrics.jsonl", resume_step=start if found else None) if ctx.is_main else None
    # best.pt: the snapshot with the lowest in-loop FID so far (earlier rows count after a resume).
    logged = read_jsonl(run_dir / "metrics.jsonl") if ctx.is_main and (run_dir / "metrics.jsonl").is_file() else []
    best_fid = min((r["eval_fid"] for r in logged if "eval_fid" in r), default=float("inf"))
    # The time line goes on across resumes, from the last kept record's.
    progress = Progress(start, cfg.run.steps, global_batch, device, logged[-1].get("time_s", 0.0) if logged else 0.0)
    # After a kill, steps past the checkpoint are hidden from the event files as from metrics.jsonl (TensorBoard's doc).
    tensorboard = TensorBoard(run_dir, start + 1) if cfg.run.tensorboard and ctx.is_main else None
    acc = MetricAccumulator()
    watch = DivergenceWatch(device, cfg.run.explode_factor)
    params = [p for name in opts for p in getattr(nets, name).parameters()]
    bar = tqdm(total=cfg.run.steps, initial=start, desc="train", unit="step", disable=not (cfg.run.progress and ctx.is_main))

    with StopRequest() as stop, tensorboard or contextlib.nullcontext():
        for step in range(start + 1, cfg.run.steps + 1):
            metrics = runner()
            watch.update(metrics, step)
            acc.add(metrics)
            nimg += global_batch
            bar.update(1)

            last = step == cfg.run.steps
            evaluate = step % cfg.run.eval_every == 0 or last
            log_now = step % cfg.run.log_every == 0 or evaluate
            # One rank's signal stops all; ranks agree on log steps (one tiny all-reduce there).
            stopping = distributed.any_rank(stop.requested, ctx) if (log_now or ctx.world == 1) else False
            if log_now:
                means = distributed.mean_over_ranks(acc.pop_means(), ctx)  # the one host sync of log steps
                watch.check(step, params, last_good, means)
                record = {"step": step, "kimg": nimg / 1000, **means}
                if ctx.is_main:
                    record.update(progress.fields(step))
                    if evaluate:
                        with progress.maintenance(), _apart_from_training(device):
                            record.update({f"eval_{k}": v for k, v in task.evaluate(ema.module).items()})
                    log.write(record)
                    if tensorboard is not None:
                        tensorboard.scalars(record)
                    console.write(progress.line(record))
                    if record.get("eval_fid", float("inf")) < best_fid:
                        best_fid = record["eval_fid"]
                        watch.check(step, params, last_good)
                        with progress.maintenance():
                            _save(_state(step, nimg, cfg, nets, ema, opts, rng, extras, ratio_ema, task.data_state()), run_dir / "best.pt")
                    loss = next((record[k] for k in ("ratio_loss", "fake_dsm_loss", "teacher_loss") if k in record), float("nan"))
                    bar.set_postfix(img_s=f"{record['images_per_s']:.0f}", loss=f"{loss:.3g}")
            if ctx.is_main and cfg.run.plot_every and (step % cfg.run.plot_every == 0 or last):
                try:
                    with progress.maintenance():
                        with _apart_from_training(device):
                            task.plot(ema.module, run_dir / f"samples-{step:09d}.png")
                        plot_losses(read_jsonl(run_dir / "metrics.jsonl"), run_dir / "losses.png")
                        if tensorboard is not None:
                            tensorboard.image(step, run_dir / f"samples-{step:09d}.png")
                except OSError as err:
                    raise os_error(f"run.out_dir: cannot write plots into {run_dir}", err) from None
            if step % cfg.run.ckpt_every == 0 or last or stopping:
                watch.check(step, params, last_good)  # never write a diverged state
                path = checkpoint.checkpoint_path(run_dir, step)
                with progress.maintenance():
                    if ctx.is_main:
                        _save(_state(step, nimg, cfg, nets, ema, opts, rng, extras, ratio_ema, task.data_state()), path, cfg.run.keep_ckpts)
                    distributed.barrier(ctx)
                last_good = str(path)
            if stopping:
                if ctx.is_main:
                    console.write(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; checkpoint {last_good}")
                break
    bar.close()
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m fastratio.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (default: the built-in toy2d settings)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set optim.batch_size=64")
    parser.add_argument("--resume", metavar="auto|PATH", help="continue from the newest valid checkpoint of run.out_dir, or from PATH")
    parser.add_argument("--force", action="store_true", help="let --resume supersede newer checkpoints or an earlier run's metrics (moved to superseded-*/, never deleted)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    cfg = config_mod.load(args.config, args.overrides)
    if args.dry_run:
        print(config_mod.dump(cfg), end="")
        return 0
    run_dir = train(cfg, resume=args.resume, force=args.force)
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
