"""Compute kernels (installed as ``hybrid.kernels``): each fast path sits beside its PyTorch reference."""
