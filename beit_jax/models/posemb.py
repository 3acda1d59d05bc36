"""Resizing position embeddings for a new resolution (224 -> 384 fine-tuning, 512 segmentation).

Both work on host numpy arrays (checkpoint surgery happens once, before training):
  * `resize_rel_pos_table`: BEiT's relative position tables. The (2g-1)^2 offsets are placed on a geometric
    grid (dense near 0, stretched far out) whose extent matches the new table, then interpolated per head.
    "cubic" is the original's `scipy.interpolate.interp2d(kind="cubic")` (removed from SciPy 1.14): an
    interpolating bicubic spline with not-a-knot ends, evaluated with the FITPACK convention of clamping to
    the data range. "linear" is timm's `resize_rel_pos_bias_table`. The 3 [CLS] rows are kept.
  * `resize_abs_pos_embed`: PyTorch's bicubic (`F.interpolate(mode="bicubic", align_corners=False)`, Keys
    a=-0.75), as unilm's `run_class_finetuning.py`; the [CLS] row is kept.
Each interpolation is separable, so it is applied as two small matrices: out = My @ table @ Mx^T.
"""
from __future__ import annotations

import numpy as np
from scipy import interpolate

NUM_EXTRA_REL = 3  # cls->token, token->cls, cls->cls


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
  """Source sample positions for `src` relative offsets stretched to cover `dst` (BEiT's bisection)."""
  def series(q, n):
    return (1.0 - q ** n) / (1.0 - q)
  left, right = 1.01, 1.5
  while right - left > 1e-6:
    q = (left + right) / 2.0
    if series(q, src // 2) > dst // 2:
      right = q
    else:
      left = q
  dis, cur = [], 1.0
  for i in range(src // 2):
    dis.append(cur)
    cur += q ** (i + 1)
  dis = np.asarray(dis)
  return np.concatenate([-dis[::-1], [0.0], dis])


def _interp_matrix(src_pos: np.ndarray, dst_pos: np.ndarray, method: str) -> np.ndarray:
  """M [len(dst), len(src)] with M @ values = the 1-D interpolant of values at dst (clamped to the range)."""
  dst = np.clip(dst_pos, src_pos[0], src_pos[-1])
  eye = np.eye(len(src_pos))
  if method == "cubic":
    return interpolate.CubicSpline(src_pos, eye, axis=0, bc_type="not-a-knot")(dst)
  if method == "linear":
    return np.stack([np.interp(dst, src_pos, eye[:, j]) for j in range(len(src_pos))], axis=1)
  raise ValueError(f"unknown interpolation {method!r}: use 'cubic' (BEiT's) or 'linear' (timm's)")


def rel_table_grid(num_rows: int) -> tuple[int, int]:
  """The patch grid of a square relative position table of `num_rows` rows."""
  side = int(round(np.sqrt(num_rows - NUM_EXTRA_REL)))
  if side * side != num_rows - NUM_EXTRA_REL or side % 2 == 0:
    raise ValueError(f"a relative position table has (2g-1)^2+3 rows; {num_rows} rows is not of that form")
  return ((side + 1) // 2,) * 2


def resize_rel_pos_table(table: np.ndarray, dst_grid: tuple[int, int], method: str = "cubic") -> np.ndarray:
  """Resizes a [(2g-1)^2+3, heads] table to the square `dst_grid`."""
  src_grid = rel_table_grid(table.shape[0])
  if tuple(dst_grid) == src_grid:
    return table
  if dst_grid[0] != dst_grid[1]:
    raise NotImplementedError(f"relative position tables are resized to square grids only, got {dst_grid}")
  src, dst = 2 * src_grid[0] - 1, 2 * dst_grid[0] - 1
  body, extra = table[:-NUM_EXTRA_REL].astype(np.float64), table[-NUM_EXTRA_REL:]
  m = _interp_matrix(_geometric_offsets(src, dst), np.arange(dst) - dst // 2, method)  # [dst, src]
  body = body.reshape(src, src, -1)
  out = np.einsum("ys,stn,xt->yxn", m, body, m).reshape(dst * dst, -1)
  return np.concatenate([out.astype(table.dtype), extra], axis=0)


def _torch_bicubic_matrix(src: int, dst: int, a: float = -0.75) -> np.ndarray:
  """PyTorch's bicubic resampling (align_corners=False, borders clamped) as a [dst, src] matrix."""
  def w(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
  m = np.zeros((dst, src))
  x = (np.arange(dst) + 0.5) * (src / dst) - 0.5
  x0 = np.floor(x).astype(int)
  for k in range(-1, 3):
    idx = x0 + k
    np.add.at(m, (np.arange(dst), np.clip(idx, 0, src - 1)), w(x - idx))
  return m


def resize_abs_pos_embed(pos: np.ndarray, dst_grid: tuple[int, int]) -> np.ndarray:
  """Resizes [1, 1+gh*gw, D] (square source grid) to `dst_grid`, keeping the [CLS] position."""
  n = pos.shape[1] - 1
  g = int(round(np.sqrt(n)))
  if g * g != n:
    raise ValueError(f"absolute position embedding with {n} patch positions is not a square grid")
  if (g, g) == tuple(dst_grid):
    return pos
  grid = pos[0, 1:].astype(np.float64).reshape(g, g, -1)
  out = np.einsum("ys,stc,xt->yxc", _torch_bicubic_matrix(g, dst_grid[0]), grid,
                  _torch_bicubic_matrix(g, dst_grid[1]))
  return np.concatenate([pos[:, :1], out.reshape(1, -1, pos.shape[-1]).astype(pos.dtype)], axis=1)
