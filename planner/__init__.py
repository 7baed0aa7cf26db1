"""Capacity planning per region (SageServe lands here)."""
