"""beit_jax: BEiT and PeCo masked image modeling in JAX/Flax NNX."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent

setuptools.setup(
    name="beit_jax",
    version="0.1.0",
    description="BEiT / PeCo masked image modeling pre-training in JAX and Flax NNX",
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["beit_jax", "beit_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "numpy>=2.0",
        "scipy>=1.11",
        "safetensors>=0.4",
        "absl-py>=2.0",
        "ml-collections>=1.0",
        "clu>=0.0.12",
        # clu's metric writers import tensorboard but clu does not declare it.
        "tensorboard>=2.18",
        "tensorflow-cpu>=2.18",
        "tensorflow-datasets>=4.9.7",
    ],
    extras_require={
        # Only for weight conversion from PyTorch pickles and for the parity tests / benchmarks.
        # Install torch first (`pip install torch==<cpu build>`), or pip may pull a CUDA torch.
        "torch": ["torch>=2.4", "timm>=1.0.15", "transformers>=4.46", "safetensors>=0.4"],
        # matplotlib draws the miniature's figures (python -m beit_jax.experiments.miniature, beit_jax/figures.py).
        "demo": ["matplotlib>=3.8"],
        # scikit-image ships the real photos used by tests, examples and colabs (skimage.data).
        # nbclient/ipykernel run the colabs/ notebooks in the suite; matplotlib draws their figures (and the
        # demo's).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-image>=0.24", "nbclient>=0.10", "nbformat>=5.9",
                 "ipykernel>=6.29", "matplotlib>=3.8", "hypothesis>=6.100",
                 # the reference logistic regression of the linear-probe tests
                 "scikit-learn>=1.4"],
    },
    entry_points={
        "console_scripts": [
            "beit-convert=beit_jax.convert.cli:run",
            "beit-train=beit_jax.main:cli",
        ],
    },
)
