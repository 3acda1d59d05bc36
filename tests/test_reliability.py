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
from test_pretrain import params_np, run_code, saved_steps


def start(tokenizer_file, workdir, total_steps=12, ckpt_every=2):
  code = run_code(tokenizer_file, workdir, total_steps=total_steps, ckpt_every=ckpt_every)
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


def test_a_checkpoint_in_the_earlier_qkv_layout_resumes_bitwise(tmp_path, tokenizer_file):
  """Until 2026-12-07 the qkv kernel was saved [D, 3, H, Dh], and so were its AdamW moments: a run checkpointed
  then resumes in today's [3, D, H, Dh] (checkpoints.TrainCheckpoints._restore_step) and ends bitwise where an
  uninterrupted run does. On an fsdp mesh, so that the stored layout must be read in its own sharding."""
  config = lambda: tiny_config(tokenizer_file, total_steps=8, ckpt_every=4, mesh={"data": 4, "fsdp": 2})
  ref = pretrain.train_and_evaluate(config(), tmp_path / "ref")
  ckpts = checkpoints.TrainCheckpoints(tmp_path / "ref" / "checkpoints")
  state, meta = ckpts.restore(ref["state"], step=4)
  ckpts.close()
  moved = []

  def earlier_layout(keys, x):
    if "'qkv'" not in jax.tree_util.keystr(keys):
      return x
    moved.append(jax.tree_util.keystr(keys))
    return jax.numpy.moveaxis(x, 0, 1)

  old = checkpoints.TrainCheckpoints(tmp_path / "old" / "checkpoints")
  old.save(4, jax.tree_util.tree_map_with_path(earlier_layout, state), meta)
  old.close()
  depth = len(ref["state"]["params"]["blocks"])
  assert len(moved) == 3 * depth, moved  # the kernels and both moments of each block
  resumed = pretrain.train_and_evaluate(config(), tmp_path / "old")
  assert sorted(saved_steps(tmp_path / "old")) == [4, 8]
  assert_bitwise_equal(ref, resumed)
  assert resumed["state"]["params"]["blocks"][0]["attn"]["qkv"].sharding.spec[1] == "fsdp"
  print(f"{len(moved)} leaves saved in the earlier layout at step 4; resumed; bitwise equal at step 8")


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


def _limit_file_size(limit):
  def preexec():
    import resource  # pylint: disable=import-outside-toplevel
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


def test_a_failed_checkpoint_write_is_a_clear_error_and_the_previous_ones_survive(tmp_path, tokenizer_file):
  """A disk that fills up, as far as a test can make one: the file-size limit (RLIMIT_FSIZE) of a run that
  resumes from checkpoints 2 and 4 is set below the size of a checkpoint's data files, so its writes fail with
  EFBIG. (How orbax splits the state over data files varies from save to save, so the limit is a fixed 16 KiB,
  far below their sizes, and above what the run's other files reach: metrics, the lock, the JSON records.)"""
  workdir = tmp_path / "full"
  pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=4), workdir)
  code = run_code(tokenizer_file, workdir, total_steps=8)
  limit = 16 * 1024
  biggest = max(p.stat().st_size for p in (workdir / "checkpoints" / "4").rglob("*") if p.is_file())
  assert biggest > 4 * limit  # the premise: a checkpoint cannot be written under the limit
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                        preexec_fn=_limit_file_size(limit))
  assert proc.returncode != 0
  assert "CheckpointWriteError" in proc.stderr and f"in {workdir / 'checkpoints'} failed" in proc.stderr, \
      proc.stderr[-3000:]
  assert "intact (steps [2, 4])" in proc.stderr, proc.stderr[-3000:]
  assert sorted(saved_steps(workdir)) == [2, 4]
  # With room again, the same command resumes from step 4 and finishes.
  out = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=8), workdir)
  assert int(out["state"]["step"]) == 8 and 8 in saved_steps(workdir)
  print("writes failed with EFBIG from step 6:", proc.stderr.strip().splitlines()[-1][:300])


def _rss_mib(pid):
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  except OSError:
    return None
  return None


def _run_and_sample(code, workdir, stop_when=None):
  """Runs `code` in a subprocess, sampling its RSS and the newest complete checkpoint in `workdir` every 0.5 s;
  SIGTERM once `stop_when()` is true, if given. Returns [(seconds, rss MiB, newest checkpoint step)]."""
  proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0, samples, stop = time.time(), [], stop_when
  while proc.poll() is None:
    rss = _rss_mib(proc.pid)
    if rss:
      samples.append((time.time() - t0, rss, max(saved_steps(workdir), default=0)))
    if stop is not None and stop():
      proc.send_signal(signal.SIGTERM)
      stop = None
    time.sleep(0.5)
  assert proc.returncode == 0
  return samples


