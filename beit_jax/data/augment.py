"""Per-example image transforms in TensorFlow (run inside tf.data on the host).

Every random draw is stateless, from a per-example seed that is a pure function of (seed, epoch, index): an
example is augmented identically whichever host reads it and after a resume. Images are float32 in [0, 1]
(HWC) until `normalize`. The semantics follow the PyTorch recipes BEiT was trained with (torchvision
RandomResizedCrop and ColorJitter, timm RandAugment "rand-m9-mstd0.5-inc1" and RandomErasing), re-written with
TF ops.
"""
from __future__ import annotations

import math

import tensorflow as tf

Seed = tf.Tensor  # int64 [2], for tf.random.stateless_*


def example_seed(seed: int, epoch, index) -> Seed:
  base = tf.constant([seed, 0x5EED], tf.int64)
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64)), tf.cast(index, tf.int64))


def split(seed: Seed, n: int) -> list[Seed]:
  return list(tf.unstack(tf.random.experimental.stateless_split(seed, n)))


def _uniform(seed, shape=(), lo=0.0, hi=1.0):
  return tf.random.stateless_uniform(shape, seed, lo, hi, tf.float32)


def to_float(image: tf.Tensor, channels: int = 3) -> tf.Tensor:
  """uint8 HWC -> float32 in [0, 1] with `channels` channels (grey images are repeated to RGB)."""
  image = tf.image.convert_image_dtype(image, tf.float32)
  if channels == 3 and image.shape[-1] == 1:
    image = tf.image.grayscale_to_rgb(image)
  return image


