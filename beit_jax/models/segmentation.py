"""UperNet on BEiT features: the semantic-segmentation model of BEiT's ADE20K results (spec section C).

unilm's `semantic_segmentation` (mmseg): the backbone's outputs after blocks 3/5/7/11 (base; 7/11/15/23 large),
[CLS] dropped and laid out on the patch grid (1/16 of the image), become four scales through the multi-scale
adapter (4x: deconv k2 s2 + BN + GELU + deconv k2 s2; 2x: deconv; 1x: identity; 1/2x: 2x2 max-pool), then
mmseg's UPerHead (lateral 1x1 convs, a pyramid pooling module with scales 1/2/3/6 on the coarsest level, the
top-down path, 3x3 FPN convs, everything concatenated at 1/4 and fused, dropout 0.1, a 1x1 classifier) with
channels = the backbone width, and the auxiliary FCN head on the third level (one 3x3 conv of 256 channels,
dropout 0.1; weight 0.4 in the loss). ConvModules are conv (no bias) + BatchNorm + ReLU. mmseg uses SyncBN: a
BatchNorm inside a jitted step over a batch sharded across devices computes its statistics over the global batch
(XLA reduces across the shards), which is what SyncBN does.

Images NHWC at the backbone's img_size; logits [B, 4 gh, 4 gw, K] on 4x the patch grid (H/4 for 16 px patches),
auxiliary logits [B, gh, gw, K] on the patch grid; both are upsampled to the label size in the loss.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from beit_jax.models import layers
from beit_jax.models.beit import Beit, BeitConfig

# unilm's out_indices (0-based blocks) per depth.
OUT_INDICES = {12: (3, 5, 7, 11), 24: (7, 11, 15, 23)}


@dataclasses.dataclass(frozen=True)
class SegConfig:
  num_classes: int = 150
  out_indices: tuple[int, ...] = ()   # () = OUT_INDICES[depth]
  channels: int = 0                   # UPerHead channels; 0 = the backbone width (unilm)
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  aux_channels: int = 256
  aux_in_index: int = 2
  dropout: float = 0.1


def _kaiming():
  return jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # mmcv's kaiming init of conv kernels


def _axes(*names):
  """Logical axis names for a flax layer's `*_metadata` (train/sharding.py RULES: "conv_out" over fsdp). BEiT-L's
  head is ~115M parameters of 3x3 convolutions at 1024 channels, a third of the model: replicated under fsdp it
  would cost every chip 1.8 GB of state. Sharded eagerly only under a mesh, as models/layers.param."""
  return {"out_sharding": names,
          "eager_sharding": nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty}


def _conv(din: int, dout: int, k: int, *, out_axis: str = "conv_out", transpose: bool = False, **kw):
  """nnx.Conv / ConvTranspose with its kernel [k, k, din, dout] and bias named for sharding; a classifier's
  outputs (150 classes divide no mesh) are `out_axis="classes"` (replicated)."""
  cls, extra = (nnx.ConvTranspose, {"strides": (k, k)}) if transpose else (nnx.Conv, {"padding": "SAME"})
  return cls(din, dout, (k, k), kernel_metadata=_axes(None, None, "conv_in", out_axis),
             bias_metadata=_axes(out_axis), **extra, **kw)


def _batch_norm(d: int, rngs: nnx.Rngs):
  return nnx.BatchNorm(d, momentum=0.9, epsilon=1e-5, scale_metadata=_axes("conv_out"),
                       bias_metadata=_axes("conv_out"), rngs=rngs)


class ConvModule(nnx.Module):
  """mmcv's ConvModule: k x k conv (no bias) + BatchNorm + ReLU."""

  def __init__(self, din: int, dout: int, k: int, *, rngs: nnx.Rngs):
    self.conv = _conv(din, dout, k, use_bias=False, kernel_init=_kaiming(), rngs=rngs)
    self.bn = _batch_norm(dout, rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _adaptive_avg_matrix(size: int, bins: int) -> np.ndarray:
  """[bins, size] averaging weights of PyTorch's adaptive_avg_pool (bin i: floor(i*size/bins) .. ceil((i+1)*size/bins))."""
  m = np.zeros((bins, size), np.float32)
  for i in range(bins):
    lo, hi = (i * size) // bins, -(-((i + 1) * size) // bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def adaptive_avg_pool(x, bins: int):
  h, w = x.shape[1:3]
  return jnp.einsum("ih,jw,bhwc->bijc", _adaptive_avg_matrix(h, bins), _adaptive_avg_matrix(w, bins), x)


def resize(x, hw: Sequence[int]):
  """Bilinear, align_corners=False (mmseg's `resize`), no antialiasing."""
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear", antialias=False)


class Adapter(nnx.Module):
  """The four scales from four same-size feature maps: 4x, 2x, 1x, 1/2x."""

  def __init__(self, d: int, *, rngs: nnx.Rngs):
    deconv = lambda: _conv(d, d, 2, transpose=True, rngs=rngs)  # k2 s2
    self.up4_a, self.up4_bn, self.up4_b = deconv(), _batch_norm(d, rngs), deconv()
    self.up2 = deconv()

  def __call__(self, feats):
    f1, f2, f3, f4 = feats
    x1 = self.up4_b(layers.gelu(self.up4_bn(self.up4_a(f1))))
    b, h, w, c = f4.shape
    x4 = f4.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
    return [x1, self.up2(f2), f3, x4]


class UperHead(nnx.Module):
  def __init__(self, d: int, channels: int, num_classes: int, pool_scales: Sequence[int], dropout: float, *,
               rngs: nnx.Rngs):
    self.pool_scales = tuple(pool_scales)
    self.ppm = nnx.List([ConvModule(d, channels, 1, rngs=rngs) for _ in pool_scales])
    self.bottleneck = ConvModule(d + len(pool_scales) * channels, channels, 3, rngs=rngs)
    self.lateral = nnx.List([ConvModule(d, channels, 1, rngs=rngs) for _ in range(3)])
    self.fpn = nnx.List([ConvModule(channels, channels, 3, rngs=rngs) for _ in range(3)])
    self.fuse = ConvModule(4 * channels, channels, 3, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)  # Dropout2d: whole channels
    self.cls = _conv(channels, num_classes, 1, out_axis="classes", kernel_init=jax.nn.initializers.normal(0.01),
                     rngs=rngs)

  def __call__(self, levels):
    top = levels[3]
    pooled = [resize(m(adaptive_avg_pool(top, s)), top.shape[1:3]) for m, s in zip(self.ppm, self.pool_scales)]
    lat = [m(x) for m, x in zip(self.lateral, levels[:3])] + [self.bottleneck(jnp.concatenate([top, *pooled], -1))]
    for i in range(3, 0, -1):  # top-down
      lat[i - 1] = lat[i - 1] + resize(lat[i], lat[i - 1].shape[1:3])
    outs = [m(x) for m, x in zip(self.fpn, lat[:3])] + [lat[3]]
    size = outs[0].shape[1:3]
    fused = self.fuse(jnp.concatenate([outs[0]] + [resize(o, size) for o in outs[1:]], -1))
    return self.cls(self.dropout(fused))


class FCNHead(nnx.Module):
  def __init__(self, d: int, channels: int, num_classes: int, dropout: float, *, rngs: nnx.Rngs):
    self.conv = ConvModule(d, channels, 3, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)
    self.cls = _conv(channels, num_classes, 1, out_axis="classes", kernel_init=jax.nn.initializers.normal(0.01),
                     rngs=rngs)

  def __call__(self, x):
    return self.cls(self.dropout(self.conv(x)))


def resolve(bcfg: BeitConfig, cfg: SegConfig) -> SegConfig:
  """`cfg` with its taps filled in (() = unilm's per depth, else the ends of the four quarters), checked against
  the backbone: a ValueError for an odd patch grid or taps that are not four of its blocks."""
  if bcfg.grid[0] % 2 or bcfg.grid[1] % 2:
    raise ValueError(f"img_size {bcfg.img_size} gives an odd patch grid {bcfg.grid}; UperNet needs it even (the "
                     "1/2x level max-pools it)")
  d = bcfg.depth
  taps = tuple(int(i) for i in cfg.out_indices) or OUT_INDICES.get(d) or (d // 4 - 1, d // 2 - 1, 3 * d // 4 - 1,
                                                                          d - 1)
  if len(taps) != 4 or min(taps) < 0 or max(taps) >= d:
    raise ValueError(f"SegConfig.out_indices={taps}: four 0-based blocks of the {d} are needed")
  return dataclasses.replace(cfg, out_indices=taps)


class UperNet(nnx.Module):
  """BEiT backbone + adapter + UPerHead (+ auxiliary FCN head). `__call__(images)` -> (logits, aux logits) in f32:
  logits [B, 4 gh, 4 gw, K] (the 4x level), aux [B, gh, gw, K] at the resolution of the level the auxiliary head
  works on (the 1x level), as mmseg's and transformers' heads return them. `seg_loss` resizes each straight to
  the labels; resizing aux to 4x first would be a second bilinear pass that changes the loss (on the model and
  labels of tests/test_parity_seg.py: 14.9188 against transformers' 14.9237)."""

  def __init__(self, backbone: Beit, cfg: SegConfig, *, rngs: nnx.Rngs):
    bcfg: BeitConfig = backbone.config
    if bcfg.num_classes or bcfg.vocab_size:
      raise ValueError("the segmentation backbone must have no head (num_classes=0, vocab_size=0)")
    self.cfg = resolve(bcfg, cfg)
    d = bcfg.width
    channels = cfg.channels or d
    self.backbone = backbone
    self.adapter = Adapter(d, rngs=rngs)
    self.head = UperHead(d, channels, cfg.num_classes, cfg.pool_scales, cfg.dropout, rngs=rngs)
    self.aux = FCNHead(d, cfg.aux_channels, cfg.num_classes, cfg.dropout, rngs=rngs)

  def features(self, images):
    _, hidden = self.backbone.encode(images, return_hidden_states=True)
    b, (gh, gw) = images.shape[0], self.backbone.config.grid
    # hidden[i + 1] is the output of block i (0-based), unilm's out_indices; [CLS] dropped.
    return [hidden[i + 1][:, 1:].astype(jnp.float32).reshape(b, gh, gw, -1) for i in self.cfg.out_indices]

  def __call__(self, images):
    levels = self.adapter(self.features(images))
    logits = self.head(levels)
    aux = self.aux(levels[self.cfg.aux_in_index])
    return logits.astype(jnp.float32), aux.astype(jnp.float32)


def seg_loss_sums(logits, aux, labels, ignore_index: int = 255, aux_weight: float = 0.4):
  """Summed pixel cross-entropy of the logits upsampled to the labels [B, H, W], skipping `ignore_index`, plus
  `aux_weight` x the auxiliary head's; and {"count": labelled pixels, "main": the main head's sum}. Sums add up
  over gradient-accumulation slices and devices; divided by the count they are mmseg's CrossEntropyLoss."""
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)

  def ce(x):
    x = resize(x, labels.shape[1:3])
    logp = jax.nn.log_softmax(x, axis=-1)
    return -(jnp.take_along_axis(logp, safe[..., None], -1)[..., 0] * valid).sum()

  main = ce(logits)
  return main + aux_weight * ce(aux), {"count": valid.sum().astype(jnp.float32), "main": main}


def seg_loss(logits, aux, labels, ignore_index: int = 255, aux_weight: float = 0.4):
  """(total, main) loss averaged over the labelled pixels (mmseg's, and transformers' BeitForSemanticSegmentation)."""
  total, sums = seg_loss_sums(logits, aux, labels, ignore_index, aux_weight)
  n = jnp.maximum(sums["count"], 1.0)
  return total / n, sums["main"] / n
