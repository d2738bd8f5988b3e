"""Serving and shipping trained runs: predict, hot-swap, merge and export, peft import."""
