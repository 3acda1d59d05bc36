"""beit_jax: BEiT and PeCo masked image modeling in JAX / Flax NNX.

Importing the package (models, converters, training steps) never imports TensorFlow: only `beit_jax.data`
does, so a benchmark or an accelerator job can run on synthetic batches where TensorFlow is absent.
`beit_jax.models` and `beit_jax.convert` load on first use, so that the entry point (`python -m beit_jax.main`)
starts, and takes over SIGTERM, before jax is imported (train/preemption.py).
"""
import importlib

__version__ = "0.1.0"
__all__ = ["convert", "models"]


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f"beit_jax.{name}")
  raise AttributeError(f"module 'beit_jax' has no attribute {name!r}")
