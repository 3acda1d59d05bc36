"""Where examples come from: tfds datasets by name, a folder of images, Fashion-MNIST from local IDX files.

Every source yields, for one host's shard of one epoch, a tf.data.Dataset of
  {"image": uint8 [H, W, C] (decoded sources) or "image_bytes": encoded string (JPEG/PNG sources),
   "label": int32, "index": int64}
where `index` is a stable id of the example (its position, or a hash of its tfds id / file path): masks and
augmentation draws are pure functions of (seed, epoch, index), so they do not depend on how hosts split work.

Order: an epoch's order is a pure function of (seed, epoch). Sources with random access (the IDX files and
image folders) shuffle a list of indices (so `skip` costs nothing); tfds record files are read with a seeded
file shuffle and a seeded shuffle buffer.

A source is named by a spec string (the `data.source` config key):
  "fashion_mnist_files[:DIR]"  the four IDX files tfds downloads (Debian: dataset-fashion-mnist), no network
  "folder:ROOT"                ROOT/<split>/<class>/<image> (tfds.ImageFolder's layout; gs:// paths work)
  "tfds:NAME" or "NAME"        tfds.builder(NAME, data_dir=data_dir), prepared beforehand
Splits take tfds's slicing for the first examples everywhere: "test[:1000]".

Semantic-segmentation sources (`get_seg_source`) yield an "annotation" (uint8 [H, W] class ids, 255 = ignore;
or "annotation_bytes", a PNG) instead of a "label":
  "ade20k:ROOT"                ADEChallengeData2016 (mmseg's and unilm's layout): ROOT/images/{training,
                               validation}/*.jpg with ROOT/annotations/.../*.png; 150 classes, 0 ("other")
                               ignored (mmseg's reduce_zero_label)
  "fmnist_composite[:DIR]"     Fashion-MNIST items composited onto black canvases, labelled per pixel (tests, demo)
  "tfds:NAME"                  a tfds dataset with "image" and "annotation" (or "segmentation_mask") features
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
from typing import Callable, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


def epoch_permutation(num: int, seed: int, epoch: int) -> np.ndarray:
  """The order of an epoch: the same on every host, a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num)


def shard_of(indices: np.ndarray, shard_index: int, shard_count: int) -> np.ndarray:
  """Host `shard_index`'s examples: a strided slice, so shards differ in size by at most one."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} must be in [0, {shard_count})")
  return indices[shard_index::shard_count]


@dataclasses.dataclass
class Source:
  """A split of a data set: its size, classes, and a way to read one host's shard of one epoch."""
  name: str
  split: str
  num_examples: int
  num_classes: int
  encoded: bool  # "image_bytes" (needs decoding) rather than "image"
  _read: Callable[..., tf.data.Dataset]
  reduce_zero_label: bool = False  # segmentation: annotation 0 -> ignore (255), k -> k - 1 (mmseg's ADE20K)
  # What an example's `index` is called in messages (a file's path); None: "<name> <split> example <index>".
  describe_index: Optional[Callable[[int], str]] = None

  def describe(self, index: int) -> str:
    if self.describe_index is not None:
      return self.describe_index(int(index))
    return f"{self.name} {self.split} example {int(index)}"

  def read(self, *, shard_index: int = 0, shard_count: int = 1, shuffle: bool = False, seed: int = 0,
           epoch: int = 0, skip: int = 0) -> tf.data.Dataset:
    """One epoch of this host's shard, in the epoch's order, starting after its first `skip` examples."""
    return self._read(shard_index=shard_index, shard_count=shard_count, shuffle=shuffle, seed=seed, epoch=epoch,
                      skip=skip)

  def shard_size(self, shard_index: int, shard_count: int) -> int:
    return len(range(shard_index, self.num_examples, shard_count))


def _indexed(num: int, make: Callable[[tf.data.Dataset], tf.data.Dataset]):
  """A reader for random-access sources: shuffle indices, shard, skip, then load only what is read."""
  def read(*, shard_index, shard_count, shuffle, seed, epoch, skip):
    order = epoch_permutation(num, seed, epoch) if shuffle else np.arange(num)
    mine = shard_of(order, shard_index, shard_count)[skip:]
    return make(tf.data.Dataset.from_tensor_slices(mine.astype(np.int64)))
  return read


