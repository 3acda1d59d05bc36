"""Building blocks of the BEiT ViT as Flax NNX modules.

Every parameter is created through `param`, which attaches logical axis names (`out_sharding` metadata) so the
sharding code can map them onto a mesh with `nnx.logical_axis_rules`. Parameters are stored in `param_dtype`
(f32) and cast to the compute `dtype` (bf16 on accelerators) where they are used.

Tensor layouts (what the converter maps PyTorch's to):
  patch embedding kernel  [p, p, C, D]        ("patch", "patch", "channels", "embed")
  q/k/v kernels           [3, D, H, Dh]       (None, "embed", "heads", "head_dim")
  attention out kernel    [H, Dh, D]          ("heads", "head_dim", "embed")
  mlp kernels             [D, F] / [F, D]     ("embed", "mlp") / ("mlp", "embed")
  relative position table [R, H]              ("relpos", "heads")
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jnp.float32) -> nnx.Param:
  """A parameter with logical axis names.

  Flax shards a variable eagerly when it carries `out_sharding` and a mesh is set (`jax.set_mesh`); without a
  mesh it refuses. We keep the axis names as metadata in both cases and only shard eagerly under a mesh.
  """
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match parameter shape {tuple(shape)}")
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes), eager_sharding=eager)


def trunc_normal(std: float, bound: float) -> Initializer:
  """Normal(0, std) truncated at +-bound*std, like PyTorch's `trunc_normal_(std=std, a=-b*std, b=b*std)`.

  Unlike `jax.nn.initializers.truncated_normal`, `std` is the std of the *untruncated* normal (PyTorch's
  convention), so BEiT's pre-training init (cut at +-1 sigma) has exactly the original's distribution.
  """
  def init(key, shape, dtype=jnp.float32):
    if bound >= 6.0:  # the truncation is immaterial; avoid erfinv at +-1
      return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return (std * jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32)).astype(dtype)
  return init


def scaled(init: Initializer, scale: float) -> Initializer:
  def scaled_init(key, shape, dtype=jnp.float32):
    return (init(key, shape, jnp.float32) * scale).astype(dtype)
  return scaled_init


def constant(value: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)
  return init


zeros = constant(0.0)
ones = constant(1.0)


def torch_default_uniform(fan_in: int) -> Initializer:
  """PyTorch's default Conv/Linear init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in f32; the result in x's dtype. The
  gradient is the textbook closed form: autodiff of the forward gives XLA:CPU more elementwise passes over the
  residual stream (the closed form is ~3% faster on the miniature's step, benchmarks/NOTES_model_step.md)."""
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x32 = x.astype(jnp.float32)
  centred = x32 - x32.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
  xhat = centred * rstd
  return (xhat * scale + bias).astype(x.dtype), (xhat, rstd, scale)


def _layer_norm_bwd(eps, res, g):
  del eps
  xhat, rstd, scale = res
  g32 = g.astype(jnp.float32)
  leading = tuple(range(g32.ndim - 1))
  gxhat = g32 * scale
  dx = rstd * (gxhat - gxhat.mean(-1, keepdims=True) - xhat * (gxhat * xhat).mean(-1, keepdims=True))
  return dx.astype(g.dtype), (g32 * xhat).sum(leading), g32.sum(leading)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in f32 whatever the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, ones, (dim,), ("embed",), param_dtype)
    self.bias = param(rngs, zeros, (dim,), ("embed",), param_dtype)

  def __call__(self, x):
    y = layer_norm(x, self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32), self.eps)
    return y.astype(self.dtype)


class Dense(nnx.Module):
  """x @ kernel + bias with logical axis names for (in, out)."""

  def __init__(self, din: int, dout: int, axes: tuple[str | None, str | None], *, kernel_init: Initializer,
               dtype, param_dtype, rngs: nnx.Rngs, bias_init: Initializer = zeros):
    self.dtype = dtype
    self.kernel = param(rngs, kernel_init, (din, dout), axes, param_dtype)
    self.bias = param(rngs, bias_init, (dout,), (axes[1],), param_dtype)

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


