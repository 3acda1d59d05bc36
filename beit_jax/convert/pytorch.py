"""PyTorch BEiT checkpoints <-> beit_jax models.

Reads microsoft/unilm `.pth` files (weights at the top level or under `model` / `module`), timm state dicts and
HF transformers checkpoints (`.bin`, `.safetensors`, or a folder with `config.json`), infers the architecture
from the tensors, and fills a `Beit` model. Every format is first renamed to the unilm/timm names (which are the
same), so one table maps names to beit_jax parameters, and the same table runs backwards for the export.

Safety: `.pth`/`.bin` files are read with `torch.load(weights_only=True)`; a pickle that needs anything beyond
tensors and plain containers is refused, never executed. `.safetensors` needs no torch at all.
"""
from __future__ import annotations

import json
import logging
import pathlib
import pickle
import re
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from beit_jax.models import posemb
from beit_jax.models.beit import Beit, BeitConfig, make_rngs
from beit_jax.models.layers import num_relative_positions

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]


class ConversionError(ValueError):
  """A checkpoint that cannot be mapped onto a beit_jax model; the message names the tensor."""


class UnsafeCheckpointError(ConversionError):
  """A pickle that would need arbitrary Python objects to load; refused instead of executed."""


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _resolve(path: pathlib.Path) -> pathlib.Path:
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if path.is_dir():
    for name in _WEIGHT_FILES:
      if (path / name).exists():
        return path / name
    raise ConversionError(f"folder {path} has none of {_WEIGHT_FILES}")
  return path


def _torch_load(path: pathlib.Path) -> Mapping:
  import argparse  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  try:
    # unilm checkpoints may carry their argparse.Namespace; it is a plain attribute bag, safe to allow.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise UnsafeCheckpointError(
        f"refusing to load {path}: it is a pickle that needs arbitrary Python objects to load, which could run "
        f"code. Only tensors and plain containers are accepted (torch.load(weights_only=True)). Re-save it as "
        f"a state dict or safetensors from a trusted environment. Detail: {str(e).splitlines()[0]}") from None


