"""Segmentation evaluation (issue 11): mIoU against a case computed by hand, and the sliding window."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from beit_jax.train import seg_eval


def test_miou_of_a_hand_computed_case():
  # 3 classes, one 2x4 image; 255 = ignore.
  label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
  conf = np.asarray(jax.jit(seg_eval.confusion_matrix, static_argnums=2)(pred, label, 3, label != 255))
  # By hand: class 0: label pixels {(0,0),(0,1)}, predicted {(0,0),(1,1)} (the ignored (1,2) does not count):
  #   intersection 1, union 3 -> 1/3. Class 1: label {(0,2),(0,3),(1,3)}, predicted {(0,1),(0,2),(0,3)}:
  #   2 / 4 = 1/2. Class 2: label {(1,0),(1,1)}, predicted {(1,0),(1,3)}: 1 / 3.
  np.testing.assert_allclose(seg_eval.iou_per_class(conf), [1 / 3, 1 / 2, 1 / 3])
  assert seg_eval.mean_iou(conf) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
  assert conf.sum() == 7 and seg_eval.pixel_accuracy(conf) == pytest.approx(4 / 7)
  # A class in neither labels nor predictions is left out of the mean, not counted as 0.
  conf4 = np.asarray(seg_eval.confusion_matrix(pred, label, 4, label != 255))
  assert np.isnan(seg_eval.iou_per_class(conf4)[3]) and seg_eval.mean_iou(conf4) == seg_eval.mean_iou(conf)


def _slide(images, sizes, transposed, predict, crop=512, stride=341):
  starts, valid = seg_eval.window_grid(sizes, crop, stride, images.shape[1:3])
  fn = jax.jit(lambda im, s, v, t: seg_eval.slide_logits(predict, im, s, v, t, crop))
  sums, counts = fn(images, starts, valid, transposed)
  return np.asarray(sums), np.asarray(counts), valid


@pytest.mark.parametrize("size", [(512, 512), (512, 683), (300, 200), (512, 2048)])
def test_sliding_window_covers_every_pixel_and_stitches_exactly(size):
  """BEiT's ADE20K test (crop 512, stride 341) on the (512, 2048) canvas: every pixel of the image in >= 1 window,
  and for a per-pixel `predict` the stitched logits / counts equal the whole image's."""
  h, w = size
  canvas = np.zeros((1, 512, 2048, 3), np.float32)
  canvas[0, :h, :w] = np.random.default_rng(0).standard_normal((h, w, 3))
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32))
  sums, counts, valid = _slide(canvas, np.array([[h, w]]), np.array([False]), lambda crops: crops @ weights)
  assert counts[0, :h, :w].min() >= 1
  np.testing.assert_allclose(sums[0, :h, :w] / counts[0, :h, :w, None], canvas[0, :h, :w] @ np.asarray(weights),
                             rtol=1e-5, atol=1e-5)
  ys, xs = seg_eval.window_starts(h, 512, 341), seg_eval.window_starts(w, 512, 341)
  assert valid.sum() == len(ys) * len(xs) and counts.sum() == valid.sum() * 512 * 512  # each window once
  assert ys[-1] + 512 == max(h, 512) and xs[-1] + 512 == max(w, 512)  # flush with both edges
  print(f"{size}: {len(ys)} x {len(xs)} windows of {valid.shape[1]} slots, pixels covered 1-{int(counts.max())} times")


def test_a_transposed_image_is_seen_upright():
  """A portrait image lies transposed on the landscape canvas; the model must still see it upright: a `predict`
  that marks each window's top rows gives the same stitched result as the upright image on a portrait canvas."""
  rng = np.random.default_rng(0)
  upright = rng.standard_normal((700, 512, 3)).astype(np.float32)  # portrait
  top_rows = lambda crops: crops + (jnp.arange(crops.shape[1]) < 100)[None, :, None, None]  # not transpose-symmetric
  want, want_n, _ = _slide(upright[None], np.array([[700, 512]]), np.array([False]), top_rows)
  lying = np.zeros((1, 512, 2048, 3), np.float32)
  lying[0, :, :700] = upright.transpose(1, 0, 2)
  got, got_n, _ = _slide(lying, np.array([[512, 700]]), np.array([True]), top_rows)
  np.testing.assert_allclose(got[0, :, :700].transpose(1, 0, 2), want[0], atol=1e-6)
  np.testing.assert_array_equal(got_n[0, :, :700].T, want_n[0])
  wrong, _, _ = _slide(lying, np.array([[512, 700]]), np.array([False]), top_rows)  # the flag matters
  assert np.abs(wrong[0, :, :700].transpose(1, 0, 2) - want[0]).max() > 0.5


def test_window_errors_are_named():
  with pytest.raises(ValueError, match="stride=600 > crop=512"):
    seg_eval.window_starts(1000, 512, 600)
  with pytest.raises(ValueError, match="exceeds the evaluation canvas"):
    seg_eval.window_grid(np.array([[600, 600]]), 512, 341, (512, 2048))
