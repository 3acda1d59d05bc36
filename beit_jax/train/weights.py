"""Where a run's weights come from: `config.init`, parsed here and nowhere else.

  ""                 from scratch (fine-tuning, segmentation) or a random backbone (the linear probe's floor)
  "checkpoint:DIR"   a model saved by our loops (e.g. a pre-training run's workdir/model) or by `beit-convert`
  "pytorch:PATH"     a unilm / timm / HF transformers checkpoint, converted on load

A classifier from any of them goes through the converter's one path, as unilm's run_class_finetuning.py: the
shared relative position table is copied into every block, position tables are resized to the new image size,
the MIM head is dropped and a new classification head starts at config.model's head init scale.
"""
from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from beit_jax import convert, model_files, models

KINDS = ("checkpoint", "pytorch")

# What a classifier is, whatever the checkpoint it starts from (beit/modeling_finetune.py).
FINETUNE_LAYOUT = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, use_mask_token=False, vocab_size=0,
                       init_style="finetune")


@dataclasses.dataclass(frozen=True)
class Init:
  """A parsed `config.init`: kind "" (none), "checkpoint" or "pytorch", and the path it names."""
  kind: str
  path: str

  def __bool__(self) -> bool:
    return bool(self.kind)


def parse(init: str) -> Init:
  """`config.init` checked before anything is built: a known kind and a path that exists."""
  if not init:
    return Init("", "")
  kind, _, path = init.partition(":")
  if kind not in KINDS or not path:
    raise ValueError(f"config.init={init!r}: use '' (from scratch), 'checkpoint:DIR' or 'pytorch:PATH'")
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f"config.init={init!r}: {path} does not exist")
  return Init(kind, path)


def require(init: str, what: str) -> Init:
  """parse(init) for the evaluation modes, where there is nothing to start from scratch."""
  if not init:
    raise ValueError(f"config.init is empty: name the {what} to evaluate ('checkpoint:DIR' or 'pytorch:PATH')")
  return parse(init)


def classifier_config(config: ml_collections.ConfigDict, num_classes: int, **layout) -> models.BeitConfig:
  """config.model in the fine-tuning layout with `num_classes` outputs (0: a backbone without a head)."""
  overrides = {**FINETUNE_LAYOUT, **dict(config.model.get("overrides", {})), "num_classes": num_classes, **layout}
  cfg = models.get_config(config.model.name, **overrides)
  if cfg.img_size != config.data.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} differs from the model's img_size "
                     f"{cfg.img_size} (config.model.name={config.model.name!r}; set "
                     f"config.model.overrides.img_size to fine-tune at another resolution)")
  return cfg


def classifier(init: str, cfg: models.BeitConfig, seed: int, *, trained_head: bool = False) -> models.Beit:
  """The model of `cfg` with the weights `init` names; task tensors the checkpoint lacks (the new head) are
  freshly initialised, those `cfg` lacks (the MIM head) dropped. `trained_head=True` (evaluation) instead
  requires the checkpoint's head to be a classifier of cfg.num_classes."""
  source = parse(init)
  if not source:
    return models.Beit(cfg, rngs=models.beit.make_rngs(seed))
  if source.kind == "checkpoint":  # ours -> unilm names -> the same loader as every PyTorch checkpoint
    sd = convert.export_state_dict(model_files.load_model(source.path))
  else:
    sd = convert.read_state_dict(source.path)
  if trained_head:
    head = convert.to_timm_names(sd).get("head.weight")
    if head is None or head.shape[0] != cfg.num_classes:
      raise ValueError(f"config.init={init!r} has no classification head of {cfg.num_classes} classes (the eval "
                       f"split's count; the checkpoint's head: {None if head is None else tuple(head.shape)}): "
                       "evaluate a fine-tuned classifier")
  return convert.load_state_dict(sd, cfg, seed=seed)


def network(init: str) -> models.Beit | None:
  """The network `init` names in the layout it was saved in (a pre-training checkpoint keeps its shared
  relative position table and MIM head); None for "" (the caller builds a random one)."""
  source = parse(init)
  if source.kind == "checkpoint":
    return model_files.load_model(source.path)
  if source.kind == "pytorch":
    return convert.load_pytorch_checkpoint(source.path)
  return None


def segmenter(init: str, seed: int = 0, **kw):
  """The whole segmentation model `init` names: "checkpoint:DIR" (saved by the segmentation loop) or
  "pytorch:PATH" (a unilm/mmseg or transformers segmentation checkpoint)."""
  source = require(init, "segmentation model")
  if source.kind == "checkpoint":
    return model_files.load_segmenter(source.path)
  return convert.load_segmentation_checkpoint(source.path, seed=seed, **kw)
