"""ADE20K semantic segmentation: UperNet on BEiT-B/16 at 512 px, unilm's recipe (semantic_segmentation
upernet_beit_base_12_512_slide_160k_ade20k_pt.py): AdamW lr 7e-4, layer decay 0.65, weight decay 0.05, poly(1.0)
schedule after 1500 linear warm-up steps, 160k steps of 16 (8 GPUs x 2 there), drop path 0.1, taps after blocks
3/5/7/11, UperNet channels 768 + auxiliary FCN head (weight 0.4); 512 crops of images rescaled to (2048, 512) x
[0.5, 2.0], flip, photometric distortion; sliding-window test (512, stride 341) at (2048, 512), mIoU over 150
classes.

  python -m beit_jax.main --config=configs/beit_base_upernet_ade20k.py:gs://bucket/beit_b_pretrain/model \\
      --config.data.source=ade20k:gs://bucket/ADEChallengeData2016 --workdir=gs://bucket/beit_b_ade20k

The argument is the backbone: a pre-training run's workdir/model, or "pytorch:PATH" for a unilm/timm/HF
checkpoint (its relative position tables are resized from 224 to 512 px). data.source is the unzipped
ADEChallengeData2016 (images/ and annotations/; tfds's scene_parse150 holds other labels, see README). Expected:
the paper's BEiT-B after 800 epochs of IN-1K pre-training reaches 45.6 mIoU (Table 3; 47.7 after intermediate
IN-1K fine-tuning); with the IN-22K pre-trained and fine-tuned backbone (pt2ft: lr 3e-5, layer decay 0.9) unilm
reports 53.6 at 640 px. Not reproduced here (no ADE20K, no accelerator on this project's machines).
"""
from beit_jax import configs


def get_config(init: str = ""):
  c = configs.segmentation()
  c.init = init if not init or init.startswith(("pytorch:", "checkpoint:")) else f"checkpoint:{init}"
  return c