# -- crops and resizing ---------------------------------------------------------------------------------------------
def random_resized_crop_box(seed: Seed, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params: 10 tries of (area, log-aspect), then a centre crop fallback.

  Returns (top, left, h, w) int32.
  """
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  s = split(seed, 4)
  area = h_f * w_f * _uniform(s[0], (10,), scale[0], scale[1])
  aspect = tf.exp(_uniform(s[1], (10,), math.log(ratio[0]), math.log(ratio[1])))
  cw = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  ch = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  ok = (cw > 0) & (ch > 0) & (cw <= width) & (ch <= height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  # fallback: the whole image cropped to the nearest allowed aspect
  in_ratio = w_f / h_f
  fw = tf.where(in_ratio < ratio[0], w_f, tf.where(in_ratio > ratio[1], h_f * ratio[1], w_f))
  fh = tf.where(in_ratio < ratio[0], w_f / ratio[0], tf.where(in_ratio > ratio[1], h_f, h_f))
  any_ok = tf.reduce_any(ok)
  h = tf.where(any_ok, ch[first], tf.cast(tf.round(fh), tf.int32))
  w = tf.where(any_ok, cw[first], tf.cast(tf.round(fw), tf.int32))
  top_u, left_u = _uniform(s[2]), _uniform(s[3])
  top = tf.where(any_ok, tf.cast(top_u * tf.cast(height - h + 1, tf.float32), tf.int32), (height - h) // 2)
  left = tf.where(any_ok, tf.cast(left_u * tf.cast(width - w + 1, tf.float32), tf.int32), (width - w) // 2)
  return top, left, h, w


def resize(image, size: int, method: str = "bicubic"):
  """Resizes to size x size (antialiased, as PIL's resampling when shrinking), clipped to [0, 1]."""
  return tf.clip_by_value(tf.image.resize(image, (size, size), method=method, antialias=True), 0.0, 1.0)


def crop_resize(image, box, size: int, method: str = "bicubic"):
  """Crops `box` and resizes to size x size (see `resize`)."""
  top, left, h, w = box
  return resize(tf.image.crop_to_bounding_box(image, top, left, h, w), size, method)


def resize_center_crop(image, size: int, crop_pct: float, method: str = "bicubic"):
  """Evaluation view: shorter side to size / crop_pct, then the central size x size."""
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  short = tf.floor(size / crop_pct)
  scale = short / tf.minimum(h, w)
  nh, nw = tf.cast(tf.round(h * scale), tf.int32), tf.cast(tf.round(w * scale), tf.int32)
  image = tf.image.resize(image, (nh, nw), method=method, antialias=True)
  image = tf.image.crop_to_bounding_box(image, (nh - size) // 2, (nw - size) // 2, size, size)
  return tf.clip_by_value(image, 0.0, 1.0)


def flip_draw(seed: Seed) -> tf.Tensor:
  """random_flip's coin: True = mirror."""
  return _uniform(seed) < 0.5


def random_flip(image, seed: Seed):
  """A horizontal flip with probability 1/2 (tf.reverse: a negative-stride slice was ~9x slower on a crop)."""
  return tf.cond(flip_draw(seed), lambda: tf.reverse(image, [1]), lambda: image)


def normalize(image, mean, std):
  return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


# -- colour -----------------------------------------------------------------------------------------------------
_GRAY = (0.299, 0.587, 0.114)  # PIL's L = 0.299 R + 0.587 G + 0.114 B


def _gray(image):
  """[..., 3] -> [..., 1] grey, as a sum of the channel slices (tf.reduce_sum over a last axis of 3 was ~4x
  slower on a crop)."""
  return image[..., 0:1] * _GRAY[0] + image[..., 1:2] * _GRAY[1] + image[..., 2:3] * _GRAY[2]


def _blend(a, b, factor):
  """factor * a + (1 - factor) * b, clipped (PIL ImageEnhance / torchvision semantics)."""
  return tf.clip_by_value(b + factor * (a - b), 0.0, 1.0)


def brightness(image, f):
  return tf.clip_by_value(f * image, 0.0, 1.0)  # _blend with black


def contrast(image, f):
  """Blends with the image's mean grey (from its channel means: the same number, without a grey image)."""
  return _blend(image, tf.tensordot(tf.reduce_mean(image, [-3, -2]), tf.constant(_GRAY), 1), f)


def saturation(image, f):
  return _blend(image, _gray(image), f)  # each pixel's grey, broadcast over the channels


def jitter_draws(seed: Seed, strength: float = 0.4) -> tuple[tf.Tensor, tf.Tensor]:
  """color_jitter's draws: the (brightness, contrast, saturation) factors in [1-s, 1+s], float32 [3], and the
  order the three are applied in, int32 [3] (device.color_jitter applies the same draws on the device)."""
  s = split(seed, 4)
  return _uniform(s[0], (3,), 1.0 - strength, 1.0 + strength), tf.argsort(_uniform(s[1], (3,)))


def color_jitter(image, seed: Seed, strength: float = 0.4):
  """torchvision ColorJitter(strength, strength, strength): factors in [1-s, 1+s], in a random order."""
  factors, order = jitter_draws(seed, strength)
  ops = [brightness, contrast, saturation]
  for k in range(3):
    image = tf.switch_case(order[k], [lambda op=op, j=j: op(image, factors[j]) for j, op in enumerate(ops)])
  return image


# -- RandAugment (timm "rand-m9-mstd0.5-inc1": 2 ops, magnitude ~ N(9, 0.5), each applied with p=0.5) ---------------
def _affine(image, matrix):
  """Applies a 3x3 output->input pixel transform with fill 128/255 (timm's fill colour)."""
  flat = tf.reshape(matrix, [9])[:8] / matrix[2, 2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=flat[None], output_shape=tf.shape(image)[:2], interpolation="BILINEAR",
      fill_mode="CONSTANT", fill_value=128.0 / 255.0)
  return out[0]


def _center_affine(image, a, b, c, d):
  """x_in = a*x + b*y (+ centring), y_in = c*x + d*y about the image centre."""
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  m = tf.stack([[a, b, cx - a * cx - b * cy], [c, d, cy - c * cx - d * cy], [0.0, 0.0, 1.0]])
  return _affine(image, m)


def _rotate(image, m, sign):
  t = sign * m / 10.0 * 30.0 * math.pi / 180.0
  return _center_affine(image, tf.cos(t), tf.sin(t), -tf.sin(t), tf.cos(t))


def _shear_x(image, m, sign):
  return _center_affine(image, 1.0, sign * m / 10.0 * 0.3, 0.0, 1.0)


def _shear_y(image, m, sign):
  return _center_affine(image, 1.0, 0.0, sign * m / 10.0 * 0.3, 1.0)


def _translate(image, m, sign, axis):
  size = tf.cast(tf.shape(image)[1 - axis], tf.float32)
  t = sign * m / 10.0 * 0.45 * size
  m_ = tf.stack([[1.0, 0.0, t if axis == 0 else 0.0], [0.0, 1.0, t if axis == 1 else 0.0], [0.0, 0.0, 1.0]])
  return _affine(image, m_)


def _autocontrast(image):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - lo) / tf.maximum(hi - lo, 1e-6)
  return tf.where(hi > lo, scaled, image)


def _equalize(image):
  """Per-channel histogram equalisation on 256 levels (PIL ImageOps.equalize)."""
  q = tf.cast(tf.round(image * 255.0), tf.int32)

  def channel(c):
    hist = tf.math.bincount(c, minlength=256, maxlength=256, dtype=tf.float32)
    nonzero = tf.boolean_mask(hist, hist > 0)
    step = tf.math.floordiv(tf.reduce_sum(hist) - nonzero[-1], 255.0)
    lut = tf.math.floordiv(tf.cumsum(hist) - hist + tf.math.floordiv(step, 2.0), tf.maximum(step, 1.0))
    lut = tf.clip_by_value(lut, 0.0, 255.0)
    return tf.where(step > 0, tf.gather(lut, c), tf.cast(c, tf.float32)) / 255.0

  return tf.stack([channel(q[..., k]) for k in range(image.shape[-1])], axis=-1)


def _posterize(image, m):
  bits = tf.cast(4 - tf.cast(m / 10.0 * 4.0, tf.int32), tf.int32)  # increasing: 4 bits -> 0 bits kept less
  bits = tf.maximum(bits, 1)
  shift = 8 - bits
  q = tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(tf.round(image * 255.0), tf.int32), shift), shift)
  return tf.cast(q, tf.float32) / 255.0


