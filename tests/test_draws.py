"""fastratio.draws: replaying numbers drawn ahead gives exactly the live draws, and a step whose
requests differ from the recorded ones fails loudly instead of reading the wrong tensor."""

import pytest
import torch

from fastratio.draws import Draws


def _requests(draws: Draws) -> list[torch.Tensor]:
    return [draws.rand((3, 2), "cpu"), draws.randn((4,), "cpu", torch.float64), draws.randint(2**62, (1,), "cpu"), draws.randn((2, 5), "cpu")]


def test_draw_ahead_and_replay_equal_live_draws_and_leave_the_same_generator_state():
    live = Draws(torch.Generator().manual_seed(7))
    with live.recording() as requests:
        want_first = _requests(live)
    want_second = _requests(live)
    assert [r.kind for r in requests] == ["rand", "randn", "randint", "randn"]
    assert requests[1].dtype == torch.float64 and requests[2].high == 2**62

    ahead = Draws(torch.Generator().manual_seed(7))
    for want in (want_first, want_second):
        drawn = ahead.draw_ahead(requests)
        with ahead.replaying(drawn):
            got = _requests(ahead)
        assert all(g is d for g, d in zip(got, drawn))
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)
    assert torch.equal(ahead.generator.get_state(), live.generator.get_state())


def test_replay_refuses_a_request_the_recording_does_not_hold():
    draws = Draws(torch.Generator().manual_seed(0))
    with draws.recording() as requests:
        draws.rand((3,), "cpu")
    with pytest.raises(RuntimeError, match="random request 0 is"), draws.replaying(draws.draw_ahead(requests)):
        draws.rand((4,), "cpu")
    with pytest.raises(RuntimeError, match="more random tensors than its recorded 1"), draws.replaying(draws.draw_ahead(requests)):
        draws.rand((3,), "cpu")
        draws.rand((3,), "cpu")
    with pytest.raises(RuntimeError, match="used 0 of its 1 recorded"), draws.replaying(draws.draw_ahead(requests)):
        pass
