"""Typed run configuration: dataclasses loaded from YAML, with `--set a.b=v` overrides.

Every option is a field with a unit in its comment. Loading is strict: an unknown key, a value of
the wrong type or a value outside its allowed set raises ``ConfigError`` whose message names the
dotted key, so the CLI can print one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value; the message names the dotted key."""


OBJECTIVES = ("dikl", "dijs", "dirm", "lr", "kl", "be", "ls", "sba")
METHODS = ("diffratio", "vsd", "dibregman", "teacher")
SIGMA_DISTS = ("lognormal", "fixed", "loguniform", "uniform", "sd_steps")
SCHEDULES = ("ve", "vp")
WEIGHTINGS = ("sigma2", "none", "edm", "dmd")
TOY_MIXTURES = ("ring8", "grid25", "aniso3", "spiral6", "petals12", "grid20", "rings25")
DATA_KINDS = ("toy2d", "cifar10", "folder", "idx", "npz", "digits", "text2image")
ARCHS = ("mlp", "ddpmpp", "adm", "edm2", "sd")
TEACHER_LOSSES = ("edm", "vp", "ve", "edm2")
EDM2_SIZES = ("", "xxs", "xs", "s", "m", "l", "xl", "xxl")
LR_SCHEDULES = ("constant", "edm2")
PRECISIONS = ("fp32", "bf16")
STEP_MODES = ("eager", "compile", "graph")
AUGMENT_DIM = 9  # EDM's augmentation-label width (its CIFAR-10 AugmentPipe: flips, scale, rotation, anisotropy, translation)
DEVICES = ("auto", "cpu", "cuda")
KERNEL_CHOICES = ("auto", "triton", "torch")


@dataclass
class RunConfig:
    out_dir: str = "runs/toy2d"  # run folder: config, metrics, checkpoints, plots
    seed: int = 0  # seeds every random stream of the run
    steps: int = 10000  # generator updates
    device: str = "auto"  # auto | cpu | cuda
    kernels: str = "auto"  # triton | torch | auto (triton on CUDA or under TRITON_INTERPRET=1); env FASTRATIO_KERNELS wins
    log_every: int = 50  # steps between metric lines (the only host syncs of the loop)
    eval_every: int = 1000  # steps between sample-quality evaluations (on a log step)
    plot_every: int = 1000  # steps between sample plots (0: never)
    ckpt_every: int = 500  # steps between checkpoints; at most this many steps are lost on a crash
    keep_ckpts: int = 3  # checkpoints kept on disk (newest first)
    progress: bool = True  # tqdm progress bar (the status line of each log step is printed either way; docs/logging.md)
    tensorboard: bool = False  # also write every metrics.jsonl field and the sample grids to <run>/tensorboard/ (pip install -e ".[tensorboard]")
    explode_factor: float = 1e6  # stop when a logged loss or gradient norm exceeds this many times its median so far (0: off)
    precision: str = "fp32"  # fp32 | bf16 (autocast of the network forward passes; fp32 master weights and optimizer)


@dataclass
class DataConfig:
    kind: str = "toy2d"  # toy2d (closed-form 2-D mixtures) | cifar10 | folder | idx | npz | digits (fastratio.datasets) | text2image (fastratio.tasks.text2image)
    mixture: str = "ring8"  # toy2d: ring8 | grid25 | aniso3 | spiral6 | petals12 | grid20 | rings25 (fastratio.toy.MIXTURES)
    eval_samples: int = 2000  # samples drawn for evaluation metrics
    path: str = ""  # images: dataset file or folder (cifar-10-python.tar.gz, zip/folder, *-images-idx3-ubyte.gz, .npz); text2image: WebDataset shards of image-caption pairs or SD latents (a folder of .tar, one .tar, or shards/{00000..00099}.tar)
    prompts: str = ""  # text2image: the generator's prompts, .txt (one per line) or .jsonl (caption|prompt|text); empty: the captions of data.path
    resolution: int = 512  # text2image: pixel size of the square images (shorter side resized, then center-cropped); latents are resolution / 8
    caption_dropout: float = 0.0  # text2image: probability a caption (real and generated side alike) is replaced by the empty prompt, for an unconditional branch
    split: str = "train"  # cifar10, digits: train | test (digits: the first 1,437 / the last 360)
    max_images: int = 0  # images: keep only the first N (0: all)
    conditional: bool = False  # images: condition every network on the class label
    source: str = "memory"  # images: memory (whole set on the device, batches drawn inside the step) | stream (worker processes read from disk; folder/zip)
    memory_budget_gb: float = 16.0  # memory: a set larger than this (decoded uint8) stops at start-up and suggests data.source=stream
    workers: int = 4  # stream: loader processes per rank (0: read in the training process)
    prefetch: int = 4  # stream: batches each worker prepares ahead
    timeout_s: float = 600.0  # stream: a batch not ready after this many seconds stops the run (a hung filesystem; 0: wait forever)
    skip_corrupt: bool = False  # stream: an unreadable member is replaced by the next readable one and counted (false: stop, naming it)
    vae: str = ""  # latent sets (EDM2 .npy mean/std): AutoencoderKL folder or Hugging Face cache name that decodes samples (grids, FID)


