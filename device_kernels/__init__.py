"""Packed n-bit weight formats and fused kernels with numpy references."""
