"""The BEiT vision transformer (Bao et al., 2021) in Flax NNX.

One module covers the three uses of the original code:
  * a bare backbone           (num_classes=0, vocab_size=0)  -> hidden states [B, 1+N, D]
  * an image classifier       (num_classes>0)                -> logits [B, num_classes]
  * a masked-image-modeling model (vocab_size>0, mask token) -> visual-token logits [B, N, vocab_size]

Differences from a plain ViT, all following microsoft/unilm `beit/modeling_{pretrain,finetune}.py`:
relative position bias (one table per block, or one shared by all blocks), a qkv bias on q and v only,
LayerScale on both residual branches, stochastic depth, a learned mask token that replaces the embeddings of
masked patches before [CLS] and position embeddings are added, and mean pooling + `fc_norm` for classification.
Images are NHWC float32, normalised as the checkpoint expects.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from beit_jax.models import layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# Rematerialisation trades FLOPs for activation memory, per block (the residual stream between blocks is kept):
#   "none"  keep every activation (fastest; what fits for base models at the papers' per-device batch)
#   "dots"  keep the matmul outputs without a batch dimension of their own (jax's checkpoint_dots_with_no_batch_dims):
#           the projections and MLP matmuls are kept, the attention scores [B, H, T, T] and elementwise work
#           (GELU, LayerNorm, softmax) are recomputed: most of the memory for a small share of the FLOPs
#   "full"  keep only each block's input: a second forward pass per block, the least memory
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class BeitConfig:
  """Architecture and numerics of a BEiT model. JSON-serialisable (saved next to checkpoints)."""
  img_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  qkv_bias: bool = True                 # learned q and v biases (the key has none)
  layer_norm_eps: float = 1e-6
  use_abs_pos_emb: bool = False
  use_rel_pos_bias: bool = True         # one relative position table per block (fine-tuning layout)
  use_shared_rel_pos_bias: bool = False  # one table shared by all blocks (pre-training layout)
  layer_scale_init: float = 0.1         # LayerScale gamma init; 0 disables LayerScale
  drop_path_rate: float = 0.0           # stochastic depth, linearly increasing over the blocks
  num_classes: int = 0                  # > 0: classification head
  global_pool: str = "avg"              # "avg": mean of patch tokens + fc_norm; "token": [CLS] after norm
  head_init_scale: float = 0.001        # classification head weight and bias scaled after init
  vocab_size: int = 0                   # > 0: MIM head (LayerNorm -> Linear) over visual tokens
  use_mask_token: bool = False
  init_style: str = "finetune"          # "pretrain": trunc normal at +-1 sigma everywhere; "finetune": timm's
  dtype: str = "float32"                # compute dtype
  param_dtype: str = "float32"
  attention_impl: Optional[str] = "xla"  # "xla" (or None): attention written out; "cudnn": cuDNN's fused kernel
  remat: str = "none"                   # rematerialise each block in the backward pass: see REMAT_POLICIES

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"BeitConfig.{field}={getattr(self, field)!r}: {msg}")
    for f in ("img_size", "patch_size", "in_chans", "width", "depth", "num_heads"):
      check(isinstance(getattr(self, f), (int, np.integer)) and getattr(self, f) > 0, f, "must be a positive int")
    check(self.img_size % self.patch_size == 0, "img_size", f"must be a multiple of patch_size={self.patch_size}")
    check(self.width % self.num_heads == 0, "width", f"must be divisible by num_heads={self.num_heads}")
    check(self.mlp_ratio > 0 and round(self.width * self.mlp_ratio) >= 1, "mlp_ratio",
          f"must be > 0 and give an MLP of >= 1 unit (width {self.width} x mlp_ratio rounds to "
          f"{round(self.width * self.mlp_ratio) if self.mlp_ratio == self.mlp_ratio else 'nan'})")
    check(self.layer_scale_init >= 0, "layer_scale_init", "must be >= 0 (0 disables LayerScale)")
    check(0 <= self.drop_path_rate < 1, "drop_path_rate", "must be in [0, 1)")
    check(self.num_classes >= 0, "num_classes", "must be >= 0")
    check(self.vocab_size >= 0, "vocab_size", "must be >= 0")
    check(not (self.num_classes and self.vocab_size), "vocab_size",
          f"a model has either a MIM head or a classification head, not both (num_classes={self.num_classes})")
    check(self.global_pool in ("avg", "token"), "global_pool", "must be 'avg' or 'token'")
    check(self.init_style in ("pretrain", "finetune"), "init_style", "must be 'pretrain' or 'finetune'")
    check(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}")
    check(self.param_dtype in _DTYPES, "param_dtype", f"must be one of {sorted(_DTYPES)}")
    check(self.attention_impl in (None, "xla", "cudnn"), "attention_impl", "must be None, 'xla' or 'cudnn'")
    check(self.remat in REMAT_POLICIES, "remat", f"must be one of {sorted(REMAT_POLICIES)}")

  @property
  def grid(self) -> tuple[int, int]:
    return (self.img_size // self.patch_size,) * 2

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def mlp_dim(self) -> int:
    return int(round(self.width * self.mlp_ratio))

  @property
  def has_norm(self) -> bool:
    """The final LayerNorm exists unless mean pooling (with its own fc_norm) replaces it."""
    return bool(self.vocab_size) or self.global_pool == "token"

  @property
  def has_fc_norm(self) -> bool:
    return not self.vocab_size and self.global_pool == "avg"

  def replace(self, **overrides) -> "BeitConfig":
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"unknown BeitConfig field(s) {unknown}; known: {[f.name for f in dataclasses.fields(self)]}")
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def make_rngs(seed: int) -> nnx.Rngs:
  """Separate `params` and `dropout` streams: the weights a seed gives do not depend on drop_path_rate (a
  Dropout forks its stream at construction, which would advance a shared one)."""
  key = jax.random.key(seed)
  return nnx.Rngs(params=key, dropout=jax.random.fold_in(key, 1))


def _weight_init(cfg: BeitConfig) -> layers.Initializer:
  # unilm pre-training wraps trunc_normal_ with a=-std, b=std (+-1 sigma); fine-tuning uses timm's absolute
  # bounds of +-2, i.e. +-100 sigma at std 0.02, a plain normal in practice.
  return layers.trunc_normal(0.02, 1.0 if cfg.init_style == "pretrain" else 2.0 / 0.02)


def dot_product_attention(q, k, v, bias, scale):
  """softmax(q k^T * scale + bias) v for q, k, v [B, T, H, Dh] and bias [H, T, T] or None, with f32 logits and
  softmax. What jax.nn.dot_product_attention's XLA path computes, without its 5-D grouped-query layout, which
  cost ~0.7 s of a 2-core BEiT-B step on XLA:CPU (and gains nothing elsewhere: XLA fuses both the same way)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + layers.broadcast_batch(bias[None].astype(jnp.float32), q.shape[0])
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
  def __init__(self, cfg: BeitConfig, *, layer_id: int, own_rel_pos: bool, rngs: nnx.Rngs):
    d, h = cfg.width, cfg.num_heads
    hd = d // h
    pdt = _DTYPES[cfg.param_dtype]
    self.dtype = _DTYPES[cfg.dtype]
    self.scale = hd ** -0.5
    self.impl = cfg.attention_impl
    w_init = _weight_init(cfg)
    # q, k and v kernels stacked [3, D, H, Dh]: each one a plain [D, H*Dh] matmul whose head axis stays the
    # major one, so a heads-sharded (tensor-parallel) kernel needs no gather. Drawn in the [D, 3, H, Dh] order of
    # the fused kernel we had before, so a seed gives the same weights as the recorded miniature runs.
    self.qkv = layers.param(rngs, lambda key, shape, dtype: jnp.moveaxis(w_init(key, (d, 3, h, hd), dtype), 1, 0),
                            (3, d, h, hd), (None, "embed", "heads", "head_dim"), pdt)
    if cfg.qkv_bias:
      self.q_bias = layers.param(rngs, layers.zeros, (h, hd), ("heads", "head_dim"), pdt)
      self.v_bias = layers.param(rngs, layers.zeros, (h, hd), ("heads", "head_dim"), pdt)
    else:
      self.q_bias = self.v_bias = None
    # BEiT section 2.5: the output projections of block l are rescaled by 1/sqrt(2l) at init.
    self.proj = layers.param(rngs, layers.scaled(w_init, 1.0 / np.sqrt(2.0 * layer_id)), (h, hd, d),
                             ("heads", "head_dim", "embed"), pdt)
    self.proj_bias = layers.param(rngs, layers.zeros, (d,), ("embed",), pdt)
    self.rel_pos = (layers.RelativePositionBias(cfg.grid, h, param_dtype=pdt, rngs=rngs)
                    if own_rel_pos else None)

  def __call__(self, x, shared_bias=None):
    dt = self.dtype
    b, t, d = x.shape
    _, _, h, hd = self.qkv.shape
    # Flattened to 2-D matmuls: XLA:CPU lays out the 4-D einsums' operands with extra copies (~5% of the
    # miniature's step, benchmarks/NOTES_model_step.md). The same maths everywhere; timed on CPU only so far.
    x2, w = x.astype(dt).reshape(b * t, d), self.qkv[...].astype(dt)
    q, k, v = ((x2 @ w[i].reshape(d, h * hd)).reshape(b, t, h, hd) for i in range(3))
    if self.q_bias is not None:
      q = q + self.q_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    bias = shared_bias
    if self.rel_pos is not None:
      bias = self.rel_pos() if bias is None else bias + self.rel_pos()
    if self.impl == "cudnn":
      bias = None if bias is None else bias[None].astype(dt)  # [1, H, T, T]: the layout cuDNN can differentiate
      out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=self.scale, implementation="cudnn")
    else:
      out = dot_product_attention(q, k, v, bias, self.scale)
    out = out.reshape(b * t, h * hd) @ self.proj[...].astype(dt).reshape(h * hd, d)
    return out.reshape(b, t, d) + self.proj_bias[...].astype(dt)


