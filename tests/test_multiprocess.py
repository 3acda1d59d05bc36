"""Two processes on localhost (jax.distributed.initialize with 127.0.0.1, gloo collectives) run the same
pre-training steps as one process and agree.

Each process has 4 CPU devices, 8 in all; the one-process run has 8 devices in this (pytest) process. The mesh
is data=8 in both. The data pipeline gives process p of P the strided shard order[p::P] of each epoch's order,
so the global batch at step k holds the same 16 examples in both runs (in another row order), with the same
augmentations and masks (pure functions of seed, epoch and example index): the losses, means over the batch,
and the trained state agree up to the order of floating-point sums. Drop path is off: its per-row draws
follow the row order, not the example.
"""
import json
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import tensorflow as tf

from beit_jax.train import checkpoints, pretrain
from conftest import tiny_config
from test_pretrain import saved_steps

DRIVER = pathlib.Path(__file__).parent / "_multiprocess_driver.py"
TIMEOUT_S = 300


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Processes:
  """`num_processes` processes of one job running the driver; `results()` waits for them (killing them all on a
  failure or timeout, with their stderr tails in the error) and gives their RESULT records by process index."""

  def __init__(self, config, workdir: pathlib.Path, num_processes: int, devices_per_process: int):
    config_path = workdir.parent / f"{workdir.name}_config.pkl"
    config_path.write_bytes(pickle.dumps(config))
    # Replaces the 8 devices conftest.py set; JAX_PLATFORMS skips probing for accelerators.
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
           "JAX_PLATFORMS": "cpu"}
    port = free_port()
    self.procs, self.logs = [], []
    for i in range(num_processes):
      out, err = (workdir.parent / f"{workdir.name}_{i}.{s}" for s in ("out", "err"))
      self.logs.append((out, err))
      with open(out, "w") as fo, open(err, "w") as fe:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(DRIVER), str(config_path), str(workdir), str(port), str(num_processes), str(i)],
            stdout=fo, stderr=fe, env=env))
    self.deadline = time.time() + TIMEOUT_S

  def tails(self, n: int = 3000) -> str:
    return "\n".join(f"--- process {i} (exit code {p.returncode}) stderr tail ---\n{err.read_text()[-n:]}"
                     for i, (p, (_, err)) in enumerate(zip(self.procs, self.logs)))

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def results(self) -> list[dict]:
    try:
      while any(p.poll() is None for p in self.procs):
        if time.time() > self.deadline:
          raise AssertionError(f"the processes did not finish in {TIMEOUT_S} s\n{self.tails()}")
        if any(p.returncode not in (None, 0) for p in self.procs):
          time.sleep(2.0)  # lets the other process write its side of the story before it is killed
          raise AssertionError(f"a process failed\n{self.tails()}")
        time.sleep(0.2)
    finally:
      self.kill()
    if any(p.returncode for p in self.procs):
      raise AssertionError(f"a process failed\n{self.tails()}")
    results = []
    for out, _ in self.logs:
      lines = [l for l in out.read_text().splitlines() if l.startswith("RESULT ")]
      assert lines, f"no RESULT line in {out}\n{self.tails()}"
      results.append(json.loads(lines[-1][len("RESULT "):]))
    return sorted(results, key=lambda r: r["process_index"])


def event_files(workdir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(workdir.glob("events.out.tfevents*"))


def scalars(workdir: pathlib.Path, tag: str) -> dict[int, float]:
  """{step: value} of a scalar the run's metric writer wrote to TensorBoard."""
  out = {}
  for path in event_files(workdir):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for v in event.summary.value:
        if v.tag == tag:
          out[event.step] = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value
  return out


def test_two_processes_agree_with_one(tmp_path, tokenizer_file):
  config = tiny_config(tokenizer_file, mesh={"data": 8}, log_every=1, ckpt_every=4)
  config.model.overrides = {"drop_path_rate": 0.0}
  steps = config.total_steps

  # The one-process run goes on here while the two processes run (this machine has few cores, and they
  # spend much of their start-up waiting on each other).
  t0 = time.time()
  two = Processes(config, tmp_path / "two", num_processes=2, devices_per_process=4)
  try:
    one = pretrain.train_and_evaluate(config, tmp_path / "one")
    assert jax.process_count() == 1 and jax.device_count() == 8
    results = two.results()
  finally:
    two.kill()
  print(f"1 process x 8 devices and 2 processes x 4 devices: {time.time() - t0:.1f} s")
  assert [(r["process_index"], r["process_count"], r["device_count"], r["local_device_count"])
          for r in results] == [(0, 2, 8, 4), (1, 2, 8, 4)]
  assert results[0]["metrics"] == results[1]["metrics"], results  # both processes see the global metrics

  # Only process 0 writes metrics: one TensorBoard file, named with its pid (events.out.tfevents.T.HOST.PID...).
  files = event_files(tmp_path / "two")
  assert len(files) == 1, files
  assert f".{results[0]['pid']}." in files[0].name, (files[0].name, [r["pid"] for r in results])

  # The loss of every step, as written, and what the loop returned.
  loss_one, loss_two = scalars(tmp_path / "one", "loss"), scalars(tmp_path / "two", "loss")
  assert sorted(loss_one) == sorted(loss_two) == list(range(1, steps + 1)), (loss_one, loss_two)
  loss_diff = max(abs(loss_one[s] - loss_two[s]) for s in loss_one)
  metric_diff = {k: abs(one["metrics"][k] - results[0]["metrics"][k]) for k in one["metrics"]}
  print("losses, 1 process:", loss_one, "\n        2 processes:", loss_two)
  print(f"max abs loss difference {loss_diff:.3g}; final metrics differences {metric_diff}")
  assert loss_diff < 1e-5
  assert metric_diff["loss"] < 1e-5 and metric_diff["grad_norm"] < 1e-5 and metric_diff["masked"] == 0

  # The two processes' checkpoint, restored here (one process) into the one-process run's state.
  ckpts = checkpoints.TrainCheckpoints(tmp_path / "two" / "checkpoints")
  try:
    assert ckpts.latest_step() == steps
    state, meta = ckpts.restore(one["state"])
  finally:
    ckpts.close()
  assert meta["step"] == steps and int(state["step"]) == steps
  as_np = lambda t: jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x), t)
  ours, theirs = as_np(one["state"]), as_np(state)
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
  param_diff = max(jax.tree.leaves(jax.tree.map(diff, ours["params"], theirs["params"])))
  opt_diff = max(jax.tree.leaves(jax.tree.map(diff, ours["opt_state"], theirs["opt_state"])))
  print(f"max abs difference after {steps} steps: params {param_diff:.3g}, optimizer state {opt_diff:.3g}")
  assert param_diff < 1e-5 and opt_diff < 1e-5
  for a, b in zip(jax.tree.leaves(ours["rest"]), jax.tree.leaves(theirs["rest"])):
    np.testing.assert_array_equal(a, b)  # the RNG streams


