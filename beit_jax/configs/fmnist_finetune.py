"""Fine-tuning the demo's small BEiT on Fashion-MNIST (10 classes), on CPU.

  python -m beit_jax.main --config=configs/fmnist_finetune.py:/tmp/beit_demo/beit_pretrain/model \\
      --workdir=/tmp/beit_demo/finetune_run

The argument is a model folder: a pre-training run's workdir/model ("" or no argument: from scratch). The
recipe is BEiT's (layer decay, AdamW, cosine schedule with warm-up) at the demo's scale, in the pre-training's
layout (configs.ABS_POS_LAYOUT), with its regularisers taken out: these runs are a few hundred steps on a few
hundred labels, and what regularises a 100-epoch ImageNet run only slows one that has not yet fit. So: flips
only (no mixup/cutmix, RandAugment, erasing or crops, below), no drop path, no label smoothing, and the head at
its normal init scale, not BEiT's 0.001 (a one-seed sweep from the demo's BEiT model, 100 steps on 1% of the
labels, held-out top-1: BEiT's 0.001 / drop path 0.1 / smoothing 0.1 71.8%, these 74.5%; seed 1 69.0 -> 72.2;
150 steps on 10%: 75.2 -> 76.0). Layer decay is the knob that matters: 1.0 gave 58.3%, 0.6 72.2%. The `make
demo` chain's arms from scratch are this config without the argument: every layer at the full rate (layer decay
protects a pre-trained trunk; from random init it only slows the layers that most need to learn) and the
gradient clipped at global norm 1, as ViT's own from-scratch recipe: unclipped, 150 steps at this rate on 10% of
the labels diverged to chance on one machine (validation top-1 27% after 37 steps, then 13%, 10%, 14%; clipped
57%, BENCHMARKS.md). The held-out top-1 of every arm is in BENCHMARKS.md.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.finetune()
  c.init = f"checkpoint:{init}" if init else ""
  c.model.name = "beit_fmnist"  # 28 px, 4 px patches
  c.model.overrides = {"drop_path_rate": 0.0, "head_init_scale": 1.0, "global_pool": "avg", **configs.ABS_POS_LAYOUT}
  c.data.source = "fashion_mnist_files"
  c.data.split = "train"
  c.data.image_size = 28
  c.data.crop_pct = 1.0  # the whole 28 px image: no border to crop away
  c.data.uint8 = False  # on CPU the device is the host: no transfer for uint8 to save (the recorded runs: float)
  # Flips only: at these budgets random-resized crops cost more than they regularise (600 labels, 150 steps:
  # crops of (0.5, 1) gave 44.1% from scratch and 70.8% from BEiT, whole images 50.9% and 73.1%).
  c.data.augment = {"crop_scale": (1.0, 1.0), "rand_augment": None, "erase_prob": 0.0}
  c.mixup = None
  c.label_smoothing = 0.0
  c.batch_size = 64
  c.total_steps = 300
  c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 2e-3, 1e-5, 30
  c.optim.layer_decay = 0.75  # 4 blocks: 0.65 ** 5 would all but freeze the patch embedding
  if not init:  # from random init: nothing pre-trained to protect, and a start that can diverge (docstring)
    c.optim.layer_decay, c.optim.clip_grad = 1.0, 1.0
  c.log_every, c.ckpt_every = 50, 300
  c.eval_split = "test"
  return c
