"""The steps of benchmarks/train_step.py by name: each one's two builders and default batches.

`ours(args, batch, mesh) -> harness.OursStep` builds the trainer's own jitted step (beit_jax.train.*) from the
project's config of that run (beit_jax.configs) with the flags' model, dtype, attention and remat;
`peer(args, batch, harness.Torch) -> harness.PeerStep` builds the PyTorch original's step from the same config.
Both take synthetic batches of the real shapes. Importing this package imports neither jax nor torch: the
builders import them when a worker calls them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from steps import finetune, mim, segmentation, tokenizer


@dataclasses.dataclass(frozen=True)
class Step:
  ours: Callable
  peer: Callable
  batch: dict  # per-device batch by --device: {"gpu": n, "cpu": n}


# Per-device batches: what fills an 80 GB H100 in bf16 without remat, and what a 2-core CPU runs in seconds
# (segmentation: 2, the fewest BatchNorm in training mode accepts for the 1x1 pyramid-pooling branch in torch).
# The order is the default --steps order.
REGISTRY = {
    "pretrain": Step(mim.pretrain, mim.pretrain_peer, {"gpu": 256, "cpu": 8}),
    "finetune": Step(finetune.ours, finetune.peer, {"gpu": 256, "cpu": 8}),
    "tokenizer": Step(tokenizer.ours, tokenizer.peer, {"gpu": 32, "cpu": 2}),
    "segmentation": Step(segmentation.ours, segmentation.peer, {"gpu": 16, "cpu": 2}),
    "miniature": Step(mim.miniature, mim.miniature_peer, {"gpu": 1024, "cpu": 64}),
}


def get(name: str) -> Step:
  if name not in REGISTRY:
    raise ValueError(f"unknown step {name!r}; the steps: {', '.join(REGISTRY)}")
  return REGISTRY[name]
