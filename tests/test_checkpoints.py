"""Model checkpoints (orbax): what beit-convert writes and the loops restore."""
import numpy as np
import pytest
from flax import nnx

from beit_jax import model_files, models


def test_save_load_round_trip_with_numerics_overrides(tmp_path):
  model = models.create_model("beit_test_tiny", num_classes=4, seed=3)
  model_files.save_model(tmp_path / "m", model, step=5)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  back = model_files.load_model(tmp_path / "m")
  assert back.config == model.config
  np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(model(x)))
  # Numerics can change on load; drop path then needs real RNG state, not shapes.
  train = model_files.load_model(tmp_path / "m", drop_path_rate=0.5, dtype="bfloat16")
  assert train.config.dtype == "bfloat16"
  train.train()
  assert not np.allclose(np.asarray(train(x)), np.asarray(train(x)))
  leaves = nnx.to_flat_state(nnx.state(train, nnx.Param))
  assert all(v.dtype == np.float32 for _, v in leaves)


def test_latest_step_and_errors(tmp_path):
  model = models.create_model("beit_test_tiny", num_classes=4, seed=0)
  other = models.create_model("beit_test_tiny", num_classes=4, seed=1)
  model_files.save_model(tmp_path / "m", model, step=1)
  model_files.save_model(tmp_path / "m", other, step=2)
  x = np.ones((1, 32, 32, 3), np.float32)
  np.testing.assert_array_equal(np.asarray(model_files.load_model(tmp_path / "m")(x)), np.asarray(other(x)))
  np.testing.assert_array_equal(np.asarray(model_files.load_model(tmp_path / "m", step=1)(x)), np.asarray(model(x)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    model_files.load_model(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no complete checkpoint step"):
    model_files.load_model(tmp_path / "empty")


def test_a_model_saved_in_the_earlier_qkv_layout_still_loads(tmp_path):
  # Until 2026-12-07 the qkv kernel was saved [D, 3, H, Dh]; such folders are converted on load.
  model = models.create_model("beit_test_tiny", num_classes=3)
  tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for block in tree["blocks"].values():
    block["attn"]["qkv"] = np.moveaxis(np.asarray(block["attn"]["qkv"]), 0, 1)
  model_files.save_with_config(tmp_path / "old", 0, tree_item="params", tree=tree, config_item="model_config",
                               config=model.config.to_dict())
  loaded = model_files.load_model(tmp_path / "old")
  want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert got.keys() == want.keys()
  for path, var in want.items():
    np.testing.assert_array_equal(np.asarray(got[path].get_value()), np.asarray(var.get_value()), err_msg=str(path))
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
