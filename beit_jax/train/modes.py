"""`config.mode` -> the loop that runs it (a readable trainer per mode, imported only when used)."""
from __future__ import annotations

import importlib

MODES = {  # mode -> (module, function(config, workdir))
    "tokenizer": ("beit_jax.train.tokenizer", "train_and_evaluate"),
    "pretrain": ("beit_jax.train.pretrain", "train_and_evaluate"),
    "finetune": ("beit_jax.train.finetune", "train_and_evaluate"),
    "eval": ("beit_jax.train.finetune", "evaluate_checkpoint"),
    "linear_probe": ("beit_jax.train.linear_probe", "train_and_evaluate"),
    "segmentation": ("beit_jax.train.segmentation", "train_and_evaluate"),
    "seg_eval": ("beit_jax.train.segmentation", "evaluate_checkpoint"),
}


def run(config, workdir: str):
  mode = config.get("mode")
  if mode not in MODES:
    raise ValueError(f"config.mode={mode!r}: use one of {sorted(MODES)}")
  module, function = MODES[mode]
  return getattr(importlib.import_module(module), function)(config, workdir)
