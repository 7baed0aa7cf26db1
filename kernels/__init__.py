"""Attention kernels for the engines (LeanAttention lands here)."""
