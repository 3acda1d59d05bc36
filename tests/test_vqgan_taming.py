"""The PeCo tokenizer's VQGAN against taming-transformers' own modules on identical random weights.

vqgan.py is written from taming/modules/diffusionmodules/model.py; this checks it really computes the same thing:
taming's Encoder, Decoder, quant convs and VectorQuantizer, every parameter random (GroupNorm affine and biases
too, so a swapped or misplaced tensor changes the output), loaded into ours by beit_jax.convert.taming.
Widths are multiples of 32 so taming's fixed 32 GroupNorm groups equal ours (gcd(32, width)); 32 px, two
downsamplings, attention at 16 px and in the middle, two res blocks per level (three in the decoder) and width
changes on both sides, so every kind of tensor (nin_shortcut, down/upsample conv, attn q/k/v/proj_out) is mapped.
"""
import numpy as np
import pytest
import torch
from flax import nnx

from beit_jax.convert import taming as convert_taming
from beit_jax.tokenizers import vqgan
from conftest import assert_parity, randomize_torch, torch_state_dict

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model",
                                   reason="pip install --no-deps taming-transformers")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

CFG = vqgan.PecoConfig(input_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                       z_channels=8, embed_dim=4, vocab_size=64)
# taming's VQGAN yaml layout (ddconfig) for the same network; double_z=False as its VQGAN configs.
ARCH = dict(ch=CFG.ch, out_ch=CFG.channels, ch_mult=list(CFG.ch_mult), num_res_blocks=CFG.num_res_blocks,
            attn_resolutions=list(CFG.attn_resolutions), dropout=0.0, in_channels=CFG.channels,
            resolution=CFG.input_size, z_channels=CFG.z_channels, double_z=False)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def pair():
  """(taming VQModel's modules under its state-dict names, our tokenizer loaded from their state dict)."""
  ref = torch.nn.ModuleDict({
      "encoder": taming_model.Encoder(**ARCH), "decoder": taming_model.Decoder(**ARCH),
      "quant_conv": torch.nn.Conv2d(CFG.z_channels, CFG.embed_dim, 1),
      "post_quant_conv": torch.nn.Conv2d(CFG.embed_dim, CFG.z_channels, 1),
      "quantize": taming_quantize.VectorQuantizer(CFG.vocab_size, CFG.embed_dim, beta=0.25)})
  randomize_torch(ref, seed=0)
  # Codes where the encodings are (taming's U(-1/K, 1/K) codebook would sit near 0 and give one id to every
  # position): mean and spread of quant_conv's output on a random batch, so many codes get chosen.
  with torch.no_grad():
    h = ref["quant_conv"](ref["encoder"](nchw(images(99)) * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, CFG.embed_dim)
    gen = torch.Generator().manual_seed(1)
    ref["quantize"].embedding.weight.copy_(h.mean(0) + h.std(0) * torch.randn(CFG.vocab_size, CFG.embed_dim,
                                                                             generator=gen))
  tok = vqgan.PecoTokenizer(CFG, rngs=nnx.Rngs(0))
  tok.eval()
  convert_taming.load_state_dict(tok, torch_state_dict(ref))
  return ref, tok


def images(seed, batch=2):
  return np.random.default_rng(seed).random((batch, CFG.input_size, CFG.input_size, CFG.channels), dtype=np.float32)


def test_encoder_matches_taming(pair):
  ref, tok = pair
  x = 2 * images(0) - 1  # the encoder's input range (the tokenizer maps [0, 1] to it)
  with torch.no_grad():
    want = nhwc(ref["encoder"](nchw(x)))
  got = np.asarray(tok.encoder(x))
  assert got.shape == (2, 8, 8, CFG.z_channels)
  assert_parity(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), what="VQGAN encoder (before quant_conv)")


def test_decoder_matches_taming(pair):
  ref, tok = pair
  z = np.random.default_rng(1).standard_normal((2, 8, 8, CFG.z_channels)).astype(np.float32)
  with torch.no_grad():
    want = nhwc(ref["decoder"](nchw(z)))
  got = np.asarray(tok.decoder(z))
  assert got.shape == (2, CFG.input_size, CFG.input_size, CFG.channels)
  assert_parity(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), what="VQGAN decoder")


