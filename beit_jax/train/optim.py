"""Optimizers of the BEiT recipes: AdamW with the original weight-decay mask, cosine schedule with linear
warm-up from 0, gradient clipping, and layer-wise learning-rate decay for fine-tuning.

Everything works on the nnx.Param state as a pure pytree (`nnx.split(model, nnx.Param, ...)`); parameter
names are the nnx paths (e.g. ("blocks", 3, "attn", "qkv")).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

# unilm `no_weight_decay()`: position embedding and [CLS]; every 1-D tensor and bias is skipped as well.
_NO_DECAY_NAMES = ("pos_embed", "cls_token")


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def weight_decay_mask(params) -> Any:
  """True where AdamW applies weight decay: matrices only, not biases, 1-D params, pos_embed, cls_token."""
  def decays(path, leaf):
    names = _path_names(path)
    return leaf.ndim > 1 and not names[-1].endswith("bias") and not any(n in _NO_DECAY_NAMES for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def layer_id(names: list[str], depth: int) -> int:
  """unilm `get_num_layer_for_vit`: embeddings 0, block i -> i + 1, everything else (heads, final norms,
  shared relative position table) depth + 1. A model that holds the BEiT as `backbone` (the segmentation
  UperNet) is numbered by the backbone's names; its heads and adapter are depth + 1, as in unilm's
  semantic_segmentation layer_decay_optimizer_constructor (where the adapter is part of the backbone but
  matches no embedding or block name)."""
  if names[0] == "backbone":
    return layer_id(names[1:], depth)
  if names[0] in ("cls_token", "mask_token", "pos_embed", "patch_kernel", "patch_bias"):
    return 0
  if names[0] == "blocks":
    return int(names[1]) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float) -> Any:
  """Per-parameter learning-rate scale decay ** (depth + 1 - layer_id) (BEiT fine-tuning's layer decay)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay ** (depth + 1 - layer_id(_path_names(path), depth)), params)


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The per-step learning rate `optim.schedule` names:
  "cosine" (default): cosine from `lr` to `min_lr` after a linear warm-up from 0 (unilm utils.cosine_scheduler);
  "poly": mmcv's PolyLrUpdaterHook, (lr - min_lr) (1 - step / total)^power + min_lr, times mmcv's linear
  warm-up factor 1 - (1 - step / warmup)(1 - 1e-6) over the first warmup steps (BEiT's ADE20K recipe)."""
  warmup = int(cfg.get("warmup_steps", 0))
  if warmup >= total_steps:
    raise ValueError(f"optim.warmup_steps={warmup} must be smaller than the run's {total_steps} steps")
  kind = cfg.get("schedule", "cosine")
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total_steps, end_value=cfg.get("min_lr", 0.0))
  if kind == "poly":
    lr, min_lr, power = cfg.lr, cfg.get("min_lr", 0.0), cfg.get("power", 1.0)

    def poly(step):
      t = jnp.minimum(step, total_steps) / total_steps
      value = (lr - min_lr) * (1.0 - t) ** power + min_lr
      if not warmup:
        return value
      return value * jnp.where(step < warmup, 1.0 - (1.0 - step / warmup) * (1.0 - 1e-6), 1.0)
    return poly
  raise ValueError(f"optim.schedule={kind!r}: use 'cosine' or 'poly'")


def _scale_by_tree(scales) -> optax.GradientTransformation:
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u, s: u * s, updates, scales), state))


def make(cfg: ml_collections.ConfigDict, params, total_steps: int,
         depth: Optional[int] = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer a config's `optim` block describes, and its learning-rate schedule.

  optim: lr, min_lr, warmup_steps, weight_decay, b1, b2, eps, clip_grad (None/0 = off), layer_decay (1 = off),
  name ("adamw" or "adam").
  """
  lr = schedule(cfg, total_steps)
  parts = []
  if cfg.get("clip_grad"):
    parts.append(optax.clip_by_global_norm(cfg.clip_grad))
  name = cfg.get("name", "adamw")
  if name == "adamw":
    parts.append(optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                             weight_decay=cfg.get("weight_decay", 0.05), mask=weight_decay_mask(params)))
  elif name == "adam":
    parts.append(optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8)))
  else:
    raise ValueError(f"optim.name={name!r}: use 'adamw' or 'adam'")
  decay = cfg.get("layer_decay", 1.0)
  if decay != 1.0:
    if depth is None:
      raise ValueError("optim.layer_decay needs the model depth")
    parts.append(_scale_by_tree(layer_decay_scales(params, depth, decay)))
  return optax.chain(*parts), lr


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def summed_value_and_grad(loss_fn, graphdef, params, rest, batch, micro_steps: int = 1):
  """Value and gradient of a loss that is a *sum* over the batch's examples, taken over `micro_steps` slices of
  the batch in turn (gradient accumulation: the activation memory of one slice, the result of the whole batch).

  loss_fn(model, batch) -> (sum, aux) where aux holds sums too (counts, correct predictions). Sums add up
  exactly over slices, so the caller divides once by the global normaliser (e.g. the masked count) and gets
  the same numbers with or without accumulation. Returns (sum, aux), grads (a Param state like `params`), and
  `rest`: the model's non-Param state after the passes (its RNG stream counters advanced).

  Slice j holds rows j, j + k, j + 2k, ... (k = micro_steps): every device keeps an equal share of every slice
  under a batch-sharded layout, so no slice ever waits on a subset of the devices.
  """
  def one(rest, mb):
    model = nnx.merge(graphdef, params, rest, copy=True)  # Variables of this trace level: the RNG counts move
    out, grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, mb)
    return nnx.split(model, nnx.Param, ...)[2], (out, grads)

  if micro_steps == 1:
    rest, (out, grads) = one(rest, batch)
    return out, grads, rest
  slices = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // micro_steps, micro_steps, *x.shape[1:]),
                                               0, 1), batch)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(one, rest, jax.tree.map(lambda x: x[0], slices))[1])

  def body(carry, mb):
    rest, total = carry
    rest, out = one(rest, mb)
    return (rest, jax.tree.map(jnp.add, total, out)), None

  (rest, (out, grads)), _ = jax.lax.scan(body, (rest, zeros), slices)
  return out, grads, rest