def _to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  import torch  # pylint: disable=import-outside-toplevel
  if isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_state_dict(path: str | pathlib.Path) -> StateDict:
  """Tensors of a checkpoint as numpy arrays, unwrapped from `model` / `module` and `module.` prefixes."""
  path = _resolve(pathlib.Path(path))
  if path.suffix == ".safetensors":
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    with safe_open(str(path), framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  obj = _torch_load(path)
  for key in ("model", "module", "state_dict", "model_state"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "shape"):
      continue
    out[k[len("module."):] if k.startswith("module.") else k] = _to_numpy(v)
  return out


def _hf_config(path: pathlib.Path) -> dict:
  cfg = (path if path.is_dir() else path.parent) / "config.json"
  if not cfg.exists():
    return {}
  data = json.loads(cfg.read_text())
  return data if str(data.get("model_type", "")).replace("_", "-") in ("beit", "data2vec-vision") else {}


# ---------------------------------------------------------------------------------------------------------------
# HF transformers names -> unilm/timm names
# ---------------------------------------------------------------------------------------------------------------
# Two HF namings exist: the one of every checkpoint on the Hub (`encoder.layer.N.attention.attention.query`),
# which transformers 5 still writes with `save_pretrained`, and transformers 5's in-memory module names
# (`layers.N.attention.q_proj`), which `model.state_dict()` returns. Both are read.
_L = r"^(?:encoder\.layer|layers)\.(\d+)\."
_HF_RULES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^(?:encoder\.relative_position_bias|shared_position_bias)\.", "rel_pos_bias."),
    (_L + r"(?:attention\.attention\.)?relative_position_bias\.", r"blocks.\1.attn."),
    (_L + r"(?:attention\.output\.dense|attention\.o_proj)\.", r"blocks.\1.attn.proj."),
    (_L + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_L + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_L + r"(?:intermediate\.dense|mlp\.fc1)\.", r"blocks.\1.mlp.fc1."),
    (_L + r"(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
    (_L + r"lambda_1$", r"blocks.\1.gamma_1"),
    (_L + r"lambda_2$", r"blocks.\1.gamma_2"),
    (r"^pooler\.layernorm\.", "fc_norm."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
    (r"^lm_head\.", "lm_head."),
]
_HF_QKV = re.compile(_L + r"attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_QKV_NAMES = {"q": "query", "k": "key", "v": "value"}


def _is_hf(sd: Mapping[str, np.ndarray]) -> bool:
  return any("embeddings.patch_embeddings." in k for k in sd)


def _from_hf(sd: StateDict) -> StateDict:
  prefixed = {k for k in sd if k.startswith(("beit.", "data2vec_vision."))}
  # BeitForMaskedImageModeling keeps a LayerNorm of its own next to the backbone's; the backbone's is an
  # Identity under mean pooling. Both present means two norms in a row, which the BEiT architecture never has.
  if "layernorm.weight" in sd and any(k.endswith(".layernorm.weight") and k.split(".")[0] in ("beit",
                                      "data2vec_vision") for k in sd):
    raise ConversionError("HF checkpoint has both `beit.layernorm` and a head `layernorm` (use_mean_pooling=False "
                          "with a MIM head): two final norms are not a BEiT architecture")
  out, qkv = {}, {}
  for key, value in sd.items():
    name = key.split(".", 1)[1] if key in prefixed else key
    if name.endswith("relative_position_index"):
      continue
    m = _HF_QKV.match(name)
    if m:
      part = m.group(2) or _QKV_NAMES[m.group(3)]
      qkv.setdefault(int(m.group(1)), {})[(part, m.group(4))] = value
      continue
    for pattern, repl in _HF_RULES:
      new, n = re.subn(pattern, repl, name)
      if n:
        out[new] = value
        break
    else:
      out[name] = value  # reported as unexpected later, under its own name
  for i, parts in qkv.items():
    try:
      out[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
          [parts[("query", "weight")], parts[("key", "weight")], parts[("value", "weight")]], axis=0)
    except KeyError as e:
      raise ConversionError(f"HF checkpoint layer {i} lacks attention tensor {e.args[0]}") from None
    if ("key", "bias") in parts and np.any(parts[("key", "bias")]):
      raise ConversionError(f"HF checkpoint layer {i} has a non-zero key bias; BEiT has none")
    if ("query", "bias") in parts:
      out[f"blocks.{i}.attn.q_bias"] = parts[("query", "bias")]
    if ("value", "bias") in parts:
      out[f"blocks.{i}.attn.v_bias"] = parts[("value", "bias")]
  return out


def to_timm_names(sd: Mapping[str, np.ndarray]) -> StateDict:
  """Any supported layout -> unilm/timm names, without index buffers."""
  sd = dict(sd)
  if _is_hf(sd):
    return _from_hf(sd)
  return {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn.k_bias"))}


# ---------------------------------------------------------------------------------------------------------------
# The name table: beit_jax parameter path <-> unilm/timm tensor
# ---------------------------------------------------------------------------------------------------------------
def _identity(x, cfg):
  return x


def _linear_in(x, cfg):  # torch Linear [out, in] -> [in, out]
  return x.T


def _linear_out(x, cfg):
  return x.T


def _qkv_in(x, cfg):  # [3D, D] (out, in) -> [3, D, H, Dh]
  return x.reshape(3, cfg.width, cfg.width).transpose(0, 2, 1).reshape(
      3, cfg.width, cfg.num_heads, cfg.width // cfg.num_heads)


def _qkv_out(x, cfg):
  return x.reshape(3, cfg.width, cfg.width).transpose(0, 2, 1).reshape(3 * cfg.width, cfg.width)


def _heads_in(x, cfg):  # [D] -> [H, Dh]
  return x.reshape(cfg.num_heads, cfg.width // cfg.num_heads)


def _heads_out(x, cfg):
  return x.reshape(-1)


def _proj_in(x, cfg):  # [D, D] (out, in) -> [H, Dh, D]
  return x.T.reshape(cfg.num_heads, cfg.width // cfg.num_heads, cfg.width)


def _proj_out(x, cfg):
  return x.reshape(cfg.width, cfg.width).T


def _conv_in(x, cfg):  # [D, C, p, p] -> [p, p, C, D]
  return x.transpose(2, 3, 1, 0)


def _conv_out(x, cfg):
  return x.transpose(3, 2, 0, 1)


_COPY = (_identity, _identity)
_LINEAR = (_linear_in, _linear_out)
_BLOCK = {
    ("norm1", "scale"): ("norm1.weight", _COPY), ("norm1", "bias"): ("norm1.bias", _COPY),
    ("norm2", "scale"): ("norm2.weight", _COPY), ("norm2", "bias"): ("norm2.bias", _COPY),
    ("attn", "qkv"): ("attn.qkv.weight", (_qkv_in, _qkv_out)),
    ("attn", "q_bias"): ("attn.q_bias", (_heads_in, _heads_out)),
    ("attn", "v_bias"): ("attn.v_bias", (_heads_in, _heads_out)),
    ("attn", "rel_pos", "table"): ("attn.relative_position_bias_table", _COPY),
    ("attn", "proj"): ("attn.proj.weight", (_proj_in, _proj_out)),
    ("attn", "proj_bias"): ("attn.proj.bias", _COPY),
    ("mlp", "fc1", "kernel"): ("mlp.fc1.weight", _LINEAR), ("mlp", "fc1", "bias"): ("mlp.fc1.bias", _COPY),
    ("mlp", "fc2", "kernel"): ("mlp.fc2.weight", _LINEAR), ("mlp", "fc2", "bias"): ("mlp.fc2.bias", _COPY),
    ("gamma_1",): ("gamma_1", _COPY), ("gamma_2",): ("gamma_2", _COPY),
}
_TOP = {
    ("patch_kernel",): ("patch_embed.proj.weight", (_conv_in, _conv_out)),
    ("patch_bias",): ("patch_embed.proj.bias", _COPY),
    ("cls_token",): ("cls_token", _COPY),
    ("mask_token",): ("mask_token", _COPY),
    ("pos_embed",): ("pos_embed", _COPY),
    ("rel_pos", "table"): ("rel_pos_bias.relative_position_bias_table", _COPY),
    ("norm", "scale"): ("norm.weight", _COPY), ("norm", "bias"): ("norm.bias", _COPY),
    ("fc_norm", "scale"): ("fc_norm.weight", _COPY), ("fc_norm", "bias"): ("fc_norm.bias", _COPY),
    ("head", "kernel"): ("head.weight", _LINEAR), ("head", "bias"): ("head.bias", _COPY),
    ("lm_head", "kernel"): ("lm_head.weight", _LINEAR), ("lm_head", "bias"): ("lm_head.bias", _COPY),
}
# Tensors that belong to a task rather than the backbone: a checkpoint converted for another task (a
# pre-trained MIM model loaded as a classifier, say) drops those it has and initialises those it lacks.
_TASK_PREFIXES = ("head.", "lm_head.", "fc_norm.", "norm.", "mask_token")


def _entry(path: tuple) -> tuple[str, tuple[Callable, Callable]]:
  if path[0] == "blocks":
    name, fns = _BLOCK[tuple(path[2:])]
    return f"blocks.{path[1]}.{name}", fns
  return _TOP[tuple(path)]


# ---------------------------------------------------------------------------------------------------------------
# Architecture inference
# ---------------------------------------------------------------------------------------------------------------
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}  # ViT sizes; otherwise 64-wide heads


def infer_config(sd: Mapping[str, np.ndarray], hf_config: Mapping | None = None) -> BeitConfig:
  """The BeitConfig a unilm/timm-named state dict was made with (as far as tensors tell)."""
  hf_config = hf_config or {}

  def need(key):
    if key not in sd:
      raise ConversionError(f"checkpoint has no tensor {key!r}; is it a BEiT checkpoint? "
                            f"First keys: {sorted(sd)[:8]}")
    return sd[key]

  w = need("patch_embed.proj.weight")
  width, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
  blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
  if not blocks:
    raise ConversionError("checkpoint has no `blocks.N.*` tensors")
  depth = max(blocks) + 1
  fc1 = need("blocks.0.mlp.fc1.weight")
  shared = "rel_pos_bias.relative_position_bias_table" in sd
  per_layer = "blocks.0.attn.relative_position_bias_table" in sd
  table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
  grids = {}
  if table is not None:
    grids["relative_position_bias_table"] = posemb.rel_table_grid(table.shape[0])[0]
    num_heads = int(table.shape[1])
  else:
    num_heads = hf_config.get("num_attention_heads")
    if num_heads is None:  # nothing in the tensors tells; only a table has one column per head
      num_heads = _HEADS_BY_WIDTH.get(width, max(1, width // 64))
      log.warning("no relative position table to read the number of heads from: assuming %d for width %d "
                  "(override with num_heads=...)", num_heads, width)
    num_heads = int(num_heads)
  if "pos_embed" in sd:
    n = sd["pos_embed"].shape[1] - 1
    grids["pos_embed"] = int(round(np.sqrt(n)))
  if len(set(grids.values())) > 1:
    raise ConversionError(f"position tables disagree on the patch grid: {grids}")
  grid = next(iter(grids.values()), None)
  img_size = grid * patch if grid else int(hf_config.get("image_size", 224))
  num_classes = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
  vocab_size = int(sd["lm_head.weight"].shape[0]) if "lm_head.weight" in sd else 0
  if num_classes and vocab_size:
    raise ConversionError("checkpoint has both a classification head (head.*) and a MIM head (lm_head.*)")
  return BeitConfig(
      img_size=img_size, patch_size=patch, in_chans=in_chans, width=width, depth=depth, num_heads=num_heads,
      mlp_ratio=fc1.shape[0] / width, qkv_bias="blocks.0.attn.q_bias" in sd,
      layer_norm_eps=float(hf_config.get("layer_norm_eps", 1e-6)),
      use_abs_pos_emb="pos_embed" in sd, use_rel_pos_bias=per_layer, use_shared_rel_pos_bias=shared,
      layer_scale_init=0.1 if "blocks.0.gamma_1" in sd else 0.0,
      num_classes=num_classes, vocab_size=vocab_size, use_mask_token="mask_token" in sd,
      global_pool="avg" if "fc_norm.weight" in sd or (not num_classes and "norm.weight" not in sd) else "token")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def _adapt(sd: StateDict, cfg: BeitConfig, rel_pos_interp: str) -> StateDict:
  """Resolution change and shared -> per-block relative position tables, on the unilm/timm names."""
  sd = dict(sd)
  rows = num_relative_positions(cfg.grid)
  for key in [k for k in sd if k.endswith("relative_position_bias_table")]:
    if sd[key].shape[0] != rows:
      sd[key] = posemb.resize_rel_pos_table(sd[key], cfg.grid, rel_pos_interp)
  if "pos_embed" in sd and sd["pos_embed"].shape[1] != cfg.num_patches + 1:
    sd["pos_embed"] = posemb.resize_abs_pos_embed(sd["pos_embed"], cfg.grid)
  shared_key = "rel_pos_bias.relative_position_bias_table"
  if (cfg.use_rel_pos_bias and not cfg.use_shared_rel_pos_bias and shared_key in sd
      and "blocks.0.attn.relative_position_bias_table" not in sd):
    # Fine-tuning from a pre-trained shared table: every block starts from a copy (run_class_finetuning.py).
    table = sd.pop(shared_key)
    for i in range(cfg.depth):
      sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.copy()
  return sd


def _is_task(name: str) -> bool:
  return name.startswith(_TASK_PREFIXES)


def load_state_dict(sd: Mapping[str, np.ndarray], cfg: BeitConfig | None = None, *, seed: int = 0,
                    rel_pos_interp: str = "cubic") -> Beit:
  """A Beit model with the tensors of `sd` (any supported naming); `cfg` defaults to the inferred one.

  Backbone tensors must match exactly (a mismatch names the tensor and both shapes). Task tensors (heads,
  final norms, mask token) that the target config lacks are dropped, and those it has but the checkpoint
  lacks, or has in another shape (a head with another class count), are freshly initialised; both are logged.
  """
  sd = to_timm_names(sd)
  cfg = cfg or infer_config(sd)
  sd = _adapt(sd, cfg, rel_pos_interp)
  model = Beit(cfg, rngs=make_rngs(seed))
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  used, fresh = set(), []
  for path, var in flat:
    name, (to_ours, to_torch) = _entry(path)
    if name not in sd:
      if _is_task(name):
        fresh.append(name)
        continue
      raise ConversionError(f"checkpoint has no tensor {name!r} for parameter {'/'.join(map(str, path))} "
                            f"(expected shape {to_torch(np.empty(var.shape), cfg).shape})")
    value = to_ours(np.asarray(sd[name], np.float32), cfg) if sd[name].size == var.size else None
    if (value is None or value.shape != var.shape) and _is_task(name):
      fresh.append(name)  # e.g. a 21841-class head under a 1000-class model: a new head, as unilm does
      continue
    if value is None or value.shape != var.shape:
      raise ConversionError(f"tensor {name!r} has shape {tuple(sd[name].shape)} but the model "
                            f"({cfg.width} wide, {cfg.num_heads} heads, {cfg.img_size}px) expects "
                            f"{to_torch(np.empty(var.shape), cfg).shape}")
    var.set_value(jax.numpy.asarray(value, dtype=var.dtype))
    used.add(name)
  unused = sorted(set(sd) - used)
  unexpected = [k for k in unused if not _is_task(k)]
  if unexpected:
    raise ConversionError(f"checkpoint tensors not used by the model {cfg.img_size}px/{cfg.depth} blocks: "
                          f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
  if unused:
    log.warning("dropped checkpoint task tensors the target model does not use: %s", unused)
  if fresh:
    log.warning("freshly initialised task parameters (absent from the checkpoint, or another shape): %s", fresh)
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def load_pytorch_checkpoint(path: str | pathlib.Path, *, rel_pos_interp: str = "cubic", seed: int = 0,
                            **overrides) -> Beit:
  """Loads a unilm `.pth`, timm or HF `.bin`/`.safetensors` BEiT checkpoint (file or HF folder).

  `overrides` change the inferred BeitConfig: e.g. `img_size=384` resizes the position tables
  (`rel_pos_interp="cubic"` as BEiT, or timm's "linear"), `use_rel_pos_bias=True,
  use_shared_rel_pos_bias=False` copies a shared table into every block, `num_classes=10` puts a fresh head
  on a pre-trained backbone, `dtype="bfloat16"` sets the compute dtype.
  """
  path = pathlib.Path(path)
  sd = to_timm_names(read_state_dict(path))
  cfg = infer_config(sd, _hf_config(path))
  return load_state_dict(sd, cfg.replace(**overrides), seed=seed, rel_pos_interp=rel_pos_interp)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------
def export_state_dict(model: Beit) -> StateDict:
  """The model's parameters under unilm/timm names and layouts (f32 numpy), loadable by timm's Beit."""
  cfg = model.config
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, (_, to_torch) = _entry(path)
    out[name] = np.ascontiguousarray(to_torch(np.asarray(var.get_value(), np.float32), cfg))
  return out


def save_timm_safetensors(model: Beit, path: str | pathlib.Path) -> None:
  """Writes `export_state_dict(model)` as safetensors, with the BeitConfig in the file's metadata."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(export_state_dict(model), str(path), metadata={"beit_jax_config": json.dumps(model.config.to_dict())})
