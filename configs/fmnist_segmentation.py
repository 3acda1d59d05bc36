"""Semantic segmentation of composited Fashion-MNIST (one garment on a black canvas, 11 classes with the
background) with UperNet on the demo's small BEiT, on CPU.

  python -m beit_jax.main --config=configs/fmnist_segmentation.py --workdir=/tmp/beit_demo/seg_run
  python -m beit_jax.main --config=configs/fmnist_segmentation.py:/tmp/beit_demo/pretrain_run/model --workdir=...

The argument is the backbone: a model folder (a pre-training run's workdir/model; "" or none: from scratch). The
recipe is BEiT's ADE20K one (UperNet + auxiliary head, AdamW with layer decay, poly schedule after a linear
warm-up, rescale/crop/flip/photometric augmentation, sliding-window mIoU) at the scale of 64 px canvases: 64 px
crops (8 px patches), rescales of 0.75-1.5, 300 steps of 16. Test canvases are 64 x 96, so evaluation slides two
windows over each. The held-out mIoU it reaches is in BENCHMARKS.md.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.segmentation()
  c.init = f"checkpoint:{init}" if init else ""
  c.model.name = "beit_test_small"  # 64 px, 8 px patches, width 64, 4 blocks: taps after blocks 1-4
  c.model.overrides = {"drop_path_rate": 0.1}
  c.seg.aux_channels = 32
  c.data.source = "fmnist_composite"
  c.data.split = "train"
  c.data.image_size = c.data.crop_size = 64
  c.data.scale = (64, 64)
  c.data.ratio_range = (0.75, 1.5)
  c.data.mean_std = "inception"
  c.batch_size = 16
  c.total_steps = 300
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 30
  # Layer decay keeps a pre-trained backbone's lower blocks close to what they learned; from scratch there is
  # nothing to keep (200 steps: held-out mIoU 20.5% without it, 18.2% at 0.9). With 4 blocks 0.65 ** 5 would all
  # but freeze the patch embedding, hence 0.9.
  c.optim.layer_decay = 0.9 if init else 1.0
  c.log_every, c.ckpt_every = 50, 300
  c.eval_split = "test[:500]"
  c.eval.stride = 43  # 64 x 96 canvases: windows at columns 0 and 32
  c.eval.every = 0
  c.eval.scale = (96, 64)
  c.eval.batch_size = 8
  return c
