"""Pre-training options that must not change the numbers: gradient accumulation; and the profiler on request."""
import pathlib

import jax
import numpy as np
import pytest

from beit_jax.train import pretrain
from conftest import tiny_config
from test_pretrain import params_np


def test_gradient_accumulation_gives_the_same_steps(tmp_path, tokenizer_file):
  """Each batch of 16 in 4 slices of 4 (one per data-parallel pair of the 8 devices): the same loss and params as
  the whole batch at once, because the step accumulates sums and divides once by the global masked count.
  No drop path here: the slices draw its masks in another order, which is the one legitimate difference."""
  kw = dict(mesh={"data": 2, "fsdp": 2}, num_devices=4, total_steps=3, log_every=1)
  whole = tiny_config(tokenizer_file, **kw)
  whole.model.overrides = {"drop_path_rate": 0.0}
  sliced = tiny_config(tokenizer_file, grad_accum=4, **kw)
  sliced.model.overrides = {"drop_path_rate": 0.0}
  a = pretrain.train_and_evaluate(whole, tmp_path / "whole")
  b = pretrain.train_and_evaluate(sliced, tmp_path / "sliced")
  print("loss whole batch", a["metrics"]["loss"], "in 4 slices", b["metrics"]["loss"])
  assert abs(a["metrics"]["loss"] - b["metrics"]["loss"]) < 1e-5
  assert a["metrics"]["masked"] == b["metrics"]["masked"]
  diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), params_np(a), params_np(b))))
  print("max param diff", diff)
  assert diff < 1e-5
  with pytest.raises(ValueError, match="grad_accum=3"):  # 16 rows do not split over 4 devices x 3 slices
    pretrain.train_and_evaluate(tiny_config(tokenizer_file, grad_accum=3, **kw), tmp_path / "bad")


def test_profiler_on_request_writes_a_trace(tmp_path, tokenizer_file):
  c = tiny_config(tokenizer_file, total_steps=4, profile_first_step=2, profile_steps=1)
  pretrain.train_and_evaluate(c, tmp_path)
  traces = list(pathlib.Path(tmp_path, "plugins", "profile").glob("*/*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0, list(pathlib.Path(tmp_path).rglob("*"))
  assert (tmp_path / "model" / "4").is_dir()  # the finished run's model, for fine-tuning / a perceptual loss


def test_fsdp_per_device_state_from_the_compiled_steps_memory_analysis(tokenizer_file):
  """The real step compiled ahead of time (abstract state: nothing allocated) over 8 devices, fsdp=8 vs data=8:
  XLA's own per-device argument bytes. A width-256 model, so parameters and optimizer state (3 copies of 2.4M
  params) outweigh the batch, and every `embed` axis divides by 8."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax.train import sharding  # pylint: disable=import-outside-toplevel
  config = tiny_config(tokenizer_file)
  config.model.overrides = {"width": 256, "num_heads": 4}
  tok = pretrain.load_tokenizer(config)
  cfg = pretrain.model_config(config, tok.vocab_size)
  tok_graphdef, tok_state = nnx.split(tok)
  args_bytes = {}
  for axes in ({"data": 8}, {"fsdp": 8}):
    mesh = sharding.make_mesh(axes)
    graphdef, state, tx, lr_fn = pretrain.create_state(config, cfg, mesh, steps=10, abstract=True)
    step = pretrain.jit_train_step(config, mesh, state, graphdef, tok_graphdef, tx, lr_fn, num_predict=6)
    data = sharding.batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32, sharding=data),
             "tokenizer_image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32, sharding=data),
             "mask": jax.ShapeDtypeStruct((16, 16), jnp.bool_, sharding=data)}
    rep_tok = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh)),
                           tok_state)
    with jax.set_mesh(mesh):
      memory = step.lower(state, batch, rep_tok).compile().memory_analysis()
    args_bytes[tuple(axes)] = memory.argument_size_in_bytes
  tok_bytes = sum(x.nbytes for x in jax.tree.leaves(tok_state))  # replicated under both layouts
  state_bytes = {k: v - tok_bytes for k, v in args_bytes.items()}
  ratio = state_bytes[("fsdp",)] / state_bytes[("data",)]
  print(f"per-device arguments (state + batch, tokenizer excluded): data=8 {state_bytes[('data',)]} B, "
        f"fsdp=8 {state_bytes[('fsdp',)]} B, ratio {ratio:.3f} (1/8 = 0.125)")
  assert 0.1 < ratio < 0.2
