"""A training iteration (data sampling, the step, every backward, Adam, the EMA updates) reads
nothing back to the host: a device-to-host read would stall a GPU every step and is an error inside
CUDA-graph capture. Checked by running iterations under a dispatch mode that fails on the ops a host
read goes through (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``float(t)``; ``aten.equal``)."""

import sys
from pathlib import Path

import pytest
import torch
from testkit import DEVICES
from torch.utils._python_dispatch import TorchDispatchMode

from fastratio import config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from step_time import _build

_HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}


class NoHostSync(TorchDispatchMode):
    """``host`` holds tensors that live on the host by design: eager Adam's step counters (on a GPU
    they stay CPU tensors unless the optimizer is capturable, as in compile and graph mode)."""

    def __init__(self, host: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.host = {id(t) for t in host}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_READS and not (args and id(args[0]) in self.host):
            raise AssertionError(f"host read: {func}")
        return func(*args, **(kwargs or {}))


def _run_without_sync(runner, steps=2):
    runner()  # creates Adam's state
    counters = tuple(s["step"] for opt in runner.step_fn.opt.values() for s in opt.state.values())
    with NoHostSync(counters):
        for _ in range(steps):
            runner()


def _runner(cfg, device="cpu"):
    return _build(cfg, torch.device(device))[1]  # the benchmark's builder: the trainer's own construction path


def test_the_mode_catches_a_host_read():
    with pytest.raises(AssertionError, match="host read"), NoHostSync():
        torch.ones(2).sum().item()


@pytest.mark.parametrize("method", ["diffratio", "vsd", "dibregman"])
@pytest.mark.parametrize("device", DEVICES)
def test_toy_iteration_has_no_host_sync(method, device):
    # Constant rate: a scheduled rate is a tensor that non-capturable Adam (CPU here) reads on the
    # host; the compiled and captured CUDA steps use capturable Adam (fastratio.optim.make_adam).
    # On CUDA the Triton kernels run (run.kernels=auto), their seeds drawn on the device.
    cfg = config.load(ROOT / "configs" / "toy2d.yaml", ["optim.batch_size=16", "model.gen_hidden=16", "model.ratio_hidden=16",
                                                         "model.score_hidden=16", "method.teacher_steps=1", f"method.name={method}",
                                                         "optim.grad_clip=1.0", f"run.kernels={'torch' if device == 'cpu' else 'auto'}",
                                                         "optim.lr_schedule=constant", f"run.device={device}"])
    _run_without_sync(_runner(cfg, device))


def test_image_iteration_with_augmentation_has_no_host_sync(tmp_path):
    import numpy as np

    from fastratio import checkpoint
    from fastratio.train import train

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (8, 1, 8, 8), dtype=np.uint8), labels=np.arange(8) % 2)
    tiny = ["model.channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[4]",
            "data.kind=npz", f"data.path={tmp_path / 'd.npz'}", "data.conditional=true", "model.augment_dim=9", "augment.p=0.5",
            "optim.batch_size=4", "run.progress=false", "run.plot_every=0", "run.eval_every=100", "run.precision=fp32"]
    teacher = train(config.load(ROOT / "configs" / "fashion_mnist_teacher.yaml", [*tiny, f"run.out_dir={tmp_path / 't'}", "run.steps=1"]))
    cfg = config.load(ROOT / "configs" / "fashion_mnist.yaml", [*tiny, f"teacher.checkpoint={checkpoint.list_checkpoints(teacher)[-1]}"])
    _run_without_sync(_runner(cfg))
