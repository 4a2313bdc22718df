"""fastratio: one-step diffusion generators trained by density-ratio estimation."""

__version__ = "0.1.0"
