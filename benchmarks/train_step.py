r"""Training-step throughput, MFU and peak memory: beit_jax's real train steps vs their PyTorch peers, one run.

  python benchmarks/train_step.py                                   # the three steps, both frameworks
  python benchmarks/train_step.py --steps=pretrain --batch=256      # on a GPU: bf16, torch.compile on
  python benchmarks/train_step.py --steps=finetune --frameworks=jax --remat=dots --batch=512
  taskset -c 1 python benchmarks/train_step.py --timed=3 --warmup=1  # one core: compare the 'cpu s' column
  sh benchmarks/gpu.sh                                              # the GPU figures of BENCHMARKS.md

The steps (synthetic batches of the real shapes, so that no TensorFlow or data set is needed):
  pretrain   BEiT pre-training. Ours: `beit_jax.train.pretrain.train_step` as the trainer jits it (DALL-E
             encoder forward on the 112 px view inside the step, blockwise masks, BEiT forward/backward on the
             masked positions' logits, clipped AdamW). Peer: OpenAI's `dall_e` Encoder under no_grad + timm's
             `beit_base_patch16_224` blocks in unilm's pre-training layout (shared relative position bias, mask
             token, LM head on the masked positions only, as unilm's modeling_pretrain.py), clip 3.0, AdamW.
  finetune   BEiT fine-tuning. Ours: `beit_jax.train.finetune.train_step` (mixup/cutmix, label smoothing,
             layer decay, drop path 0.1). Peer: timm's model, timm's Mixup and SoftTargetCrossEntropy, AdamW.
  segmentation  ADE20K UperNet at 512 px (150 classes). Ours: `beit_jax.train.segmentation.train_step` (BEiT
             backbone, multi-scale adapter, UPerHead + auxiliary FCN head with BatchNorm, pixel cross-entropy
             ignoring 255, AdamW with layer decay 0.65, drop path 0.1). Peer: HF transformers'
             `BeitForSemanticSegmentation` (unilm's released model ported; loss computed inside), AdamW.
  miniature  The Fashion-MNIST miniature's pre-training step (`make demo`): configs/fmnist_pretrain.py's model
             (beit_fmnist: 28 px, 4 px patches, width 128, 4 blocks, absolute position embedding) on the ids of
             its tokenizer (peco_fmnist_small: a small VQGAN encoder + 128-code cosine codebook) encoded inside the
             step, batch 64 as the config. Peer: taming-transformers' Encoder of the same shape (its mid-block
             attention removed, as ours has none) + quant_conv + the nearest normalised code, timm's Beit of the
             same shape in the same layout with unilm's mask token and LM head on the masked positions, AdamW.
  tokenizer  PeCo tokenizer training before the GAN phase. Ours: `beit_jax.train.tokenizer.train_step` (VQGAN
             f16 at 224 px, 8192 codes, L1 + perceptual loss on blocks 3/6/9/12 of a frozen BEiT-B + codebook
             loss, Adam). Peer: taming-transformers' Encoder/Decoder/VectorQuantizer (the VQGAN PeCo builds on)
             with the same losses on timm's BEiT-B features.
Weights are random on both sides (speed does not depend on their values); the architectures are the same.

Figures: images/s (batch / median step time over --timed steps after --warmup), TFLOP/s and MFU (the FLOPs
of *our* compiled step from XLA's cost analysis, the same model work for both frameworks, over the peak that a
large matmul reaches in this run, or --peak_tflops), peak memory (GPU: the allocators' peak; CPU: the
process's RSS, see below), compile time, and the ratio ours / peer.

Each framework runs in its own subprocess (this file with --worker), so neither's thread pools or allocations
pollute the other's figures; the parent imports neither jax nor torch (a child's ru_maxrss starts from its
parent's). On CPU, `cpu s` is the process's CPU time per step: on a shared machine, pinned to one core, it is
the work of a step and barely moves when other processes compete. benchmarks/NOTES_model_step.md explains the
CPU gap and the changes that closed most of it.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STEPS = ("pretrain", "finetune", "tokenizer", "segmentation", "miniature")
# Per-device batches: what fills an 80 GB H100 in bf16 without remat, and what a 2-core CPU runs in seconds
# (segmentation: 2, the fewest BatchNorm in training mode accepts for the 1x1 pyramid-pooling branch in torch).
DEFAULT_BATCH = {"gpu": {"pretrain": 256, "finetune": 256, "tokenizer": 32, "segmentation": 16, "miniature": 1024},
                 "cpu": {"pretrain": 8, "finetune": 8, "tokenizer": 2, "segmentation": 2, "miniature": 64}}
_SEG_CLASSES, _SEG_SIZE = 150, 512
_NUM_CLASSES = 1000


# -- flags ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
  p.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch")
  p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                 help="auto: gpu where nvidia-smi finds one")
  p.add_argument("--batch", type=int, default=0, help=f"per-step batch; 0: {DEFAULT_BATCH}")
  p.add_argument("--timed", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
  p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="compute dtype of both (ours: the model's dtype, params f32; torch: autocast); "
                 "auto: bfloat16 on GPU, float32 on CPU (XLA:CPU upcasts bf16 dots to f32)")
  p.add_argument("--model", default="beit_base_patch16_224", help="the BEiT (registry name = timm name)")
  p.add_argument("--tokenizer", default="peco_vqgan_f16", help="the PeCo tokenizer of the tokenizer step")
  p.add_argument("--remat", default="none", help="ours: BeitConfig.remat (none, dots, full)")
  p.add_argument("--attention", default="xla", choices=("xla", "cudnn"), help="ours: BeitConfig.attention_impl")
  p.add_argument("--torch_compile", default="auto", choices=("auto", "on", "off"),
                 help="torch.compile the peer's modules; auto: on for GPU, off on CPU (inductor's C++ build of "
                 "a BEiT-B backward takes minutes on 2 cores)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="the MFU denominator; 0: a matmul measured here")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS in the JAX subprocess")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: FRAMEWORK:STEP
  p.add_argument("--result_file", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.steps = _names(p, "--steps", args.steps, STEPS)
  args.frameworks = _names(p, "--frameworks", args.frameworks, ("jax", "torch"))
  if args.device == "auto":
    args.device = "gpu" if shutil.which("nvidia-smi") else "cpu"
  if args.dtype == "auto":
    args.dtype = "bfloat16" if args.device == "gpu" else "float32"
  if args.torch_compile == "auto":
    args.torch_compile = "on" if args.device == "gpu" else "off"
  return args


def _names(p, flag, value, known):
  names = [n.strip() for n in value.split(",") if n.strip()]
  bad = sorted(set(names) - set(known))
  if bad or not names:
    p.error(f"{flag}={value!r}: use a comma-separated subset of {','.join(known)}")
  return names


def batch_of(args, step: str) -> int:
  return args.batch or DEFAULT_BATCH[args.device][step]


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


# -- machine info (no jax/torch import: versions from package metadata) ---------------------------------------
def machine_info(args) -> dict:
  cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  field = lambda name: (re.findall(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.M) or [platform.processor()])[0]
  flags = set(field("flags").split())
  meminfo = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else ""
  mem_kb = re.search(r"MemTotal:\s+(\d+)", meminfo)
  gpu = None
  if args.device == "gpu":
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.strip()

  def version(pkg):
    try:
      return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(), "gpu": gpu,
      "cpu": f"{field('model name')} (family {field('cpu family')}, model {field('model')})",
      "cpu_isa": " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags),
      "cores": num_cores(),
      "mem_gib": round(int(mem_kb.group(1)) / 2**20, 1) if mem_kb else None,
      "load_avg_1m": round(os.getloadavg()[0], 2),  # > 0 means something else was running
      "python": platform.python_version(),
      **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "timm")},
  }


# -- timing and memory, the same protocol for both frameworks -------------------------------------------------
def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (Linux >= 4.0) so a later peak covers only what follows."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure(step, args, batch: int) -> dict:
  """A first call (the compile where there is one, timed alone), the rest of the warm-up, then the timed
  steps. `step()` must return only when the step's work is done (it blocks on the device)."""
  t0 = time.perf_counter()
  first_loss = float(step())
  first_step_s = time.perf_counter() - t0
  for _ in range(max(args.warmup - 1, 0)):
    step()
  before = peak_rss_mib()
  reset_ok = reset_peak_rss()
  times = []
  for _ in range(args.timed):
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    times.append((time.perf_counter() - w0, time.process_time() - c0))
  wall = [w for w, _ in times]
  median = statistics.median(wall)
  step_peak = peak_rss_mib() if reset_ok else None
  return {"first_step_s": first_step_s, "first_loss": first_loss, "step_s_median": median, "step_s_min": min(wall),
          "step_s_max": max(wall), "images_per_s": batch / median, "step_s_all": wall,
          "cpu_s_median": statistics.median(c for _, c in times),
          "peak_rss_mib": max(before, step_peak or 0.0), "step_peak_rss_mib": step_peak}