def _solarize(image, m):
  threshold = 1.0 - m / 10.0  # increasing: a stronger op solarises more pixels
  return tf.where(image >= threshold, 1.0 - image, image)


def _solarize_add(image, m):
  added = tf.clip_by_value(image + m / 10.0 * 110.0 / 255.0, 0.0, 1.0)
  return tf.where(image < 128.0 / 255.0, added, image)


def _sharpness(image, f):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  c = image.shape[-1]
  k = tf.tile(kernel[:, :, None, None], [1, 1, c, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], k, [1, 1, 1, 1], "VALID")[0]
  # PIL keeps the border pixels unchanged
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = degenerate * border + image * (1 - border)
  return _blend(image, degenerate, f)


def _enhance_factor(m, sign):
  return 1.0 + sign * m / 10.0 * 0.9  # timm "increasing" enhance ops: 1 +- 0.9 * m / 10


RAND_AUGMENT_OPS = (  # timm _RAND_INCREASING_TRANSFORMS
    ("AutoContrast", lambda x, m, s: _autocontrast(x)),
    ("Equalize", lambda x, m, s: _equalize(x)),
    ("Invert", lambda x, m, s: 1.0 - x),
    ("Rotate", _rotate),
    ("PosterizeIncreasing", lambda x, m, s: _posterize(x, m)),
    ("SolarizeIncreasing", lambda x, m, s: _solarize(x, m)),
    ("SolarizeAdd", lambda x, m, s: _solarize_add(x, m)),
    ("ColorIncreasing", lambda x, m, s: saturation(x, _enhance_factor(m, s))),
    ("ContrastIncreasing", lambda x, m, s: contrast(x, _enhance_factor(m, s))),
    ("BrightnessIncreasing", lambda x, m, s: brightness(x, _enhance_factor(m, s))),
    ("SharpnessIncreasing", lambda x, m, s: _sharpness(x, _enhance_factor(m, s))),
    ("ShearX", _shear_x),
    ("ShearY", _shear_y),
    ("TranslateXRel", lambda x, m, s: _translate(x, m, s, 0)),
    ("TranslateYRel", lambda x, m, s: _translate(x, m, s, 1)),
)


