"""The run configs (this folder's files, one per run; `configs/` in the repository is a link here) and the
default blocks they share (below: each file sets what differs from them and says how to run it).

The defaults are the paper's hyper-parameters (BEiT section 2.5 / Table 12, unilm run_beit_pretraining.py).
The files ship with the package: after a plain `pip install`, `load(name, arg)` gives a config in Python and
`path(name)` the file for `beit-train --config=PATH[:arg]`.
"""
from __future__ import annotations

import importlib
import pathlib

import ml_collections

HERE = pathlib.Path(__file__).parent


def names() -> list[str]:
  """The config files' names (fmnist_pretrain, beit_base_pretrain, ...)."""
  return sorted(f.stem for f in HERE.glob("*.py") if f.stem != "__init__")


def path(name: str) -> pathlib.Path:
  """The file of config `name`, for `--config=PATH[:arg]`."""
  if name not in names():
    raise ValueError(f"no config named {name!r}; the configs: {', '.join(names())}")
  return HERE / f"{name}.py"


def load(name: str, arg: str = "") -> ml_collections.ConfigDict:
  """Config `name`'s get_config(arg), as `--config=configs/NAME.py:arg` loads it (every get_config's argument
  defaults to "")."""
  path(name)  # an unknown name fails here, naming the known ones
  return importlib.import_module(f"{__name__}.{name}").get_config(arg)


