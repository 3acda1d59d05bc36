r"""Training-step throughput, MFU and peak memory: beit_jax's real train steps vs their PyTorch peers, one run.

  python benchmarks/train_step.py                                   # every step, both frameworks
  python benchmarks/train_step.py --steps=pretrain --batch=256      # on a GPU: bf16, torch.compile on
  python benchmarks/train_step.py --steps=finetune --frameworks=jax --remat=dots --batch=512
  taskset -c 1 python benchmarks/train_step.py --timed=3 --warmup=1  # one core: compare the 'cpu s' column
  python benchmarks/train_step.py --steps=miniature --profile=5       # and where each side's step time goes
  python benchmarks/train_step.py --steps=miniature --timed=40 --rounds=5  # a comparison on a noisy machine
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

The code: benchmarks/harness.py measures (the timing protocol, FLOPs and memory, the subprocesses, the table);
benchmarks/steps/ builds each step's two sides, registered by name in steps.REGISTRY with their default batches,
from the run's recipe in beit_jax.configs (ours through the trainer's own create_state/jit_train_step); this file
is the command line. A step is added there, not here.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys

import harness
import steps

# The default batch of every step by --device, as --help prints it.
DEFAULT_BATCH = {device: {name: s.batch[device] for name, s in steps.REGISTRY.items()} for device in ("gpu", "cpu")}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", default=",".join(steps.REGISTRY),
                 help=f"comma-separated subset of {','.join(steps.REGISTRY)}")
  p.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch")
  p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"),
                 help="auto: gpu where nvidia-smi finds one")
  p.add_argument("--batch", type=int, default=0, help=f"per-step batch; 0: {DEFAULT_BATCH}")
  p.add_argument("--timed", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the compile")
  p.add_argument("--rounds", type=int, default=1,
                 help="run each framework this many times, alternating (jax, torch, jax, ...), and report the "
                 "median round and every round's ratio: on a shared machine whose speed drifts by 10%% between "
                 "minutes, one run of each side is not a comparison")
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
  p.add_argument("--profile", type=int, default=0,
                 help="after the timed steps, profile this many more and print each framework's top op kinds "
                 "(CPU only; where a step's time goes, the timings above stay unprofiled)")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: FRAMEWORK:STEP
  p.add_argument("--result_file", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.steps = _names(p, "--steps", args.steps, tuple(steps.REGISTRY))
  args.frameworks = _names(p, "--frameworks", args.frameworks, ("jax", "torch"))
  if args.device == "auto":
    args.device = "gpu" if shutil.which("nvidia-smi") else "cpu"
  if args.dtype == "auto":
    args.dtype = "bfloat16" if args.device == "gpu" else "float32"
  if args.torch_compile == "auto":
    args.torch_compile = "on" if args.device == "gpu" else "off"
  if args.rounds < 1:
    p.error(f"--rounds={args.rounds}: must be at least 1")
  if args.profile and args.device == "gpu":
    p.error("--profile is for CPU runs: on a GPU, xprof (jax.profiler) or nsys see the kernels")
  return args


def _names(p, flag, value, known):
  names = [n.strip() for n in value.split(",") if n.strip()]
  bad = sorted(set(names) - set(known))
  if bad or not names:
    p.error(f"{flag}={value!r}: use a comma-separated subset of {','.join(known)}")
  return names


def run_worker(args) -> dict:
  """In the subprocess: one framework's side of one step, built by the step's registered builder."""
  framework, step_name = args.worker.split(":")
  step = steps.get(step_name)
  run, build = {"jax": (harness.run_jax, step.ours), "torch": (harness.run_torch, step.peer)}[framework]
  return run(args, step_name, build, args.batch or step.batch[args.device])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    result = run_worker(args)
    with open(args.result_file, "w") as f:
      json.dump(result, f)
    return 0
  info = harness.machine_info(args.device)
  results = harness.median_rounds([harness.run_worker(__file__, fw, s, argv, args)
                                   for _ in range(args.rounds) for s in args.steps for fw in args.frameworks])
  harness.print_report(info, args, results)
  if args.json:
    harness.write_json(args.json, info, args, results)
  return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
