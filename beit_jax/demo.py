"""BEiT's and PeCo's central claims in miniature on Fashion-MNIST, on CPU: `make demo` (scale "demo") and
benchmarks/fmnist_reproduction.py (scale "full").

The chain; every stage is a run of the loops `python -m beit_jax.main` runs, with a config from configs/, in
its own folder of the workdir (a rerun with the same workdir skips finished stages and resumes an interrupted
one):
  1. a pixel-only VQ tokenizer                          configs/fmnist_tokenizer.py:pixel
  2. BEiT pre-training on its ids                       configs/fmnist_pretrain.py
  3. a PeCo tokenizer: pixel loss + perceptual loss on the deep features of model 2, a self-supervised
     transformer (what PeCo uses; our model 2 stands in for its MoCo v3 / BEiT network)
  4. BEiT pre-training on the PeCo ids                  configs/fmnist_pretrain.py
  5. fine-tuning (configs/fmnist_finetune.py) of three arms on labelled fractions of the training set, over
     seeds (seed s takes the s-th contiguous slice as its labelled subset, and its own init and data order):
       supervised  from scratch, compute-matched: the fine-tuning steps plus as many steps of the same batch
                   as the pre-training saw images (pre-training steps x its batch / the fine-tuning batch)
       beit        from model 2;   peco   from model 4
  6. floors that need no pre-training: the linear probe of a randomly initialised model and a logistic
     regression on raw pixels; and the linear probes (best block) of models 2 and 4.
Prints a markdown table (mean +- standard deviation over seeds) and writes it, with every figure, to
workdir/results.json.

  python -m beit_jax.demo --workdir=/tmp/beit_demo [--scale=demo|full]
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import pathlib
import time
from typing import Any

import numpy as np
from absl import app, flags

from beit_jax.train import modes

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
TRAIN_SIZE = 60000  # Fashion-MNIST's training split


@dataclasses.dataclass(frozen=True)
class Scale:
  tokenizer_steps: int
  pretrain_steps: int
  finetune_steps: dict[float, int]  # labelled fraction -> fine-tuning steps
  seeds: tuple[int, ...]
  probe_steps: int


SCALES = {
    # ~20 minutes on a 2-core CPU by the full run's stage times (not yet timed end to end): every arm once,
    # on all labels.
    "demo": Scale(tokenizer_steps=120, pretrain_steps=120, finetune_steps={1.0: 120}, seeds=(0,), probe_steps=50),
    # The recorded table (BENCHMARKS.md): 1%, 10% and all labels, 3 seeds.
    "full": Scale(tokenizer_steps=300, pretrain_steps=300, finetune_steps={0.01: 100, 0.1: 150, 1.0: 250},
                  seeds=(0, 1, 2), probe_steps=100),
}


def config_file(name: str, arg: str = ""):
  """configs/NAME.py's get_config(arg), as `--config=configs/NAME.py:arg` loads it."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def with_steps(config, steps: int):
  config.total_steps = steps
  config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 10)
  for key in ("ckpt_every", "eval_every", "log_every"):
    if key in config:
      config[key] = min(config[key], steps)
  return config


def labelled_split(fraction: float, seed: int) -> str:
  if fraction >= 1.0:
    return "train"
  n = int(round(fraction * TRAIN_SIZE))
  if (seed + 1) * n > TRAIN_SIZE:
    raise ValueError(f"seed {seed}: {seed + 1} disjoint subsets of {n} examples exceed the training set")
  return f"train[{seed * n}:{(seed + 1) * n}]"


