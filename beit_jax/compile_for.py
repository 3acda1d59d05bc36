"""Compile a config's real train step for a TPU topology (or N CPU devices) ahead of time: does it fit, how fast?

  python -m beit_jax.compile_for --config=configs/beit_base_pretrain.py --topology=v5p:2x2x2 \
      --config.mesh.fsdp=8 --config.mesh.data=1
  python -m beit_jax.compile_for --config=configs/beit_base_finetune.py --topology=cpu:8   # no libtpu needed

TPU topologies need libtpu (`pip install "jax[tpu]==<your jax version>"`, ~700 MB; no TPU needed): names as
`v4:2x2x2`, `v5e:4x4`, `v5p:4x4x8`, `v6e:4x4`. Nothing is allocated: the mesh is built over the topology's
devices, the train state and the batch are ShapeDtypeStructs with their shardings (the trainers' own
`create_state(..., abstract=True)`), and the trainer's own jitted step is lowered and compiled. Printed: per-
device memory from XLA's plan (arguments, outputs, temporaries, total vs the chip's HBM), FLOPs per step (XLA's
count and the analytic model count, `models.flops`), and the step time and images/s expected at
`--utilisation` of the chip's bf16 peak. Exit status 1 when the step does not fit, with the knobs to turn.

Weights are not read: a tokenizer or perceptual checkpoint named in the config is replaced by the architecture
it has by default (DALL-E's encoder; the config's PeCo tokenizer; a BEiT-B perceptual network) when the file is
not here, and the run says so.
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:arg]", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "e.g. v5p:2x2x2, v5e:4x4, v4:2x2x2, v6e:4x4, or cpu:N; "
                                 "default: the config's `topology` (the pod configs set it)")
_UTILISATION = flags.DEFINE_float("utilisation", 0.5, "fraction of the chip's bf16 peak the expected step time "
                                  "assumes (MFU)")


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  bf16_tflops: float


# Per-chip HBM and bf16 peak, from Cloud TPU's published specifications, by JAX's device_kind.
CHIPS = {
    "TPU v4": Chip(32, 275), "TPU v5 lite": Chip(16, 197), "TPU v5": Chip(95, 459), "TPU v5p": Chip(95, 459),
    "TPU v6 lite": Chip(32, 918),
}


# The schedule's length only sets learning-rate values, not the program: any length past the warm-up compiles the same.
_STEPS = 10**7


def topology_devices(name: str):
  """The devices of a topology name; `cpu:N` = this host's first N CPU devices (XLA_FLAGS
  --xla_force_host_platform_device_count must provide them)."""
  import jax  # pylint: disable=import-outside-toplevel
  if name.startswith("cpu:"):
    n = int(name.split(":", 1)[1])
    if jax.device_count() < n:
      raise SystemExit(f"--topology={name}: this process has {jax.device_count()} CPU devices; set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={n}")
    return jax.devices()[:n]
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name).devices
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or an unknown name: say which)
    raise SystemExit(f"--topology={name}: no TPU topology ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                     "Needs libtpu (pip install 'jax[tpu]==<jax version>'); names like v5p:2x2x2, v5e:4x4") from e
  # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore"); a topology description lists
  # both cores, so keep one per chip, as a real slice's jax.devices() does.
  if any(getattr(d, "core_on_chip", 0) for d in devices):
    devices = [d for d in devices if getattr(d, "core_on_chip", 0) == 0]
  return devices


def _flops(compiled) -> float:
  """XLA's FLOP count of a compiled program (0 where the backend gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _abstract(tree, sharding):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _batch(mesh, shapes: dict):
  import jax  # pylint: disable=import-outside-toplevel
  from beit_jax.train import sharding  # pylint: disable=import-outside-toplevel
  bs = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(s, d, sharding=bs) for k, (s, d) in shapes.items()}


