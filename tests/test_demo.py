"""The `make demo` chain's own parts (the loops it runs have their own tests): labelled subsets, the config
files it edits, and the pixel floor."""
import collections
import json
import os
import subprocess
import sys

import pytest

from beit_jax import configs
from beit_jax.experiments import miniature


def test_labelled_subsets_are_disjoint_slices_per_seed():
  assert miniature.labelled_split(1.0, 2) == "train"
  splits = [miniature.labelled_split(0.1, s) for s in range(3)]
  assert splits == ["train[0:6000]", "train[6000:12000]", "train[12000:18000]"]
  assert miniature.labelled_split(0.01, 1) == "train[600:1200]"
  with pytest.raises(ValueError, match="exceed the training set"):
    miniature.labelled_split(0.5, 2)



class _Recorder(miniature.Chain):
  """The chain with each stage's config recorded instead of run (every metric 0): what the stages are asked."""

  def __init__(self, workdir, scale):
    super().__init__(workdir, scale)
    self.configs = {}

  def stage(self, name, config):
    self.configs[name] = config
    return collections.defaultdict(float)


def test_every_arm_is_evaluated_on_the_scales_held_out_split(tmp_path):
  """The table compares arms: each of its figures must come from the same held-out images (the demo's half of
  the test split, the full run's whole split), the pixel floor's included."""
  for scale in miniature.SCALES.values():
    chain = _Recorder(str(tmp_path / scale.eval_split), scale)
    model = chain.pretrain("beit", perceptual_from=None)
    chain.finetune("beit", model, 0.01, 0)
    chain.finetune("scratch", "", 0.01, 0)
    chain.probe("random", "", 0)
    held_out = {name: c.data.eval_split if name.endswith("tokenizer") else c.eval_split
                for name, c in chain.configs.items()}
    print(scale.eval_split, held_out)
    assert len(held_out) == 5 and set(held_out.values()) == {scale.eval_split}, held_out
  assert miniature.SCALES["full"].eval_split == "test"
  top1, top1_of_7 = miniature.pixel_logistic_regression("train[:600]", 0, eval_splits=("test[:100]", "test[:7]"),
                                                        steps=20)
  # shares of 100 and of 7 images: each floor read its own split
  assert top1 * 100 == pytest.approx(round(top1 * 100)) and top1_of_7 * 7 == pytest.approx(round(top1_of_7 * 7))


def test_the_curves_floor_is_measured_on_the_curves_held_out_images(tmp_path):
  """The learning-curve figure's dashed pixel floor must come from the curves' own held-out split: in the full
  run of 2026-12-06 BEiT's curve ended at 84.8% on test[:2000] but 82.5% on all of test, so the table's floor
  (84.6%, all of test) drawn under it made BEiT look as good as the pixels' logistic regression."""
  scale = miniature.SCALES["demo"]
  chain = miniature.Chain(str(tmp_path), scale)
  chain.results["pixels_logreg_0.01_seed0"] = {"eval_top1": 0.9}  # a record from before the curve floor existed
  m = chain.pixel_floor(0.01, 0)  # so it is measured again, on both splits
  assert set(m) >= {"eval_top1", "curve_top1"} and m["eval_top1"] != 0.9
  assert m["curve_top1"] * 1000 == pytest.approx(round(m["curve_top1"] * 1000))  # scale.curve_split: 1,000 images
  _, floors = miniature.curve_panels(chain.results, scale)
  assert floors == {"1% labels (train[0:600])": m["curve_top1"]}


def test_every_scale_runs_configs_that_load():
  for scale in miniature.SCALES.values():
    for name in ("fmnist_tokenizer", "fmnist_pretrain", "fmnist_finetune", "fmnist_linear_probe"):
      c = miniature.with_steps(configs.load(name), scale.pretrain_steps)
      assert c.total_steps == scale.pretrain_steps and c.optim.warmup_steps <= scale.pretrain_steps // 10
  tok = configs.load("fmnist_tokenizer", "checkpoint:/some/model")
  assert tok.loss.perceptual.source == "checkpoint:/some/model" and tok.loss.perceptual_weight > 0
  assert configs.load("fmnist_tokenizer", "pixel").loss.perceptual_weight == 0


