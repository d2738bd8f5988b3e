"""Numerical kernels below every model-facing layer: plain torch, no ftune imports."""
