"""ADE20K semantic segmentation: UperNet on BEiT-L/16 at 640 px from the IN-22K pre-trained and fine-tuned
backbone, unilm's recipe (semantic_segmentation upernet_beit_large_24_640_slide_160k_ade20k_pt2ft.py): AdamW lr
2e-5, layer decay 0.95, weight decay 0.05, poly(1.0) after 3000 warm-up steps, 160k steps of 16 (8 GPUs x 1 x
2 accumulation there), drop path 0.2 (mmseg's BEiT-L config), LayerScale 1e-6, taps after blocks 7/11/15/23;
640 crops of images rescaled to (2560, 640) x [0.5, 2.0]; sliding-window test (640, stride 426).

  python -m beit_jax.main --config=configs/beit_large_upernet_ade20k.py:pytorch:beit_large_patch16_224_pt22k_ft22k.pth \\
      --config.data.source=ade20k:gs://bucket/ADEChallengeData2016 --workdir=gs://bucket/beit_l_ade20k

Expected: 56.7 mIoU single-scale (BEiT paper Table 7, L+ at 640). Not reproduced here.
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.segmentation()
  c.init = init if not init or init.startswith(("pytorch:", "checkpoint:")) else f"checkpoint:{init}"
  c.model.name = "beit_large_patch16_224"
  c.model.overrides = {"drop_path_rate": 0.2, "layer_scale_init": 1e-6, "img_size": 640}
  c.data.image_size = c.data.crop_size = 640
  c.data.scale = (2560, 640)
  c.optim.lr, c.optim.layer_decay, c.optim.warmup_steps = 2e-5, 0.95, 3000
  c.eval.stride = 426
  return c