def rand_augment(image, seed: Seed, num_ops: int = 2, magnitude: float = 9.0, magnitude_std: float = 0.5,
                 prob: float = 0.5):
  """timm RandAugment: `num_ops` ops chosen uniformly (with replacement), each applied with `prob`, magnitude
  drawn per op from N(magnitude, magnitude_std) clipped to [0, 10]; signed ops flip sign with p=0.5."""
  seeds = split(seed, num_ops)
  for k in range(num_ops):
    s = split(seeds[k], 4)
    op = tf.random.stateless_uniform((), s[0], 0, len(RAND_AUGMENT_OPS), tf.int32)
    m = tf.clip_by_value(magnitude + magnitude_std * tf.random.stateless_normal((), s[1]), 0.0, 10.0)
    sign = tf.where(_uniform(s[2]) < 0.5, -1.0, 1.0)
    branches = [lambda fn=fn: tf.ensure_shape(fn(image, m, sign), image.shape) for _, fn in RAND_AUGMENT_OPS]
    image = tf.cond(_uniform(s[3]) < prob, lambda: tf.switch_case(op, branches), lambda: image)
    image = tf.clip_by_value(image, 0.0, 1.0)
  return image


def erasing_box(height, width, seed: Seed, prob: float = 0.25, area=(0.02, 1 / 3), min_aspect: float = 0.3):
  """timm RandomErasing(max_count=1)'s rectangle for an image of height x width: int32 (top, left, rows, cols),
  rows = cols = 0 when this example is not erased (probability 1 - `prob`, or no try of ten fits)."""
  h, w = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
  s = split(seed, 6)
  total = tf.cast(h * w, tf.float32)
  target = total * _uniform(s[0], (10,), area[0], area[1])
  aspect = tf.exp(_uniform(s[1], (10,), math.log(min_aspect), math.log(1 / min_aspect)))
  eh = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
  ew = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
  ok = (eh < h) & (ew < w)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)
  eh, ew = eh[first], ew[first]
  top = tf.cast(_uniform(s[2]) * tf.cast(h - eh + 1, tf.float32), tf.int32)
  left = tf.cast(_uniform(s[3]) * tf.cast(w - ew + 1, tf.float32), tf.int32)
  apply = (_uniform(s[5]) < prob) & tf.reduce_any(ok)
  return tf.where(apply, tf.stack([top, left, eh, ew]), tf.zeros([4], tf.int32))


def random_erasing(image, seed: Seed, prob: float = 0.25, area=(0.02, 1 / 3), min_aspect: float = 0.3):
  """timm RandomErasing(mode="pixel", max_count=1) on a normalised image: one rectangle (erasing_box) of N(0, 1)
  noise."""
  box = erasing_box(tf.shape(image)[0], tf.shape(image)[1], seed, prob, area, min_aspect)
  noise = tf.random.stateless_normal(tf.shape(image), split(seed, 6)[4])
  return tf.where(box_mask(tf.shape(image)[0], tf.shape(image)[1], box)[..., None], noise, image)


def box_mask(height, width, box):
  """[height, width] bool: inside the rectangle box = (top, left, rows, cols)."""
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  return (rows >= box[0]) & (rows < box[0] + box[2]) & (cols >= box[1]) & (cols < box[1] + box[3])


# -- segmentation: the image and its annotation together (mmseg's ADE20K pipeline) ---------------------------------
def rescale_size(height, width, long_edge, short_edge):
  """mmcv's keep-ratio rescale: the largest size with the long side <= long_edge and the short side <=
  short_edge (mmseg's Resize(img_scale=(2048, 512), keep_ratio=True)); int32 (h, w)."""
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  f = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
  return tf.cast(h * f + 0.5, tf.int32), tf.cast(w * f + 0.5, tf.int32)


def resize_pair(image, annotation, size):
  """Bilinear image (cv2's, no antialiasing, as mmcv's imresize), nearest annotation."""
  image = tf.clip_by_value(tf.image.resize(image, size, method="bilinear"), 0.0, 1.0)
  annotation = tf.image.resize(annotation[..., None], size, method="nearest")[..., 0]
  return image, annotation


def random_rescale(image, annotation, seed: Seed, scale=(2048, 512), ratio_range=(0.5, 2.0)):
  """mmseg Resize with ratio_range: the keep-ratio rescale to scale x r, r ~ U(ratio_range)."""
  r = _uniform(seed, (), ratio_range[0], ratio_range[1])
  size = rescale_size(tf.shape(image)[0], tf.shape(image)[1], scale[0] * r, scale[1] * r)
  return resize_pair(image, annotation, size)


