"""Linear probing of a frozen BEiT: one linear classifier per block, all trained in the same steps.

The original protocol (paper appendix D, unilm run_linear_eval.py): features = concat([CLS], mean of patch
tokens) of a block's output, a linear head per block trained in parallel, AdamW with weight decay 1e-4 and a
cosine schedule; the best block is the result (block 9 of 12 for BEiT-B). The backbone never changes: it is an
argument of the step, not part of the trained state, and its features carry a stop_gradient, so XLA computes
no backbone gradients. `config.probe.layers` restricts the blocks ((): all), `config.probe.use_cls=False`
probes the mean of patch tokens alone, `config.probe.normalize=False` drops our per-example standardisation of
the features (see models/heads.py for why it is on). `config.probe.features="precomputed"` instead computes
every training image's features once and solves each probe's logistic regression to convergence (whitened
features, full-batch L-BFGS): for data sets whose features fit in memory, such as the miniature's.

  python -m beit_jax.main --config=configs/fmnist_linear_probe.py:/tmp/beit_demo/beit_pretrain/model \\
      --workdir=/tmp/probe
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
import numpy as np
import optax
from flax import nnx

from beit_jax import models
from beit_jax.data import device  # no TensorFlow: the uint8 images' normalisation on the device
from beit_jax.models.heads import LinearProbes, probe_features
from beit_jax.train import checkpoints, console, loop, metrics, optim, runs, sharding, weights


def load_backbone(config: ml_collections.ConfigDict) -> models.Beit:
  """The frozen network `config.init` names, in its own layout (a pre-training checkpoint keeps its shared
  relative position table, as unilm's probe does); "" = random init of config.model (the probe's floor)."""
  model = weights.network(config.init)
  if model is None:
    model = models.Beit(models.get_config(config.model.name, **dict(config.model.get("overrides", {}))),
                        rngs=models.beit.make_rngs(config.seed))
  if model.config.img_size != config.data.image_size:
    raise ValueError(f"config.data.image_size={config.data.image_size} but the backbone ({config.init or 'random'}) "
                     f"takes {model.config.img_size} px images")
  model.eval()
  return model


def probe_blocks(config, depth: int) -> tuple[int, ...]:
  blocks = tuple(config.probe.layers) or tuple(range(1, depth + 1))
  if any(not 0 <= b <= depth for b in blocks):
    raise ValueError(f"config.probe.layers={blocks}: each must be in [0, {depth}] (0: the patch embedding, l: "
                     f"the output of block l)")
  return blocks


def _features(backbone_def, backbone_state, images, blocks, use_cls, normalize):
  backbone = nnx.merge(backbone_def, backbone_state)
  _, hidden = backbone.encode(images, return_hidden_states=True)
  return jax.lax.stop_gradient(probe_features(hidden, blocks, use_cls, normalize))


def train_step(state, batch, backbone_state, *, graphdef, backbone_def, tx, lr_fn, blocks, use_cls, normalize,
               micro_steps=1, views=None):
  """One step of every probe on this step's (augmented) images: the features are computed here. `views(batch)`
  (None: float images as they are): data.uint8's images normalised on the device."""
  batch = views(batch) if views is not None else batch
  def loss_fn(probes, b):
    logits = probes(_features(backbone_def, backbone_state, b["image"], blocks, use_cls, normalize))  # [P, B, C]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, b["label"][None])
    correct = (jnp.argmax(logits, -1) == b["label"][None]).sum(axis=1).astype(jnp.float32)
    return ce.sum(), {"count": jnp.float32(b["label"].shape[0]), "correct": correct}

  (ce_sum, sums), grads, rest = optim.summed_value_and_grad(
      loss_fn, graphdef, state["params"], state["rest"], {"image": batch["image"], "label": batch["label"]},
      micro_steps)
  n = sums["count"]
  grads = jax.tree.map(lambda g: g / n, grads)  # each probe's gradient is that of its own mean loss
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  loss = ce_sum / (n * len(blocks))
  step = state["step"]
  new_state = metrics.finite_update(jnp.isfinite(loss), state, {"step": step + 1, "params": params,
                                                                "opt_state": opt_state, "rest": rest})
  out = {"loss": loss, "best_train_acc": jnp.max(sums["correct"]) / n, "lr": lr_fn(step)}
  return new_state, out


