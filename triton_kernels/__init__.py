"""Triton kernels of fusedmerge, installed as ``fusedmerge.triton_kernels`` (never a top-level package)."""
