"""Input pipelines on real data: Fashion-MNIST from its IDX files and a folder of PNGs written here."""
import contextlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf

from beit_jax.data import augment, device, mixup, pipelines, sources

MASKS = pipelines.MaskSpec(grid=(4, 4), num_masked=6, min_block=2)


@pytest.fixture(scope="module")
def fmnist_train():
  return sources.get_source("fashion_mnist_files", "train")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """40 real crops of skimage photos as PNGs in 2 classes, plus one file that is not an image."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("images")
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  rng = np.random.default_rng(0)
  for split, n in (("train", 40), ("val", 11)):
    for i in range(n):
      cls = root / split / ("cats" if i % 2 else "people")
      cls.mkdir(parents=True, exist_ok=True)
      photo = photos[i % 3]
      y, x = rng.integers(0, 200, 2)
      h, w = rng.integers(48, 160, 2)
      (cls / f"{i:03d}.png").write_bytes(tf.io.encode_png(photo[y:y + h, x:x + w]).numpy())
  (root / "train" / "cats" / "broken.png").write_bytes(b"this is not an image at all")
  return root


def take(it, n):
  return [next(it) for _ in range(n)]


def test_fashion_mnist_files(fmnist_train):
  assert (fmnist_train.num_examples, fmnist_train.num_classes) == (60000, 10)
  ex = next(iter(fmnist_train.read().take(1)))
  assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == tf.uint8
  assert int(ex["label"]) == 9 and int(ex["index"]) == 0  # the first training image is an ankle boot
  assert sources.get_source("fashion_mnist_files", "test").num_examples == 10000
  first = sources.get_source("fashion_mnist_files", "train[:100]")  # tfds's slicing, for every source
  assert first.num_examples == 100 and int(next(iter(first.read().take(1)))["label"]) == 9
  second = sources.get_source("fashion_mnist_files", "train[100:300]")  # another labelled subset
  assert second.num_examples == 200
  np.testing.assert_array_equal(second.read().take(1).get_single_element()["image"],
                                fmnist_train.read().skip(100).take(1).get_single_element()["image"])
  for bad in ("train[:0]", "train[5:5]", "train[a:]", "train[3]"):
    with pytest.raises(ValueError, match="NAME"):
      sources.get_source("fashion_mnist_files", bad)
  with pytest.raises(ValueError, match="empty"):
    sources.get_source("fashion_mnist_files", "train[60000:]")


def test_pretrain_batches_shapes_ranges_masks(fmnist_train):
  t = pipelines.pretrain_transform(seed=0, image_size=32, tokenizer_size=16)
  batch = next(pipelines.train_batches(fmnist_train, t, host_batch=16, seed=0, masks=MASKS))
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < 0 < batch["image"].max() <= 1.0   # mean = std = 0.5
  assert batch["tokenizer_image"].shape == (16, 16, 16, 3)
  assert 0.0 <= batch["tokenizer_image"].min() and batch["tokenizer_image"].max() <= 1.0
  counts = batch["mask"].reshape(16, -1).sum(1)
  assert batch["mask"].dtype == bool and counts.min() >= 1 and counts.max() <= 6
  np.testing.assert_array_equal(batch["mask"], MASKS.make(0, batch["index"], 0))
  assert batch["label"].dtype == np.int32 and len(set(batch["index"])) == 16


def test_deterministic_and_resume_across_epochs(folder):
  src = sources.get_source(f"folder:{folder}", "train")
  assert src.num_examples == 41 and src.num_classes == 2
  t = pipelines.pretrain_transform(seed=1, image_size=32, tokenizer_size=16)
  run = lambda start: pipelines.train_batches(src, t, host_batch=8, seed=1, start_step=start, masks=MASKS)
  spe = pipelines.steps_per_epoch(src, 8)
  assert spe == 5
  full = take(run(0), 12)
  assert [b["epoch"][0] for b in full] == [0] * 5 + [1] * 5 + [2] * 2
  for start in (3, 7):  # inside epoch 0, and in epoch 1 after an epoch boundary
    resumed = take(run(start), 3)
    for a, b in zip(full[start:start + 3], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"step {start} key {k}")
  e0 = np.concatenate([b["file_index"] for b in full[:5]])  # the files read (broken.png's row holds a copy)
  e1 = np.concatenate([b["file_index"] for b in full[5:10]])
  assert len(set(e0)) == 40 and not np.array_equal(e0, e1)  # each epoch its own order


def test_broken_file_is_skipped_and_counted(folder):
  src = sources.get_source(f"folder:{folder}", "train")
  ev = list(pipelines.eval_batches(src, pipelines.eval_transform(image_size=32), host_batch=64))
  assert len(ev) == 1
  assert ev[0]["valid"].sum() == 40 and ev[0]["skipped"].max() == 1


def test_host_shards_cover_each_example_once(fmnist_train):
  src = sources.get_source("fashion_mnist_files", "test")
  seen, batches = [], []
  for host in range(3):
    ev = list(pipelines.eval_batches(src, pipelines.eval_transform(image_size=32), host_batch=1024,
                                     shard=pipelines.Shard(host, 3)))
    batches.append(len(ev))
    for b in ev:
      assert b["image"].shape == (1024, 32, 32, 3)
      seen.append(b["index"][b["valid"]])
      assert not b["image"][~b["valid"]].any()  # padding rows are zeros
  assert batches == [4] * 3  # every host the same count: 10,000 / 3 hosts -> up to 3,334 rows -> 4 batches of 1,024
  seen = np.concatenate(seen)
  assert len(seen) == 10000 and len(set(seen)) == 10000
  # training: the hosts' shards of an epoch are disjoint
  t = pipelines.finetune_transform(seed=0, image_size=28, rand_augment=None, erase_prob=0.0)
  per_host = [np.concatenate([b["index"] for b in take(
      pipelines.train_batches(fmnist_train, t, host_batch=256, seed=0, shard=pipelines.Shard(h, 2)), 3)])
              for h in range(2)]
  assert not set(per_host[0]) & set(per_host[1])


def test_finetune_transform_and_every_rand_augment_op():
  import skimage.data  # pylint: disable=import-outside-toplevel
  image = tf.image.convert_image_dtype(skimage.data.chelsea()[:96, :96], tf.float32)
  seed = augment.example_seed(0, 0, 5)
  for name, fn in augment.RAND_AUGMENT_OPS:
    out = fn(image, tf.constant(9.0), tf.constant(1.0))
    assert out.shape == image.shape, name
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0 + 1e-6, name
    assert float(tf.reduce_max(tf.abs(out - image))) > 0.01, f"{name} left the image unchanged"
  out = augment.rand_augment(image, seed)
  assert out.shape == image.shape
  t = pipelines.finetune_transform(seed=0, image_size=64)
  ex = t({"image": image, "label": tf.constant(1), "index": tf.constant(5, tf.int64)}, tf.constant(0, tf.int64))
  assert ex["image"].shape == (64, 64, 3)
  again = t({"image": image, "label": tf.constant(1), "index": tf.constant(5, tf.int64)}, tf.constant(0, tf.int64))
  np.testing.assert_array_equal(ex["image"].numpy(), again["image"].numpy())  # a pure function of the seed


def test_random_resized_crop_matches_torchvision_statistics():
  from beit_jax.convert.timm_compat import install_torchvision_shim  # pylint: disable=import-outside-toplevel
  install_torchvision_shim()
  import torch  # pylint: disable=import-outside-toplevel
  from torchvision.transforms import RandomResizedCrop  # pylint: disable=import-outside-toplevel
  ours, ref = [], []
  torch.manual_seed(0)
  img = torch.zeros(3, 60, 90)
  for i in range(1000):
    top, left, h, w = [int(v) for v in augment.random_resized_crop_box(augment.example_seed(0, 0, i), 60, 90)]
    assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90 and h > 0 and w > 0
    ours.append((h * w / 5400, w / h))
    _, _, h, w = RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
    ref.append((h * w / 5400, w / h))
  ours, ref = np.array(ours), np.array(ref)
  print(f"crop area mean: ours {ours[:, 0].mean():.3f} torchvision {ref[:, 0].mean():.3f}")
  assert abs(ours[:, 0].mean() - ref[:, 0].mean()) < 0.03
  assert abs(np.log(ours[:, 1]).mean() - np.log(ref[:, 1]).mean()) < 0.05
  assert ours[:, 0].min() > 0.07


def test_eval_center_crop():
  image = tf.random.stateless_uniform((100, 150, 3), [0, 1])
  out = augment.resize_center_crop(image, 32, 0.875)
  assert out.shape == (32, 32, 3)


def test_errors_name_what_was_asked(tmp_path, fmnist_train):
  with pytest.raises(FileNotFoundError, match="split .*nope.* does not exist"):
    sources.get_source(f"folder:{tmp_path}", "nope")
  with pytest.raises(ValueError, match="splits 'train' and 'test', not 'validation'"):
    sources.get_source("fashion_mnist_files", "validation")
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    sources.get_source(f"fashion_mnist_files:{tmp_path}", "train")
  with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
    sources.get_source("tfds:no_such_dataset_xyz", "train")
  # A typo in the kind names the kinds (it used to become a tfds lookup of "foldr:..."); a bare name is tfds's.
  with pytest.raises(ValueError, match=r"unknown source kind 'foldr'; the kinds are \['fashion_mnist_files', "
                                       r"'folder', 'tfds'\]"):
    sources.get_source(f"foldr:{tmp_path}", "train")
  with pytest.raises(ValueError, match="unknown tfds dataset 'no_such_dataset_xyz'"):
    sources.get_source("no_such_dataset_xyz", "train")
  with pytest.raises(ValueError, match=r"'folder:ROOT' needs a ROOT"):
    sources.get_source("folder:", "train")
  with pytest.raises(ValueError, match="is no segmentation source"):
    sources.get_seg_source("ade2k:/x", "training")
  with pytest.raises(ValueError, match=r"data.mask.kind='blockwize': use one of \['blockwise', 'random'\]"):
    pipelines.MaskSpec(kind="blockwize")
  random = pipelines.MaskSpec(grid=(4, 4), num_masked=6, kind="random").make(0, np.arange(3), epoch=0)
  assert random.shape == (3, 4, 4) and (random.sum((1, 2)) == 6).all()
  with pytest.raises(ValueError, match="lower the batch size"):
    next(pipelines.train_batches(fmnist_train, pipelines.eval_transform(image_size=28), host_batch=70000, seed=0))


def test_mixup_cutmix_pure_function():
  images = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  labels = jax.numpy.arange(8) % 5  # image 0 (class 0) is mixed with image 7 (class 2)
  fn = jax.jit(lambda k: mixup.mixup_cutmix(k, images, labels, 5))
  x, x_rev = np.asarray(images), np.asarray(images[::-1])
  kinds = set()
  for i in range(20):
    mixed, targets = (np.asarray(a) for a in fn(jax.random.key(i)))
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    lam = (targets[0, 0] - 0.1 / 5) / 0.9  # own-class weight = lam * 0.9 + smoothing share
    from_own = np.isclose(mixed, x).all(-1)
    if (from_own | np.isclose(mixed, x_rev).all(-1)).all():  # cutmix: every pixel from one of the two
      kinds.add("cutmix")
      assert abs(from_own[0].mean() - lam) < 1e-5  # the weight is the true share of own pixels
    else:
      kinds.add("mixup")
      np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x_rev, atol=1e-5)
  assert kinds == {"cutmix", "mixup"}
  _, t = mixup.mixup_cutmix(jax.random.key(0), images, labels, 5, prob=0.0)
  np.testing.assert_allclose(np.asarray(t), np.asarray(mixup.smooth_one_hot(labels, 5)), rtol=1e-6)


def test_global_batches_on_a_mesh():
  mesh = jax.make_mesh((8,), ("data",))
  host = [{"image": np.full((16, 4, 4, 3), i, np.float32), "label": np.arange(16, dtype=np.int32)} for i in range(3)]
  out = list(device.global_batches(iter(host), mesh))
  assert len(out) == 3
  assert out[1]["image"].shape == (16, 4, 4, 3) and out[1]["image"].sharding.spec == jax.sharding.PartitionSpec(("data",))
  assert float(out[2]["image"].mean()) == 2.0


def test_masking_device_mixup_do_not_import_tensorflow():
  code = ("import sys, beit_jax.data.masking, beit_jax.data.device, beit_jax.data.mixup, beit_jax.data.bad_files, "
          "beit_jax.data.normalization; assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


def test_awkward_image_files_are_decoded_or_skipped_and_counted(tmp_path):
  """What a scraped folder holds: grayscale, grayscale+alpha, RGBA, 16-bit PNGs, CMYK and progressive JPEGs,
  a truncated JPEG, a text file named .jpg, an empty file, and an empty class folder. Every decodable image
  becomes [S, S, 3] float32 in [0, 1] (16-bit scaled, not clipped); every file that fails to decode is skipped
  and counted in "skipped", the truncated JPEG (a valid signature) included (tests/test_bad_files.py)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  photo = skimage.data.astronaut()[:96, :96]
  cls = tmp_path / "train" / "things"
  cls.mkdir(parents=True)
  (tmp_path / "train" / "nothing").mkdir()  # an empty class: no examples, no crash
  gray = Image.fromarray(photo).convert("L")
  gray.save(cls / "gray.png")
  gray.convert("LA").save(cls / "gray_alpha.png")
  Image.fromarray(photo).convert("RGBA").save(cls / "rgba.png")
  Image.fromarray((np.asarray(gray).astype(np.uint16) * 257)).save(cls / "sixteen_bit.png")
  Image.fromarray(photo).convert("CMYK").save(cls / "cmyk.jpg")
  Image.fromarray(photo).save(cls / "progressive.jpg", progressive=True)
  Image.fromarray(photo).save(cls / "whole.jpg")
  (cls / "truncated.jpg").write_bytes((cls / "whole.jpg").read_bytes()[:1500])
  (cls / "text.jpg").write_text("not an image")
  (cls / "empty.png").write_bytes(b"")
  src = sources.get_source(f"folder:{tmp_path}", "train")
  ev = list(pipelines.eval_batches(src, pipelines.eval_transform(image_size=32), host_batch=16))
  images, valid = ev[0]["image"], ev[0]["valid"].astype(bool)
  print(f"{src.num_examples} files: {int(valid.sum())} decoded, {int(ev[0]['skipped'][0])} skipped")
  assert int(ev[0]["skipped"].max()) == 3  # text.jpg, empty.png and truncated.jpg
  assert int(valid.sum()) == 7  # gray, gray_alpha, rgba, sixteen_bit, cmyk, progressive, whole
  with pytest.raises(tf.errors.InvalidArgumentError):
    tf.io.decode_image((cls / "truncated.jpg").read_bytes(), channels=3)
  (tmp_path / "val" / "things").mkdir(parents=True)  # a split whose folders hold no image at all
  with pytest.raises(FileNotFoundError, match=f"no images .* under {tmp_path / 'val'}"):
    sources.get_source(f"folder:{tmp_path}", "val")
  assert images.shape[1:] == (32, 32, 3) and images.dtype == np.float32
  assert np.isfinite(images[valid]).all()