def lbfgs_step(state, batch, *, graphdef, tx, l2: float):
  """One L-BFGS iteration (optax.lbfgs, zoom line search) of every probe at once on the precomputed, whitened
  features ("features" [N, P, F], "label", "valid"): the full-batch multinomial logistic regression, mean
  cross-entropy plus (l2 / 2) ||W||^2 per probe (scikit-learn's LogisticRegression with C = 1 / (l2 N) on the same
  features). The probes are independent problems; their sum is minimised jointly."""
  def objective(params):
    probes = nnx.merge(graphdef, params, state["rest"])
    logits = probes(batch["features"], batch_major=True)  # [P, N, C]
    w = batch["valid"].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"][None]) * w[None]
    return ce.sum() / w.sum() + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"][...]))

  value, grad = optax.value_and_grad_from_state(objective)(state["params"], state=state["opt_state"])
  updates, opt_state = tx.update(grad, state["opt_state"], state["params"], value=value, grad=grad,
                                 value_fn=objective)
  params = optax.apply_updates(state["params"], updates)
  new_state = metrics.finite_update(jnp.isfinite(value), state, {"step": state["step"] + 1, "params": params,
                                                                 "opt_state": opt_state, "rest": state["rest"]})
  return new_state, {"loss": value / params["kernel"][...].shape[0], "grad_norm": optim.global_norm(grad)}


# Eigenvalues below this fraction of a probe's largest are raised to it: directions of (numerically) no variance
# are not blown up into noise.
WHITEN_FLOOR = 1e-6


def whitening(stored: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per probe, the PCA whitening of the stored features over their valid rows: {"mean" [P, F], "transform"
  [P, F, F]} with (x - mean) @ transform of identity covariance. Why: the features of a transformer, a randomly
  initialised one above all, are strongly correlated (covariance condition numbers of 1e6 and more on
  Fashion-MNIST), and first-order or quasi-Newton steps on raw features crawl (a random-init probe: 55% after 200
  L-BFGS iterations, still climbing); whitened, the same problem converges in ~100 (80.4%, as after 400)."""
  f, v = stored["features"], stored["valid"].astype(jnp.float32)[:, None, None]
  mean = (f * v).sum(0) / v.sum()
  centred = (f - mean) * v
  cov = jnp.einsum("npf,npg->pfg", centred, centred) / v.sum()
  lam, vecs = jnp.linalg.eigh(cov)  # ascending
  lam = jnp.maximum(lam, WHITEN_FLOOR * lam[:, -1:])
  return {"mean": mean, "transform": vecs / jnp.sqrt(lam)[:, None, :]}


def whiten(features: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
  return jnp.einsum("npf,pfg->npg", features - w["mean"], w["transform"])


def unwhiten(params, w: dict[str, jax.Array]):
  """The probes of whitened features as probes of the raw ones (the same logits): W' = T W, b' = b - mean W'."""
  kernel = jnp.einsum("pfg,pgc->pfc", w["transform"], params["kernel"][...])
  bias = params["bias"][...] - jnp.einsum("pf,pfc->pc", w["mean"], kernel)
  out = jax.tree.map(lambda x: x, params)
  out["kernel"], out["bias"] = out["kernel"].replace(kernel), out["bias"].replace(bias)
  return out


def eval_step(params, rest, batch, backbone_state, *, graphdef, backbone_def, blocks, use_cls, normalize):
  probes = nnx.merge(graphdef, params, rest)
  logits = probes(_features(backbone_def, backbone_state, batch["image"], blocks, use_cls, normalize))
  valid = batch["valid"].astype(jnp.float32)
  hits = (jnp.argmax(logits, -1) == batch["label"][None]).astype(jnp.float32) * valid[None]
  return {"top1": hits.sum(axis=1), "count": valid.sum()}


def precomputed_features(config, mesh, host_batch: int, backbone_def, backbone_state, *, blocks, use_cls,
                         normalize) -> dict[str, jax.Array]:
  """`config.probe.features="precomputed"`: the training split's features, once per example, of the whole
  image (the evaluation view, no augmentation), as one global batch {"features" [N, P, F], "label", "valid"}
  sharded over the data axes (each host computes its shard; padding rows are invalid). The probes then train
  full-batch on them (whitened, by L-BFGS): a multinomial logistic regression per block, run to convergence in
  a hundred or so cheap iterations instead of epochs of backbone forwards. It holds N x P x F floats: for data
  sets that fit (Fashion-MNIST: 60,000 x 4 x 256), not ImageNet."""
  from beit_jax.data import pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)
  it = pipelines.classification_eval(config.data, config.data.split, host_batch=host_batch,
                                     shard=pipelines.Shard.of_this_process())
  feats_fn = jax.jit(lambda state, images: jnp.swapaxes(
      _features(backbone_def, state, images, blocks, use_cls, normalize), 0, 1))
  local = {"features": [], "label": [], "valid": []}
  with jax.set_mesh(mesh):
    for batch in device.global_batches(it, mesh, sharding.BATCH_AXES):
      # Each host keeps the rows of its own devices: its shard, in the order it read it.
      local["features"].append(np.concatenate(
          [np.asarray(s.data) for s in feats_fn(backbone_state, batch["image"]).addressable_shards]))
      for k in ("label", "valid"):
        local[k].append(np.concatenate([np.asarray(s.data) for s in batch[k].addressable_shards]))
  host = {k: np.concatenate(v) for k, v in local.items()}
  return device.to_global(host, sharding.batch_sharding(mesh))


