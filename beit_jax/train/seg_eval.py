"""Semantic-segmentation evaluation: sliding-window inference and mIoU, as mmsegmentation computes them.

BEiT's ADE20K numbers (spec section C) are mmseg's `mode="slide"` test (crop 512, stride 341) and its mIoU over
the 150 classes: per class IoU = intersection / union accumulated over the whole split, then the mean over
classes that occur (in the labels or the predictions); pixels labelled `ignore_index` (255) count nowhere.

Everything runs on the device in one compiled program of fixed shapes: every image lies on the same canvas
(pipelines.seg_eval_transform), the host only lists each image's window offsets (`window_grid`), and the step
returns a confusion matrix summed over the batch (so hosts and devices need only add them up). The windows of an
image go through the model one at a time across the batch (a scan), their logits summed into a canvas of logits
with a count map; a window slot no image of the batch uses is skipped (lax.cond).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets of the windows along one axis: every `stride`, the last one flush with the far edge, one
  window when the image is no larger than the crop (mmseg's slide_inference grid)."""
  if crop <= 0 or stride <= 0:
    raise ValueError(f"crop={crop} and stride={stride} must be positive")
  if stride > crop:
    raise ValueError(f"stride={stride} > crop={crop} would leave pixels no window covers")
  if size <= crop:
    return [0]
  n = (size - crop + stride - 1) // stride + 1
  return sorted({min(i * stride, size - crop) for i in range(n)})


def window_grid(sizes: np.ndarray, crop: int, stride: int, canvas: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """(starts [B, W, 2] (row, column) int32, valid [B, W]) for images of `sizes` [B, 2] on a canvas (rows, cols)
  of at least crop x crop; W = the windows the whole canvas needs, so the shapes never change."""
  if min(canvas) < crop:
    raise ValueError(f"the evaluation canvas {canvas} is smaller than the crop {crop}")
  slots = len(window_starts(canvas[0], crop, stride)) * len(window_starts(canvas[1], crop, stride))
  starts = np.zeros((len(sizes), slots, 2), np.int32)
  valid = np.zeros((len(sizes), slots), bool)
  for b, (h, w) in enumerate(np.asarray(sizes)):
    if h > canvas[0] or w > canvas[1]:
      raise ValueError(f"image {b} of size {(int(h), int(w))} exceeds the evaluation canvas {canvas}")
    boxes = [(y, x) for y in window_starts(h, crop, stride) for x in window_starts(w, crop, stride)]
    starts[b, :len(boxes)] = boxes
    valid[b, :len(boxes)] = True
  return starts, valid


def slide_logits(predict: Callable[[jax.Array], jax.Array], images, starts, valid, transposed, crop: int):
  """(summed logits [B, R, C, K], count map [B, R, C]) of `predict(crops [B, crop, crop, ch]) -> [B, crop, crop,
  K]` over each image's windows. An image stored transposed has each window transposed back before `predict`
  and its logits transposed again, so the model always sees the upright image."""
  b, rows, cols, ch = images.shape

  def window(w):
    ys, xs = starts[:, w, 0], starts[:, w, 1]
    crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (crop, crop, ch)))(images, ys, xs)
    flip = lambda t: jnp.where(transposed.reshape(-1, 1, 1, 1), jnp.swapaxes(t, 1, 2), t)
    return ys, xs, flip(predict(flip(crops)))

  k = jax.eval_shape(lambda: window(0)[2]).shape[-1]
  add = jax.vmap(lambda acc, t, y, x: jax.lax.dynamic_update_slice(
      acc, jax.lax.dynamic_slice(acc, (y, x, 0), (crop, crop, acc.shape[-1])) + t, (y, x, 0)))

  def body(carry, w):
    def compute(carry):
      sums, counts = carry
      ys, xs, logits = window(w)
      v = valid[:, w].astype(logits.dtype).reshape(-1, 1, 1, 1)
      return add(sums, logits * v, ys, xs), add(counts, jnp.broadcast_to(v, (b, crop, crop, 1)), ys, xs)
    return jax.lax.cond(valid[:, w].any(), compute, lambda c: c, carry), None

  init = (jnp.zeros((b, rows, cols, k), jnp.float32), jnp.zeros((b, rows, cols, 1), jnp.float32))
  (sums, counts), _ = jax.lax.scan(body, init, jnp.arange(starts.shape[1]))
  return sums, counts[..., 0]


def confusion_matrix(pred, label, num_classes: int, keep) -> jax.Array:
  """Confusion matrix [K, K] (rows: label, columns: prediction) over the pixels where `keep` (labelled, real)."""
  idx = jnp.where(keep, label.astype(jnp.int32) * num_classes + pred.astype(jnp.int32), num_classes * num_classes)
  counts = jnp.bincount(idx.ravel(), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
  """IoU of each class (NaN where the class occurs in neither labels nor predictions)."""
  conf = np.asarray(conf, np.float64)
  inter = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
  """mIoU: the mean over the classes that occur (mmseg's nanmean)."""
  iou = iou_per_class(conf)
  return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
  conf = np.asarray(conf)
  return float(np.diag(conf).sum() / max(conf.sum(), 1))