class Chain:
  """Runs (or, when its result is on disk, reads) each stage; `log` prints a progress line."""

  def __init__(self, workdir: str, scale: Scale):
    self.work, self.scale, self.t0 = pathlib.Path(workdir), scale, time.time()
    self.results = self._load()

  def _load(self) -> dict[str, Any]:
    path = self.work / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}

  def log(self, msg: str) -> None:
    print(f"[demo {time.time() - self.t0:5.0f} s] {msg}", flush=True)

  def stage(self, name: str, config) -> dict[str, float]:
    """The metrics of the run `name` (config), run now unless an earlier run of the chain recorded them."""
    if name in self.results:
      return self.results[name]
    t = time.time()
    out = modes.run(config, str(self.work / name))
    done = int(np.asarray(out["state"]["step"]))
    if done != config.total_steps:  # stopped early (SIGTERM): nothing recorded, the rerun resumes the stage
      self.log(f"{name} stopped at step {done} of {config.total_steps}; rerun the same command to resume")
      raise SystemExit(1)
    metrics = {k: float(v) for k, v in out["metrics"].items() if np.isscalar(v)}
    metrics["seconds"] = time.time() - t
    self._record(name, metrics)
    return metrics

  def _record(self, name: str, metrics: dict[str, float]) -> None:
    self.results[name] = metrics
    self.work.mkdir(parents=True, exist_ok=True)
    (self.work / "results.json").write_text(json.dumps(self.results, indent=1, sort_keys=True))

  def pretrain(self, arm: str, perceptual_from: str | None) -> str:
    """Tokenizer + pre-training of one arm; returns the pre-trained model folder."""
    tok = config_file("fmnist_tokenizer", f"checkpoint:{perceptual_from}" if perceptual_from else "pixel")
    m = self.stage(f"{arm}_tokenizer", with_steps(tok, self.scale.tokenizer_steps))
    self.log(f"{arm} tokenizer: held-out PSNR {m['eval_psnr']:.2f} dB, codebook usage {100 * m['eval_usage']:.1f}%, "
             f"perplexity {m['eval_perplexity']:.0f}")
    pre = config_file("fmnist_pretrain", str(self.work / f"{arm}_tokenizer" / "tokenizer"))
    m = self.stage(f"{arm}_pretrain", with_steps(pre, self.scale.pretrain_steps))
    self.log(f"{arm} pre-training: held-out masked-token accuracy {100 * m['eval_mlm_acc']:.1f}% vs "
             f"{100 * m['eval_most_frequent_acc']:.1f}% most frequent token, "
             f"{100 * m['eval_most_frequent_per_position_acc']:.1f}% most frequent per position, "
             f"{100 * m['eval_chance']:.2f}% chance")
    return str(self.work / f"{arm}_pretrain" / "model")

  def finetune(self, arm: str, init: str, fraction: float, seed: int, extra_steps: int = 0) -> dict[str, float]:
    c = config_file("fmnist_finetune", init)
    c.seed = seed
    c.data.split = labelled_split(fraction, seed)
    if not init:
      c.optim.layer_decay = 1.0  # nothing pre-trained to protect: every layer learns at the full rate
    c = with_steps(c, self.scale.finetune_steps[fraction] + extra_steps)
    m = self.stage(f"{arm}_finetune_{fraction:g}_seed{seed}", c)
    self.log(f"{arm} fine-tuned on {c.data.split} (seed {seed}, {c.total_steps} steps): held-out top-1 "
             f"{100 * m['eval_top1']:.1f}%")
    return m

  def probe(self, arm: str, init: str, seed: int) -> dict[str, float]:
    c = config_file("fmnist_linear_probe", init)
    c.seed = seed
    m = self.stage(f"{arm}_probe_seed{seed}", with_steps(c, self.scale.probe_steps))
    self.log(f"{arm} linear probe (seed {seed}): best block {m['eval_best_block']:.0f}, held-out top-1 "
             f"{100 * m['eval_top1']:.1f}%")
    return m

  def pixel_floor(self, fraction: float, seed: int) -> dict[str, float]:
    name = f"pixels_logreg_{fraction:g}_seed{seed}"
    if name not in self.results:
      t = time.time()
      acc = pixel_logistic_regression(labelled_split(fraction, seed), seed)
      self._record(name, {"eval_top1": acc, "seconds": time.time() - t})
    return self.results[name]


