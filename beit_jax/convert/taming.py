"""taming-transformers VQGAN state dicts <-> our PeCo tokenizer (beit_jax.tokenizers.vqgan).

taming's names (taming/models/vqgan.py VQModel, taming/modules/diffusionmodules/model.py Encoder/Decoder) map
onto our parameter paths one to one, so a VQGAN trained there can be tokenised with here and back:

  encoder.down.{i}.block.{j}.norm1.weight      encoder/levels/i/blocks/j/norm1/scale      (GroupNorm: weight = scale)
  encoder.down.{i}.attn.{j}.q.weight           encoder/levels/i/attn/j/q/kernel           (conv: OIHW -> HWIO)
  encoder.down.{i}.downsample.conv.bias        encoder/levels/i/resample/bias
  decoder.up.{i}.upsample.conv.weight          decoder/levels/i/resample/kernel
  {encoder,decoder}.{conv_in,conv_out,norm_out,mid.block_1,mid.attn_1,mid.block_2}...   the same names
  quant_conv.*, post_quant_conv.*              quant_conv/*, post_quant_conv/*
  quantize.embedding.weight                    quantizer/codebook                         ("l2" quantizer only)

Both number levels by resolution (taming's `up[i]` is stored in resolution order although it runs last to first),
so no index is reversed. taming's GroupNorm always has 32 groups, ours gcd(32, width): the same for every width
that is a multiple of 32, which all of taming's configs are. A VQModel checkpoint's training-only tensors
(`loss.*`: the discriminator and LPIPS) are skipped. The arrays come from anywhere, e.g.
`beit_jax.convert.pytorch.read_state_dict(path)` on a Lightning `.ckpt` (its `state_dict`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from beit_jax.tokenizers import state_dicts, vqgan

_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
SKIPPED_PREFIXES = ("loss.",)  # a VQModel checkpoint's discriminator and perceptual network


def _coder_name(path: tuple, kind: str) -> str:
  """An Encoder/Decoder parameter path -> taming's name inside that Encoder/Decoder."""
  *body, leaf = path
  parts = []
  i = 0
  while i < len(body):
    if body[i] == "levels":  # ("levels", L, "blocks" | "attn", j, ...) or ("levels", L, "resample")
      parts.append(f"{'down' if kind == 'encoder' else 'up'}.{body[i + 1]}")
      i += 2
    elif body[i] == "blocks":
      parts.append(f"block.{body[i + 1]}")
      i += 2
    elif body[i] == "attn":
      parts.append(f"attn.{body[i + 1]}")
      i += 2
    elif body[i] == "resample":
      parts.append(f"{'downsample' if kind == 'encoder' else 'upsample'}.conv")
      i += 1
    else:
      parts.append(str(body[i]))
      i += 1
  return ".".join(parts + [_LEAVES[leaf]])


def taming_names(module: vqgan.PecoTokenizer | vqgan.Encoder | vqgan.Decoder) -> dict[tuple, str]:
  """Our parameter paths (nnx.Param) -> taming state-dict names: a tokenizer's are VQModel names
  (`encoder.down.0...`, `quantize.embedding.weight`), an Encoder's or Decoder's those of that module alone."""
  if isinstance(module, vqgan.PecoTokenizer) and module.config.quantizer != "l2":
    raise ValueError(f"taming's VQModel has an l2 codebook learned by gradient; this tokenizer's quantizer is "
                     f"{module.config.quantizer!r}")
  out = {}
  for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    if isinstance(module, vqgan.Encoder):
      out[path] = _coder_name(path, "encoder")
    elif isinstance(module, vqgan.Decoder):
      out[path] = _coder_name(path, "decoder")
    elif path[0] in ("encoder", "decoder"):
      out[path] = f"{path[0]}.{_coder_name(path[1:], path[0])}"
    elif path == ("quantizer", "codebook"):
      out[path] = "quantize.embedding.weight"
    else:  # quant_conv, post_quant_conv
      out[path] = f"{path[0]}.{_LEAVES[path[-1]]}"
  return out


def load_state_dict(module: vqgan.PecoTokenizer | vqgan.Encoder | vqgan.Decoder,
                    sd: Mapping[str, np.ndarray]) -> None:
  """Fills `module` (built from the matching PecoConfig) from a taming state dict, in place.

  Every parameter must be there with its shape and every tensor of `sd` (but `loss.*`) must be used: a silently
  partial load would leave PyTorch-default weights that still run.
  """
  state_dicts.load_params(module, sd, taming_names(module), "taming state dict", ignored_prefixes=SKIPPED_PREFIXES,
                          hint=": does the PecoConfig match the checkpoint?")


def export_state_dict(module: vqgan.PecoTokenizer | vqgan.Encoder | vqgan.Decoder) -> dict[str, np.ndarray]:
  """Our parameters under taming's names (convs OIHW), for `torch_module.load_state_dict` on taming's side."""
  names = taming_names(module)
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    value = np.asarray(var[...], np.float32)
    out[names[path]] = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value  # HWIO -> OIHW
  return out


__all__ = ["SKIPPED_PREFIXES", "export_state_dict", "load_state_dict", "taming_names"]
