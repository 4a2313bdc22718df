"""Config loading: strict keys and types, overrides, one-line CLI errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from fastratio import config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_equal_the_embedded_toy_config():
    assert config.load(ROOT / "configs" / "toy2d.yaml") == config.load(None)


def test_overrides_are_typed():
    cfg = config.load(None, ["optim.batch_size=64", "optim.gen_lr=1e-5", "method.objective=sba", "run.progress=false", "noise.sigma_fixed=3"])
    assert cfg.optim.batch_size == 64 and cfg.optim.gen_lr == 1e-5 and cfg.method.objective == "sba"
    assert cfg.run.progress is False and cfg.noise.sigma_fixed == 3.0 and isinstance(cfg.noise.sigma_fixed, float)


def test_dump_round_trips(tmp_path):
    cfg = config.load(None, ["method.name=vsd", "noise.weighting=sigma2"])
    path = tmp_path / "c.yaml"
    path.write_text(config.dump(cfg))
    assert config.load(path) == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.batchsize=3", "optim.batchsize"),
        ("optim.batch_size=abc", "optim.batch_size"),
        ("optim.batch_size=2.5", "optim.batch_size"),
        ("optim.batch_size=-4", "optim.batch_size"),
        ("run.progress=3", "run.progress"),
        ("method.objective=wgan", "method.objective"),
        ("noise.sigma_min=5.0", "noise.sigma_min"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("optim=3", "optim"),
        ("optim.batch_size.x=3", "optim.batch_size"),
        ("optim.beta2=1.0", "optim.beta"),
        ("teacher.loss=edm2", "teacher.loss"),  # the toy's MLP teacher has no uncertainty head
        ("model.exact_teacher=true", "model.exact_teacher"),  # DiJS reads no teacher
        ("noise.sigma_dist=sd_steps", "noise.sigma_dist"),  # Stable Diffusion's grid: text2image only
        ("noise.t_max=1000", "noise.t_min/noise.t_max"),
        ("noise.weighting=dmd", "noise.weighting"),  # DMD's normalisation needs a teacher; DiJS reads none
        ("method.cfg_scale=1.75", "method.cfg_scale"),  # guidance is for text2image
        ("model.shared_encoder=true", "model.shared_encoder"),  # the fake score's encoder: dibregman only
        ("model.arch=sd", "model.arch"),  # the teacher's diffusers UNet: text2image only
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load(None, [override])


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fastratio.train", *args], capture_output=True, text=True, cwd=cwd, check=False)


def test_cli_error_is_one_line_with_the_key():
    proc = _cli("configs/toy2d.yaml", "--set", "optim.lr=1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "optim.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_missing_and_malformed_config(tmp_path):
    proc = _cli(str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr and proc.stderr.count("\n") == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    proc = _cli(str(bad))
    assert proc.returncode == 2 and "bad.yaml" in proc.stderr and proc.stderr.count("\n") == 1


def test_cli_dry_run_prints_resolved_config():
    proc = _cli("configs/toy2d.yaml", "--set", "optim.batch_size=32", "--dry-run")
    assert proc.returncode == 0
    assert config.from_dict(__import__("yaml").safe_load(proc.stdout)).optim.batch_size == 32
