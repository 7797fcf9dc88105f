"""Fused Triton ops, each with a hand-derived backward and a plain-PyTorch reference."""
