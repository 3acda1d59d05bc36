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
import numpy as np
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


def _sq_dist(flat, codes):
  """Squared L2 distances [N, K] as ||z||^2 - 2 z.e + ||e||^2, in f32 at full matmul precision: on accelerators
  the default (bf16 passes / TF32) would misassign near-ties, and the assignment is what the tokens *are*."""
  dots = jnp.dot(flat, codes.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(jnp.square(flat), -1, keepdims=True) - 2.0 * dots + jnp.sum(jnp.square(codes), -1)


def nearest_code(flat, codebook):
  """Index [N] of the nearest code (L2) for each row of flat [N, D]; ties go to the lower index (as argmin)."""
  return jnp.argmin(_sq_dist(flat, codebook), axis=-1).astype(jnp.int32)


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


def _spread_picks(key, weights, k: int):
  """k row indices drawn with probability proportional to `weights` [N], without replacement where N >= k
  (Gumbel top-k; rows of weight 0 come last), with replacement otherwise."""
  n = weights.shape[0]
  logits = jnp.log(jnp.maximum(weights, 0.0) + 1e-30)
  if n < k:
    return jax.random.categorical(key, logits, shape=(k,))
  return jax.lax.top_k(logits + jax.random.gumbel(key, (n,)), k)[1]


def restart_dead_codes(codebook, cluster_size, flat, key, threshold: float):
  """Codes whose EMA count is below `threshold` become encoder outputs of this batch (`flat`), drawn with
  probability proportional to their squared distance to the nearest code (k-means++'s D^2 sampling).

  Why not uniformly drawn rows: most rows of a batch lie in its densest region (on Fashion-MNIST a third of
  the patches are black background), so uniform restarts put most new codes there, as synonyms of codes that
  already quantise it well; D^2 sampling puts them where the quantisation error is. A restarted code's count
  is set to 2 x `threshold`: it may sit idle for ln 2 / (1 - decay) steps (69 at decay 0.99) to attract its
  encodings before it can be restarted again (at the threshold itself one idle step restarted it again).
  """
  k = codebook.shape[0]
  dead = cluster_size < threshold
  err = jnp.maximum(jnp.min(_sq_dist(flat, codebook.astype(jnp.float32)), axis=1), 0.0)
  picks = _spread_picks(key, err, k)
  rank = jnp.clip(jnp.cumsum(dead) - 1, 0, k - 1)  # the j-th dead code takes the j-th pick
  codebook = jnp.where(dead[:, None], flat[picks[rank]].astype(codebook.dtype), codebook)
  return codebook, jnp.where(dead, jnp.asarray(2.0 * threshold, cluster_size.dtype), cluster_size)


def kmeans_codebook(flat, num_codes: int, key, *, iters: int = 10, spherical: bool = False):
  """k-means on `flat` [N, D] (greedy k-means++ seeding, then `iters` Lloyd steps): (codes [K, D], counts [K]).

  `spherical`: unit-norm rows, centroids re-normalised (cosine k-means, for the "cosine_ema" codebook). The
  data-dependent codebook initialisation BEiT v2 offers (norm_ema_quantizer.py kmeans_init, there with random
  seeds). D^2 seeding matters where one region of the data is dense: random seeds put codes on it in
  proportion to its mass (a third of them on Fashion-MNIST's black background), D^2 seeds in proportion to its
  spread, and Lloyd steps do not move surplus codes out of a dense region once they are there. Greedy (as
  scikit-learn's default): each seed is the best of 2 + ln K candidates drawn by D^2, which makes a second seed
  in an already covered cluster rare.
  """
  n, dim = flat.shape
  trials = 2 + int(np.log(num_codes))
  keys = jax.random.split(key, num_codes)
  first = flat[jax.random.randint(keys[0], (), 0, n)]
  d2 = jnp.sum(jnp.square(flat - first), -1)

  def seed(i, carry):
    codes, d2 = carry
    picks = jax.random.categorical(keys[i], jnp.log(d2 + 1e-30), shape=(trials,))
    cand = flat[picks]  # [T, D]
    new_d2 = jnp.minimum(d2[None], jnp.maximum(_sq_dist(cand, flat), 0.0))  # [T, N]
    best = jnp.argmin(new_d2.sum(-1))
    return codes.at[i].set(cand[best]), new_d2[best]

  codes, _ = jax.lax.fori_loop(1, num_codes, seed, (jnp.zeros((num_codes, dim), flat.dtype).at[0].set(first), d2))

  def lloyd(_, codes):
    ids = jnp.argmin(_sq_dist(flat, codes), axis=1)
    counts = code_counts(ids, num_codes)
    means = jax.ops.segment_sum(flat, ids, num_segments=num_codes) / jnp.maximum(counts, 1.0)[:, None]
    if spherical:
      means = l2_normalize(means)
    return jnp.where((counts > 0)[:, None], means, codes)  # an empty cluster keeps its seed

  codes = jax.lax.fori_loop(0, iters, lloyd, codes)
  return codes, code_counts(jnp.argmin(_sq_dist(flat, codes), axis=1), num_codes)


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
      of the current batch, on each update (drawn by D^2 sampling, see restart_dead_codes).
    kmeans_init: the first update (all counts still 0) sets the codebook by k-means on that batch's encodings
      (`kmeans_codebook`: D^2 seeding, 10 Lloyd steps) and the counts to its assignment, instead of moving it.
    Restarts and k-means need an rng: the 'codebook' stream of `rngs` (or its default stream), or a `key=` at
    call time.
    deterministic: False (train mode) updates the EMA state on each call.
  """

  def __init__(self, num_codes: int = 8192, dim: int = 32, *, mode: str = "l2", beta: Optional[float] = None,
               decay: float = 0.99, eps: float = 1e-5, dead_code_threshold: float = 0.0,
               kmeans_init: bool = False, deterministic: bool = False, rngs: nnx.Rngs):
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
    self.kmeans_init = bool(kmeans_init)
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
    self.rngs = rngs["codebook"].fork() if dead_code_threshold > 0 or kmeans_init else nnx.data(None)

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
    if key is None and (self.dead_code_threshold > 0 or self.kmeans_init):
      if self.rngs is None:
        raise ValueError("dead-code restart and k-means init need an rng: build the quantizer with rngs or pass key=")
      key = self.rngs()
    old_codebook, old_cluster = self.codebook[...], self.cluster_size[...]

    def moved():
      cluster = self.decay * old_cluster + (1.0 - self.decay) * counts
      codebook = old_codebook
      if self.mode == "cosine_ema":
        codebook = ema_codebook(codebook, flat, ids, counts, self.decay, self.eps)
      if self.dead_code_threshold > 0:
        codebook, cluster = restart_dead_codes(codebook, cluster, flat, jax.random.fold_in(key, 0),
                                               self.dead_code_threshold)
      return codebook, cluster

    if self.kmeans_init:
      def initialised():
        codes, k_counts = kmeans_codebook(flat, self.num_codes, jax.random.fold_in(key, 1),
                                          spherical=self.mode == "cosine_ema")
        return codes.astype(old_codebook.dtype), k_counts
      codebook, cluster = jax.lax.cond(jnp.sum(old_cluster) == 0, initialised, moved)
    else:
      codebook, cluster = moved()
    self.cluster_size[...] = cluster
    if self.mode == "cosine_ema" or self.dead_code_threshold > 0 or self.kmeans_init:
      # In "l2" mode this writes a Param outside the optimizer (restarted or initialised rows); see `PecoTokenizer`.
      self.codebook[...] = codebook
