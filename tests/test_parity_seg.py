"""UperNet parity with HF transformers' BeitForSemanticSegmentation (a port of unilm's released ADE20K model) on
identical random weights, f32, and the segmentation checkpoint converter (HF and unilm/mmseg names)."""
import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from beit_jax import convert
from beit_jax.convert import segmentation as convert_seg
from beit_jax.convert.timm_compat import import_transformers
from beit_jax.models import segmentation
from conftest import max_abs_diff, randomize_torch, torch_state_dict

transformers = import_transformers()

IMG, PATCH, DEPTH, K = 64, 8, 5, 5
# HF reads hidden_states[i - 1] for each i: [2, 3, 4, 5] taps the outputs of blocks 0..3 (ours (0, 1, 2, 3)).
# With 4 layers HF could not tap the last block at all (its out_indices stop at num_hidden_layers), hence 5.
HF_OUT_INDICES = [2, 3, 4, 5]


def hf_config():
  return transformers.BeitConfig(
      hidden_size=64, num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=256, image_size=IMG,
      patch_size=PATCH, num_labels=K, use_relative_position_bias=True, layer_scale_init_value=0.1,
      use_auxiliary_head=True, auxiliary_channels=32, out_indices=HF_OUT_INDICES, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, drop_path_rate=0.0, layer_norm_eps=1e-6, attn_implementation="eager")


@pytest.fixture(scope="module")
def hf():
  """The reference with random weights (LayerScale gammas ~0.5, so every block matters) and BatchNorm running
  statistics and affine parameters away from their 0/1 defaults."""
  model = randomize_torch(transformers.BeitForSemanticSegmentation(hf_config()), seed=0)
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
        m.num_batches_tracked.fill_(1000)
  return model.eval()


@pytest.fixture(scope="module")
def hf_sd(hf):
  return torch_state_dict(hf)


@pytest.fixture(scope="module")
def ours(hf, hf_sd):
  return convert.load_segmentation_state_dict(hf_sd, hf_config=hf.config.to_dict(), hf_out_indices="transformers")


forward = nnx.jit(lambda model, x: model(x))  # one compile for every model of the same structure


def inputs(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, IMG, IMG, 3)).astype(np.float32)
  labels = rng.integers(0, K, (batch, IMG, IMG))
  labels[rng.random(labels.shape) < 0.2] = 255  # ignored pixels
  return x, labels


def check(what, ours_out, ref, rtol=1e-5):
  scale = float(np.max(np.abs(ref)))
  diff = max_abs_diff(ours_out, ref)
  print(f"{what}: max abs diff {diff:.3g} (max |ref| {scale:.3g}, relative {diff / scale:.2g})")
  assert scale > 0.1, f"{what}: reference magnitude {scale} makes the tolerance meaningless"
  assert diff <= rtol * scale, f"{what}: max abs diff {diff} > {rtol} x {scale}"


def test_upernet_matches_transformers(hf, ours):
  assert ours.cfg.out_indices == (0, 1, 2, 3) and ours.cfg.num_classes == K and ours.cfg.aux_channels == 32
  assert ours.cfg.channels == 64 and ours.cfg.pool_scales == (1, 2, 3, 6)
  x, labels = inputs()
  aux_ref = {}
  hook = hf.auxiliary_head.register_forward_hook(lambda m, i, o: aux_ref.setdefault("aux", o))
  with torch.no_grad():
    out = hf(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), labels=torch.from_numpy(labels))
  hook.remove()
  ref = out.logits.numpy().transpose(0, 2, 3, 1)
  ref_aux = aux_ref["aux"].numpy().transpose(0, 2, 3, 1)
  # HF returns the decode head's logits before any upsampling: 4x the patch grid (1/4 of the image with 16 px
  # patches, 1/2 here); the auxiliary head's at its input level, the patch grid. The loss upsamples each to the
  # labels.
  grid = IMG // PATCH
  assert ref.shape == (2, 4 * grid, 4 * grid, K) and ref_aux.shape == (2, grid, grid, K)
  logits, aux = forward(ours, jnp.asarray(x))
  check("logits", logits, ref)
  check("auxiliary logits", aux, ref_aux)
  # HF: cross-entropy of the bilinearly upsampled logits, ignore_index 255, + 0.4 x the auxiliary head's.
  total, main = segmentation.seg_loss(logits, aux, jnp.asarray(labels))
  diff = abs(float(total) - out.loss.item())
  print(f"loss: ours {float(total):.6f} (main {float(main):.6f}), transformers {out.loss.item():.6f}, "
        f"diff {diff:.3g}")
  assert diff <= 1e-5 * out.loss.item()