def random_crop_pair(image, annotation, seed: Seed, crop: int, cat_max_ratio: float = 0.75, ignore: int = 255,
                     tries: int = 10):
  """mmseg RandomCrop: a crop x crop window (the whole side where the image is smaller); with cat_max_ratio < 1
  up to `tries` windows are drawn and the first where no class covers more than that share of the labelled
  pixels (and more than one class occurs) is kept, else the last."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  ch, cw = tf.minimum(h, crop), tf.minimum(w, crop)
  n = tries if cat_max_ratio < 1.0 else 1
  offsets = tf.random.stateless_uniform([n, 2], seed, 0, 2 ** 30, tf.int32) % tf.stack([h - ch + 1, w - cw + 1])
  choice = tf.constant(n - 1)
  if n > 1:
    def ok(offset):
      window = tf.cast(annotation[offset[0]:offset[0] + ch, offset[1]:offset[1] + cw], tf.int32)
      counts = tf.math.bincount(tf.reshape(window, [-1]), minlength=256, maxlength=256)
      counts = tf.tensor_scatter_nd_update(counts, [[ignore]], [0])
      return (tf.math.count_nonzero(counts) > 1) & (
          tf.cast(tf.reduce_max(counts), tf.float32) < cat_max_ratio * tf.cast(tf.reduce_sum(counts), tf.float32))
    good = tf.stack([ok(offsets[i]) for i in range(n)])
    choice = tf.where(tf.reduce_any(good), tf.argmax(tf.cast(good, tf.int32), output_type=tf.int32), n - 1)
  top, left = offsets[choice][0], offsets[choice][1]
  return image[top:top + ch, left:left + cw], annotation[top:top + ch, left:left + cw]


def random_flip_pair(image, annotation, seed: Seed):
  return tf.cond(_uniform(seed) < 0.5, lambda: (tf.reverse(image, [1]), tf.reverse(annotation, [1])),
                 lambda: (image, annotation))


def photometric_distortion(image, seed: Seed):
  """mmseg PhotoMetricDistortion on [0, 1] images: each with probability 1/2, brightness +- 32/255, contrast
  x [0.5, 1.5] (before or after the HSV steps, at random), saturation x [0.5, 1.5], hue +- 18/180 of the circle."""
  s = split(seed, 9)
  coin = lambda k: _uniform(s[k]) < 0.5
  clip = lambda x: tf.clip_by_value(x, 0.0, 1.0)
  image = tf.where(coin(0), clip(image + _uniform(s[1], (), -32 / 255, 32 / 255)), image)
  contrast_first = coin(2)
  alpha = _uniform(s[3], (), 0.5, 1.5)
  apply_contrast = coin(4)
  image = tf.where(contrast_first & apply_contrast, clip(image * alpha), image)
  hsv = tf.image.rgb_to_hsv(image)
  sat = tf.where(coin(5), tf.clip_by_value(hsv[..., 1] * _uniform(s[6], (), 0.5, 1.5), 0.0, 1.0), hsv[..., 1])
  hue_delta = tf.cast(tf.random.stateless_uniform((), s[8], -18, 19, tf.int32), tf.float32) / 180.0
  hue = tf.where(coin(7), tf.math.floormod(hsv[..., 0] + hue_delta, 1.0), hsv[..., 0])
  image = clip(tf.image.hsv_to_rgb(tf.stack([hue, sat, hsv[..., 2]], -1)))
  return tf.where(~contrast_first & apply_contrast, clip(image * alpha), image)


def pad_pair(image, annotation, height: int, width: int, ignore: int = 255):
  """Pads at the bottom/right to height x width: the image with 0, the annotation with the ignore label."""
  dh, dw = height - tf.shape(image)[0], width - tf.shape(image)[1]
  image = tf.pad(image, [[0, dh], [0, dw], [0, 0]])
  annotation = tf.pad(annotation, [[0, dh], [0, dw]], constant_values=tf.cast(ignore, annotation.dtype))
  return tf.ensure_shape(image, (height, width, image.shape[-1])), tf.ensure_shape(annotation, (height, width))
