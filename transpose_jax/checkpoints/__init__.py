"""Checkpoints: flat weights, official .pth conversion, orbax model checkpoints."""
