"""Segmentation evaluation (issue 11): mIoU against a case computed by hand, and the sliding window."""
import numpy as np
import pytest

from beit_jax.train import seg_eval


def test_miou_of_a_hand_computed_case():
  # 3 classes, one 2x4 image; 255 = ignore.
  label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
  pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
  conf = seg_eval.confusion(pred, label, 3)
  # By hand: class 0: label pixels {(0,0),(0,1)}, predicted {(0,0),(1,1)} (the ignored (1,2) does not count):
  #   intersection 1, union 3 -> 1/3. Class 1: label {(0,2),(0,3),(1,3)}, predicted {(0,1),(0,2),(0,3)}:
  #   2 / 4 = 1/2. Class 2: label {(1,0),(1,1)}, predicted {(1,0),(1,3)}: 1 / 3.
  np.testing.assert_allclose(seg_eval.iou_per_class(conf), [1 / 3, 1 / 2, 1 / 3])
  assert seg_eval.mean_iou(conf) == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
  assert conf.sum() == 7 and seg_eval.pixel_accuracy(conf) == pytest.approx(4 / 7)
  # A class in neither labels nor predictions is left out of the mean, not counted as 0.
  conf4 = seg_eval.confusion(pred, label, 4)
  assert np.isnan(seg_eval.iou_per_class(conf4)[3]) and seg_eval.mean_iou(conf4) == seg_eval.mean_iou(conf)
  with pytest.raises(ValueError, match="label 7 outside"):
    seg_eval.confusion(pred, np.full_like(label, 7), 3)


@pytest.mark.parametrize("size", [(512, 512), (512, 683), (600, 1000), (300, 200), (513, 854)])
def test_sliding_window_covers_every_pixel_and_stitches_exactly(size):
  """BEiT's ADE20K test (crop 512, stride 341): every pixel in >= 1 window, and for a per-pixel `predict` the
  stitched logits equal the whole image's (the count map normalises the overlaps exactly)."""
  h, w = size
  image = np.random.default_rng(0).standard_normal((h, w, 3)).astype(np.float32)
  weights = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
  predict = lambda crops: crops @ weights  # per pixel: the same wherever the window is
  logits, count = seg_eval.sliding_window_logits(predict, image, crop=512, stride=341)
  assert logits.shape == (h, w, 5) and count.min() >= 1
  np.testing.assert_allclose(logits, image @ weights, rtol=1e-5, atol=1e-5)
  ys = seg_eval.window_starts(max(h, 512), 512, 341)
  assert ys[0] == 0 and ys[-1] + 512 == max(h, 512)  # flush with both edges
  print(f"{size}: {len(ys)} x {len(seg_eval.window_starts(max(w, 512), 512, 341))} windows, "
        f"pixels covered 1-{int(count.max())} times")


def test_window_errors_are_named():
  with pytest.raises(ValueError, match="stride=600 > crop=512"):
    seg_eval.window_starts(1000, 512, 600)
