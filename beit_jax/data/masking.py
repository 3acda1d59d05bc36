"""Masks for masked image modeling: BEiT's blockwise masking (Algorithm 1) and plain random masking.

Blockwise masking, with the semantics of unilm `beit/masking_generator.py`: while fewer than `num_masked`
patches are masked, a round tries up to 10 rectangles (area ~ U(min_block, budget), log-aspect ~
U(log min_aspect, -log min_aspect), h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)), both
strictly smaller than the grid, top-left uniform) and keeps the first that adds between 1 and `budget` new
patches, budget = min(num_masked - masked, max_block); a round that adds nothing ends the mask. The count
therefore varies per image (14x14, 75: mean ~74.5, ~2/3 exactly 75), so losses must weight by the mask.

Determinism: every random number is a counter-based hash of (seed, epoch, example index, draw number), so the
mask of an example is a pure function of (seed, epoch, index): the same on every host, after a resume, and
however the examples are batched or split. Speed: the rounds run in lockstep over a whole batch of masks in
numpy (one host core makes >100k 14x14 masks/s from 256 masks per call; see BENCHMARKS.md), not one Python
loop per block.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np

_MAX_ATTEMPTS = 10  # per round, as the original
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective 64-bit hash (uint64 arithmetic wraps)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def example_keys(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
  """One 64-bit key per example: a hash of (seed, epoch, index)."""
  idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
  base = _mix(_mix(np.full(1, seed & (2 ** 64 - 1), np.uint64)) + _GOLDEN * np.uint64(epoch & (2 ** 64 - 1)))
  return _mix(base + _GOLDEN * _mix(idx + _GOLDEN))


def _uniform(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
  """Uniform float64 in [0, 1), one per (key, counter) pair."""
  z = _mix(keys + _GOLDEN * (counters + np.uint64(1)))
  return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _uniform_pairs(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
  """Two uniforms in [0, 1) with 32-bit resolution per (key, counter): [..., 2]. Half the hashing of
  `_uniform`, and 2^-32 is far finer than any draw here needs (block sizes and positions on a small grid)."""
  z = _mix(keys + _GOLDEN * (counters + np.uint64(1)))
  halves = np.stack([z >> np.uint64(32), z & np.uint64(0xFFFFFFFF)], axis=-1)
  return halves.astype(np.float64) * (1.0 / (1 << 32))


def _check(grid, num_masked, min_block, min_aspect):
  h, w = grid
  if h < 1 or w < 1:
    raise ValueError(f"grid={tuple(grid)} must be positive")
  if not 1 <= num_masked <= h * w:
    raise ValueError(f"num_masked={num_masked} must be in [1, {h * w}] for a {h}x{w} grid "
                     "(an empty mask would make the masked-token loss 0/0)")
  if min_block < 1:
    raise ValueError(f"min_block={min_block} must be >= 1")
  if not 0 < min_aspect <= 1:
    raise ValueError(f"min_aspect={min_aspect} must be in (0, 1]")


def num_masked_for_ratio(grid: tuple[int, int], ratio: float) -> int:
  """Masked patches for a mask ratio, at least 1 (BEiT: 75 of 196 ~ 0.4 in the paper's words)."""
  if not 0 < ratio < 1:
    raise ValueError(f"mask ratio {ratio} must be in (0, 1)")
  return max(1, int(round(ratio * grid[0] * grid[1])))


def blockwise_masks(seed: int, indices: Sequence[int] | np.ndarray, grid: tuple[int, int] = (14, 14),
                    num_masked: int = 75, min_block: int = 16, min_aspect: float = 0.3,
                    max_block: int | None = None, *, epoch: int = 0) -> np.ndarray:
  """BEiT blockwise masks for the examples `indices` of `epoch`: bool [len(indices), *grid], True = masked.

  Every mask has between 1 and `num_masked` masked patches (if the rounds add nothing at all, which only tiny
  budgets allow, one random patch is masked: an empty mask would give a 0/0 loss).
  """
  grid = tuple(int(g) for g in grid)
  _check(grid, num_masked, min_block, min_aspect)
  gh, gw = grid
  max_block = num_masked if max_block is None else max_block
  log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
  keys = example_keys(seed, epoch, indices)
  n = keys.shape[0]
  mask = np.zeros((n, gh, gw), dtype=bool)
  count = np.zeros(n, dtype=np.int64)
  draws = np.zeros(n, dtype=np.uint64)  # per-example random-number counter
  rows, cols = np.arange(gh), np.arange(gw)
  active = np.arange(n)
  tries = np.arange(_MAX_ATTEMPTS * 2, dtype=np.uint64)  # 2 hashes = 4 uniforms per attempt
  tril, triu = np.tril(np.ones((gh, gh), np.float32)), np.triu(np.ones((gw, gw), np.float32))
  while active.size:  # one round per iteration, in lockstep over the masks still growing
    m = active.size
    budget = np.minimum(num_masked - count[active], max_block)[:, None]  # [m, 1]
    # A summed-area table per mask makes "how many new patches would this block add" O(1) per attempt.
    # (Built as lower-triangular @ mask @ upper-triangular: batched float32 matmuls, exact for these small
    # counts, and several times faster than numpy's cumsum along the non-contiguous axis.)
    sat = np.zeros((m, gh + 1, gw + 1), dtype=np.float32)
    sat[:, 1:, 1:] = tril @ mask[active].astype(np.float32) @ triu
    # The mask does not change until a round accepts a block, so the round's 10 attempts are drawn and scored
    # at once and the first acceptable one is taken: the same outcome as trying them one after another.
    u = _uniform_pairs(keys[active, None], draws[active, None] + tries).reshape(m, _MAX_ATTEMPTS, 4)
    draws[active] += np.uint64(tries.size)
    area = min_block + (budget - min_block) * u[..., 0]  # random.uniform(min_block, budget), either order
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    # rint rounds half to even, like Python's round. Sides past the grid never fit; capping them there keeps the
    # int cast finite when an extreme min_aspect overflows the square root (found by tests/test_fuzz.py).
    h = np.rint(np.minimum(np.sqrt(area * aspect), gh + 1)).astype(np.int64)
    w = np.rint(np.minimum(np.sqrt(area / aspect), gw + 1)).astype(np.int64)
    fits = (h < gh) & (w < gw)
    top = np.floor(u[..., 2] * (gh - h + 1)).astype(np.int64)  # random.randint(0, gh - h)
    left = np.floor(u[..., 3] * (gw - w + 1)).astype(np.int64)
    # A block that does not fit (h >= gh, possible when min_block exceeds the budget) draws a negative offset;
    # it is rejected below, but its offsets must still index the table (found by tests/test_fuzz.py).
    top, left = np.clip(top, 0, gh), np.clip(left, 0, gw)
    bottom, right = np.minimum(top + h, gh), np.minimum(left + w, gw)
    i = np.arange(m)[:, None]
    covered = sat[i, bottom, right] - sat[i, top, right] - sat[i, bottom, left] + sat[i, top, left]
    new = h * w - covered.astype(np.int64)
    ok = fits & (new > 0) & (new <= budget)
    accepted = ok.any(axis=1)
    first = ok.argmax(axis=1)
    a, j = np.flatnonzero(accepted), first[accepted]
    t, b, l, r = top[a, j], bottom[a, j], left[a, j], right[a, j]
    block = (((rows >= t[:, None]) & (rows < b[:, None]))[:, :, None]
             & ((cols >= l[:, None]) & (cols < r[:, None]))[:, None, :])
    mask[active[a]] |= block
    count[active[a]] += new[a, j]
    # A round that adds nothing ends the mask, as does reaching the target.
    active = active[a][count[active[a]] < num_masked]
  empty = np.flatnonzero(count == 0)
  if empty.size:
    cell = np.floor(_uniform(keys[empty], draws[empty]) * (gh * gw)).astype(np.int64)
    mask.reshape(n, -1)[empty, cell] = True
  return mask


def random_masks(seed: int, indices: Sequence[int] | np.ndarray, grid: tuple[int, int] = (14, 14),
                 num_masked: int = 75, *, epoch: int = 0) -> np.ndarray:
  """Exactly `num_masked` patches masked uniformly at random (the paper's ablation of blockwise masking)."""
  grid = tuple(int(g) for g in grid)
  _check(grid, num_masked, 1, 1.0)
  keys = example_keys(seed, epoch, indices)
  cells = grid[0] * grid[1]
  scores = _uniform(np.repeat(keys[:, None], cells, axis=1), np.arange(cells, dtype=np.uint64)[None, :])
  picked = np.argpartition(scores, num_masked - 1, axis=1)[:, :num_masked]
  mask = np.zeros((keys.shape[0], cells), dtype=bool)
  np.put_along_axis(mask, picked, True, axis=1)
  return mask.reshape(-1, *grid)


def reference_blockwise_mask(rng: random.Random, grid: tuple[int, int] = (14, 14), num_masked: int = 75,
                             min_block: int = 16, min_aspect: float = 0.3,
                             max_block: int | None = None) -> np.ndarray:
  """The original per-block Python loop (unilm `MaskingGenerator`), one mask per call.

  Kept as the yardstick: the tests compare the statistics of `blockwise_masks` with it, and
  benchmarks/input_pipeline.py measures both.
  """
  gh, gw = grid
  max_block = num_masked if max_block is None else max_block
  log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
  mask = np.zeros(grid, dtype=np.int64)
  count = 0
  while count < num_masked:
    budget = min(num_masked - count, max_block)
    delta = 0
    for _ in range(_MAX_ATTEMPTS):
      area = rng.uniform(min_block, budget)
      aspect = math.exp(rng.uniform(*log_aspect))
      h = int(round(math.sqrt(area * aspect)))
      w = int(round(math.sqrt(area / aspect)))
      if w < gw and h < gh:
        top = rng.randint(0, gh - h)
        left = rng.randint(0, gw - w)
        already = mask[top:top + h, left:left + w].sum()
        if 0 < h * w - already <= budget:
          for i in range(top, top + h):
            for j in range(left, left + w):
              if mask[i, j] == 0:
                mask[i, j] = 1
                delta += 1
        if delta > 0:
          break
    if delta == 0:
      break
    count += delta
  return mask.astype(bool)
