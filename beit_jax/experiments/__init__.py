"""Experiment drivers: chains of the product's own runs that measure something and draw it, not library code.

  miniature.py  the Fashion-MNIST miniature: tokenizers, BEiT/PeCo pre-training, fine-tuning and probe arms,
                the table, the checks and the figures (`make demo`; benchmarks/fmnist_reproduction.py at full scale)

Nothing else in beit_jax imports this package (tests/test_layering.py); a driver runs each stage through the
mode registry (train/modes.py) with a config from configs/, as `python -m beit_jax.main` would.
"""
