"""Experimental variants of beit_jax's model code, for `model_step.py --jax_patch=NAME[,NAME...]` only.

Each patch replaces a method of a beit_jax class inside the benchmark's JAX subprocess. That way a change to
the model can be timed before it is made in beit_jax/models; the findings are in
benchmarks/NOTES_model_step.md. The patches keep the parameters and compute the same function (up to
rounding). They never touch the package's files.

  grad_barrier      a fusion boundary on the residual-stream gradient at every block input
  einsum_attention  attention written out instead of jax.nn.dot_product_attention
  bias_grad_dot     the position-bias gradient summed over the batch with a dot, not a reduction
  gelu_saves_input  an exact GELU whose backward keeps only its input (a negative result: more memory)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from beit_jax.models import beit

_ATTENTION = {"einsum": False, "bias_grad_dot": False}  # switched on by the patches below


# -- grad_barrier ---------------------------------------------------------------------------------------------
def _materialise(g):
  """g in a buffer of its own: XLA cannot fuse g's producers into g's consumers.

  lax.optimization_barrier would be the obvious tool, but XLA:CPU expands barriers away before fusion.
  A conditional is a fusion boundary. Its predicate is always true but depends on the data, so it is not
  folded. The branches differ because JAX inlines a cond whose branches are the same; the second never runs.
  """
  first = g.reshape(-1)[0]
  return jax.lax.cond(jnp.isnan(first) | ~jnp.isnan(first), lambda t: t, lambda t: t + 0 * t, g)


@jax.custom_vjp
def _grad_barrier(x):
  return x


def _grad_barrier_fwd(x):
  return x, None


def _grad_barrier_bwd(_, g):
  # Without the barrier, XLA:CPU fuses the residual-stream cotangent into each block's weight-gradient
  # transposes. That cotangent is a chain of adds over all later blocks' LayerNorm/LayerScale backward, so
  # every one of those fusions recomputes the chain: work quadratic in depth.
  return (_materialise(g),)


_grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


def _patch_grad_barrier():
  call = beit.Block.__call__

  def __call__(self, x, shared_bias=None):
    return call(self, _grad_barrier(x), shared_bias)
  beit.Block.__call__ = __call__


# -- attention: einsum_attention, bias_grad_dot -----------------------------------------------------------------
def _einsum_attention(q, k, v, bias, scale):
  """What jax.nn.dot_product_attention computes, without its 5-D grouped-query layout; q scaled, not logits."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


@jax.custom_vjp
def _broadcast_batch(bias, batch_like):
  return jnp.broadcast_to(bias, (batch_like.shape[0], *bias.shape[1:]))


def _broadcast_batch_fwd(bias, batch_like):
  return _broadcast_batch(bias, batch_like), batch_like


def _broadcast_batch_bwd(batch_like, g):
  # The transpose of a broadcast is a sum over the batch axis. XLA:CPU hands that sum to YNNPACK, whose
  # reduction over a leading axis is ~40x slower with two threads than this dot with a ones vector.
  ones = jnp.ones((g.shape[0],), g.dtype)
  return jnp.einsum("b,bhqk->hqk", ones, g)[None], jnp.zeros_like(batch_like)


_broadcast_batch.defvjp(_broadcast_batch_fwd, _broadcast_batch_bwd)


def _attention_call(self, x, shared_bias=None):
  """beit.Attention.__call__, with the variants that _ATTENTION switches on."""
  dt = self.dtype
  qkv = jnp.einsum("btd,dshk->sbthk", x.astype(dt), self.qkv[...].astype(dt))
  q, k, v = qkv[0], qkv[1], qkv[2]
  if self.q_bias is not None:
    q = q + self.q_bias[...].astype(dt)
    v = v + self.v_bias[...].astype(dt)
  bias = shared_bias
  if self.rel_pos is not None:
    bias = self.rel_pos() if bias is None else bias + self.rel_pos()
  if bias is not None:
    bias = bias[None].astype(dt)
    if _ATTENTION["bias_grad_dot"]:
      bias = _broadcast_batch(bias, jnp.zeros((x.shape[0],), dt))
  if _ATTENTION["einsum"]:
    out = _einsum_attention(q, k, v, bias, self.scale)
  else:
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=self.scale, implementation=self.impl)
  return jnp.einsum("bthk,hkd->btd", out, self.proj[...].astype(dt)) + self.proj_bias[...].astype(dt)


def _attention_patch(switch):
  def patch():
    _ATTENTION[switch] = True
    beit.Attention.__call__ = _attention_call
  return patch


# -- gelu_saves_input -------------------------------------------------------------------------------------------
@jax.custom_vjp
def _gelu_exact(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_exact_fwd(x):
  return _gelu_exact(x), x


def _gelu_exact_bwd(x, g):
  # d/dx x*Phi(x) = Phi(x) + x*phi(x), recomputed from x. Autodiff of jax.nn.gelu saves the fc1 output,
  # erfc and exp instead (3 extra [B, T, 4D] f32 arrays per block). XLA's temp size still went up.
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * jax.lax.erfc(-x32 * 0.7071067811865476)
  pdf = jnp.exp(-0.5 * x32 * x32) * 0.3989422804014327
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


_gelu_exact.defvjp(_gelu_exact_fwd, _gelu_exact_bwd)


def _patch_gelu_saves_input():
  def __call__(self, x):
    return self.fc2(_gelu_exact(self.fc1(x)))
  beit.Mlp.__call__ = __call__


PATCHES = {
    "grad_barrier": _patch_grad_barrier,
    "einsum_attention": _attention_patch("einsum"),
    "bias_grad_dot": _attention_patch("bias_grad_dot"),
    "gelu_saves_input": _patch_gelu_saves_input,
}


def apply(names: str):
  for name in filter(None, (n.strip() for n in names.split(","))):
    if name not in PATCHES:
      raise ValueError(f"unknown --jax_patch {name!r}; known: {sorted(PATCHES)}")
    PATCHES[name]()
