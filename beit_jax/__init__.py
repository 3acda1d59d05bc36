"""beit_jax: BEiT and PeCo masked image modeling in JAX / Flax NNX.

Importing the package (models, converters, training steps) never imports TensorFlow: only `beit_jax.data`
does, so a benchmark or an accelerator job can run on synthetic batches where TensorFlow is absent.
"""
from beit_jax import convert, models

__version__ = "0.1.0"
__all__ = ["convert", "models"]
