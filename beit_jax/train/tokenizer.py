"""PeCo tokenizer training: a VQGAN-style autoencoder with a perceptual loss on a frozen ViT's deep features.

Generator (the tokenizer) loss = pixel + w_p * perceptual + codebook/commitment + lambda * d_factor * (-D(x_hat)),
with taming's adaptive lambda = ||grad_last(nll)|| / (||grad_last(G)|| + 1e-4) * disc_weight, from the step
`loss.disc_start` on; the PatchGAN discriminator has its own optimizer and hinge loss. Before disc_start the
step has no GAN terms at all (a separate, cheaper compiled step).

  python -m beit_jax.main --config=configs/fmnist_tokenizer.py --workdir=/tmp/tok

Writes `workdir/tokenizer` (load with `tokenizers.load("peco", checkpoint=...)`), training checkpoints,
metrics (PSNR, codebook usage and perplexity on the held-out split) and image summaries.
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

from beit_jax.tokenizers import discriminator, losses, saving, vqgan
from beit_jax.train import checkpoints, console, loop, metrics, optim, runs, sharding


def psnr(x, y):
  """PSNR in dB of images in [0, 1] (y clipped to the range), per batch."""
  mse = jnp.mean(jnp.square(x - jnp.clip(y, 0.0, 1.0)))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def perceptual_loss(config):
  """The PerceptualLoss that config.loss.perceptual names (None when its weight is 0); paths checked first."""
  p = config.loss.perceptual
  if not config.loss.perceptual_weight:
    return None
  kind, what = p.source.split(":", 1) if ":" in p.source else ("name", p.source)
  make = {"name": losses.PerceptualLoss.from_name, "pytorch": losses.PerceptualLoss.from_pytorch,
          "checkpoint": losses.PerceptualLoss.from_checkpoint}
  if kind not in make:
    raise ValueError(f"config.loss.perceptual.source={p.source!r}: use 'name:MODEL', 'pytorch:PATH' or "
                     f"'checkpoint:DIR'")
  if kind != "name" and not pathlib.Path(what).exists():
    raise FileNotFoundError(f"config.loss.perceptual.source: {what} does not exist")
  return make[kind](what, tuple(p.layers), model_overrides=dict(p.get("model_overrides", {})),
                    normalize=bool(p.get("normalize", False)))


# ---------------------------------------------------------------------------------------------------------------
# The step (gan=False before loss.disc_start, gan=True after)
# ---------------------------------------------------------------------------------------------------------------
def train_step(state, batch, perc_state, *, tok_def, disc_def, perceptual, tx_g, tx_d, lr_fn, loss_cfg, gan):
  """Every mode's step is `train_step(state, batch, frozen)`: here the frozen part is the perceptual network's
  state (None without a perceptual loss)."""
  images = batch["image"]
  tok = nnx.merge(tok_def, state["tok_params"], state["tok_rest"])
  disc = nnx.merge(disc_def, state["disc_params"], state["disc_rest"])
  to_disc = lambda x: 2.0 * x - 1.0  # taming's discriminator sees [-1, 1]

  def nll_fn(tok):
    recon, aux = tok(images)  # train mode: the quantizer's EMA statistics move (once per step, here)
    pix = losses.pixel_loss(images, recon, loss_cfg.pixel)
    perc = perceptual(images, recon, perc_state) if perceptual is not None else jnp.float32(0.0)
    nll = loss_cfg.pixel_weight * pix + loss_cfg.perceptual_weight * perc
    return nll + loss_cfg.codebook_weight * aux["loss"], (nll, pix, perc, recon, aux)

  (_, (nll, pix, perc, recon, aux)), grads = nnx.value_and_grad(nll_fn, has_aux=True)(tok)
  out = {"nll": nll, "pixel": pix, "perceptual": perc, "codebook": aux["loss"], "perplexity": aux["perplexity"],
         "usage": aux["usage"], "psnr": psnr(images, recon), "lr": lr_fn(state["step"])}
  if gan:
    def g_fn(tok, disc):  # disc is an argument (not closed over) so nnx carries its BatchNorm statistics out
      recon, _ = tok(images, update=False)
      return losses.generator_adv_loss(disc(to_disc(recon)))
    g_loss, g_grads = nnx.value_and_grad(g_fn, argnums=0)(tok, disc)
    last = lambda g: g["decoder"]["conv_out"]["kernel"][...]
    d_weight = losses.adaptive_weight(last(grads), last(g_grads), loss_cfg.disc_weight)
    grads = jax.tree.map(lambda a, b: a + d_weight * b, grads, g_grads)

    fake = jax.lax.stop_gradient(recon)
    def d_fn(disc):
      return losses.hinge_d_loss(disc(to_disc(images)), disc(to_disc(fake)))
    d_loss, d_grads = nnx.value_and_grad(d_fn)(disc)
    d_updates, d_opt = tx_d.update(d_grads, state["disc_opt"], state["disc_params"])
    disc_params = optax.apply_updates(state["disc_params"], d_updates)
    out.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight)
  else:
    disc_params, d_opt = state["disc_params"], state["disc_opt"]
  # The parameters as the forward pass left them: in "l2" mode dead-code restarts rewrite codebook rows there.
  _, current, _ = nnx.split(tok, nnx.Param, ...)
  g_updates, g_opt = tx_g.update(grads, state["tok_opt"], current)
  tok_params = optax.apply_updates(current, g_updates)
  loss = out["nll"] + loss_cfg.codebook_weight * out["codebook"]
  ok = jnp.isfinite(loss) & jnp.isfinite(optim.global_norm(grads))
  _, _, tok_rest = nnx.split(tok, nnx.Param, ...)
  _, _, disc_rest = nnx.split(disc, nnx.Param, ...)
  new = {"step": state["step"] + 1, "tok_params": tok_params, "tok_rest": tok_rest, "tok_opt": g_opt,
         "disc_params": disc_params, "disc_rest": disc_rest, "disc_opt": d_opt}
  return metrics.finite_update(ok, state, new), out


def eval_step(state, images, valid, *, tok_def):
  """Per-batch sums for the held-out metrics: squared error, code counts (usage and perplexity), and the code
  counts of background patches (metrics.background_patches): how many synonyms the codebook spends on them."""
  tok = nnx.merge(tok_def, state["tok_params"], state["tok_rest"])
  ids = tok.encode(images)
  recon = tok.decode(ids)
  w = valid.astype(jnp.float32)
  se = (jnp.square(images - recon).mean(axis=(1, 2, 3)) * w).sum()
  onehot = jax.nn.one_hot(ids.reshape(ids.shape[0], -1), tok.vocab_size) * w[:, None, None]  # [B, N, K]
  background = metrics.background_patches(images, ids.shape[1:]).astype(jnp.float32)
  return {"se": se, "n": w.sum(), "counts": onehot.sum((0, 1)),
          "background_counts": (onehot * background[..., None]).sum((0, 1))}


def evaluate(eval_fn, state, batches) -> tuple[dict[str, float], Any]:
  """Held-out PSNR, codebook usage and perplexity, the codes of background patches (how many distinct, the
  share of the most frequent, the share of background among all patches), and the first batch's images (for
  the image summary)."""
  sums, first = None, None
  for batch in batches:
    first = batch["image"] if first is None else first
    out = jax.device_get(eval_fn(state, batch["image"], batch["valid"]))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  counts, bg = sums["counts"], sums["background_counts"]
  p = counts / max(counts.sum(), 1.0)
  entropy = -float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)))
  return {"eval_psnr": float(-10 * np.log10(max(sums["se"] / max(sums["n"], 1.0), 1e-10))),
          "eval_usage": float(np.mean(counts > 0)), "eval_perplexity": float(np.exp(entropy)),
          "eval_background_codes": float(np.sum(bg > 0)),
          "eval_background_top_share": float(bg.max() / max(bg.sum(), 1.0)),
          "eval_background_patches": float(bg.sum() / max(counts.sum(), 1.0))}, first


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def create_state(config: ml_collections.ConfigDict, tcfg: vqgan.PecoConfig, mesh, steps: int, *,
                 abstract: bool = False) -> dict[str, Any]:
  """The tokenizer and discriminator (graphdefs "tok_def", "disc_def"), their train state ("state", created in
  its shardings, or ShapeDtypeStructs with `abstract=True`), optimizers ("tx_g", "tx_d") and "lr_fn"."""
  key = jax.random.key(config.seed)
  tok_def, tok_params, tok_rest = sharding.create_sharded(
      lambda: vqgan.PecoTokenizer(tcfg, rngs=nnx.Rngs(params=key, codebook=jax.random.fold_in(key, 1))), mesh,
      abstract=abstract)
  disc_cfg = config.loss.disc
  disc_def, disc_params, disc_rest = sharding.create_sharded(
      lambda: discriminator.NLayerDiscriminator(tcfg.channels, disc_cfg.ndf, disc_cfg.n_layers,
                                                rngs=nnx.Rngs(jax.random.fold_in(key, 2))), mesh, abstract=abstract)
  tx_g, lr_fn = optim.make(config.optim, tok_params, steps)
  tx_d, _ = optim.make(config.optim, disc_params, steps)
  opt = lambda tx, params: sharding.create_opt_state(tx, params, mesh, abstract=abstract)
  state = {"step": sharding.scalar(0, mesh, abstract=abstract), "tok_params": tok_params, "tok_rest": tok_rest,
           "tok_opt": opt(tx_g, tok_params), "disc_params": disc_params, "disc_rest": disc_rest,
           "disc_opt": opt(tx_d, disc_params), "nonfinite_step": sharding.scalar(-1, mesh, abstract=abstract)}
  return {"tok_def": tok_def, "disc_def": disc_def, "state": state, "tx_g": tx_g, "tx_d": tx_d, "lr_fn": lr_fn}


def batch_spec(config: ml_collections.ConfigDict, tcfg: vqgan.PecoConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
  """The global batch train_step takes, key -> (shape, dtype): what pipelines.tokenizer_train yields."""
  s = tcfg.input_size
  return {"image": ((config.batch_size, s, s, tcfg.channels), jnp.float32)}


def jit_train_step(config, mesh, parts: dict[str, Any], perceptual, *, gan: bool):
  """The step (before loss.disc_start: gan=False; from it on: gan=True) jitted with the state's shardings in
  and out (the state donated), the batch split over the data axes and the perceptual network replicated."""
  state_sh, rep = sharding.shardings_of(parts["state"]), sharding.replicated(mesh)
  return jax.jit(
      functools.partial(train_step, tok_def=parts["tok_def"], disc_def=parts["disc_def"], perceptual=perceptual,
                        tx_g=parts["tx_g"], tx_d=parts["tx_d"], lr_fn=parts["lr_fn"], loss_cfg=config.loss, gan=gan),
      in_shardings=(state_sh, sharding.batch_sharding(mesh), rep), out_shardings=(state_sh, rep),
      donate_argnums=(0,))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from beit_jax.data import device, pipelines  # pylint: disable=import-outside-toplevel  (TensorFlow)

  workdir = pathlib.Path(workdir)
  mesh = runs.make_mesh(config)
  host_batch = runs.check_batch(config, mesh)
  tcfg = vqgan.get_config(config.tokenizer.name, **dict(config.tokenizer.get("overrides", {})))
  d = config.data
  if d.channels != tcfg.channels:
    raise ValueError(f"config.data.channels={d.channels} but the tokenizer takes {tcfg.channels} channels "
                     f"(config.tokenizer.overrides.channels)")
  perceptual = perceptual_loss(config)
  source = pipelines.source_of(d, d.split)
  eval_source = pipelines.source_of(d, d.eval_split)  # once: every evaluation reads it, a wrong split fails here
  shard = pipelines.Shard.of_this_process()
  spe = pipelines.steps_per_epoch(source, host_batch, shard.count)
  steps = runs.total_steps(config, spe)
  seed = config.seed

  parts = create_state(config, tcfg, mesh, steps)
  tok_def, state = parts["tok_def"], parts["state"]
  ckpts, state, start = checkpoints.resume(workdir, config, state, steps)

  rep = sharding.replicated(mesh)
  perc_state = jax.device_put(perceptual.state, rep) if perceptual is not None else None
  state_sh = sharding.shardings_of(state)
  batch_sh = sharding.batch_sharding(mesh)
  steps_fn = {gan: jit_train_step(config, mesh, parts, perceptual, gan=gan) for gan in (False, True)}
  eval_fn = jax.jit(functools.partial(eval_step, tok_def=tok_def), in_shardings=(state_sh, batch_sh, batch_sh),
                    out_shardings=rep)

  @functools.partial(jax.jit, in_shardings=(state_sh, batch_sh), out_shardings=rep)
  def recon_fn(state, images):
    tok = nnx.merge(tok_def, state["tok_params"], state["tok_rest"])
    return jnp.concatenate([images, tok.decode(tok.encode(images))], axis=2)

  host_batches = pipelines.tokenizer_train(d, source, image_size=tcfg.input_size, host_batch=host_batch, seed=seed,
                                           start_step=start, shard=shard)
  batches = device.global_batches(host_batches, mesh, sharding.BATCH_AXES)

  def eval_batches():
    it = pipelines.tokenizer_eval(d, eval_source, image_size=tcfg.input_size, host_batch=host_batch, shard=shard)
    return device.global_batches(it, mesh, sharding.BATCH_AXES)

  writer = metrics.create_writer(str(workdir))
  def periodic_eval(step, state):
    if step % config.eval_every and step != steps:
      return None
    ev, images = evaluate(eval_fn, state, eval_batches())
    writer.write_scalars(step, ev)
    pair = recon_fn(state, images)  # original | reconstruction
    writer.write_images(step, {"reconstructions": np.asarray(jax.device_get(pair))[:8]})
    return ev

  t0 = time.time()
  with jax.set_mesh(mesh):
    # The GAN phase is another compiled step (steps_fn[True]) from loss.disc_start on.
    state, last = loop.run(
        config, state,
        lambda step, s: steps_fn[step > config.loss.disc_start](s, next(batches), perc_state),
        start=start, steps=steps, ckpts=ckpts, writer=writer,
        hooks=metrics.step_hooks(config, steps, writer, str(workdir)),
        meta=lambda s: {"step": s, "tokenizer_config": tcfg.to_dict()}, after_step=periodic_eval)
  finished = int(jax.device_get(state["step"])) == steps
  if finished and "eval_psnr" not in last:  # a rerun of a finished run still reports
    with jax.set_mesh(mesh):
      last.update(evaluate(eval_fn, state, eval_batches())[0])
  tok = nnx.merge(tok_def, state["tok_params"], state["tok_rest"])
  out_dir = workdir / "tokenizer"
  if finished and not (out_dir / str(steps)).exists():  # every process calls orbax: multi-host saves are collective
    saving.save_peco(out_dir, tok, step=steps)
  logging.info("%s", console.done("tokenizer training", workdir, time.time() - t0, last, out_dir))
  return {"state": state, "tokenizer": tok, "metrics": last}