def test_labels_out_of_range_are_an_error_naming_the_example(fmnist_train):
  """Fashion-MNIST declared with 5 classes: its labels 5-9 are refused on the host, naming the example."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  wrong = dataclasses.replace(fmnist_train, num_classes=5)
  t = pipelines.eval_transform(image_size=32)
  with pytest.raises(ValueError, match=r"label [5-9] of example \d+ in .* is outside \[0, 5\)"):
    next(pipelines.train_batches(wrong, t, host_batch=16, seed=0))
  with pytest.raises(ValueError, match=r"is outside \[0, 5\)"):
    next(pipelines.eval_batches(wrong, t, host_batch=16))
  assert next(pipelines.eval_batches(fmnist_train, t, host_batch=16))["label"].max() <= 9  # right: no error


def test_entry_points_yield_their_modes_keys_and_the_masks_of_pipelines(fmnist_train):
  """Each mode's entry point reads config.data (the Fashion-MNIST configs') and yields exactly KEYS[mode], shaped
  and typed for that mode's step; the masks are made in the pipeline: training's of (seed, index, epoch), the
  pre-training evaluation's MaskSpec.make(seed + 1, index, 0), padding rows' included, its "valid" float32."""
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  pre, ft, probe, tok = (configs.load(name).data for name in ("fmnist_pretrain", "fmnist_finetune",
                                                               "fmnist_linear_probe", "fmnist_tokenizer"))
  seg, seg_eval_scale = configs.load("fmnist_segmentation").data, configs.load("fmnist_segmentation").eval.scale
  masks = pipelines.mask_spec(pre, (7, 7))
  train = dict(host_batch=16, seed=3, start_step=5)
  batches = {  # mode -> its first batch and the shapes and dtypes of its keys
      "pretrain_train": (pipelines.pretrain_train(pre, fmnist_train, masks=masks, **train),
                         {"image": ((16, 28, 28, 3), np.float32), "tokenizer_image": ((16, 28, 28, 3), np.float32),
                          "mask": ((16, 7, 7), bool)}),
      "pretrain_eval": (pipelines.pretrain_eval(pre, "test[:40]", host_batch=16, seed=3, masks=masks),
                        {"image": ((16, 28, 28, 3), np.float32), "tokenizer_image": ((16, 28, 28, 3), np.float32),
                         "mask": ((16, 7, 7), bool), "valid": ((16,), np.float32)}),
      "classification_train": (pipelines.classification_train(ft, fmnist_train, **train),
                               {"image": ((16, 28, 28, 3), np.float32), "label": ((16,), np.int32)}),
      "linear_probe_train": (pipelines.linear_probe_train(probe, "train", **train),
                             {"image": ((16, 28, 28, 3), np.float32), "label": ((16,), np.int32)}),
      "classification_eval": (pipelines.classification_eval(ft, "test[:40]", host_batch=16),
                              {"image": ((16, 28, 28, 3), np.float32), "label": ((16,), np.int32),
                               "valid": ((16,), bool)}),
      "tokenizer_train": (pipelines.tokenizer_train(tok, fmnist_train, image_size=32, **train),
                          {"image": ((16, 32, 32, 3), np.float32)}),
      "tokenizer_eval": (pipelines.tokenizer_eval(tok, "test[:40]", image_size=32, host_batch=16),
                         {"image": ((16, 32, 32, 3), np.float32), "valid": ((16,), bool)}),
      "segmentation_train": (pipelines.segmentation_train(seg, "train", **train),
                             {"image": ((16, 64, 64, 3), np.float32), "annotation": ((16, 64, 64), np.uint8)}),
      "segmentation_eval": (pipelines.segmentation_eval(seg, "test[:10]", host_batch=4, scale=seg_eval_scale),
                            {"image": ((4, 64, 96, 3), np.float32), "annotation": ((4, 64, 96), np.uint8),
                             "size": ((4, 2), np.int32), "transposed": ((4,), bool), "valid": ((4,), bool)}),
  }
  assert set(batches) == set(pipelines.KEYS)
  for mode, (it, spec) in batches.items():
    b = next(it)
    assert tuple(b) == pipelines.KEYS[mode] == tuple(spec), mode
    for k, (shape, dtype) in spec.items():
      assert b[k].shape == shape and b[k].dtype == dtype, (mode, k, b[k].shape, b[k].dtype)
  assert 0.0 <= b["annotation"].min() and b["valid"].all()  # segmentation_eval: 10 canvases, 4 a batch

  # The masks against the example indices of the same batches (their order does not depend on the transform).
  ref = next(pipelines.train_batches(fmnist_train, pipelines.eval_transform(image_size=28), host_batch=16, seed=3,
                                     start_step=5))
  np.testing.assert_array_equal(next(pipelines.pretrain_train(pre, fmnist_train, masks=masks, **train))["mask"],
                                masks.make(3, ref["index"], int(ref["epoch"][0])))
  held_out = sources.get_source("fashion_mnist_files", "test[:40]")
  ref = list(pipelines.eval_batches(held_out, pipelines.plain_transform(image_size=28), host_batch=16))
  ev = list(pipelines.pretrain_eval(pre, held_out, host_batch=16, seed=3, masks=masks))
  assert len(ev) == len(ref) == 3 and sum(b["valid"].sum() for b in ev) == 40  # 8 padding rows in the last
  for b, r in zip(ev, ref):
    np.testing.assert_array_equal(b["mask"], masks.make(3 + 1, r["index"], 0))
    np.testing.assert_array_equal(b["valid"], r["valid"].astype(np.float32))


def _jpeg(array, **kw):
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  (array if isinstance(array, Image.Image) else Image.fromarray(array)).save(buf, "JPEG", **kw)
  return buf.getvalue()


def test_fused_decode_and_crop_gives_the_pixels_of_decode_then_crop():
  """decode_image with a box (JPEG: the box from the header, tf.image.decode_and_crop_jpeg of the box widened by
  2 columns a side) equals the full decode cropped to the same box, bitwise, for 4:2:0, 4:2:2, 4:4:4,
  progressive, grey and CMYK JPEGs of ImageNet's shapes and an odd one, at random boxes, the whole image and
  1-pixel corners (decode_and_crop_jpeg alone differed by up to 25/255 in a box's first and last columns of
  chroma-subsampled files). A truncated JPEG fails even where its box lies in the part that is there; one with
  bytes after its EOI decodes."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import skimage.data  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  photo = Image.fromarray(skimage.data.astronaut())
  for h, w in ((375, 500), (500, 375), (97, 131)):
    img = photo.resize((w, h))
    files = {"4:2:0": _jpeg(img, quality=90), "4:2:2": _jpeg(img, quality=90, subsampling=1),
             "4:4:4": _jpeg(img, quality=90, subsampling=0), "progressive": _jpeg(img, quality=90, progressive=True),
             "grey": _jpeg(img.convert("L"), quality=90), "cmyk": _jpeg(img.convert("CMYK"), quality=90)}
    for name, data in files.items():
      full = pipelines.decode_image(tf.constant(data), 3).numpy()
      assert full.shape == (h, w, 3)
      boxes = [(0, 0, h, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1), (0, w - 1, h, 1)]
      for _ in range(12):
        bh, bw = rng.integers(1, h + 1), rng.integers(1, w + 1)
        boxes.append((rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1), bh, bw))
      for top, left, bh, bw in boxes:
        box = tuple(tf.constant(int(v), tf.int32) for v in (top, left, bh, bw))
        got = pipelines.decode_image(tf.constant(data), 3, box=lambda hh, ww, box=box: box).numpy()
        np.testing.assert_array_equal(got, full[top:top + bh, left:left + bw], err_msg=f"{name} {h}x{w} {box}")
  data = _jpeg(np.asarray(photo.resize((200, 150))), quality=90)
  top_box = lambda hh, ww: (tf.constant(0), tf.constant(0), tf.constant(8), tf.constant(8))
  with pytest.raises(tf.errors.InvalidArgumentError):
    pipelines.decode_image(tf.constant(data[:len(data) * 3 // 4]), 3, box=top_box)
  trailing = pipelines.decode_image(tf.constant(data + b"\0" * 100), 3, box=top_box).numpy()
  np.testing.assert_array_equal(trailing, pipelines.decode_image(tf.constant(data), 3).numpy()[:8, :8])


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
  """20 JPEGs (quality 90, 4:2:0, 60-140 px, both orientations) and 4 PNGs of skimage photos, in 2 classes."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("jpegs")
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  rng = np.random.default_rng(1)
  for i in range(24):
    d = root / "train" / f"c{i % 2}"
    d.mkdir(parents=True, exist_ok=True)
    y, x = rng.integers(0, 150, 2)
    h, w = rng.integers(60, 140, 2)
    crop = photos[i % 3][y:y + h, x:x + w]
    if i % 6 == 5:
      (d / f"{i:02d}.png").write_bytes(tf.io.encode_png(crop).numpy())
    else:
      (d / f"{i:02d}.jpg").write_bytes(_jpeg(crop, quality=90))
  return root


def test_cropped_transforms_are_pure_functions_and_fused_decode_changes_nothing(jpeg_folder):
  """Pre-training, fine-tuning and tokenizer batches from JPEGs (fused decode-and-crop) and PNGs (decode, then
  crop): every row bitwise equal to the transform applied to the fully decoded image (Cropped called as a
  function), and bitwise the same at any batch size and host split: a pure function of (seed, epoch, index)."""
  src = sources.get_source(f"folder:{jpeg_folder}", "train")
  transforms = {"pretrain": pipelines.pretrain_transform(seed=2, image_size=32, tokenizer_size=16),
                "finetune": pipelines.finetune_transform(seed=2, image_size=32),
                "tokenizer": pipelines.tokenizer_transform(seed=2, image_size=32)}
  paths = [src.describe(i) for i in range(src.num_examples)]
  for name, t in transforms.items():
    assert isinstance(t, pipelines.Cropped)
    batches = take(pipelines.train_batches(src, t, host_batch=8, seed=2, start_step=3), 3)  # epoch 1
    halves = [take(pipelines.train_batches(src, t, host_batch=4, seed=2, start_step=3, shard=pipelines.Shard(h, 2)),
                   3) for h in range(2)]
    rows = {}
    for b in batches + [b for half in halves for b in half]:
      for r, i in enumerate(b["index"]):
        e = int(b["epoch"][r])
        if (i, e) in rows:
          for k in ("image", "tokenizer_image"):
            if k in b:
              np.testing.assert_array_equal(b[k][r], rows[i, e][k], err_msg=f"{name} example {i} {k}")
          continue
        rows[i, e] = {k: b[k][r] for k in ("image", "tokenizer_image") if k in b}
        whole = augment.to_float(pipelines.decode_image(tf.io.read_file(paths[i]), 3))
        want = t({"image": whole, "index": tf.constant(i, tf.int64), "label": tf.constant(0)},
                 tf.constant(e, tf.int64))
        for k in rows[i, e]:
          np.testing.assert_array_equal(rows[i, e][k], want[k].numpy(), err_msg=f"{name} example {i} {k}")
    assert len(rows) == 24  # epoch 1's 3 steps of 8: every example, each seen by both host splits


def test_jitter_and_flip_on_the_views_keep_the_statistics_of_the_original_order():
  """Pre-training's colour jitter and flip run on each resized view (pretrain_transform's docstring); unilm runs
  them on the whole image before the crop. Over 300 views of 3 photos, the model view's per-channel mean and standard deviation
  and its mean absolute difference from the unjittered crop agree within 0.01 (values in [0, 1]) with the
  original order's, drawn from the same seeds."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  photos = [tf.image.convert_image_dtype(p[:256, :256], tf.float32)
            for p in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())]
  t = pipelines.pretrain_transform(seed=0, image_size=32, tokenizer_size=16, mean_std=((0, 0, 0), (1, 1, 1)))

  @tf.function
  def views(image, index):
    s = augment.split(augment.example_seed(0, 0, index), 3)
    new = t({"image": image, "index": index}, tf.constant(0, tf.int64))["image"]
    box = augment.random_resized_crop_box(s[2], tf.shape(image)[0], tf.shape(image)[1])
    old = augment.crop_resize(augment.random_flip(augment.color_jitter(image, s[0], 0.4), s[1]), box, 32)
    plain = augment.crop_resize(image, box, 32)
    return new, old, plain

  new, old, plain = (np.stack(v) for v in zip(*[
      [x.numpy() for x in views(photos[i % 3], tf.constant(i, tf.int64))] for i in range(300)]))
  stats = lambda v: np.concatenate([v.mean((0, 1, 2)), v.std((0, 1, 2)), [np.abs(v - plain).mean()]])
  print("new order:", stats(new).round(4), "original order:", stats(old).round(4))
  np.testing.assert_allclose(stats(new), stats(old), atol=0.01)


