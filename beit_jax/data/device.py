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


# -- the views made from the crop (data.resize="device") ----------------------------------------------------------
# data.crop_canvas's default: the side of the square the host pads each crop into. It holds every crop of an
# image up to 512 px whole, ImageNet's common 500 x 375 and 375 x 500 included (a crop can be the whole image).
CROP_CANVAS = 512
# What the host sends in place of pre-training's views (pipelines.pretrain_transform): crop_views' inputs.
CROP_KEYS = ("crop", "crop_size", "flip", "jitter", "jitter_order")


def _keys_cubic(x):
  """Keys' cubic convolution kernel, a = -0.5 (TensorFlow's and PIL's "bicubic"), of |x|."""
  a = -0.5
  return jnp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                   jnp.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _lanczos3(x):
  """sinc(x) sinc(x / 3) on |x| < 3, of |x|."""
  safe = jnp.where(x > 1e-3, x, 1.0)
  y = 3.0 * jnp.sin(jnp.pi * safe) * jnp.sin(jnp.pi * safe / 3.0) / (jnp.pi * safe) ** 2
  return jnp.where(x > 1e-3, jnp.where(x < 3, y, 0.0), 1.0)


KERNELS = {"bicubic": _keys_cubic, "lanczos3": _lanczos3}


def resize_weights(length: jax.Array, size: int, canvas: int, method: str) -> jax.Array:
  """[B, size, canvas]: the antialiased resampling of each row's first length[b] samples (of `canvas`) to `size`,
  as TensorFlow's scale-and-translate (tf.image.resize(..., antialias=True)) computes it for an input of that
  length: output sample i centred at (i + 0.5) length / size, the kernel stretched by the shrink factor (when
  shrinking), the weights of the valid samples normalised to sum to 1 (the padding beyond `length` gets none)."""
  n = length.astype(jnp.float32)[:, None, None]
  inv = n / size  # input samples per output sample
  centre = (jnp.arange(size, dtype=jnp.float32)[None, :, None] + 0.5) * inv
  stretch = jnp.maximum(inv, 1.0)
  j = jnp.arange(canvas, dtype=jnp.float32)[None, None, :]
  w = KERNELS[method](jnp.abs(j + 0.5 - centre) / stretch) * (j < n)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def resize_crops(crops: jax.Array, sizes: jax.Array, size: int, method: str) -> jax.Array:
  """uint8 [B, C, C, 3] crops, of which the top-left sizes[b] = (height, width) are the image -> float32 [B, size,
  size, 3] in [0, 1], each resized as the host's augment.resize (antialiased, clipped) would resize the crop alone.
  Two matmuls per image (rows, then columns), at full f32 precision (TPUs otherwise multiply in bf16)."""
  canvas = crops.shape[1]
  rows = resize_weights(sizes[:, 0], size, canvas, method)
  cols = resize_weights(sizes[:, 1], size, canvas, method)
  x = to_unit(crops)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("bik,bkwc->biwc", rows, x, precision=hp)
  x = jnp.einsum("bjw,biwc->bijc", cols, x, precision=hp)
  return jnp.clip(x, 0.0, 1.0)


# augment._GRAY: PIL's L. numpy, not jnp: a jax array made at import would start the backend before a multi-process
# run's jax.distributed.initialize.
_GRAY = np.asarray((0.299, 0.587, 0.114), np.float32)


def color_jitter(views: jax.Array, factors: jax.Array, order: jax.Array) -> jax.Array:
  """augment.color_jitter with the host's draws, on [B, H, W, 3] views in [0, 1]: brightness, contrast and
  saturation blends (clipped), factors[b] = (brightness, contrast, saturation), applied in order[b]."""
  def blend(a, b, f):
    return jnp.clip(b + f * (a - b), 0.0, 1.0)
  ops = (lambda x, f: jnp.clip(f * x, 0.0, 1.0),
         lambda x, f: blend(x, jnp.tensordot(jnp.mean(x, axis=(0, 1)), _GRAY, 1), f),
         lambda x, f: blend(x, jnp.tensordot(x, _GRAY, 1)[..., None], f))

  def one(x, f, o):
    for k in range(3):
      x = jax.lax.switch(o[k], [lambda x, j=j: ops[j](x, f[j]) for j in range(3)], x)
    return x
  return jax.vmap(one)(views, factors, order)


def crop_views(batch: dict, image_size: int, tokenizer_size: int, tokenizer_resize: str) -> tuple[jax.Array, ...]:
  """data.resize="device": the model view (image_size, bicubic) and the tokenizer view (tokenizer_size,
  `tokenizer_resize`) of each crop, in [0, 1], each jittered and flipped with the example's draws: on the host,
  pipelines._pretrain_views does the same to the same crop."""
  def view(size, method):
    x = resize_crops(batch["crop"], batch["crop_size"], size, method)
    x = color_jitter(x, batch["jitter"], batch["jitter_order"])
    return jnp.where(batch["flip"][:, None, None, None], x[:, :, ::-1], x)
  return view(image_size, "bicubic"), view(tokenizer_size, tokenizer_resize)


def pretrain_inputs(batch: dict, mean_std, tokenizer_size: Optional[int] = None,
                    tokenizer_resize: str = "lanczos3", image_size: Optional[int] = None) -> dict:
  """Pre-training's step inputs, inside the jitted step, from what the host sent: a uint8 "image" (data.uint8)
  normalised with `mean_std` ((mean, std), or its name in config.data.mean_std: "inception", "imagenet"), a uint8
  "tokenizer_image" to [0, 1], or, without one (data.tokenizer_view="device"), the tokenizer view resized to
  `tokenizer_size` from the model view; or, from a "crop" (data.resize="device"), both views (crop_views, the
  model view at `image_size`). A float batch (the default pipeline) passes unchanged, so the step may call this
  whatever the host sends."""
  if isinstance(mean_std, str):
    mean_std = normalization.mean_std(mean_std)
  if "crop" in batch:
    if image_size is None or tokenizer_size is None:
      raise ValueError("the batch has crops (data.resize='device'): pass image_size and tokenizer_size")
    image, tok = crop_views(batch, image_size, tokenizer_size, tokenizer_resize)
    rest = {k: v for k, v in batch.items() if k not in CROP_KEYS}
    return {**rest, "image": normalize(image, *mean_std), "tokenizer_image": tok}
  image = batch["image"]
  if image.dtype != jnp.uint8:
    return batch
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
