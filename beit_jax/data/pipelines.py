"""tf.data pipelines for every loop: pre-training, fine-tuning, evaluation. Host-local numpy batches out.

  source = sources.get_source("tfds:imagenet2012", "train")
  batches = train_batches(source, pretrain_transform(seed=0), host_batch=256, seed=0, start_step=step,
                          masks=MaskSpec(grid=(14, 14)))
  batch = next(batches)  # {"image", "tokenizer_image", "mask", "label", "index", "epoch", "skipped", "bad",
                         #  "file_index"}: numpy arrays

Trainers call one entry point per mode and split instead (pretrain_train, pretrain_eval, classification_train,
linear_probe_train, classification_eval, tokenizer_train, tokenizer_eval, segmentation_train, segmentation_eval, at
the end of this file): each reads config.data, takes what only the trainer knows (split, host batch, seed, start
step, shard, masks, image size) and yields just the keys KEYS names for that mode's step.

Multi-host: each host reads shard (jax.process_index() of jax.process_count()) and makes batches of
global_batch / process_count; `device.global_batches` turns them into global arrays on the mesh.

Steps and resume: a training epoch is `steps_per_epoch = (num_examples // num_hosts) // host_batch` steps on
every host (the same number everywhere, or multi-host collectives would hang); the examples of a host's shard
beyond that are left out of that epoch (each epoch has a new order, so none is left out for ever). Step k of an
epoch is the k-th window of host_batch examples of the host's order, *whatever fails to decode in it*: the data
position is a pure function of the step, so a run resumed at step s starts epoch s // steps_per_epoch at example
(s % steps_per_epoch) * host_batch of that epoch's order (random-access sources skip indices without reading them;
tfds record files read the skipped records but do not decode them), and the resumed stream is bitwise the
uninterrupted one, bad files or not: masks and augmentations are pure functions of seed, epoch and example index.

Bad input: a file that fails to decode (no image signature, garbage, truncated: anything the decoder refuses)
is caught per example (decode_stage), never dropped by tf.data: its row of a training batch holds a copy of a good
row of the same batch (so the batch keeps its size and its place), its row of an evaluation batch is blank and
invalid as padding. Each is counted in the batch's "skipped" and named in a bad_files.BadFiles record
(bad_files.SEEN unless the caller passes one): the first few by path in the log, the counts as metrics the training
loop writes (data/bad_files.py). A training batch of nothing but bad files is an error naming them.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from beit_jax.data import augment, device, masking, sources
from beit_jax.data import bad_files as _bad_files
from beit_jax.data.normalization import IMAGENET_DEFAULT, INCEPTION, mean_std  # pylint: disable=unused-import
from beit_jax.data.sources import SEG_IGNORE, Source

Example = dict[str, tf.Tensor]
Box = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]  # (top, left, height, width) int32


@dataclasses.dataclass(frozen=True)
class Cropped:
  """A transform whose first step is a crop drawn from the image's size alone: `crop(example, epoch, height,
  width)` -> the box, `fn(example, epoch)` -> the rest, given the box's pixels as "image". The pipelines draw the
  box from a JPEG's header (tf.image.extract_jpeg_shape) and decode only the box (tf.image.decode_and_crop_jpeg:
  the rows below it are never decoded, the columns outside it are not colour-converted); other formats and decoded
  sources are cropped after decoding, to the same pixels (tests/test_pipelines.py). Called as a function, it
  crops the decoded image it is given and runs `fn`."""
  fn: Callable[[Example, tf.Tensor], Example]
  crop: Callable[[Example, tf.Tensor, tf.Tensor, tf.Tensor], Box]
  raw: bool = False  # the pipelines give fn the box's uint8 pixels as they decoded, not float32 in [0, 1]

  def __call__(self, ex: Example, epoch) -> Example:
    image = ex["image"]
    top, left, h, w = self.crop(ex, epoch, tf.shape(image)[0], tf.shape(image)[1])
    return self.fn({**ex, "image": image[top:top + h, left:left + w]}, epoch)


# (decoded example with a float32 [0, 1] image, epoch) -> example; or a Cropped one
Transform = Callable[[Example, tf.Tensor], Example]


@dataclasses.dataclass(frozen=True)
class Shard:
  index: int = 0
  count: int = 1

  @classmethod
  def of_this_process(cls) -> "Shard":
    import jax  # pylint: disable=import-outside-toplevel
    return cls(jax.process_index(), jax.process_count())


# The config's data.mask.kind -> the masks of (spec, seed, indices, epoch): each masker reads the fields it uses.
MASKERS = {
    "blockwise": lambda m, seed, indices, epoch: masking.blockwise_masks(
        seed, indices, m.grid, m.num_masked, m.min_block, m.min_aspect, epoch=epoch),
    "random": lambda m, seed, indices, epoch: masking.random_masks(seed, indices, m.grid, m.num_masked,
                                                                   epoch=epoch),
}


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Which masks a pre-training batch carries (see masking.py); `kind` is a key of MASKERS."""
  grid: tuple[int, int] = (14, 14)
  num_masked: int = 75
  min_block: int = 16
  min_aspect: float = 0.3
  kind: str = "blockwise"

  def __post_init__(self):  # at config time, not in a tf.data worker after the compile
    if self.kind not in MASKERS:
      raise ValueError(f"data.mask.kind={self.kind!r}: use one of {sorted(MASKERS)}")

  def make(self, seed: int, indices: np.ndarray, epoch: int) -> np.ndarray:
    return MASKERS[self.kind](self, seed, indices, epoch)


# -- decoding ----------------------------------------------------------------------------------------------------
# The keys the pipelines keep for themselves (stripped by the entry points): "ok" (the file decoded), "skipped"
# (the number of the batch's rows that were undecodable files, in every row), "bad" and "file_index" (a row that
# was an undecodable file, and every row's own index: training batches fill a bad row with a copy of a good one).
_BOOKKEEPING = ("ok", "skipped", "bad", "file_index")
_PLACEHOLDER = 8  # the side of the blank image that stands for an undecodable one (its row is replaced or invalid)


def _annotation(ann: tf.Tensor, reduce_zero_label: bool) -> tf.Tensor:
  """uint8 [H, W] class ids; mmseg's reduce_zero_label: 0 ("other") -> 255 (ignored), k -> k - 1."""
  if ann.shape.rank == 3:
    ann = ann[..., 0]
  if reduce_zero_label:
    ann = tf.where(ann == 0, tf.constant(SEG_IGNORE, tf.uint8), ann - 1)
  return ann


def _with_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """A decoded source's uint8 image with `channels` channels (grey repeated to RGB)."""
  if channels == 3 and image.shape[-1] == 1:
    return tf.image.grayscale_to_rgb(image)
  return image


_EOI_TAIL = 32  # a JPEG counts as whole if its EOI marker is in its last bytes (else a full decode decides)
_JPEG_MARGIN = 2  # columns decoded beyond each side of a box (decode_image)


def _jpeg_whole(data: tf.Tensor) -> tf.Tensor:
  """0 once the JPEG `data` is known to hold its whole image, else an error: its EOI marker (FF D9, which cannot
  occur in entropy-coded data) in its last _EOI_TAIL bytes, or else a full decode that succeeds (a file with
  trailing bytes after its EOI). The fused decode-and-crop alone would accept a truncated file whose box lies
  in the part that is there; a full decode refuses every truncated file."""
  n = tf.strings.length(data)
  tail = tf.io.decode_raw(tf.strings.substr(data, tf.maximum(n - _EOI_TAIL, 0), _EOI_TAIL), tf.uint8)
  eoi = tf.reduce_any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))
  return tf.cond(eoi, lambda: tf.constant(0), lambda: tf.size(tf.io.decode_jpeg(data)) * 0)


def decode_image(data: tf.Tensor, channels: int = 3,
                 box: Optional[Callable[[tf.Tensor, tf.Tensor], Box]] = None) -> tf.Tensor:
  """uint8 [H, W, channels] of an encoded image; raises for anything undecodable. `box(height, width)`: only
  that box of the image, drawn from its size: a JPEG's from its header, decoded with the fused decode-and-crop
  (after _jpeg_whole); any other format decoded whole, then cropped. The fused decode gives the same pixels,
  bitwise, as a full decode cropped (tests/test_pipelines.py): both use TensorFlow's default DCT, and the box is
  decoded _JPEG_MARGIN columns wider on each side, then cut (libjpeg's chroma upsampling treats a crop's first
  and last columns as the image's edge: they differed by up to 25/255 in 4:2:0 and 4:2:2 files)."""
  if box is None:
    return tf.io.decode_image(data, channels=channels, expand_animations=False)

  def fused():
    shape = tf.image.extract_jpeg_shape(data)
    top, left, h, w = box(shape[0], shape[1])
    wide_left = tf.maximum(left - _JPEG_MARGIN, 0)
    wide_width = tf.minimum(left + w + _JPEG_MARGIN, shape[1]) - wide_left
    with tf.control_dependencies([_jpeg_whole(data)]):
      wide = tf.image.decode_and_crop_jpeg(data, tf.stack([top, wide_left, h, wide_width]), channels=channels)
    return wide[:, left - wide_left:left - wide_left + w]

  def whole():
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    top, left, h, w = box(tf.shape(image)[0], tf.shape(image)[1])
    return image[top:top + h, left:left + w]
  return tf.cond(tf.io.is_jpeg(data), fused, whole)


def decode_stage(ds: tf.data.Dataset, encoded: bool, channels: int = 3, reduce_zero_label: bool = False,
                 crop: Optional[Callable[[Example, tf.Tensor, tf.Tensor], Box]] = None) -> tf.data.Dataset:
  """Every example of `ds`, in order, with a uint8 "image" of `channels` channels (segmentation: and a uint8
  "annotation") and "ok": whether it decoded. Nothing is dropped: an undecodable file (no image signature,
  garbage, truncated) becomes a blank placeholder with ok=False, so positions in the stream are positions in the
  source's order whatever fails to decode. `crop(example, height, width)`: the image is only that box
  (decode_image's fused decode-and-crop for JPEGs).

  Each example decodes in a dataset of its own whose errors are ignored, followed by its placeholder, of which
  the first element is taken (tf.data's ignore_errors on the whole stream would drop the example without a
  trace); the per-example datasets are interleaved in parallel, in order.
  """
  if not encoded:
    def convert(ex):
      image = _with_channels(ex["image"], channels)
      if crop is not None:
        top, left, h, w = crop(ex, tf.shape(image)[0], tf.shape(image)[1])
        image = image[top:top + h, left:left + w]
      out = {**ex, "image": image, "ok": tf.constant(True)}
      if "annotation" in ex:
        out["annotation"] = _annotation(ex["annotation"], reduce_zero_label)
      return out
    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  def rest(ex):
    return {k: v for k, v in ex.items() if k not in ("image_bytes", "annotation_bytes")}

  def decode(ex):
    box = None if crop is None else (lambda h, w: crop(ex, h, w))
    out = {**rest(ex), "image": decode_image(ex["image_bytes"], channels, box), "ok": tf.constant(True)}
    if "annotation_bytes" in ex:
      out["annotation"] = _annotation(tf.io.decode_png(ex["annotation_bytes"], channels=1), reduce_zero_label)
    return out

  def placeholder(ex):
    out = {**rest(ex), "image": tf.zeros([_PLACEHOLDER, _PLACEHOLDER, channels], tf.uint8), "ok": tf.constant(False)}
    if "annotation_bytes" in ex:
      out["annotation"] = tf.fill([_PLACEHOLDER, _PLACEHOLDER], tf.constant(SEG_IGNORE, tf.uint8))
    return out

  def guarded(ex):
    one = tf.data.Dataset.from_tensors(ex)
    return one.map(decode).ignore_errors().concatenate(one.map(placeholder)).take(1)
  return ds.interleave(guarded, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _replace_bad_rows(batch: Example) -> Example:
  """A training batch whose rows of undecodable files ("ok" False) hold copies of its good rows, taken in turn
  (the first bad row gets the first good row, ...): the batch keeps its size and its place in the epoch. "bad"
  marks the copied rows, "file_index" keeps every row's own index (for naming the bad files). A batch without a
  good row is left as it is (train_batches refuses it)."""
  ok = batch["ok"]
  rows = tf.range(tf.shape(ok)[0], dtype=tf.int32)
  good = tf.boolean_mask(rows, ok)
  n_good = tf.maximum(tf.size(good), 1)
  rank = tf.cumsum(tf.cast(~ok, tf.int32)) - 1  # a bad row's rank among the bad rows
  take = tf.where(ok | (tf.size(good) == 0), rows,
                  tf.gather(tf.concat([good, [0]], 0), tf.math.floormod(rank, n_good)))
  out = {k: v if k in _BOOKKEEPING else tf.gather(v, take) for k, v in batch.items()}
  del out["ok"]
  return {**out, **_bad_keys(batch)}


def _bad_keys(batch: Example) -> Example:
  bad = ~batch["ok"]
  return {"bad": bad, "file_index": batch["index"],
          "skipped": tf.fill(tf.shape(bad), tf.reduce_sum(tf.cast(bad, tf.int32)))}


def _record_bad(batch: dict[str, np.ndarray], source: Source, record: _bad_files.BadFiles, where: str,
                step: Optional[int] = None):
  bad = batch["bad"]
  if bad.any():
    record.add([source.describe(i) for i in batch["file_index"][bad]], where, step)


# -- per-example transforms -----------------------------------------------------------------------------------
def _random_resized_crop(seed: int, index: int, parts: int, scale) -> Callable[..., Box]:
  """The crop of Cropped transforms: torchvision's RandomResizedCrop box from draw `index` of `parts` of the
  example's seed (a pure function of seed, epoch, example index and the image's size)."""
  def crop(ex, epoch, height, width):
    s = augment.split(augment.example_seed(seed, epoch, ex["index"]), parts)
    return augment.random_resized_crop_box(s[index], height, width, scale=scale)
  return crop


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """[0, 1] float -> uint8, rounded (device.normalize / device.to_unit undo it within 0.5 / 255)."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


TOKENIZER_VIEWS = ("host", "device")


def _check_views(uint8: bool, tokenizer_view: str):
  if tokenizer_view not in TOKENIZER_VIEWS:
    raise ValueError(f"tokenizer_view={tokenizer_view!r}: use one of {TOKENIZER_VIEWS}")
  if tokenizer_view == "device" and not uint8:
    raise ValueError("tokenizer_view='device' makes the tokenizer view from the uint8 model view on the device: "
                     "it needs uint8=True (data.uint8)")


RESIZES = ("host", "device")


def _check_resize(resize: str, uint8: bool, tokenizer_view: str, canvas: int, image_size: int):
  if resize not in RESIZES:
    raise ValueError(f"data.resize={resize!r}: use one of {RESIZES}")
  if resize == "device" and (not isinstance(canvas, int) or canvas < image_size):
    raise ValueError(f"data.crop_canvas={canvas!r}: the side in pixels of the square the crops are padded into "
                     f"must be at least data.image_size={image_size} (a smaller one would throw resolution away)")
  if resize == "device" and not uint8:
    raise ValueError("data.resize='device' sends the uint8 crop for the device to resize: it needs data.uint8=True")
  if resize == "device" and tokenizer_view != "host":
    raise ValueError("data.resize='device' makes both views on the device, from the crop; data.tokenizer_view="
                     f"{tokenizer_view!r} (the tokenizer view from the model view) does not apply: leave it 'host'")


def pretrain_transform(*, seed: int, image_size: int = 224, tokenizer_size: int = 112,
                       tokenizer_resize: str = "lanczos3", color_jitter: float = 0.4,
                       mean_std=INCEPTION, scale=(0.08, 1.0), uint8: bool = False,
                       tokenizer_view: str = "host", resize: str = "host",
                       canvas: int = device.CROP_CANVAS) -> Cropped:
  """BEiT pre-training: ONE random-resized crop, colour jitter and flip of the crop, resized twice.

  "image": the model view (image_size, bicubic, normalised); "tokenizer_image": the tokenizer view
  (tokenizer_size, `tokenizer_resize`, in [0, 1]; each tokenizer applies its own input mapping, e.g.
  DALL-E's 0.1 + 0.8x).

  `uint8`: both views leave the host as uint8 in [0, 255], not normalised (4x less host memory and host->device
  traffic); device.pretrain_inputs normalises them inside the jitted step, within 0.5 / 255 of the float path
  before normalisation. `tokenizer_view="device"` (with uint8): no tokenizer view from the host at all; the
  device resizes it from the model view (device.pretrain_inputs with tokenizer_size), which is not the same
  resampling (tests/test_pipelines.py states how close).

  Order: the original (unilm's DataAugmentationForBEiT) jitters and flips the whole image, then crops. Here the
  box is drawn first, from the image's size (so a JPEG decodes only the box, see Cropped), and the jitter and the
  flip run on each resized view (the same draws for both). Brightness and saturation act on each pixel alone and
  the resize is a normalised linear filter, so they give the same pixels either way but for clipping (of the
  jitter's overshoot before the resize, of the resize's after); contrast blends with the mean grey of the view
  instead of the whole image's; the flip mirrors the views instead of the image the box is drawn in (the same
  distribution of views: a box and its mirror are equally likely). tests/test_pipelines.py compares the
  statistics of both orders. The draws are (jitter, flip, box) from the example's seed of (seed, epoch, index),
  as before the reorder.

  `resize="device"` (with uint8): the host resizes nothing. It sends the crop as it decoded ("crop": uint8,
  padded at the bottom and right into a `canvas` x `canvas` square; "crop_size": its int32 (height, width)) and
  the example's draws ("flip", "jitter": the three factors, "jitter_order"); device.pretrain_inputs makes both
  views from them inside the jitted step, the same resampling, jitter and flip as above (tests/test_pipelines.py
  states how close). A crop larger than the canvas is first shrunk on the host to fit it (bicubic, antialiased,
  aspect kept): two resamplings for those only. What leaves the host is canvas^2 x 3 bytes per image (786 KB at
  512, 1.3x a float32 224 px view's) for a host that does only the decode.
  """
  _check_views(uint8, tokenizer_view)
  _check_resize(resize, uint8, tokenizer_view, canvas, image_size)

  def fn(ex, epoch):
    s = augment.split(augment.example_seed(seed, epoch, ex["index"]), 3)
    if resize == "device":
      rest = {k: v for k, v in ex.items() if k != "image"}
      return {**rest, **_crop_for_device(ex["image"], canvas, s[0], s[1], color_jitter)}
    jitter = (lambda view: augment.color_jitter(view, s[0], color_jitter)) if color_jitter > 0 else None
    return {**ex, **_pretrain_views(ex["image"], image_size, tokenizer_size, tokenizer_resize, mean_std, uint8,
                                    tokenizer_view, flip=s[1], jitter=jitter)}
  return Cropped(fn, _random_resized_crop(seed, 2, 3, scale), raw=resize == "device")


def _crop_for_device(crop, canvas: int, jitter_seed, flip_seed, color_jitter: float) -> Example:
  """resize="device"'s example: the uint8 crop padded into the canvas (shrunk to fit it first if larger), its
  size, and the draws of the jitter and the flip the device applies to each view."""
  h, w = tf.shape(crop)[0], tf.shape(crop)[1]
  longest = tf.maximum(h, w)

  def shrink():
    f = canvas / tf.cast(longest, tf.float32)
    size = tf.maximum(tf.cast(tf.round(tf.cast(tf.stack([h, w]), tf.float32) * f), tf.int32), 1)
    small = tf.image.resize(tf.cast(crop, tf.float32), tf.minimum(size, canvas), "bicubic", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(small, 0.0, 255.0)), tf.uint8)
  crop = tf.cond(longest > canvas, shrink, lambda: crop)
  h, w = tf.shape(crop)[0], tf.shape(crop)[1]
  padded = tf.pad(crop, [[0, canvas - h], [0, canvas - w], [0, 0]])
  if color_jitter > 0:
    factors, order = augment.jitter_draws(jitter_seed, color_jitter)
  else:
    factors, order = tf.ones([3], tf.float32), tf.range(3, dtype=tf.int32)
  return {"crop": tf.ensure_shape(padded, [canvas, canvas, 3]), "crop_size": tf.stack([h, w]),
          "flip": augment.flip_draw(flip_seed), "jitter": factors, "jitter_order": order}


def _pretrain_views(image, image_size, tokenizer_size, tokenizer_resize, mean_std, uint8, tokenizer_view,
                    flip=None, jitter=None):
  """The model view and (tokenizer_view "host") the tokenizer view of `image`; `jitter` (the same draws for
  both views) and `flip` (a seed whose coin flips both) act on each resized view rather than on the crop: the
  same pixels up to the clipping of the resize's overshoot and the contrast's mean grey taken over the view, on
  fewer pixels (a 224 px view has about half the pixels of ImageNet's mean crop: jitter and flip on the views
  cost a third of what they cost on the crop)."""
  def finish(view):
    view = jitter(view) if jitter is not None else view
    return augment.random_flip(view, flip) if flip is not None else view
  view = finish(augment.resize(image, image_size, "bicubic"))
  out = {"image": _to_uint8(view) if uint8 else augment.normalize(view, *mean_std)}
  if tokenizer_view == "host":
    tok = finish(augment.resize(image, tokenizer_size, tokenizer_resize))
    out["tokenizer_image"] = _to_uint8(tok) if uint8 else tok
  return out


def tokenizer_transform(*, seed: int, image_size: int, scale=(0.35, 1.0)) -> Cropped:
  """Tokenizer training: a random-resized crop (milder than pre-training's: the codebook should see whole
  objects) and a flip; "image" stays in [0, 1] (the tokenizer maps it inside)."""
  def fn(ex, epoch):
    s = augment.split(augment.example_seed(seed, epoch, ex["index"]), 2)
    return {**ex, "image": augment.random_flip(augment.resize(ex["image"], image_size, "bicubic"), s[1])}
  return Cropped(fn, _random_resized_crop(seed, 0, 2, scale))


def plain_transform(*, image_size: int) -> Transform:
  """Just a resize to image_size x image_size, values kept in [0, 1] (tokenizer evaluation, demos)."""
  def fn(ex, epoch):
    del epoch
    image = tf.image.resize(ex["image"], (image_size, image_size), method="bicubic", antialias=True)
    return {**ex, "image": tf.clip_by_value(image, 0.0, 1.0)}
  return fn


def mim_eval_transform(*, image_size: int, tokenizer_size: int, tokenizer_resize: str = "lanczos3",
                       mean_std=INCEPTION, uint8: bool = False, tokenizer_view: str = "host") -> Transform:
  """Held-out masked-token accuracy: both views of the whole image, no augmentation (`uint8`, `tokenizer_view`:
  as pretrain_transform's)."""
  _check_views(uint8, tokenizer_view)

  def fn(ex, epoch):
    del epoch
    return {**ex, **_pretrain_views(ex["image"], image_size, tokenizer_size, tokenizer_resize, mean_std, uint8,
                                    tokenizer_view)}
  return fn


def finetune_transform(*, seed: int, image_size: int = 224,
                       rand_augment: Optional[tuple[int, float, float]] = (2, 9.0, 0.5),
                       erase_prob: float = 0.25, mean_std=INCEPTION, scale=(0.08, 1.0), uint8: bool = False) -> Cropped:
  """BEiT fine-tuning (timm create_transform): random-resized crop (a JPEG decodes only the box, see Cropped),
  flip, RandAugment (num_ops, magnitude, magnitude_std), normalise, random erasing; in timm's order. Mixup/CutMix
  run on device (mixup.py).

  `uint8`: the image leaves the host as uint8 in [0, 255] before normalisation (4x less to transfer and hold),
  and random erasing, which writes N(0, 1) noise in the *normalised* image (values no uint8 pixel holds), leaves
  as its rectangle: "erase" int32 (top, left, rows, cols), rows = 0 for an image not erased. The step normalises
  and fills the rectangle on the device (device.classification_inputs): the same boxes as the float path, the
  same pixels within the rounding (0.5 / 255 / std), noise of the same distribution from the device's own draw."""
  def fn(ex, epoch):
    s = augment.split(augment.example_seed(seed, epoch, ex["index"]), 4)
    image = augment.random_flip(augment.resize(ex["image"], image_size, "bicubic"), s[1])
    if rand_augment:
      image = augment.rand_augment(image, s[2], *rand_augment)
    if uint8:
      out = {"image": _to_uint8(image)}
      if erase_prob > 0:
        out["erase"] = augment.erasing_box(image_size, image_size, s[3], erase_prob)
      return {**ex, **out}
    image = augment.normalize(image, *mean_std)
    if erase_prob > 0:
      image = augment.random_erasing(image, s[3], erase_prob)
    return {**ex, "image": image}
  return Cropped(fn, _random_resized_crop(seed, 0, 4, scale))


def eval_transform(*, image_size: int = 224, crop_pct: Optional[float] = None, mean_std=INCEPTION) -> Transform:
  """Resize to image_size / crop_pct, centre crop (crop_pct 0.875 below 384 px, 1.0 from 384 px up)."""
  crop_pct = crop_pct or (0.875 if image_size < 384 else 1.0)

  def fn(ex, epoch):
    del epoch
    return {**ex, "image": augment.normalize(augment.resize_center_crop(ex["image"], image_size, crop_pct),
                                             *mean_std)}
  return fn


# -- batching ------------------------------------------------------------------------------------------------------
def steps_per_epoch(source: Source, host_batch: int, num_hosts: int = 1) -> int:
  steps = (source.num_examples // num_hosts) // host_batch
  if steps < 1:
    raise ValueError(f"batch of {host_batch} per host x {num_hosts} hosts is larger than {source.name} "
                     f"split {source.split!r} ({source.num_examples} examples): lower the batch size")
  return steps


def _options(threads: Optional[int] = None, ram_budget_mb: Optional[int] = None) -> tf.data.Options:
  """Deterministic order (resume and host splits rely on it), tf.data's autotuning of parallelism and buffers
  within `ram_budget_mb` (default: tf.data's, half the host's memory), `threads` threads (default: all cores)."""
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  options.autotune.enabled = True
  if ram_budget_mb:
    options.autotune.ram_budget = int(ram_budget_mb) * 2 ** 20
  if threads:  # leave cores to the training step (GPU/TPU hosts) or measure per core
    options.threading.private_threadpool_size = threads
  return options


def _tf_data(data: "Data") -> dict:
  """The tf.data options config.data may set (both optional): threads, ram_budget_mb."""
  return {"threads": data.get("threads"), "ram_budget_mb": data.get("ram_budget_mb")}


def _with_masks(ds: tf.data.Dataset, masks: MaskSpec, seed: int, epoch: int, host_batch: int) -> tf.data.Dataset:
  """Each batch with its "mask" of (seed, epoch, example index): the one place masks are made, training's and
  evaluation's alike (masking.py's are pure functions of those, so a resume or another host split draws the same)."""
  def add(batch):
    m = tf.numpy_function(lambda idx: masks.make(seed, idx, epoch), [batch["index"]], tf.bool, stateful=False)
    return {**batch, "mask": tf.ensure_shape(m, (host_batch, *masks.grid))}
  return ds.map(add, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _decoded_and_transformed(raw: tf.data.Dataset, source: Source, transform: Transform, epoch: int,
                             channels: int) -> tf.data.Dataset:
  """decode_stage, then `transform` of each example (its image as float32 [0, 1]), the bookkeeping keys kept. A
  Cropped transform's crop is done by the decoder (only the box is decoded), its fn here."""
  e = tf.constant(epoch, tf.int64)
  crop = (lambda ex, h, w: transform.crop(ex, e, h, w)) if isinstance(transform, Cropped) else None
  rest = transform.fn if isinstance(transform, Cropped) else transform
  as_decoded = isinstance(transform, Cropped) and transform.raw
  ds = decode_stage(raw, source.encoded, channels, reduce_zero_label=source.reduce_zero_label, crop=crop)

  def fn(ex):
    image = ex["image"] if as_decoded else augment.to_float(ex["image"], channels)
    out = rest({**{k: v for k, v in ex.items() if k not in _BOOKKEEPING}, "image": image}, e)
    return {**out, **{k: ex[k] for k in _BOOKKEEPING if k in ex}}
  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def train_batches(source: Source, transform: Transform, *, host_batch: int, seed: int, start_step: int = 0,
                  shard: Shard = Shard(), masks: Optional[MaskSpec] = None, channels: int = 3,
                  prefetch: int = 2, threads: Optional[int] = None, ram_budget_mb: Optional[int] = None,
                  bad_files: Optional[_bad_files.BadFiles] = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless host-local training batches from `start_step` on (see the module docstring). `bad_files`: the
  record undecodable files are added to (default: bad_files.SEEN, this process's)."""
  record = bad_files if bad_files is not None else _bad_files.SEEN
  spe = steps_per_epoch(source, host_batch, shard.count)
  epoch, offset = divmod(int(start_step), spe)
  while True:
    # Step k of the epoch is the k-th window of host_batch examples of this host's order, whatever fails to
    # decode in it: a resume at step s reads from example (s % spe) * host_batch of the epoch, skipped unread.
    raw = source.read(shard_index=shard.index, shard_count=shard.count, shuffle=True, seed=seed, epoch=epoch,
                      skip=offset * host_batch).take((spe - offset) * host_batch)
    ds = _decoded_and_transformed(raw, source, transform, epoch, channels)
    ds = ds.batch(host_batch, drop_remainder=True).map(_replace_bad_rows)
    if masks is not None:
      ds = _with_masks(ds, masks, seed, epoch, host_batch)
    ds = ds.map(lambda b, e=epoch: {**b, "epoch": tf.fill([host_batch], tf.constant(e, tf.int32))})
    ds = ds.with_options(_options(threads, ram_budget_mb)).prefetch(prefetch)
    for step, batch in enumerate(tfds.as_numpy(ds), offset):
      _record_bad(batch, source, record, f"training epoch {epoch}", step=epoch * spe + step + 1)
      if batch["bad"].all():
        raise ValueError(f"step {epoch * spe + step} (epoch {epoch}) on host {shard.index}: all {host_batch} files "
                         f"of its batch fail to decode, e.g. {source.describe(batch['file_index'][0])}: "
                         f"{record.summary()}")
      yield check_labels(batch, source)
    epoch, offset = epoch + 1, 0


def _first_bad_row(bad: np.ndarray, batch: dict[str, np.ndarray]):
  """The first row flagged in `bad` [B] that is a real example (padding rows of evaluation batches aside)."""
  if "valid" in batch:
    bad = bad & batch["valid"].astype(bool)
  return int(np.argmax(bad)) if bad.any() else None


def check_labels(batch: dict[str, np.ndarray], source: Source) -> dict[str, np.ndarray]:
  """A label outside [0, num_classes) would train on an all-zero target (one_hot) without a word, an annotation
  id outside them on a wrong class: an error naming the example, before it reaches the device."""
  if not source.num_classes:
    return batch
  labels = batch.get("label")
  if labels is not None and labels.size:
    i = _first_bad_row((labels < 0) | (labels >= source.num_classes), batch)
    if i is not None:
      raise ValueError(f"label {int(labels[i])} of example {int(batch['index'][i])} in {source.name} split "
                       f"{source.split!r} is outside [0, {source.num_classes}): the labels or the source's "
                       "number of classes are wrong")
  ann = batch.get("annotation")
  if ann is not None and ann.size:
    i = _first_bad_row(((ann >= source.num_classes) & (ann != SEG_IGNORE)).any(axis=(1, 2)), batch)
    if i is not None:
      values = sorted(set(np.unique(ann[i]).tolist()) - set(range(source.num_classes)) - {SEG_IGNORE})
      raise ValueError(f"annotation of example {int(batch['index'][i])} in {source.name} split {source.split!r} "
                       f"holds class ids {values[:5]} outside [0, {source.num_classes}) and not the ignore label "
                       f"{SEG_IGNORE}: the annotations or the number of classes (data.num_classes) are wrong")
  return batch


def eval_batches(source: Source, transform: Transform, *, host_batch: int, shard: Shard = Shard(),
                 channels: int = 3, threads: Optional[int] = None, ram_budget_mb: Optional[int] = None,
                 masks: Optional[MaskSpec] = None,
                 mask_seed: int = 0, bad_files: Optional[_bad_files.BadFiles] = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the split, each example exactly once across hosts; every host yields the same number of
  batches, padded with `valid=False` rows (weight metrics by `valid`). An undecodable file's row is blank and
  invalid as the padding's, and added to `bad_files` (default: bad_files.SEEN). `masks`: each batch also carries
  the masks of (mask_seed, epoch 0, index), padding rows' included."""
  record = bad_files if bad_files is not None else _bad_files.SEEN
  num_batches = math.ceil(math.ceil(source.num_examples / shard.count) / host_batch)
  ds = _decoded_and_transformed(source.read(shard_index=shard.index, shard_count=shard.count), source, transform, 0,
                                channels)

  def blank_bad(ex):
    ok = ex["ok"]
    out = {k: v if k in ("index",) + _BOOKKEEPING else tf.where(ok, v, tf.zeros_like(v)) for k, v in ex.items()}
    return {**out, "valid": ok}
  ds = ds.map(blank_bad, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  spec = ds.element_spec
  pad = {k: tf.zeros(v.shape, v.dtype) for k, v in spec.items()}
  pad.update(valid=tf.constant(False), ok=tf.constant(True))  # padding is no bad file
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat()).take(num_batches * host_batch)
  ds = ds.batch(host_batch)  # every batch full: the padding fills the last
  ds = ds.map(lambda b: {**{k: v for k, v in b.items() if k != "ok"}, **_bad_keys(b)})
  if masks is not None:
    ds = _with_masks(ds, masks, mask_seed, 0, host_batch)
  def batches(ds):
    for batch in tfds.as_numpy(ds):
      _record_bad(batch, source, record, "evaluation")
      yield check_labels(batch, source)
  return batches(ds.with_options(_options(threads, ram_budget_mb)).prefetch(2))


# -- semantic segmentation ---------------------------------------------------------------------------------------
def seg_train_transform(*, seed: int, crop_size: int, scale=(2048, 512), ratio_range=(0.5, 2.0),
                        cat_max_ratio: float = 0.75, photometric: bool = True, mean_std=INCEPTION) -> Transform:
  """mmseg's ADE20K training pipeline (BEiT's): keep-ratio rescale to `scale` x U(ratio_range), a crop_size
  random crop (cat_max_ratio), flip, photometric distortion, normalise, pad to crop_size (image 0, annotation
  255), on the image and its annotation together."""
  def fn(ex, epoch):
    s = augment.split(augment.example_seed(seed, epoch, ex["index"]), 4)
    image, ann = augment.random_rescale(ex["image"], ex["annotation"], s[0], scale, ratio_range)
    image, ann = augment.random_crop_pair(image, ann, s[1], crop_size, cat_max_ratio)
    image, ann = augment.random_flip_pair(image, ann, s[2])
    if photometric:
      image = augment.photometric_distortion(image, s[3])
    image, ann = augment.pad_pair(augment.normalize(image, *mean_std), ann, crop_size, crop_size)
    return {"image": image, "annotation": ann, "index": ex["index"]}
  return fn


def seg_canvas(scale, crop_size: int) -> tuple[int, int]:
  """(rows, columns) every evaluation image fits after its keep-ratio rescale to `scale` (long, short), lying
  down (see seg_eval_transform), and at least one crop."""
  return max(scale[1], crop_size), max(scale[0], crop_size)


def seg_eval_transform(*, crop_size: int, scale=(2048, 512), mean_std=INCEPTION) -> Transform:
  """mmseg's ADE20K test view: the keep-ratio rescale to `scale`, image and annotation (nearest), then laid on a
  fixed canvas (seg_canvas; image 0, annotation 255 around it) so one compiled program evaluates every image.
  A portrait image is stored transposed ("transposed": the evaluation step transposes each window back before
  the model sees it), so one landscape canvas holds both orientations. "size": the image's (rows, columns) on
  the canvas."""
  rows, cols = seg_canvas(scale, crop_size)

  def fn(ex, epoch):
    del epoch
    h, w = tf.shape(ex["image"])[0], tf.shape(ex["image"])[1]
    image, ann = augment.resize_pair(ex["image"], ex["annotation"], augment.rescale_size(h, w, *scale))
    transposed = tf.shape(image)[0] > tf.shape(image)[1]
    image, ann = tf.cond(transposed, lambda: (tf.transpose(image, [1, 0, 2]), tf.transpose(ann)),
                         lambda: (image, ann))
    size = tf.shape(ann)
    image, ann = augment.pad_pair(augment.normalize(image, *mean_std), ann, rows, cols)
    return {"image": image, "annotation": ann, "size": size, "transposed": transposed, "index": ex["index"]}
  return fn


# -- one entry point per mode and split --------------------------------------------------------------------------
# The keys each entry point yields: what that mode's step reads, nothing more (a trainer's batch specs can be read
# from here). segmentation_eval's "size" is the one no step reads: the trainer lays each image's sliding windows
# from it (train/seg_eval.window_grid).
KEYS = {
    "pretrain_train": ("image", "tokenizer_image", "mask"),
    "pretrain_eval": ("image", "tokenizer_image", "mask", "valid"),
    "classification_train": ("image", "label"),
    "linear_probe_train": ("image", "label"),
    "classification_eval": ("image", "label", "valid"),
    "tokenizer_train": ("image",),
    "tokenizer_eval": ("image", "valid"),
    "segmentation_train": ("image", "annotation"),
    "segmentation_eval": ("image", "annotation", "size", "transposed", "valid"),
}
Data = ml_collections.ConfigDict  # a config's `data` block (configs/__init__.py names its keys per mode)


def source_of(data: Data, split: str) -> Source:
  """The split `split` of the source data.source names (data.data_dir: where tfds keeps its datasets)."""
  return sources.get_source(data.source, split, data.get("data_dir"))


def seg_source_of(data: Data, split: str) -> Source:
  """The split `split` of the segmentation source data.source names (data.num_classes > 0: its class count)."""
  return sources.get_seg_source(data.source, split, data.get("data_dir"), data.get("num_classes", 0))


def mask_spec(data: Data, grid: tuple[int, int]) -> MaskSpec:
  """The masks data.mask describes, on the model's patch grid (only the model knows it)."""
  return MaskSpec(grid=tuple(grid), **dict(data.mask))


def _split(data: Data, split: str | Source, make: Callable[[Data, str], Source] = source_of) -> Source:
  """A split name read from data.source, or the Source a trainer already holds (it counts steps and classes on
  its training split: one read of the files, not two)."""
  return split if isinstance(split, Source) else make(data, split)


def keys_of(mode: str, data: Optional[Data] = None) -> tuple[str, ...]:
  """The keys of `mode`'s batches (KEYS[mode]) under config.data's view options: pre-training's without
  "tokenizer_image" when data.tokenizer_view is "device", with device.CROP_KEYS instead of both views when
  data.resize is "device"; fine-tuning's with "erase" (random erasing's rectangles) when data.uint8 and
  data.augment.erase_prob > 0."""
  keys = KEYS[mode]
  if data is None:
    return keys
  if mode.startswith("pretrain") and _views(data)["tokenizer_view"] == "device":
    keys = tuple(k for k in keys if k != "tokenizer_image")
  if mode == "pretrain_train" and data.get("resize", "host") == "device":
    keys = (*device.CROP_KEYS, *(k for k in keys if k not in ("image", "tokenizer_image")))
  if mode == "classification_train" and _views(data)["uint8"] and data.augment.erase_prob > 0:
    keys = (*keys, "erase")
  return keys


def _only(mode: str, batches: Iterator[dict[str, np.ndarray]], data: Optional[Data] = None
          ) -> Iterator[dict[str, np.ndarray]]:
  """keys_of(mode, data) of each batch."""
  keys = keys_of(mode, data)
  return ({k: b[k] for k in keys} for b in batches)


def _views(data: Data) -> dict:
  """The transforms' output options from config.data (both optional keys): uint8 (bool, default False: float32
  images, normalised on the host) and tokenizer_view ("host" or "device", pre-training's)."""
  return {"uint8": bool(data.get("uint8", False)), "tokenizer_view": data.get("tokenizer_view", "host")}


def pretrain_train(data: Data, split: str | Source, *, host_batch: int, seed: int, start_step: int = 0,
                   shard: Shard = Shard(), masks: MaskSpec) -> Iterator[dict[str, np.ndarray]]:
  """Pre-training's batches from `start_step` on: the model view and the tokenizer view of one augmented crop
  (pretrain_transform) and the masks of (seed, epoch, index). data.uint8 / data.tokenizer_view (optional): see
  pretrain_transform; the step then calls device.pretrain_inputs."""
  transform = pretrain_transform(
      seed=seed, image_size=data.image_size, tokenizer_size=data.tokenizer_size,
      tokenizer_resize=data.tokenizer_resize, color_jitter=data.color_jitter, mean_std=mean_std(data.mean_std),
      scale=tuple(data.crop_scale), resize=data.get("resize", "host"),
      canvas=data.get("crop_canvas", device.CROP_CANVAS), **_views(data))
  return _only("pretrain_train", train_batches(
      _split(data, split), transform, host_batch=host_batch, seed=seed, start_step=start_step, shard=shard,
      masks=masks, channels=3, **_tf_data(data)), data)


def pretrain_eval(data: Data, split: str | Source, *, host_batch: int, seed: int, shard: Shard = Shard(),
                  masks: MaskSpec) -> Iterator[dict[str, np.ndarray]]:
  """The held-out masked-token accuracy's batches: both views of the whole image (mim_eval_transform) and the
  masks of (seed + 1, epoch 0, index): a draw of their own (seed itself would repeat epoch 0's training masks of
  the same indices), the same at every evaluation. "valid" is float32, the weight the step multiplies by."""
  transform = mim_eval_transform(image_size=data.image_size, tokenizer_size=data.tokenizer_size,
                                 tokenizer_resize=data.tokenizer_resize, mean_std=mean_std(data.mean_std),
                                 **_views(data))
  it = eval_batches(_split(data, split), transform, host_batch=host_batch, shard=shard, **_tf_data(data),
                    masks=masks, mask_seed=seed + 1)
  return ({**b, "valid": b["valid"].astype(np.float32)} for b in _only("pretrain_eval", it, data))


def _classification_train(mode: str, data: Data, split: str | Source, *, host_batch: int, seed: int,
                          start_step: int, shard: Shard, rand_augment, erase_prob: float):
  transform = finetune_transform(seed=seed, image_size=data.image_size, scale=tuple(data.augment.crop_scale),
                                 rand_augment=rand_augment, erase_prob=erase_prob, mean_std=mean_std(data.mean_std),
                                 uint8=_views(data)["uint8"])
  return _only(mode, train_batches(_split(data, split), transform, host_batch=host_batch, seed=seed,
                                   start_step=start_step, shard=shard, channels=3, **_tf_data(data)), data)


def classification_train(data: Data, split: str | Source, *, host_batch: int, seed: int, start_step: int = 0,
                         shard: Shard = Shard()) -> Iterator[dict[str, np.ndarray]]:
  """Fine-tuning's batches from `start_step` on: images augmented as data.augment says (finetune_transform:
  crop, flip, RandAugment, random erasing; mixup/cutmix come later, on device) and their labels; data.uint8
  (optional): uint8 images and random erasing's "erase" rectangles, for device.classification_inputs."""
  aug = data.augment
  return _classification_train("classification_train", data, split, host_batch=host_batch, seed=seed,
                               start_step=start_step, shard=shard,
                               rand_augment=tuple(aug.rand_augment) if aug.rand_augment else None,
                               erase_prob=aug.erase_prob)


def linear_probe_train(data: Data, split: str | Source, *, host_batch: int, seed: int, start_step: int = 0,
                       shard: Shard = Shard()) -> Iterator[dict[str, np.ndarray]]:
  """The linear probe's batches from `start_step` on: random-resized crop (data.augment.crop_scale) and flip
  alone, whatever data.augment says of RandAugment and erasing (unilm run_linear_eval's augmentation); data.uint8
  (optional): uint8 images."""
  return _classification_train("linear_probe_train", data, split, host_batch=host_batch, seed=seed,
                               start_step=start_step, shard=shard, rand_augment=None, erase_prob=0.0)


def classification_eval(data: Data, split: str | Source, *, host_batch: int,
                        shard: Shard = Shard()) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`, resized and centre-cropped (eval_transform, data.crop_pct), with labels and "valid"
  (padding rows False): fine-tuning's and the linear probe's evaluation, and the probe's precomputed features."""
  transform = eval_transform(image_size=data.image_size, crop_pct=data.get("crop_pct"),
                             mean_std=mean_std(data.mean_std))
  return _only("classification_eval", eval_batches(_split(data, split), transform, host_batch=host_batch,
                                                   shard=shard, **_tf_data(data)))


