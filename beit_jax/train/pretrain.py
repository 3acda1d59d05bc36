"""Masked image modeling pre-training (BEiT, and PeCo with its perceptual tokenizer): one readable loop.

Per step: the frozen tokenizer turns the tokenizer view into target ids (inside the jitted step, no gradient),
the BEiT model sees the model view with masked patches replaced by the mask token, and the loss is the
cross-entropy of the masked positions' logits, weighted by the mask and normalised by the global masked
count (the count varies per image under blockwise masking).

  python -m beit_jax.main --config=configs/fmnist_pretrain.py --workdir=/tmp/beit
"""
from __future__ import annotations

import functools
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from beit_jax import model_files, models, tokenizers
from beit_jax.data import device  # no TensorFlow: the views' uint8 -> float on the device
from beit_jax.train import checkpoints, console, loop, metrics, optim, runs, sharding

# What every pre-training model is, whatever the named variant (beit/modeling_pretrain.py).
PRETRAIN_LAYOUT = dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_mask_token=True,
                       init_style="pretrain", num_classes=0)


# ---------------------------------------------------------------------------------------------------------------
# The step: a pure function of (state, batch, tokenizer state)
# ---------------------------------------------------------------------------------------------------------------
def mim_sums(logits, targets, weights):
  """Summed cross-entropy and correct predictions over the masked positions, and their count. The step divides
  the sums by the global masked count (it varies per image under blockwise masking)."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = ((jnp.argmax(logits, -1) == targets) * weights).sum()
  return (ce * weights).sum(), {"correct": correct, "count": weights.sum()}


def train_step(state, batch, tok_state, *, graphdef, tok_graphdef, tx, lr_fn, num_predict, micro_steps=1,
               views=None):
  """`views(batch)` (views_of(config); None: float views as they are): the host's views as the model and the
  tokenizer take them (data.uint8: normalised here, on the device; data.tokenizer_view="device": the tokenizer
  view resized here from the model view; data.resize="device": both views made here from the host's crop)."""
  batch = views(batch) if views is not None else batch
  tok = nnx.merge(tok_graphdef, tok_state)
  ids = jax.lax.stop_gradient(tok.encode(batch["tokenizer_image"]))
  batch = {"image": batch["image"], "mask": batch["mask"], "ids": ids.reshape(ids.shape[0], -1)}

  def loss_fn(model, batch):
    logits, positions, weights = model.masked_logits(batch["image"], batch["mask"], num_predict)
    return mim_sums(logits, jnp.take_along_axis(batch["ids"], positions, axis=1), weights)

  # Gradients of the sums, over `micro_steps` slices of the batch (accumulation), then one division by the
  # global masked count: the same loss and update whatever micro_steps is. The drop-path RNG streams, which the
  # forward pass advances, come back in `rest`.
  (ce_sum, sums), grads, rest = optim.summed_value_and_grad(loss_fn, graphdef, state["params"], state["rest"],
                                                            batch, micro_steps)
  denom = jnp.maximum(sums["count"], 1.0)  # an all-empty batch cannot happen (masks hold >= 1 patch): never 0/0
  loss = ce_sum / denom
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optim.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  # A non-finite loss or gradient leaves the state untouched and records the step; the loop stops there.
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  step = state["step"]
  new_state = metrics.finite_update(ok, state, {"step": step + 1, "params": params, "opt_state": opt_state,
                                                "rest": rest})
  out = {"loss": loss, "mlm_acc": sums["correct"] / denom, "grad_norm": grad_norm, "lr": lr_fn(step),
         "masked": sums["count"]}
  return new_state, out


def eval_step(state, batch, tok_state, *, graphdef, tok_graphdef, num_predict, vocab_size,
              views=None):
  """Held-out sums: correct masked predictions, masked count, and the target histograms overall and per patch
  position (for the baselines of always predicting the most frequent token, overall or at that position: on
  Fashion-MNIST the background token dominates the borders). Both baselines read the held-out histograms
  themselves, so they are the best any constant predictor could do there: upper bounds of the trivial ones.
  The same sums restricted to masked patches that are not background (metrics.background_patches of the
  tokenizer view) say how much of the accuracy is more than "black stays black"."""
  batch = views(batch) if views is not None else batch
  tok = nnx.merge(tok_graphdef, tok_state)
  ids = tok.encode(batch["tokenizer_image"]).reshape(batch["mask"].shape[0], -1)
  model = nnx.merge(graphdef, state["params"], state["rest"])
  model.eval()
  logits, positions, weights = model.masked_logits(batch["image"], batch["mask"], num_predict)
  weights = weights * batch["valid"][:, None]
  background = metrics.background_patches(batch["tokenizer_image"], model.config.grid)
  fg_weights = weights * (1.0 - jnp.take_along_axis(background, positions, axis=1))
  targets = jnp.take_along_axis(ids, positions, axis=1)
  hits = jnp.argmax(logits, -1) == targets
  hist = lambda w: jnp.zeros((ids.shape[1], vocab_size), jnp.float32).at[positions, targets].add(w)
  pos_hist, fg_pos_hist = hist(weights), hist(fg_weights)
  return {"correct": (hits * weights).sum(), "count": weights.sum(), "hist": pos_hist.sum(0), "pos_hist": pos_hist,
          "fg_correct": (hits * fg_weights).sum(), "fg_count": fg_weights.sum(), "fg_pos_hist": fg_pos_hist}


def held_out_figures(sums, vocab_size: int) -> dict[str, float]:
  """eval_step's sums over the held-out split -> masked-token accuracy against the constant baselines, overall
  and on masked patches that are not background."""
  count, fg = max(float(sums["count"]), 1.0), max(float(sums["fg_count"]), 1.0)
  return {"eval_mlm_acc": float(sums["correct"]) / count,
          "eval_most_frequent_acc": float(sums["hist"].max()) / count,
          "eval_most_frequent_per_position_acc": float(sums["pos_hist"].max(-1).sum()) / count,
          "eval_chance": 1.0 / vocab_size,
          "eval_foreground_share": float(sums["fg_count"]) / count,
          "eval_mlm_acc_foreground": float(sums["fg_correct"]) / fg,
          "eval_most_frequent_per_position_acc_foreground": float(sums["fg_pos_hist"].max(-1).sum()) / fg}


# ---------------------------------------------------------------------------------------------------------------
# Set-up (compile_for and benchmarks/train_step.py build the same state and step from these)
# ---------------------------------------------------------------------------------------------------------------
def load_tokenizer(config: ml_collections.ConfigDict):
  cfg = dict(config.tokenizer)
  name = cfg.pop("name")
  for key in ("encoder", "checkpoint"):
    if key in cfg and cfg[key] and not pathlib.Path(cfg[key]).exists():
      raise FileNotFoundError(f"config.tokenizer.{key}={cfg[key]!r} does not exist")
  return tokenizers.load(name, **cfg)


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> models.BeitConfig:
  overrides = {**PRETRAIN_LAYOUT, **dict(config.model.get("overrides", {})), "vocab_size": vocab_size}
  cfg = models.get_config(config.model.name, **overrides)
  if cfg.img_size != config.data.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} differs from the model's img_size "
                     f"{cfg.img_size} (config.model.name={config.model.name!r})")
  return cfg


