"""Triton kernels for the hot path of the training step (shipped as ``fastratio.kernels``)."""