def pixel_logistic_regression(split: str, seed: int, steps: int = 500) -> float:
  """Held-out top-1 of a multinomial logistic regression on raw pixels (standardised per pixel), full-batch
  AdamW on the labelled split: the floor every learned representation must beat."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from beit_jax.data import sources  # pylint: disable=import-outside-toplevel  (TensorFlow)

  def arrays(split_name):
    src = sources.get_source("fashion_mnist_files", split_name)
    b = src.read().batch(src.num_examples).get_single_element()
    return b["image"].numpy().reshape(src.num_examples, -1).astype(np.float32) / 255.0, b["label"].numpy()

  x, y = arrays(split)
  xt, yt = arrays("test")
  mean, std = x.mean(0), x.std(0) + 0.1
  x, xt = (x - mean) / std, (xt - mean) / std
  tx = optax.adamw(optax.cosine_decay_schedule(1e-2, steps), weight_decay=1e-2)
  params = (jnp.zeros((x.shape[1], 10)), jnp.zeros(10))
  params = jax.tree.map(lambda p, k: p + 0.01 * jax.random.normal(k, p.shape), params,
                        tuple(jax.random.split(jax.random.key(seed), 2)))

  @jax.jit
  def step(params, opt):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean()
    updates, opt = tx.update(jax.grad(loss)(params), opt, params)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  for _ in range(steps):
    params, opt = step(params, opt)
  return float(np.mean(np.argmax(xt @ np.asarray(params[0]) + np.asarray(params[1]), -1) == yt))


def mean_std(values) -> str:
  v = 100 * np.asarray(values, np.float64)
  return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}"


# The arms: table label -> the short name in stage names ("{short}_finetune_{fraction}_seed{seed}", ...).
FINETUNE_ARMS = {"supervised (compute-matched)": "supervised", "BEiT, pixel-VQ tokens": "beit",
                 "PeCo, perceptual tokens": "peco"}
PROBE_ARMS = {"random init": "random", "BEiT, pixel-VQ tokens": "beit", "PeCo, perceptual tokens": "peco"}
PIXELS = "logistic regression on pixels"


def run(workdir: str, scale_name: str) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  # The arms' runs compile the same steps again and again: a persistent cache compiles each once.
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(workdir) / "jit_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  scale = SCALES[scale_name]
  chain = Chain(workdir, scale)
  chain.log(f"scale {scale_name}: {scale}")
  models = {"random": ""}
  models["beit"] = chain.pretrain("beit", perceptual_from=None)
  models["peco"] = chain.pretrain("peco", perceptual_from=models["beit"])
  pre_batch = config_file("fmnist_pretrain").batch_size
  ft_batch = config_file("fmnist_finetune").batch_size
  matched = scale.pretrain_steps * pre_batch // ft_batch  # the images pre-training saw, in fine-tuning steps
  for fraction in scale.finetune_steps:
    for short in FINETUNE_ARMS.values():
      init, extra = ("", matched) if short == "supervised" else (models[short], 0)
      for seed in scale.seeds:
        chain.finetune(short, init, fraction, seed, extra)
    for seed in scale.seeds:
      chain.pixel_floor(fraction, seed)
  for short in PROBE_ARMS.values():
    for seed in scale.seeds:
      chain.probe(short, models[short], seed)
  text = table(chain.results, scale_name)
  (pathlib.Path(workdir) / "table.md").write_text(text + "\n")
  print(text, flush=True)
  chain.log("done")
  return chain.results


def table(results: dict[str, dict[str, float]], scale_name: str) -> str:
  """The markdown tables of a chain's recorded results (workdir/results.json); runs not (yet) recorded show
  as "-", so a partial chain renders too."""
  scale = SCALES[scale_name]
  fractions = list(scale.finetune_steps)

  def cell(names):
    values = [results[n]["eval_top1"] for n in names if n in results]
    text = mean_std(values) if values else "-"
    return text if len(values) in (0, len(names)) else f"{text} ({len(values)} of {len(names)} seeds)"

  rows = {label: [cell([f"{short}_finetune_{f:g}_seed{s}" for s in scale.seeds]) for f in fractions]
          for label, short in FINETUNE_ARMS.items()}
  rows[PIXELS] = [cell([f"pixels_logreg_{f:g}_seed{s}" for s in scale.seeds]) for f in fractions]
  rows["random init"] = [""] * len(fractions)
  probes = {label: cell([f"{short}_probe_seed{s}" for s in scale.seeds]) for label, short in PROBE_ARMS.items()}
  lines = [f"Fashion-MNIST held-out top-1 (%), {len(scale.seeds)} seed(s), mean ± std over seeds; scale "
           f"{scale_name}", "",
           "| arm | " + " | ".join(f"{f:.0%} labels" for f in fractions) + " | linear probe (all labels) |",
           "|---|" + "---|" * (len(fractions) + 1)]
  lines += [f"| {label} | " + " | ".join(cells) + f" | {probes.get(label, '')} |" for label, cells in rows.items()]
  lines += ["", "| pre-training | masked-token acc. | most frequent token | most frequent per position | chance |",
            "|---|---|---|---|---|"]
  for short in ("beit", "peco"):
    m = results.get(f"{short}_pretrain")
    if m:
      lines.append(f"| {short} | {100 * m['eval_mlm_acc']:.2f} | {100 * m['eval_most_frequent_acc']:.2f} | "
                   f"{100 * m['eval_most_frequent_per_position_acc']:.2f} | {100 * m['eval_chance']:.2f} |")
  return "\n".join(lines)


_WORKDIR = flags.DEFINE_string("workdir", "/tmp/beit_demo", "where the runs go")
_SCALE = flags.DEFINE_enum("scale", "demo", list(SCALES), "demo: ~20 min; full: the recorded table (~2 h)")


_TABLE_ONLY = flags.DEFINE_bool("table_only", False, "print the table of what the workdir holds, run nothing")


def main(argv):
  del argv
  if _TABLE_ONLY.value:
    print(table(json.loads((pathlib.Path(_WORKDIR.value) / "results.json").read_text()), _SCALE.value))
  else:
    run(_WORKDIR.value, _SCALE.value)


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.WARNING)
  app.run(main)