def test_tokens_and_reconstruction_match_taming(pair):
  """images -> quant_conv(encoder) -> nearest code (taming: argmin L2) -> post_quant_conv -> decoder, both sides."""
  ref, tok = pair
  x = images(2)
  with torch.no_grad():
    h = ref["quant_conv"](ref["encoder"](nchw(x) * 2 - 1))
    z_q, _, (_, _, idx) = ref["quantize"](h)
    recon = nhwc((ref["decoder"](ref["post_quant_conv"](z_q)) + 1) / 2)
    codes = ref["quantize"].embedding.weight
    flat = h.permute(0, 2, 3, 1).reshape(-1, CFG.embed_dim)
    dist = torch.sort(torch.cdist(flat.double(), codes.double()) ** 2, dim=1).values.numpy()
  assert_parity(np.asarray(tok.encodings(x)), nhwc(h), atol=1e-5 * max(1.0, float(h.abs().max())),
                what="VQGAN encodings (after quant_conv)")
  want_ids = idx.numpy().reshape(2, 8, 8)
  ids = np.asarray(tok.encode(x))
  assert ids.dtype == np.int32 and ids.shape == want_ids.shape
  # Tokens must agree wherever the nearest code is clear of the runner-up by more than the encodings' error;
  # a near-tie may go either way on rounding and says nothing about the mapping.
  clear = (dist[:, 1] - dist[:, 0]).reshape(ids.shape) > 1e-3
  print(f"tokens: {int(clear.sum())} of {clear.size} clear of ties, {len(np.unique(want_ids))} distinct codes")
  assert clear.mean() > 0.9 and len(np.unique(want_ids)) >= 16
  np.testing.assert_array_equal(ids[clear], want_ids[clear])
  ours = np.asarray(tok.decode_codes(tok.quantizer.lookup(want_ids)))  # same codes, so the decoders are compared
  assert_parity(ours, recon, atol=1e-5 * max(1.0, np.abs(recon).max()), what="VQGAN reconstruction")


def test_mapping_is_one_to_one_and_strict(pair):
  """Every taming tensor has exactly one of our parameters and back; a wrong or partial state dict is refused."""
  ref, tok = pair
  sd = torch_state_dict(ref)
  names = convert_taming.taming_names(tok)
  assert len(set(names.values())) == len(names) and set(names.values()) == set(sd)
  exported = convert_taming.export_state_dict(tok)
  assert set(exported) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  # Encoder and Decoder alone take the names inside taming's Encoder/Decoder.
  assert set(convert_taming.taming_names(tok.decoder).values()) == set(ref["decoder"].state_dict())
  again = vqgan.PecoTokenizer(CFG, rngs=nnx.Rngs(1))
  convert_taming.load_state_dict(again, {**sd, "loss.discriminator.main.0.weight": np.zeros((1,))})  # skipped
  np.testing.assert_array_equal(np.asarray(again.encoder.levels[1].attn[0].k.kernel[...]),
                                sd["encoder.down.1.attn.0.k.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match="lacks tensor 'decoder.up.1.upsample.conv.weight'"):
    convert_taming.load_state_dict(again, {k: v for k, v in sd.items() if k != "decoder.up.1.upsample.conv.weight"})
  with pytest.raises(ValueError, match="does not use: \\['encoder.down.0.attn.0.q.weight'\\]"):
    convert_taming.load_state_dict(again, {**sd, "encoder.down.0.attn.0.q.weight": np.zeros((32, 32, 1, 1))})
  with pytest.raises(ValueError, match="'quantize.embedding.weight' has shape \\(64, 8\\)"):
    convert_taming.load_state_dict(again, {**sd, "quantize.embedding.weight": np.zeros((64, 8))})
  with pytest.raises(ValueError, match="quantizer is 'cosine_ema'"):
    convert_taming.taming_names(vqgan.PecoTokenizer(CFG.replace(quantizer="cosine_ema"), rngs=nnx.Rngs(0)))