def gelu(x):
  """The exact GELU x * Phi(x) in torch's erf form. jax.nn.gelu(approximate=False) writes Phi through erfc,
  which is more accurate only where GELU is ~0 (far negative x) and whose polynomial, with its autodiff, costs
  XLA:CPU ~4x what erf's does (~10% of the miniature's pre-training step, benchmarks/NOTES_model_step.md)."""
  return x * (0.5 + 0.5 * jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


@functools.lru_cache(maxsize=None)
def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """Index [1+N, 1+N] into a relative position table of (2gh-1)(2gw-1)+3 rows (BEiT's layout).

  Token-token pairs index by their (dy, dx) offset; the last three rows are cls->token, token->cls, cls->cls.
  """
  gh, gw = grid
  coords = np.stack(np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")).reshape(2, -1)  # [2, N]
  rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]
  rel[0] += gh - 1
  rel[1] += gw - 1
  num_rel = (2 * gh - 1) * (2 * gw - 1)
  n = gh * gw
  index = np.zeros((n + 1, n + 1), dtype=np.int32)
  index[1:, 1:] = rel[0] * (2 * gw - 1) + rel[1]
  index[0, :] = num_rel  # cls -> token
  index[:, 0] = num_rel + 1  # token -> cls
  index[0, 0] = num_rel + 2  # cls -> cls
  index.setflags(write=False)
  return index


def num_relative_positions(grid: tuple[int, int]) -> int:
  return (2 * grid[0] - 1) * (2 * grid[1] - 1) + 3


class RelativePositionBias(nnx.Module):
  """A learned bias per (relative offset, head), zero-initialised as in BEiT; returns [H, 1+N, 1+N]."""

  def __init__(self, grid: tuple[int, int], num_heads: int, *, param_dtype, rngs: nnx.Rngs):
    self.grid = tuple(grid)
    self.table = param(rngs, zeros, (num_relative_positions(self.grid), num_heads), ("relpos", "heads"),
                       param_dtype)

  def __call__(self):
    index = relative_position_index(self.grid)
    return jnp.transpose(self.table[...][index], (2, 0, 1))


# ---------------------------------------------------------------------------------------------------------------
# Gradient-path helpers for XLA:CPU. Each is the identity in the forward pass and changes only how the backward
# pass is compiled *for CPU* (jax.lax.platform_dependent picks the branch when the step is lowered), so GPU and TPU
# programs, ahead-of-time compiles for a TPU topology included, are the plain ones. benchmarks/NOTES_model_step.md
# has the measurements behind each.
# ---------------------------------------------------------------------------------------------------------------
def _own_buffer(g):
  """g in a buffer of its own: XLA cannot fuse g's producers into g's consumers across a conditional.
  (lax.optimization_barrier would be the obvious tool, but XLA:CPU expands barriers away before fusion.) The
  predicate is always true but depends on the data, so it is not folded; the branches differ because JAX
  inlines a cond whose branches are the same. The second never runs."""
  first = g.reshape(-1)[0]
  return jax.lax.cond(jnp.isnan(first) | ~jnp.isnan(first), lambda t: t, lambda t: t + 0 * t, g)


@jax.custom_vjp
def residual_grad_boundary(x):
  """The identity; its gradient is kept in memory on CPU. Applied to every block's input: without it XLA:CPU
  fuses the residual-stream cotangent (a chain of adds over every later block's LayerNorm/LayerScale backward)
  into each block's weight-gradient transposes, recomputing the chain per block: work quadratic in depth, 27%
  of a BEiT-B step, and 2.5x the compile time."""
  return x


residual_grad_boundary.defvjp(
    lambda x: (x, None),
    lambda _, g: (jax.lax.platform_dependent(g, cpu=_own_buffer, default=lambda t: t),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_batch(bias, batch: int):
  """bias [1, ...] -> [batch, ...]. The gradient sums over the batch; on CPU as a dot with a ones vector, because
  XLA:CPU hands the plain reduction over a leading axis to a YNNPACK kernel that is ~40x slower with 2 threads
  (the relative position bias gradient: ~0.4 s of a BEiT-B step on 2 cores)."""
  return jnp.broadcast_to(bias, (batch, *bias.shape[1:]))


def _sum_batch_as_dot(g):
  return jnp.einsum("b,b...->...", jnp.ones((g.shape[0],), g.dtype), g)[None]


broadcast_batch.defvjp(
    lambda bias, batch: (broadcast_batch(bias, batch), None),
    lambda batch, _, g: (jax.lax.platform_dependent(g, cpu=_sum_batch_as_dot,
                                                    default=lambda t: t.sum(0, keepdims=True)),))
