"""Fine-tuning a (pre-trained) BEiT for classification, and evaluating a classifier: one readable loop each.

Start: `config.init` names the weights: "" (from scratch), "checkpoint:DIR" or "pytorch:PATH" (train/weights.py:
the converter's one path copies the shared relative position table into every block, resizes position tables
to the new image size, drops the MIM head and starts a new classification head).

Per step: mixup/cutmix (or label smoothing alone) on device, soft-target cross-entropy, AdamW with layer-wise
learning-rate decay and the weight-decay mask, cosine schedule with warm-up, optional EMA of the weights.
Evaluation: top-1/top-5 over the eval split, every example counted exactly once across hosts.

  python -m beit_jax.main --config=configs/fmnist_finetune.py:/tmp/beit_demo/beit_pretrain/model --workdir=/tmp/ft
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

from beit_jax import model_files, models
from beit_jax.data import device, mixup  # no TensorFlow: mixup and the uint8 images' normalisation on the device
from beit_jax.train import checkpoints, console, loop, metrics, optim, runs, sharding, weights

# ---------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------
def soft_ce_sums(logits, targets):
  """Summed soft-target cross-entropy (timm's SoftTargetCrossEntropy x B) and the example count."""
  ce = -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)
  return ce.sum(), {"count": jnp.float32(ce.shape[0]),
                    "correct": (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).sum().astype(jnp.float32)}