@dataclass
class ModelConfig:
    latent_dim: int = 8  # toy, generator_from_teacher=false: generator input z ~ N(0, I) of this size (from the teacher: the data's)
    gen_hidden: int = 256  # toy, generator_from_teacher=false: generator MLP width (from the teacher: the teacher's)
    gen_depth: int = 3  # toy, generator_from_teacher=false: generator hidden layers
    ratio_hidden: int = 256  # toy, ratio_from_teacher=false: ratio-network MLP width (from the teacher: the teacher's trunk)
    ratio_depth: int = 3  # toy, ratio_from_teacher=false: ratio-network hidden layers
    score_hidden: int = 256  # toy: score-network width (teacher, fake score, and the nets started from the teacher)
    score_depth: int = 4  # toy: score-network hidden layers
    sigma_data: float = 1.0  # data scale used by EDM-style input preconditioning (images: 0.5)
    arch: str = "mlp"  # mlp (toy) | ddpmpp (EDM SongUNet) | adm (EDM DhariwalUNet) | edm2 (EDM2's magnitude-preserving UNet) | sd (text2image: the teacher's diffusers UNet)
    size: str = ""  # edm2: a train_edm2.py img512 preset (xxs..xxl): sets model.channels and model.dropout (and for a teacher run optim.teacher_lr), names the released teacher in teacher.checkpoint's {release}
    channels: int = 128  # images: UNet base channels (EDM model_channels)
    channel_mult: list[int] = field(default_factory=lambda: [2, 2, 2])  # images: per-resolution channel multipliers
    num_blocks: int = 4  # images: residual blocks per resolution
    attn_resolutions: list[int] = field(default_factory=lambda: [16])  # images: resolutions with self-attention
    dropout: float = 0.13  # images: dropout of the teacher (stage 1)
    augment_dim: int = 0  # images: 0, or 9 to condition on augmentation labels (EDM's CIFAR-10 checkpoints have 9)
    sigma_init: float = 2.5  # generator g(z) = D(sigma_init z; sigma_init) (toy: in units of the standardised data)
    ratio_from_teacher: bool = True  # start the ratio net from the teacher's encoder (toy: the teacher MLP's hidden layers)
    exact_teacher: bool = False  # toy, vsd/dibregman: read the mixture's closed-form score as the teacher (stage 1 still fits the one the networks start from): isolates the teacher's error
    generator_from_teacher: bool = True  # start the generator from the teacher's weights (false: fresh random weights, toy: an MLP of z; the papers' ablation)
    checkpointing: bool = False  # images: activation checkpointing of the generator (its forward is recomputed in its backward); text2image: of the generator and the fake score
    shared_encoder: bool = False  # dibregman (images, text2image): the ratio is the fake score's encoder (mean feature = logit), trained with it in one update (Di-Bregman App. D, after SiDA); no separate ratio net


@dataclass
class MethodConfig:
    name: str = "diffratio"  # diffratio (ratio net only) | vsd (teacher + fake score) | dibregman (both)
    objective: str = "dijs"  # generator weight: dikl | dijs | dirm | lr | kl | be | ls | sba
    sba_lambda: float = 5.0  # lambda of the SBA Bregman weight exp(-lambda * l)
    ratio_steps: int = 2  # ratio-network updates per generator update; each reuses the step's batch with fresh noise
    fake_score_steps: int = 2  # vsd, dibregman: fake-score updates per generator update (DMD2's two time-scale rule), batch reused likewise
    r1_gamma: float = 0.0  # R1 penalty gamma/2 E_real ||grad_x l||^2 on the ratio net (0: off; double backward)
    gan_weight: float = 0.0  # w_GAN of Di-Bregman Alg. 1: adds w_GAN * E[-log sigmoid(l(G(z)_t))] to the generator loss (ratio-net methods)
    teacher_steps: int = 50000  # toy stage 1: denoising-score-matching steps of the teacher
    cfg_scale: float = 1.0  # text2image, vsd/dibregman: classifier-free guidance of the teacher's score (DMD2, FastGen on SD1.5: 1.75; 1: none)