def test_unilm_mmseg_names_give_the_same_model(hf_sd, ours, tmp_path):
  mmseg = convert_seg.to_mmseg_names(hf_sd)
  for key in ("backbone.blocks.0.attn.qkv.weight", "backbone.blocks.4.attn.relative_position_bias_table",
              "backbone.fpn1.0.weight", "backbone.fpn1.1.running_var", "backbone.fpn1.3.bias", "backbone.fpn2.0.weight",
              "decode_head.psp_modules.3.1.conv.weight", "decode_head.psp_modules.0.1.bn.running_mean",
              "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.bn.weight",
              "decode_head.fpn_convs.0.conv.weight", "decode_head.fpn_bottleneck.bn.bias", "decode_head.conv_seg.weight",
              "auxiliary_head.convs.0.conv.weight", "auxiliary_head.convs.0.bn.num_batches_tracked",
              "auxiliary_head.conv_seg.bias"):
    assert key in mmseg, key
  assert all(k.startswith(("backbone.", "decode_head.", "auxiliary_head.")) for k in mmseg)
  assert not any(w in k for k in mmseg for w in ("convolution", "normalization", "classifier", "layers.", "psp_bott"))
  for i in range(DEPTH):  # unilm's files carry the index buffers too
    mmseg[f"backbone.blocks.{i}.attn.relative_position_index"] = np.zeros((65, 65), np.int64)
  path = tmp_path / "upernet.pth"
  torch.save({"meta": {"iter": 160000}, "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v))
                                                        for k, v in mmseg.items()}}, path)
  # out_indices live in unilm's mmseg config, not in the checkpoint.
  model = convert.load_segmentation_checkpoint(path, out_indices=(0, 1, 2, 3))
  x, _ = inputs(1)
  for a, b in zip(forward(model, jnp.asarray(x)), forward(ours, jnp.asarray(x))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same table backwards: the export is the unilm/mmseg state dict it came from.
  exported = convert.export_segmentation_state_dict(model)
  expected = {k: v for k, v in mmseg.items() if not k.endswith(("num_batches_tracked", "relative_position_index"))}
  assert sorted(exported) == sorted(expected)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, expected[k], err_msg=k)


def test_hf_folder_in_hub_names(hf, ours, tmp_path):
  """save_pretrained writes the Hub files' names (`beit.encoder.layer.N.attention.attention.query`, `fpn1.0`,
  `decode_head.psp_modules.N.1.conv`, `bn`, `classifier`), not transformers 5's module names; config.json is read."""
  hf.save_pretrained(tmp_path)
  with pytest.raises(convert.ConversionError, match="transformers"):  # [2, 3, 4, 5] as unilm's: no block 5 of 5
    convert.load_segmentation_checkpoint(tmp_path)
  model = convert.load_segmentation_checkpoint(tmp_path, hf_out_indices="transformers")
  assert convert.load_segmentation_checkpoint(tmp_path, out_indices=(0, 1, 2, 3)).cfg == model.cfg  # overrides
  assert model.cfg == ours.cfg and model.backbone.config == ours.backbone.config
  x, _ = inputs(2)
  for a, b in zip(forward(model, jnp.asarray(x)), forward(ours, jnp.asarray(x))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_checkpoints_name_the_tensor(hf_sd):
  mmseg = convert_seg.to_mmseg_names(hf_sd)
  missing = {k: v for k, v in mmseg.items() if k != "decode_head.fpn_convs.1.bn.running_var"}
  with pytest.raises(convert.ConversionError, match=r"decode_head\.fpn_convs\.1\.bn\.running_var"):
    convert.load_segmentation_state_dict(missing)
  wrong = dict(mmseg, **{"decode_head.lateral_convs.0.conv.weight": np.zeros((64, 32, 1, 1), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"decode_head\.lateral_convs\.0\.conv\.weight.*\(64, 32, 1, 1\)"):
    convert.load_segmentation_state_dict(wrong)
  extra = dict(mmseg, **{"auxiliary_head.convs.1.conv.weight": np.zeros((32, 32, 3, 3), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"auxiliary_head\.convs\.1\.conv\.weight"):
    convert.load_segmentation_state_dict(extra)
  hf_missing = {k: v for k, v in hf_sd.items() if k != "decode_head.psp_bottleneck.convolution.weight"}
  with pytest.raises(convert.ConversionError, match=r"decode_head\.bottleneck\.conv\.weight"):
    convert.load_segmentation_state_dict(hf_missing)


def test_hf_out_indices():
  """transformers' BeitForSemanticSegmentation taps hidden_states[i - 1] (block i - 2); unilm taps block i. HF's
  conversion of the released ADE20K models kept unilm's numbers, so by default they are read as unilm's."""
  t = convert_seg.translate_hf_out_indices
  assert t([3, 5, 7, 11], 12) == (3, 5, 7, 11) == segmentation.OUT_INDICES[12]
  assert t([7, 11, 15, 23], 24) == (7, 11, 15, 23) == segmentation.OUT_INDICES[24]
  assert t([3, 5, 7, 11], 12, "transformers") == (1, 3, 5, 9)  # what transformers runs the base ADE20K model on
  assert t(HF_OUT_INDICES, DEPTH, "transformers") == (0, 1, 2, 3)
  with pytest.raises(convert.ConversionError, match="embeddings"):
    t([1, 2, 3, 4], 4, "transformers")
  with pytest.raises(convert.ConversionError, match="transformers"):
    t(HF_OUT_INDICES, DEPTH)  # block 5 of 5 does not exist: a head fine-tuned in transformers


def test_other_resolution_and_class_count(hf_sd):
  """img_size 48 (a 6x6 grid) resizes the relative position tables; another class count gets new classifiers."""
  model = convert.load_segmentation_state_dict(hf_sd, img_size=48, num_classes=3, out_indices=(0, 1, 2, 3))
  assert model.backbone.config.img_size == 48 and model.cfg.num_classes == 3
  graphdef, state = nnx.split(model)
  logits, aux = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((1, 48, 48, 3)))
  assert logits.shape == (1, 24, 24, 3) and aux.shape == (1, 6, 6, 3)
  with pytest.raises(convert.ConversionError, match="odd patch grid"):
    convert.load_segmentation_state_dict(hf_sd, img_size=40, out_indices=(0, 1, 2, 3))