def _abstract_tokenizer(config, notes):
  """The pre-training tokenizer's architecture, abstractly (its weights are not needed to compile)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax import tokenizers  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import dalle, vqgan  # pylint: disable=import-outside-toplevel
  name = config.tokenizer.name
  path = config.tokenizer.get("checkpoint") or config.tokenizer.get("encoder") or ""
  if path and pathlib.Path(path).exists():
    return nnx.eval_shape(lambda: tokenizers.load(name, **{k: v for k, v in config.tokenizer.items() if k != "name"}))
  notes.append(f"tokenizer {name}: {path or 'no file'} not here, compiled with its default architecture")
  if name == "dalle":
    return nnx.eval_shape(lambda: dalle.DalleTokenizer(dalle.DalleConfig(), decoder=False, rngs=nnx.Rngs(0)))
  size = config.data.tokenizer_size  # the f16 VQGAN at the config's tokenizer view (attention at its 1/16 grid)
  return nnx.eval_shape(lambda: vqgan.create_tokenizer("peco_vqgan_f16", input_size=size,
                                                       attn_resolutions=(size // 16,)))


def _pretrain(config, mesh, notes):
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax.models import flops  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from beit_jax.train import pretrain, sharding  # pylint: disable=import-outside-toplevel
  tok = _abstract_tokenizer(config, notes)
  cfg = pretrain.model_config(config, tok.vocab_size)
  graphdef, state, tx, lr_fn = pretrain.create_state(config, cfg, mesh, _STEPS, abstract=True)
  tok_graphdef, tok_state = nnx.split(tok)
  d, b = config.data, config.batch_size
  batch = _batch(mesh, pretrain.batch_spec(config, cfg.grid))
  step = pretrain.jit_train_step(config, mesh, state, graphdef, tok_graphdef, tx, lr_fn, d.mask.num_masked)
  tok_state = _abstract(tok_state, sharding.replicated(mesh))
  # The model FLOPs of a pre-training step: the BEiT's, analytic, plus the tokenizer's forward pass as XLA counts
  # it compiled alone for the same devices (a conv net; backends differ in how they count convolutions, so the
  # same compiler's count is the one that can be subtracted from the step's).
  encode = jax.jit(lambda s, x: nnx.merge(tok_graphdef, s).encode(x))
  with jax.set_mesh(mesh):
    # The tokenizer's input as the step makes it (float, from a uint8 or a device-made view alike).
    view = _batch(mesh, {"v": ((b, d.tokenizer_size, d.tokenizer_size, 3), jnp.float32)})["v"]
    tok_flops = _flops(encode.lower(tok_state, view).compile())
  model_flops = flops.train_flops(cfg, b, num_predict=d.mask.num_masked) + tok_flops * len(mesh.devices.flat)
  return step, (state, batch, tok_state), model_flops


def _finetune(config, mesh, notes):
  from beit_jax.models import flops  # pylint: disable=import-outside-toplevel
  from beit_jax.train import finetune, weights  # pylint: disable=import-outside-toplevel
  num_classes = config.data.get("num_classes") or 1000
  notes.append(f"{num_classes} classes")
  cfg = weights.classifier_config(config, num_classes)
  graphdef, state, tx, lr_fn = finetune.create_state(config, cfg, mesh, _STEPS, abstract=True)
  b = config.batch_size
  batch = _batch(mesh, finetune.batch_spec(config))
  step = finetune.jit_train_step(config, mesh, state, graphdef, tx, lr_fn, cfg.num_classes)
  return step, (state, batch, None), flops.train_flops(cfg, b)


def _tokenizer(config, mesh, notes):
  from beit_jax.tokenizers import vqgan  # pylint: disable=import-outside-toplevel
  from beit_jax.train import sharding, tokenizer  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()  # the substitution below must not change the caller's config
  source = config.loss.perceptual.source
  if config.loss.perceptual_weight and ":" in source and not pathlib.Path(source.split(":", 1)[1]).exists():
    notes.append(f"perceptual network {source} not here, compiled with beit_base_patch16_224")
    config.loss.perceptual.source = "name:beit_base_patch16_224"
  tcfg = vqgan.get_config(config.tokenizer.name, **dict(config.tokenizer.get("overrides", {})))
  perceptual = tokenizer.perceptual_loss(config)
  parts = tokenizer.create_state(config, tcfg, mesh, _STEPS, abstract=True)
  batch = _batch(mesh, tokenizer.batch_spec(config, tcfg))
  step = tokenizer.jit_train_step(config, mesh, parts, perceptual, gan=config.loss.disc_start <= 0)
  perc = _abstract(perceptual.state, sharding.replicated(mesh)) if perceptual is not None else None
  return step, (parts["state"], batch, perc), None


def _segmentation(config, mesh, notes):
  from beit_jax.train import segmentation  # pylint: disable=import-outside-toplevel
  segmentation.check_config(config)
  num_classes = config.data.get("num_classes") or 150
  notes.append(f"{num_classes} classes (ADE20K's unless data.num_classes says otherwise)")
  bcfg, seg_cfg = segmentation.model_configs(config, num_classes)
  graphdef, state, tx, lr_fn = segmentation.create_state(config, bcfg, seg_cfg, mesh, _STEPS, abstract=True)
  batch = _batch(mesh, segmentation.batch_spec(config))
  return segmentation.jit_train_step(config, mesh, state, graphdef, tx, lr_fn), (state, batch, None), None


def _linear_probe(config, mesh, notes):
  """The paper's probe step (probe.features="augmented": each step's crops through the frozen backbone)."""
  from beit_jax import models  # pylint: disable=import-outside-toplevel
  from beit_jax.models import flops  # pylint: disable=import-outside-toplevel
  from beit_jax.train import linear_probe, sharding  # pylint: disable=import-outside-toplevel
  if linear_probe.precomputed(config):
    raise SystemExit("config.probe.features='precomputed' solves on stored features (a full-batch L-BFGS, not a "
                     "training step): compile_for compiles the 'augmented' probe step")
  num_classes = config.data.get("num_classes") or 1000
  cfg = models.get_config(config.model.name, **dict(config.model.get("overrides", {})))
  notes.append(f"{num_classes} classes; the backbone is config.model ({config.model.name}), its weights not read")
  backbone_def, backbone_state = sharding.create_sharded(
      lambda: models.Beit(cfg, rngs=models.beit.make_rngs(config.seed)), mesh, filters=(...,), abstract=True)
  graphdef, state, tx, lr_fn = linear_probe.create_state(config, cfg, num_classes, mesh, _STEPS, abstract=True)
  batch = _batch(mesh, linear_probe.batch_spec(config))
  step = linear_probe.jit_train_step(config, mesh, state, graphdef, backbone_def, tx, lr_fn, cfg.depth)
  # The frozen backbone's forward pass (XLA computes no backbone gradients); the probes' matmuls are negligible.
  return step, (state, batch, backbone_state), config.batch_size * flops.forward_flops(cfg)


BUILDERS = {"pretrain": _pretrain, "finetune": _finetune, "tokenizer": _tokenizer, "segmentation": _segmentation,
            "linear_probe": _linear_probe}


def compile_for(config, topology: str, utilisation: float = 0.5) -> dict:
  """Compiles `config`'s train step over `topology`; returns the figures (see the module docstring)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from beit_jax.train import runs, sharding  # pylint: disable=import-outside-toplevel
  if config.mode not in BUILDERS:
    raise SystemExit(f"config.mode={config.mode!r}: compile_for knows {sorted(BUILDERS)}")
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  try:
    runs.check_batch(config, mesh)  # the trainers' own check of batch vs mesh and grad_accum
  except ValueError as e:
    raise SystemExit(str(e)) from None
  notes: list[str] = []
  step, args, model_flops = BUILDERS[config.mode](config, mesh, notes)
  with jax.set_mesh(mesh):
    try:
      compiled = step.lower(*args).compile()
    except Exception as e:  # pylint: disable=broad-except  (the TPU compiler refuses a program that cannot fit)
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return {"topology": topology, "device_kind": devices[0].device_kind, "devices": len(devices),
              "mesh": dict(mesh.shape), "mode": config.mode, "global_batch": config.batch_size, "fits": False,
              "compile_error": str(e).splitlines()[0][:400], "notes": notes}
  mem = compiled.memory_analysis()
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  per_device = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
  total = per_device["argument"] + per_device["output"] - per_device["alias"] + per_device["temp"]
  xla_flops = _flops(compiled)  # per device: the SPMD program of one device
  state = args[0]
  shard_bytes = lambda x: int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
  out = {"state_bytes_total": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)),
         "state_bytes_per_device": sum(shard_bytes(x) for x in jax.tree.leaves(state)),
         "topology": topology, "device_kind": kind, "devices": len(devices), "mesh": dict(mesh.shape),
         "mode": config.mode, "global_batch": config.batch_size, "per_device_bytes": per_device,
         "per_device_total_bytes": total, "xla_flops_per_device": xla_flops,
         "model_flops_per_step": model_flops, "notes": notes}
  if chip is not None:
    out["hbm_bytes"] = chip.hbm_gib * 2**30
    out["fits"] = total <= out["hbm_bytes"]
    flops_per_device = xla_flops or (model_flops or 0) / len(devices)
    step_s = flops_per_device / (chip.bf16_tflops * 1e12 * utilisation)
    out.update(expected_step_s=step_s, expected_images_per_s=config.batch_size / step_s if step_s else None,
               utilisation=utilisation, chip_bf16_tflops=chip.bf16_tflops)
  return out