# -- Fashion-MNIST from the IDX files ---------------------------------------------------------------------------
def _read_idx(path: pathlib.Path) -> np.ndarray:
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: install the Debian package dataset-fashion-mnist "
                            f"(apt-get install -y dataset-fashion-mnist) or pass fashion_mnist_files:DIR")
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  magic = int.from_bytes(data[:4], "big")
  if magic >> 8 != 0x08:  # unsigned byte data
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (stem + ".gz", stem):
    if (directory / name).exists():
      return directory / name
  return directory / (stem + ".gz")  # for the error message


def _split_and_slice(split: str) -> tuple[str, slice]:
  """tfds's slicing syntax for a contiguous run of a split, "test[:1000]" or "train[600:1200]", for every
  source (the labelled subsets of semi-supervised runs: a different slice per seed)."""
  if not split.endswith("]"):
    return split, slice(None)
  name, _, bounds = split[:-1].partition("[")
  start, sep, end = bounds.partition(":")
  if not sep or not (start or end) or not all(b.isdigit() for b in (start, end) if b) or \
      int(start or 0) >= int(end or 2 ** 62):
    raise ValueError(f"split {split!r}: only the forms NAME[:END], NAME[START:] and NAME[START:END] (START < END, "
                     "non-negative integers) are supported here")
  return name, slice(int(start) if start else None, int(end) if end else None)


def _fashion_mnist_arrays(split: str, directory: str) -> tuple[str, np.ndarray, np.ndarray]:
  """(split name, images uint8 [N, 28, 28], labels int32 [N]) of a split with tfds's slicing, checked."""
  split, part = _split_and_slice(split)
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"fashion_mnist_files has splits 'train' and 'test', not {split!r}")
  d = pathlib.Path(directory)
  images = _read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))[part]
  labels = _read_idx(_find(d, f"{prefix}-labels-idx1-ubyte"))[part].astype(np.int32)
  if not len(labels):
    raise ValueError(f"split {split!r} of fashion_mnist_files {d}: the slice {part} is empty")
  return split, images, labels


def fashion_mnist_files(split: str, directory: str = FASHION_MNIST_DIR) -> Source:
  split, images, labels = _fashion_mnist_arrays(split, directory)
  images_t, labels_t = tf.constant(images[..., None]), tf.constant(labels)  # [N, 28, 28, 1]

  def make(ds):
    return ds.map(lambda i: {"image": tf.gather(images_t, i), "label": tf.gather(labels_t, i), "index": i})
  return Source(f"fashion_mnist_files:{pathlib.Path(directory)}", split, len(labels), 10, False,
                _indexed(len(labels), make))


# -- A folder of images -----------------------------------------------------------------------------------------
def image_folder(root: str, split: str) -> Source:
  """ROOT/<split>/<class>/<image>, classes sorted by name (as tfds.ImageFolder)."""
  split, part = _split_and_slice(split)
  split_dir = os.path.join(root, split)
  if not tf.io.gfile.isdir(split_dir):
    found = sorted(tf.io.gfile.listdir(root)) if tf.io.gfile.isdir(root) else None
    raise FileNotFoundError(f"image folder split {split_dir} does not exist"
                            + (f"; {root} has {found}" if found is not None else f" ({root} is missing too)"))
  classes = sorted(c.rstrip("/") for c in tf.io.gfile.listdir(split_dir)
                   if tf.io.gfile.isdir(os.path.join(split_dir, c)))
  paths, labels = [], []
  for label, cls in enumerate(classes):
    for name in sorted(tf.io.gfile.listdir(os.path.join(split_dir, cls))):
      if name.lower().endswith(_IMAGE_EXTENSIONS):
        paths.append(os.path.join(split_dir, cls, name))
        labels.append(label)
  if not paths:
    raise FileNotFoundError(f"no images ({', '.join(_IMAGE_EXTENSIONS)}) under {split_dir}/<class>/")
  paths, labels = paths[part], labels[part]
  if not paths:
    raise ValueError(f"split {split!r} of {root}: the slice {part} is empty")
  paths_t, labels_t = tf.constant(paths), tf.constant(labels, tf.int32)

  def make(ds):
    return ds.map(lambda i: {"image_bytes": tf.io.read_file(tf.gather(paths_t, i)),
                             "label": tf.gather(labels_t, i), "index": i}, num_parallel_calls=tf.data.AUTOTUNE)
  return Source(f"folder:{root}", split, len(paths), len(classes), True, _indexed(len(paths), make),
                describe_index=paths.__getitem__)


