"""Non-leaky augmentation: EDM's AugmentPipe reproduced (against outputs EDM's own code wrote,
tests/fixtures/edm/augment.pt), sharded ranks get their rows of the global result, gradients pass,
and the whole pipeline traces into one graph (no data-dependent shapes, so no host sync)."""

from pathlib import Path

import pytest
import torch

from fastratio.augment import augment
from fastratio.config import AugmentConfig
from fastratio.draws import Draws
from fastratio.shard import Shard

FIXTURE = torch.load(Path(__file__).resolve().parent / "fixtures" / "edm" / "augment.pt", weights_only=True)


@pytest.mark.parametrize("index", range(len(FIXTURE["cases"])))
def test_matches_edms_augment_pipe(index):
    """Same generator state -> EDM's output (images to float rounding: EDM pads by a data-dependent
    margin, fastratio by its upper bound) and exactly EDM's 9 labels."""
    case = FIXTURE["cases"][index]
    # EDM drew from torch's default CPU generator after torch.manual_seed(seed): the same stream.
    draws = Draws(torch.Generator().manual_seed(int(case["seed"])))
    out, labels = augment(FIXTURE["images"], AugmentConfig(p=float(case["p"])), draws)
    torch.testing.assert_close(labels, case["labels"], rtol=0, atol=0)
    torch.testing.assert_close(out, case["out"], rtol=0, atol=1e-5)
    if float(case["p"]) == 1.0:  # every transform on: the test sees rotation, scaling and translation
        assert (labels[:, [2, 3, 4, 7, 8]] != 0).all()


def test_no_transform_keeps_the_image_and_zero_labels():
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out, labels = augment(x, AugmentConfig(p=0.0), Draws(torch.Generator().manual_seed(0)))
    assert labels.shape == (4, 9) and not labels.any()
    # sym6 up- then down-sampling is the identity (orthogonal wavelet low-pass), up to rounding.
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_a_disabled_transform_keeps_its_label_slot_at_zero():
    x = torch.rand(8, 1, 8, 8)
    _, labels = augment(x, AugmentConfig(p=1.0, scale=0, aniso=0), Draws(torch.Generator().manual_seed(3)))
    assert labels.shape == (8, 9) and not labels[:, [2, 5, 6]].any() and labels[:, [3, 4, 7, 8]].abs().sum() > 0


def test_each_rank_gets_its_rows_of_the_global_augmentation():
    x = torch.rand(6, 3, 8, 8)
    cfg = AugmentConfig(p=1.0)
    whole, whole_labels = augment(x, cfg, Draws(torch.Generator().manual_seed(5)))
    for rank in range(2):
        part, part_labels = augment(x[rank * 3 : rank * 3 + 3], cfg, Draws(torch.Generator().manual_seed(5)), Shard(rank, 2))
        torch.testing.assert_close(part_labels, whole_labels[rank * 3 : rank * 3 + 3], rtol=0, atol=0)
        torch.testing.assert_close(part, whole[rank * 3 : rank * 3 + 3], rtol=0, atol=1e-6)


def test_gradients_flow_through_augmentation():
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    out, _ = augment(x, AugmentConfig(p=1.0), Draws(torch.Generator().manual_seed(2)))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0


def test_traces_into_one_graph_with_replayed_draws():
    x = torch.rand(4, 3, 8, 8)
    cfg = AugmentConfig(p=1.0)
    draws = Draws(torch.Generator().manual_seed(7))
    with draws.recording() as requests:
        want, want_labels = augment(x, cfg, draws)
    replay = Draws(torch.Generator().manual_seed(7))
    tape = replay.draw_ahead(requests)

    def step(images, tape):
        with replay.replaying(tape):
            return augment(images, cfg, replay)

    got, got_labels = torch.compile(step, fullgraph=True, backend="aot_eager")(x, tape)
    torch.testing.assert_close(got_labels, want_labels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
