"""Each mode's batch is described once: the trainer's batch_spec (what compile_for compiles the step for, ahead of
time) is exactly what that mode's pipeline entry point yields, key for key, shape and dtype, on real data."""
import inspect

import numpy as np
import pytest

from beit_jax import configs
from beit_jax.data import pipelines
from beit_jax.tokenizers import vqgan
from beit_jax.train import finetune, linear_probe, pretrain, segmentation, tokenizer

BATCH = 4


def _first(config, make):
  config.batch_size = BATCH
  return next(iter(make(config)))


def _as_spec(batch) -> dict:
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def _spec(spec: dict) -> dict:
  return {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


def _pretrain(uint8=False, tokenizer_view="host", resize="host"):
  c = configs.load("fmnist_pretrain")
  c.data.uint8, c.data.tokenizer_view, c.data.resize = uint8, tokenizer_view, resize
  c.data.crop_canvas = 32
  grid = pretrain.model_config(c, vocab_size=128).grid
  batch = _first(c, lambda c: pipelines.pretrain_train(c.data, c.data.split, host_batch=BATCH, seed=0,
                                                       masks=pipelines.mask_spec(c.data, grid)))
  return pretrain.batch_spec(c, grid), batch


def _finetune(uint8=False):
  c = configs.load("fmnist_finetune")
  c.data.uint8 = uint8
  c.data.augment.erase_prob = 0.25  # with uint8: random erasing's rectangles go with the images
  batch = _first(c, lambda c: pipelines.classification_train(c.data, c.data.split, host_batch=BATCH, seed=0))
  return finetune.batch_spec(c), batch


def _tokenizer():
  c = configs.load("fmnist_tokenizer", "pixel")
  tcfg = vqgan.get_config(c.tokenizer.name, **dict(c.tokenizer.get("overrides", {})))
  batch = _first(c, lambda c: pipelines.tokenizer_train(c.data, c.data.split, image_size=tcfg.input_size,
                                                        host_batch=BATCH, seed=0))
  return tokenizer.batch_spec(c, tcfg), batch


def _linear_probe(uint8=False):
  c = configs.load("fmnist_linear_probe")
  c.data.uint8 = uint8
  batch = _first(c, lambda c: pipelines.linear_probe_train(c.data, c.data.split, host_batch=BATCH, seed=0))
  return linear_probe.batch_spec(c), batch


def _segmentation():
  c = configs.load("fmnist_segmentation")
  batch = _first(c, lambda c: pipelines.segmentation_train(c.data, c.data.split, host_batch=BATCH, seed=0))
  return segmentation.batch_spec(c), batch


@pytest.mark.parametrize("mode", ["pretrain", "pretrain_uint8", "pretrain_device_view",
                                  "pretrain_device_resize", "finetune", "finetune_uint8",
                                  "linear_probe", "linear_probe_uint8", "tokenizer", "segmentation"])
def test_trainer_batch_spec_is_what_its_pipeline_yields(mode):
  spec, batch = {"pretrain": _pretrain, "pretrain_uint8": lambda: _pretrain(uint8=True),
                 "pretrain_device_view": lambda: _pretrain(uint8=True, tokenizer_view="device"),
                 "pretrain_device_resize": lambda: _pretrain(uint8=True, resize="device"),
                 "finetune": _finetune, "finetune_uint8": lambda: _finetune(uint8=True), "linear_probe": _linear_probe,
                 "linear_probe_uint8": lambda: _linear_probe(uint8=True), "tokenizer": _tokenizer, "segmentation": _segmentation}[mode]()
  print(mode, _as_spec(batch))
  assert _spec(spec) == _as_spec(batch)


@pytest.mark.parametrize("trainer", [pretrain, finetune, tokenizer, segmentation, linear_probe],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_step_takes_state_batch_frozen(trainer):
  """One step signature for every mode, `train_step(state, batch, frozen)` (frozen: the tokenizer, the perceptual
  network, the probed backbone, or None), so compile_for, the benchmark and the loop call them all alike."""
  params = list(inspect.signature(trainer.train_step).parameters.values())
  positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
  print(trainer.__name__, positional)
  assert len(positional) == 3 and positional[:2] == ["state", "batch"], positional