def test_from_scratch_arms_clip_the_gradient_and_skip_layer_decay():
  """The arms from random init (the chain's scratch and supervised ones: `configs/fmnist_finetune.py` without a
  model) clip the gradient at global norm 1 and learn at the full rate in every layer; the pre-trained arms keep
  BEiT's recipe (layer decay, no clip). Unclipped, 150 steps of the scratch arm on 10% of the labels diverged to
  chance on the Intel VM (BENCHMARKS.md, issue 19). Fails on the code before: no clip, and a chain override."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from beit_jax.train import optim  # pylint: disable=import-outside-toplevel
  scratch, pretrained = configs.load("fmnist_finetune", ""), configs.load("fmnist_finetune", "/some/model")
  assert (scratch.optim.clip_grad, scratch.optim.layer_decay) == (1.0, 1.0)
  assert not pretrained.optim.clip_grad and pretrained.optim.layer_decay == 0.75
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  spike = jax.tree.map(lambda p: 1000.0 * p, params)  # global norm ~3,870
  for cfg, mu_norm in ((scratch.optim, 0.1), (pretrained.optim, 0.1 * 1000 * 15 ** 0.5)):
    tx, _ = optim.make(cfg, params, total_steps=100, depth=4)
    _, state = tx.update(spike, tx.init(params), params)
    norm = float(optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "mu")))
    assert norm == pytest.approx(mu_norm, rel=1e-4)  # (1 - b1) x the (clipped) gradient


def test_pixel_logistic_regression_floor():
  """Logistic regression on raw Fashion-MNIST pixels is a well-known ~84% (all 60k labels); on 2,000 labels
  it must still be far above chance (0.10). The demo's floor: a representation must beat it."""
  acc, = miniature.pixel_logistic_regression("train[:2000]", seed=0, steps=300)
  print(f"logistic regression on the pixels of 2,000 labelled images: held-out top-1 {acc:.4f}")
  assert 0.7 < acc < 0.9


def test_table_renders_recorded_results_and_marks_missing_ones():
  results = {"beit_finetune_1_seed0": {"eval_top1": 0.80}, "beit_finetune_1_seed1": {"eval_top1": 0.70},
             "beit_finetune_1_seed2": {"eval_top1": 0.75}, "supervised_finetune_0.01_seed0": {"eval_top1": 0.5},
             "beit_pretrain": {"eval_mlm_acc": 0.02, "eval_most_frequent_acc": 0.01,
                               "eval_most_frequent_per_position_acc": 0.04, "eval_chance": 0.002,
                               "eval_mlm_acc_foreground": 0.03, "eval_most_frequent_per_position_acc_foreground": 0.05},
             "beit_tokenizer": {"eval_psnr": 20.5, "eval_usage": 0.5, "eval_perplexity": 40.2,
                                "eval_background_codes": 12, "eval_background_top_share": 0.6}}
  text = miniature.table(results, "full")
  print(text)
  beit = next(l for l in text.splitlines() if l.startswith("| BEiT"))
  assert beit.split("|")[4].strip() == "75.0 ± 4.1"  # 100% labels: mean and (population) std of 80, 70, 75
  assert "50.0 (1 of 3 seeds)" in text and "| beit | 2.00 | 4.00 | 1.00 | 0.20 | 3.00 | 5.00 |" in text
  assert "| beit | 20.50 | 50.0% | 40 | 12 | 60.0% |" in text
  assert "| from scratch, same fine-tuning steps | - | - | - |" in text


def _results(scratch, beit, peco, random_probe, probes, mim=(0.4, 0.15)):
  """Recorded results of a full-scale chain with these held-out top-1s (per seed) at 1% and 10% labels."""
  r = {}
  for arm, values in (("scratch", scratch), ("beit", beit), ("peco", peco)):
    for f in (0.01, 0.1):
      for s, v in enumerate(values):
        r[f"{arm}_finetune_{f:g}_seed{s}"] = {"eval_top1": v}
  for s, v in enumerate(random_probe):
    r[f"random_probe_seed{s}"] = {"eval_top1": v}
    r[f"beit_probe_seed{s}"] = r[f"peco_probe_seed{s}"] = {"eval_top1": probes[s]}
  for arm in ("beit", "peco"):
    r[f"{arm}_pretrain"] = {"eval_mlm_acc": mim[0], "eval_most_frequent_per_position_acc": mim[1]}
  return r


def test_checks_pass_and_fail_on_the_figures_they_name():
  full = miniature.SCALES["full"]
  good = miniature.check(_results([0.50, 0.52, 0.51], [0.60, 0.61, 0.62], [0.63, 0.64, 0.62], [0.40] * 3,
                             [0.55, 0.56, 0.57]), full)
  print(good)
  assert good["mim"]["passed"] and good["pays"]["passed"] and good["probe"]["passed"]
  assert good["papers_peco"]["passed"]  # 63 vs 61, spread 1.6
  # 2x the per-position guess, not 1.9x; 4.0 points, not 5; 8 points above the random probe (seed 0), not 10
  bad = miniature.check(_results([0.56, 0.57, 0.58], [0.60, 0.61, 0.62], [0.60, 0.61, 0.62], [0.47] * 3,
                            [0.55, 0.56, 0.57], mim=(0.38, 0.2)), full)
  print(bad)
  assert not (bad["mim"]["passed"] or bad["pays"]["passed"] or bad["probe"]["passed"] or bad["papers_peco"]["passed"])
  assert "1.90x" in bad["mim"]["text"] and "beit 1% +4.0" in bad["pays"]["text"] and "+8.0" in bad["probe"]["text"]
  # A gap of 5 points inside a spread of more than 5 is no proof either.
  noisy = miniature.check(_results([0.40, 0.50, 0.60], [0.55, 0.56, 0.57], [0.55, 0.56, 0.57], [0.4] * 3,
                                   [0.6] * 3), full)
  assert not noisy["pays"]["passed"]
  # One seed has no spread to beat: PeCo 3 points above BEiT is reported, not passed as the papers' claim.
  demo = miniature.check(_results([0.50], [0.60], [0.63], [0.40], [0.55]), miniature.SCALES["demo"])
  assert not demo["papers_peco"]["passed"] and "+3.0" in demo["papers_peco"]["text"], demo["papers_peco"]
  assert "one seed" in demo["papers_peco"]["text"]
  # The 5-point bar still decides "pays" on one seed, and its line says the spread was not measured.
  assert demo["pays"]["passed"] and "one seed" in demo["pays"]["text"], demo["pays"]
  assert "one seed" not in good["pays"]["text"]