class Mlp(nnx.Module):
  def __init__(self, cfg: BeitConfig, *, layer_id: int, rngs: nnx.Rngs):
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    w_init = _weight_init(cfg)
    self.fc1 = layers.Dense(cfg.width, cfg.mlp_dim, ("embed", "mlp"), kernel_init=w_init, dtype=dt,
                            param_dtype=pdt, rngs=rngs)
    self.fc2 = layers.Dense(cfg.mlp_dim, cfg.width, ("mlp", "embed"),
                            kernel_init=layers.scaled(w_init, 1.0 / np.sqrt(2.0 * layer_id)), dtype=dt,
                            param_dtype=pdt, rngs=rngs)

  def __call__(self, x):
    return self.fc2(layers.gelu(self.fc1(x)))


def _run_block(block, x, shared_bias):
  return block(x, shared_bias)


class Block(nnx.Module):
  """Pre-norm transformer block with optional LayerScale and stochastic depth."""

  def __init__(self, cfg: BeitConfig, *, layer_id: int, drop_path: float, rngs: nnx.Rngs):
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    norm = lambda: layers.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.norm1 = norm()
    self.attn = Attention(cfg, layer_id=layer_id, own_rel_pos=cfg.use_rel_pos_bias, rngs=rngs)
    self.norm2 = norm()
    self.mlp = Mlp(cfg, layer_id=layer_id, rngs=rngs)
    if cfg.layer_scale_init > 0:
      self.gamma_1 = layers.param(rngs, layers.constant(cfg.layer_scale_init), (cfg.width,), ("embed",), pdt)
      self.gamma_2 = layers.param(rngs, layers.constant(cfg.layer_scale_init), (cfg.width,), ("embed",), pdt)
    else:
      self.gamma_1 = self.gamma_2 = None
    # Stochastic depth = dropout of the whole residual branch per example: one mask value per sample.
    self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2), rngs=rngs) if drop_path > 0 else None

  def _residual(self, x, y, gamma):
    if gamma is not None:
      y = y * gamma[...].astype(y.dtype)
    if self.drop_path is not None:
      y = self.drop_path(y)
    return x + y

  def __call__(self, x, shared_bias=None):
    x = self._residual(x, self.attn(self.norm1(x), shared_bias), self.gamma_1)
    return self._residual(x, self.mlp(self.norm2(x)), self.gamma_2)