def tokenizer_train(data: Data, split: str | Source, *, image_size: int, host_batch: int, seed: int,
                    start_step: int = 0, shard: Shard = Shard()) -> Iterator[dict[str, np.ndarray]]:
  """Tokenizer training's batches from `start_step` on: image_size crops (the tokenizer's input size) of
  data.channels channels, in [0, 1] (tokenizer_transform)."""
  transform = tokenizer_transform(seed=seed, image_size=image_size, scale=tuple(data.crop_scale))
  return _only("tokenizer_train", train_batches(
      _split(data, split), transform, host_batch=host_batch, seed=seed, start_step=start_step, shard=shard,
      channels=data.channels, **_tf_data(data)))


def tokenizer_eval(data: Data, split: str | Source, *, image_size: int, host_batch: int,
                   shard: Shard = Shard()) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` resized to image_size, in [0, 1] (plain_transform), with "valid"."""
  return _only("tokenizer_eval", eval_batches(
      _split(data, split), plain_transform(image_size=image_size), host_batch=host_batch, shard=shard,
      channels=data.channels, **_tf_data(data)))


def segmentation_train(data: Data, split: str | Source, *, host_batch: int, seed: int, start_step: int = 0,
                       shard: Shard = Shard()) -> Iterator[dict[str, np.ndarray]]:
  """Segmentation training's batches from `start_step` on: crop_size image/annotation pairs augmented as
  mmseg's ADE20K pipeline (seg_train_transform: data.scale, ratio_range, cat_max_ratio, photometric)."""
  transform = seg_train_transform(
      seed=seed, crop_size=data.crop_size, scale=tuple(data.scale), ratio_range=tuple(data.ratio_range),
      cat_max_ratio=data.cat_max_ratio, photometric=data.photometric, mean_std=mean_std(data.mean_std))
  return _only("segmentation_train", train_batches(
      _split(data, split, seg_source_of), transform, host_batch=host_batch, seed=seed, start_step=start_step,
      shard=shard, channels=3, **_tf_data(data)))


def segmentation_eval(data: Data, split: str | Source, *, host_batch: int, shard: Shard = Shard(),
                      scale: Optional[tuple[int, int]] = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` at the test scale (`scale`, the evaluation's own, or data.scale), each image on the
  fixed canvas of seg_eval_transform with its "size" and "transposed", and "valid"."""
  transform = seg_eval_transform(crop_size=data.crop_size, scale=tuple(scale or data.scale),
                                 mean_std=mean_std(data.mean_std))
  return _only("segmentation_eval", eval_batches(_split(data, split, seg_source_of), transform, host_batch=host_batch,
                                                 shard=shard, **_tf_data(data)))
