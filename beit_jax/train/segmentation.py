"""Semantic segmentation: a (pre-trained) BEiT as the backbone of UperNet, trained and evaluated as BEiT's ADE20K
results were (unilm semantic_segmentation, mmseg; spec section C). One readable loop, and an evaluation mode.

Start: `config.init` names the backbone's weights as in fine-tuning ("" from scratch, "checkpoint:DIR",
"pytorch:PATH"): relative position tables are resized to the crop (224 -> 512 px), the pre-training head is
dropped; the adapter and heads start from their init. `config.mode = "seg_eval"` instead evaluates a whole
segmentation model: "checkpoint:DIR" saved by this loop (workdir/model) or "pytorch:PATH" of a unilm/mmseg or
transformers ADE20K checkpoint.

Per step: a batch of crop x crop image/annotation pairs (host-side scale/crop/flip/photometric augmentation,
data/pipelines.seg_train_transform), pixel cross-entropy ignoring 255 plus 0.4 x the auxiliary head's, AdamW
with layer decay (heads and adapter at the full rate), the poly schedule after a linear warm-up. BatchNorm
statistics are those of the global batch (SyncBN: the batch is sharded over the data axes of one program).
Evaluation: sliding windows over every held-out image at the test scale, mIoU from the confusion matrix summed
over the split (train/seg_eval.py).

  python -m beit_jax.main --config=configs/fmnist_segmentation.py --workdir=/tmp/seg
"""
from __future__ import annotations

import functools
import logging
import pathlib
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from beit_jax import model_files, models
from beit_jax.models import segmentation
from beit_jax.train import checkpoints, console, loop, metrics, optim, runs, seg_eval, sharding, weights


# ---------------------------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------------------------
def train_step(state, batch, frozen=None, *, graphdef, tx, lr_fn, aux_weight, micro_steps=1):
  """Every mode's step is `train_step(state, batch, frozen)`; the segmenter trains every parameter."""
  del frozen
  def loss_fn(model, b):
    logits, aux = model(b["image"])
    return segmentation.seg_loss_sums(logits, aux, b["annotation"].astype(jnp.int32), aux_weight=aux_weight)

  (total, sums), grads, rest = optim.summed_value_and_grad(loss_fn, graphdef, state["params"], state["rest"],
                                                           batch, micro_steps)
  count = jnp.maximum(sums["count"], 1.0)  # the labelled pixels of the global batch
  grads = jax.tree.map(lambda g: g / count, grads)
  loss, grad_norm = total / count, optim.global_norm(grads)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
         "opt_state": opt_state, "rest": rest}
  new_state = metrics.finite_update(jnp.isfinite(loss) & jnp.isfinite(grad_norm), state, new)
  return new_state, {"loss": loss, "main_loss": sums["main"] / count, "grad_norm": grad_norm,
                     "lr": lr_fn(state["step"])}


def eval_step(params, rest, batch, *, graphdef, crop: int, num_classes: int):
  """The confusion matrix [K, K] of a batch of canvases (see seg_eval and pipelines.seg_eval_transform)."""
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  predict = lambda crops: segmentation.resize(model(crops)[0], (crop, crop))  # mmseg: logits at the crop's size
  sums, _ = seg_eval.slide_logits(predict, batch["image"], batch["starts"], batch["window_valid"],
                                  batch["transposed"], crop)
  label = batch["annotation"].astype(jnp.int32)
  keep = (label != 255) & batch["valid"][:, None, None]
  return seg_eval.confusion_matrix(jnp.argmax(sums, -1), label, num_classes, keep)


