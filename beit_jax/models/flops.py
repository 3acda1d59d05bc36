"""The analytic FLOP count of a BEiT: the "model FLOPs" of MFU, and a check on XLA's count of a compiled step.

Matmuls only (2 FLOPs per multiply-add; LayerNorm, softmax, GELU and the optimizer are <1% for these sizes):
patch embedding, per block the qkv projection, q k^T, attention x v, the output projection and the two MLP
matmuls, and the head (MIM: only the `num_predict` masked positions per image, as the pre-training step
gathers them; classifier: one row per image). Training = 3x the forward (the backward pass has two matmuls per
forward matmul: the input and the weight gradients).
"""
from __future__ import annotations

from typing import Optional

from beit_jax.models.beit import BeitConfig


def forward_flops(cfg: BeitConfig, *, num_predict: Optional[int] = None) -> float:
  """FLOPs of one image's forward pass."""
  n, d, f = cfg.num_patches, cfg.width, cfg.mlp_dim
  t = n + 1
  patch = 2 * n * cfg.patch_size ** 2 * cfg.in_chans * d
  block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * f
  if cfg.vocab_size:
    head = 2 * (num_predict or n) * d * cfg.vocab_size
  else:
    head = 2 * d * cfg.num_classes
  return float(patch + cfg.depth * block + head)


def train_flops(cfg: BeitConfig, batch: int, *, num_predict: Optional[int] = None) -> float:
  """FLOPs of one training step on `batch` images (forward + backward)."""
  return 3.0 * batch * forward_flops(cfg, num_predict=num_predict)