def precomputed(config: ml_collections.ConfigDict) -> bool:
  """config.probe.features: "precomputed" (full-batch L-BFGS on stored features) or "augmented" (the paper's)."""
  features = config.probe.get("features", "augmented")
  if features not in ("augmented", "precomputed"):
    raise ValueError(f"config.probe.features={features!r}: use 'augmented' or 'precomputed'")
  return features == "precomputed"


def feature_args(config: ml_collections.ConfigDict, depth: int) -> dict[str, Any]:
  """What `_features` takes besides the backbone and the images: the probed blocks of a backbone of `depth`
  blocks, whether [CLS] is concatenated, whether the features are standardised."""
  return dict(blocks=probe_blocks(config, depth), use_cls=bool(config.probe.use_cls),
              normalize=bool(config.probe.get("normalize", True)))


def create_state(config: ml_collections.ConfigDict, backbone_cfg: models.BeitConfig, num_classes: int, mesh,
                 steps: int, *, abstract: bool = False):
  """(graphdef, train state, optimizer, lr schedule) of the probes, one per probed block, on the features of a
  backbone of `backbone_cfg`: AdamW on the config's schedule, or optax.lbfgs (lr schedule None) for precomputed
  features. `abstract=True`: ShapeDtypeStructs with the shardings, nothing allocated (for compile_for)."""
  f = feature_args(config, backbone_cfg.depth)
  width = backbone_cfg.width * (2 if f["use_cls"] else 1)
  graphdef, params, rest = sharding.create_sharded(
      lambda: LinearProbes(len(f["blocks"]), width, num_classes, rngs=nnx.Rngs(config.seed)), mesh,
      abstract=abstract)
  if precomputed(config):  # a convex problem: a quasi-Newton solver converges where Adam crawls
    tx, lr_fn = optax.lbfgs(), None
  else:
    tx, lr_fn = optim.make(config.optim, params, steps)
  return graphdef, sharding.train_state(params, rest, tx, mesh, abstract=abstract), tx, lr_fn


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The global batch train_step takes, key -> (shape, dtype): what pipelines.linear_probe_train yields."""
  d, b = config.data, config.batch_size
  return {"image": ((b, d.image_size, d.image_size, 3), jnp.uint8 if d.get("uint8", False) else jnp.float32),
          "label": ((b,), jnp.int32)}


def jit_train_step(config, mesh, state, graphdef, backbone_def, tx, lr_fn, depth: int):
  """The step `(state, batch, frozen=backbone state)` jitted with the state's shardings in and out (the state
  donated), the batch split over the data axes and the backbone as placed. `state` may be abstract."""
  state_sh = sharding.shardings_of(state)
  views = functools.partial(device.classification_inputs, key=None, mean_std=config.data.mean_std)
  return jax.jit(functools.partial(train_step, graphdef=graphdef, backbone_def=backbone_def, tx=tx, lr_fn=lr_fn,
                                   micro_steps=config.get("grad_accum", 1), views=views,
                                   **feature_args(config, depth)),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh), None),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from beit_jax.data import pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)

  workdir = pathlib.Path(workdir)
  weights.parse(config.init)
  mesh = runs.make_mesh(config)
  host_batch = runs.check_batch(config, mesh)
  source = pipelines.source_of(config.data, config.data.split)
  shard = pipelines.Shard.of_this_process()
  solve = precomputed(config)
  # Precomputed: a step is one L-BFGS iteration on the full batch.
  steps = runs.total_steps(config, 1 if solve else pipelines.steps_per_epoch(source, host_batch, shard.count))

  backbone = load_backbone(config)
  features = feature_args(config, backbone.config.depth)
  blocks = features["blocks"]
  backbone_def, backbone_state = sharding.place(backbone, mesh, filters=(...,))
  graphdef, state, tx, lr_fn = create_state(config, backbone.config, source.num_classes, mesh, steps)
  rep = sharding.replicated(mesh)
  ckpts, state, start = checkpoints.resume(workdir, config, state, steps)

  state_sh, backbone_sh = sharding.shardings_of(state), sharding.shardings_of(backbone_state)
  batch_sh = sharding.batch_sharding(mesh)
  if solve:  # every step is an L-BFGS iteration on the same full batch of stored features
    stored = precomputed_features(config, mesh, host_batch, backbone_def, backbone_state, **features)
    white = jax.jit(whitening, out_shardings=rep)(stored)
    stored = dict(stored, features=jax.jit(whiten, out_shardings=batch_sh)(stored["features"], white))
    lbfgs = jax.jit(functools.partial(lbfgs_step, graphdef=graphdef, tx=tx, l2=float(config.probe.l2)),
                    in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=(0,))
    run_step = lambda step, s: lbfgs(s, stored)
  else:  # "augmented", the paper's protocol: each step's crops go through the frozen backbone
    step_fn = jit_train_step(config, mesh, state, graphdef, backbone_def, tx, lr_fn, backbone.config.depth)
    host_batches = pipelines.linear_probe_train(config.data, source, host_batch=host_batch, seed=config.seed,
                                                start_step=start, shard=shard)
    batches = device.global_batches(host_batches, mesh, sharding.BATCH_AXES)
    run_step = lambda step, s: step_fn(s, next(batches), backbone_state)

  writer = metrics.create_writer(str(workdir))
  t0 = time.time()
  with jax.set_mesh(mesh):
    state, last = loop.run(
        config, state, run_step, start=start, steps=steps,
        ckpts=ckpts, writer=writer, hooks=metrics.step_hooks(config, steps, writer, str(workdir)),
        meta=lambda s: {"step": s, "blocks": list(blocks)})
  if solve:  # the solution on whitened features, as probes of the backbone's own
    state = dict(state, params=jax.jit(unwhiten, out_shardings=state_sh["params"])(state["params"], white))
  if config.get("eval_split") and int(jax.device_get(state["step"])) == steps:
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, backbone_def=backbone_def, **features),
                      in_shardings=(state_sh["params"], state_sh["rest"], batch_sh, backbone_sh), out_shardings=rep)
    with jax.set_mesh(mesh):
      sums = metrics.sum_over(lambda batch: eval_fn(state["params"], state["rest"], batch, backbone_state),
                              runs.classification_eval_batches(config, mesh, host_batch))
    per_block = sums["top1"] / sums["count"]
    best = int(np.argmax(per_block))
    last.update({f"eval_top1_block{b}": float(a) for b, a in zip(blocks, per_block)})
    last.update(eval_top1=float(per_block[best]), eval_best_block=blocks[best], eval_count=float(sums["count"]))
    writer.write_scalars(steps, {k: v for k, v in last.items() if k.startswith("eval_")})
  logging.info("%s", console.done("linear probe", workdir, time.time() - t0, last))
  return {"state": state, "metrics": last, "blocks": blocks}
