"""Bad files in a `folder:` source: every undecodable file counted and named, and resume exact whatever fails.

The folder holds good PNGs and JPEGs and one bad file of every kind: no image signature (a text file named .jpg,
an empty .png), a valid signature over garbage, and truncated files with a valid signature (PNG and JPEG, both cut
in their pixel data: only a full decode finds them)."""
import io

import numpy as np
import pytest

from beit_jax.data import pipelines, sources

MASKS = pipelines.MaskSpec(grid=(4, 4), num_masked=6, min_block=2)
BATCH = 4
BAD = ("text.jpg", "empty.png", "garbage.jpg", "garbage.png", "truncated.png", "truncated.jpg")
STREAM_KEYS = ("image", "tokenizer_image", "mask", "label", "index", "epoch")


def _encode(array, fmt, **kw):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, fmt, **kw)
  return buf.getvalue()


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  """26 good images (PNG and JPEG, 40-90 px) and the 6 bad files of BAD in 2 classes: 32 files, 8 batches of 4
  per epoch (no file left out of an epoch)."""
  import skimage.data  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("bad_folder")
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  rng = np.random.default_rng(0)
  for c in ("a", "b"):
    (root / "train" / c).mkdir(parents=True)
  for i in range(26):
    y, x = rng.integers(0, 200, 2)
    h, w = rng.integers(40, 90, 2)
    crop = photos[i % 3][y:y + h, x:x + w]
    name = f"{i:03d}.png" if i % 2 else f"{i:03d}.jpg"
    data = _encode(crop, "PNG") if i % 2 else _encode(crop, "JPEG", quality=90)
    (root / "train" / ("a" if i % 3 else "b") / name).write_bytes(data)
  photo = photos[0][:80, :96]
  png, jpg = _encode(photo, "PNG"), _encode(photo, "JPEG", quality=90)
  bad = {"text.jpg": b"this is not an image at all", "empty.png": b"",
         "garbage.jpg": b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
         "garbage.png": png[:8] + bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
         "truncated.png": png[:len(png) * 2 // 3], "truncated.jpg": jpg[:len(jpg) * 2 // 3]}
  assert set(bad) == set(BAD)
  for k, (name, data) in enumerate(bad.items()):
    (root / "train" / ("a" if k % 2 else "b") / name).write_bytes(data)
  return root


def _source(root):
  src = sources.get_source(f"folder:{root}", "train")
  assert src.num_examples == 32
  return src


def _run(src, start, n, transform=None):
  transform = transform or pipelines.pretrain_transform(seed=1, image_size=32, tokenizer_size=16)
  it = pipelines.train_batches(src, transform, host_batch=BATCH, seed=1, start_step=start, masks=MASKS)
  return [next(it) for _ in range(n)]


def test_resume_over_bad_files_is_exact(bad_folder):
  """A run stopped at any step and resumed there yields bitwise the batches of the uninterrupted run, inside an
  epoch and across the epoch boundary, with every kind of bad file in the folder (today's pipeline skipped files
  before decoding, so a truncated file before the resume point shifted the resumed stream, and an epoch left
  short wrapped around through the skip again)."""
  src = _source(bad_folder)
  spe = pipelines.steps_per_epoch(src, BATCH)
  assert spe == 8
  full = _run(src, 0, 2 * spe + 2)
  assert [int(b["epoch"][0]) for b in full] == [0] * 8 + [1] * 8 + [2] * 2
  for start in (1, 3, 6, 8, 11, 15):
    for step, (a, b) in enumerate(zip(full[start:], _run(src, start, len(full) - start)), start):
      for k in STREAM_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"resumed at {start}: step {step}, key {k}")


def test_every_bad_file_is_counted_and_named(bad_folder):
  """An epoch of training meets each of the 6 bad files once: each counted in its batch's "skipped" and named in
  the BadFiles record the trainer logs and writes; an evaluation pass marks them invalid and counts them the same
  way."""
  from beit_jax.data import bad_files  # pylint: disable=import-outside-toplevel
  src = _source(bad_folder)
  record = bad_files.BadFiles(keep=4)
  it = pipelines.train_batches(src, pipelines.pretrain_transform(seed=1, image_size=32, tokenizer_size=16),
                               host_batch=BATCH, seed=1, masks=MASKS, bad_files=record)
  epoch = [next(it) for _ in range(8)]
  assert sum(int(b["skipped"][0]) for b in epoch) == len(BAD)
  assert sum(int(b["bad"].sum()) for b in epoch) == len(BAD)
  assert record.count == len(BAD) and record.rows == len(BAD)
  assert len(record.first) == 4 and {p.rsplit("/", 1)[1] for p in record.first} <= set(BAD)
  assert {p.rsplit("/", 1)[1] for p in record.names} == set(BAD)
  assert record.metrics() == {"data/bad_files": 6.0, "data/bad_rows": 6.0}
  assert "6 undecodable files" in record.summary()
  # A bad file's row holds a copy of another row of the same batch: never a blank image.
  for b in epoch:
    for r in np.flatnonzero(b["bad"]):
      twins = [j for j in range(BATCH) if j != r and not b["bad"][j] and b["index"][j] == b["index"][r]]
      assert twins and np.array_equal(b["image"][r], b["image"][twins[0]])

  record = bad_files.BadFiles()
  ev = list(pipelines.eval_batches(src, pipelines.eval_transform(image_size=32), host_batch=16, bad_files=record))
  valid = np.concatenate([b["valid"] for b in ev])
  assert valid.sum() == 26 and sum(int(b["skipped"][0]) for b in ev) == len(BAD) and record.count == len(BAD)
  for b in ev:
    assert not b["image"][~b["valid"]].any()  # bad rows are blank, as padding rows


def test_bad_files_module_does_not_import_tensorflow():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  subprocess.run([sys.executable, "-c", "import sys, beit_jax.data.bad_files; "
                                        "assert 'tensorflow' not in sys.modules"], check=True)


def test_a_training_run_reports_its_bad_files(bad_folder, tmp_path, caplog):
  """What a user sees: a fine-tuning run over the folder names the bad files in its log and carries their count in
  its logged metrics (console line, TensorBoard, the run's last metrics), and ends with the tally."""
  import logging  # pylint: disable=import-outside-toplevel
  from beit_jax import configs  # pylint: disable=import-outside-toplevel
  from beit_jax.data import bad_files  # pylint: disable=import-outside-toplevel
  from beit_jax.train import finetune  # pylint: disable=import-outside-toplevel
  c = configs.finetune()
  c.model.name, c.model.overrides = "beit_test_tiny", {"drop_path_rate": 0.0}
  c.data.source, c.data.split, c.data.image_size, c.data.crop_pct = f"folder:{bad_folder}", "train", 32, 1.0
  c.data.augment = {"crop_scale": (1.0, 1.0), "rand_augment": None, "erase_prob": 0.0}
  c.mixup, c.eval_split, c.batch_size = None, "", 8
  c.total_steps, c.log_every, c.ckpt_every, c.optim.warmup_steps = 4, 4, 2, 1
  bad_files.SEEN.__init__()  # this process's record, as a fresh run starts with it
  with caplog.at_level(logging.WARNING):
    out = finetune.train_and_evaluate(c, str(tmp_path / "run"))
  print(out["metrics"])
  # 4 steps of 8 are the epoch: each bad file once, however far the pipeline read ahead into the next epoch.
  assert out["metrics"]["data/bad_files"] == len(BAD) and out["metrics"]["data/bad_rows"] == len(BAD)
  named = {m.rsplit("/", 1)[-1] for m in caplog.messages if m.startswith("undecodable file skipped")}
  assert named == set(BAD), caplog.messages
  assert any(m.startswith(f"{len(BAD)} undecodable files skipped") for m in caplog.messages)

  # Resumed from step 2 in a fresh process (its record empty): the checkpoint's record of steps 1-2 goes on,
  # and the run ends with the uninterrupted run's figures (before, the count restarted at 0 on resume).
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  meta = ocp.CheckpointManager(tmp_path / "run" / "checkpoints").restore(
      2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  print("the checkpoint of step 2 keeps", meta["bad_files"])
  assert meta["bad_files"]["step"] == 2 and 0 < len(meta["bad_files"]["names"]) < len(BAD)
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "4")
  bad_files.SEEN.__init__()
  again = finetune.train_and_evaluate(c, str(tmp_path / "run"))
  assert {k: again["metrics"][k] for k in ("data/bad_files", "data/bad_rows")} == {
      "data/bad_files": len(BAD), "data/bad_rows": len(BAD)}
