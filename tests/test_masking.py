"""Blockwise masking: the original algorithm's statistics, invariants, determinism, edge cases."""
import random

import numpy as np
import pytest

from beit_jax.data import masking


def test_statistics_match_the_original_loop():
  n = 4000
  ours = masking.blockwise_masks(0, np.arange(n))
  rng = random.Random(0)
  ref = np.stack([masking.reference_blockwise_mask(rng) for _ in range(n)])
  c_ours, c_ref = ours.sum((1, 2)), ref.sum((1, 2))
  print(f"masked count: ours mean {c_ours.mean():.2f}, P(75) {np.mean(c_ours == 75):.3f}, min {c_ours.min()}; "
        f"original mean {c_ref.mean():.2f}, P(75) {np.mean(c_ref == 75):.3f}, min {c_ref.min()}")
  assert abs(c_ours.mean() - c_ref.mean()) < 0.25
  assert 74.0 < c_ours.mean() < 75.0 and c_ours.max() == 75
  assert abs(np.mean(c_ours == 75) - np.mean(c_ref == 75)) < 0.05
  # The count histograms and where on the grid masks fall agree (a few standard errors).
  bins = np.arange(50, 77)
  tv = 0.5 * np.abs(np.histogram(c_ours, bins)[0] - np.histogram(c_ref, bins)[0]).sum() / n
  assert tv < 0.05, tv
  assert np.abs(ours.mean(0) - ref.mean(0)).max() < 0.05
  # Row/column spans of the masks (block shapes) agree too.
  rows_ours, rows_ref = ours.any(2).sum(1), ref.any(2).sum(1)
  assert abs(rows_ours.mean() - rows_ref.mean()) < 0.15


def test_shape_dtype_and_count_bounds_on_many_grids():
  for grid, k, min_block in [((14, 14), 75, 16), ((24, 24), 230, 16), ((4, 4), 6, 2), ((7, 5), 10, 4),
                             ((14, 14), 1, 16), ((2, 2), 1, 1)]:
    m = masking.blockwise_masks(3, np.arange(500), grid, k, min_block)
    assert m.shape == (500, *grid) and m.dtype == bool
    c = m.reshape(500, -1).sum(1)
    assert c.min() >= 1 and c.max() <= k, (grid, k, c.min(), c.max())


def test_deterministic_per_seed_epoch_index_regardless_of_batching():
  idx = np.arange(100, 164)
  full = masking.blockwise_masks(7, idx, epoch=3)
  parts = np.concatenate([masking.blockwise_masks(7, idx[i:i + 5], epoch=3) for i in range(0, 64, 5)])
  np.testing.assert_array_equal(full, parts)
  np.testing.assert_array_equal(full[::-1], masking.blockwise_masks(7, idx[::-1], epoch=3))
  other_epoch = masking.blockwise_masks(7, idx, epoch=4)
  other_seed = masking.blockwise_masks(8, idx, epoch=3)
  assert (full != other_epoch).any(axis=(1, 2)).mean() > 0.9
  assert (full != other_seed).any(axis=(1, 2)).mean() > 0.9
  assert len({m.tobytes() for m in full}) == 64  # examples differ from each other


def test_random_masks_exact_count_and_uniform():
  m = masking.random_masks(0, np.arange(3000), (14, 14), 75)
  np.testing.assert_array_equal(m.sum((1, 2)), 75)
  assert np.abs(m.mean(0) - 75 / 196).max() < 0.04
  np.testing.assert_array_equal(m[10:20], masking.random_masks(0, np.arange(10, 20), (14, 14), 75))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"num_masked=0 must be in \[1, 196\]"):
    masking.blockwise_masks(0, [0], num_masked=0)
  with pytest.raises(ValueError, match=r"num_masked=17 must be in \[1, 16\]"):
    masking.random_masks(0, [0], (4, 4), 17)
  with pytest.raises(ValueError, match="min_aspect"):
    masking.blockwise_masks(0, [0], min_aspect=2.0)
  with pytest.raises(ValueError, match="mask ratio"):
    masking.num_masked_for_ratio((14, 14), 1.5)
  assert masking.num_masked_for_ratio((14, 14), 0.4) == 78
