"""Saving and loading trained PeCo tokenizers (orbax): what the tokenizer loop writes and pre-training reads.

A tokenizer checkpoint folder holds, per step, the whole tokenizer state (`state`: parameters, the EMA codebook
statistics) as a nested dict and its PecoConfig as JSON (`tokenizer_config`).
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
import orbax.checkpoint as ocp
from flax import nnx

from beit_jax.tokenizers import vqgan


def _manager(directory) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(),
                               options=ocp.CheckpointManagerOptions(create=True, max_to_keep=None))


def _arrays(tok: vqgan.PecoTokenizer):
  """The state worth keeping: everything but RNG streams (a loaded tokenizer only encodes and decodes)."""
  return nnx.to_pure_dict(nnx.state(tok, nnx.Not(nnx.RngState)))


def save_peco(directory: str | pathlib.Path, tok: vqgan.PecoTokenizer, step: int = 0) -> None:
  with _manager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays(tok)),
                                            tokenizer_config=ocp.args.JsonSave(tok.config.to_dict())))
    mngr.wait_until_finished()


def load_peco(checkpoint: str | pathlib.Path, step: int | None = None, **overrides) -> vqgan.PecoTokenizer:
  """`tokenizers.load("peco", checkpoint=DIR)`: the latest (or given) step; `overrides` change numerics only."""
  directory = pathlib.Path(checkpoint)
  if not directory.is_dir():
    raise FileNotFoundError(f"PeCo tokenizer checkpoint {directory} does not exist")
  with _manager(directory) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete tokenizer checkpoint in {directory}")
    meta = mngr.restore(step, args=ocp.args.Composite(tokenizer_config=ocp.args.JsonRestore()))
    fields = {f.name for f in dataclasses.fields(vqgan.PecoConfig)}
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["tokenizer_config"].items() if k in fields}
    cfg = vqgan.PecoConfig(**raw).replace(**overrides)
    tok = nnx.eval_shape(lambda: vqgan.PecoTokenizer(cfg, rngs=nnx.Rngs(0)))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, _arrays(tok))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  # Build real modules (RNG streams need values), then put the trained arrays in.
  tok = vqgan.PecoTokenizer(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(tok, nnx.Not(nnx.RngState))
  nnx.replace_by_pure_dict(state, restored["state"])
  nnx.update(tok, state)
  tok.eval()
  return tok
