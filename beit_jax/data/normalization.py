"""The (mean, std) pairs config.data.mean_std names, per RGB channel of images in [0, 1]. No TensorFlow and no jax:
the host pipelines (data/pipelines.py) and the device steps (data/device.py) both read them."""
from __future__ import annotations

IMAGENET_DEFAULT = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # BEiT's default normalisation (and its checkpoints')
MEAN_STD = {"inception": INCEPTION, "imagenet": IMAGENET_DEFAULT}


def mean_std(name: str):
  """The (mean, std) a config's `data.mean_std` names."""
  if name not in MEAN_STD:
    raise ValueError(f"config.data.mean_std={name!r}: use one of {sorted(MEAN_STD)}")
  return MEAN_STD[name]