@pytest.mark.parametrize("jitter", [0.0, 0.4])
def test_beit_b_step_inputs_differ_from_the_original_order_only_by_the_reorder(jitter):
  """The inputs a BEiT-B pre-training step gets (224 px bicubic model view normalised, 112 px lanczos tokenizer view;
  uint8 from the host, through device.pretrain_inputs) against unilm's order of the same draws on 500x375 and
  375x500 photos: jitter and flip the whole image, then crop the box (mirrored when flipped: the same content) and
  resize; float32 all the way. Without colour jitter the reorder is exact: only the host's uint8 rounding remains
  (<= 0.5 / 255 in [0, 1], 1 / 255 normalised). With BEiT's jitter (0.4) the pixels differ only where the reorder
  implies: the contrast's mean grey (the view's, not the image's), and the clipping of the jitter's overshoot
  (after the resize, not before): mean |difference| <= 0.01, p99 <= 0.06 in [0, 1] (printed; 2026-12-02, model
  view: mean 0.0057, p99 0.036, max 0.18; with the jitter on the crop instead, as at f3147d9: mean 0.0055, p99
  0.036, max 0.044: moving it to the views changes only the few saturating edge pixels)."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  photos = [tf.image.convert_image_dtype(tf.image.resize(p, size, antialias=True) / 255.0, tf.float32)
            for p in (skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee())
            for size in ((375, 500), (500, 375))]
  t = pipelines.pretrain_transform(seed=0, image_size=224, tokenizer_size=112, color_jitter=jitter, uint8=True)

  @tf.function
  def both(image, index):
    new = t({"image": image, "index": index}, tf.constant(0, tf.int64))
    s = augment.split(augment.example_seed(0, 0, index), 3)
    top, left, h, w = augment.random_resized_crop_box(s[2], tf.shape(image)[0], tf.shape(image)[1])
    whole = augment.color_jitter(image, s[0], jitter) if jitter else image
    flipped = augment.random_flip(whole, s[1])
    left = tf.where(tf.reduce_all(flipped == whole), left, tf.shape(image)[1] - left - w)  # the mirrored box
    box = (top, left, h, w)
    return (new["image"], new["tokenizer_image"], augment.crop_resize(flipped, box, 224, "bicubic"),
            augment.crop_resize(flipped, box, 112, "lanczos3"))

  inputs = jax.jit(lambda b: device.pretrain_inputs(b, pipelines.INCEPTION))
  diffs = {"image": [], "tokenizer_image": []}
  for i in range(24):
    u8, u8_tok, old, old_tok = (x.numpy() for x in both(photos[i % 6], tf.constant(i, tf.int64)))
    got = inputs({"image": u8[None], "tokenizer_image": u8_tok[None]})
    diffs["image"].append(np.abs(np.asarray(got["image"][0]) - (old - 0.5) / 0.5) * 0.5)  # in [0, 1] units
    diffs["tokenizer_image"].append(np.abs(np.asarray(got["tokenizer_image"][0]) - old_tok))
  for k, d in diffs.items():
    d = np.stack(d)
    print(f"jitter {jitter} {k}: mean |diff| {d.mean():.4f}, p99 {np.quantile(d, 0.99):.4f}, max {d.max():.4f}")
    if jitter:
      assert d.mean() <= 0.01 and np.quantile(d, 0.99) <= 0.06
    else:
      assert d.max() <= 0.5 / 255 + 1e-5


@pytest.fixture(scope="module")
def imagenet_jpegs(tmp_path_factory):
  """9 JPEGs of skimage photos in ImageNet's common sizes (500x375 and 375x500, quality 90), one class."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("imagenet_shaped")
  for i, photo in enumerate([skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()] * 3):
    (root / "train" / "c").mkdir(parents=True, exist_ok=True)
    size = (500, 375) if i % 2 else (375, 500)
    (root / "train" / "c" / f"{i}.jpg").write_bytes(_jpeg(np.asarray(
        tf.cast(tf.image.resize(photo, size, antialias=True), tf.uint8)), quality=90))
  return root