# -- tfds ---------------------------------------------------------------------------------------------------------
def _tfds_builder(name: str, data_dir: Optional[str]):
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown tfds dataset {name!r} (data.source): {str(e).splitlines()[0]}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}: run "
                            f"tfds.builder({name!r}, data_dir=...).download_and_prepare() first")
  return builder


def _tfds_split_size(builder, name: str, split: str) -> int:
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    raise ValueError(f"tfds dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}") from None


def _tfds_read(builder, split: str, shard_index: int, shard_count: int, shuffle: bool, seed: int, epoch: int,
               decoders) -> tf.data.Dataset:
  """One host's shard of one epoch, with "tfds_id"; shuffled files and a seeded buffer when `shuffle`."""
  sub = tfds.even_splits(split, n=shard_count)[shard_index]
  shuffle_seed = int(np.random.default_rng([seed, epoch, shard_index]).integers(2 ** 31))
  config = tfds.ReadConfig(add_tfds_id=True, shuffle_seed=shuffle_seed if shuffle else None,
                           options=_deterministic())
  ds = builder.as_dataset(split=sub, shuffle_files=shuffle, read_config=config, decoders=decoders)
  return ds.shuffle(10_000, seed=shuffle_seed) if shuffle else ds


def _tfds_index(ex) -> tf.Tensor:
  return tf.strings.to_hash_bucket_fast(ex["tfds_id"], 2 ** 62)


def tfds_source(name: str, split: str, data_dir: Optional[str] = None) -> Source:
  builder = _tfds_builder(name, data_dir)
  num = _tfds_split_size(builder, name, split)
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"tfds dataset {name!r} lacks an 'image' or 'label' feature: {list(features)}")
  num_classes = features["label"].num_classes
  # JPEG/PNG-encoded images stay encoded until the pipeline has sharded and skipped: decoding is the cost.
  encoded = getattr(features["image"], "encoding_format", None) in ("jpeg", "png")

  def read(*, shard_index, shard_count, shuffle, seed, epoch, skip):
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
    ds = _tfds_read(builder, split, shard_index, shard_count, shuffle, seed, epoch, decoders)
    ds = ds.map(lambda ex: {"image_bytes" if encoded else "image": ex["image"],
                            "label": tf.cast(ex["label"], tf.int32), "index": _tfds_index(ex)})
    return ds.skip(skip)
  return Source(f"tfds:{name}", split, num, num_classes, encoded, read)


def _deterministic() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _root(arg: str, spec: str, what: str) -> str:
  if not arg:
    raise ValueError(f"data.source='{spec}:ROOT' needs a ROOT ({what})")
  return arg


# A spec's kind (before the first ":") -> the source of (arg, split, data_dir): the one table get_source reads.
SOURCES = {
    "fashion_mnist_files": lambda arg, split, data_dir: fashion_mnist_files(split, arg or FASHION_MNIST_DIR),
    "folder": lambda arg, split, data_dir: image_folder(_root(arg, "folder", "the folder of <split>/<class>/"),
                                                        split),
    "tfds": lambda arg, split, data_dir: tfds_source(arg, split, data_dir),
}