def test_a_sigterm_to_one_process_stops_every_process_after_the_same_step_and_the_rerun_resumes(tmp_path,
                                                                                               tokenizer_file):
  """A preemption notice reaches the hosts of a pod at different moments, some hosts none. Every process must
  stop after the same step, or the one that stopped waits in its checkpoint's collective save for the others
  while they wait in the next step for it. Here SIGTERM goes to process 0 alone, after the first checkpoint
  (progress, not seconds): both processes exit 0 after the same step, well before the end, with that step's
  checkpoint; a rerun of the two on the same workdir resumes there and ends where one uninterrupted process does
  (the tolerance of the test above). Before, jax.distributed's own SIGTERM notifier took the signal and the loop
  never heard of it: the processes ran on, as if no notice had come, until killed."""
  steps = 60
  config = tiny_config(tokenizer_file, mesh={"data": 8}, total_steps=steps, log_every=2, ckpt_every=4)
  config.model.overrides = {"drop_path_rate": 0.0}
  workdir = tmp_path / "two"
  two = Processes(config, workdir, num_processes=2, devices_per_process=4)
  try:
    while not saved_steps(workdir):
      assert all(p.poll() is None for p in two.procs) and time.time() < two.deadline, two.tails()
      time.sleep(0.05)
    two.procs[0].send_signal(signal.SIGTERM)
    stopped = two.results()
  finally:
    two.kill()
  ends = [r["step"] for r in stopped]
  print(f"SIGTERM to process 0 after checkpoint {min(saved_steps(workdir))}: the processes ended at steps {ends}; "
        f"checkpoints {sorted(saved_steps(workdir))}")
  assert ends[0] == ends[1] < steps and ends[0] in saved_steps(workdir), (ends, saved_steps(workdir), two.tails())

  rerun = Processes(config, workdir, num_processes=2, devices_per_process=4)
  try:
    one = pretrain.train_and_evaluate(config, tmp_path / "one")
    resumed = rerun.results()
  finally:
    rerun.kill()
  assert [r["step"] for r in resumed] == [steps, steps], resumed
  diff = {k: abs(one["metrics"][k] - resumed[0]["metrics"][k]) for k in ("loss", "grad_norm")}
  print(f"resumed from step {ends[0]} to {steps}; final metrics against one uninterrupted process: {diff}")
  assert diff["loss"] < 1e-5 and diff["grad_norm"] < 1e-5, (one["metrics"], resumed[0]["metrics"])


def test_global_batch_is_the_same_examples_for_any_process_count():
  """What makes the runs above agree: at every step, the host batches of 2 processes (strided shards of the
  epoch's order) together hold the same examples, with the same augmentations and masks, as the one batch of
  one process; across an epoch boundary and from a resumed step too."""
  from beit_jax.data import pipelines, sources  # pylint: disable=import-outside-toplevel
  source = sources.get_source("fashion_mnist_files", "train[:72]")  # 4 steps of 16 per epoch, 8 left out
  transform = pipelines.pretrain_transform(seed=0, image_size=32, tokenizer_size=32)
  masks = pipelines.MaskSpec(grid=(2, 2), num_masked=2, min_block=1)

  def batches(count, start_step, n):
    its = [pipelines.train_batches(source, transform, host_batch=16 // count, seed=0, start_step=start_step,
                                   shard=pipelines.Shard(i, count), masks=masks) for i in range(count)]
    for _ in range(n):
      parts = [next(it) for it in its]
      yield {k: np.concatenate([p[k] for p in parts]) for k in ("index", "image", "mask", "epoch")}

  for start, n in ((0, 6), (5, 1)):  # across the epoch boundary; resumed inside the second epoch
    for step, (a, b) in enumerate(zip(batches(1, start, n), batches(2, start, n)), start):
      assert sorted(a["index"]) == sorted(b["index"]), (step, a["index"], b["index"])
      order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
      for k in ("image", "mask", "epoch"):
        np.testing.assert_array_equal(a[k][order_a], b[k][order_b])
      assert set(a["epoch"]) == {step // 4}