def create_state(config: ml_collections.ConfigDict, cfg: models.BeitConfig, mesh, steps: int, *,
                 abstract: bool = False):
  """(graphdef, train state, optimizer, lr schedule); the state created in its shardings, or with
  `abstract=True` as ShapeDtypeStructs carrying them (nothing allocated: for ahead-of-time compilation)."""
  graphdef, params, rest = sharding.create_sharded(
      lambda: models.Beit(cfg, rngs=models.beit.make_rngs(config.seed)), mesh, abstract=abstract)
  tx, lr_fn = optim.make(config.optim, params, steps)
  return graphdef, sharding.train_state(params, rest, tx, mesh, abstract=abstract), tx, lr_fn


def batch_spec(config: ml_collections.ConfigDict, grid: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The global batch train_step takes, key -> (shape, dtype): what pipelines.pretrain_train yields (its
  KEYS["pretrain_train"]) and what compile_for compiles the step for. data.uint8: the views leave the host as
  uint8 (4x less to transfer); data.tokenizer_view="device": no tokenizer view from the host at all;
  data.resize="device": the uint8 crop and its augmentation's draws instead of the views."""
  d, b = config.data, config.batch_size
  mask = {"mask": ((b, *grid), jnp.bool_)}
  if d.get("resize", "host") == "device":  # the crop and its draws instead of the views (pipelines.pretrain_transform)
    canvas = d.get("crop_canvas", device.CROP_CANVAS)
    return {"crop": ((b, canvas, canvas, 3), jnp.uint8), "crop_size": ((b, 2), jnp.int32), "flip": ((b,), jnp.bool_),
            "jitter": ((b, 3), jnp.float32), "jitter_order": ((b, 3), jnp.int32), **mask}
  dtype = jnp.uint8 if d.get("uint8", False) else jnp.float32
  spec = {"image": ((b, d.image_size, d.image_size, 3), dtype),
          "tokenizer_image": ((b, d.tokenizer_size, d.tokenizer_size, 3), dtype), **mask}
  if d.get("tokenizer_view", "host") == "device":
    del spec["tokenizer_image"]
  return spec


def views_of(config: ml_collections.ConfigDict):
  """The step's `views`: device.pretrain_inputs with the config's normalisation and tokenizer view."""
  d = config.data
  return functools.partial(device.pretrain_inputs, mean_std=d.mean_std, tokenizer_size=d.tokenizer_size,
                           tokenizer_resize=d.tokenizer_resize, image_size=d.image_size)


def jit_train_step(config, mesh, state, graphdef, tok_graphdef, tx, lr_fn, num_predict: int):
  """The step jitted with the state's shardings in and out (the state donated), the batch split over the data
  axes, the tokenizer replicated. `state` may be abstract."""
  state_sh, rep = sharding.shardings_of(state), sharding.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, tok_graphdef=tok_graphdef, tx=tx, lr_fn=lr_fn,
                        num_predict=num_predict, micro_steps=config.get("grad_accum", 1),
                        views=views_of(config)),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), rep), out_shardings=(state_sh, rep),
      donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from beit_jax.data import pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)

  workdir = pathlib.Path(workdir)
  mesh = runs.make_mesh(config)
  host_batch = runs.check_batch(config, mesh)
  tok = load_tokenizer(config)
  cfg = model_config(config, tok.vocab_size)
  d = config.data
  tok_grid = jax.eval_shape(tok.encode, jax.ShapeDtypeStruct((1, d.tokenizer_size, d.tokenizer_size, 3),
                                                              jnp.float32)).shape[1:]
  if tuple(tok_grid) != cfg.grid:
    raise ValueError(f"the tokenizer makes a {tok_grid} grid of ids from config.data.tokenizer_size="
                     f"{d.tokenizer_size} but the model has a {cfg.grid} grid of patches")
  mask_spec = pipelines.mask_spec(d, cfg.grid)
  source = pipelines.source_of(d, d.split)
  shard = pipelines.Shard.of_this_process()
  spe = pipelines.steps_per_epoch(source, host_batch, shard.count)
  steps = runs.total_steps(config, spe)

  graphdef, state, tx, lr_fn = create_state(config, cfg, mesh, steps)
  rep = sharding.replicated(mesh)
  tok_graphdef, tok_state = nnx.split(tok)
  tok_state = jax.device_put(tok_state, rep)

  ckpts, state, start = checkpoints.resume(workdir, config, state, steps)

  state_sh, batch_sh = sharding.shardings_of(state), sharding.batch_sharding(mesh)
  step_fn = jit_train_step(config, mesh, state, graphdef, tok_graphdef, tx, lr_fn, mask_spec.num_masked)

  host_batches = pipelines.pretrain_train(d, source, host_batch=host_batch, seed=config.seed, start_step=start,
                                          shard=shard, masks=mask_spec)
  batches = device.global_batches(host_batches, mesh, sharding.BATCH_AXES)

  writer = metrics.create_writer(str(workdir))
  if start == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})
  t0 = time.time()
  with jax.set_mesh(mesh):
    state, last = loop.run(
        config, state, lambda step, s: step_fn(s, next(batches), tok_state), start=start, steps=steps,
        ckpts=ckpts, writer=writer, hooks=metrics.step_hooks(config, steps, writer, str(workdir)),
        meta=lambda s: {"step": s, "model_config": cfg.to_dict()})
  finished = int(jax.device_get(state["step"])) == steps
  model_dir = workdir / "model"  # the trained backbone (+ MIM head): fine-tuning's and PeCo's perceptual `init`
  if finished and not (model_dir / str(steps)).exists():  # every process calls orbax: multi-host saves are collective
    model_files.save_model(model_dir, nnx.merge(graphdef, state["params"], state["rest"]), step=steps)
  if config.get("eval_split") and finished:
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, tok_graphdef=tok_graphdef,
                                        num_predict=mask_spec.num_masked, vocab_size=cfg.vocab_size,
                                        views=views_of(config)),
                      in_shardings=(state_sh, batch_sh, rep), out_shardings=rep)
    it = pipelines.pretrain_eval(d, config.eval_split, host_batch=host_batch, seed=config.seed, shard=shard,
                                 masks=mask_spec)
    with jax.set_mesh(mesh):
      sums = metrics.sum_over(lambda batch: eval_fn(state, batch, tok_state),
                              device.global_batches(it, mesh, sharding.BATCH_AXES))
    last.update(held_out_figures(sums, cfg.vocab_size))
    writer.write_scalars(steps, {k: v for k, v in last.items() if k.startswith("eval_")})
  logging.info("%s", console.done("pre-training", workdir, time.time() - t0, last, model_dir))
  return {"state": state, "graphdef": graphdef, "metrics": last, "model_config": cfg}
