"""Tokenizers: the DALL-E dVAE against OpenAI's `dall_e` package on identical random weights."""
import jax
import numpy as np
import pytest
import torch

from beit_jax import tokenizers
from beit_jax.tokenizers import dalle
from conftest import assert_parity

dall_e = pytest.importorskip("dall_e", reason="pip install --no-deps dall-e==0.1")

SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)


def random_torch(module, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(".b"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:  # the package's own N(0, 1/fan_in), redrawn from our generator
        p.copy_(torch.randn(p.shape, generator=gen) * p.std())
  return module.eval()


@pytest.fixture(scope="module")
def torch_pair():
  enc = random_torch(dall_e.Encoder(**SMALL), 0)
  dec = random_torch(dall_e.Decoder(n_init=32, **SMALL), 1)
  return enc, dec


@pytest.fixture(scope="module")
def files(tmp_path_factory, torch_pair):
  root = tmp_path_factory.mktemp("dalle")
  enc, dec = torch_pair
  torch.save(enc, root / "encoder.pkl")   # OpenAI ships pickled modules like these
  torch.save(dec, root / "decoder.pkl")
  return root


def test_encoder_logits_and_tokens_match_dall_e(files, torch_pair):
  enc, _ = torch_pair
  tok = tokenizers.load("dalle", encoder=files / "encoder.pkl")
  images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
  with torch.no_grad():
    ref = enc(dall_e.map_pixels(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))).numpy()
  ref = ref.transpose(0, 2, 3, 1)
  ours = np.asarray(tok.logits(images))
  assert_parity(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), what="DALL-E encoder logits")
  ids = np.asarray(tok.encode(images))
  assert ids.shape == (2, 4, 4) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, ref.argmax(-1))


def test_decoder_matches_dall_e(files, torch_pair):
  _, dec = torch_pair
  tok = tokenizers.load("dalle", encoder=files / "encoder.pkl", decoder=files / "decoder.pkl")
  ids = np.random.default_rng(1).integers(0, 512, (2, 4, 4))
  one_hot = torch.nn.functional.one_hot(torch.from_numpy(ids), 512).permute(0, 3, 1, 2).float()
  with torch.no_grad():
    stats = dec(one_hot)
    ref = dall_e.unmap_pixels(torch.sigmoid(stats[:, :3])).numpy().transpose(0, 2, 3, 1)
  assert_parity(np.asarray(tok.decoder(jax.nn.one_hot(ids, 512))), stats.numpy().transpose(0, 2, 3, 1),
                atol=1e-4, what="DALL-E decoder statistics")
  out = np.asarray(tok.decode(ids))
  assert out.shape == (2, 32, 32, 3)
  assert np.abs(out - ref).max() < 1e-5


def test_converted_safetensors_round_trip_and_errors(tmp_path, files):
  tok = tokenizers.load("dalle", encoder=files / "encoder.pkl")
  dalle.save_safetensors(tok.encoder, tmp_path / "encoder.safetensors", "encoder")
  again = tokenizers.load("dalle", encoder=tmp_path / "encoder.safetensors")
  x = np.random.default_rng(2).random((1, 16, 16, 3), dtype=np.float32)
  np.testing.assert_array_equal(np.asarray(again.logits(x)), np.asarray(tok.logits(x)))
  with pytest.raises(ValueError, match="without a decoder"):
    tok.decode(np.zeros((1, 2, 2), np.int32))
  with pytest.raises(ValueError, match="NHWC"):
    tok.encode(np.zeros((1, 3, 16, 16), np.float32))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenizers.load("dalle", encoder=tmp_path / "nope.pkl")
  with pytest.raises(ValueError, match="unknown tokenizer 'vqgan'"):
    tokenizers.load("vqgan")


@pytest.mark.parametrize("suffix", [".pkl", ".pt"])
def test_malicious_dall_e_pickle_is_refused_not_run(tmp_path, suffix):
  """OpenAI's encoder.pkl is a pickled module, so the .pkl loader allows dall_e's classes, and nothing else."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import pickle  # pylint: disable=import-outside-toplevel
  from beit_jax import convert  # pylint: disable=import-outside-toplevel
  marker = tmp_path / "pwned"

  class Exploit:
    def __reduce__(self):
      return (pathlib.Path.touch, (marker,))

  path = tmp_path / f"encoder{suffix}"
  with open(path, "wb") as f:
    pickle.dump({"blocks.input.w": Exploit()}, f)
  with pytest.raises(convert.UnsafeCheckpointError, match=f"refusing to load .*encoder{suffix}"):
    dalle.read_state_dict(path)
  assert not marker.exists()