# -- ours -----------------------------------------------------------------------------------------------------
def matmul_peak_tflops(dtype: str, gpu: bool) -> float:
  """What one large matmul reaches here: the MFU denominator measured in the same run (on an H100 a bf16
  8192^3 product runs at ~790 TFLOP/s, the figure the targets use)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n = 8192 if gpu else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  reps = 20 if gpu else 3
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _pretrain_step(config, tok, batch: int, mesh):
  """The pre-training trainer's jitted step for `config` and tokenizer module `tok`, its state and a synthetic
  batch of the real shapes (blockwise masks as the pipeline makes them)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax.data import masking  # pylint: disable=import-outside-toplevel  (numpy only)
  from beit_jax.train import pretrain, sharding  # pylint: disable=import-outside-toplevel

  cfg = pretrain.model_config(config, tok.vocab_size)
  graphdef, state, tx, lr_fn = pretrain.create_state(config, cfg, mesh, 100_000)
  tok_graphdef, tok_state = nnx.split(tok)
  tok_state = jax.device_put(tok_state, sharding.replicated(mesh))
  d = config.data
  masks = masking.blockwise_masks(0, np.arange(batch), cfg.grid, d.mask.num_masked, d.mask.min_block,
                                  d.mask.min_aspect)
  rng = np.random.default_rng(0)
  host = {"image": rng.standard_normal((batch, d.image_size, d.image_size, 3), np.float32),
          "tokenizer_image": rng.uniform(size=(batch, d.tokenizer_size, d.tokenizer_size, 3)).astype(np.float32),
          "mask": masks}
  step_fn = pretrain.jit_train_step(config, mesh, state, graphdef, tok_graphdef, tx, lr_fn, d.mask.num_masked)
  return step_fn, state, (jax.device_put(host, sharding.batch_sharding(mesh)), tok_state)