# ---------------------------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------------------------
def source(config, split: str):
  from beit_jax.data import pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)
  return pipelines.seg_source_of(config.data, split)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails on a malformed segmentation block before anything is read or compiled."""
  d, e = config.data, config.eval
  if d.image_size != d.crop_size:
    raise ValueError(f"config.data.image_size={d.image_size} must equal config.data.crop_size={d.crop_size}: the "
                     "backbone is built for the training crop (its relative position tables resized to it)")
  if not 0 < e.stride <= d.crop_size:
    raise ValueError(f"config.eval.stride={e.stride} must be in (0, config.data.crop_size={d.crop_size}]")
  if len(d.scale) != 2 or min(d.scale) <= 0 or d.scale[0] < d.scale[1]:
    raise ValueError(f"config.data.scale={tuple(d.scale)}: (long edge, short edge), as mmseg's img_scale (2048, 512)")
  if len(d.ratio_range) != 2 or not 0 < d.ratio_range[0] <= d.ratio_range[1]:
    raise ValueError(f"config.data.ratio_range={tuple(d.ratio_range)}: (low, high) with 0 < low <= high")


def model_configs(config, num_classes: int) -> tuple[models.BeitConfig, segmentation.SegConfig]:
  bcfg = weights.classifier_config(config, 0)
  seg = dict(config.seg)
  seg = segmentation.SegConfig(num_classes=num_classes, **{k: tuple(v) if isinstance(v, (list, tuple)) else v
                                                          for k, v in seg.items()})
  return bcfg, seg


def init_model(config, bcfg, seg_cfg) -> segmentation.UperNet:
  """UperNet on the backbone `config.init` names (fine-tuning's one loader), heads freshly initialised."""
  backbone = weights.classifier(config.init, bcfg, config.seed)
  return segmentation.UperNet(backbone, seg_cfg, rngs=nnx.Rngs(config.seed))


def create_state(config, bcfg, seg_cfg, mesh, steps: int, *, abstract: bool = False):
  """(graphdef, train state, optimizer, lr schedule), as fine-tuning's create_state."""
  if abstract:
    create = lambda: segmentation.UperNet(models.Beit(bcfg, rngs=models.beit.make_rngs(config.seed)), seg_cfg,
                                          rngs=nnx.Rngs(config.seed))
    graphdef, params, rest = sharding.create_sharded(create, mesh, abstract=True)
  else:
    graphdef, params, rest = sharding.place(init_model(config, bcfg, seg_cfg), mesh)
  tx, lr_fn = optim.make(config.optim, params, steps, depth=bcfg.depth)
  return graphdef, sharding.train_state(params, rest, tx, mesh, abstract=abstract), tx, lr_fn


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The global batch train_step takes, key -> (shape, dtype): what pipelines.segmentation_train yields."""
  s, b = config.data.crop_size, config.batch_size
  return {"image": ((b, s, s, 3), jnp.float32), "annotation": ((b, s, s), jnp.uint8)}


def jit_train_step(config, mesh, state, graphdef, tx, lr_fn):
  """The step `(state, batch, frozen=None)` jitted as finetune.jit_train_step is."""
  state_sh = sharding.shardings_of(state)
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn, aux_weight=float(config.aux_weight),
                        micro_steps=config.get("grad_accum", 1)),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
      out_shardings=(state_sh, sharding.replicated(mesh)),
      donate_argnums=(0,))


def jit_eval(config, graphdef, params, rest, mesh, num_classes: int):
  return jax.jit(functools.partial(eval_step, graphdef=graphdef, crop=config.data.crop_size, num_classes=num_classes),
                 in_shardings=(sharding.shardings_of(params), sharding.shardings_of(rest),
                               sharding.batch_sharding(mesh)), out_shardings=sharding.replicated(mesh))


def eval_batch_size(config, mesh) -> int:
  """Images per evaluation step over all hosts: config.eval.batch_size, or one per data-parallel device."""
  n = config.eval.get("batch_size") or sharding.data_parallel_size(mesh)
  if n % sharding.data_parallel_size(mesh) or n % jax.process_count():
    raise ValueError(f"config.eval.batch_size={n} must divide over the {sharding.data_parallel_size(mesh)} "
                     f"data-parallel devices and {jax.process_count()} processes")
  return n


def eval_batches(config, mesh, split_source) -> Iterator[dict[str, jax.Array]]:
  """The canvases of `split_source` (a Source) with their window lists, as global batches (padded rows
  invalid)."""
  from beit_jax.data import device, pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)
  d, e = config.data, config.eval
  scale = tuple(e.get("scale") or d.scale)
  canvas = pipelines.seg_canvas(scale, d.crop_size)
  host_batch = eval_batch_size(config, mesh) // jax.process_count()

  def with_windows(b):  # each image's "size" on the canvas -> its sliding windows
    starts, valid = seg_eval.window_grid(b["size"], d.crop_size, e.stride, canvas)
    return {**{k: v for k, v in b.items() if k != "size"}, "starts": starts, "window_valid": valid}
  it = pipelines.segmentation_eval(d, split_source, host_batch=host_batch, shard=pipelines.Shard.of_this_process(),
                                   scale=scale)
  return device.global_batches(map(with_windows, it), mesh, sharding.BATCH_AXES)


def evaluate(config, mesh, eval_fn, params, rest, split_source) -> tuple[dict[str, float], np.ndarray]:
  """(the figures to log, the confusion matrix [K, K] of the split)."""
  conf = metrics.sum_over(lambda batch: eval_fn(params, rest, batch), eval_batches(config, mesh, split_source))
  iou = seg_eval.iou_per_class(conf)
  return {"eval_miou": seg_eval.mean_iou(conf), "eval_pixel_acc": seg_eval.pixel_accuracy(conf),
          "eval_pixels": float(conf.sum()), "eval_classes_seen": float(np.isfinite(iou).sum())}, conf


# ---------------------------------------------------------------------------------------------------------------
# The loops
# ---------------------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from beit_jax.data import device, pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)

  workdir = pathlib.Path(workdir)
  check_config(config)
  weights.parse(config.init)
  mesh = runs.make_mesh(config)
  host_batch = runs.check_batch(config, mesh)
  d = config.data
  train_source = source(config, d.split)
  held_out = None
  if config.get("eval_split"):
    eval_batch_size(config, mesh)
    held_out = source(config, config.eval_split)
  bcfg, seg_cfg = model_configs(config, train_source.num_classes)
  shard = pipelines.Shard.of_this_process()
  steps = runs.total_steps(config, pipelines.steps_per_epoch(train_source, host_batch, shard.count))

  graphdef, state, tx, lr_fn = create_state(config, bcfg, seg_cfg, mesh, steps)
  ckpts, state, start = checkpoints.resume(workdir, config, state, steps)
  step_fn = jit_train_step(config, mesh, state, graphdef, tx, lr_fn)

  host_batches = pipelines.segmentation_train(d, train_source, host_batch=host_batch, seed=config.seed,
                                              start_step=start, shard=shard)
  batches = device.global_batches(host_batches, mesh, sharding.BATCH_AXES)

  eval_fn, confusion = None, None

  def after_step(step, s):  # mmseg's periodic evaluation (every 16k of 160k steps in BEiT's configs)
    nonlocal eval_fn, confusion
    if not (held_out and config.eval.get("every") and step % config.eval.every == 0):
      return None
    eval_fn = eval_fn or jit_eval(config, graphdef, s["params"], s["rest"], mesh, seg_cfg.num_classes)
    res, confusion = evaluate(config, mesh, eval_fn, s["params"], s["rest"], held_out)
    writer.write_scalars(step, res)
    return res

  writer = metrics.create_writer(str(workdir))
  t0 = time.time()
  with jax.set_mesh(mesh):
    state, last = loop.run(
        config, state, lambda step, s: step_fn(s, next(batches), None), start=start, steps=steps, ckpts=ckpts,
        writer=writer, hooks=metrics.step_hooks(config, steps, writer, str(workdir)), after_step=after_step,
        meta=lambda s: {"step": s, "model_config": bcfg.to_dict()})
  finished = int(jax.device_get(state["step"])) == steps
  model = nnx.merge(graphdef, state["params"], state["rest"])
  if finished and not (workdir / "model" / str(steps)).exists():
    model_files.save_segmenter(workdir / "model", model, step=steps)
  if finished and held_out and "eval_miou" not in last:
    with jax.set_mesh(mesh):
      eval_fn = eval_fn or jit_eval(config, graphdef, state["params"], state["rest"], mesh, seg_cfg.num_classes)
      res, confusion = evaluate(config, mesh, eval_fn, state["params"], state["rest"], held_out)
      last.update(res)
    writer.write_scalars(steps, {k: v for k, v in last.items() if k.startswith("eval_")})
    writer.flush()
  logging.info("%s", console.done("segmentation training", workdir, time.time() - t0, last,
                                   workdir / "model"))
  return {"state": state, "graphdef": graphdef, "metrics": last, "model": model, "confusion": confusion}


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`config.mode = "seg_eval"`: mIoU of the segmentation model `config.init` names on `config.eval_split`."""
  t0 = time.time()
  check_config(config)
  model = weights.segmenter(config.init, config.seed, img_size=config.data.crop_size)
  mesh = runs.make_mesh(config)
  held_out = source(config, config.eval_split)
  num_classes = held_out.num_classes
  if model.cfg.num_classes != num_classes:
    raise ValueError(f"config.init={config.init!r} predicts {model.cfg.num_classes} classes, the eval split "
                     f"{num_classes}")
  if model.backbone.config.img_size != config.data.crop_size:
    raise ValueError(f"config.init={config.init!r} was built for {model.backbone.config.img_size} px crops, "
                     f"config.data.crop_size is {config.data.crop_size}")
  graphdef, params, rest = sharding.place(model, mesh)
  with jax.set_mesh(mesh):
    out, confusion = evaluate(config, mesh, jit_eval(config, graphdef, params, rest, mesh, num_classes), params,
                              rest, held_out)
  writer = metrics.create_writer(str(workdir))
  writer.write_scalars(0, out)
  writer.flush()
  logging.info("%s", console.done(f"evaluation of {config.init} on {config.eval_split}", workdir,
                                   time.time() - t0, out))
  return {"metrics": out, "confusion": confusion}
