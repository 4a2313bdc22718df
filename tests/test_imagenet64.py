"""The ImageNet 64x64 configs: EDM's ADM recipe (parameter count equal to EDM's own network), a ratio
net a third of it, and a CPU stage-2 run of configs/imagenet64.yaml from an EDM-written ADM pickle
over a streamed dataset_tool-layout zip."""

import json
from pathlib import Path

import numpy as np
import torch

from fastratio import config
from fastratio.data.write import write_dataset_zip
from fastratio.networks.image import RatioUNet
from fastratio.networks.unet import EDMPrecond
from fastratio.runlog import read_jsonl
from fastratio.tasks.image import network_kwargs
from fastratio.train import train

ROOT = Path(__file__).resolve().parents[1]
EDM = ROOT / "tests" / "fixtures" / "edm"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_imagenet64_configs_build_edm_s_adm_and_a_ratio_net_a_third_of_it():
    released = json.loads((EDM / "layouts.json").read_text())["layouts"]["edm-imagenet-64x64-cond-adm"]
    teacher_cfg, stage2_cfg = (config.load(ROOT / "configs" / f"{n}.yaml") for n in ("imagenet64_teacher", "imagenet64"))
    for cfg in (teacher_cfg, stage2_cfg):
        assert (cfg.data.source, cfg.data.conditional, cfg.model.arch) == ("stream", True, "adm")
    kwargs = network_kwargs(teacher_cfg, (3, 64, 64), 1000)
    with torch.device("meta"):
        teacher = EDMPrecond(**kwargs)
        ratio = RatioUNet(schedule=stage2_cfg.noise.schedule, **network_kwargs(stage2_cfg, (3, 64, 64), 1000))
    assert _count(teacher) == released["parameters"] == 295_899_267  # EDM's own network, counted by EDM's code
    assert _count(ratio) == 91_807_681  # stated in configs/imagenet64.yaml
    assert teacher_cfg.optim.batch_size == 4096 and teacher_cfg.optim.teacher_lr == 1e-4 and teacher_cfg.model.dropout == 0.10


def test_imagenet64_stage2_runs_streaming_from_an_edm_adm_pickle(tmp_path):
    rng = np.random.default_rng(0)  # the fixture network is EDM's ADM at 8x8 with 10 classes
    data = write_dataset_zip(tmp_path / "imagenet-8x8.zip", rng.integers(0, 256, (24, 3, 8, 8), dtype=np.uint8), np.arange(24) % 10)
    cfg = config.load(ROOT / "configs" / "imagenet64.yaml", [
        f"run.out_dir={tmp_path / 'run'}", f"data.path={data}", f"teacher.checkpoint={EDM / 'edm-imagenet-cond-adm.pkl'}",
        "run.steps=3", "run.log_every=1", "run.eval_every=3", "run.plot_every=3", "run.ckpt_every=3", "run.progress=false",
        "run.precision=fp32", "run.device=cpu", "step.mode=eager", "optim.batch_size=4", "data.eval_samples=8", "data.workers=1",
    ])
    run = train(cfg)
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["ratio_loss"]) for r in rows)
    state = torch.load(run / "ckpt-000000003.pt", weights_only=True)
    assert state["data"] == {"position": 12, "size": 24, "skipped": 0}
    assert state["network_kwargs"]["label_dim"] == 10 and state["ratio_kwargs"]["model_type"] == "DhariwalUNet"
