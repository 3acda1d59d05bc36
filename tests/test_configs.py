"""Every config file loads, names a known loop, and documents its run command; the entry point rejects bad keys."""
import importlib
import pathlib
import subprocess
import sys

import pytest

from beit_jax import configs
from beit_jax.models import registry
from beit_jax.train import modes

NAMES = configs.names()


def test_the_repositorys_configs_folder_is_the_packages():
  """configs/ (the paths every run command names) is the package's folder, so what a plain install ships and
  what the commands run are one set of files."""
  repo = pathlib.Path(__file__).parent.parent / "configs"
  assert repo.resolve() == configs.HERE.resolve()
  assert len(NAMES) > 10 and "fmnist_pretrain" in NAMES
  with pytest.raises(ValueError, match="no config named 'fmnist_pretrian'.*fmnist_pretrain"):
    configs.load("fmnist_pretrian")


def load(name, arg="/nonexistent"):
  return importlib.import_module(f"beit_jax.configs.{name}"), configs.load(name, arg)


@pytest.mark.parametrize("name", NAMES)
def test_config_is_complete(name):
  module, c = load(name)
  assert c.mode in modes.MODES
  assert f"python -m beit_jax.main --config=configs/{name}.py" in module.__doc__.replace("\\\n", "")
  if c.mode in ("pretrain", "finetune", "linear_probe", "eval", "segmentation"):
    cfg = registry.get_config(c.model.name, **dict(c.model.overrides))
    assert cfg.img_size == c.data.image_size
    assert c.batch_size > 0 and c.optim.lr > 0


def test_paper_hyper_parameters_are_the_defaults():
  _, c = load("beit_base_pretrain")
  assert (c.batch_size, c.epochs, c.optim.lr, c.optim.min_lr, c.optim.weight_decay, c.optim.clip_grad) == (
      2048, 800, 1.5e-3, 1e-5, 0.05, 3.0)
  assert (c.optim.b1, c.optim.b2) == (0.9, 0.999) and c.model.overrides.drop_path_rate == 0.1
  assert dict(c.data.mask) == {"num_masked": 75, "min_block": 16, "min_aspect": 0.3, "kind": "blockwise"}
  assert (c.data.image_size, c.data.tokenizer_size, c.data.color_jitter) == (224, 112, 0.4)


def test_finetune_and_probe_recipes_are_the_papers():
  _, c = load("beit_base_finetune", "")
  assert (c.batch_size, c.epochs, c.optim.lr, c.optim.min_lr, c.optim.weight_decay, c.optim.layer_decay) == (
      1024, 100, 4e-3, 1e-6, 0.05, 0.65)
  assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing, c.model.overrides.drop_path_rate) == (
      0.8, 1.0, 0.1, 0.1)
  assert (tuple(c.data.augment.rand_augment), c.data.augment.erase_prob, c.optim.clip_grad) == ((2, 9.0, 0.5), 0.25, 0)
  _, c = load("beit_large_finetune", "")
  assert (c.epochs, c.optim.lr, c.optim.layer_decay, c.model.overrides.drop_path_rate) == (50, 1e-3, 0.75, 0.2)
  _, c = load("beit_base_linear_probe", "")
  assert (c.optim.lr, c.optim.weight_decay, c.optim.min_lr, c.batch_size, c.probe.use_cls) == (
      4e-3, 1e-4, 0.0, 1024, True)


def test_segmentation_recipes_are_unilms():
  _, c = load("beit_base_upernet_ade20k", "")
  assert (c.batch_size, c.total_steps, c.optim.lr, c.optim.layer_decay, c.optim.weight_decay, c.optim.schedule,
          c.optim.warmup_steps) == (16, 160_000, 7e-4, 0.65, 0.05, "poly", 1500)
  assert (c.data.crop_size, tuple(c.data.scale), tuple(c.data.ratio_range), c.data.cat_max_ratio, c.eval.stride,
          c.aux_weight, c.model.overrides.drop_path_rate, tuple(c.seg.pool_scales)) == (
              512, (2048, 512), (0.5, 2.0), 0.75, 341, 0.4, 0.1, (1, 2, 3, 6))
  _, c = load("beit_large_upernet_ade20k", "")
  assert (c.data.crop_size, c.optim.lr, c.optim.layer_decay, c.optim.warmup_steps, c.eval.stride) == (
      640, 2e-5, 0.95, 3000, 426)


def test_unknown_key_is_named_before_anything_runs(tmp_path):
  res = subprocess.run([sys.executable, "-m", "beit_jax.main", "--config=configs/fmnist_pretrain.py",
                        f"--workdir={tmp_path}", "--config.optim.lrr=1"], capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parent.parent, check=False)
  assert res.returncode != 0 and "lrr" in res.stderr