def test_an_arm_has_one_colour_in_the_demos_and_the_full_runs_curves(tmp_path):
  """The demo has no supervised arm: its curves once took the colour cycle from the next arm on, so BEiT was
  orange in the demo's figure and green in the full run's, side by side in the README."""
  from beit_jax import figures  # pylint: disable=import-outside-toplevel
  point = [(1.0, 0.5), (2.0, 0.6)]
  arms = {label: point for label in miniature.FINETUNE_ARMS}
  full = figures.draw_curves(tmp_path / "full.png", {"1%": arms})
  demo = figures.draw_curves(tmp_path / "demo.png", {"1%": {**arms, "supervised (compute-matched)": []}})
  assert full == demo and len(set(full.values())) == len(arms) and (tmp_path / "demo.png").stat().st_size > 0


def test_a_stage_recorded_with_other_steps_is_an_error_not_a_result(tmp_path):
  """Stages are known by name ("beit_finetune_1_seed0"): after a scale's steps change, a rerun in the old workdir
  must not return the old run's figures as the new one's."""
  chain = miniature.Chain(str(tmp_path), miniature.SCALES["demo"])
  chain.results["beit_pretrain"] = {"eval_mlm_acc": 0.4, "steps": 720}
  c = miniature.with_steps(configs.load("fmnist_pretrain"), 720)
  assert chain.stage("beit_pretrain", c)["eval_mlm_acc"] == 0.4
  with pytest.raises(ValueError, match=r"'beit_pretrain' was recorded with 720 steps.*1200.*--workdir"):
    chain.stage("beit_pretrain", miniature.with_steps(c, 1200))


def test_a_stage_stopped_by_sigterm_is_not_recorded(tmp_path):
  """SIGTERM mid-stage: the loop checkpoints and returns early; the chain must stop there and record nothing,
  so that the rerun resumes that stage instead of skipping it as done."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import threading  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  chain = miniature.Chain(str(tmp_path), miniature.SCALES["demo"])
  c = miniature.with_steps(configs.load("fmnist_tokenizer", "pixel"), 10_000)  # far more than fit before the signal
  c.data.eval_split = "test[:64]"
  default = signal.getsignal(signal.SIGTERM)

  def preempt_once_the_loop_listens():  # before the loop's handler is in place SIGTERM would end pytest itself
    for _ in range(6000):
      if signal.getsignal(signal.SIGTERM) is not default:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)

  watcher = threading.Thread(target=preempt_once_the_loop_listens, daemon=True)
  watcher.start()
  with pytest.raises(SystemExit):
    chain.stage("tok", c)
  watcher.join()
  assert "tok" not in chain.results
  assert not (tmp_path / "results.json").exists() or "tok" not in json.loads((tmp_path / "results.json").read_text())
  assert list((tmp_path / "tok" / "checkpoints").iterdir())  # the stop saved a checkpoint to resume from


@pytest.mark.slow
def test_make_demo_end_to_end_passes_its_checks(tmp_path):
  """`make demo` itself (10-15 minutes on 2 cores): every stage, the table, the checks of issue 19 that hold at demo
  scale (masked-token accuracy >= 1.5x the per-position guess for both tokenizers, fine-tuned >= 5 points above
  from scratch at 1% and 10% labels) and the two figures. The probe check (>= 10 points above the random-init
  probe) is computed and printed but not met yet (+3.8 / +4.2 on 2026-12-03, BENCHMARKS.md): issue 19 is open
  on it. As `make demo` runs it: its own process, on the one CPU device (not the suite's 8 virtual ones, which
  the probes' batch of 100 does not divide)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
  proc = subprocess.run([sys.executable, "-m", "beit_jax.experiments.miniature", f"--workdir={tmp_path}"], env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  checks = json.loads((tmp_path / "results.json").read_text())["checks"]
  print({k: c["text"] for k, c in checks.items()})
  assert {"mim", "pays", "probe"} <= set(checks)
  assert checks["mim"]["passed"] and checks["pays"]["passed"], checks
  for name in ("curves.png", "masked_predictions.png"):
    assert (tmp_path / "figures" / name).stat().st_size > 10_000
  assert "PASS" in (tmp_path / "table.md").read_text()