def _run_keys(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What every training mode's config has beside its recipe: the mesh, logging, checkpoints, profiling."""
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.num_devices = 0  # 0: all; else the first n (tests compare meshes of different sizes)
  c.log_every = 100
  c.ckpt_every = 5000
  c.keep_checkpoints = 3
  c.profile_first_step = 0  # > 0: a profiler trace of `profile_steps` steps from this one, into workdir
  c.profile_steps = 5
  return c


# Cloud TPU slices the pod configs name -> the topology `beit_jax.compile_for` compiles for (chips, not cores:
# a v4-32 has 16 chips).
PODS = {"v4-32": "v4:2x2x4", "v5e-64": "v5e:8x8", "v5p-32": "v5p:2x2x4", "v5p-128": "v5p:4x4x4"}


def on_pod(c: ml_collections.ConfigDict, slice_name: str) -> ml_collections.ConfigDict:
  """`c` for a TPU slice: bf16 compute (f32 parameters and optimizer state) and the batch data-parallel over
  every chip, which fits the pod configs on the slices compiled in BENCHMARKS.md (BEiT-L on v4-32 aside, see
  there); --config.mesh.fsdp=N shards the state where it does not (README "Sharding strategies").
  `c.topology` is what compile_for checks it against."""
  if slice_name not in PODS:
    raise ValueError(f"unknown TPU slice {slice_name!r}; known: {sorted(PODS)}")
  c.topology = PODS[slice_name]
  c.model.overrides = {**dict(c.model.overrides), "dtype": "bfloat16"}
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  return c


def large_recipe(c: ml_collections.ConfigDict, model_name: str) -> ml_collections.ConfigDict:
  """BEiT-L's changes to the base recipe (Table 12: LayerScale 1e-5, gradient clip 1.0), which the larger
  models (PeCo ViT-H) keep too."""
  c.model.name = model_name
  c.model.overrides = {"drop_path_rate": 0.1, "layer_scale_init": 1e-5}
  c.optim.clip_grad = 1.0
  return c


def peco_tokens(c: ml_collections.ConfigDict, checkpoint: str, size: int = 224) -> ml_collections.ConfigDict:
  """Targets from a trained PeCo tokenizer: it tokenizes a `size` px view itself (16x down to the model's grid),
  resized bicubic, instead of DALL-E's 112 px lanczos view."""
  c.tokenizer = {"name": "peco", "checkpoint": checkpoint}
  c.data.tokenizer_size = size
  c.data.tokenizer_resize = "bicubic"
  return c


# BEiT's own ImageNet-1K release layout (beit/README.md: --disable_rel_pos_bias --abs_pos_emb
# --layer_scale_init_value 0): a learned absolute position embedding, no relative position bias, no LayerScale.
# The relative-bias-only layout (BEiT+) starts position-blind: a zero table and identical mask tokens give every
# masked position of an image the same logits until the table learns, which at ImageNet's 800 epochs it does and
# in a few CPU minutes it does not. The Fashion-MNIST miniature uses this layout in every mode.
ABS_POS_LAYOUT = {"use_abs_pos_emb": True, "use_rel_pos_bias": False, "use_shared_rel_pos_bias": False,
                  "layer_scale_init": 0.0}


def pretrain() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "pretrain"
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "beit_base_patch16_224",
                                       "overrides": {"drop_path_rate": 0.1, "layer_scale_init": 0.1}})
  c.tokenizer = ml_collections.ConfigDict({"name": "dalle", "encoder": "", "decoder": None})
  c.data = ml_collections.ConfigDict({
      "source": "tfds:imagenet2012", "split": "train", "data_dir": None,
      "image_size": 224, "tokenizer_size": 112, "tokenizer_resize": "lanczos3", "color_jitter": 0.4,
      "crop_scale": (0.08, 1.0),  # the random-resized crop's area range (torchvision's default, as BEiT)
      "mean_std": "inception",  # BEiT's default; the IN-1K recipe uses --imagenet_default_mean_and_std: "imagenet"
      "threads": None,
      # The views leave the host as uint8 and are normalised inside the jitted step: 4x less host memory and
      # host->device traffic than float32, and the original's own quantisation (its views are uint8 PIL images
      # until ToTensor). tokenizer_view "device" also resizes the tokenizer's view from the model's there
      # (one resize less per image on the host; within 0.04 of the host's view, tests/test_pipelines.py).
      # resize "device": the host sends the decoded crop (padded into a square of data.crop_canvas px, default
      # 512) and the device makes both views, jitter and flip (the host's pixels within 1e-4; the host then only
      # decodes: for hosts with too few cores per chip, BENCHMARKS.md "Host input pipeline for the chips").
      "uint8": True, "tokenizer_view": "host", "resize": "host",
      "mask": {"num_masked": 75, "min_block": 16, "min_aspect": 0.3, "kind": "blockwise"},
  })
  c.batch_size = 2048
  c.epochs = 800
  c.total_steps = 0  # 0: epochs x steps per epoch
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 1.5e-3, "min_lr": 1e-5, "warmup_steps": 10 * 625, "weight_decay": 0.05,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad": 3.0, "layer_decay": 1.0})
  c.grad_accum = 1  # > 1: each batch in this many slices in turn (same update, 1/k of the activation memory)
  _run_keys(c)
  c.eval_split = ""  # a held-out split: masked-token accuracy on it at the end of the run ("" = none)
  return c


def tokenizer() -> ml_collections.ConfigDict:
  """PeCo tokenizer training. VQGAN f16 defaults (taming configs/imagenet_vqgan.yaml) where PeCo is silent."""
  c = ml_collections.ConfigDict()
  c.mode = "tokenizer"
  c.seed = 0
  c.tokenizer = ml_collections.ConfigDict({"name": "peco_vqgan_f16", "overrides": {}})
  c.data = ml_collections.ConfigDict({
      "source": "tfds:imagenet2012", "split": "train", "eval_split": "validation", "data_dir": None,
      "channels": 3, "crop_scale": (0.35, 1.0), "threads": None})
  c.loss = ml_collections.ConfigDict({
      "pixel": "l1", "pixel_weight": 1.0, "codebook_weight": 1.0,
      # PeCo: deep features of a frozen self-supervised ViT (MoCo v3 ViT-B/16 in the paper; any BEiT/ViT
      # checkpoint here). UNVERIFIED: blocks 3/6/9/12 and the weight; make them configurable, not facts.
      "perceptual_weight": 1.0,
      # normalize: unit-normalised features, LPIPS-style (losses.PerceptualLoss); off = PeCo's plain distance
      "perceptual": {"source": "pytorch:/path/to/mocov3_vit_base.pth", "layers": (3, 6, 9, 12),
                     "model_overrides": {}, "normalize": False},
      "disc_start": 250_001, "disc_weight": 0.8,
      "disc": {"ndf": 64, "n_layers": 3},
  })
  c.batch_size = 128
  c.epochs = 100
  c.total_steps = 0
  # taming: Adam(0.5, 0.9) for both networks, base lr 4.5e-6 x batch size.
  c.optim = ml_collections.ConfigDict({"name": "adam", "lr": 4.5e-6 * 128, "min_lr": 0.0, "warmup_steps": 1000,
                                       "b1": 0.5, "b2": 0.9, "eps": 1e-8, "clip_grad": 0.0, "layer_decay": 1.0})
  _run_keys(c)
  c.eval_every = 5000
  return c


