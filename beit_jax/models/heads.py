"""Heads that sit on a frozen backbone: the linear probes (one linear classifier per block, trained at once).

The classification head of fine-tuning and the MIM head are part of `Beit` itself (beit.py); the UperNet head
of segmentation lives with the segmentation code.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from beit_jax.models import layers


def probe_features(hidden_states: Sequence[jax.Array], blocks: Sequence[int], use_cls: bool = True,
                   normalize: bool = True) -> jax.Array:
  """[len(blocks), B, F] f32: per chosen block, the mean of its patch tokens, after its [CLS] token when
  `use_cls` (unilm run_linear_eval.py's concat, F = 2D; else F = D). hidden_states[l] is block l's output.

  `normalize` standardises each part (CLS, mean) per example, without parameters (a LayerNorm with no affine):
  the residual stream's scale differs from block to block and between a random and a trained network, and one
  learning rate must suit every probe. Without it a randomly initialised network's features (scale ~0.02)
  need weights 50x larger than a trained one's, which AdamW's lr-sized steps take thousands of steps to reach.
  """
  norm = lambda x: (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-6)
  feats = []
  for l in blocks:
    h = hidden_states[l].astype(jnp.float32)
    parts = ([h[:, 0]] if use_cls else []) + [h[:, 1:].mean(axis=1)]
    feats.append(jnp.concatenate([norm(p) if normalize else p for p in parts], axis=-1))
  return jnp.stack(feats)


class LinearProbes(nnx.Module):
  """`num_probes` independent linear classifiers, one per feature set: logits [P, B, C] from features [P, B, F].

  Init as unilm's linear probe: weights N(0, 0.01), bias 0. One einsum trains every block's probe in the same
  step, so the best block is found in one run.
  """

  def __init__(self, num_probes: int, features: int, num_classes: int, *, rngs: nnx.Rngs):
    normal = lambda key, shape, dtype: 0.01 * jax.random.normal(key, shape, dtype)
    self.kernel = layers.param(rngs, normal, (num_probes, features, num_classes), ("probes", "embed", "classes"))
    self.bias = layers.param(rngs, layers.constant(0.0), (num_probes, num_classes), ("probes", "classes"))

  def __call__(self, feats: jax.Array, *, batch_major: bool = False) -> jax.Array:
    """Logits [P, B, C] of features [P, B, F], or of [B, P, F] with `batch_major` (stored features: no transposed
    copy of them is made)."""
    spec = "bpf,pfc->pbc" if batch_major else "pbf,pfc->pbc"
    return jnp.einsum(spec, feats, self.kernel[...]) + self.bias[...][:, None]
