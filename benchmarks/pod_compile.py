"""The pod table of BENCHMARKS.md: the pre-training configs compiled for TPU slices with `beit_jax.compile_for`.

  PYTHONPATH=/path/to/libtpu_site python benchmarks/pod_compile.py --json=/tmp/pods.jsonl [--only=beit_base]

The configs are the repository's own (configs/<name>.py:,SLICE), their mesh replaced by each strategy.

Needs libtpu (pip install "jax[tpu]==<jax version>"; no TPU). Each row: model x slice x sharding strategy ->
per-chip memory (XLA's plan), FLOPs per step, fits or not, expected images/s at 50% MFU. Rows are printed and
appended to --json as they finish (a compile takes minutes on a small CPU).
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # libtpu asks for it; nothing is contacted
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from beit_jax import compile_for, configs  # pylint: disable=wrong-import-position

STRATEGIES = {"data": {"data": -1, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
              "fsdp+tensor4": {"data": 1, "fsdp": -1, "tensor": 4}}
# (config file, TPU slice, strategy, model override), most wanted first. Global batch 2048 everywhere (the papers').
GRID = [
    ("beit_base_pretrain", "v5p-32", "data", None),
    ("beit_base_pretrain", "v4-32", "data", None),
    ("beit_base_pretrain", "v5e-64", "data", None),
    ("beit_large_pretrain", "v5p-32", "data", None),
    ("beit_large_pretrain", "v4-32", "data", None),
    ("beit_large_pretrain", "v5e-64", "data", None),
    ("beit_large_pretrain", "v5e-64", "fsdp", None),
    ("peco_huge_pretrain", "v5p-128", "data", None),
    ("peco_huge_pretrain", "v5p-128", "fsdp", None),
    # The ceiling: ViT-g/14 (1.0B parameters) in PeCo's ViT-H set-up.
    ("peco_huge_pretrain", "v5p-128", "fsdp+tensor4", "beit_giant_patch14_224"),
    ("peco_huge_pretrain", "v5e-64", "fsdp", "beit_giant_patch14_224"),
    ("peco_huge_pretrain", "v5p-32", "fsdp", "beit_giant_patch14_224"),
    ("peco_huge_pretrain", "v4-32", "fsdp", "beit_giant_patch14_224"),
]


def config_for(name, slice_name, strategy, model):
  c = configs.load(name, f",{slice_name}")
  c.mesh = STRATEGIES[strategy]
  if model:
    c.model.name = model
  return c


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", default="")
  p.add_argument("--only", default="", help="comma-separated: run the rows whose 'config model slice strategy' "
                 "contains one of these")
  args = p.parse_args()
  for name, slice_name, strategy, model in GRID:
    c = config_for(name, slice_name, strategy, model)
    model = c.model.name
    row = f"{name} {model} {slice_name} {strategy}"
    if args.only and not any(o in row for o in args.only.split(",")):
      continue
    try:
      r = compile_for.compile_for(c, c.topology)
    except Exception as e:  # pylint: disable=broad-except  (a failed compile is a row too)
      r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    r.update(model=model, slice=slice_name, strategy=strategy)
    print(compile_for.report(r) if "error" not in r else f"{model} {slice_name} {strategy}: {r['error']}",
          flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
