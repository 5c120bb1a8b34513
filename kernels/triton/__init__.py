"""Fused Triton kernels (filled in below)."""
