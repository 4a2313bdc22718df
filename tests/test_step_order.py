"""The generator update computes its direction before the generator's graph exists (peak memory =
the larger phase, not the sum) and activation checkpointing recomputes blocks: both must leave the
training run unchanged. Compared step for step with the former order, which is kept here as the
reference: generator forward with grad, x_t from it, the direction at x_t, the surrogate <sg(g), x_t>."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fastratio import config, objectives
from fastratio.draws import Draws
from fastratio.shard import SINGLE
from fastratio.step import TrainStep
from fastratio.tasks import build_task
from fastratio.train import build_optimizers

ROOT = Path(__file__).resolve().parents[1]


class FormerOrderStep(TrainStep):
    def generator_update(self, z, x_fake, labels=None):
        with self._autocast():
            x0 = self.wrapped["generator"](z, labels).float()
        x_t, sigma = self._noised(x0)
        direction, metrics = self.generator_direction(x_t.detach(), sigma, labels)
        per_sample = objectives.surrogate_loss(direction, x_t)
        metrics["gen_grad_norm"] = self._apply("generator", self.nets.generator, per_sample.mean())
        return metrics


def _run(cfg, step_cls, steps=3):
    torch.manual_seed(0)
    task = build_task(cfg, torch.device("cpu"))
    nets = task.build_networks()
    opts = build_optimizers(nets, cfg)
    rng = torch.Generator().manual_seed(1)
    step = step_cls(cfg, nets, opts, Draws(rng), SINGLE)
    losses = []
    for _ in range(steps):
        x, labels = task.sample_real(cfg.optim.batch_size, rng)
        z, labels_fake = task.sample_latent(cfg.optim.batch_size, rng)
        losses.append({k: float(v) for k, v in step(x, z, labels, labels_fake).items()})
    return losses, {k: v.clone() for k, v in nets.generator.state_dict().items()}, rng.get_state()


def _same(a, b):
    for la, lb in zip(a[0], b[0], strict=True):
        for key in la:
            assert lb[key] == pytest.approx(la[key], rel=1e-5, abs=1e-7), key
    for key in a[1]:
        torch.testing.assert_close(b[1][key], a[1][key], rtol=1e-5, atol=1e-7)
    assert torch.equal(a[2], b[2])  # the same random numbers were consumed


@pytest.mark.parametrize("method, kernels, schedule", [("diffratio", "torch", "vp"), ("diffratio", "triton", "vp"), ("diffratio", "torch", "ve"),
                                                       ("vsd", "torch", "vp"), ("dibregman", "torch", "vp")])
def test_reordered_generator_update_equals_the_former_order(method, kernels, schedule):
    # VP: alpha < 1, so the alpha chain factor of the reordered surrogate is exercised.
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", ["optim.batch_size=32", "model.gen_hidden=16", "model.ratio_hidden=16",
                                                         "model.score_hidden=16", "method.teacher_steps=1", f"method.name={method}",
                                                         f"run.kernels={kernels}", "method.ratio_steps=2", f"noise.schedule={schedule}"])
    _same(_run(cfg, FormerOrderStep), _run(cfg, TrainStep))


def test_generator_checkpointing_changes_nothing_but_memory(tmp_path):
    from fastratio import checkpoint
    from fastratio.train import train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8))
    tiny = ["model.channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]", "data.kind=npz",
            f"data.path={tmp_path / 'd.npz'}", "optim.batch_size=4", "run.progress=false", "run.plot_every=0", "run.eval_every=100",
            "run.precision=fp32", "run.kernels=torch"]
    teacher = train(config.load(ROOT / "configs" / "fashion_mnist_teacher.yaml", [*tiny, f"run.out_dir={tmp_path / 't'}", "run.steps=1"]))
    base = [*tiny, f"teacher.checkpoint={checkpoint.list_checkpoints(teacher)[-1]}"]
    plain = _run(config.load(ROOT / "configs" / "fashion_mnist.yaml", base), TrainStep)
    checkpointed = _run(config.load(ROOT / "configs" / "fashion_mnist.yaml", [*base, "model.checkpointing=true"]), TrainStep)
    former = _run(config.load(ROOT / "configs" / "fashion_mnist.yaml", base), FormerOrderStep)
    _same(plain, checkpointed)
    _same(former, plain)


@pytest.mark.parametrize("method, expected", [
    ("diffratio", ["ratio", "ratio", "generator"]),
    ("vsd", ["fake", "fake", "fake", "fake", "fake", "generator"]),  # fake_score_steps=5 below
    # Di-Bregman reads both: the updates interleave while both counts last, then the longer one runs on.
    ("dibregman", ["ratio", "fake", "ratio", "fake", "fake", "fake", "fake", "generator"]),
])
def test_auxiliary_update_counts_per_generator_step(monkeypatch, method, expected):
    """method.ratio_steps counts the classifier's updates, method.fake_score_steps the fake score's
    (toy default: 2 and 2); each method runs only the updates of the networks it has."""
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", ["optim.batch_size=8", "model.score_hidden=16", "method.teacher_steps=1",
                                                         f"method.name={method}", "run.kernels=torch",
                                                         "method.fake_score_steps=5"])
    assert cfg.method.ratio_steps == 2
    calls = []
    for name, label in (("ratio_update", "ratio"), ("fake_score_update", "fake"), ("generator_update", "generator")):
        original = getattr(TrainStep, name)
        monkeypatch.setattr(TrainStep, name, lambda self, *a, _o=original, _l=label, **k: calls.append(_l) or _o(self, *a, **k))
    _run(cfg, TrainStep, steps=1)
    assert calls == expected
