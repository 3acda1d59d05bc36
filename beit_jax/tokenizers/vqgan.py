"""The PeCo tokenizer: a VQGAN (taming-transformers) conv encoder/decoder around a vector quantizer, in Flax NNX.

Layout as taming/modules/diffusionmodules/model.py (Encoder/Decoder, no timestep embedding):
  encoder  conv_in 3x3 -> levels i = 0..L-1 [num_res_blocks ResnetBlocks (+ AttnBlock after each at the resolutions
           in attn_resolutions), then a stride-2 conv except on the last level] -> mid (res, attn, res)
           -> GroupNorm, swish, conv_out 3x3 to z_channels.
  decoder  conv_in 3x3 -> mid -> levels i = L-1..0 [num_res_blocks + 1 ResnetBlocks (+ attn), then nearest 2x
           upsample + conv 3x3 except on level 0] -> GroupNorm, swish, conv_out 3x3 to the image channels.
  tokenizer  encoder -> quant_conv 1x1 -> VectorQuantizer -> post_quant_conv 1x1 -> decoder (taming VQModel).
`levels[i]` works at resolution input_size / 2^i in both the encoder and the decoder (taming's `down[i]` / `up[i]`),
so a taming state dict maps onto ours level by level. Convolutions keep PyTorch's default init, as taming does.

Tensors are NHWC; parameters f32; `dtype` is the compute dtype of the convolutions and attention (GroupNorm
statistics and the quantizer always run in f32). Images enter in [0, 1] and are mapped to the config's
normalisation inside ([-1, 1] for VQGAN).

  tok = create_tokenizer("peco_test_tiny")
  recon, aux = tok(images)          # training: recon in [0, 1] space (not clipped), aux["loss"] = codebook loss
  ids = tok.encode(images)          # int32 [B, h, w]
  images = tok.decode(ids)          # [B, H, W, C] in [0, 1]
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from beit_jax.models import layers
from beit_jax.tokenizers import vq

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Image normalisation of the tokenizer's input: name -> (mean, std) applied to [0, 1] pixels.
NORMALIZATIONS = {"minus_one_one": (0.5, 0.5), "zero_one": (0.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class PecoConfig:
  """Architecture, quantizer and input of a PeCo/VQGAN tokenizer. Defaults: taming's imagenet_vqgan f16 at 224 px."""
  input_size: int = 224
  channels: int = 3                     # 3 (RGB) or 1 (grayscale)
  ch: int = 128                         # base width; level i has ch * ch_mult[i] channels
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len - 1 stride-2 steps: (1,1,2,2,4) -> 16x down, 224 -> 14x14 tokens
  num_res_blocks: int = 2               # per encoder level (the decoder has one more, as taming)
  attn_resolutions: tuple[int, ...] = (14,)   # feature-map sizes that get self-attention after each res block
  mid_attn: bool = True                 # self-attention between the two middle res blocks
  norm_groups: int = 32                 # GroupNorm groups; gcd(norm_groups, width) where a width is small
  z_channels: int = 256                 # encoder output / decoder input width
  embed_dim: int = 256                  # code width (quant_conv maps z_channels -> embed_dim)
  vocab_size: int = 8192                # codebook size K (DALL-E's, which PeCo keeps)
  quantizer: str = "l2"                 # "l2" (VQGAN) or "cosine_ema" (BEiT v2's normalised EMA codebook)
  beta: Optional[float] = None          # commitment weight; None: 0.25 for "l2", 1.0 for "cosine_ema"
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  dead_code_threshold: float = 0.0      # > 0: restart codes whose EMA count per step falls below it
  kmeans_init: bool = False             # the first training batch's encodings set the codebook by k-means
  normalization: str = "minus_one_one"  # how [0, 1] images are mapped before the encoder (see NORMALIZATIONS)
  dtype: str = "float32"                # compute dtype

  def __post_init__(self):
    def check(cond, field, msg):
      if not cond:
        raise ValueError(f"PecoConfig.{field}={getattr(self, field)!r}: {msg}")
    for f in ("ch_mult", "attn_resolutions"):  # JSON gives lists; keep the config hashable
      check(isinstance(getattr(self, f), (tuple, list)), f, "must be a tuple of ints")
      object.__setattr__(self, f, tuple(getattr(self, f)))
    for f in ("input_size", "ch", "num_res_blocks", "norm_groups", "z_channels", "embed_dim"):
      check(isinstance(getattr(self, f), (int, np.integer)) and getattr(self, f) > 0, f, "must be a positive int")
    check(self.channels in (1, 3), "channels", "must be 1 (grayscale) or 3 (RGB)")
    check(len(self.ch_mult) >= 1 and all(isinstance(m, (int, np.integer)) and m > 0 for m in self.ch_mult),
          "ch_mult", "must be a non-empty tuple of positive ints")
    check(self.input_size % self.downsample_factor == 0, "input_size",
          f"must be a multiple of the downsampling factor {self.downsample_factor} (2^(len(ch_mult) - 1))")
    check(all(r in self.level_resolutions for r in self.attn_resolutions), "attn_resolutions",
          f"each must be a level resolution of this config {self.level_resolutions}, or it would never apply")
    check(self.vocab_size >= 2, "vocab_size", "must be >= 2")
    check(self.quantizer in vq.MODES, "quantizer", f"must be one of {vq.MODES}")
    check(self.beta is None or self.beta >= 0, "beta", "must be >= 0 or None (the quantizer's default)")
    check(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
    check(self.ema_eps > 0, "ema_eps", "must be > 0")
    check(self.dead_code_threshold >= 0, "dead_code_threshold", "must be >= 0 (0 disables restarts)")
    check(self.normalization in NORMALIZATIONS, "normalization", f"must be one of {sorted(NORMALIZATIONS)}")
    check(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def level_resolutions(self) -> tuple[int, ...]:
    return tuple(self.input_size // 2 ** i for i in range(len(self.ch_mult)))

  @property
  def grid(self) -> tuple[int, int]:
    """The token grid (h, w)."""
    return (self.input_size // self.downsample_factor,) * 2

  def replace(self, **overrides) -> "PecoConfig":
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(f"unknown PecoConfig field(s) {unknown}; known: {[f.name for f in dataclasses.fields(self)]}")
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
class Conv(nnx.Module):
  """k x k convolution, NHWC x HWIO. Default init = PyTorch's Conv2d default (weight and bias U(+-1/sqrt(fan_in))).

  `padding` is ((top, bottom), (left, right)); default k // 2 on every side (PyTorch's padding=k//2).
  """

  def __init__(self, din: int, dout: int, kernel: int = 3, *, stride: int = 1,
               padding: Optional[Sequence[tuple[int, int]]] = None, use_bias: bool = True,
               kernel_init: Optional[layers.Initializer] = None, dtype=jnp.float32, rngs: nnx.Rngs):
    default = layers.torch_default_uniform(din * kernel * kernel)
    self.kernel = layers.param(rngs, kernel_init or default, (kernel, kernel, din, dout),
                               (None, None, "conv_in", "conv_out"))
    self.bias = layers.param(rngs, default, (dout,), ("conv_out",)) if use_bias else None
    self.stride = stride
    self.padding = tuple(tuple(p) for p in padding) if padding is not None else ((kernel // 2,) * 2,) * 2
    self.dtype = dtype

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype) if self.bias is not None else y


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, channels of a group) with statistics in f32; eps 1e-6 as taming's Normalize.

  The group count is gcd(groups, channels): 32 for VQGAN's widths (128..512), fewer for the narrow test models.
  """

  def __init__(self, channels: int, groups: int = 32, *, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    self.groups = math.gcd(groups, channels)
    self.eps = eps
    self.dtype = dtype
    self.scale = layers.param(rngs, layers.ones, (channels,), ("conv_out",))
    self.bias = layers.param(rngs, layers.zeros, (channels,), ("conv_out",))

  def __call__(self, x):
    b, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = x32.mean((1, 2, 4), keepdims=True)
    var = jnp.square(x32 - mean).mean((1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def swish(x):
  return x * jax.nn.sigmoid(x)


def upsample_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResnetBlock(nnx.Module):
  """x + conv(swish(norm(conv(swish(norm(x)))))), with a 1x1 conv on the shortcut when the width changes."""

  def __init__(self, din: int, dout: int, *, groups: int, dtype, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(din, groups, dtype=dtype, rngs=rngs)
    self.conv1 = Conv(din, dout, 3, dtype=dtype, rngs=rngs)
    self.norm2 = GroupNorm(dout, groups, dtype=dtype, rngs=rngs)
    self.conv2 = Conv(dout, dout, 3, dtype=dtype, rngs=rngs)
    self.nin_shortcut = Conv(din, dout, 1, dtype=dtype, rngs=rngs) if din != dout else None

  def __call__(self, x):
    h = self.conv1(swish(self.norm1(x)))
    h = self.conv2(swish(self.norm2(h)))
    return (self.nin_shortcut(x) if self.nin_shortcut is not None else x.astype(h.dtype)) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all H*W positions, 1x1 convs for q, k, v and the output, residual."""

  def __init__(self, channels: int, *, groups: int, dtype, rngs: nnx.Rngs):
    self.norm = GroupNorm(channels, groups, dtype=dtype, rngs=rngs)
    self.q, self.k, self.v, self.proj_out = (Conv(channels, channels, 1, dtype=dtype, rngs=rngs) for _ in range(4))

  def __call__(self, x):
    b, h, w, c = x.shape
    n = self.norm(x)
    heads = lambda t: t.reshape(b, h * w, 1, c)  # [B, T, heads=1, C]
    out = jax.nn.dot_product_attention(heads(self.q(n)), heads(self.k(n)), heads(self.v(n)))  # scale C^-0.5
    return x.astype(out.dtype) + self.proj_out(out.reshape(b, h, w, c))


class Level(nnx.Module):
  """The res blocks (+ attention) of one resolution and the resampling conv that follows them (or None)."""

  def __init__(self, widths: Sequence[int], attn: bool, resample: Optional[str], *, groups: int, dtype,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([ResnetBlock(widths[i], widths[i + 1], groups=groups, dtype=dtype, rngs=rngs)
                            for i in range(len(widths) - 1)])
    self.attn = nnx.List([AttnBlock(w, groups=groups, dtype=dtype, rngs=rngs) for w in widths[1:]] if attn else [])
    out = widths[-1]
    if resample == "down":  # taming pads (0, 1, 0, 1) and convolves 3x3 with stride 2, no padding
      self.resample = Conv(out, out, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
    elif resample == "up":  # nearest 2x, then a 3x3 conv
      self.resample = Conv(out, out, 3, dtype=dtype, rngs=rngs)
    else:
      self.resample = None
    self.upsample = resample == "up"

  def __call__(self, x):
    for i, block in enumerate(self.blocks):
      x = block(x)
      if self.attn:
        x = self.attn[i](x)
    if self.resample is not None:
      x = self.resample(upsample_nearest(x) if self.upsample else x)
    return x


class Mid(nnx.Module):
  def __init__(self, channels: int, attn: bool, *, groups: int, dtype, rngs: nnx.Rngs):
    self.block_1 = ResnetBlock(channels, channels, groups=groups, dtype=dtype, rngs=rngs)
    self.attn_1 = AttnBlock(channels, groups=groups, dtype=dtype, rngs=rngs) if attn else None
    self.block_2 = ResnetBlock(channels, channels, groups=groups, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.block_1(x)
    if self.attn_1 is not None:
      x = self.attn_1(x)
    return self.block_2(x)


class Encoder(nnx.Module):
  """Images [B, S, S, C] (normalised) -> z [B, S/f, S/f, z_channels] f32."""

  def __init__(self, cfg: PecoConfig, *, rngs: nnx.Rngs):
    dt, g = _DTYPES[cfg.dtype], cfg.norm_groups
    widths = [cfg.ch * m for m in (1,) + tuple(cfg.ch_mult)]  # widths[i] enters level i, widths[i + 1] leaves it
    last = len(cfg.ch_mult) - 1
    self.conv_in = Conv(cfg.channels, cfg.ch, 3, dtype=dt, rngs=rngs)
    self.levels = nnx.List([
        Level([widths[i]] + [widths[i + 1]] * cfg.num_res_blocks, cfg.level_resolutions[i] in cfg.attn_resolutions,
              "down" if i < last else None, groups=g, dtype=dt, rngs=rngs)
        for i in range(len(cfg.ch_mult))])
    self.mid = Mid(widths[-1], cfg.mid_attn, groups=g, dtype=dt, rngs=rngs)
    self.norm_out = GroupNorm(widths[-1], g, dtype=dt, rngs=rngs)
    self.conv_out = Conv(widths[-1], cfg.z_channels, 3, dtype=dt, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.levels:
      x = level(x)
    return self.conv_out(swish(self.norm_out(self.mid(x)))).astype(jnp.float32)


class Decoder(nnx.Module):
  """z [B, S/f, S/f, z_channels] -> images [B, S, S, C] f32 in the normalised range (not clipped)."""

  def __init__(self, cfg: PecoConfig, *, rngs: nnx.Rngs):
    dt, g = _DTYPES[cfg.dtype], cfg.norm_groups
    widths = [cfg.ch * m for m in cfg.ch_mult]
    top = widths[-1]
    self.conv_in = Conv(cfg.z_channels, top, 3, dtype=dt, rngs=rngs)
    self.mid = Mid(top, cfg.mid_attn, groups=g, dtype=dt, rngs=rngs)
    # Level i takes the width of level i + 1 (the one run before it) to widths[i] over num_res_blocks + 1 blocks.
    entering = widths[1:] + [top]
    self.levels = nnx.List([
        Level([entering[i]] + [widths[i]] * (cfg.num_res_blocks + 1),
              cfg.level_resolutions[i] in cfg.attn_resolutions, "up" if i > 0 else None, groups=g, dtype=dt,
              rngs=rngs)
        for i in range(len(cfg.ch_mult))])
    self.norm_out = GroupNorm(widths[0], g, dtype=dt, rngs=rngs)
    self.conv_out = Conv(widths[0], cfg.channels, 3, dtype=dt, rngs=rngs)

  def __call__(self, z):
    x = self.mid(self.conv_in(z))
    for level in reversed(self.levels):
      x = level(x)
    return self.conv_out(swish(self.norm_out(x))).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------
class PecoTokenizer(nnx.Module):
  """encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> decoder, behind the tokenizer interface.

  Train mode (`tok.train()`, the default for new modules) lets `__call__` update the quantizer's EMA state;
  `encode`/`decode` never do. In "l2" mode with dead-code restarts, restarted codebook rows are written in the
  forward pass, outside the optimizer (their Adam moments are whatever they were).
  """

  def __init__(self, cfg: PecoConfig = PecoConfig(), *, rngs: nnx.Rngs):
    self.config = cfg
    dt = _DTYPES[cfg.dtype]
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = Conv(cfg.z_channels, cfg.embed_dim, 1, dtype=dt, rngs=rngs)
    self.quantizer = vq.VectorQuantizer(cfg.vocab_size, cfg.embed_dim, mode=cfg.quantizer, beta=cfg.beta,
                                        decay=cfg.ema_decay, eps=cfg.ema_eps,
                                        dead_code_threshold=cfg.dead_code_threshold, kmeans_init=cfg.kmeans_init,
                                        rngs=rngs)
    self.post_quant_conv = Conv(cfg.embed_dim, cfg.z_channels, 1, dtype=dt, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  # -- the tokenizer interface --------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def input_size(self) -> int:
    return self.config.input_size

  @property
  def normalization(self) -> str:
    mean, std = NORMALIZATIONS[self.config.normalization]
    return f"[0, 1], mapped inside to (x - {mean}) / {std} ({self.config.normalization})"

  @property
  def grid(self) -> tuple[int, int]:
    return self.config.grid

  @property
  def last_layer(self) -> nnx.Param:
    """The decoder's output kernel: taming's adaptive GAN weight compares gradients with respect to it."""
    return self.decoder.conv_out.kernel

  # -- pieces -------------------------------------------------------------------------------------------------
  def _normalize(self, images):
    cfg = self.config
    want = (cfg.input_size, cfg.input_size, cfg.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"PeCo tokenizer takes NHWC images of shape [B, {want[0]}, {want[1]}, {want[2]}] in [0, 1], "
                       f"got {tuple(images.shape)}")
    mean, std = NORMALIZATIONS[cfg.normalization]
    return (images.astype(jnp.float32) - mean) / std

  def _denormalize(self, x):
    mean, std = NORMALIZATIONS[self.config.normalization]
    return x * std + mean

  def encodings(self, images):
    """Pre-quantisation encodings [B, h, w, embed_dim] f32."""
    return self.quant_conv(self.encoder(self._normalize(images))).astype(jnp.float32)

  def decode_codes(self, codes):
    """Code vectors [B, h, w, embed_dim] -> images in [0, 1] space, not clipped (what the losses see)."""
    return self._denormalize(self.decoder(self.post_quant_conv(codes)))

  # -- public API -------------------------------------------------------------------------------------------
  def __call__(self, images, *, update: Optional[bool] = None, key: Optional[jax.Array] = None):
    """Training pass: images [B, S, S, C] in [0, 1] -> (recon, aux).

    recon is in [0, 1] space but *not clipped* (clipping would zero the gradient of saturated pixels); aux holds
    the quantizer's "loss" (codebook + commitment, weighted), "perplexity", "usage" and the "ids" [B, h, w].
    `update`/`key` go to the quantizer (default: update in train mode).
    """
    z_q, ids, aux = self.quantizer(self.encodings(images), update=update, key=key)
    return self.decode_codes(z_q), {**aux, "ids": ids}

  def encode(self, images):
    """Images [B, S, S, C] in [0, 1] -> token ids int32 [B, h, w]; no state change."""
    return self.quantizer.quantize(self.encodings(images))[1]

  def decode(self, ids):
    """Token ids [B, h, w] -> images [B, S, S, C] in [0, 1] (clipped)."""
    return jnp.clip(self.decode_codes(self.quantizer.lookup(ids)), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Named configs
# ---------------------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, PecoConfig] = {
    # taming configs/imagenet_vqgan.yaml (f16) at BEiT's 224 px: 14x14 tokens, attention at 14 (taming: 16 at 256).
    "peco_vqgan_f16": PecoConfig(),
    # Tests: 28x28 grayscale (Fashion-MNIST as is) -> 14x14 tokens; seconds per step on CPU.
    "peco_test_tiny": PecoConfig(input_size=28, channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                                 attn_resolutions=(), mid_attn=False, z_channels=16, embed_dim=16, vocab_size=64),
    # CPU demo: Fashion-MNIST at 28 px -> 7x7 tokens from a 128-code BEiT v2-style codebook (low-dimensional,
    # normalised, EMA), initialised by k-means on the first batch's encodings, dead codes restarted by D^2
    # sampling. 128 codes, not 512: a 4 px patch of a grey garment has few distinct looks, and with 512 codes
    # black background alone took 308 synonymous codes (the most frequent 2% of its patches; BENCHMARKS.md).
    "peco_fmnist_small": PecoConfig(input_size=28, channels=1, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                                    attn_resolutions=(), mid_attn=False, z_channels=64, embed_dim=32,
                                    vocab_size=128, quantizer="cosine_ema", dead_code_threshold=0.5,
                                    kmeans_init=True),
}


def list_tokenizers() -> list[str]:
  return sorted(_REGISTRY)


def get_config(name: str, **overrides) -> PecoConfig:
  """The PecoConfig of a named tokenizer with `overrides` applied (unknown fields raise)."""
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, _REGISTRY, n=3)
    raise ValueError(f"unknown PeCo tokenizer {name!r}" + (f"; did you mean {close}?" if close else "")
                     + f" Known: {list_tokenizers()}")
  return _REGISTRY[name].replace(**overrides)


def create_tokenizer(name: str, *, seed: int = 0, rngs: Optional[nnx.Rngs] = None, **overrides) -> PecoTokenizer:
  """Builds a named tokenizer, e.g. `create_tokenizer("peco_fmnist_small", vocab_size=1024)`.

  The default rngs have separate `params` and `codebook` (dead-code restart) streams, so the weights a seed gives do
  not depend on whether restarts are on.
  """
  if rngs is None:
    key = jax.random.key(seed)
    rngs = nnx.Rngs(params=key, codebook=jax.random.fold_in(key, 1))
  return PecoTokenizer(get_config(name, **overrides), rngs=rngs)


__all__ = ["PecoConfig", "PecoTokenizer", "Encoder", "Decoder", "create_tokenizer", "get_config",
           "list_tokenizers"]
