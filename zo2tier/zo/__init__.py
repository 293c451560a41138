"""Zeroth-order math: keyed RNG, fused perturbation kernels, the update log."""
