"""UperNet on a BEiT backbone (issue 11): shapes, BEiT's feature taps, the data, and the segmentation trainer
learning composited Fashion-MNIST; resume, save/load and the evaluation mode.

The data come from the `fmnist_composite` source: a Fashion-MNIST item enlarged to 56 px at a random place on a
black canvas (64 x 64 to train, 64 x 96 to test), its pixels brighter than 0.2 labelled with its class + 1, the
background 0, label boundaries 255 (ignored, as ADE20K's boundary pixels are). A first try with two 28 px items per
canvas learned the background (IoU 95%) but not the garments (2.3%) in 300 steps: at 8 px patches a 28 px item is
too few tokens for a model from scratch."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from flax import nnx

from beit_jax import model_files, models
from beit_jax.data import pipelines, sources
from beit_jax.models import segmentation
from beit_jax.train import optim, seg_eval
from beit_jax.train import segmentation as seg_train

NUM_CLASSES = 11  # background + 10 garments


def make(seed=0):
  backbone = models.create_model("beit_test_small", seed=seed)  # 64 px, 8 px patches (8x8 grid), width 64, depth 4
  return segmentation.UperNet(backbone, segmentation.SegConfig(num_classes=NUM_CLASSES, aux_channels=32),
                              rngs=nnx.Rngs(seed))


def seg_config(**kw):
  from configs import fmnist_segmentation  # pylint: disable=import-outside-toplevel
  c = fmnist_segmentation.get_config()
  c.mesh = {"data": 8}
  c.eval_split = "test[:256]"
  for k, v in kw.items():
    c[k] = v
  return c


def test_shapes_and_feature_taps():
  model = make()
  assert model.cfg.out_indices == (0, 1, 2, 3)  # depth 4: blocks 1/4, 1/2, 3/4, 4/4 (B: 3/5/7/11)
  assert segmentation.OUT_INDICES[12] == (3, 5, 7, 11) and segmentation.OUT_INDICES[24] == (7, 11, 15, 23)
  x = jnp.zeros((2, 64, 64, 3))
  levels = model.adapter(model.features(x))
  assert [lvl.shape[1] for lvl in levels] == [32, 16, 8, 4]  # 4x, 2x, 1x, 1/2x of the 8x8 grid
  logits, aux = model(x)
  assert logits.shape == (2, 32, 32, NUM_CLASSES) and logits.dtype == aux.dtype == jnp.float32  # 4x the grid
  assert aux.shape == (2, 8, 8, NUM_CLASSES)  # the auxiliary head's 1x level, resized only in the loss
  # PyTorch's adaptive average pool on uneven bins (7 -> 3: [0:3], [2:5], [4:7]).
  v = jnp.arange(7.0).reshape(1, 7, 1, 1) * jnp.ones((1, 1, 7, 1))
  np.testing.assert_allclose(segmentation.adaptive_avg_pool(v, 3)[0, :, 0, 0], [1.0, 3.0, 5.0])
  with pytest.raises(ValueError, match="no head"):
    segmentation.UperNet(models.create_model("beit_test_small", num_classes=3), segmentation.SegConfig(),
                         rngs=nnx.Rngs(0))


def test_composited_fashion_mnist_source():
  src = sources.get_seg_source("fmnist_composite", "test[:16]")
  assert src.num_classes == NUM_CLASSES and src.num_examples == 16
  first = list(src.read().as_numpy_iterator())
  again = list(src.read().as_numpy_iterator())
  x = np.stack([ex["image"][..., 0] for ex in first]) / 255
  y = np.stack([ex["annotation"] for ex in first])
  assert x.shape == (16, 64, 96) and y.dtype == np.uint8
  assert set(np.unique(y)) <= set(range(NUM_CLASSES)) | {255}
  assert ((y > 0) & (y < 255)).mean() > 0.1 and (y == 0).mean() > 0.2  # garments and background both present
  assert (x[y == 0] <= 0.2).all() and (x[(y > 0) & (y < 255)] > 0.2).all()  # labels follow the pixels
  assert all((a["annotation"] == b["annotation"]).all() for a, b in zip(first, again))  # a function of the index
  tops = [np.argmax(ex["annotation"].any(1)) for ex in first]
  assert len(set(tops)) > 3  # placed at different heights


def test_train_transform_keeps_image_and_annotation_aligned():
  """The joint augmentation (rescale, crop, flip) moves pixels and labels together: wherever a pixel is labelled
  background it is dark, wherever it is labelled a garment it is bright (the photometric distortion off: it
  changes only the image's values)."""
  src = sources.get_seg_source("fmnist_composite", "train[:64]")
  transform = pipelines.seg_train_transform(seed=0, crop_size=48, scale=(64, 64), ratio_range=(0.5, 2.0),
                                            photometric=False, mean_std=((0, 0, 0), (1, 1, 1)))
  b = next(pipelines.train_batches(src, transform, host_batch=64, seed=0))
  x, y = b["image"][..., 0], b["annotation"]
  assert x.shape == (64, 48, 48) and y.shape == (64, 48, 48)
  inner = np.zeros_like(y, bool)  # away from label edges, where resampling blends the two sides
  inner[:, 1:-1, 1:-1] = ((y[:, 1:-1, 1:-1] == y[:, :-2, 1:-1]) & (y[:, 1:-1, 1:-1] == y[:, 2:, 1:-1])
                          & (y[:, 1:-1, 1:-1] == y[:, 1:-1, :-2]) & (y[:, 1:-1, 1:-1] == y[:, 1:-1, 2:]))
  assert x[inner & (y == 0)].max() < 0.25 and x[inner & (y > 0) & (y < 255)].min() > 0.15
  assert (y == 255).mean() > 0.01  # boundaries, and padding where a rescale came out smaller than the crop
  flipped = pipelines.seg_train_transform(seed=1, crop_size=48, scale=(64, 64), ratio_range=(1.0, 1.0),
                                          photometric=True)
  b2 = next(pipelines.train_batches(src, flipped, host_batch=64, seed=1))
  assert np.isfinite(b2["image"]).all() and b2["image"].min() >= -1.0 and b2["image"].max() <= 1.0


class TinySegmentation(tfds.core.GeneratorBasedBuilder):
  """A real tfds dataset with the feature names of tfds's segmentation sets (oxford_iiit_pet's
  "segmentation_mask"), written by tfds into the test's folder."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "segmentation_mask": tfds.features.Image(shape=(None, None, 1))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(6):
      h, w = 40 + 8 * i, 90 - 6 * i  # both orientations
      yield i, {"image": rng.integers(0, 256, (h, w, 3), np.uint8),
                "segmentation_mask": rng.integers(0, 4, (h, w, 1), np.uint8)}


def _ade20k_folder(root, n=3):
  """ADEChallengeData2016's layout with skimage's photos and random annotations (0 = "other")."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from skimage import data  # pylint: disable=import-outside-toplevel
  photos = [data.astronaut(), data.coffee(), data.chelsea()]
  rng = np.random.default_rng(0)
  anns = []
  for kind in ("images", "annotations"):
    (root / kind / "validation").mkdir(parents=True)
  for i in range(n):
    photo = np.asarray(Image.fromarray(photos[i]).resize((photos[i].shape[1] // 4, photos[i].shape[0] // 4)))
    ann = rng.integers(0, 151, photo.shape[:2], np.uint8)
    Image.fromarray(photo).save(root / "images" / "validation" / f"ADE_val_{i:08d}.jpg")
    Image.fromarray(ann).save(root / "annotations" / "validation" / f"ADE_val_{i:08d}.png")
    anns.append(ann)
  return anns


def test_ade20k_folder_and_tfds_sources(tmp_path):
  """The ADE20K folder source reads mmseg's layout with reduce_zero_label (0 -> 255, k -> k - 1); a prepared tfds
  segmentation dataset reads through tfds; both go through the evaluation transform onto the fixed canvas, a
  portrait image lying transposed."""
  anns = _ade20k_folder(tmp_path / "ADEChallengeData2016")
  src = sources.get_seg_source(f"ade20k:{tmp_path / 'ADEChallengeData2016'}", "validation")
  assert src.num_classes == 150 and src.num_examples == 3 and src.reduce_zero_label
  got = [ex["annotation"] for ex in
         pipelines.decode_stage(src.read(), True, reduce_zero_label=True).as_numpy_iterator()]
  for want, have in zip(anns, got):
    np.testing.assert_array_equal(have, np.where(want == 0, 255, want.astype(np.int32) - 1))
  transform = pipelines.seg_eval_transform(crop_size=64, scale=(256, 64))
  b = next(pipelines.eval_batches(src, transform, host_batch=4))
  assert b["image"].shape == (4, 64, 256, 3) and b["valid"].tolist() == [True] * 3 + [False]
  assert (b["size"][:3, 0] == 64).all() and (b["annotation"][:3] < 150).any() and (b["annotation"][0, :, 250:] == 255).all()

  TinySegmentation(data_dir=str(tmp_path / "tfds")).download_and_prepare()
  src = sources.get_seg_source("tfds:tiny_segmentation", "train", data_dir=str(tmp_path / "tfds"), num_classes=4)
  assert src.num_examples == 6 and src.encoded
  batches = list(pipelines.eval_batches(src, pipelines.seg_eval_transform(crop_size=32, scale=(64, 32)),
                                        host_batch=6))
  b = batches[0]
  assert b["image"].shape == (6, 32, 64, 3) and set(np.unique(b["annotation"])) <= {0, 1, 2, 3, 255}
  assert b["transposed"].any() and not b["transposed"].all()  # 40 x 90 lies as is; 70 x 60 is stored transposed
  with pytest.raises(ValueError, match="data.num_classes"):
    sources.get_seg_source("tfds:tiny_segmentation", "train", data_dir=str(tmp_path / "tfds"))


def test_layer_decay_numbers_the_backbone_and_puts_heads_at_full_rate():
  params = nnx.state(make(), nnx.Param)
  flat = {tuple(str(k) for k in path): float(v.get_value() if hasattr(v, "get_value") else v)
          for path, v in nnx.to_flat_state(nnx.State(optim.layer_decay_scales(params, depth=4, decay=0.5)))}
  by_top = {}
  for path, scale in flat.items():
    key = path[1] if path[0] == "backbone" and path[1] != "blocks" else "/".join(path[:3])
    by_top.setdefault(key if path[0] == "backbone" else path[0], set()).add(scale)
  assert by_top["patch_kernel"] == {0.5 ** 5} and by_top["backbone/blocks/0"] == {0.5 ** 4}
  assert by_top["backbone/blocks/3"] == {0.5 ** 1}
  assert by_top["adapter"] == by_top["head"] == by_top["aux"] == {1.0}  # unilm: depth + 1 -> decay ** 0


def test_poly_schedule_is_mmcvs():
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict({"lr": 7e-4, "min_lr": 0.0, "warmup_steps": 1500, "schedule": "poly",
                                   "power": 1.0})
  lr = optim.schedule(cfg, 160_000)

  def mmcv(step):  # mmcv PolyLrUpdaterHook + linear warm-up (warmup_ratio 1e-6), by hand
    regular = 7e-4 * (1 - step / 160_000) ** 1.0
    return regular * (1 - (1 - step / 1500) * (1 - 1e-6)) if step < 1500 else regular
  for step in (0, 1, 750, 1499, 1500, 80_000, 159_999, 160_000):
    assert float(lr(step)) == pytest.approx(mmcv(step), rel=1e-5, abs=1e-6 * 7e-4), step  # f32 steps


def test_segmentation_trainer_learns_and_eval_mode_agrees(tmp_path):
  """A randomly initialised beit_test_small + UperNet trained by the segmentation loop (300 steps of 16, ~3 min on
  2 cores): the held-out mIoU (sliding windows over 64 x 96 canvases) is several times the all-background
  segmenter's (measured: 24.8% vs 7.2%; garments 17.4%), the garments are not just background, and the saved model evaluated by
  `mode=seg_eval` gives the same confusion matrix."""
  out = seg_train.train_and_evaluate(seg_config(), tmp_path / "seg")
  m = out["metrics"]
  anns = np.stack([ex["annotation"] for ex in sources.get_seg_source("fmnist_composite", "test[:256]")
                   .read().as_numpy_iterator()])
  bg = seg_eval.mean_iou(np.asarray(seg_eval.confusion_matrix(np.zeros_like(anns), anns, NUM_CLASSES, anns != 255)))
  iou = seg_eval.iou_per_class(out["confusion"])
  print(f"300 steps x 16: train loss {m['loss']:.3f}; held-out mIoU {100 * m['eval_miou']:.1f}% (all-background "
        f"{100 * bg:.1f}%), background IoU {100 * iou[0]:.1f}%, garments {100 * np.nanmean(iou[1:]):.1f}%, "
        f"pixel accuracy {100 * m['eval_pixel_acc']:.1f}%, {m['eval_pixels']:.0f} pixels")
  assert m["eval_pixels"] == (anns != 255).sum()  # every labelled pixel of the 256 canvases once, padding none
  assert m["eval_miou"] > 2.5 * bg and np.nanmean(iou[1:]) > 0.12
  # the saved model, through the evaluation mode: the same figures
  c = seg_config(mode="seg_eval", init=f"checkpoint:{tmp_path / 'seg' / 'model'}")
  again = seg_train.evaluate_checkpoint(c, tmp_path / "eval")
  np.testing.assert_array_equal(again["confusion"], out["confusion"])
  with pytest.raises(ValueError, match="holds no segmentation model"):
    model_files.save_model(tmp_path / "backbone", models.create_model("beit_test_small"))
    seg_train.evaluate_checkpoint(seg_config(mode="seg_eval", init=f"checkpoint:{tmp_path / 'backbone'}"),
                                  tmp_path / "eval2")


def test_backbone_from_a_checkpoint_at_another_resolution(tmp_path):
  """`config.init` names the backbone: its weights are loaded (relative position tables resized from its 64 px to
  the 96 px crops), the MIM head dropped, the adapter and heads freshly initialised."""
  saved = models.create_model("beit_test_small", seed=3, use_shared_rel_pos_bias=True, use_rel_pos_bias=False,
                              use_mask_token=True, vocab_size=32)  # a pre-training layout
  model_files.save_model(tmp_path / "pt", saved)
  c = seg_config(init=f"checkpoint:{tmp_path / 'pt'}")
  c.model.overrides = {"img_size": 96}
  c.data.image_size = c.data.crop_size = 96
  bcfg, seg_cfg = seg_train.model_configs(c, NUM_CLASSES)
  model = seg_train.init_model(c, bcfg, seg_cfg)
  assert model.backbone.config.img_size == 96 and model.backbone.config.vocab_size == 0
  np.testing.assert_array_equal(model.backbone.blocks[2].attn.qkv[...], saved.blocks[2].attn.qkv[...])
  table = model.backbone.blocks[0].attn.rel_pos.table[...]
  assert table.shape[0] == (2 * 12 - 1) ** 2 + 3 and saved.rel_pos.table[...].shape[0] == (2 * 8 - 1) ** 2 + 3
  logits, _ = model(jnp.zeros((1, 96, 96, 3)))
  assert logits.shape == (1, 48, 48, NUM_CLASSES)


def test_segmentation_resume_is_bitwise_equal(tmp_path, caplog):
  """A run that lost everything after its step-3 checkpoint resumes there (parameters, BatchNorm statistics,
  optimizer, data order and augmentation) and ends bitwise equal to an uninterrupted one."""
  kw = dict(total_steps=6, ckpt_every=3, log_every=3, eval_split="",
            optim=dict(seg_config().optim, warmup_steps=2))
  ref = seg_train.train_and_evaluate(seg_config(**kw), tmp_path / "ref")
  seg_train.train_and_evaluate(seg_config(**kw), tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")
  shutil.rmtree(tmp_path / "cut" / "model")
  with caplog.at_level("INFO"):
    resumed = seg_train.train_and_evaluate(seg_config(**kw), tmp_path / "cut")
  assert "at step 3" in caplog.text  # it resumed, rather than ran again from the start
  leaves = lambda out: jax.tree.leaves(jax.device_get(nnx.state(out["model"], nnx.Any(nnx.Param, nnx.BatchStat))))
  ref_leaves, res_leaves = leaves(ref), leaves(resumed)
  assert len(ref_leaves) == len(res_leaves) > 50
  for a, b in zip(ref_leaves, res_leaves):
    np.testing.assert_array_equal(a, b)
  stats = jax.device_get(nnx.state(ref["model"], nnx.BatchStat))
  assert any(np.abs(v).max() > 0 for v in jax.tree.leaves(stats) if v.size)  # BatchNorm statistics moved


def test_bad_segmentation_input_is_named(tmp_path):
  with pytest.raises(ValueError, match="crop_size=48"):
    seg_train.check_config(seg_config(data=dict(seg_config().data, crop_size=48)))
  with pytest.raises(ValueError, match="eval.stride=80"):
    seg_train.check_config(seg_config(eval=dict(seg_config().eval, stride=80)))
  with pytest.raises(ValueError, match="instance masks"):
    sources.get_seg_source("tfds:scene_parse150", "train")
  with pytest.raises(ValueError, match="no segmentation source"):
    sources.get_seg_source("fashion_mnist_files", "train")
  with pytest.raises(FileNotFoundError, match="ADEChallengeData2016"):
    sources.get_seg_source(f"ade20k:{tmp_path}", "training")
  for kind in ("images", "annotations"):
    (tmp_path / kind / "training").mkdir(parents=True)
  (tmp_path / "images" / "training" / "ADE_train_00000001.jpg").write_bytes(b"\xff\xd8")
  with pytest.raises(FileNotFoundError, match="1 images of .* have no annotation .*ADE_train_00000001.png"):
    sources.get_seg_source(f"ade20k:{tmp_path}", "training")
  # annotation ids the source does not have: an error naming the example, before the device
  src = sources.get_seg_source("fmnist_composite", "test[:8]", num_classes=5)
  with pytest.raises(ValueError, match=r"annotation of example \d+ .* outside \[0, 5\)"):
    next(pipelines.eval_batches(src, pipelines.seg_eval_transform(crop_size=64, scale=(96, 64)), host_batch=8))