@dataclass
class TeacherConfig:
    checkpoint: str = ""  # images, stage 2: teacher file (a fastratio teacher run's ckpt-*.pt or an EDM *.pkl); text2image: a Stable Diffusion folder or Hugging Face cache name (never downloaded)
    loss: str = "edm"  # stage 1 (images: method.name=teacher; toy: the in-run fit): EDM loss edm | vp | ve (EDM Table 1) | edm2 (EDM2 Eq. 21: learned uncertainty, ln sigma ~ N(noise.p_mean, noise.p_std^2))
    sample_steps: int = 18  # Heun sampler steps for teacher samples (EDM: 18 on CIFAR-10, 35 evaluations)


@dataclass
class AugmentConfig:
    # EDM's geometric AugmentPipe (fastratio/augment.py); defaults are EDM train.py's CIFAR-10 settings.
    p: float = 0.0  # overall augmentation probability (0: off; EDM CIFAR-10: 0.12); labels are conditioning (non-leaky)
    xflip: float = 1e8  # probability multipliers of each transform (0: off, its label slot stays 0); 1e8 = fair coin
    yflip: float = 1.0
    scale: float = 1.0  # isotropic scaling, log2 factor ~ N(0, scale_std^2)
    rotate_frac: float = 1.0  # rotation, angle ~ U(-pi, pi) * rotate_frac_max
    aniso: float = 1.0  # anisotropic scaling, log2 factor ~ N(0, aniso_std^2), in a frame rotated with aniso_rotate_prob
    translate_frac: float = 1.0  # fractional translation ~ N(0, translate_frac_std^2), fraction of the image size
    scale_std: float = 0.2
    rotate_frac_max: float = 1.0
    aniso_std: float = 0.2
    aniso_rotate_prob: float = 0.5
    translate_frac_std: float = 0.125


@dataclass
class NoiseConfig:
    schedule: str = "ve"  # ve: x_t = x0 + sigma*eps | vp: x_t = (x0 + sigma*eps) / sqrt(1 + sigma^2)
    sigma_dist: str = "loguniform"  # lognormal | fixed | loguniform | uniform | sd_steps (text2image: t uniform on the integer steps [t_min, t_max] of SD's grid, as DMD2)
    p_mean: float = -1.2  # lognormal: mean of log sigma
    p_std: float = 1.2  # lognormal: std of log sigma
    sigma_fixed: float = 2.5  # fixed: the single noise level
    sigma_min: float = 0.01  # loguniform/uniform: lower bound
    sigma_max: float = 3.0  # loguniform/uniform: upper bound
    t_min: int = 20  # sd_steps: lowest step (DMD2: min_step_percent 0.02 of 1000)
    t_max: int = 980  # sd_steps: highest step (DMD2: max_step_percent 0.98)
    weighting: str = "sigma2"  # w(sigma) of the generator update: sigma2 (the papers) | none | edm | dmd (vsd, dibregman: sigma2 divided per sample by mean |x0 - D_teacher(x_t)|, DMD/DMD2's normalisation)


@dataclass
class EvalConfig:
    fid_samples: int = 0  # images: in-loop FID/KID on this many samples every run.eval_every steps (0: off); best.pt keeps the best
    inception: str = ""  # torch-fidelity Inception weights (.pth, fastratio.tools.convert_inception); empty: torch-fidelity downloads them
    feature_extractor: str = "inception-v3-compat"  # torch-fidelity feature extractor
    fid_ref: str = ""  # FID against these reference statistics (EDM2's img512.pkl, EDM's fid-refs .npz) instead of the training set


@dataclass
class StepConfig:
    mode: str = "eager"  # eager | compile (the whole step as one torch.compile graph) | graph (the whole iteration as one CUDA graph; CUDA, one process)
    warmup_steps: int = 3  # graph: compiled steps run before capture (after the eager recording step); they are real training steps


