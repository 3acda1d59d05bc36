"""OpenAI's DALL-E discrete VAE (the tokenizer of BEiT) in Flax NNX, and its weight converter.

Architecture as the `dall_e` package (encoder.py / decoder.py): a 7x7 stem, 4 groups of residual blocks whose
residual branch is scaled by 1/n_layers^2, 2x2 max-pooling after groups 1-3 (8x down), a 1x1 head to 8192
logits; the decoder mirrors it with nearest-neighbour upsampling and a 6-channel logit-Laplace output whose
first 3 channels, through a sigmoid and `unmap_pixels`, are the image. Tokens are the argmax of the logits.

Inputs are NHWC float32 in [0, 1]; `map_pixels` (0.1 + 0.8x) is applied inside `DalleTokenizer.encode`.
Parameter names follow the PyTorch state dict (`blocks.group_1.block_1.res_path.conv_1.w`), so conversion is
a layout change only (OIHW -> HWIO).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from beit_jax.tokenizers import state_dicts


LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x):
  return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x):
  return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


@dataclasses.dataclass(frozen=True)
class DalleConfig:
  group_count: int = 4
  n_hid: int = 256
  n_blk_per_group: int = 2
  channels: int = 3
  vocab_size: int = 8192
  n_init: int = 128  # decoder only
  dtype: str = "float32"  # compute dtype of the convolutions (the logits head stays f32, as the original)

  @property
  def n_layers(self) -> int:
    return self.group_count * self.n_blk_per_group


class Conv(nnx.Module):
  """`dall_e.utils.Conv2d`: 'same' padding, weights N(0, 1/fan_in), zero bias."""

  def __init__(self, n_in: int, n_out: int, kw: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (kw, kw, n_in, n_out)) / np.sqrt(n_in * kw * kw))
    self.b = nnx.Param(jnp.zeros((n_out,)))
    self.dtype = dtype

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.w[...].astype(self.dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.b[...].astype(self.dtype)


class Block(nnx.Module):
  """id_path(x) + (1 / n_layers^2) * res_path(x); res_path = 4 x (ReLU, conv), hidden width n_out / 4."""

  def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int], *, dtype,
               rngs: nnx.Rngs):
    hid = n_out // 4
    self.id_path = Conv(n_in, n_out, 1, dtype=dtype, rngs=rngs) if n_in != n_out else None
    widths = [n_in, hid, hid, hid, n_out]
    self.res_path = nnx.List([Conv(widths[i], widths[i + 1], kernels[i], dtype=dtype, rngs=rngs) for i in range(4)])
    self.post_gain = 1.0 / n_layers ** 2

  def __call__(self, x):
    h = x
    for conv in self.res_path:
      h = conv(jax.nn.relu(h))
    return (self.id_path(x) if self.id_path is not None else x) + self.post_gain * h


def _max_pool(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Encoder(nnx.Module):
  def __init__(self, cfg: DalleConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    h = cfg.n_hid
    self.input = Conv(cfg.channels, h, 7, dtype=dt, rngs=rngs)
    widths = [h * 2 ** g for g in range(cfg.group_count)]  # 1, 2, 4, 8 x n_hid
    groups = []
    for g in range(cfg.group_count):
      n_in = h if g == 0 else widths[g - 1]
      groups.append(nnx.List([Block(n_in if i == 0 else widths[g], widths[g], cfg.n_layers, (3, 3, 3, 1), dtype=dt,
                                    rngs=rngs) for i in range(cfg.n_blk_per_group)]))
    self.groups = nnx.List(groups)
    self.output = Conv(widths[-1], cfg.vocab_size, 1, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    """x: NHWC in the mapped pixel range -> logits [B, H/8, W/8, vocab] f32."""
    x = self.input(x)
    for g, group in enumerate(self.groups):
      for block in group:
        x = block(x)
      if g < len(self.groups) - 1:
        x = _max_pool(x)
    return self.output(jax.nn.relu(x).astype(jnp.float32))


class Decoder(nnx.Module):
  def __init__(self, cfg: DalleConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.dtype)
    h = cfg.n_hid
    self.input = Conv(cfg.vocab_size, cfg.n_init, 1, dtype=jnp.float32, rngs=rngs)
    widths = [h * 2 ** (cfg.group_count - 1 - g) for g in range(cfg.group_count)]  # 8, 4, 2, 1 x n_hid
    groups = []
    for g in range(cfg.group_count):
      n_in = cfg.n_init if g == 0 else widths[g - 1]
      groups.append(nnx.List([Block(n_in if i == 0 else widths[g], widths[g], cfg.n_layers, (1, 3, 3, 3), dtype=dt,
                                    rngs=rngs) for i in range(cfg.n_blk_per_group)]))
    self.groups = nnx.List(groups)
    self.output = Conv(widths[-1], 2 * cfg.channels, 1, dtype=dt, rngs=rngs)

  def stats(self, x):
    """x: the output of the input conv [B, h, w, n_init] -> logit-Laplace statistics [B, 8h, 8w, 2C] f32."""
    for g, group in enumerate(self.groups):
      for block in group:
        x = block(x)
      if g < len(self.groups) - 1:
        x = _upsample(x)
    return self.output(jax.nn.relu(x)).astype(jnp.float32)

  def __call__(self, z):
    """z: one-hot (or soft) codes [B, h, w, vocab] -> statistics [B, 8h, 8w, 2C] (as the PyTorch decoder)."""
    return self.stats(self.input(z.astype(jnp.float32)))

  def from_ids(self, ids):
    """Token ids [B, h, w] -> statistics: the 1x1 input conv of a one-hot is a row lookup, no 8192-wide matmul."""
    x = jnp.take(self.input.w[...][0, 0], ids, axis=0) + self.input.b[...]
    return self.stats(x)


class DalleTokenizer(nnx.Module):
  """The BEiT tokenizer: `encode(images) -> ids [B, H/8, W/8]`, `decode(ids) -> images` (with a decoder).

  Images are NHWC float32 in [0, 1] at `input_size` (112 for BEiT's 14x14 tokens).
  """
  input_size = 112
  normalization = "[0, 1], mapped inside by DALL-E's map_pixels (0.1 + 0.8x)"

  def __init__(self, cfg: DalleConfig = DalleConfig(), *, decoder: bool = True, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs) if decoder else None

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  def logits(self, images):
    return self.encoder(map_pixels(images.astype(jnp.float32)))

  def encode(self, images):
    if images.ndim != 4 or images.shape[-1] != self.config.channels:
      raise ValueError(f"DALL-E encode takes NHWC images with {self.config.channels} channels in [0, 1], "
                       f"got shape {tuple(images.shape)}")
    return jnp.argmax(self.logits(images), axis=-1).astype(jnp.int32)

  def decode(self, ids):
    if self.decoder is None:
      raise ValueError("this DALL-E tokenizer was loaded without a decoder (pass decoder=PATH to load it)")
    stats = self.decoder.from_ids(ids)
    return unmap_pixels(jax.nn.sigmoid(stats[..., :self.config.channels]))


# ---------------------------------------------------------------------------------------------------------------
# Conversion from PyTorch
# ---------------------------------------------------------------------------------------------------------------
def _torch_names(module: nnx.Module, kind: str) -> dict[tuple, str]:
  """Our parameter paths -> the `dall_e` state-dict names."""
  out = {}
  for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    if path[0] in ("input", "output"):
      name = "blocks.input" if path[0] == "input" else "blocks.output.conv"
      out[path] = f"{name}.{path[-1]}"
    else:  # ("groups", g, i, "id_path" | ("res_path", j), "w"|"b")
      g, i = path[1], path[2]
      inner = "id_path" if path[3] == "id_path" else f"res_path.conv_{path[4] + 1}"
      out[path] = f"blocks.group_{g + 1}.block_{i + 1}.{inner}.{path[-1]}"
  del kind
  return out


def infer_config(sd: Mapping[str, np.ndarray], kind: str) -> DalleConfig:
  groups = {int(k.split(".")[1].split("_")[1]) for k in sd if k.startswith("blocks.group_")}
  blocks = {int(k.split(".")[2].split("_")[1]) for k in sd if k.startswith("blocks.group_1.")}
  if not groups:
    raise ValueError(f"not a DALL-E {kind} state dict: no blocks.group_N tensors (keys {sorted(sd)[:5]})")
  w_in, w_out = sd["blocks.input.w"], sd["blocks.output.conv.w"]
  if kind == "encoder":
    n_hid = w_in.shape[0]
    return DalleConfig(group_count=len(groups), n_hid=n_hid, n_blk_per_group=len(blocks), channels=w_in.shape[1],
                       vocab_size=w_out.shape[0])
  n_hid = w_out.shape[1]
  return DalleConfig(group_count=len(groups), n_hid=n_hid, n_blk_per_group=len(blocks), channels=w_out.shape[0] // 2,
                     vocab_size=w_in.shape[1], n_init=w_in.shape[0])


def load_state_dict(module: nnx.Module, sd: Mapping[str, np.ndarray], kind: str) -> None:
  """Fills an Encoder/Decoder from a `dall_e` state dict (OIHW); a missing or misshapen tensor is named."""
  state_dicts.load_params(module, sd, _torch_names(module, kind), f"DALL-E {kind} checkpoint")


def _dall_e_safe_globals():
  """The classes an OpenAI encoder.pkl/decoder.pkl pickle may name: dall_e's modules and the torch.nn modules
  they hold. torch.load(weights_only=True) with exactly these allowed never runs other code."""
  import collections  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  try:
    from dall_e import decoder, encoder, utils  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("reading OpenAI's DALL-E pickles needs the dall_e package: pip install --no-deps "
                      "dall-e==0.1 (or convert them elsewhere to a state dict / safetensors)") from None
  return [encoder.Encoder, encoder.EncoderBlock, decoder.Decoder, decoder.DecoderBlock, utils.Conv2d,
          torch.nn.Sequential, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.Identity, torch.nn.Upsample,
          collections.OrderedDict, torch.device, torch.nn.modules.container.Sequential]


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A DALL-E encoder/decoder as numpy tensors: OpenAI's pickled module (needs the dall_e package), a torch
  state dict (.pt/.pth/.bin, weights only) or .safetensors."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"DALL-E checkpoint {path} does not exist")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return load_file(str(path))
  import pickle  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from beit_jax.convert.pytorch import UnsafeCheckpointError  # pylint: disable=import-outside-toplevel
  allowed = _dall_e_safe_globals() if path.suffix == ".pkl" else []
  try:
    with torch.serialization.safe_globals(allowed):
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f"refusing to load {path}: the pickle names Python objects beyond tensors, plain containers and (for .pkl) "
        f"dall_e's own modules, so loading it could run code. Detail: {str(e).splitlines()[0]}") from None
  if isinstance(obj, torch.nn.Module):
    obj = obj.state_dict()
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a DALL-E module or state dict")
  return {k: v.detach().float().numpy() for k, v in obj.items()}


def load(encoder: str | pathlib.Path, decoder: Optional[str | pathlib.Path] = None, *,
         dtype: str = "float32") -> DalleTokenizer:
  """The DALL-E tokenizer from OpenAI's `encoder.pkl` (and optionally `decoder.pkl`) or converted files."""
  enc_sd = read_state_dict(encoder)
  cfg = dataclasses.replace(infer_config(enc_sd, "encoder"), dtype=dtype)
  dec_sd = read_state_dict(decoder) if decoder is not None else None
  if dec_sd is not None:
    dcfg = infer_config(dec_sd, "decoder")
    if dcfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"decoder vocabulary {dcfg.vocab_size} != encoder vocabulary {cfg.vocab_size}")
    cfg = dataclasses.replace(cfg, n_init=dcfg.n_init)
  tok = DalleTokenizer(cfg, decoder=dec_sd is not None, rngs=nnx.Rngs(0))
  load_state_dict(tok.encoder, enc_sd, "encoder")
  if dec_sd is not None:
    load_state_dict(tok.decoder, dec_sd, "decoder")
  return tok


def export_state_dict(module: nnx.Module, kind: str) -> dict[str, np.ndarray]:
  """An Encoder/Decoder as a `dall_e` state dict (names and OIHW layout), loadable by the PyTorch modules."""
  out = {}
  names = _torch_names(module, kind)
  for path_, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    v = np.asarray(var.get_value(), np.float32)
    out[names[path_]] = np.ascontiguousarray(v.transpose(3, 2, 0, 1) if v.ndim == 4 else v)
  return out


def save_safetensors(module: nnx.Module, path: str | pathlib.Path, kind: str) -> None:
  """Writes an Encoder/Decoder under the `dall_e` names (OIHW): convert OpenAI's pickles once, load this after."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(export_state_dict(module, kind), str(path))