def get_source(spec: str, split: str, data_dir: Optional[str] = None) -> Source:
  """The source named by `spec` (see the module docstring). A bare name is a tfds name; a kind before a ":"
  that is not in SOURCES is an error (not a tfds lookup of "kind:..." that would fail far from the typo)."""
  kind, sep, arg = spec.partition(":")
  if kind not in SOURCES:
    if sep:
      raise ValueError(f"data.source={spec!r}: unknown source kind {kind!r}; the kinds are {sorted(SOURCES)} "
                       "(a tfds name with a version: 'tfds:NAME:VERSION')")
    kind, arg = "tfds", spec
  return SOURCES[kind](arg, split, data_dir)


# -- Semantic segmentation ------------------------------------------------------------------------------------------
SEG_IGNORE = 255  # the label no loss or metric counts (ADE20K's "other" after reduce_zero_label, boundaries)
ADE20K_SPLITS = {"train": "training", "training": "training", "validation": "validation", "val": "validation"}


def ade20k_folder(root: str, split: str) -> Source:
  """ADEChallengeData2016 as unzipped (the files mmseg's ADE20KDataset and BEiT's ADE20K results read)."""
  split, part = _split_and_slice(split)
  sub = ADE20K_SPLITS.get(split)
  if sub is None:
    raise ValueError(f"ade20k has splits {sorted(ADE20K_SPLITS)}, not {split!r}")
  image_dir, ann_dir = (os.path.join(root, kind, sub) for kind in ("images", "annotations"))
  for d in (image_dir, ann_dir):
    if not tf.io.gfile.isdir(d):
      raise FileNotFoundError(f"{d} does not exist: data.source='ade20k:ROOT' wants ROOT = the unzipped "
                              "ADEChallengeData2016 (ROOT/images/training, ROOT/annotations/training, ...)")
  names = sorted(n for n in tf.io.gfile.listdir(image_dir) if n.lower().endswith((".jpg", ".jpeg", ".png")))
  stems = [os.path.splitext(n)[0] for n in names]
  have = set(tf.io.gfile.listdir(ann_dir))
  missing = [s for s in stems if s + ".png" not in have]
  if missing:
    raise FileNotFoundError(f"{len(missing)} images of {image_dir} have no annotation {ann_dir}/<name>.png "
                            f"(first: {missing[0]}.png)")
  images = [os.path.join(image_dir, n) for n in names][part]
  annotations = [os.path.join(ann_dir, s + ".png") for s in stems][part]
  if not images:
    raise ValueError(f"ade20k split {split!r} under {root}: no images (or the slice {part} is empty)")
  images_t, annotations_t = tf.constant(images), tf.constant(annotations)

  def make(ds):
    return ds.map(lambda i: {"image_bytes": tf.io.read_file(tf.gather(images_t, i)),
                             "annotation_bytes": tf.io.read_file(tf.gather(annotations_t, i)), "index": i},
                  num_parallel_calls=tf.data.AUTOTUNE)
  return Source(f"ade20k:{root}", split, len(images), 150, True, _indexed(len(images), make), reduce_zero_label=True,
                describe_index=lambda i: f"{images[i]} (annotation {annotations[i]})")


# Composited Fashion-MNIST: one item enlarged `COMPOSITE_SCALE` times (nearest) at a random place on a black
# canvas, its pixels brighter than 0.2 labelled class + 1, the rest background (0), the label boundaries 255 (as
# ADE20K's unlabelled boundary pixels). Training canvases are square; test canvases are wider than tall, so that
# evaluation slides windows over them. Placement is a pure function of the example's index.
COMPOSITE_CANVAS = {"train": (64, 64), "test": (64, 96)}
COMPOSITE_SCALE = 2


