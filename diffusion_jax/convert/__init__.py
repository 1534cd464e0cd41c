"""Converters from diffusers / transformers checkpoints (PyTorch) to this package's NNX models."""
