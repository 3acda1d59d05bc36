"""Semantic segmentation of composited Fashion-MNIST (one garment on a black canvas, 11 classes with the
background) with UperNet on a small BEiT, on CPU.

  python -m beit_jax.main --config=configs/fmnist_segmentation.py --workdir=/tmp/beit_demo/seg_run
  python -m beit_jax.main --config=configs/fmnist_segmentation.py:/tmp/beit_demo/beit_pretrain/model \\
      --workdir=/tmp/beit_demo/seg_pretrained

The recipe is BEiT's ADE20K one (UperNet + auxiliary head, AdamW, poly schedule after a linear warm-up,
rescale/crop/flip/photometric augmentation, sliding-window mIoU) at the scale of 64 px canvases, 300 steps of 16.
Test canvases are 64 x 96, so evaluation slides windows over each.
  - No argument: a randomly initialised `beit_test_small` (64 px crops, 8 px patches); ~3 min on 2 cores.
  - A model folder (`make demo`'s pre-training run, workdir/model): that backbone (`beit_fmnist`, 28 px, 4 px
    patches) with layer decay 0.9; the canvases are rescaled by about 1/2 so garments are near 28 px, the size
    the backbone was pre-trained on. `--config.init=''` on top gives the same geometry from scratch, the baseline.
The held-out mIoU of each is in BENCHMARKS.md.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.segmentation()
  c.init = f"checkpoint:{init}" if init else ""
  c.model.overrides = {"drop_path_rate": 0.1}
  c.seg.aux_channels = 32
  c.data.source = "fmnist_composite"
  c.data.split = "train"
  c.data.mean_std = "inception"
  c.batch_size = 16
  c.total_steps = 300
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  c.log_every, c.ckpt_every = 50, 300
  c.eval_split = "test[:500]"
  c.eval.every = 0
  c.eval.batch_size = 8
  if init:  # the demo's pre-trained backbone
    c.model.name = "beit_fmnist"
    c.data.image_size = c.data.crop_size = 28
    c.data.scale, c.data.ratio_range = (64, 64), (0.375, 0.75)  # canvases 64 -> 24..48 px, garments 21..42
    c.eval.scale, c.eval.stride = (42, 28), 14  # 64 x 96 -> 28 x 42: windows at columns 0 and 14
    # Layer decay keeps the pre-trained lower blocks close to what they learned (4 blocks: 0.65 ** 5 would all
    # but freeze the patch embedding, hence 0.9).
    c.optim.layer_decay = 0.9
  else:
    c.model.name = "beit_test_small"  # 64 px, 8 px patches, width 64, 4 blocks: taps after blocks 1-4
    c.data.image_size = c.data.crop_size = 64
    c.data.scale, c.data.ratio_range = (64, 64), (0.75, 1.5)
    c.eval.scale, c.eval.stride = (96, 64), 43  # 64 x 96 canvases: windows at columns 0 and 32
    c.optim.layer_decay = 1.0  # from scratch nothing is to be kept (200 steps: mIoU 20.5% without, 18.2% at 0.9)
  return c