def fmnist_composite(split: str, directory: str = FASHION_MNIST_DIR) -> Source:
  name, images, labels = _fashion_mnist_arrays(split, directory)
  images, labels = tf.constant(images), tf.constant(labels)
  num = int(labels.shape[0])
  height, width = COMPOSITE_CANVAS[name]
  side = 28 * COMPOSITE_SCALE

  def composite(i):
    pos = tf.random.stateless_uniform([2], tf.stack([i, tf.constant(0x5E6, tf.int64)]),
                                      0, 2 ** 30, tf.int64)
    top, left = pos[0] % (height - side + 1), pos[1] % (width - side + 1)
    item = tf.repeat(tf.repeat(tf.gather(images, i), COMPOSITE_SCALE, 0), COMPOSITE_SCALE, 1)
    paddings = [[top, height - side - top], [left, width - side - left]]
    canvas = tf.pad(item, paddings)
    ann = tf.where(tf.cast(canvas, tf.float32) > 0.2 * 255, tf.gather(labels, i) + 1, 0)
    edge = tf.pad(tf.not_equal(ann[:, 1:], ann[:, :-1]), [[0, 0], [1, 0]])
    edge |= tf.pad(tf.not_equal(ann[1:], ann[:-1]), [[1, 0], [0, 0]])
    ann = tf.where(edge, SEG_IGNORE, ann)
    return {"image": canvas[..., None], "annotation": tf.cast(ann, tf.uint8), "index": i}
  return Source(f"fmnist_composite:{pathlib.Path(directory)}", name, num, 11, False,
                _indexed(num, lambda ds: ds.map(composite)))


def tfds_seg_source(name: str, split: str, data_dir: Optional[str] = None, num_classes: int = 0) -> Source:
  """A prepared tfds dataset with an "image" and an "annotation" (or "segmentation_mask") Image feature, class ids
  in [0, num_classes) or 255. Image features record no class count: `num_classes` (data.num_classes) names it."""
  if name.split("/")[0].split(":")[0] == "scene_parse150":
    # tfds's scene_parse150 builds its annotations from the Places Challenge 2017 *instance* masks
    # (annotations_instance/: red = one of 100 instance categories, green = the instance), not the 150-class
    # scene-parsing maps that BEiT's and every ADE20K mIoU are measured on.
    raise ValueError("tfds 'scene_parse150' holds the Places Challenge 2017 instance masks (100 categories in the "
                     "red channel), not ADE20K's 150-class maps: download ADEChallengeData2016.zip and use "
                     "data.source='ade20k:ROOT' (README, Segmentation)")
  builder = _tfds_builder(name, data_dir)
  features = builder.info.features
  ann_key = next((k for k in ("annotation", "segmentation_mask") if k in features), None)
  if "image" not in features or ann_key is None:
    raise ValueError(f"tfds dataset {name!r} lacks an 'image' or 'annotation'/'segmentation_mask' feature: "
                     f"{list(features)}")
  if num_classes <= 0:
    raise ValueError(f"tfds dataset {name!r}: set data.num_classes (its annotations do not record the count)")
  num = _tfds_split_size(builder, name, split)

  def read(*, shard_index, shard_count, shuffle, seed, epoch, skip):
    ds = _tfds_read(builder, split, shard_index, shard_count, shuffle, seed, epoch,
                    {"image": tfds.decode.SkipDecoding(), ann_key: tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: {"image_bytes": ex["image"], "annotation_bytes": ex[ann_key], "index": _tfds_index(ex)})
    return ds.skip(skip)
  return Source(f"tfds:{name}", split, num, num_classes, True, read)


SEG_SOURCES = {
    "ade20k": lambda arg, split, data_dir: ade20k_folder(
        _root(arg, "ade20k", "the unzipped ADEChallengeData2016"), split),
    "fmnist_composite": lambda arg, split, data_dir: fmnist_composite(split, arg or FASHION_MNIST_DIR),
}


def get_seg_source(spec: str, split: str, data_dir: Optional[str] = None, num_classes: int = 0) -> Source:
  """The segmentation source named by `spec` (see the module docstring); `num_classes` > 0 overrides the
  source's count (a tfds dataset that does not record it)."""
  kind, _, arg = spec.partition(":")
  if kind == "tfds":  # tfds_seg_source takes the count itself: some tfds datasets do not record it
    return tfds_seg_source(arg, split, data_dir, num_classes)
  if kind not in SEG_SOURCES:
    raise ValueError(f"data.source={spec!r} is no segmentation source: use 'ade20k:ROOT', "
                     "'fmnist_composite' or 'tfds:NAME'")
  source = SEG_SOURCES[kind](arg, split, data_dir)
  return dataclasses.replace(source, num_classes=num_classes) if num_classes else source
