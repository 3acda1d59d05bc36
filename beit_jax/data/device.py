"""Host-local numpy batches -> global jax.Arrays sharded over the mesh's data axes, prefetched; and what a jitted
step does to images that left the host as uint8 (pipelines' data.uint8).

No TensorFlow here: the training loops import this, and so can a job fed by synthetic batches.
"""
from __future__ import annotations

import collections
import itertools
from typing import Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from beit_jax.data import normalization


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = ("data",)) -> NamedSharding:
  """Leading (batch) axis split over `data_axes` (e.g. ("data", "fsdp")), the rest replicated."""
  return NamedSharding(mesh, P(tuple(data_axes)))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Each process passes its own rows; the result is the global batch (process_count x host rows)."""
  def put(x):
    x = np.asarray(x)
    if x.dtype == np.float64:
      x = x.astype(np.float32)
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def global_batches(batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, data_axes: Sequence[str] = ("data",),
                   prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Transfers run ahead of the step: the host copies batch k+`prefetch` while the devices compute batch k."""
  sharding = batch_sharding(mesh, data_axes)
  it = iter(batches)
  queue = collections.deque(to_global(b, sharding) for b in itertools.islice(it, prefetch))
  while queue:
    yield queue.popleft()
    for b in itertools.islice(it, 1):
      queue.append(to_global(b, sharding))


# -- uint8 images, on the device (inside the jitted step) -------------------------------------------------------------
def to_unit(images: jax.Array) -> jax.Array:
  """uint8 [..., C] in [0, 255] -> float32 in [0, 1]; float images pass unchanged (already in [0, 1])."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * (1.0 / 255.0)
  return images


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """(to_unit(images) - mean) / std: on a uint8 image, the host's float path (augment.normalize of the view in
  [0, 1]) within 0.5 / 255 / min(std) (the host rounds the view to uint8: pipelines._to_uint8)."""
  return (to_unit(images) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def resize_view(images: jax.Array, size: int, method: str = "lanczos3") -> jax.Array:
  """[B, H, W, C] -> [B, size, size, C] in [0, 1], antialiased (jax.image.resize is TensorFlow's scale-and-translate
  kernel: the host's tf.image.resize(..., antialias=True)), clipped as the host's views are."""
  out = jax.image.resize(to_unit(images), (images.shape[0], size, size, images.shape[-1]), method, antialias=True)
  return jnp.clip(out, 0.0, 1.0)


def pretrain_inputs(batch: dict, mean_std, tokenizer_size: Optional[int] = None,
                    tokenizer_resize: str = "lanczos3") -> dict:
  """Pre-training's step inputs, inside the jitted step, from what the host sent: a uint8 "image" (data.uint8)
  normalised with `mean_std` ((mean, std), or its name in config.data.mean_std: "inception", "imagenet"), a uint8
  "tokenizer_image" to [0, 1], or, without one (data.tokenizer_view="device"), the tokenizer view resized to
  `tokenizer_size` from the model view. A float batch (the default pipeline) passes unchanged, so the step may call
  this whatever the host sends."""
  image = batch["image"]
  if image.dtype != jnp.uint8:
    return batch
  if isinstance(mean_std, str):
    mean_std = normalization.mean_std(mean_std)
  out = {**batch, "image": normalize(image, *mean_std)}
  if "tokenizer_image" in batch:
    out["tokenizer_image"] = to_unit(batch["tokenizer_image"])
  else:
    if tokenizer_size is None:
      raise ValueError("the batch has no tokenizer view (data.tokenizer_view='device'): pass tokenizer_size")
    out["tokenizer_image"] = resize_view(image, tokenizer_size, tokenizer_resize)
  return out


def erase(images: jax.Array, boxes: jax.Array, key: jax.Array) -> jax.Array:
  """Random erasing's fill on the device: each image's rectangle boxes[i] = (top, left, rows, cols) (rows = 0: none)
  replaced by N(0, 1) noise, in the normalised image (timm RandomErasing(mode="pixel"))."""
  _, h, w, _ = images.shape
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  top, left, nr, nc = (boxes[:, i, None, None] for i in range(4))
  inside = (rows >= top) & (rows < top + nr) & (cols >= left) & (cols < left + nc)
  noise = jax.random.normal(key, images.shape, images.dtype)
  return jnp.where(inside[..., None], noise, images)


def classification_inputs(batch: dict, key: Optional[jax.Array], mean_std) -> dict:
  """Fine-tuning's (and the linear probe's) step inputs, inside the jitted step, from what the host sent: a uint8
  "image" (data.uint8) normalised with `mean_std` ((mean, std) or its name), and random erasing's "erase"
  rectangles filled with noise drawn from `key` (the step's: a fresh draw per step, the same after a resume). A
  float batch (the default pipeline) passes unchanged."""
  image = batch["image"]
  if image.dtype != jnp.uint8:
    return batch
  if isinstance(mean_std, str):
    mean_std = normalization.mean_std(mean_std)
  out = {k: v for k, v in batch.items() if k != "erase"}
  out["image"] = normalize(image, *mean_std)
  if "erase" in batch:
    if key is None:
      raise ValueError("the batch has random erasing's rectangles (data.uint8 with erase_prob > 0): pass a key")
    out["image"] = erase(out["image"], batch["erase"], key)
  return out