def _jax_pretrain(args, batch, mesh):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import dalle  # pylint: disable=import-outside-toplevel

  config = configs.pretrain()
  config.batch_size = batch
  config.model.name = args.model
  config.model.overrides.update(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
  tok = dalle.DalleTokenizer(dalle.DalleConfig(dtype=args.dtype), decoder=False, rngs=nnx.Rngs(0))
  return _pretrain_step(config, tok, batch, mesh)


def _miniature_config(batch: int):
  """configs/fmnist_pretrain.py with `batch`, and its tokenizer's PecoConfig (RGB, as the pipeline feeds it)."""
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import vqgan  # pylint: disable=import-outside-toplevel
  config = configs.load("fmnist_pretrain")
  config.batch_size = batch
  return config, vqgan.get_config("peco_fmnist_small", channels=3)


def _jax_miniature(args, batch, mesh):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import vqgan  # pylint: disable=import-outside-toplevel

  config, tcfg = _miniature_config(batch)
  config.model.overrides = {**dict(config.model.overrides), "dtype": args.dtype}
  tok = vqgan.PecoTokenizer(tcfg.replace(dtype=args.dtype), rngs=nnx.Rngs(0))
  tok.eval()
  return _pretrain_step(config, tok, batch, mesh)


def _jax_finetune(args, batch, mesh):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  from beit_jax.train import finetune, sharding, weights  # pylint: disable=import-outside-toplevel

  config = configs.finetune()
  config.batch_size = batch
  config.model.name = args.model
  config.model.overrides.update(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
  cfg = weights.classifier_config(config, _NUM_CLASSES)
  graphdef, state, tx, lr_fn = finetune.create_state(config, cfg, mesh, 100_000)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  host = {"image": rng.standard_normal((batch, size, size, 3), np.float32),
          "label": rng.integers(0, _NUM_CLASSES, batch).astype(np.int32)}
  step_fn = finetune.jit_train_step(config, mesh, state, graphdef, tx, lr_fn, cfg.num_classes)
  return step_fn, state, (jax.device_put(host, sharding.batch_sharding(mesh)),)


def _jax_tokenizer(args, batch, mesh):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  from beit_jax.tokenizers import vqgan  # pylint: disable=import-outside-toplevel
  from beit_jax.train import sharding, tokenizer  # pylint: disable=import-outside-toplevel

  config = configs.tokenizer()
  config.batch_size = batch
  config.tokenizer.name = args.tokenizer
  config.tokenizer.overrides = {"dtype": args.dtype}
  config.loss.perceptual.source = f"name:{args.model}"
  config.loss.perceptual.model_overrides = {"dtype": args.dtype, "attention_impl": args.attention}
  tcfg = vqgan.get_config(config.tokenizer.name, **config.tokenizer.overrides)
  perceptual = tokenizer.perceptual_loss(config)
  parts = tokenizer.create_state(config, tcfg, mesh, 100_000)
  images = np.random.default_rng(0).uniform(size=(batch, tcfg.input_size, tcfg.input_size, tcfg.channels))
  step_fn = tokenizer.jit_train_step(config, mesh, parts, perceptual, gan=False)
  perc_state = jax.device_put(perceptual.state, sharding.replicated(mesh))
  return step_fn, parts["state"], (jax.device_put(images.astype(np.float32), sharding.batch_sharding(mesh)),
                                   perc_state)


def _seg_batch(batch: int):
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  labels = rng.integers(0, _SEG_CLASSES, (batch, _SEG_SIZE, _SEG_SIZE)).astype(np.uint8)
  labels[rng.random(labels.shape) < 0.1] = 255  # ADE20K's unlabelled pixels
  return rng.standard_normal((batch, _SEG_SIZE, _SEG_SIZE, 3), np.float32), labels


def _jax_segmentation(args, batch, mesh):
  import jax  # pylint: disable=import-outside-toplevel
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  from beit_jax.train import segmentation, sharding  # pylint: disable=import-outside-toplevel

  config = configs.segmentation()
  config.batch_size = batch
  config.model.name = args.model
  config.model.overrides.update(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
  bcfg, seg_cfg = segmentation.model_configs(config, _SEG_CLASSES)
  graphdef, state, tx, lr_fn = segmentation.create_state(config, bcfg, seg_cfg, mesh, 100_000)
  images, labels = _seg_batch(batch)
  step_fn = segmentation.jit_train_step(config, mesh, state, graphdef, tx, lr_fn)
  return step_fn, state, (jax.device_put({"image": images, "annotation": labels}, sharding.batch_sharding(mesh)),)


def run_jax(args, step_name: str) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from beit_jax.train import sharding  # pylint: disable=import-outside-toplevel

  gpu = jax.default_backend() == "gpu"
  if gpu != (args.device == "gpu"):
    raise SystemExit(f"--device={args.device} but JAX runs on {jax.default_backend()}")
  batch = batch_of(args, step_name)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
  build = {"pretrain": _jax_pretrain, "finetune": _jax_finetune, "tokenizer": _jax_tokenizer,
           "segmentation": _jax_segmentation, "miniature": _jax_miniature}[step_name]
  step_fn, state, inputs = build(args, batch, mesh)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, *inputs).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def step():
    holder["state"], out = compiled(holder["state"], *inputs)
    # Block on the whole new state, not just the loss: the update would otherwise overlap the next timing.
    jax.block_until_ready((holder["state"], out))
    return out["loss"] if "loss" in out else out["nll"]

  result = {"framework": "jax", "step": step_name, "batch": batch, "dtype": args.dtype, "compile_s": compile_s,
            **measure(step, args, batch)}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  result.update(
      step_flops=float(cost["flops"]) if cost and cost.get("flops") else None,
      xla_memory_mib={k: getattr(mem, f"{k}_size_in_bytes") / 2**20 for k in ("argument", "output", "alias", "temp")}
      if mem is not None else None,
      peak_tflops=args.peak_tflops or matmul_peak_tflops(args.dtype, gpu),
      remat=args.remat, attention=args.attention, xla_flags=os.environ.get("XLA_FLAGS", ""),
      devices=str(jax.devices()))
  if gpu:
    stats = jax.devices()[0].memory_stats() or {}
    result["device_peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20 or None
  return result


# -- the PyTorch peers ----------------------------------------------------------------------------------------
def _torch_mim(torch, beit, vocab: int):
  """unilm's VisionTransformerForMaskedImageModeling (beit/modeling_pretrain.py) over a timm `Beit`: the mask
  token replaces masked patch embeddings before [CLS] and the position embedding (where there is one) are added,
  the relative position bias shared by all blocks (where there is one), and the LM head runs on the masked
  positions only."""
  class Mim(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.beit = beit
      d = self.beit.embed_dim
      self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, d))
      torch.nn.init.trunc_normal_(self.mask_token, std=0.02)
      self.norm = torch.nn.LayerNorm(d, eps=1e-6)
      self.lm_head = torch.nn.Linear(d, vocab)

    def forward(self, x, mask):
      b = self.beit
      x = b.patch_embed(x)
      w = mask.unsqueeze(-1).type_as(x)
      x = x * (1 - w) + self.mask_token.expand(x.shape[0], x.shape[1], -1) * w
      x = torch.cat((b.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
      if b.pos_embed is not None:
        x = x + b.pos_embed
      x = b.pos_drop(x)
      rel_pos_bias = b.rel_pos_bias() if b.rel_pos_bias is not None else None
      for blk in b.blocks:
        x = blk(x, shared_rel_pos_bias=rel_pos_bias)
      return self.lm_head(self.norm(x)[:, 1:][mask])

  return Mim()


def _torch_features(torch, model, layers):
  """Outputs of blocks `layers` (1-based, [CLS] dropped) of a timm BEiT: the perceptual loss's features."""
  def features(x):
    x = model.patch_embed(x)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    rel = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    out = []
    for i, blk in enumerate(model.blocks[:max(layers)], start=1):
      x = blk(x, shared_rel_pos_bias=rel)
      if i in layers:
        out.append(x[:, 1:])
    return out
  return features


def run_torch(args, step_name: str) -> dict:
  import contextlib  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from beit_jax.convert.timm_compat import import_timm  # pylint: disable=import-outside-toplevel

  gpu = args.device == "gpu"
  if gpu and not torch.cuda.is_available():
    raise SystemExit("--device=gpu but torch sees no CUDA device")
  dev = torch.device("cuda" if gpu else "cpu")
  if not gpu:
    torch.set_num_threads(num_cores())
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True  # XLA's GPU default for f32 dots is TF32 too
  torch.backends.cudnn.allow_tf32 = True
  timm = import_timm()  # plain `import timm` fails next to the CPU torch wheel; see timm_compat
  batch = batch_of(args, step_name)
  rng = np.random.default_rng(0)
  compile_ = (lambda m: torch.compile(m)) if args.torch_compile == "on" else (lambda m: m)
  autocast = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.dtype == "bfloat16"
              else contextlib.nullcontext)
  adamw = lambda params, **kw: torch.optim.AdamW(params, fused=gpu, **kw)

  if step_name == "pretrain":
    from dall_e.encoder import Encoder  # pylint: disable=import-outside-toplevel
    from dall_e.utils import map_pixels  # pylint: disable=import-outside-toplevel
    from beit_jax.data import masking  # pylint: disable=import-outside-toplevel
    enc = Encoder(device=dev, requires_grad=False, use_mixed_precision=False).eval()
    encode = compile_(enc)
    model = _torch_mim(torch, timm.create_model(args.model, pretrained=False, num_classes=0, drop_path_rate=0.1,
                                                use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
                       enc.vocab_size).to(dev)
    net = compile_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1.5e-3, betas=(0.9, 0.999), weight_decay=0.05)
    images = torch.from_numpy(rng.standard_normal((batch, 3, 224, 224), np.float32)).to(dev)
    tok_images = torch.from_numpy(rng.uniform(size=(batch, 3, 112, 112)).astype(np.float32)).to(dev)
    mask = torch.from_numpy(masking.blockwise_masks(0, np.arange(batch), (14, 14), 75, 16, 0.3)).to(dev)
    mask = mask.reshape(batch, -1).bool()

    def loss_fn():
      with torch.no_grad(), autocast():
        ids = encode(map_pixels(tok_images)).argmax(1).flatten(1)
      with autocast():
        logits = net(images, mask)
      return F.cross_entropy(logits.float(), ids[mask]), params, 3.0
  elif step_name == "miniature":
    import math  # pylint: disable=import-outside-toplevel
    from taming.modules.diffusionmodules import model as taming_model  # pylint: disable=import-outside-toplevel
    # Ours takes gcd(32, channels) GroupNorm groups (vqgan.GroupNorm); taming's 32 do not divide 16 channels.
    taming_model.Normalize = lambda channels: torch.nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6,
                                                                 affine=True)
    Encoder = taming_model.Encoder  # pylint: disable=invalid-name
    from timm.models.beit import Beit  # pylint: disable=import-outside-toplevel
    from beit_jax import models  # pylint: disable=import-outside-toplevel
    from beit_jax.data import masking  # pylint: disable=import-outside-toplevel
    config, c = _miniature_config(batch)
    m = models.get_config(config.model.name, **dict(config.model.overrides))
    enc = Encoder(ch=c.ch, out_ch=c.channels, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                  attn_resolutions=list(c.attn_resolutions), dropout=0.0, in_channels=c.channels,
                  resolution=c.input_size, z_channels=c.z_channels, double_z=False)
    enc.mid.attn_1 = torch.nn.Identity()  # peco_fmnist_small has no mid-block attention
    tok = torch.nn.ModuleDict({"encoder": enc, "quant_conv": torch.nn.Conv2d(c.z_channels, c.embed_dim, 1)})
    tok = tok.to(dev).eval().requires_grad_(False)
    codebook = F.normalize(torch.randn(c.vocab_size, c.embed_dim, device=dev), dim=-1)
    encoder = compile_(tok["encoder"])
    beit = Beit(img_size=m.img_size, patch_size=m.patch_size, num_classes=0, embed_dim=m.width, depth=m.depth,
                num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, use_abs_pos_emb=m.use_abs_pos_emb,
                use_rel_pos_bias=m.use_rel_pos_bias, use_shared_rel_pos_bias=m.use_shared_rel_pos_bias,
                init_values=m.layer_scale_init or None, drop_path_rate=m.drop_path_rate)
    model = _torch_mim(torch, beit, c.vocab_size).to(dev)
    net = compile_(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=config.optim.lr, betas=(0.9, 0.999), weight_decay=0.05)
    d = config.data
    images = torch.from_numpy(rng.standard_normal((batch, 3, d.image_size, d.image_size), np.float32)).to(dev)
    tok_images = torch.from_numpy(rng.uniform(size=(batch, 3, d.tokenizer_size, d.tokenizer_size)).astype(
        np.float32)).to(dev)
    mask = torch.from_numpy(masking.blockwise_masks(0, np.arange(batch), m.grid, d.mask.num_masked,
                                                    d.mask.min_block, d.mask.min_aspect)).to(dev)
    mask = mask.reshape(batch, -1).bool()

    def loss_fn():
      with torch.no_grad(), autocast():
        z = F.normalize(tok["quant_conv"](encoder(2 * tok_images - 1)).float(), dim=1)  # [B, D, h, w]
        ids = torch.einsum("bdhw,kd->bhwk", z, codebook).argmax(-1).flatten(1)
      with autocast():
        logits = net(images, mask)
      return F.cross_entropy(logits.float(), ids[mask]), params, config.optim.clip_grad
  elif step_name == "finetune":
    from timm.data import Mixup  # pylint: disable=import-outside-toplevel
    from timm.loss import SoftTargetCrossEntropy  # pylint: disable=import-outside-toplevel
    model = timm.create_model(args.model, pretrained=False, num_classes=_NUM_CLASSES, drop_path_rate=0.1).to(dev)
    net = compile_(model)
    params = list(model.parameters())
    opt = adamw(params, lr=4e-3, betas=(0.9, 0.999), weight_decay=0.05)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=_NUM_CLASSES)
    criterion = SoftTargetCrossEntropy()
    images = torch.from_numpy(rng.standard_normal((batch, 3, 224, 224), np.float32)).to(dev)
    labels = torch.from_numpy(rng.integers(0, _NUM_CLASSES, batch)).to(dev)

    def loss_fn():
      x, y = mixup(images.clone(), labels)
      with autocast():
        logits = net(x)
      return criterion(logits.float(), y), params, None
  elif step_name == "segmentation":
    from beit_jax.convert.timm_compat import import_transformers  # pylint: disable=import-outside-toplevel
    transformers = import_transformers()
    width, depth, heads = {"beit_base_patch16_224": (768, 12, 12), "beit_large_patch16_224": (1024, 24, 16)}[args.model]
    hf_config = transformers.BeitConfig(
        image_size=_SEG_SIZE, hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4 * width, use_relative_position_bias=True, layer_scale_init_value=0.1,
        drop_path_rate=0.1, use_auxiliary_head=True, auxiliary_loss_weight=0.4, semantic_loss_ignore_index=255,
        num_labels=_SEG_CLASSES, out_indices=[3, 5, 7, 11] if depth == 12 else [7, 11, 15, 23])
    model = transformers.BeitForSemanticSegmentation(hf_config).to(dev).train()
    net = compile_(model)
    params = list(model.parameters())
    opt = adamw(params, lr=7e-4, betas=(0.9, 0.999), weight_decay=0.05)
    x, y = _seg_batch(batch)
    images = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    labels = torch.from_numpy(y.astype(np.int64)).to(dev)

    def loss_fn():
      with autocast():
        loss = net(pixel_values=images, labels=labels).loss
      return loss.float(), params, None
  else:
    from taming.modules.diffusionmodules.model import Decoder, Encoder  # pylint: disable=import-outside-toplevel
    from taming.modules.vqvae.quantize import VectorQuantizer  # pylint: disable=import-outside-toplevel
    from beit_jax.tokenizers import vqgan  # pylint: disable=import-outside-toplevel
    c = vqgan.get_config(args.tokenizer)
    arch = dict(ch=c.ch, out_ch=c.channels, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                attn_resolutions=list(c.attn_resolutions), dropout=0.0, in_channels=c.channels,
                resolution=c.input_size, z_channels=c.z_channels, double_z=False)
    vq = torch.nn.ModuleDict({
        "encoder": Encoder(**arch), "decoder": Decoder(**arch),
        "quant_conv": torch.nn.Conv2d(c.z_channels, c.embed_dim, 1),
        "post_quant_conv": torch.nn.Conv2d(c.embed_dim, c.z_channels, 1),
        "quantize": VectorQuantizer(c.vocab_size, c.embed_dim, beta=0.25)}).to(dev)
    encoder, decoder = compile_(vq["encoder"]), compile_(vq["decoder"])
    perc_net = timm.create_model(args.model, pretrained=False, num_classes=0).to(dev).eval().requires_grad_(False)
    features = compile_(_torch_features(torch, perc_net, (3, 6, 9, 12)))
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    params = list(vq.parameters())
    opt = torch.optim.Adam(params, lr=4.5e-6 * batch, betas=(0.5, 0.9), fused=gpu)
    images = torch.from_numpy(rng.uniform(size=(batch, 3, c.input_size, c.input_size)).astype(np.float32)).to(dev)

    def loss_fn():
      with autocast():
        z = vq["quant_conv"](encoder(2 * images - 1))
        z_q, codebook_loss, _ = vq["quantize"](z.float())
        recon = (decoder(vq["post_quant_conv"](z_q)) + 1) / 2
        with torch.no_grad():
          real = features((images - mean) / std)
        fake = features((recon - mean) / std)
        perc = sum(((a.float() - b.float()) ** 2).mean() for a, b in zip(real, fake))
      return (recon.float() - images).abs().mean() + perc + codebook_loss, params, None

  def step():
    opt.zero_grad(set_to_none=True)
    loss, ps, clip = loss_fn()
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(ps, clip)
    opt.step()
    if gpu:
      torch.cuda.synchronize()
    return loss.detach().item()

  if gpu:
    torch.cuda.reset_peak_memory_stats()
  result = {"framework": "torch", "step": step_name, "batch": batch, "dtype": args.dtype, "compile_s": None,
            "torch_compile": args.torch_compile, **measure(step, args, batch)}
  if gpu:
    result["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
  return result


# -- parent: one subprocess per (framework, step), then the table ---------------------------------------------
def run_worker(framework: str, step_name: str, argv: list[str], args) -> dict:
  env = dict(os.environ)
  if framework == "jax" and args.xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()  # read once, at backend start
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    result_file = f.name
  try:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--worker={framework}:{step_name}",
           f"--result_file={result_file}"]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
      return {"framework": framework, "step": step_name, "error": f"worker exited with status {proc.returncode}"}
    with open(result_file) as f:
      return json.load(f)
  finally:
    os.unlink(result_file)


def _fmt(value, spec):
  width = re.match(r"\d*", spec).group()
  return f"{'-':>{width or 1}}" if value is None else format(value, spec)


def print_report(info: dict, args, results: list[dict]):
  print(f"\n{args.model} / {args.tokenizer}, {args.dtype}, {args.timed} timed steps after {args.warmup} warm-up, "
        f"torch.compile {args.torch_compile}, ours: remat={args.remat} attention={args.attention}")
  print("  " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None))
  mem = "peak GPU MiB" if args.device == "gpu" else "step RSS MiB"
  print(f"  {'step':<14}{'framework':<10}{'batch':>6}{'img/s':>9}{'step s':>9}{'cpu s':>8}{'first s':>9}"
        f"{'TFLOP/s':>9}{'MFU %':>7}{mem:>14}")
  for step_name in args.steps:
    rows = {r["framework"]: r for r in results if r["step"] == step_name}
    flops = (rows.get("jax") or {}).get("step_flops")
    peak = (rows.get("jax") or {}).get("peak_tflops") or args.peak_tflops or None
    for name, r in rows.items():
      if "error" in r:
        print(f"  {step_name:<14}{name:<10}{r['error']}")
        continue
      tflops = flops / r["step_s_median"] / 1e12 if flops else None
      mfu = 100 * tflops / peak if tflops and peak else None
      memv = r.get("device_peak_mib") if args.device == "gpu" else r.get("step_peak_rss_mib")
      print(f"  {step_name:<14}{name:<10}{r['batch']:6d}{r['images_per_s']:9.2f}{r['step_s_median']:9.3f}"
            f"{r['cpu_s_median']:8.2f}{r['first_step_s']:9.1f}{_fmt(tflops, '9.3f')}{_fmt(mfu, '7.1f')}"
            f"{_fmt(memv, '14.0f')}")
    ours, peer = rows.get("jax", {}), rows.get("torch", {})
    if "images_per_s" in ours:
      x = ours.get("xla_memory_mib") or {}
      print(f"  {'':<14}jax: compile {ours['compile_s']:.1f} s, {_fmt(flops and flops / 1e9, '.1f')} GFLOP/step "
            f"(XLA), peak {ours['peak_tflops']:.3f} TFLOP/s (matmul here), XLA memory "
            + ", ".join(f"{k} {v:.0f}" for k, v in x.items()) + " MiB")
    if "images_per_s" in ours and "images_per_s" in peer:
      print(f"  {'':<14}ours / peer: {ours['images_per_s'] / peer['images_per_s']:.2f}x images/s")


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    framework, step_name = args.worker.split(":")
    result = (run_jax if framework == "jax" else run_torch)(args, step_name)
    with open(args.result_file, "w") as f:
      json.dump(result, f)
    return 0
  info = machine_info(args)
  results = [run_worker(fw, s, argv, args) for s in args.steps for fw in args.frameworks]
  print_report(info, args, results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
                 "results": results}, f, indent=1)
  return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
