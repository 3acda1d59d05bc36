r"""Training-step throughput and peak memory: beit_jax vs timm's BEiT, measured in the same run.

  python benchmarks/model_step.py                                  # both frameworks, batch 8, f32
  python benchmarks/model_step.py --dtype=bfloat16 --torch_dtype=bfloat16 --json=/tmp/step.json
  python benchmarks/model_step.py --frameworks=jax --xla_flags="--xla_cpu_enable_fast_math=true"
  python benchmarks/model_step.py --jax_patch=grad_barrier,bias_grad_dot,einsum_attention
  taskset -c 1 python benchmarks/model_step.py --steps=3 --warmup=1  # one core: compare the 'cpu s' column

One step is the same in both frameworks: forward on a fixed random batch, softmax cross-entropy against
random labels, backward, AdamW update (lr 1e-4, weight decay 0.05, optax.adamw / torch.optim.AdamW), train
mode with stochastic depth off (drop_path_rate=0, so no RNG work either side). For beit_jax the step is one
`jax.jit` function over the `nnx.split` state with params and optimizer state donated; the compile is timed
separately. Throughput is batch / median step time over --steps timed steps after --warmup untimed ones.

Each framework runs in its own subprocess (this file with --worker=...), so that neither's libraries, thread
pools or allocations pollute the other's timings and peak RSS; the parent imports neither jax nor torch
(a child's ru_maxrss starts from its parent's at exec, so the parent must stay small). Two memory figures:
  peak RSS        the whole process (getrusage ru_maxrss), i.e. including model init and XLA's compile;
  step peak RSS   the high-water mark over the timed steps only (/proc/self/clear_refs reset first),
                  which is what training itself holds.
For JAX also the compiled step's own memory_analysis() (arguments, outputs, temporaries) is printed.

Timing on a shared machine: besides wall time, `cpu s` is the process's CPU time per step. Pinned to one
core (taskset), that is the work of a step and hardly moves when other processes compete for the core, so
it is the figure to compare between runs on a busy machine. `--jax_patch` applies the experimental model
variants of model_step_variants.py. benchmarks/NOTES_model_step.md has the measurements and why the JAX
step is slower on CPU.
"""
from __future__ import annotations

import argparse
import datetime
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

_LR, _WD = 1e-4, 0.05
_NUM_CLASSES = 1000


# -- flags ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="beit_base_patch16_224", help="beit_jax registry / timm model name")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="beit_jax compute dtype (params stay f32)")
  p.add_argument("--torch_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="timm compute dtype; bfloat16 = torch.autocast('cpu'), the counterpart of --dtype")
  p.add_argument("--frameworks", default="jax,torch", help="comma-separated subset of jax,torch")
  p.add_argument("--xla_flags", default="", help="appended to XLA_FLAGS in the JAX subprocess")
  p.add_argument("--jax_config", default="", help="comma-separated jax.config name=value, e.g. "
                 "jax_default_matmul_precision=bfloat16")
  p.add_argument("--jax_patch", default="", help="comma-separated experimental model patches from "
                 "model_step_variants.py (e.g. grad_barrier), applied in the JAX subprocess only")
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = the usable cores")
  p.add_argument("--json", default="", help="also write the results here")
  p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)  # internal: run one framework
  p.add_argument("--result_file", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
  bad = sorted(set(args.frameworks) - {"jax", "torch"})
  if bad:
    p.error(f"unknown --frameworks {bad}")
  return args


def num_cores() -> int:
  """Cores this process may run on (affinity / cgroup cpusets), not the host's count."""
  return len(os.sched_getaffinity(0))


# -- machine info (no jax/torch import: versions come from package metadata) ----------------------------------
def machine_info() -> dict:
  cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
  field = lambda name: (re.findall(rf"^{name}\s*:\s*(.*)$", cpuinfo, re.M) or [platform.processor()])[0]
  flags = set(field("flags").split())
  meminfo = open("/proc/meminfo").read() if os.path.exists("/proc/meminfo") else ""
  mem_kb = re.search(r"MemTotal:\s+(\d+)", meminfo)

  def version(pkg):
    try:
      return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      return None

  return {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "host": platform.node(),
      # "AMD EPYC" alone does not say the generation; family/model do (25/17 = Zen 4 Genoa).
      "cpu": f"{field('model name')} (family {field('cpu family')}, model {field('model')})",
      "cpu_isa": " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags),
      "cores": num_cores(),
      "mem_gib": round(int(mem_kb.group(1)) / 2**20, 1) if mem_kb else None,
      "load_avg_1m": round(os.getloadavg()[0], 2),  # > 0 means something else was running
      "python": platform.python_version(),
      **{pkg: version(pkg) for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "timm")},
  }