@dataclass
class OptimConfig:
    batch_size: int = 256  # samples per step, real and generated alike (the global batch, all ranks together)
    batch_gpu: int = 0  # samples per forward/backward on one GPU (EDM's --batch-gpu): each rank's batch_size / ranks runs as micro-batches of this size whose gradients accumulate (docs/batch.md); 0: all at once
    gen_lr: float = 1e-3  # generator Adam learning rate
    ratio_lr: float = 1e-3  # ratio-network (and fake-score) Adam learning rate
    teacher_lr: float = 1e-3  # toy teacher Adam learning rate
    beta1: float = 0.0  # Adam beta1 for the two-player updates (0 as in DMD/SiD)
    beta2: float = 0.99  # Adam beta2
    grad_clip: float = 0.0  # max global grad norm per network (0: off)
    lr_schedule: str = "edm2"  # constant | edm2 (EDM2: lr / sqrt(max(nimg / (lr_ref_batches * batch), 1)), ramped up over lr_rampup_mimg)
    lr_ref_batches: float = 250.0  # edm2 schedule: batches before the inverse-square-root decay starts (img512: 70000, img64: 35000)
    lr_rampup_mimg: float = 0.0  # edm2 schedule: linear warm-up, millions of images (0: none; img512: 10)
    ema_std: float = 0.0  # > 0: EDM2's power-function EMA of the trained network with this relative std (e.g. 0.05) instead of the half-life
    ema_halflife_kimg: float = 100.0  # EMA half-life of the generator, thousands of images
    ema_rampup: float = 0.05  # half-life at most this fraction of images seen so far (0: off)
    ratio_ema_halflife_kimg: float = 20.0  # EMA of the ratio net, read by the best-of-N verifier (fastratio.verifier)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    step: StepConfig = field(default_factory=StepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Closed sets and lower bounds checked after every load; the key names the culprit in the error.
_CHOICES = {
    "run.device": DEVICES,
    "run.kernels": KERNEL_CHOICES,
    "run.precision": PRECISIONS,
    "data.mixture": TOY_MIXTURES,
    "data.kind": DATA_KINDS,
    "data.split": ("train", "test"),
    "data.source": ("memory", "stream"),
    "model.arch": ARCHS,
    "model.size": EDM2_SIZES,
    "optim.lr_schedule": LR_SCHEDULES,
    "model.augment_dim": (0, AUGMENT_DIM),
    "teacher.loss": TEACHER_LOSSES,
    "step.mode": STEP_MODES,
    "method.name": METHODS,
    "method.objective": OBJECTIVES,
    "noise.schedule": SCHEDULES,
    "noise.sigma_dist": SIGMA_DISTS,
    "noise.weighting": WEIGHTINGS,
}
_POSITIVE = (
    "run.steps", "run.log_every", "run.eval_every", "run.ckpt_every", "run.keep_ckpts",
    "data.eval_samples", "model.latent_dim", "model.gen_hidden", "model.gen_depth",
    "model.ratio_hidden", "model.ratio_depth", "model.score_hidden", "model.score_depth",
    "model.sigma_data", "method.ratio_steps", "method.fake_score_steps", "noise.sigma_fixed", "noise.sigma_min",
    "noise.sigma_max", "optim.batch_size", "optim.gen_lr", "optim.ratio_lr", "optim.teacher_lr",
    "model.channels", "model.num_blocks", "model.sigma_init", "teacher.sample_steps",
    "data.memory_budget_gb", "data.prefetch", "optim.lr_ref_batches", "data.resolution",
)
_NON_NEGATIVE = (
    "run.plot_every", "run.explode_factor", "method.teacher_steps", "noise.p_std", "optim.grad_clip",
    "optim.ema_halflife_kimg", "optim.ema_rampup", "optim.beta1", "optim.beta2", "optim.ratio_ema_halflife_kimg",
    "data.max_images", "model.dropout", "augment.p", "augment.xflip", "augment.yflip", "augment.scale", "augment.rotate_frac", "augment.aniso",
    "augment.translate_frac", "augment.scale_std", "augment.rotate_frac_max", "augment.aniso_std", "augment.translate_frac_std", "method.r1_gamma", "method.gan_weight", "step.warmup_steps", "eval.fid_samples",
    "data.workers", "data.timeout_s", "optim.lr_rampup_mimg", "optim.ema_std", "data.caption_dropout", "method.cfg_scale",
    "optim.batch_gpu",
)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the field type; ints and numeric strings are accepted for floats, nothing else is cast."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(typ)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {typ}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads `1e-5` as a string; accept any spelling Python parses as a float.
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool) and (type(value) is not typ):
        raise ConfigError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{prefix or 'config'}: empty or non-text key {key!r}")
        if key not in types_:
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(types_)})")
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, dotted)
        else:
            kwargs[key] = _coerce(dotted, value, typ)
    return cls(**kwargs)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# Upper bounds far above any real setting: a typo (an extra zero, a unit slip) stops here with the
