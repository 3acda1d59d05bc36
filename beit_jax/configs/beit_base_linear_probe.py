"""Linear probes of every block of a pre-trained BEiT-B/16 on ImageNet-1K (paper appendix D: the best block,
9, gives 56.7% top-1; BEiT-L's block 14 gives 73.5%).

  python -m beit_jax.main --config=configs/beit_base_linear_probe.py:gs://bucket/beit_b_pretrain/model --workdir=gs://bucket/beit_b_probe

The argument is a pre-training run's workdir/model, or "pytorch:PATH" for a converted checkpoint.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.linear_probe()
  c.init = init if not init or init.startswith(("pytorch:", "checkpoint:")) else f"checkpoint:{init}"
  return c
