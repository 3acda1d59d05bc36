"""Visual tokenizers behind one interface: `encode(images) -> int32 ids [B, h, w]`, `decode(ids) -> images`
(where there is a decoder), `vocab_size`, `input_size`, `normalization`. Images are NHWC float32 in [0, 1];
each tokenizer applies its own input mapping inside.

  tok = tokenizers.load("dalle", encoder="encoder.pkl", decoder="decoder.pkl")
  tok = tokenizers.load("peco", checkpoint="workdir/tokenizer")     # written by the `tokenizer` loop
"""
from __future__ import annotations

from typing import Callable

from beit_jax.tokenizers import dalle, saving, vqgan

_LOADERS: dict[str, Callable] = {"dalle": dalle.load, "peco": saving.load_peco}


def load(name: str, **kwargs):
  if name not in _LOADERS:
    raise ValueError(f"unknown tokenizer {name!r}; known: {sorted(_LOADERS)}")
  return _LOADERS[name](**kwargs)


__all__ = ["dalle", "load", "saving", "vqgan"]
