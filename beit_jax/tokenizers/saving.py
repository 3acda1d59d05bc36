"""Saving and loading trained PeCo tokenizers (orbax): what the tokenizer loop writes and pre-training reads.

A tokenizer checkpoint folder holds, per step, the whole tokenizer state (`state`: parameters, the EMA codebook
statistics) as a nested dict and its PecoConfig as JSON (`tokenizer_config`).
"""
from __future__ import annotations

import dataclasses
import pathlib

from flax import nnx

from beit_jax import model_files
from beit_jax.tokenizers import vqgan


def _arrays(tok: vqgan.PecoTokenizer):
  """The state worth keeping: everything but RNG streams (a loaded tokenizer only encodes and decodes)."""
  return nnx.to_pure_dict(nnx.state(tok, nnx.Not(nnx.RngState)))


def save_peco(directory: str | pathlib.Path, tok: vqgan.PecoTokenizer, step: int = 0) -> None:
  model_files.save_with_config(directory, step, tree_item="state", tree=_arrays(tok),
                               config_item="tokenizer_config", config=tok.config.to_dict())


def load_peco(checkpoint: str | pathlib.Path, step: int | None = None, **overrides) -> vqgan.PecoTokenizer:
  """`tokenizers.load("peco", checkpoint=DIR)`: the latest (or given) step; `overrides` change numerics only."""
  step, raw = model_files.read_config(checkpoint, step, config_item="tokenizer_config",
                                      what="PeCo tokenizer checkpoint")
  fields = {f.name for f in dataclasses.fields(vqgan.PecoConfig)}
  cfg = vqgan.PecoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()
                            if k in fields}).replace(**overrides)
  # Real modules (RNG streams need values), their arrays then replaced by the trained ones.
  tok = vqgan.PecoTokenizer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(tok, nnx.Not(nnx.RngState))
  nnx.replace_by_pure_dict(state, model_files.restore_tree(checkpoint, step, tree_item="state",
                                                           like=nnx.to_pure_dict(state)))
  nnx.update(tok, state)
  tok.eval()
  return tok
