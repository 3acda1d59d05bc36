"""Faults injected for real (issue 10): kills at random moments, checkpoint writes included; truncated
checkpoints; another model's checkpoint; a second run on the same workdir. The tiny pre-training config of the
loop tests; every comparison with an uninterrupted run is bitwise."""
import logging
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from beit_jax.train import checkpoints, pretrain
from conftest import tiny_config
from test_pretrain import _RUN, params_np, saved_steps


def start(tokenizer_file, workdir, total_steps=12, ckpt_every=2):
  code = _RUN.format(tests=str(pathlib.Path(__file__).parent), tok=str(tokenizer_file), workdir=str(workdir))
  code = code.replace("total_steps=12, ckpt_every=2", f"total_steps={total_steps}, ckpt_every={ckpt_every}")
  return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def assert_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(params_np(a)), jax.tree.leaves(params_np(b))):
    np.testing.assert_array_equal(x, y)


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, tokenizer_file):
  """A checkpoint every step, so that kills land during asynchronous writes too; each restart resumes from the
  newest complete checkpoint, and the run that finally completes equals one never interrupted."""
  ref = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=12, ckpt_every=1), tmp_path / "ref")
  workdir, rng, kills = tmp_path / "killed", random.Random(0), []
  for _ in range(3):
    proc = start(tokenizer_file, workdir, ckpt_every=1)
    before = max(saved_steps(workdir), default=0)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and max(saved_steps(workdir), default=0) <= before:
      time.sleep(0.05)  # wait for this run's first new checkpoint: it is stepping now
    time.sleep(rng.uniform(0.0, 1.5))  # then a random moment: mid-step or mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append(max(saved_steps(workdir), default=0))
  assert kills[-1] < 12, f"the runs finished before the kills (newest checkpoints after each kill: {kills})"
  resumed = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=12, ckpt_every=1), workdir)
  assert_bitwise_equal(ref, resumed)
  print(f"killed 3 times (newest complete checkpoint after each kill: {kills}); resumed; bitwise equal at step 12")


def test_truncated_newest_checkpoint_warns_and_falls_back(tmp_path, tokenizer_file, caplog):
  ref = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=8), tmp_path / "ref")  # keeps 4, 6, 8
  workdir = tmp_path / "run"
  shutil.copytree(tmp_path / "ref", workdir)
  newest = workdir / "checkpoints" / "8"
  files = [p for p in newest.rglob("*") if p.is_file()]
  for p in files:  # a disk that lost the ends of the files after the rename
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  with caplog.at_level(logging.WARNING):
    resumed = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=8), workdir)
  assert f"checkpoint {newest} cannot be restored" in caplog.text
  assert (workdir / "checkpoints" / "8.unreadable").is_dir()  # set aside, not deleted
  assert sorted(saved_steps(workdir)) == [4, 6, 8]  # step 8 written again, from step 6
  assert_bitwise_equal(ref, resumed)
  print(f"truncated the {len(files)} files of step 8: warned, resumed from step 6, bitwise equal at step 8")


def test_another_models_checkpoint_is_a_clear_error(tmp_path, tokenizer_file):
  pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=2), tmp_path)
  other = tiny_config(tokenizer_file, total_steps=4)
  other.model.overrides = {"width": 64, "num_heads": 4}
  with pytest.raises(ValueError, match="can be restored into this run's state .* another model or config"):
    pretrain.train_and_evaluate(other, tmp_path)
  assert sorted(saved_steps(tmp_path)) == [2]  # nothing set aside or lost


def test_a_second_run_on_the_same_workdir_is_refused(tmp_path, tokenizer_file):
  workdir = tmp_path / "busy"
  proc = start(tokenizer_file, workdir, total_steps=100_000, ckpt_every=1000)
  try:
    deadline = time.time() + 300
    while time.time() < deadline and "pid" not in _read(workdir / "run.lock"):
      time.sleep(0.1)
    with pytest.raises(RuntimeError, match=f"workdir {workdir} is in use by another run \\(pid {proc.pid} "):
      pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=4), workdir)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # The kernel dropped the dead run's lock: the next run takes it without any clean-up.
  ckpts = checkpoints.TrainCheckpoints(workdir / "checkpoints")
  ckpts.lock(workdir)
  ckpts.close()


def _read(path):
  return path.read_text() if path.exists() else ""