class Beit(nnx.Module):
  """BEiT backbone with an optional classification or MIM head. See the module docstring for outputs."""

  def __init__(self, cfg: BeitConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    d, p = cfg.width, cfg.patch_size
    dt, pdt = _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype]
    self.dtype = dt
    w_init = _weight_init(cfg)
    fan_in = p * p * cfg.in_chans
    # The fine-tuning model leaves the patch conv at PyTorch's default init; pre-training re-inits it.
    patch_init = w_init if cfg.init_style == "pretrain" else layers.torch_default_uniform(fan_in)
    self.patch_kernel = layers.param(rngs, patch_init, (p, p, cfg.in_chans, d),
                                     ("patch", "patch", "channels", "embed"), pdt)
    self.patch_bias = layers.param(
        rngs, layers.zeros if cfg.init_style == "pretrain" else layers.torch_default_uniform(fan_in),
        (d,), ("embed",), pdt)
    self.cls_token = layers.param(rngs, w_init, (1, 1, d), (None, None, "embed"), pdt)
    self.mask_token = (layers.param(rngs, w_init, (1, 1, d), (None, None, "embed"), pdt)
                       if cfg.use_mask_token else None)
    self.pos_embed = (layers.param(rngs, w_init, (1, cfg.num_patches + 1, d), (None, None, "embed"), pdt)
                      if cfg.use_abs_pos_emb else None)
    self.rel_pos = (layers.RelativePositionBias(cfg.grid, cfg.num_heads, param_dtype=pdt, rngs=rngs)
                    if cfg.use_shared_rel_pos_bias else None)
    rates = np.linspace(0.0, cfg.drop_path_rate, cfg.depth)
    self.blocks = nnx.List([Block(cfg, layer_id=i + 1, drop_path=float(rates[i]), rngs=rngs)
                            for i in range(cfg.depth)])
    norm = lambda: layers.LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.norm = norm() if cfg.has_norm else None
    self.fc_norm = norm() if cfg.has_fc_norm else None
    self.head = (layers.Dense(d, cfg.num_classes, ("embed", "classes"), dtype=dt, param_dtype=pdt, rngs=rngs,
                              kernel_init=layers.scaled(w_init, cfg.head_init_scale))
                 if cfg.num_classes else None)
    self.lm_head = (layers.Dense(d, cfg.vocab_size, ("embed", "vocab"), kernel_init=w_init, dtype=dt,
                                 param_dtype=pdt, rngs=rngs) if cfg.vocab_size else None)

  # -- pieces -----------------------------------------------------------------------------------------------
  def _check_inputs(self, images, bool_masked_pos):
    cfg = self.config
    want = (cfg.img_size, cfg.img_size, cfg.in_chans)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      hint = " (NCHW given? beit_jax takes NHWC)" if images.ndim == 4 and images.shape[1] == cfg.in_chans else ""
      raise ValueError(f"images must have shape [B, {want[0]}, {want[1]}, {want[2]}] (NHWC) for this model, "
                       f"got {tuple(images.shape)}{hint}")
    if bool_masked_pos is not None:
      if self.mask_token is None:
        raise ValueError("bool_masked_pos given but the model has no mask token (BeitConfig.use_mask_token=False)")
      if bool_masked_pos.shape not in ((images.shape[0], cfg.num_patches), (images.shape[0], *cfg.grid)):
        raise ValueError(f"bool_masked_pos must have shape [B, {cfg.num_patches}] or [B, {cfg.grid[0]}, "
                         f"{cfg.grid[1]}], got {tuple(bool_masked_pos.shape)}")

  def embed(self, images, bool_masked_pos=None):
    """Patch embedding, mask token, [CLS] and absolute position embedding -> [B, 1+N, D]."""
    b, p, dt = images.shape[0], self.config.patch_size, self.dtype
    gh, gw = self.config.grid
    x = images.astype(dt).reshape(b, gh, p, gw, p, self.config.in_chans)
    # A stride-p conv with a p x p kernel is one matmul over the flattened patches.
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x, self.patch_kernel[...].astype(dt)).reshape(b, gh * gw, -1)
    x = x + self.patch_bias[...].astype(dt)
    if bool_masked_pos is not None:
      mask = bool_masked_pos.reshape(b, gh * gw, 1).astype(bool)
      x = jnp.where(mask, self.mask_token[...].astype(dt), x)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    if self.pos_embed is not None:
      x = x + self.pos_embed[...].astype(dt)
    return x

  def encode(self, images, bool_masked_pos=None, *, return_hidden_states: bool = False):
    """Tokens after the last block and final norm [B, 1+N, D], and (optionally) all hidden states.

    The hidden states are the input of block 0 followed by the output of every block (depth+1 arrays, before
    the final norm), as HF transformers' `output_hidden_states`; linear probes and segmentation read them.
    """
    self._check_inputs(images, bool_masked_pos)
    x = self.embed(images, bool_masked_pos)
    shared = self.rel_pos() if self.rel_pos is not None else None
    hidden = [x] if return_hidden_states else None
    run = _run_block if self.config.remat == "none" else nnx.remat(
        _run_block, policy=REMAT_POLICIES[self.config.remat], prevent_cse=True)
    for block in self.blocks:
      x = run(block, layers.residual_grad_boundary(x), shared)
      if hidden is not None:
        hidden.append(x)
    if self.norm is not None:
      x = self.norm(x)
    return x, (tuple(hidden) if hidden is not None else None)

  def pool(self, tokens):
    """Image features [B, D]: mean of patch tokens + fc_norm, or the (normed) [CLS] token."""
    if self.config.global_pool == "avg":
      feats = tokens[:, 1:].astype(jnp.float32).mean(axis=1).astype(tokens.dtype)
      return self.fc_norm(feats) if self.fc_norm is not None else feats
    return tokens[:, 0]

  # -- public API -------------------------------------------------------------------------------------------
  def __call__(self, images, bool_masked_pos=None, *, return_hidden_states: bool = False):
    """Runs the model on NHWC images.

    Returns logits [B, num_classes] (f32) for a classifier; visual-token logits [B, N, vocab_size] (f32) at
    every patch position for a MIM model (use `masked_logits` for the masked positions only); otherwise the
    hidden states [B, 1+N, D] after the final norm. With return_hidden_states=True, returns (output,
    hidden_states) where hidden_states is as in `encode`.
    """
    tokens, hidden = self.encode(images, bool_masked_pos, return_hidden_states=return_hidden_states)
    if self.lm_head is not None:
      out = self.lm_head(tokens[:, 1:]).astype(jnp.float32)
    elif self.head is not None:
      out = self.head(self.pool(tokens)).astype(jnp.float32)
    else:
      out = tokens
    return (out, hidden) if return_hidden_states else out

  def masked_logits(self, images, bool_masked_pos, num_predict: int):
    """MIM logits at the masked positions only, in a fixed shape that suits jit.

    The masked count varies per image (blockwise masking gives ~74.5 of 75 on average), so the first
    `num_predict` masked positions of each image are gathered and padded with unmasked ones; `weights` marks
    which rows are real. Returns (logits [B, K, V] f32, positions [B, K] int32, weights [B, K] f32).
    `num_predict` must be >= the largest masked count, or masked positions are dropped (counted by weights).
    """
    if self.lm_head is None:
      raise ValueError("masked_logits needs a MIM head (BeitConfig.vocab_size > 0)")
    if bool_masked_pos is None:
      raise ValueError("masked_logits needs bool_masked_pos")
    if not 0 < num_predict <= self.config.num_patches:
      raise ValueError(f"num_predict={num_predict} must be in [1, {self.config.num_patches}]")
    tokens, _ = self.encode(images, bool_masked_pos)
    mask = bool_masked_pos.reshape(images.shape[0], -1).astype(bool)
    # A stable sort of ~mask lists masked positions first, in order.
    positions = jnp.argsort(~mask, axis=1, stable=True)[:, :num_predict].astype(jnp.int32)
    weights = jnp.take_along_axis(mask, positions, axis=1).astype(jnp.float32)
    picked = jnp.take_along_axis(tokens[:, 1:], positions[..., None], axis=1)
    return self.lm_head(picked).astype(jnp.float32), positions, weights
