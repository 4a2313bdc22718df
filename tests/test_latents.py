"""EDM2's latent pipeline against EDM2's own code (tests/fixtures/edm2/make_fixtures.py): a small
randomly initialised diffusers AutoencoderKL, EDM2's StabilityVAEEncoder and ``dataset_tool.py
encode`` output. The VAE is loaded from safetensors only."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastratio.data.formats import Archive
from fastratio.data.write import write_dataset_zip
from fastratio.errors import UserError, run_cli
from fastratio.latents import LatentScaling, decode, encode_pixels, load_vae
from fastratio.tools.encode_latents import main as encode_main

FIX = Path(__file__).resolve().parent / "fixtures" / "edm2"
EDM2 = torch.load(FIX / "vae_outputs.pt", weights_only=True)
LABELS = [0, 3, 1, 3, 2]  # make_fixtures.py's dataset.json


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    """The fixture VAE as a diffusers folder (config.json + safetensors), as a downloaded one is."""
    import diffusers

    saved = torch.load(FIX / "vae.pt", weights_only=True)
    vae = diffusers.AutoencoderKL(**saved["config"])
    vae.load_state_dict(saved["state_dict"])
    folder = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def test_encoding_scaling_and_decoding_equal_edm2_s_stability_vae_encoder(vae_folder):
    vae = load_vae(str(vae_folder), torch.device("cpu"))
    raw = encode_pixels(vae, EDM2["pixels"])
    torch.testing.assert_close(raw, EDM2["raw"], rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)  # EDM2's encode_latents draws randn_like(mean) of the strided half, from the global generator
    eps = torch.randn_like(EDM2["raw"].chunk(2, dim=1)[0])
    final = LatentScaling().to_final(EDM2["raw"], eps)
    torch.testing.assert_close(final, EDM2["final"], rtol=1e-6, atol=1e-6)
    assert torch.equal(decode(vae, EDM2["final"], LatentScaling()), EDM2["decoded"])


def test_encode_latents_cli_writes_what_edm2_dataset_tool_encode_writes(vae_folder, tmp_path):
    images = write_dataset_zip(tmp_path / "pixels.zip", EDM2["pixels"].numpy(), LABELS)
    out = tmp_path / "latents.zip"
    assert run_cli(encode_main, [str(images), str(out), "--vae", str(vae_folder), "--batch", "2", "--no-progress", "--device", "cpu"]) == 0
    with zipfile.ZipFile(out) as ours, zipfile.ZipFile(FIX / "latents.zip") as theirs:
        assert ours.namelist() == theirs.namelist()
        assert json.loads(ours.read("dataset.json")) == json.loads(theirs.read("dataset.json"))
    a, b = Archive(out), Archive(FIX / "latents.zip")
    for i in range(len(b)):
        np.testing.assert_allclose(a.decode(i), b.decode(i), rtol=1e-5, atol=1e-6)
    assert run_cli(encode_main, [str(images), str(out), "--vae", str(vae_folder)]) == 2  # never replaces a dataset


def test_a_pickled_vae_is_refused_and_never_unpickled(tmp_path, vae_folder, capsys):
    import shutil

    class Marker:
        def __reduce__(self):
            return open, (str(tmp_path / "MARKER"), "w")

    folder = tmp_path / "pickled-vae"
    folder.mkdir()
    shutil.copy(vae_folder / "config.json", folder / "config.json")
    torch.save({"x": Marker()}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(UserError, match=r"data.vae: cannot load an AutoencoderKL from the folder .*pickled-vae"):
        load_vae(str(folder), torch.device("cpu"))
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        load_vae("nobody/no-such-vae", torch.device("cpu"))
    assert not (tmp_path / "MARKER").exists()


def _register_tiny16():
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class Extractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.register_buffer("proj", torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))

        @staticmethod
        def get_provided_features_list():
            return ("feat",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "feat"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            return (torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.proj,)

    if "fastratio-tiny16" not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor("fastratio-tiny16", Extractor)
    return "fastratio-tiny16"


def test_fid_against_edm2_reference_statistics_read_as_data(tmp_path):
    from fastratio.evaluate import fid_against_reference, fidelity_metrics, read_reference_stats

    name = _register_tiny16()
    images = torch.load(FIX / "ref_images.pt", weights_only=True)["images"]
    ref = read_reference_stats(FIX / "ref-stats.pkl")  # written by EDM2's calculate_metrics code
    feats = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1) @ torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(ref["mu"], feats.double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats.double().numpy(), rowvar=False), rtol=1e-5, atol=1e-9)
    assert fid_against_reference(images, ref, feature_extractor=name) == pytest.approx(0, abs=1e-5)
    shifted = (images.int() + 40).clamp(0, 255).to(torch.uint8)
    direct = fidelity_metrics(shifted, images, feature_extractor=name)["fid"]  # torch-fidelity on both image sets
    assert fid_against_reference(shifted, ref, feature_extractor=name) == pytest.approx(direct, rel=1e-4) and direct > 0.01
    np.savez(tmp_path / "edm.npz", mu=ref["mu"], sigma=ref["sigma"])  # EDM's fid-refs layout
    assert read_reference_stats(tmp_path / "edm.npz")["mu"].shape == (16,)


def test_hostile_reference_statistics_are_refused(tmp_path):
    import pickle

    from fastratio.evaluate import read_reference_stats

    class Marker:
        def __reduce__(self):
            return open, (str(tmp_path / "MARKER"), "w")

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"fid": {"mu": Marker(), "sigma": 0}}))
    with pytest.raises(UserError, match="evil.pkl is not reference statistics readable as data"):
        read_reference_stats(tmp_path / "evil.pkl")
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.zeros((2, 2))}}))
    with pytest.raises(UserError, match=r"mu \(3,\) and sigma \(2, 2\)"):
        read_reference_stats(tmp_path / "bad.pkl")
    assert not (tmp_path / "MARKER").exists()
