"""The measuring harness of benchmarks/train_step.py: one protocol for every step and both frameworks.

It knows nothing of the steps: a step is built by its builders in benchmarks/steps/ (ours: the trainer's jitted
step, its state and inputs; the peer: a loss function, its parameters and optimizer), and this file compiles and
times it, reads its FLOPs and memory, runs each (framework, step) in its own subprocess and prints the table.
Importing it imports neither jax nor torch (the parent process must stay small: a child's ru_maxrss starts from
its parent's); the workers import them inside the functions that need them.
"""
# pylint: disable=import-outside-toplevel
from __future__ import annotations

import collections
import dataclasses
import datetime
import glob
import gzip
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional


class OursStep(NamedTuple):
  """What an `ours` builder returns: the trainer's jitted step `fn(state, batch, frozen) -> (state, metrics)`
  (every mode's signature; `frozen` the tokenizer, perceptual network or None) and its arguments."""
  fn: Any
  state: Any
  batch: Any
  frozen: Any = None


def synthetic_batch(spec: dict, mesh, *, given: Optional[dict] = None, unit: tuple[str, ...] = (),
                    high: Optional[dict] = None, seed: int = 0) -> dict:
  """A global batch of the trainer's own `batch_spec` (key -> (shape, dtype)) on `mesh`'s data axes, so the
  benchmark steps what the trainer steps: floats standard normal (normalised images) or, for the keys in `unit`,
  uniform in [0, 1) (the tokenizers' views), uint8 pixels in [0, 255], integers in [0, high[key]), and the arrays
  in `given` (what needs its own generator, e.g. blockwise masks), each checked against the spec."""
  import jax
  import numpy as np
  from beit_jax.train import sharding

  given, high, rng = dict(given or {}), dict(high or {}), np.random.default_rng(seed)
  unknown = (set(given) | set(unit) | set(high)) - set(spec)
  if unknown:
    raise ValueError(f"keys {sorted(unknown)} are not in the trainer's batch spec {sorted(spec)}")
  host = {}
  for key, (shape, dtype) in spec.items():
    dtype = np.dtype(dtype)
    if key in given:
      x = np.asarray(given[key])
      if x.shape != tuple(shape) or x.dtype != dtype:
        raise ValueError(f"batch[{key!r}]: {x.shape} {x.dtype}, the trainer's spec says {tuple(shape)} {dtype}")
    elif np.issubdtype(dtype, np.floating):
      x = rng.uniform(size=shape) if key in unit else rng.standard_normal(shape)
    elif dtype == np.uint8 and key not in high:  # uint8 views (data.uint8): pixels
      x = rng.integers(0, 256, shape)
    elif np.issubdtype(dtype, np.integer):
      if key not in high:
        raise ValueError(f"batch[{key!r}] is {dtype}: say its range (high={{{key!r}: n}}) or give it")
      x = rng.integers(0, high[key], shape)
    else:
      raise ValueError(f"batch[{key!r}] is {dtype}: give it (given={{{key!r}: ...}})")
    host[key] = x.astype(dtype)
  return jax.device_put(host, sharding.batch_sharding(mesh))


class PeerStep(NamedTuple):
  """What a `peer` builder returns. A step is zero_grad, `loss_fn()` (forward and loss), backward, the
  gradient-norm clip when `clip` is set, `opt.step()`: the same loop for every peer."""
  loss_fn: Callable[[], Any]
  opt: Any
  params: list
  clip: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Torch:
  """What every PyTorch peer builds with, set up once by `run_torch` so that all peers get the same settings."""
  torch: Any
  F: Any  # torch.nn.functional
  timm: Any
  dev: Any
  gpu: bool
  rng: Any  # numpy Generator seeded 0: the synthetic batch
  compile: Callable  # torch.compile under --torch_compile=on, else the module itself
  autocast: Callable  # a context: bf16 autocast under --dtype=bfloat16, else nothing

  def adamw(self, params, optim):
    """torch's AdamW with the recipe's `config.optim` (lr, betas, eps, weight decay); fused on GPU."""
    return self.torch.optim.AdamW(params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=self.gpu)


def num_cores() -> int:
  return len(os.sched_getaffinity(0))