def _after_new_checkpoints(workdir, count: int):
  """True once `count` checkpoints newer than the newest one now have appeared: the run is stepping, however
  slow the machine (a signal sent after a fixed number of seconds can land during start-up on a busy one)."""
  before = max(saved_steps(workdir), default=0)
  return lambda: len([s for s in saved_steps(workdir) if s > before]) >= count


@pytest.mark.slow
def test_soak_thousands_of_steps_with_restarts(tmp_path, tokenizer_file):
  """2,000 tiny steps with a checkpoint every 100. Uninterrupted: host memory (RSS) stays within 5% from steps
  300-500 to steps 1,700-1,900 (the median of each window, placed by the checkpoints seen, so neither start-up
  nor the last save's buffers count, however slow the machine; a per-step leak of even one batch, ~0.4 MB,
  would add ~500 MB). With SIGTERM at 3 random moments
  of the stepping (after 1-4 new checkpoints of each restart) and restarts: the final parameters equal the
  uninterrupted run's bitwise."""
  steps = 2000
  run = lambda workdir: run_code(tokenizer_file, workdir, total_steps=steps, ckpt_every=100, log_every=100)
  ref = tmp_path / "ref"
  samples = _run_and_sample(run(ref), ref)
  # Warm: compiled, with the input pipeline's buffers and orbax's threads in place (after a few saves).
  early = [r for _, r, newest in samples if 300 <= newest < 500]
  late = [r for _, r, newest in samples if 1700 <= newest < 1900]
  assert len(early) >= 3 and len(late) >= 3, (len(early), len(late))
  growth = (np.median(late) - np.median(early)) / np.median(early)
  print(f"uninterrupted {steps} steps in {samples[-1][0]:.0f} s: RSS median {np.median(early):.0f} MiB at steps "
        f"300-500 -> {np.median(late):.0f} MiB at 1700-1900 ({100 * growth:+.1f}%), peak "
        f"{max(r for _, r, _ in samples):.0f} MiB; in {len(samples)} samples")
  assert growth < 0.05

  workdir, rng, stops = tmp_path / "soak", random.Random(1), []
  for _ in range(3):
    _run_and_sample(run(workdir), workdir, stop_when=_after_new_checkpoints(workdir, rng.randint(1, 4)))
    stops.append(max(saved_steps(workdir), default=0))
  assert stops[-1] < steps, stops
  _run_and_sample(run(workdir), workdir)
  print("stopped by SIGTERM 3 times (newest checkpoints:", stops, "), then finished")
  mesh, cfg = sharding_mesh(), tiny_config(tokenizer_file, total_steps=steps)
  like = pretrain.create_state(cfg, pretrain.model_config(cfg, 512), mesh, steps)[1]
  restored = []
  for d in (ref, workdir):
    ckpts = checkpoints.TrainCheckpoints(d / "checkpoints")
    restored.append(ckpts.restore(like)[0])
    ckpts.close()
  assert int(restored[0]["step"]) == int(restored[1]["step"]) == steps
  for x, y in zip(jax.tree.leaves(jax.device_get(restored[0]["params"])),
                  jax.tree.leaves(jax.device_get(restored[1]["params"]))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def sharding_mesh():
  from beit_jax.train import sharding  # pylint: disable=import-outside-toplevel
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


_MAIN_CONFIG = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config


def get_config(arg=""):
  return tiny_config({tok!r}, total_steps=12, ckpt_every=2)
"""


def _entry_point(config_file, workdir):
  """`python -m beit_jax.main` on the tiny pre-training config, stderr read line by line into a list."""
  import os  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.Popen([sys.executable, "-m", "beit_jax.main", f"--config={config_file}", f"--workdir={workdir}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=pathlib.Path(__file__).parent.parent)
  lines = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
  reader.start()
  return proc, lines, reader


def _catches_sigterm(pid) -> bool:
  """Whether the process has a SIGTERM handler now (Linux: the SigCgt mask of /proc/PID/status)."""
  try:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  caught = next(l for l in status.splitlines() if l.startswith("SigCgt:")).split()[1]
  return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def _wait_for(condition, proc, what: str, timeout: float = 600):
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
    assert time.time() < deadline, f"no {what} after {timeout} s"
    time.sleep(0.01)


def test_sigterm_at_start_up_and_in_the_first_compile_exits_0_and_the_rerun_is_bitwise_equal(tmp_path,
                                                                                            tokenizer_file):
  """A preemption notice at any moment of a run of the entry point (issue 22): at start-up (the moment the
  process has a SIGTERM handler, before jax is imported) and while the first step compiles (the loop's
  "compiling" line). Each exits 0, the first with nothing saved (and saying so), the second with the checkpoint
  of the step it was in; no temporary checkpoint or lock is left behind, and each rerun ends bitwise equal to an
  uninterrupted run. The signals follow observed progress, not seconds, so a busy machine cannot break this."""
  ref = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=12, ckpt_every=2), tmp_path / "ref")
  config_file = tmp_path / "tiny_pretrain.py"
  config_file.write_text(_MAIN_CONFIG.format(tests=str(pathlib.Path(__file__).parent), tok=str(tokenizer_file)))
  moments = {"start-up": lambda proc, lines: _catches_sigterm(proc.pid),
             "first compile": lambda proc, lines: any("compiling the step" in l for l in lines)}
  for moment, reached in moments.items():
    workdir = tmp_path / moment.replace(" ", "_")
    proc, lines, reader = _entry_point(config_file, workdir)
    _wait_for(lambda: reached(proc, lines), proc, moment)  # pylint: disable=cell-var-from-loop
    # (Whether jax is loaded yet at "start-up" is not asserted: the process goes on between the poll and any
    # look at /proc/PID/maps, and on a quiet machine it had loaded jaxlib by then.)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    reader.join(timeout=60)
    err = "".join(lines)
    assert proc.returncode == 0, f"{moment}: exit {proc.returncode}\n{err[-3000:]}"
    saved = saved_steps(workdir)
    if moment == "start-up":
      assert "nothing new to save" in err and not saved, (saved, err[-3000:])
    else:
      assert "SIGTERM: stopped after the checkpoint of step" in err and saved and max(saved) < 12, (saved, err[-3000:])
    leftovers = [p.name for p in (workdir / "checkpoints").glob("*") if not p.name.isdigit()] \
        if (workdir / "checkpoints").exists() else []
    assert not [n for n in leftovers if "tmp" in n], leftovers
    resumed = pretrain.train_and_evaluate(tiny_config(tokenizer_file, total_steps=12, ckpt_every=2), workdir)
    assert_bitwise_equal(ref, resumed)
    print(f"SIGTERM at {moment}: exit 0, checkpoints {sorted(saved)}; the rerun is bitwise equal at step 12")


def test_the_host_runs_a_few_steps_ahead_at_most_so_a_sigterm_is_answered_promptly(tmp_path):
  """Dispatch is asynchronous: a loop that only waits on a step at its logs lets the host queue steps as fast as
  it dispatches them (on CPU up to the runtime's 32 in flight), and a SIGTERM answered "after this step" then
  waits for every queued one: up to 7 s in the demo's fine-tuning, minutes on a pod model, past a preemption's
  grace period. Here a real jitted step that takes ~10-30 ms (far longer than its dispatch), no log or
  checkpoint until the end, and the steps not yet finished counted after each dispatch: never more than
  loop.STEPS_AHEAD, 8 (32 on the loop before)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel

  from beit_jax.train import loop, metrics  # pylint: disable=import-outside-toplevel

  @jax.jit
  def slow_step(x):
    for _ in range(60):
      x = jnp.tanh(x @ x)
    return x, {"loss": jnp.mean(x)}

  outputs, unfinished = [], []

  def step_fn(step, state):
    del step
    x, out = slow_step(state["x"])
    outputs.append(out["loss"])
    return {**state, "x": x}, out

  steps = 60
  config = ml_collections.ConfigDict({"log_every": 10 * steps, "ckpt_every": 10 * steps, "batch_size": 1})
  state = {"x": jnp.full((256, 256), 0.01, jnp.float32), "nonfinite_step": jnp.int32(-1)}
  loop.run(config, state, step_fn, start=0, steps=steps, ckpts=checkpoints.TrainCheckpoints(tmp_path / "checkpoints"),
           writer=metrics.create_writer(str(tmp_path)),
           hooks=[lambda step: unfinished.append(sum(not o.is_ready() for o in outputs))],
           meta=lambda step: {"step": step})
  assert len(unfinished) == steps and saved_steps(tmp_path) == [steps], (len(unfinished), saved_steps(tmp_path))
  assert max(unfinished) <= loop.STEPS_AHEAD, unfinished
  print(f"steps not finished after each dispatch: at most {max(unfinished)} (of {steps})")
