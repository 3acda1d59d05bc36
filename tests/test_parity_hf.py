"""Parity with HF transformers' BEiT (code we did not write) on identical random weights, f32."""
import numpy as np
import pytest
import torch

from beit_jax import convert
from beit_jax.convert.timm_compat import import_transformers
from conftest import assert_parity, randomize_torch, torch_state_dict

transformers = import_transformers()

IMG, PATCH = 32, 8
N = (IMG // PATCH) ** 2


def hf_config(**kw):
  base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=IMG,
              patch_size=PATCH, vocab_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
              drop_path_rate=0.0, layer_norm_eps=1e-6, use_relative_position_bias=True, num_labels=7)
  base.update(kw)
  return transformers.BeitConfig(**base)


def build(cls, seed=0, **kw):
  model = cls(hf_config(attn_implementation="eager", **kw))
  return randomize_torch(model, seed)


def load(hf):
  """Ours from the HF model's state dict and config (as `load_pytorch_checkpoint` reads an HF folder)."""
  sd = convert.to_timm_names(torch_state_dict(hf))
  return convert.load_state_dict(sd, convert.infer_config(sd, hf.config.to_dict()))


def images(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, IMG, IMG, 3)).astype(np.float32)
  return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("kw", [
    dict(),                                                        # per-layer tables, LayerScale, mean pooling
    dict(use_relative_position_bias=False, use_shared_relative_position_bias=True, layer_scale_init_value=0.0),
    dict(use_absolute_position_embeddings=True, use_relative_position_bias=False),
    dict(use_mean_pooling=False),                                  # final norm on all tokens
], ids=["per_layer", "shared_no_layerscale", "abs_pos", "cls_norm"])
def test_beit_model(kw):
  hf = build(transformers.BeitModel, **kw)
  ours = load(hf)
  x, xt = images()
  with torch.no_grad():
    ref = hf(pixel_values=xt, output_hidden_states=True)
  out, hidden = ours(x, return_hidden_states=True)
  assert_parity(out, ref.last_hidden_state.numpy(), what="last_hidden_state")
  assert len(hidden) == len(ref.hidden_states) == 3
  for i, (h, r) in enumerate(zip(hidden, ref.hidden_states)):
    assert_parity(h, r.numpy(), what=f"hidden_states[{i}]")
  if kw.get("use_mean_pooling", True):
    assert_parity(ours.pool(out), ref.pooler_output.numpy(), what="pooler_output")


@pytest.mark.parametrize("kw", [
    dict(use_relative_position_bias=False, use_shared_relative_position_bias=True),  # BEiT pre-training layout
    dict(use_absolute_position_embeddings=True, use_relative_position_bias=False, layer_scale_init_value=0.0),
], ids=["shared_rel_pos", "abs_pos_no_layerscale"])
def test_masked_image_modeling(kw):
  hf = build(transformers.BeitForMaskedImageModeling, use_mask_token=True, **kw)
  ours = load(hf)
  assert ours.config.vocab_size == 64 and ours.mask_token is not None
  x, xt = images(1)
  mask = np.random.default_rng(1).random((2, N)) < 0.4
  with torch.no_grad():
    ref = hf(pixel_values=xt, bool_masked_pos=torch.from_numpy(mask)).logits.numpy()
  assert_parity(ours(x, bool_masked_pos=mask), ref, what="MIM logits [B, N, V]")
  # The fixed-shape form used in training returns the same rows at the masked positions.
  logits, positions, weights = ours.masked_logits(x, mask, num_predict=N)
  for b in range(2):
    k = int(mask[b].sum())
    np.testing.assert_array_equal(np.asarray(positions[b, :k]), np.flatnonzero(mask[b]))
    np.testing.assert_array_equal(np.asarray(weights[b]), (np.arange(N) < k).astype(np.float32))
    assert_parity(np.asarray(logits[b, :k]), ref[b, mask[b]], what="masked_logits")


@pytest.mark.parametrize("pooling", [True, False], ids=["mean_pool", "cls_token"])
def test_image_classification(pooling):
  hf = build(transformers.BeitForImageClassification, use_mean_pooling=pooling)
  ours = load(hf)
  assert ours.config.global_pool == ("avg" if pooling else "token")
  x, xt = images(2)
  with torch.no_grad():
    ref = hf(pixel_values=xt).logits.numpy()
  assert_parity(ours(x), ref, what="classification logits")


def test_hf_folder_reads_config_json(tmp_path):
  # HF's own configs use layer_norm_eps=1e-12 (not BEiT's 1e-6); the converter must take it from config.json.
  hf = build(transformers.BeitForImageClassification, layer_norm_eps=1e-12)
  hf.save_pretrained(tmp_path)
  ours = convert.load_pytorch_checkpoint(tmp_path)
  assert ours.config.layer_norm_eps == 1e-12
  x, xt = images(3)
  with torch.no_grad():
    ref = hf(pixel_values=xt).logits.numpy()
  assert_parity(ours(x), ref, what="logits from an HF folder")
