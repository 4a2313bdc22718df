"""Every denoiser a teacher can be, by the name its checkpoint gives, and how to build one safely.

``network_kwargs`` in a fastratio checkpoint (and ``_init_kwargs`` of an EDM/EDM2 pickle) are the
constructor kwargs of EDM's or EDM2's class, plus ``precond`` naming the class when it is not
``EDMPrecond``. Sizes are bounded before anything is built, so absurd values from a file stop with
one line instead of allocating.
"""

from __future__ import annotations

from torch import nn

from .edm2 import Precond as EDM2Precond
from .unet import EDMPrecond, VEPrecond, VPPrecond

PRECONDS: dict[str, type[nn.Module]] = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond, "EDM2Precond": EDM2Precond}

# Integer kwargs that size a network, with bounds far above any EDM/EDM2/ADM configuration.
_SIZE_BOUNDS = {
    "img_resolution": 4096, "img_channels": 64, "label_dim": 100_000, "augment_dim": 64, "model_channels": 4096,
    "channel_mult_emb": 64, "channel_mult_noise": 64, "num_blocks": 64, "M": 100_000, "logvar_channels": 4096,
    "channels_per_head": 4096,
}


def check_sizes(kwargs: dict) -> None:
    """ValueError naming the first size kwarg outside its bound."""
    for name, bound in _SIZE_BOUNDS.items():
        value = kwargs.get(name)
        if value is not None and (type(value) is not int or not 0 <= value <= bound):
            raise ValueError(f"network kwarg {name}={str(value)[:40]} outside [0, {bound}]")
    if kwargs.get("channels_per_head") == 0:
        raise ValueError("network kwarg channels_per_head=0 outside [1, 4096]")
    mult = kwargs.get("channel_mult", [])
    if not isinstance(mult, list | tuple) or len(mult) > 12 or not all(type(m) is int and 0 < m <= 64 for m in mult):
        raise ValueError(f"network kwarg channel_mult={str(mult)[:60]} is not a short list of small positive ints")


def build_denoiser(kwargs: dict) -> nn.Module:
    """The denoiser a checkpoint's ``network_kwargs`` describe (``check_sizes`` first)."""
    if not isinstance(kwargs, dict):
        raise TypeError(f"network kwargs are a {type(kwargs).__name__}, not a dict")
    check_sizes(kwargs)
    kwargs = dict(kwargs)
    name = kwargs.pop("precond", "EDMPrecond")
    if name not in PRECONDS:
        raise ValueError(f"precond {name!r} is not one of {', '.join(PRECONDS)}")
    return PRECONDS[name](**kwargs)
