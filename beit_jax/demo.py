"""`make demo`: the whole system end to end on Fashion-MNIST, on CPU, in minutes.

  1. trains a small PeCo tokenizer (configs/fmnist_tokenizer.py),
  2. pre-trains a small BEiT on its tokens with blockwise masking (configs/fmnist_pretrain.py),
  3. prints what it learned: held-out masked-token accuracy against chance and against always predicting the
     most frequent token.

  python -m beit_jax.demo --workdir=/tmp/beit_demo [--tokenizer_steps=600] [--pretrain_steps=800]

A rerun with the same workdir resumes (or skips) finished stages.
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib
import time

from absl import app, flags

from beit_jax.train import modes

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/beit_demo", "where the runs go")
_TOK_STEPS = flags.DEFINE_integer("tokenizer_steps", None, "override the tokenizer config's total_steps")
_PT_STEPS = flags.DEFINE_integer("pretrain_steps", None, "override the pre-training config's total_steps")
_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _config(name: str, arg: str = ""):
  spec = importlib.util.spec_from_file_location(name, _CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _steps(config, steps):
  if steps:
    config.total_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
    for key in ("ckpt_every", "eval_every"):
      if key in config:
        config[key] = min(config[key], steps)
  return config


def main(argv):
  del argv
  work = pathlib.Path(_WORKDIR.value)
  t0 = time.time()
  print(f"[demo] 1/2 training a PeCo tokenizer on Fashion-MNIST -> {work / 'tokenizer_run'}", flush=True)
  tok = modes.run(_steps(_config("fmnist_tokenizer"), _TOK_STEPS.value), str(work / "tokenizer_run"))["metrics"]
  print(f"[demo] tokenizer: held-out PSNR {tok.get('eval_psnr', float('nan')):.2f} dB, codebook usage "
        f"{100 * tok.get('eval_usage', float('nan')):.1f}%, perplexity {tok.get('eval_perplexity', float('nan')):.1f}"
        f" ({time.time() - t0:.0f} s)", flush=True)
  print(f"[demo] 2/2 pre-training BEiT on its tokens -> {work / 'pretrain_run'}", flush=True)
  cfg = _steps(_config("fmnist_pretrain", str(work / "tokenizer_run" / "tokenizer")), _PT_STEPS.value)
  out = modes.run(cfg, str(work / "pretrain_run"))["metrics"]
  acc, base, chance = out["eval_mlm_acc"], out["eval_most_frequent_acc"], out["eval_chance"]
  print(f"[demo] held-out masked-token accuracy {100 * acc:.1f}% vs {100 * base:.1f}% for always the most "
        f"frequent token and {100 * chance:.2f}% chance ({acc / base:.1f}x and {acc / chance:.0f}x); "
        f"total {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.WARNING)
  app.run(main)