# -- memory ---------------------------------------------------------------------------------------------------
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


def step_times_summary(times: list[tuple[float, float]], batch: int) -> dict:
  wall = [w for w, _ in times]
  median = statistics.median(wall)
  return {"step_s_median": median, "step_s_min": min(wall), "step_s_max": max(wall),
          "images_per_s": batch / median, "step_s_all": wall,
          # CPU seconds of this process per step: about cores x wall when every core is busy, and less
          # inflated than wall time when another process competes for the cores.
          "cpu_s_median": statistics.median(c for _, c in times)}


def timed_loop(step, steps: int) -> list[tuple[float, float]]:
  """(wall, process CPU) seconds of each call."""
  times = []
  for _ in range(steps):
    w0, c0 = time.perf_counter(), time.process_time()
    step()
    times.append((time.perf_counter() - w0, time.process_time() - c0))
  return times


def measure(step, args) -> dict:
  """The same protocol for both frameworks: a first call (timed on its own), the rest of the warm-up, then
  `args.steps` timed steps with the peak RSS of the timed steps measured separately."""
  t0 = time.perf_counter()
  first_loss = float(step())
  first_step_s = time.perf_counter() - t0
  timed_loop(step, max(args.warmup - 1, 0))
  peak_before_steps = peak_rss_mib()
  reset_ok = reset_peak_rss()
  times = timed_loop(step, args.steps)
  step_peak = peak_rss_mib() if reset_ok else None
  return {"first_step_s": first_step_s, "first_loss": first_loss, **step_times_summary(times, args.batch),
          "peak_rss_mib": max(peak_before_steps, step_peak or 0.0), "step_peak_rss_mib": step_peak}


# -- beit_jax -------------------------------------------------------------------------------------------------
def apply_jax_config(spec: str):
  import jax  # pylint: disable=import-outside-toplevel
  for item in filter(None, spec.split(",")):
    name, value = item.split("=", 1)
    value = {"true": True, "false": False}.get(value.lower(), value)
    jax.config.update(name.strip(), value)


def make_jax_step(graphdef, tx):
  """The whole training step as one pure function of (params, opt_state, rest, images, labels)."""
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  def step(params, opt_state, rest, images, labels):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p, rest)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Donating params and optimizer state lets XLA update them in place, as torch's optimizer does.
  return jax.jit(step, donate_argnums=(0, 1))


def memory_analysis(compiled) -> dict | None:
  """Sizes XLA planned for the compiled step (MiB), where the backend reports them."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if stats is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f.replace("_in_bytes", "_mib"): getattr(stats, f) / 2**20 for f in fields if hasattr(stats, f)}


def step_flops(compiled) -> float | None:
  """XLA's flop count of the step; the same model in both frameworks, so it also rates timm's speed."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None
  except Exception:  # pylint: disable=broad-except
    return None


def run_jax(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from beit_jax import models  # pylint: disable=import-outside-toplevel

  apply_jax_config(args.jax_config)
  if args.jax_patch:
    import model_step_variants  # pylint: disable=import-outside-toplevel  # next to this file
    model_step_variants.apply(args.jax_patch)
  model = models.create_model(args.model, num_classes=_NUM_CLASSES, dtype=args.dtype, drop_path_rate=0.0)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  del model  # shares its arrays with `params`, which the step donates: the module is unusable from here
  num_params = sum(x.size for x in jax.tree.leaves(params))
  tx = optax.adamw(_LR, weight_decay=_WD)
  opt_state = tx.init(params)
  size = models.get_config(args.model).img_size
  k_img, k_lab = jax.random.split(jax.random.key(0))
  images = jax.random.normal(k_img, (args.batch, size, size, 3), jnp.float32)
  labels = jax.random.randint(k_lab, (args.batch,), 0, _NUM_CLASSES)

  t0 = time.perf_counter()
  lowered = make_jax_step(graphdef, tx).lower(params, opt_state, rest, images, labels)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  state = {"params": params, "opt_state": opt_state}
  def step():
    state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], rest, images,
                                                         labels)
    # Block on everything the step produced, not just the loss: the update would otherwise overlap the
    # next step's timing.
    jax.block_until_ready((state["params"], state["opt_state"], loss))
    return loss

  return {
      "framework": "jax", "dtype": args.dtype, "num_params": int(num_params), "compile_s": compile_s,
      **measure(step, args),
      "xla_memory": memory_analysis(compiled), "step_flops": step_flops(compiled),
      "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_config": args.jax_config,
      "jax_patch": args.jax_patch,
      "devices": str(jax.devices()),
  }