def finetune() -> ml_collections.ConfigDict:
  """ImageNet-1K fine-tuning of BEiT-B/16 (paper Table 13; unilm get_started_for_image_classification.md: 8 GPUs
  x 128, lr 4e-3, 100 epochs, 20 warm-up, layer decay 0.65, drop path 0.1, wd 0.05, mixup 0.8 / cutmix 1.0)."""
  c = ml_collections.ConfigDict()
  c.mode = "finetune"
  c.seed = 0
  c.init = ""  # "checkpoint:DIR" (ours) or "pytorch:PATH" (unilm/timm/HF); "" = from scratch
  c.model = ml_collections.ConfigDict({"name": "beit_base_patch16_224",
                                       "overrides": {"drop_path_rate": 0.1, "global_pool": "avg"}})
  c.data = ml_collections.ConfigDict({
      "source": "tfds:imagenet2012", "split": "train", "data_dir": None, "image_size": 224, "crop_pct": None,
      "mean_std": "inception", "threads": None,
      # The images leave the host as uint8 and are normalised, and randomly erased, inside the jitted step (as
      # pre-training's views: 4x less host memory and host->device traffic; pipelines.finetune_transform).
      "uint8": True,
      # timm create_transform with unilm's defaults: rand-m9-mstd0.5-inc1 (2 ops), reprob 0.25 (pixel mode).
      "augment": {"crop_scale": (0.08, 1.0), "rand_augment": (2, 9.0, 0.5), "erase_prob": 0.25},
  })
  c.mixup = ml_collections.ConfigDict({"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "switch_prob": 0.5, "prob": 1.0})
  c.label_smoothing = 0.1
  c.batch_size = 1024
  c.epochs = 100
  c.total_steps = 0
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 4e-3, "min_lr": 1e-6, "warmup_steps": 20 * 1251, "weight_decay": 0.05,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad": 0.0, "layer_decay": 0.65})
  c.ema_decay = 0.0  # > 0: also keep (and evaluate, and save) an EMA of the weights
  c.grad_accum = 1
  _run_keys(c)
  c.eval_split = "validation"
  # The learning curve: held-out top-1 every eval_every steps (0 = off) on eval_every_split ("" = eval_split),
  # into TensorBoard and workdir/eval_history.jsonl
  c.eval_every = 0
  c.eval_every_split = ""
  return c


def linear_probe() -> ml_collections.ConfigDict:
  """Linear probing of a frozen BEiT-B (paper appendix D, unilm run_linear_eval.py): one linear head per block
  on concat([CLS], mean of patch tokens), trained in parallel; AdamW lr 4e-3, wd 1e-4, cosine to 0, batch 1024,
  50 epochs, RandomResizedCrop + flip. The paper's best block: 9 (base, 56.7%), 14 (large, 73.5%)."""
  c = finetune()
  c.mode = "linear_probe"
  c.model.overrides = {"drop_path_rate": 0.0}
  c.data.augment = {"crop_scale": (0.08, 1.0), "rand_augment": None, "erase_prob": 0.0}
  c.mixup = None
  c.label_smoothing = 0.0
  # layers (): every block 1..depth; normalize: standardise features per example (ours, see models/heads.py);
  # features: "augmented" (each step's random crops through the frozen backbone, the paper's) or "precomputed"
  # (every training image's features once, whitened, then L-BFGS iterations on the full batch: a logistic
  # regression with L2 penalty l2 run to convergence, for data sets whose features fit in memory; a step is then
  # an iteration, and config.optim is not used)
  c.probe = ml_collections.ConfigDict({"layers": (), "use_cls": True, "normalize": True, "features": "augmented",
                                       "l2": 1e-5})
  c.epochs = 50
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 4e-3, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 1e-4,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad": 0.0, "layer_decay": 1.0})
  return c


def segmentation() -> ml_collections.ConfigDict:
  """ADE20K semantic segmentation with UperNet on BEiT-B/16 at 512 px (unilm semantic_segmentation
  upernet_beit_base_12_512_slide_160k_ade20k_pt.py, spec section C): AdamW lr 7e-4, layer decay 0.65, wd 0.05,
  poly(1.0) after 1500 linear warm-up steps, 160k steps of 16, drop path 0.1; train pipeline: keep-ratio rescale
  to (2048, 512) x [0.5, 2.0], 512 crop (cat_max_ratio 0.75), flip, photometric distortion; test: rescale to
  (2048, 512), sliding windows of 512 at stride 341; mIoU over the 150 classes."""
  c = ml_collections.ConfigDict()
  c.mode = "segmentation"
  c.seed = 0
  c.init = ""  # the backbone: "checkpoint:DIR" (ours) or "pytorch:PATH" (unilm/timm/HF); "" = from scratch
  c.model = ml_collections.ConfigDict({"name": "beit_base_patch16_224",
                                       "overrides": {"drop_path_rate": 0.1, "img_size": 512}})
  # UperNet (models/segmentation.py SegConfig): out_indices () = blocks 3/5/7/11 (B) or 7/11/15/23 (L);
  # channels 0 = the backbone width
  c.seg = ml_collections.ConfigDict({"out_indices": (), "channels": 0, "pool_scales": (1, 2, 3, 6),
                                     "aux_channels": 256, "aux_in_index": 2, "dropout": 0.1})
  c.aux_weight = 0.4
  c.data = ml_collections.ConfigDict({
      "source": "ade20k:/path/to/ADEChallengeData2016", "split": "training", "data_dir": None, "num_classes": 0,
      "image_size": 512, "crop_size": 512, "scale": (2048, 512), "ratio_range": (0.5, 2.0), "cat_max_ratio": 0.75,
      "photometric": True,
      # mmseg's BEiT ADE20K configs normalise with the ImageNet mean/std (123.675/58.395, ...); whether unilm's own
      # configs did (BEiT pre-trains with 0.5/0.5, "inception") is not verified here: match the backbone's
      "mean_std": "imagenet",
      "threads": None})
  c.batch_size = 16
  c.epochs = 0
  c.total_steps = 160_000
  c.optim = ml_collections.ConfigDict({
      "name": "adamw", "lr": 7e-4, "min_lr": 0.0, "warmup_steps": 1500, "weight_decay": 0.05, "schedule": "poly",
      "power": 1.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "clip_grad": 0.0, "layer_decay": 0.65})
  c.grad_accum = 1
  _run_keys(c)
  c.log_every = 50
  c.ckpt_every = 4000
  c.eval_split = "validation"
  # every: evaluate each this many steps (0 = at the end only); batch_size: images per evaluation step (0 = one
  # per data-parallel device); scale: the test rescale (None = data.scale)
  c.eval = ml_collections.ConfigDict({"stride": 341, "every": 16_000, "batch_size": 0, "scale": None})
  return c
