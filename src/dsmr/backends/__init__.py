"""Backends the model calls into where they are faster than plain PyTorch."""
