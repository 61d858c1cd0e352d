"""Optimizers: AdamW with 32-bit or blockwise 8-bit states, paged through CUDA managed memory."""

from fourbit.optim.adamw import OPTIMIZERS, AdamW8bit, PagedAdamW, PagedAdamW8bit, build_optimizer

__all__ = ["PagedAdamW", "AdamW8bit", "PagedAdamW8bit", "build_optimizer", "OPTIMIZERS"]
