"""PyTorch BEiT semantic-segmentation checkpoints (UperNet) -> `beit_jax.models.segmentation.UperNet`.

Two layouts are read:
  * unilm / mmseg (`semantic_segmentation/`, the released ADE20K models): `backbone.blocks.N.*` (unilm/timm
    names), `backbone.fpn1.{0,1,3}.*`, `backbone.fpn2.0.*`, `decode_head.psp_modules.N.1.{conv,bn}.*`,
    `decode_head.{bottleneck,lateral_convs.N,fpn_convs.N,fpn_bottleneck}.{conv,bn}.*`, `decode_head.conv_seg.*`,
    `auxiliary_head.convs.0.{conv,bn}.*`, `auxiliary_head.conv_seg.*` (file: `{"state_dict": ...}`);
  * HF transformers `BeitForSemanticSegmentation`, both in the names of the Hub files (what
    `convert_beit_unilm_to_pytorch.py` wrote: `beit.encoder.layer.N...`, `fpn1.0.*`, mmseg head names with
    `classifier` for `conv_seg`) and in transformers 5's module names (`beit.layers.N...`,
    `fpn.fpn1.conv_transpose1`, `decode_head.psp_modules.blocks.N.conv.convolution`, `psp_bottleneck`,
    `convolution` / `normalization`; `batch_norm` is read as well).
Everything is first renamed to the mmseg names (`to_mmseg_names`); one table then maps those to UperNet's
parameters, both ways (`export_segmentation_state_dict` writes the mmseg layout back). The backbone goes through
`beit_jax.convert.pytorch` (names, architecture inference, relative-position resizing).

Layouts: Conv2d [O, I, kh, kw] -> [kh, kw, I, O]; ConvTranspose2d [I, O, kh, kw] -> [kh, kw, I, O] flipped in
both spatial axes (flax's ConvTranspose with transpose_kernel=False correlates with the kernel that torch's
transposed convolution uses mirrored; the parity test fails without the flip); BatchNorm weight / bias /
running_mean / running_var -> scale / bias / mean / var (`num_batches_tracked` dropped).

Feature taps (`out_indices`), three conventions:
  * unilm / mmseg and `SegConfig.out_indices`: 0-based block indices; block i's output is tapped, i.e.
    `hidden_states[i + 1]` in HF's `output_hidden_states` (index 0 = the embeddings). Base (3, 5, 7, 11).
  * HF `BeitForSemanticSegmentation` reads `hidden_states[i - 1]` for each i of `config.out_indices`, the output
    of 0-based block i - 2. So HF's i is our i - 2 ("transformers" below). HF's own ADE20K conversion
    (convert_beit_unilm_to_pytorch.py) copied unilm's numbers into config.out_indices unchanged ([3, 5, 7, 11]
    for base, the config default of the time; [7, 11, 15, 23] set for large), so transformers runs the released
    heads on the outputs of blocks 1/3/5/9 (large 5/9/13/21) where unilm trained them on 3/5/7/11 (7/11/15/23).
  * (HF's `BeitBackbone` reads `hidden_states[i]`, the output of block i - 1: a third convention, not used here.)
`hf_out_indices="unilm"` (the default) takes an HF config's numbers as unilm block indices, which taps the
blocks unilm trained the microsoft/beit-*-finetuned-ade-* heads on; `hf_out_indices="transformers"` translates
them (i -> i - 2) to reproduce transformers' forward exactly (right for a head fine-tuned in transformers).
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from beit_jax.convert.pytorch import (ConversionError, StateDict, _hf_config, export_state_dict, infer_config,
                                      load_state_dict, read_state_dict, to_timm_names)
from beit_jax.models.beit import make_rngs
from beit_jax.models.segmentation import SegConfig, UperNet, resolve

log = logging.getLogger(__name__)

_BACKBONE_PREFIXES = ("beit.", "data2vec_vision.")  # HF
_MMSEG_HEAD_PREFIXES = ("backbone.fpn", "decode_head.", "auxiliary_head.")

# HF head names -> mmseg names, applied in order (each rule to every name it matches).
_HF_HEAD_RULES = [
    # transformers 5 module names -> the Hub files' names
    (r"^fpn\.fpn1\.conv_transpose1\.", "fpn1.0."),
    (r"^fpn\.fpn1\.normalization\.", "fpn1.1."),
    (r"^fpn\.fpn1\.conv_transpose2\.", "fpn1.3."),
    (r"^fpn\.fpn2\.", "fpn2.0."),
    (r"^decode_head\.psp_modules\.blocks\.(\d+)\.conv\.", r"decode_head.psp_modules.\1.1."),
    (r"^decode_head\.psp_bottleneck\.", "decode_head.bottleneck."),
    (r"\.convolution\.weight$", ".conv.weight"),
    (r"\.(?:normalization|batch_norm)\.", ".bn."),
    # the Hub files' names -> mmseg
    (r"^(fpn[12]\.\d+\.)", r"backbone.\1"),
    (r"^(decode_head|auxiliary_head)\.classifier\.", r"\1.conv_seg."),
]


def _is_hf_seg(sd: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(_BACKBONE_PREFIXES) for k in sd)


def to_mmseg_names(sd: Mapping[str, np.ndarray]) -> StateDict:
  """A segmentation state dict (HF or unilm/mmseg names) in unilm/mmseg names: the backbone under `backbone.`
  in unilm/timm names (q/k/v fused, no index buffers), the adapter as `backbone.fpn*`, the heads as mmseg's."""
  if not _is_hf_seg(sd):
    return {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn.k_bias"))}
  backbone = {k: v for k, v in sd.items() if k.startswith(_BACKBONE_PREFIXES)}
  out = {f"backbone.{k}": v for k, v in to_timm_names(backbone).items()}
  for key, value in sd.items():
    if key in backbone:
      continue
    name = key
    for pattern, repl in _HF_HEAD_RULES:
      name = re.sub(pattern, repl, name)
    if name in out:
      raise ConversionError(f"HF tensors {key!r} and another both map to {name!r}")
    out[name] = value
  return out


# ---------------------------------------------------------------------------------------------------------------
# The name table: UperNet parameter path <-> mmseg tensor
# ---------------------------------------------------------------------------------------------------------------
def _copy(x):
  return x


def _conv_in(x):  # [O, I, kh, kw] -> [kh, kw, I, O]
  return x.transpose(2, 3, 1, 0)


def _conv_out(x):
  return x.transpose(3, 2, 0, 1)


def _deconv_in(x):  # ConvTranspose2d [I, O, kh, kw] -> flax ConvTranspose [kh, kw, I, O], spatially flipped
  return x.transpose(2, 3, 0, 1)[::-1, ::-1]


def _deconv_out(x):
  return x[::-1, ::-1].transpose(2, 3, 0, 1)


_COPY = (_copy, _copy)
_CONV = (_conv_in, _conv_out)
_DECONV = (_deconv_in, _deconv_out)
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_CONV_MODULES = {("head", "bottleneck"): "decode_head.bottleneck", ("head", "fuse"): "decode_head.fpn_bottleneck",
                 ("aux", "conv"): "auxiliary_head.convs.0"}
_CONV_MODULE_LISTS = {("head", "ppm"): "decode_head.psp_modules.{}.1", ("head", "lateral"): "decode_head.lateral_convs.{}",
                      ("head", "fpn"): "decode_head.fpn_convs.{}"}
_PLAIN = {("adapter", "up4_a"): ("backbone.fpn1.0", _DECONV), ("adapter", "up4_b"): ("backbone.fpn1.3", _DECONV),
          ("adapter", "up2"): ("backbone.fpn2.0", _DECONV), ("head", "cls"): ("decode_head.conv_seg", _CONV),
          ("aux", "cls"): ("auxiliary_head.conv_seg", _CONV)}
_CLASSIFIERS = ("decode_head.conv_seg.", "auxiliary_head.conv_seg.")


def _entry(path: tuple) -> tuple[str, tuple[Callable, Callable]]:
  """mmseg name and (to ours, to torch) for a non-backbone UperNet state path."""
  path = tuple(path)
  if path[:2] == ("adapter", "up4_bn"):
    return f"backbone.fpn1.1.{_BN[path[2]]}", _COPY
  if path[:2] in _PLAIN:
    prefix, fns = _PLAIN[path[:2]]
    return f"{prefix}.{'weight' if path[2] == 'kernel' else path[2]}", fns if path[2] == "kernel" else _COPY
  if path[:2] in _CONV_MODULES:
    prefix, rest = _CONV_MODULES[path[:2]], path[2:]
  elif path[:2] in _CONV_MODULE_LISTS:
    prefix, rest = _CONV_MODULE_LISTS[path[:2]].format(path[2]), path[3:]
  else:
    raise KeyError(f"no checkpoint name for UperNet parameter {'/'.join(map(str, path))}")
  if rest == ("conv", "kernel"):
    return f"{prefix}.conv.weight", _CONV
  if rest[0] == "bn":
    return f"{prefix}.bn.{_BN[rest[1]]}", _COPY
  raise KeyError(f"no checkpoint name for UperNet parameter {'/'.join(map(str, path))}")


def _flat_state(model: UperNet):
  """Flat (path, variable) pairs of the weights and BatchNorm statistics."""
  return nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------
def translate_hf_out_indices(hf_out_indices: Sequence[int], depth: int, mode: str = "unilm") -> tuple[int, ...]:
  """`SegConfig.out_indices` (0-based blocks whose outputs are tapped) for an HF config's `out_indices`.

  mode "transformers": HF's BeitForSemanticSegmentation reads hidden_states[i - 1] = the output of block i - 2,
  so i -> i - 2 (an i of 1 taps the embeddings, which UperNet cannot). mode "unilm": HF's numbers are taken as
  unilm's block indices unchanged, as HF's conversion of the released ADE20K models copied them (see the module
  docstring)."""
  hf = [int(i) for i in hf_out_indices]
  if any(i < 0 for i in hf):
    raise ConversionError(f"HF out_indices {hf}: negative indices are not supported; give out_indices=...")
  if mode == "transformers":
    ours = tuple(i - 2 for i in hf)
    if min(ours) < 0:
      raise ConversionError(f"HF out_indices {hf} tap hidden_states[{min(hf) - 1}] (the embeddings), which UperNet "
                            f"cannot; give out_indices=... (0-based blocks)")
  elif mode == "unilm":
    ours = tuple(hf)
  else:
    raise ValueError(f"hf_out_indices={mode!r}: 'unilm' or 'transformers'")
  if len(ours) != 4 or max(ours) >= depth:
    raise ConversionError(f"HF out_indices {hf} read as {mode!r} give blocks {ours}: four blocks of the {depth} "
                          f"are needed" + (" (a head fine-tuned in transformers: hf_out_indices='transformers')"
                                           if mode == "unilm" else ""))
  return ours


def _need(sd: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in sd:
    raise ConversionError(f"checkpoint has no tensor {key!r}; is it a BEiT UperNet checkpoint? "
                          f"Head keys: {sorted(k for k in sd if not k.startswith('backbone.blocks'))[:8]}")
  return sd[key]


def infer_seg_config(sd: Mapping[str, np.ndarray], depth: int, hf_config: Mapping | None = None, *,
                     hf_out_indices: str = "unilm") -> SegConfig:
  """The SegConfig of an mmseg-named state dict: classes and channels from the classifier, the auxiliary
  head's width, the pyramid-pooling branch count (scales from `hf_config["pool_scales"]`, else mmseg's 1/2/3/6
  when there are four), and the taps from `hf_config["out_indices"]` (see `translate_hf_out_indices`) or else
  unilm's per depth."""
  hf_config = hf_config or {}
  cls = _need(sd, "decode_head.conv_seg.weight")
  pools = sorted({int(m.group(1)) for k in sd for m in [re.match(r"decode_head\.psp_modules\.(\d+)\.", k)] if m})
  if not pools or pools != list(range(len(pools))):
    raise ConversionError(f"checkpoint's pyramid pooling branches decode_head.psp_modules.N are {pools}")
  scales = tuple(hf_config.get("pool_scales") or ((1, 2, 3, 6) if len(pools) == 4 else ()))
  if len(scales) != len(pools):
    raise ConversionError(f"checkpoint has {len(pools)} pyramid pooling branches; their scales are not in the "
                          f"tensors: give pool_scales=...")
  aux = sd.get("auxiliary_head.convs.0.conv.weight")
  out_indices = ()
  if hf_config.get("out_indices"):
    out_indices = translate_hf_out_indices(hf_config["out_indices"], depth, hf_out_indices)
  return SegConfig(num_classes=int(cls.shape[0]), out_indices=out_indices, channels=int(cls.shape[1]),
                   pool_scales=tuple(int(s) for s in scales),
                   aux_channels=int(aux.shape[0]) if aux is not None else SegConfig.aux_channels)


# ---------------------------------------------------------------------------------------------------------------
# Loading and export
# ---------------------------------------------------------------------------------------------------------------
def load_segmentation_state_dict(sd: Mapping[str, np.ndarray], *, img_size: int | None = None,
                                 num_classes: int | None = None, seed: int = 0, hf_config: Mapping | None = None,
                                 out_indices: Sequence[int] | None = None, hf_out_indices: str = "unilm",
                                 pool_scales: Sequence[int] | None = None, rel_pos_interp: str = "cubic",
                                 **backbone_overrides) -> UperNet:
  """An UperNet with the tensors of a BEiT segmentation state dict (HF or unilm/mmseg names, numpy).

  The backbone config is inferred by `beit_jax.convert.pytorch.infer_config` (`hf_config`, a transformers
  config dict, supplies layer_norm_eps, pool_scales and out_indices); `img_size` other than the checkpoint's
  resizes the relative position tables (`rel_pos_interp`), `backbone_overrides` change the BeitConfig (e.g.
  dtype). `out_indices` (0-based blocks, unilm's convention) overrides the taps; otherwise an HF config's are
  read per `hf_out_indices` (module docstring), else unilm's per depth. A `num_classes` other than the
  checkpoint's leaves both classifiers freshly initialised (logged). A missing, unknown or misshapen tensor
  raises ConversionError naming it; `num_batches_tracked` and index buffers are dropped. A checkpoint without
  an auxiliary head (HF use_auxiliary_head=False) gets a fresh one (logged). The model is in eval mode.
  """
  sd = to_mmseg_names(sd)
  sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  unknown = sorted(k for k in sd if not k.startswith(("backbone.", "decode_head.", "auxiliary_head.")))
  if unknown:
    raise ConversionError(f"checkpoint tensors that are not part of a BEiT UperNet: {unknown[:10]}")
  backbone_sd = {k[len("backbone."):]: v for k, v in sd.items()
                 if k.startswith("backbone.") and not k.startswith("backbone.fpn")}
  head_sd = {k: v for k, v in sd.items() if k.startswith(_MMSEG_HEAD_PREFIXES)}
  bcfg = infer_config(backbone_sd, hf_config)
  overrides = dict(backbone_overrides, num_classes=0, vocab_size=0)
  if img_size is not None:
    overrides["img_size"] = img_size
  bcfg = bcfg.replace(**overrides)
  if pool_scales is not None:
    hf_config = dict(hf_config or {}, pool_scales=list(pool_scales))
  if out_indices is not None and hf_config:
    hf_config = {k: v for k, v in hf_config.items() if k != "out_indices"}  # overridden: not read at all
  cfg = infer_seg_config(head_sd, bcfg.depth, hf_config, hf_out_indices=hf_out_indices)
  if out_indices is not None:
    cfg = dataclasses.replace(cfg, out_indices=tuple(int(i) for i in out_indices))
  try:  # UperNet's own check, before the backbone is loaded
    cfg = resolve(bcfg, cfg)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  fresh_classes = num_classes is not None and num_classes != cfg.num_classes
  if fresh_classes:
    cfg = dataclasses.replace(cfg, num_classes=int(num_classes))

  backbone = load_state_dict(backbone_sd, bcfg, seed=seed, rel_pos_interp=rel_pos_interp)
  model = UperNet(backbone, cfg, rngs=make_rngs(seed + 1))
  has_aux = any(k.startswith("auxiliary_head.") for k in head_sd)
  used, fresh = set(), []
  flat = _flat_state(model)
  for path, var in flat:
    if path[0] == "backbone":
      continue
    name, (to_ours, to_torch) = _entry(path)
    if (fresh_classes and name.startswith(_CLASSIFIERS)) or (not has_aux and name.startswith("auxiliary_head.")):
      fresh.append(name)
      used.add(name)
      continue
    expected = to_torch(np.empty(var.shape)).shape
    if name not in head_sd:
      raise ConversionError(f"checkpoint has no tensor {name!r} for UperNet parameter {'/'.join(map(str, path))} "
                            f"(expected shape {expected})")
    value = np.asarray(head_sd[name], np.float32)
    if value.shape != expected:
      raise ConversionError(f"tensor {name!r} has shape {value.shape} but UperNet ({cfg}) expects {expected}")
    var.set_value(jax.numpy.asarray(np.ascontiguousarray(to_ours(value)), dtype=var.dtype))
    used.add(name)
  unexpected = sorted(set(head_sd) - used)
  if unexpected:
    raise ConversionError(f"checkpoint tensors not used by the UperNet: {unexpected[:10]}"
                          f"{' ...' if len(unexpected) > 10 else ''} (an FCN head with more convs, "
                          f"auxiliary_concat_input or another head type is not supported)")
  if fresh:
    log.warning("freshly initialised UperNet parameters (absent from the checkpoint, or another class count): %s",
                fresh)
  nnx.update(model, nnx.from_flat_state(flat))
  model.eval()
  return model


def load_segmentation_checkpoint(path: str | pathlib.Path, **kw) -> UperNet:
  """`load_segmentation_state_dict` on a file (unilm/mmseg `.pth` with `state_dict`/`model`, HF `.bin` /
  `.safetensors`) or an HF folder, whose config.json (if any) is passed as `hf_config`."""
  path = pathlib.Path(path)
  sd = read_state_dict(path)
  kw.setdefault("hf_config", _hf_config(path) or None)
  return load_segmentation_state_dict(sd, **kw)


def export_segmentation_state_dict(model: UperNet) -> StateDict:
  """The UperNet's weights and BatchNorm statistics in unilm/mmseg names and layouts (f32 numpy). The backbone's
  final norm (`norm` or `fc_norm`, which every `Beit` has and UperNet never uses; unilm's segmentation backbone
  has none) is left out."""
  out = {f"backbone.{k}": v for k, v in export_state_dict(model.backbone).items()
         if not k.startswith(("norm.", "fc_norm."))}
  for path, var in _flat_state(model):
    if path[0] == "backbone":
      continue
    name, (_, to_torch) = _entry(path)
    out[name] = np.ascontiguousarray(to_torch(np.asarray(var.get_value(), np.float32)))
  return out


__all__ = ["export_segmentation_state_dict", "infer_seg_config", "load_segmentation_checkpoint",
           "load_segmentation_state_dict", "to_mmseg_names", "translate_hf_out_indices"]
