"""The pictures of the miniature chain (`make demo`, benchmarks/fmnist_reproduction.py) and of the token-prediction
notebook: learning curves against training images seen, and masked-token predictions decoded to pixels.

matplotlib is imported when a figure is drawn (it comes with the `test` extra, which `make demo` installs);
`masked_predictions` needs only JAX.
"""
from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def masked_predictions(model, tok, images, tokenizer_images, mask) -> dict[str, np.ndarray]:
  """What a pre-trained BEiT makes of masked images, as pixels: for NHWC `images` (the model's view),
  `tokenizer_images` ([0, 1], the tokenizer's view) and a bool `mask` [B, h, w]:
    "ids": the tokenizer's tokens [B, h, w]; "pred": the model's argmax token at every position;
    "recon": the tokenizer's decoding of its own tokens (the best a prediction can decode to);
    "predicted": the decoding of the tokens kept where visible and predicted where masked;
    "right": masked positions predicted exactly.
  """
  mask = np.asarray(mask, bool)
  ids = np.asarray(tok.encode(tokenizer_images))
  logits = jax.jit(lambda m, x, b: m(x, bool_masked_pos=b))(model, images, mask.reshape(mask.shape[0], -1))
  pred = np.asarray(jnp.argmax(logits, -1)).reshape(ids.shape)
  return {"ids": ids, "pred": pred, "recon": np.asarray(tok.decode(ids)),
          "predicted": np.asarray(tok.decode(np.where(mask, pred, ids))), "right": (pred == ids) & mask}


def upsample(mask: np.ndarray, size: int) -> np.ndarray:
  """A [h, w] patch mask as a [size, size] pixel mask."""
  return np.kron(mask, np.ones((size // mask.shape[0], size // mask.shape[1])))


def draw_masked_predictions(path, arms: Mapping[str, dict], tokenizer_images, mask, title: str = "") -> None:
  """One block of rows per arm (name -> `masked_predictions` output) over the same images and masks: the
  image with the mask greyed, the tokenizer's reconstruction, the prediction decoded, and which masked
  tokens are exactly right (green) or wrong (red)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  n, size = tokenizer_images.shape[0], tokenizer_images.shape[1]
  grey = lambda x: np.clip(x.mean(-1) if x.ndim == 4 else x, 0, 1)
  pix = np.stack([upsample(m, size) for m in np.asarray(mask, bool)])
  rows = [("image, masked", np.where(pix > 0, 0.35 + 0.3 * grey(tokenizer_images), grey(tokenizer_images)))]
  for arm, out in arms.items():
    acc = out["right"].sum() / max(np.asarray(mask).sum(), 1)
    marks = np.stack([np.stack([upsample(~r & m, size), upsample(r, size), np.zeros((size, size))], -1)
                      for r, m in zip(out["right"], np.asarray(mask, bool))])
    rows += [(f"{arm}: tokenizer's\nreconstruction", grey(out["recon"])),
             (f"{arm}: prediction\ndecoded", grey(out["predicted"])),
             (f"{arm}: exact tokens\n{acc:.0%} right (green)", 0.8 * marks + 0.2 * grey(tokenizer_images)[..., None])]
  fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)), squeeze=False)
  for i, (label, imgs) in enumerate(rows):
    for j in range(n):
      axes[i, j].imshow(imgs[j], cmap="gray", vmin=0, vmax=1)
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
    axes[i, 0].set_ylabel(label, fontsize=7)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def draw_curves(path, panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], *,
                floors: Mapping[str, float] | None = None, pretrain_images: float = 0.0, ylabel: str = "") -> dict:
  """One panel per key of `panels` (e.g. a label fraction), one line per arm: (training images seen, held-out
  top-1) points. `floors[panel]` draws a dashed reference (the pixel logistic regression); `pretrain_images`
  marks where the pre-trained arms' fine-tuning starts. An arm's colour is fixed by its place in the panel's
  arms, drawn or not (an arm with no points still takes its colour), so one arm has one colour in every figure
  of a chain, the demo's (no supervised arm) and the full run's alike. Returns {arm: colour}."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
  colours = {}
  for ax, (name, arms) in zip(axes[0], panels.items()):
    for k, (arm, points) in enumerate(arms.items()):
      colours[arm] = f"C{k}"
      if points:
        x, y = zip(*points)
        ax.plot(x, 100 * np.asarray(y), marker="o", markersize=3, label=arm, color=colours[arm])
    if floors and name in floors:
      ax.axhline(100 * floors[name], color="k", linestyle="--", linewidth=1, label="logistic regression on pixels")
    if pretrain_images:
      ax.axvline(pretrain_images, color="grey", linestyle=":", linewidth=1)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("training images seen (pre-training + fine-tuning)", fontsize=8)
    ax.set_ylabel(ylabel or "held-out top-1 (%)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return colours


def save_path(workdir, name: str) -> pathlib.Path:
  path = pathlib.Path(workdir) / "figures" / name
  path.parent.mkdir(parents=True, exist_ok=True)
  return path
