"""Checkpoint conversion: files, round trips, safety, error messages, the `beit-convert` command."""
import argparse
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from flax import nnx

from beit_jax import convert, model_files, models
from beit_jax.convert import cli
from conftest import assert_parity, randomize_torch, torch_state_dict


@pytest.fixture(scope="module")
def timm_model(timm):
  return randomize_torch(timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               num_classes=5, use_abs_pos_emb=False, use_rel_pos_bias=True,
                                               init_values=0.1), seed=3)


def nhwc(seed=0, size=32):
  return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def run_torch(model, x):
  with torch.no_grad():
    return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def params_of(model):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_unilm_pth_with_args_namespace(tmp_path, timm_model):
  # unilm checkpoints: tensors under "model", "module." prefixes, the argparse.Namespace of the run, buffers.
  sd = {"module." + k: v for k, v in timm_model.state_dict().items()}
  sd["module.blocks.0.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
  path = tmp_path / "checkpoint-99.pth"
  torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3), "epoch": 99}, path)
  ours = convert.load_pytorch_checkpoint(path)
  assert_parity(ours(nhwc()), run_torch(timm_model, nhwc()), what="logits from a unilm .pth")


def test_round_trip_through_timm_is_exact(tmp_path, timm):
  ours = models.create_model("beit_test_tiny", num_classes=5, seed=7)
  exported = convert.export_state_dict(ours)
  ref = timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                              use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  back = convert.load_state_dict(torch_state_dict(ref))
  assert back.config == ours.config
  a, b = params_of(ours), params_of(back)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # and through a safetensors file
  path = tmp_path / "m.safetensors"
  convert.save_timm_safetensors(ours, path)
  again = convert.load_pytorch_checkpoint(path)
  for k, v in params_of(again).items():
    np.testing.assert_array_equal(v, a[k], err_msg=k)


def test_malicious_pickle_is_refused_not_run(tmp_path):
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (pathlib.Path.touch, (marker,))

  path = tmp_path / "evil.pth"
  with open(path, "wb") as f:
    pickle.dump({"model": {"x": Exploit()}}, f)
  with pytest.raises(convert.UnsafeCheckpointError, match="refusing to load .*evil.pth"):
    convert.load_pytorch_checkpoint(path)
  assert not marker.exists()


def test_shape_mismatch_names_tensor_and_shapes(timm_model):
  sd = torch_state_dict(timm_model)
  cfg = convert.infer_config(sd)
  sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:64]
  with pytest.raises(convert.ConversionError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(64, 32\).*\(128, 32\)"):
    convert.load_state_dict(sd, cfg)


def test_unknown_and_missing_tensors_are_named(timm_model):
  sd = torch_state_dict(timm_model)
  with pytest.raises(convert.ConversionError, match="blocks.0.attn.extra_thing"):
    convert.load_state_dict({**sd, "blocks.0.attn.extra_thing": np.zeros(3)})
  del sd["blocks.1.norm2.bias"]
  with pytest.raises(convert.ConversionError, match=r"no tensor 'blocks\.1\.norm2\.bias'"):
    convert.load_state_dict(sd)
  with pytest.raises(convert.ConversionError, match="is it a BEiT checkpoint"):
    convert.load_state_dict({"conv1.weight": np.zeros((3, 3))})


def test_task_heads_are_swapped(timm_model, caplog):
  # A classifier loaded as a 10-class classifier: the backbone is kept, the head is fresh and logged.
  sd = torch_state_dict(timm_model)
  model = convert.load_state_dict(sd, convert.infer_config(sd).replace(num_classes=10))
  assert model.head.kernel.shape == (32, 10)
  np.testing.assert_array_equal(np.asarray(model.blocks[1].mlp.fc2.kernel[...]), sd["blocks.1.mlp.fc2.weight"].T)
  assert "head" in caplog.text


def test_cli_pth_to_orbax_to_safetensors(tmp_path, timm_model):
  src = tmp_path / "timm.pth"
  torch.save(timm_model.state_dict(), src)
  assert cli.main([str(src), str(tmp_path / "ckpt")]) == 0
  restored = model_files.load_model(tmp_path / "ckpt")
  assert_parity(restored(nhwc(1)), run_torch(timm_model, nhwc(1)), what="logits after .pth -> orbax -> load")
  out = tmp_path / "back.safetensors"
  assert cli.main([str(tmp_path / "ckpt"), str(out)]) == 0
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  back = load_file(out)
  for k, v in torch_state_dict(timm_model).items():
    if k in back:
      np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert set(back) == {k for k in timm_model.state_dict() if "relative_position_index" not in k}
  with pytest.raises(SystemExit, match="not empty"):
    cli.main([str(src), str(tmp_path / "ckpt")])


def test_cli_resizes_and_reports_errors(tmp_path, timm_model):
  src = tmp_path / "timm.pth"
  torch.save(timm_model.state_dict(), src)
  assert cli.main([str(src), str(tmp_path / "r48"), "--img-size", "48", "--rel-pos-interp", "linear"]) == 0
  assert model_files.load_model(tmp_path / "r48").blocks[0].attn.rel_pos.table.shape == (11 * 11 + 3, 2)
  exe = pathlib.Path(sys.executable).with_name("beit-convert")
  res = subprocess.run([str(exe), str(tmp_path / "missing.pth"), str(tmp_path / "x")], capture_output=True,
                       text=True, check=False)
  assert res.returncode != 0 and "missing.pth does not exist" in res.stderr
  res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
  assert "beit-convert SRC DST" in res.stdout or "usage: beit-convert" in res.stdout