_KNOBS = ("  to fit: shard parameters and optimizer state (--config.mesh.fsdp=N), rematerialise "
          "(--config.model.overrides.remat=dots or full), accumulate gradients (--config.grad_accum=K), "
          "or lower --config.batch_size")


def report(r: dict) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  if "compile_error" in r:
    return "\n".join([f"{r['mode']} on {r['topology']} ({r['devices']} x {r['device_kind']}), mesh {r['mesh']}, "
                      f"global batch {r['global_batch']}: DOES NOT FIT (the compiler refused it)",
                      f"  {r['compile_error']}", *[f"  note: {n}" for n in r["notes"]], _KNOBS])
  m = r["per_device_bytes"]
  lines = [f"{r['mode']} on {r['topology']} ({r['devices']} x {r['device_kind']}), mesh {r['mesh']}, global batch "
           f"{r['global_batch']}",
           f"  per device: arguments {gib(m['argument'])}, outputs {gib(m['output'])} (aliased {gib(m['alias'])}), "
           f"temporaries {gib(m['temp'])}; total {gib(r['per_device_total_bytes'])}"
           + (f" of {gib(r['hbm_bytes'])} HBM: {'FITS' if r['fits'] else 'DOES NOT FIT'}" if "fits" in r else ""),
           f"  train state (params, optimizer, step): {gib(r['state_bytes_per_device'])} per device of "
           f"{gib(r['state_bytes_total'])} ({r['state_bytes_total'] / r['state_bytes_per_device']:.1f}x sharded)"]
  flops_line = f"  FLOPs per step: XLA {r['xla_flops_per_device'] * r['devices'] / 1e12:.3g} TFLOP (all devices)"
  if r["model_flops_per_step"]:
    flops_line += (f", model (analytic) {r['model_flops_per_step'] / 1e12:.3g} TFLOP, XLA/model "
                   f"{r['xla_flops_per_device'] * r['devices'] / r['model_flops_per_step']:.3f}")
  lines.append(flops_line)
  if r.get("expected_step_s"):
    lines.append(f"  expected at {r['utilisation']:.0%} of {r['chip_bf16_tflops']:.0f} bf16 TFLOP/s per chip: "
                 f"{r['expected_step_s'] * 1e3:.0f} ms/step, {r['expected_images_per_s']:,.0f} images/s")
  lines += [f"  note: {n}" for n in r["notes"]]
  if r.get("fits") is False:
    lines.append(_KNOBS)
  return "\n".join(lines)


def main(argv):
  del argv
  topology = _TOPOLOGY.value or _CONFIG.value.get("topology")
  if not topology:
    raise SystemExit("--topology is required (the config names none)")
  r = compile_for(_CONFIG.value, topology, _UTILISATION.value)
  print(report(r))
  return 1 if r.get("fits") is False else 0


def cli():
  flags.mark_flags_as_required(["config"])
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  cli()