def train_step(state, batch, frozen=None, *, graphdef, tx, lr_fn, num_classes, mix, seed, smoothing=0.0,
               micro_steps=1, ema_decay=0.0, views=None):
  """One step; `mix` the mixup/cutmix arguments (None: off), `smoothing` the label smoothing (mixup or not);
  `views(batch, key)` (views_of(config); None: float images as they are): the host's images as the model takes
  them (data.uint8: normalised and randomly erased here, on the device). Every mode's step is
  `train_step(state, batch, frozen)`; fine-tuning trains every parameter: frozen is None."""
  del frozen
  step = state["step"]
  key = jax.random.fold_in(jax.random.key(seed), step)  # a fresh mixup draw per step, the same after a resume
  if views is not None:
    batch = views(batch, jax.random.fold_in(key, 1))  # erasing's noise: a stream of its own
  if mix:
    images, targets = mixup.mixup_cutmix(key, batch["image"], batch["label"], num_classes, smoothing=smoothing,
                                         **mix)
  else:
    images, targets = batch["image"], mixup.smooth_one_hot(batch["label"], num_classes, smoothing)

  def loss_fn(model, b):
    return soft_ce_sums(model(b["image"]), b["targets"])

  (ce_sum, sums), grads, rest = optim.summed_value_and_grad(
      loss_fn, graphdef, state["params"], state["rest"], {"image": images, "targets": targets}, micro_steps)
  loss = ce_sum / sums["count"]
  grads = jax.tree.map(lambda g: g / sums["count"], grads)
  grad_norm = optim.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new = {"step": step + 1, "params": params, "opt_state": opt_state, "rest": rest}
  if ema_decay:
    new["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state["ema"], params)
  new_state = metrics.finite_update(jnp.isfinite(loss) & jnp.isfinite(grad_norm), state, new)
  out = {"loss": loss, "train_acc": sums["correct"] / sums["count"], "grad_norm": grad_norm, "lr": lr_fn(step)}
  return new_state, out


def eval_step(params, rest, batch, *, graphdef):
  """Sums over the valid rows: top-1 and top-5 hits, and the count."""
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  logits = model(batch["image"])
  valid = batch["valid"].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  hit = top == batch["label"][:, None]
  return {"top1": (hit[:, 0] * valid).sum(), "top5": (hit.any(-1) * valid).sum(), "count": valid.sum()}


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------
def evaluate(eval_fn, params, rest, batches) -> dict[str, float]:
  sums = metrics.sum_over(lambda batch: eval_fn(params, rest, batch), batches)
  n = float(sums["count"])
  return {"top1": float(sums["top1"]) / n, "top5": float(sums["top5"]) / n, "count": n}


def jit_eval(graphdef, params, rest, mesh):
  rep = sharding.replicated(mesh)
  return jax.jit(functools.partial(eval_step, graphdef=graphdef),
                 in_shardings=(sharding.shardings_of(params), sharding.shardings_of(rest),
                               sharding.batch_sharding(mesh)), out_shardings=rep)


def mixup_args(config) -> dict | None:
  m = config.get("mixup")
  if not m or (m.mixup_alpha <= 0 and m.cutmix_alpha <= 0):
    return None
  return {"mixup_alpha": m.mixup_alpha, "cutmix_alpha": m.cutmix_alpha, "switch_prob": m.switch_prob,
          "prob": m.prob}


# ---------------------------------------------------------------------------------------------------------------
# The loops
# ---------------------------------------------------------------------------------------------------------------
def create_state(config: ml_collections.ConfigDict, cfg: models.BeitConfig, mesh, steps: int, *,
                 abstract: bool = False):
  """(graphdef, train state, optimizer, lr schedule): the model from `config.init` placed on the mesh (plus an
  EMA copy of the weights with config.ema_decay > 0); with `abstract=True` ShapeDtypeStructs carrying the
  shardings of a freshly initialised model (nothing allocated or read: for ahead-of-time compilation)."""
  if abstract:
    graphdef, params, rest = sharding.create_sharded(
        lambda: models.Beit(cfg, rngs=models.beit.make_rngs(config.seed)), mesh, abstract=True)
  else:
    graphdef, params, rest = sharding.place(weights.classifier(config.init, cfg, config.seed), mesh)
  tx, lr_fn = optim.make(config.optim, params, steps, depth=cfg.depth)
  state = sharding.train_state(params, rest, tx, mesh, abstract=abstract)
  if config.get("ema_decay", 0.0):
    state["ema"] = params if abstract else jax.tree.map(jnp.copy, params)
  return graphdef, state, tx, lr_fn


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The global batch train_step takes, key -> (shape, dtype): what pipelines.classification_train yields
  (data.uint8: uint8 images and, with random erasing, its int32 rectangles)."""
  d, b = config.data, config.batch_size
  uint8 = bool(d.get("uint8", False))
  spec = {"image": ((b, d.image_size, d.image_size, 3), jnp.uint8 if uint8 else jnp.float32),
          "label": ((b,), jnp.int32)}
  if uint8 and d.augment.erase_prob > 0:
    spec["erase"] = ((b, 4), jnp.int32)
  return spec


def views_of(config: ml_collections.ConfigDict):
  """The step's `views`: device.classification_inputs with the config's normalisation."""
  return functools.partial(device.classification_inputs, mean_std=config.data.mean_std)


def jit_train_step(config, mesh, state, graphdef, tx, lr_fn, num_classes: int):
  """The step `(state, batch, frozen=None)` jitted with the state's shardings in and out (the state donated)
  and the batch split over the data axes. `state` may be abstract."""
  state_sh = sharding.shardings_of(state)
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, num_classes=num_classes,
                        mix=mixup_args(config), seed=config.seed, smoothing=float(config.label_smoothing),
                        micro_steps=config.get("grad_accum", 1),
                        ema_decay=float(config.get("ema_decay", 0.0)), views=views_of(config)),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from beit_jax.data import pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)

  workdir = pathlib.Path(workdir)
  weights.parse(config.init)
  mesh = runs.make_mesh(config)
  host_batch = runs.check_batch(config, mesh)
  source = pipelines.source_of(config.data, config.data.split)
  cfg = weights.classifier_config(config, source.num_classes)
  shard = pipelines.Shard.of_this_process()
  steps = runs.total_steps(config, pipelines.steps_per_epoch(source, host_batch, shard.count))

  graphdef, state, tx, lr_fn = create_state(config, cfg, mesh, steps)
  ema_decay = float(config.get("ema_decay", 0.0))
  ckpts, state, start = checkpoints.resume(workdir, config, state, steps)
  step_fn = jit_train_step(config, mesh, state, graphdef, tx, lr_fn, cfg.num_classes)

  host_batches = pipelines.classification_train(config.data, source, host_batch=host_batch, seed=config.seed,
                                                start_step=start, shard=shard)
  batches = device.global_batches(host_batches, mesh, sharding.BATCH_AXES)

  writer = metrics.create_writer(str(workdir))
  eval_fn = jit_eval(graphdef, state["params"], state["rest"], mesh)
  # The learning curve: held-out top-1 every `eval_every` steps and at the end on `eval_every_split` (a subset
  # of the eval split keeps it cheap), in TensorBoard and workdir/eval_history.jsonl.
  curve_every, curve_split = config.get("eval_every", 0), config.get("eval_every_split") or config.eval_split
  held_out = lambda split="": runs.classification_eval_batches(config, mesh, host_batch, split)

  def curve_point(step, state):
    if not (curve_every and curve_split) or (step % curve_every and step != steps):
      return None
    res = evaluate(eval_fn, state["params"], state["rest"], held_out(curve_split))
    point = {"curve_top1": res["top1"], "curve_top5": res["top5"]}
    writer.write_scalars(step, point)
    metrics.append_history(workdir, {"step": step, "examples": step * config.batch_size, "split": curve_split,
                                     "top1": res["top1"], "top5": res["top5"]})
    return point

  t0 = time.time()
  with jax.set_mesh(mesh):
    state, last = loop.run(
        config, state, lambda step, s: step_fn(s, next(batches), None), start=start, steps=steps, ckpts=ckpts,
        writer=writer, hooks=metrics.step_hooks(config, steps, writer, str(workdir)),
        meta=lambda s: {"step": s, "model_config": cfg.to_dict()}, after_step=curve_point)
  finished = int(jax.device_get(state["step"])) == steps
  model_dir = workdir / "model"
  if finished and not (model_dir / str(steps)).exists():  # collective under multi-host, as every orbax save
    model_files.save_model(model_dir, nnx.merge(graphdef, state["ema"] if ema_decay else state["params"],
                                                 state["rest"]), step=steps)
  if config.get("eval_split") and finished:
    with jax.set_mesh(mesh):
      res = evaluate(eval_fn, state["params"], state["rest"], held_out())
      last.update(eval_top1=res["top1"], eval_top5=res["top5"], eval_count=res["count"])
      if ema_decay:
        res = evaluate(eval_fn, state["ema"], state["rest"], held_out())
        last.update(eval_ema_top1=res["top1"], eval_ema_top5=res["top5"])
    writer.write_scalars(steps, {k: v for k, v in last.items() if k.startswith("eval_")})
  logging.info("%s", console.done("fine-tuning", workdir, time.time() - t0, last, model_dir))
  return {"state": state, "graphdef": graphdef, "metrics": last, "model_config": cfg}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.mode = "eval"`: top-1/top-5 of the classifier `config.init` names on `config.eval_split`."""
  from beit_jax.data import pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)
  t0 = time.time()
  weights.require(config.init, "classifier")
  mesh = runs.make_mesh(config)
  host_batch = runs.check_batch(config, mesh)
  num_classes = pipelines.source_of(config.data, config.eval_split).num_classes
  model = weights.classifier(config.init, weights.classifier_config(config, num_classes), config.seed,
                             trained_head=True)
  graphdef, params, rest = sharding.place(model, mesh)
  with jax.set_mesh(mesh):
    res = evaluate(jit_eval(graphdef, params, rest, mesh), params, rest,
                   runs.classification_eval_batches(config, mesh, host_batch))
  out = {"eval_top1": res["top1"], "eval_top5": res["top5"], "eval_count": res["count"]}
  writer = metrics.create_writer(str(workdir))
  writer.write_scalars(0, out)
  writer.flush()
  logging.info("%s", console.done(f"evaluation of {config.init} on {config.eval_split}", workdir,
                                   time.time() - t0, out))
  return {"metrics": out}
