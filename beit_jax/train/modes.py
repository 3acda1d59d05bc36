"""`config.mode` -> the loop that runs it (a readable trainer per mode, imported only when used)."""
from __future__ import annotations

import importlib

MODES = {  # mode -> module with train_and_evaluate(config, workdir)
    "tokenizer": "beit_jax.train.tokenizer",
    "pretrain": "beit_jax.train.pretrain",
}


def run(config, workdir: str):
  mode = config.get("mode")
  if mode not in MODES:
    raise ValueError(f"config.mode={mode!r}: use one of {sorted(MODES)}")
  return importlib.import_module(MODES[mode]).train_and_evaluate(config, workdir)
