"""Semantic-segmentation evaluation: sliding-window inference and mIoU, as mmsegmentation computes them.

BEiT's ADE20K numbers (spec section C) are mmseg's `mode="slide"` test (crop 512, stride 341) and its mIoU over
the 150 classes: per class IoU = intersection / union accumulated over the whole split, then the mean over
classes that occur (in the labels or the predictions); pixels labelled `ignore_index` (255) count nowhere.

Host-side numpy around a jitted `predict(crops) -> logits`: the crops of one image go through the model as one
batch, and their logits are summed into the image with a count map (the overlap weights), then divided.
"""
from __future__ import annotations

from typing import Callable

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


def sliding_window_logits(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, crop: int,
                          stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Logits [H, W, K] of one image [H, W, C] from `predict` on crop x crop windows, and the count map [H, W]
  (how many windows covered each pixel; every entry >= 1). An image smaller than the crop is zero-padded at
  the bottom/right to the crop (as mmseg pads) and the padding's logits are dropped."""
  h, w = image.shape[:2]
  ph, pw = max(h, crop), max(w, crop)
  padded = np.zeros((ph, pw, *image.shape[2:]), image.dtype)
  padded[:h, :w] = image
  boxes = [(y, x) for y in window_starts(ph, crop, stride) for x in window_starts(pw, crop, stride)]
  logits = np.asarray(predict(np.stack([padded[y:y + crop, x:x + crop] for y, x in boxes])))
  total = np.zeros((ph, pw, logits.shape[-1]), np.float32)
  count = np.zeros((ph, pw), np.float32)
  for (y, x), out in zip(boxes, logits):
    total[y:y + crop, x:x + crop] += out
    count[y:y + crop, x:x + crop] += 1
  return total[:h, :w] / count[:h, :w, None], count[:h, :w]


def confusion(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
  """Confusion matrix [K, K] (rows: label, columns: prediction) over the pixels not labelled ignore_index."""
  pred, label = np.asarray(pred).ravel(), np.asarray(label).ravel()
  keep = label != ignore_index
  if (label[keep] >= num_classes).any() or (label[keep] < 0).any():
    bad = label[keep][(label[keep] >= num_classes) | (label[keep] < 0)][0]
    raise ValueError(f"label {int(bad)} outside [0, {num_classes}) and not the ignore label {ignore_index}")
  idx = label[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
  return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
  """IoU of each class (NaN where the class occurs in neither labels nor predictions)."""
  inter = np.diag(conf).astype(np.float64)
  union = conf.sum(0) + conf.sum(1) - inter
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def mean_iou(conf: np.ndarray) -> float:
  """mIoU: the mean over the classes that occur (mmseg's nanmean)."""
  iou = iou_per_class(conf)
  return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(conf: np.ndarray) -> float:
  return float(np.diag(conf).sum() / max(conf.sum(), 1))
