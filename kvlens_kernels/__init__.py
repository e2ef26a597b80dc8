"""Attention kernels: each file holds a Triton kernel, its PyTorch reference and a dispatcher."""