def test_uint8_batches_normalised_on_device_equal_the_float_path(imagenet_jpegs):
  """Pre-training batches with uint8=True (views rounded to uint8, not normalised) through
  device.pretrain_inputs inside jit: the model view within 0.5 / 255 / std (= 1 / 255 with BEiT's std of 0.5) of
  the float pipeline's, the tokenizer view within 0.5 / 255. With tokenizer_view="device" the tokenizer view is
  resized on the device from the 224 px model view (jittered) instead of from the crop (then jittered): the
  jitter's clipping comes before the device's resize and after the host's, which shows where a brightened edge
  saturates: mean |difference| <= 0.003, p99 <= 0.03, max <= 0.25 of the host's (in [0, 1]; printed; 2026-12-02:
  mean 0.0013, p99 0.018, max 0.19; without jitter, before it moved to the views: mean 0.0007, p99 0.0038, max
  0.039) on 500x375 and 375x500 JPEGs at 224 -> 112 px. device.resize_view
  is TensorFlow's antialiased resize (within 1e-5 on the same input). Masks and every other key are the same."""
  src = sources.get_source(f"folder:{imagenet_jpegs}", "train")
  mean_std = pipelines.INCEPTION
  make = lambda **kw: take(pipelines.train_batches(
      src, pipelines.pretrain_transform(seed=3, image_size=224, tokenizer_size=112, **kw), host_batch=4, seed=3,
      masks=MASKS), 4)
  floats, u8, u8_device = make(), make(uint8=True), make(uint8=True, tokenizer_view="device")
  inputs = jax.jit(lambda b: device.pretrain_inputs(b, mean_std, 112))
  diffs = []
  for f, u, d in zip(floats, u8, u8_device):
    assert u["image"].dtype == np.uint8 and u["tokenizer_image"].dtype == np.uint8 and "tokenizer_image" not in d
    np.testing.assert_array_equal(u["image"], d["image"])
    for k in ("mask", "index", "label"):
      np.testing.assert_array_equal(f[k], u[k])
    got = inputs({"image": u["image"], "tokenizer_image": u["tokenizer_image"]})
    np.testing.assert_allclose(got["image"], f["image"], rtol=0, atol=0.5 / 255 / 0.5 + 1e-6)
    np.testing.assert_allclose(got["tokenizer_image"], f["tokenizer_image"], rtol=0, atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(np.asarray(got["image"]) * 0.5 + 0.5, u["image"] / 255, rtol=0, atol=1e-6)
    dev = np.asarray(inputs({"image": d["image"]})["tokenizer_image"])
    assert dev.shape == f["tokenizer_image"].shape
    diffs.append(np.abs(dev - f["tokenizer_image"]))
    same = inputs({"image": u["image"], "tokenizer_image": u["tokenizer_image"]})
    np.testing.assert_array_equal(same["image"], inputs({"image": u["image"]})["image"])
  diffs = np.stack(diffs)
  print(f"tokenizer view resized on device from the 224 px view vs the host's from the crop: mean |diff| "
        f"{diffs.mean():.4f}, p99 {np.quantile(diffs, 0.99):.4f}, max {diffs.max():.4f}")
  assert diffs.mean() <= 0.003 and np.quantile(diffs, 0.99) <= 0.03 and diffs.max() <= 0.25
  # device.resize_view is the host's resampling: the same input gives the same view.
  view = floats[0]["tokenizer_image"]
  host = tf.clip_by_value(tf.image.resize(view, (56, 56), method="lanczos3", antialias=True), 0.0, 1.0).numpy()
  np.testing.assert_allclose(np.asarray(device.resize_view(jax.numpy.asarray(view), 56)), host, rtol=0, atol=1e-5)
  assert device.pretrain_inputs(floats[0], mean_std) is floats[0]  # float batches pass unchanged
  with pytest.raises(ValueError, match="needs uint8=True"):
    pipelines.pretrain_transform(seed=0, tokenizer_view="device")


def test_crops_resized_on_device_equal_the_host_views(imagenet_jpegs):
  """data.resize="device": the host sends each crop as it decoded (uint8, padded into the 512 px canvas), its size
  and the jitter and flip draws; device.pretrain_inputs, inside jit, makes both views from them. They are the
  float pipeline's views (the same crop, resampling, jitter and flip, on the host) within 1e-4 in [0, 1]
  (printed; 2026-12-03: max 3.6e-5), masks and every other key the same, and the rows are a pure function of
  (seed, epoch, index): the same at another host batch. With a canvas smaller than the crops (256 px) the host
  shrinks each to fit first (two resamplings, and a rounding to uint8 between them): mean |difference| <= 0.01,
  max <= 0.25 (printed; 2026-12-03: mean 0.0019, max 0.14, at edges). Bad settings are refused by name."""
  src = sources.get_source(f"folder:{imagenet_jpegs}", "train")
  mean_std = pipelines.INCEPTION  # std 0.5: a model view's difference is twice the difference in [0, 1]
  make = lambda steps=3, host_batch=4, **kw: take(pipelines.train_batches(
      src, pipelines.pretrain_transform(seed=3, image_size=224, tokenizer_size=112, **kw), host_batch=host_batch,
      seed=3, masks=MASKS), steps)
  inputs = jax.jit(lambda b: device.pretrain_inputs(b, mean_std, 112, "lanczos3", 224))

  def diffs(floats, crops):
    out = {"image": [], "tokenizer_image": []}
    for f, c in zip(floats, crops):
      assert "image" not in c and c["crop"].dtype == np.uint8 and c["crop_size"].dtype == np.int32
      for k in ("mask", "index", "label"):
        np.testing.assert_array_equal(f[k], c[k])
      got = inputs({k: c[k] for k in (*device.CROP_KEYS, "mask")})
      np.testing.assert_array_equal(got["mask"], f["mask"])
      out["image"].append(np.abs(np.asarray(got["image"]) - f["image"]) * 0.5)
      out["tokenizer_image"].append(np.abs(np.asarray(got["tokenizer_image"]) - f["tokenizer_image"]))
    return {k: np.stack(v) for k, v in out.items()}

  floats, crops = make(), make(uint8=True, resize="device")
  assert crops[0]["crop"].shape == (4, 512, 512, 3) and (crops[0]["crop_size"] <= 500).all()
  d = diffs(floats, crops)
  print("views made on the device from the crop vs the host's float views: max |diff| "
        + ", ".join(f"{k} {v.max():.1e}" for k, v in d.items()))
  assert max(v.max() for v in d.values()) <= 1e-4
  for c, half in zip(crops[:1], [make(steps=2, host_batch=2, uint8=True, resize="device")]):
    for k in device.CROP_KEYS:
      np.testing.assert_array_equal(c[k], np.concatenate([h[k] for h in half]), err_msg=k)

  small = make(uint8=True, resize="device", canvas=256)
  assert small[0]["crop"].shape[1:] == (256, 256, 3) and small[0]["crop_size"].max() == 256
  d = diffs(floats, small)
  print("crops shrunk to a 256 px canvas first: " + ", ".join(
      f"{k} mean {v.mean():.4f} max {v.max():.3f}" for k, v in d.items()))
  assert max(v.mean() for v in d.values()) <= 0.01 and max(v.max() for v in d.values()) <= 0.25
  for bad, match in [(dict(resize="device"), "needs data.uint8=True"),
                     (dict(resize="devices", uint8=True), "data.resize='devices'"),
                     (dict(resize="device", uint8=True, tokenizer_view="device"), "leave it 'host'"),
                     (dict(resize="device", uint8=True, canvas=200), "data.crop_canvas=200")]:
    with pytest.raises(ValueError, match=match):
      pipelines.pretrain_transform(seed=0, **bad)


def test_pretrain_entry_points_read_uint8_and_tokenizer_view(fmnist_train):
  """data.uint8 and data.tokenizer_view (optional keys): uint8 views, and no tokenizer view from the host."""
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  data = configs.load("fmnist_pretrain").data
  masks = pipelines.mask_spec(data, (7, 7))
  with data.unlocked() if hasattr(data, "unlocked") else contextlib.nullcontext():
    data.uint8, data.tokenizer_view = True, "device"
  b = next(pipelines.pretrain_train(data, fmnist_train, host_batch=8, seed=0, masks=masks))
  assert tuple(b) == ("image", "mask") and b["image"].dtype == np.uint8
  b = next(pipelines.pretrain_eval(data, "test[:8]", host_batch=8, seed=0, masks=masks))
  assert tuple(b) == ("image", "mask", "valid") and b["image"].dtype == np.uint8


def test_uint8_finetune_batches_normalised_and_erased_on_device_equal_the_float_path(jpeg_folder):
  """Fine-tuning batches with uint8=True (crop, flip, RandAugment on the host, rounded to uint8; random erasing
  as its rectangle) through device.classification_inputs inside jit: outside the erased rectangle, the float
  pipeline's pixels within 0.5 / 255 / std; the rectangle is exactly where the float path wrote its noise (the
  float image with erasing vs without), and holds N(0, 1) noise of the device's draw (mean and std within 0.1
  over every erased pixel). Labels, indices, and the float batches of erase_prob 0 are unchanged."""
  src = sources.get_source(f"folder:{jpeg_folder}", "train")
  make = lambda **kw: take(pipelines.train_batches(
      src, pipelines.finetune_transform(seed=5, image_size=64, rand_augment=(2, 9.0, 0.5), **kw), host_batch=8,
      seed=5), 3)
  erased, plain, u8 = make(erase_prob=1.0), make(erase_prob=0.0), make(erase_prob=1.0, uint8=True)
  inputs = jax.jit(lambda b, key: device.classification_inputs(b, key, pipelines.INCEPTION))
  noise = []
  for step, (f, p, u) in enumerate(zip(erased, plain, u8)):
    assert u["image"].dtype == np.uint8 and u["erase"].shape == (8, 4) and u["erase"].dtype == np.int32
    for k in ("label", "index"):
      np.testing.assert_array_equal(f[k], u[k])
    got = np.asarray(inputs({"image": u["image"], "erase": u["erase"]}, jax.random.key(step))["image"])
    box = np.stack([augment.box_mask(64, 64, b).numpy() for b in u["erase"]])  # [B, 64, 64]
    assert box.any(axis=(1, 2)).sum() >= 6, u["erase"]  # prob 1: erased unless no try of ten fits
    np.testing.assert_array_equal(box, np.any(f["image"] != p["image"], axis=-1))
    np.testing.assert_allclose(got[~box], f["image"][~box], rtol=0, atol=0.5 / 255 / 0.5 + 1e-6)
    noise.append(got[box].ravel())
  noise = np.concatenate(noise)
  print(f"erased pixels on device: {noise.size}, mean {noise.mean():.3f}, std {noise.std():.3f}")
  assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
  f = next(iter(plain))
  assert device.classification_inputs(f, None, pipelines.INCEPTION) is f  # float batches pass unchanged
  with pytest.raises(ValueError, match="pass a key"):
    device.classification_inputs(u8[0], None, pipelines.INCEPTION)


def test_tf_data_options_from_the_config():
  """config.data.threads and config.data.ram_budget_mb (optional) reach tf.data; order stays deterministic."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  options = pipelines._options(**pipelines._tf_data(ml_collections.ConfigDict({"threads": 3, "ram_budget_mb": 512})))
  assert options.threading.private_threadpool_size == 3 and options.autotune.ram_budget == 512 * 2 ** 20
  assert options.deterministic and options.autotune.enabled
  assert pipelines._options().autotune.ram_budget in (None, 0)  # tf.data's default: half the host's memory
