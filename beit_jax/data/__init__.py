"""Host input side: masking (numpy only) and the tf.data pipelines (the only TensorFlow users).

Import the submodules you need: `beit_jax.data.masking` needs no TensorFlow, so a benchmark or a job on
synthetic batches can make masks where TensorFlow is absent.
"""
