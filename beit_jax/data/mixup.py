"""Mixup and CutMix on device, as pure JAX functions (timm's `Mixup` in batch mode, BEiT's fine-tuning).

BEiT fine-tunes with mixup alpha 0.8, cutmix alpha 1.0, switch probability 0.5 and label smoothing 0.1: per
batch, either mixup (a blend with the reversed batch) or cutmix (a box from the reversed batch, the weight
corrected to the box's true area) is applied, and the smoothed one-hot targets are blended with the same
weight. Jittable; randomness from an explicit key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.1) -> jax.Array:
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box(key, height: int, width: int, lam):
  """A box of area ~(1 - lam) of the image, centre uniform, clipped to the image; returns (mask, true lam)."""
  ky, kx = jax.random.split(key)
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  true_lam = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
  return box, true_lam


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 prob: float = 1.0, smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
  """(images [B, H, W, C], int labels [B]) -> (mixed images, soft targets [B, num_classes] f32)."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError("mixup_cutmix needs mixup_alpha > 0 or cutmix_alpha > 0")
  k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(key, 5)
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if cutmix_alpha <= 0:
    use_cutmix = jnp.bool_(False)
  elif mixup_alpha <= 0:
    use_cutmix = jnp.bool_(True)
  else:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1.0)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1.0)
  box, lam_box = _cutmix_box(k_box, images.shape[1], images.shape[2], lam_cut)
  apply = jax.random.uniform(k_apply) < prob
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0).astype(jnp.float32)
  flipped = images[::-1]
  mixed = jnp.where(use_cutmix, jnp.where(box[None, :, :, None], flipped, images),
                    lam.astype(images.dtype) * images + (1 - lam).astype(images.dtype) * flipped)
  mixed = jnp.where(apply, mixed, images)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]