# -- machine info (no jax/torch import: versions from package metadata) ---------------------------------------
def machine_info(device: str) -> dict:
  cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  field = lambda name: (re.findall(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.M) or [platform.processor()])[0]
  flags = set(field("flags").split())
  meminfo = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else ""
  mem_kb = re.search(r"MemTotal:\s+(\d+)", meminfo)
  gpu = None
  if device == "gpu":
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.strip()

  def version(pkg):
    try:
      return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(), "gpu": gpu,
      "cpu": f"{field('model name')} (family {field('cpu family')}, model {field('model')})",
      "cpu_isa": " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags),
      "cores": num_cores(),
      "mem_gib": round(int(mem_kb.group(1)) / 2**20, 1) if mem_kb else None,
      "load_avg_1m": round(os.getloadavg()[0], 2),  # > 0 means something else was running
      "python": platform.python_version(),
      **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "timm")},
  }


# -- timing and memory, the same protocol for both frameworks -------------------------------------------------
def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark (Linux >= 4.0) so a later peak covers only what follows."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure(step, args, batch: int) -> dict:
  """A first call (the compile where there is one, timed alone), the rest of the warm-up, then the timed
  steps. `step()` must return only when the step's work is done (it blocks on the device)."""
  t0 = time.perf_counter()
  first_loss = float(step())
  first_step_s = time.perf_counter() - t0
  for _ in range(max(args.warmup - 1, 0)):
    step()
  before = peak_rss_mib()
  reset_ok = reset_peak_rss()
  times = []
  for _ in range(args.timed):
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    times.append((time.perf_counter() - w0, time.process_time() - c0))
  wall = [w for w, _ in times]
  median = statistics.median(wall)
  step_peak = peak_rss_mib() if reset_ok else None
  return {"first_step_s": first_step_s, "first_loss": first_loss, "step_s_median": median, "step_s_min": min(wall),
          "step_s_max": max(wall), "images_per_s": batch / median, "step_s_all": wall,
          "cpu_s_median": statistics.median(c for _, c in times),
          "peak_rss_mib": max(before, step_peak or 0.0), "step_peak_rss_mib": step_peak}


def _op_kind(name: str) -> str:
  """An XLA op's kind: its HLO name without the instruction number (`copy_bitcast_fusion.36` ->
  `copy_bitcast_fusion`), so the 40 transposes of one kind add up to one line."""
  return re.sub(r"(\.\d+)+$", "", name)


def profile_ops(framework: str, step, n: int, top: int = 12) -> list[tuple[str, float, int]]:
  """`n` more steps under the framework's profiler: the `top` op kinds by time, as (kind, ms per step, ops per
  step). CPU only (on a GPU, xprof or nsys see the kernels). Ours: the XLA ops of the jax.profiler trace (thread
  pool events, the runtime's `ThunkExecutor::...` spans and Python frames are left out: they contain the ops);
  the peer: torch.profiler's self CPU time per aten op. Both add every op's time, on whichever thread it ran."""
  totals, counts = collections.Counter(), collections.Counter()
  if framework == "jax":
    import jax
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(n):
          step()
      [trace] = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
      with gzip.open(trace) as f:
        events = json.load(f)
    for e in events["traceEvents"] if isinstance(events, dict) else events:
      name = e.get("name", "")
      if e.get("ph") == "X" and "dur" in e and not name.startswith("$") and "::" not in name and "(" not in name:
        kind = _op_kind(name)
        totals[kind] += e["dur"] / 1e3
        counts[kind] += 1
  else:
    import torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      for _ in range(n):
        step()
    for a in prof.key_averages():
      if a.self_cpu_time_total > 0 and a.key.startswith("aten::"):
        totals[a.key] += a.self_cpu_time_total / 1e3
        counts[a.key] += a.count
  return [(k, v / n, counts[k] // n) for k, v in totals.most_common(top)]


def matmul_peak_tflops(dtype: str, gpu: bool) -> float:
  """What one large matmul reaches here: the MFU denominator measured in the same run (on an H100 a bf16
  8192^3 product runs at ~790 TFLOP/s, the figure the targets use)."""
  import jax
  import jax.numpy as jnp
  n = 8192 if gpu else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  reps = 20 if gpu else 3
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


# -- the two workers ------------------------------------------------------------------------------------------
def run_jax(args, step_name: str, build, batch: int) -> dict:
  """Ours: `build(args, batch, mesh) -> OursStep`, compiled ahead of time (the compile timed alone), then
  measured; the FLOPs of the compiled step are the model work that MFU divides for both frameworks."""
  import jax
  from beit_jax.train import sharding

  gpu = jax.default_backend() == "gpu"
  if gpu != (args.device == "gpu"):
    raise SystemExit(f"--device={args.device} but JAX runs on {jax.default_backend()}")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices())
  step_fn, state, batch_, frozen = build(args, batch, mesh)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, batch_, frozen).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def step():
    holder["state"], out = compiled(holder["state"], batch_, frozen)
    # Block on the whole new state, not just the loss: the update would otherwise overlap the next timing.
    jax.block_until_ready((holder["state"], out))
    return out["loss"] if "loss" in out else out["nll"]  # the tokenizer's trainer reports nll, not loss

  result = {"framework": "jax", "step": step_name, "batch": batch, "dtype": args.dtype, "compile_s": compile_s,
            **measure(step, args, batch)}
  if args.profile:
    result["ops"] = profile_ops("jax", step, args.profile)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  result.update(
      step_flops=float(cost["flops"]) if cost and cost.get("flops") else None,
      xla_memory_mib={k: getattr(mem, f"{k}_size_in_bytes") / 2**20 for k in ("argument", "output", "alias", "temp")}
      if mem is not None else None,
      peak_tflops=args.peak_tflops or matmul_peak_tflops(args.dtype, gpu),
      remat=args.remat, attention=args.attention, xla_flags=os.environ.get("XLA_FLAGS", ""),
      devices=str(jax.devices()))
  if gpu:
    stats = jax.devices()[0].memory_stats() or {}
    result["device_peak_mib"] = stats.get("peak_bytes_in_use", 0) / 2**20 or None
  return result