# key's name instead of as an allocation failure or an endless loop deep inside a run.
_UPPER = {
    "run.seed": 2**63 - 1, "run.steps": 10**10, "run.keep_ckpts": 10**4, "optim.batch_size": 2**20, "data.eval_samples": 10**7,
    "data.max_images": 10**10, "model.latent_dim": 2**16, "model.gen_hidden": 2**16, "model.gen_depth": 256, "model.ratio_hidden": 2**16,
    "model.ratio_depth": 256, "model.score_hidden": 2**16, "model.score_depth": 256, "model.channels": 4096, "model.num_blocks": 64,
    "model.augment_dim": 64, "method.ratio_steps": 1000, "method.fake_score_steps": 1000, "method.teacher_steps": 10**8, "teacher.sample_steps": 10**4,
    "eval.fid_samples": 10**7, "step.warmup_steps": 10**4, "model.dropout": 1.0, "optim.grad_clip": 1e30,
    "data.workers": 256, "data.prefetch": 1024, "data.timeout_s": 1e6, "data.memory_budget_gb": 1e6, "data.resolution": 4096,
    "method.cfg_scale": 100.0,
}


def _numbers(obj: Any, prefix: str = ""):
    """(dotted key, value) of every float field, recursively (for the finiteness check)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, key + ".")
        elif isinstance(value, float):
            yield key, value


def validate(cfg: Config) -> Config:
    """Range and choice checks that a type alone cannot express."""
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
    if cfg.run.seed < 0:
        raise ConfigError(f"run.seed: must be >= 0, got {cfg.run.seed}")
    for key, bound in _UPPER.items():
        if _get(cfg, key) > bound:
            raise ConfigError(f"{key}: {_get(cfg, key)} is above the largest accepted value {bound}")
    if cfg.model.dropout >= 1:
        raise ConfigError(f"model.dropout: a probability below 1, got {cfg.model.dropout}")
    if not cfg.run.out_dir.strip():
        raise ConfigError("run.out_dir: empty; name a folder for the run")
    if len(cfg.model.channel_mult) > 12 or any(m > 64 for m in cfg.model.channel_mult):
        raise ConfigError(f"model.channel_mult: {cfg.model.channel_mult} has more than 12 levels or a multiplier above 64")
    for key, allowed in _CHOICES.items():
        if _get(cfg, key) not in allowed:
            raise ConfigError(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key}: must be > 0, got {_get(cfg, key)!r}")
    for key in _NON_NEGATIVE:
        if not _get(cfg, key) >= 0:
            raise ConfigError(f"{key}: must be >= 0, got {_get(cfg, key)!r}")
    if not 0 <= cfg.noise.t_min <= cfg.noise.t_max <= 999:
        raise ConfigError(f"noise.t_min/noise.t_max: {cfg.noise.t_min}, {cfg.noise.t_max}: need 0 <= t_min <= t_max <= 999")
    if cfg.noise.sigma_dist == "sd_steps" and cfg.data.kind != "text2image":
        raise ConfigError("noise.sigma_dist: 'sd_steps' draws Stable Diffusion's discrete steps; it is for data.kind text2image")
    if cfg.noise.sigma_min >= cfg.noise.sigma_max:
        raise ConfigError(f"noise.sigma_min: {cfg.noise.sigma_min} must be below noise.sigma_max {cfg.noise.sigma_max}")
    if not (cfg.optim.beta1 < 1 and cfg.optim.beta2 < 1):
        raise ConfigError("optim.beta1/optim.beta2: Adam betas must lie in [0, 1)")
    if cfg.method.gan_weight > 0 and cfg.method.name not in ("diffratio", "dibregman"):
        raise ConfigError(f"method.gan_weight: the GAN term uses the ratio network as discriminator; method.name {cfg.method.name!r} has none")
    if cfg.noise.weighting == "dmd" and cfg.method.name not in ("vsd", "dibregman"):
        raise ConfigError(f"noise.weighting: 'dmd' normalises by the teacher's denoising error; method.name {cfg.method.name!r} reads no teacher")
    if cfg.optim.batch_gpu and cfg.optim.batch_size % cfg.optim.batch_gpu:
        raise ConfigError(f"optim.batch_gpu: {cfg.optim.batch_gpu} does not divide optim.batch_size {cfg.optim.batch_size}; "
                          "pick a divisor of the batch per GPU (docs/batch.md)")
    if cfg.step.mode == "graph" and cfg.step.warmup_steps < 1:
        raise ConfigError("step.warmup_steps: graph mode needs >= 1 compiled step before capture (compilation, lazy allocations)")
    _validate_images(cfg)
    _validate_text2image(cfg)
    return cfg


def _validate_images(cfg: Config) -> None:
    toy = cfg.data.kind == "toy2d"
    if toy != (cfg.model.arch == "mlp"):
        raise ConfigError(f"model.arch: {cfg.model.arch!r} does not fit data.kind {cfg.data.kind!r} (toy2d uses mlp, images ddpmpp or adm)")
    if toy and cfg.method.name == "teacher":
        raise ConfigError("method.name: 'teacher' runs are for images; the toy teacher is fitted by method.teacher_steps")
    if cfg.model.exact_teacher and not (toy and cfg.method.name in ("vsd", "dibregman")):
        raise ConfigError(f"model.exact_teacher: only for data.kind toy2d with a method that reads the teacher's score (vsd, dibregman), got {cfg.data.kind}, {cfg.method.name}")
    if toy and cfg.teacher.loss == "edm2":
        raise ConfigError("teacher.loss: 'edm2' needs EDM2's uncertainty head, which the toy MLP teacher lacks; use edm, vp or ve")
    if not cfg.model.channel_mult or any(m <= 0 for m in cfg.model.channel_mult):
        raise ConfigError(f"model.channel_mult: expected positive multipliers, got {cfg.model.channel_mult}")
    for key in ("augment.p", "augment.aniso_rotate_prob"):
        if not 0 <= _get(cfg, key) <= 1:
            raise ConfigError(f"{key}: a probability, got {_get(cfg, key)}")
    if cfg.augment.p > 0 and cfg.model.augment_dim != AUGMENT_DIM:
        raise ConfigError(f"model.augment_dim: augment.p > 0 passes augmentation labels, set it to {AUGMENT_DIM}")
    if (cfg.teacher.loss == "edm2") != (cfg.model.arch == "edm2") and cfg.method.name == "teacher":
        raise ConfigError(f"teacher.loss: {cfg.teacher.loss!r} with model.arch {cfg.model.arch!r}; EDM2's loss needs EDM2's network (its uncertainty head) and the other way round")
    if cfg.model.arch == "edm2" and (cfg.augment.p > 0 or cfg.model.augment_dim):
        raise ConfigError("augment.p: EDM2 networks take no augmentation labels (EDM2 trains without); set augment.p=0 and model.augment_dim=0")
    if cfg.model.size and cfg.model.arch != "edm2":
        raise ConfigError(f"model.size: presets are EDM2's; model.arch is {cfg.model.arch!r}")
    if cfg.optim.ema_std and not 0.01 <= cfg.optim.ema_std <= 0.28:
        raise ConfigError(f"optim.ema_std: EDM2's power-function EMA takes a relative std in [0.01, 0.28], got {cfg.optim.ema_std}")
    if cfg.data.source == "stream" and cfg.data.kind not in ("folder", "text2image"):
        raise ConfigError(f"data.source: 'stream' reads image folders and dataset_tool zips (data.kind=folder), not data.kind={cfg.data.kind!r}")
    if not toy and cfg.method.name != "teacher" and not cfg.teacher.checkpoint:
        raise ConfigError("teacher.checkpoint: image stage 2 starts from a teacher; train one (method.name=teacher), give an EDM .pkl, "
                          "or for text2image a Stable Diffusion folder")


def _validate_text2image(cfg: Config) -> None:
    t2i = cfg.data.kind == "text2image"
    if t2i != (cfg.model.arch == "sd"):
        raise ConfigError(f"model.arch: {cfg.model.arch!r} does not fit data.kind {cfg.data.kind!r} (text2image uses sd, the teacher's own UNet)")
    if cfg.model.shared_encoder and cfg.method.name != "dibregman":
        raise ConfigError(f"model.shared_encoder: reads the ratio off the fake score's encoder; method.name {cfg.method.name!r} "
                          "has no fake score and ratio both (dibregman)")
    if cfg.model.shared_encoder and cfg.method.ratio_steps != cfg.method.fake_score_steps:
        raise ConfigError(f"method.ratio_steps: with model.shared_encoder the ratio trains inside each fake-score update; "
                          f"set it to method.fake_score_steps ({cfg.method.fake_score_steps})")
    if cfg.model.shared_encoder and cfg.data.kind == "toy2d":
        raise ConfigError("model.shared_encoder: reads a UNet encoder (images, text2image); the toy's MLPs have none")
    if not t2i:
        if cfg.method.cfg_scale != 1.0:
            raise ConfigError("method.cfg_scale: classifier-free guidance is for data.kind text2image")
        return
    if cfg.method.name == "teacher":
        raise ConfigError("method.name: text2image distils a Stable Diffusion teacher (teacher.checkpoint); there is no stage 1")
    if cfg.data.source != "stream":
        raise ConfigError("data.source: text2image streams its shards and prompts; set data.source=stream")
    if cfg.noise.schedule != "vp":
        raise ConfigError("noise.schedule: Stable Diffusion's latents are noised on the VP schedule; set noise.schedule=vp")
    if cfg.augment.p > 0:
        raise ConfigError("augment.p: text2image runs are not augmented; set augment.p=0")
    if not cfg.data.caption_dropout < 1:
        raise ConfigError(f"data.caption_dropout: a probability below 1, got {cfg.data.caption_dropout}")
    if cfg.method.cfg_scale != 1.0 and cfg.method.name == "diffratio":
        raise ConfigError("method.cfg_scale: diffratio reads no teacher score to guide (its ratio net is trained on data); leave it at 1")
    if cfg.eval.fid_samples:
        raise ConfigError("eval.fid_samples: in-loop FID is for image runs; score text2image samples with fastratio.evaluate")


def from_dict(data: dict) -> Config:
    return validate(_apply_preset(validate(_build(Config, data, ""))))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    if not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    # YAML scalars give ints, floats, bools and strings their natural types (`2.5`, `true`, `dijs`).
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge ``a.b=v`` strings into a nested dict; unknown keys are caught by ``from_dict``."""
    for item in overrides:
        key, value = _parse_override(item)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys (the later one would silently win) and deep nesting."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"{self.name}: duplicate key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > _MAX_YAML_DEPTH:
                raise ConfigError(f"{self.name}: nested deeper than {_MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_MAX_YAML_DEPTH = 32  # a config is three levels deep; anything far beyond is not a config
_MAX_CONFIG_BYTES = 1 << 20


def _apply_preset(cfg: Config) -> Config:
    """model.size (an EDM2 preset) sets the width and dropout EDM2 trained that size with (and a
    teacher run's reference learning rate), and resolves ``{release}`` in teacher.checkpoint to the
    released FID-optimal pickle of that size."""
    if not cfg.model.size:
        if "{release}" in cfg.teacher.checkpoint:
            raise ConfigError("teacher.checkpoint: {release} names the released EDM2 pickle of model.size; set model.size")
        return cfg
    from .networks.edm2 import IMG512_RELEASES, PRESETS

    preset = PRESETS[cfg.model.size]
    cfg.model.channels, cfg.model.dropout = preset["channels"], preset["dropout"]
    if cfg.method.name == "teacher":
        cfg.optim.teacher_lr = preset["lr"]
    if "{release}" in cfg.teacher.checkpoint:
        if cfg.model.size not in IMG512_RELEASES:
            raise ConfigError(f"model.size: NVIDIA released no img512 network of size {cfg.model.size!r}")
        cfg.teacher.checkpoint = cfg.teacher.checkpoint.replace("{release}", IMG512_RELEASES[cfg.model.size])
    return cfg


def load(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a config file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
        try:
            loader = _StrictLoader(text)
            loader.name = str(path)
            try:
                data = loader.get_single_data() or {}
            finally:
                loader.dispose()
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    return from_dict(apply_overrides(data, overrides or []))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
