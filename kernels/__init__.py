"""Triton kernels and their PyTorch references (installed as edge_mmm.kernels)."""
