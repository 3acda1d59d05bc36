"""Vector quantisation for the PeCo tokenizer: a codebook, nearest-code lookup and the straight-through estimator.

Two modes:
  "l2"          VQGAN's quantizer (taming/modules/vqvae/quantize.py): nearest neighbour in L2 on a codebook learned
                by gradient, loss = ||sg(z) - e||^2 + beta ||z - sg(e)||^2 with beta = 0.25. NB taming's legacy
                VectorQuantizer puts beta on the codebook term instead (spec D); we follow the VQ-VAE paper and
                taming's VectorQuantizer2(legacy=False): beta weighs the commitment term.
  "cosine_ema"  BEiT v2's NormEMAVectorQuantizer (beit2/norm_ema_quantizer.py): encodings and codes are
                l2-normalised, so nearest in L2 = highest cosine; the codebook moves by exponential moving averages
                of the encodings assigned to it (no gradient), loss = beta MSE(sg(z_q), z) with beta = 1.0.

Both return (z_q, ids, aux) with z_q = z + sg(e - z) (straight-through: d z_q / d z = identity) and aux = {"loss",
"perplexity", "usage"}. In "cosine_ema" mode z and z_q are the *normalised* encodings.

State that is not learned by gradient (the EMA codebook, the per-code EMA assignment counts) lives in `CodebookEMA`
variables, not `nnx.Param`, so an `nnx.Optimizer(model, tx, wrt=nnx.Param)` and `nnx.grad` leave it alone; the
quantizer writes it in its forward pass when it is in train mode, and a jitted step carries it in and out like
BatchNorm statistics.

Train mode is the module attribute `deterministic` (False = update), which `model.train()` / `model.eval()` and
`nnx.view(model, deterministic=...)` set like for nnx.Dropout; a call's `update=` argument overrides it.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from beit_jax.models import layers

MODES = ("l2", "cosine_ema")
DEFAULT_BETA = {"l2": 0.25, "cosine_ema": 1.0}  # VQGAN (taming vqgan.py L31); BEiT v2 (modeling_vqkd.py L57)


class CodebookEMA(nnx.Variable):
  """Codebook state updated by moving averages in the forward pass, never by an optimizer."""


def _ema_variable(value, axes) -> CodebookEMA:
  # Logical axis names as `layers.param` gives parameters (sharded eagerly only under a mesh, as there).
  eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
  return CodebookEMA(value, out_sharding=tuple(axes), eager_sharding=eager)


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) over the last axis (torch.nn.functional.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def nearest_code(flat, codebook):
  """Index [N] of the nearest code (L2) for each row of flat [N, D]; ties go to the lower index (as argmin).

  ||z||^2 - 2 z.e + ||e||^2 in f32 at full matmul precision: on accelerators the default (bf16 passes / TF32) would
  misassign near-ties, and the assignment is what the tokens *are*.
  """
  dots = jnp.dot(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(jnp.square(flat), -1, keepdims=True) - 2.0 * dots + jnp.sum(jnp.square(codebook), -1)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def code_counts(ids, num_codes: int):
  """How many rows chose each code [K] (f32)."""
  return jnp.zeros((num_codes,), jnp.float32).at[ids].add(1.0)


def perplexity(counts):
  """exp(entropy) of the code distribution of a batch: 1 = one code for all, K = all codes equally."""
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def ema_codebook(codebook, flat, ids, counts, decay: float, eps: float):
  """BEiT v2's normalised EMA step (norm_ema_quantizer.py L174-194), a pure function.

  For each code that the batch used: the mean of its assigned (normalised) encodings, l2-normalised, then
  codebook <- normalise(decay * codebook + (1 - decay) * mean). Codes the batch did not use keep their value
  exactly (BEiT v2 gets the same up to rounding by averaging a unit code with itself).
  """
  sums = jax.ops.segment_sum(flat, ids, num_segments=codebook.shape[0])  # [K, D]
  used = (counts > 0)[:, None]
  means = l2_normalize(sums / jnp.maximum(counts, 1.0)[:, None], eps)
  moved = l2_normalize(decay * codebook + (1.0 - decay) * means, eps)
  return jnp.where(used, moved, codebook)


def restart_dead_codes(codebook, cluster_size, flat, key, threshold: float):
  """Codes whose EMA count is below `threshold` become random rows of `flat` (this batch's encoder outputs).

  A restarted code's count is set to `threshold`: it survives as long as it is used about that often, and the
  all-zero counts of a fresh quantizer make the first update a data-dependent initialisation of every code.
  Rows are drawn without replacement when the batch has at least K of them.
  """
  n, k = flat.shape[0], codebook.shape[0]
  dead = cluster_size < threshold
  picks = jax.random.choice(key, n, (k,), replace=n < k)
  codebook = jnp.where(dead[:, None], flat[picks].astype(codebook.dtype), codebook)
  return codebook, jnp.where(dead, jnp.asarray(threshold, cluster_size.dtype), cluster_size)


class VectorQuantizer(nnx.Module):
  """Codebook [K, D] with nearest-code lookup; see the module docstring for the two modes.

  Args:
    num_codes: K.
    dim: D, the width of the encodings (last axis of z).
    mode: "l2" or "cosine_ema".
    beta: weight of the commitment term; None = the mode's default (0.25 for "l2", 1.0 for "cosine_ema").
    decay, eps: EMA decay of the codebook (cosine_ema) and of the per-code counts (both modes); eps floors the
      norms in l2-normalisation.
    dead_code_threshold: > 0 restarts codes whose EMA count (assignments per step) falls below it to encoder outputs
      of the current batch, on each update. Needs an rng: the 'codebook' stream of `rngs` (or its default stream),
      or a `key=` at call time.
    deterministic: False (train mode) updates the EMA state on each call.
  """

  def __init__(self, num_codes: int = 8192, dim: int = 32, *, mode: str = "l2", beta: Optional[float] = None,
               decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: float = 0.0,
               deterministic: bool = False, rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f"VectorQuantizer mode={mode!r}: must be one of {MODES}")
    if num_codes < 2 or dim < 1:
      raise ValueError(f"VectorQuantizer needs num_codes >= 2 and dim >= 1, got num_codes={num_codes}, dim={dim}")
    if not 0.0 < decay < 1.0:
      raise ValueError(f"VectorQuantizer decay={decay}: must be in (0, 1)")
    if dead_code_threshold < 0:
      raise ValueError(f"VectorQuantizer dead_code_threshold={dead_code_threshold}: must be >= 0 (0 disables)")
    self.num_codes, self.dim, self.mode = num_codes, dim, mode
    self.beta = DEFAULT_BETA[mode] if beta is None else float(beta)
    self.decay, self.eps, self.dead_code_threshold = float(decay), float(eps), float(dead_code_threshold)
    self.deterministic = deterministic
    axes = ("codebook", "code_dim")
    if mode == "l2":
      # taming: nn.Embedding initialised U(-1/K, 1/K).
      init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / num_codes, 1.0 / num_codes)
      self.codebook = layers.param(rngs, init, (num_codes, dim), axes)
    else:
      # BEiT v2 without k-means init: l2norm(randn).
      code = l2_normalize(jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32), eps)
      self.codebook = _ema_variable(code, axes)
    # EMA of per-step assignment counts (BEiT v2's `cluster_size` buffer, zeros at first): drives dead-code restarts.
    self.cluster_size = _ema_variable(jnp.zeros((num_codes,), jnp.float32), ("codebook",))
    self.rngs = rngs["codebook"].fork() if dead_code_threshold > 0 else nnx.data(None)

  def set_view(self, deterministic: Optional[bool] = None):
    """For `nnx.view(model, deterministic=...)`, as nnx.Dropout."""
    if deterministic is not None:
      self.deterministic = deterministic

  def lookup(self, ids):
    """Codes of ids [...] -> [..., D] (normalised in cosine_ema mode)."""
    return jnp.take(self.codebook[...], ids, axis=0)

  def quantize(self, z):
    """(encodings as the codebook sees them [..., D] f32, ids [...] int32): no state change, no loss."""
    if z.shape[-1] != self.dim:
      raise ValueError(f"VectorQuantizer expects encodings with last axis {self.dim}, got shape {tuple(z.shape)}")
    z = z.astype(jnp.float32)
    if self.mode == "cosine_ema":
      z = l2_normalize(z, self.eps)
    ids = nearest_code(z.reshape(-1, self.dim), self.codebook[...])
    return z, ids.reshape(z.shape[:-1])

  def __call__(self, z, *, update: Optional[bool] = None, key: Optional[jax.Array] = None):
    """z [..., D] -> (z_q [..., D] f32, ids [...] int32, aux {"loss", "perplexity", "usage"}).

    `update` (default: not self.deterministic) moves the EMA state after the lookup; z_q, ids and the loss use the
    codebook as it was before the update (as BEiT v2).
    """
    update = (not self.deterministic) if update is None else update
    z, ids = self.quantize(z)
    e = self.lookup(ids)
    sg = jax.lax.stop_gradient
    if self.mode == "l2":
      loss = jnp.mean(jnp.square(sg(z) - e)) + self.beta * jnp.mean(jnp.square(z - sg(e)))
    else:
      loss = self.beta * jnp.mean(jnp.square(sg(e) - z))
    z_q = z + sg(e - z)
    flat_ids = ids.reshape(-1)
    counts = code_counts(flat_ids, self.num_codes)
    if update:
      self._update(sg(z).reshape(-1, self.dim), flat_ids, counts, key)
    aux = {"loss": loss, "perplexity": perplexity(counts), "usage": jnp.mean((counts > 0).astype(jnp.float32))}
    return z_q, ids, aux

  def _update(self, flat, ids, counts, key):
    # Under jax.jit with the batch sharded over devices, `flat`, `ids` and `counts` describe the *global* batch:
    # the counts and per-code sums are reductions over it, so XLA inserts the all-reduce that BEiT v2 calls by hand
    # (all_reduce_fn) and every device applies the same update to its replica of the codebook.
    cluster = self.decay * self.cluster_size[...] + (1.0 - self.decay) * counts
    codebook = self.codebook[...]
    if self.mode == "cosine_ema":
      codebook = ema_codebook(codebook, flat, ids, counts, self.decay, self.eps)
    if self.dead_code_threshold > 0:
      if key is None:
        if self.rngs is None:
          raise ValueError("dead-code restart needs an rng: build the quantizer with rngs or pass key=")
        key = self.rngs()
      codebook, cluster = restart_dead_codes(codebook, cluster, flat, key, self.dead_code_threshold)
    self.cluster_size[...] = cluster
    if self.mode == "cosine_ema" or self.dead_code_threshold > 0:
      # In "l2" mode this writes a Param outside the optimizer (restarted rows only); see `PecoTokenizer`.
      self.codebook[...] = codebook