def run_torch(args, step_name: str, build, batch: int) -> dict:
  """The peer: `build(args, batch, Torch) -> PeerStep`, stepped by the one loop below and measured."""
  import contextlib
  import numpy as np
  import torch
  import torch.nn.functional as F
  from beit_jax.convert.timm_compat import import_timm

  gpu = args.device == "gpu"
  if gpu and not torch.cuda.is_available():
    raise SystemExit("--device=gpu but torch sees no CUDA device")
  dev = torch.device("cuda" if gpu else "cpu")
  if not gpu:
    torch.set_num_threads(num_cores())
  torch.manual_seed(0)
  torch.backends.cuda.matmul.allow_tf32 = True  # XLA's GPU default for f32 dots is TF32 too
  torch.backends.cudnn.allow_tf32 = True
  env = Torch(
      torch=torch, F=F, dev=dev, gpu=gpu, rng=np.random.default_rng(0),
      timm=import_timm(),  # plain `import timm` fails next to the CPU torch wheel; see timm_compat
      compile=(lambda m: torch.compile(m)) if args.torch_compile == "on" else (lambda m: m),
      autocast=((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.dtype == "bfloat16"
                else contextlib.nullcontext))
  loss_fn, opt, params, clip = build(args, batch, env)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if gpu:
      torch.cuda.synchronize()
    return loss.detach().item()

  if gpu:
    torch.cuda.reset_peak_memory_stats()
  result = {"framework": "torch", "step": step_name, "batch": batch, "dtype": args.dtype, "compile_s": None,
            "torch_compile": args.torch_compile, **measure(step, args, batch)}
  if args.profile:
    result["ops"] = profile_ops("torch", step, args.profile)
  if gpu:
    result["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
  return result



# -- parent: one subprocess per (framework, step), then the table ---------------------------------------------
def run_worker(script: str, framework: str, step_name: str, argv: list[str], args) -> dict:
  """`script` (the CLI) re-run with --worker=FRAMEWORK:STEP in a fresh process; its result back as a dict."""
  env = dict(os.environ)
  if framework == "jax" and args.xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()  # read once, at backend start
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    result_file = f.name
  try:
    cmd = [sys.executable, os.path.abspath(script), *argv, f"--worker={framework}:{step_name}",
           f"--result_file={result_file}"]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
      return {"framework": framework, "step": step_name, "error": f"worker exited with status {proc.returncode}"}
    with open(result_file) as f:
      return json.load(f)
  finally:
    os.unlink(result_file)


def median_rounds(results: list[dict]) -> list[dict]:
  """One result per (step, framework) from --rounds runs of each: the round whose images/s is the median (the
  lower of the middle two for an even count), carrying every round's images/s in `rounds_images_per_s`. A
  failed round makes the whole entry that failure."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for r in results:
    groups.setdefault((r["step"], r["framework"]), []).append(r)
  out = []
  for runs in groups.values():
    failed = [r for r in runs if "error" in r]
    if failed:
      out.append(failed[0])
      continue
    ranked = sorted(runs, key=lambda r: r["images_per_s"])
    out.append({**ranked[(len(ranked) - 1) // 2], "rounds_images_per_s": [r["images_per_s"] for r in runs]})
  return out


def _fmt(value, spec):
  width = re.match(r"\d*", spec).group()
  return f"{'-':>{width or 1}}" if value is None else format(value, spec)


def print_report(info: dict, args, results: list[dict]):
  rounds = f" x {args.rounds} rounds (the median round shown)" if args.rounds > 1 else ""
  print(f"\n{args.model} / {args.tokenizer}, {args.dtype}, {args.timed} timed steps{rounds} after {args.warmup} warm-up, "
        f"torch.compile {args.torch_compile}, ours: remat={args.remat} attention={args.attention}")
  print("  " + ", ".join(f"{k}={v}" for k, v in info.items() if v is not None))
  mem = "peak GPU MiB" if args.device == "gpu" else "step RSS MiB"
  print(f"  {'step':<14}{'framework':<10}{'batch':>6}{'img/s':>9}{'step s':>9}{'cpu s':>8}{'first s':>9}"
        f"{'TFLOP/s':>9}{'MFU %':>7}{mem:>14}")
  for step_name in args.steps:
    rows = {r["framework"]: r for r in results if r["step"] == step_name}
    flops = (rows.get("jax") or {}).get("step_flops")
    peak = (rows.get("jax") or {}).get("peak_tflops") or args.peak_tflops or None
    for name, r in rows.items():
      if "error" in r:
        print(f"  {step_name:<14}{name:<10}{r['error']}")
        continue
      tflops = flops / r["step_s_median"] / 1e12 if flops else None
      mfu = 100 * tflops / peak if tflops and peak else None
      memv = r.get("device_peak_mib") if args.device == "gpu" else r.get("step_peak_rss_mib")
      print(f"  {step_name:<14}{name:<10}{r['batch']:6d}{r['images_per_s']:9.2f}{r['step_s_median']:9.3f}"
            f"{r['cpu_s_median']:8.2f}{r['first_step_s']:9.1f}{_fmt(tflops, '9.3f')}{_fmt(mfu, '7.1f')}"
            f"{_fmt(memv, '14.0f')}")
    ours, peer = rows.get("jax", {}), rows.get("torch", {})
    if "images_per_s" in ours:
      x = ours.get("xla_memory_mib") or {}
      print(f"  {'':<14}jax: compile {ours['compile_s']:.1f} s, {_fmt(flops and flops / 1e9, '.1f')} GFLOP/step "
            f"(XLA), peak {ours['peak_tflops']:.3f} TFLOP/s (matmul here), XLA memory "
            + ", ".join(f"{k} {v:.0f}" for k, v in x.items()) + " MiB")
    if "images_per_s" in ours and "images_per_s" in peer:
      print(f"  {'':<14}ours / peer: {ours['images_per_s'] / peer['images_per_s']:.2f}x images/s")
      mine, theirs = ours.get("rounds_images_per_s", []), peer.get("rounds_images_per_s", [])
      if len(mine) > 1:
        ratios = sorted(a / b for a, b in zip(mine, theirs))
        print(f"  {'':<14}per round (each side run back to back): "
              + " ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(mine, theirs))
              + f" img/s; ratios {ratios[0]:.2f}-{ratios[-1]:.2f}x, median {statistics.median(ratios):.2f}x")
    for name, r in rows.items():
      if r.get("ops"):
        print(f"  {'':<14}{name}: op time per step under the profiler (--profile {args.profile}), by kind:")
        for kind, ms, count in r["ops"]:
          print(f"  {'':<16}{ms:9.2f} ms  x{count:<5d} {kind}")


def write_json(path: str, info: dict, args, results: list[dict]):
  with open(path, "w") as f:
    json.dump({"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
               "results": results}, f, indent=1)