# -- timm -----------------------------------------------------------------------------------------------------
def run_torch(args) -> dict:
  import contextlib  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  from beit_jax.convert.timm_compat import import_timm  # pylint: disable=import-outside-toplevel

  threads = args.threads or num_cores()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  timm = import_timm()  # plain `import timm` fails next to the CPU torch wheel; see timm_compat
  model = timm.create_model(args.model, pretrained=False, num_classes=_NUM_CLASSES, drop_path_rate=0.0)
  model.train()
  num_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.AdamW(model.parameters(), lr=_LR, weight_decay=_WD)
  size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
  images = torch.randn(args.batch, 3, size, size)  # NCHW
  labels = torch.randint(0, _NUM_CLASSES, (args.batch,))

  def autocast():
    if args.torch_dtype == "bfloat16":
      return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()

  def step():
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    opt.step()
    return loss.detach()  # CPU torch is synchronous: the step is done when this returns

  # The first call allocates AdamW's moments: torch's counterpart of JAX's first call.
  return {
      "framework": "torch", "dtype": args.torch_dtype, "num_params": int(num_params), "compile_s": None,
      **measure(step, args),
      "threads": threads, "sdpa_fused_attn": getattr(model.blocks[0].attn, "fused_attn", None),
  }


# -- parent: one subprocess per framework, then the table -----------------------------------------------------
def run_worker(framework: str, argv: list[str], args) -> dict:
  env = dict(os.environ)
  if framework == "jax" and args.xla_flags:
    # XLA reads XLA_FLAGS once, when the backend starts; set it before the child imports jax.
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    result_file = f.name
  try:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--worker={framework}",
           f"--result_file={result_file}"]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
      return {"framework": framework, "error": f"worker exited with status {proc.returncode}"}
    with open(result_file) as f:
      return json.load(f)
  finally:
    os.unlink(result_file)


def _fmt(value, spec):
  width = re.match(r"\d*", spec).group()
  return f"{'-':>{width or 1}}" if value is None else format(value, spec)


def print_report(info: dict, args, results: dict[str, dict]):
  print(f"\n{args.model}, batch {args.batch}, {args.steps} timed steps after {args.warmup} warmup, AdamW")
  print("  " + ", ".join(f"{k}={v}" for k, v in info.items()))
  header = (f"  {'framework':<10}{'dtype':<10}{'img/s':>8}{'step s':>9}{'min s':>8}{'max s':>8}{'cpu s':>8}"
            f"{'compile s':>11}{'peak RSS MiB':>14}{'step peak':>11}{'GFLOP/s':>9}")
  print(header)
  flops = (results.get("jax") or {}).get("step_flops")
  for name, r in results.items():
    if "error" in r:
      print(f"  {name:<10}{r['error']}")
      continue
    gflops = flops / r["step_s_median"] / 1e9 if flops else None
    print(f"  {name:<10}{r['dtype']:<10}{r['images_per_s']:8.2f}{r['step_s_median']:9.3f}{r['step_s_min']:8.3f}"
          f"{r['step_s_max']:8.3f}{r['cpu_s_median']:8.2f}{_fmt(r['compile_s'], '11.1f')}{r['peak_rss_mib']:14.0f}"
          f"{_fmt(r['step_peak_rss_mib'], '11.0f')}{_fmt(gflops, '9.1f')}")
  jax_r, torch_r = results.get("jax", {}), results.get("torch", {})
  if jax_r.get("xla_memory"):
    print("  jax compiled step: " + ", ".join(f"{k}={v:.0f}" for k, v in jax_r["xla_memory"].items()))
  for key in ("xla_flags", "jax_config", "jax_patch"):
    if jax_r.get(key):
      print(f"  jax {key}: {jax_r[key]}")
  if "images_per_s" in jax_r and "images_per_s" in torch_r:
    print(f"  beit_jax / timm: throughput {jax_r['images_per_s'] / torch_r['images_per_s']:.2f}x, "
          f"step peak RSS {_fmt(_ratio(jax_r['step_peak_rss_mib'], torch_r['step_peak_rss_mib']), '.2f')}x, "
          f"peak RSS {jax_r['peak_rss_mib'] / torch_r['peak_rss_mib']:.2f}x")


def _ratio(a, b):
  return a / b if a is not None and b else None


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    result = (run_jax if args.worker == "jax" else run_torch)(args)
    with open(args.result_file, "w") as f:
      json.dump(result, f)
    return 0
  info = machine_info()
  results = {fw: run_worker(fw, argv, args) for fw in args.frameworks}
  print_report(info, args, results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "result_file")},
                 "results": results}, f, indent=1)
  return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
