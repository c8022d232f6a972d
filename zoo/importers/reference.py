"""Keras Applications as a reference implementation, built fast, for tests and benchmarks.

Needs Keras 3 on the JAX backend (`KERAS_BACKEND=jax`, set before Keras is first
imported). Two helpers the importer's proofs share:

- `keras_application(name, ...)`: `keras.applications.<name>(weights=None, ...)`,
  with Keras's random initializers answered by NumPy while the model is built.
  On the JAX backend each initializer call compiles one XLA program per weight
  shape: building EfficientNetB0 takes about 150 s on a loaded 2-core CPU that
  way, 10 s with NumPy. The values are random either way; the model, its layers
  and its forward pass are Keras's own.
- `randomize_keras_weights(model, seed)`: gives every BatchNorm statistic, gamma,
  beta and bias a random value (Keras initializes them to 0 or 1), so a
  comparison exercises every weight.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np


def require_keras_jax():
    """Import Keras, insisting on the JAX backend; a clear error otherwise."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"Keras runs on the {keras.backend.backend()!r} backend; set KERAS_BACKEND=jax before "
            f"Keras is first imported"
        )
    return keras


@contextlib.contextmanager
def numpy_initializers(seed: int = 0):
    """Within this context Keras's normal/uniform/truncated-normal draws come from NumPy."""
    require_keras_jax()
    import jax.numpy as jnp
    from keras.src.backend.jax import random as keras_random

    rng = np.random.default_rng(seed)

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return jnp.asarray(rng.normal(mean, stddev, size=shape), dtype=dtype or "float32")

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return jnp.asarray(rng.uniform(minval, maxval, size=shape), dtype=dtype or "float32")

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        draws = np.clip(rng.normal(0.0, 1.0, size=shape), -2.0, 2.0)  # Keras truncates at 2 stddevs
        return jnp.asarray(draws * stddev + mean, dtype=dtype or "float32")

    saved = keras_random.normal, keras_random.uniform, keras_random.truncated_normal
    keras_random.normal, keras_random.uniform, keras_random.truncated_normal = normal, uniform, truncated_normal
    try:
        yield
    finally:
        keras_random.normal, keras_random.uniform, keras_random.truncated_normal = saved


def keras_application(name: str, *, seed: int = 0, **kwargs):
    """`keras.applications.<name>(weights=None, **kwargs)`, built with NumPy initializers.

    Example: keras_application("ResNet50", input_shape=(32, 32, 3), classifier_activation=None).
    """
    keras = require_keras_jax()
    with numpy_initializers(seed):
        return getattr(keras.applications, name)(weights=kwargs.pop("weights", None), **kwargs)


def randomize_keras_weights(model, seed: int = 0) -> None:
    """Random BatchNorm statistics/affine parameters and biases (see the module docstring)."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        kind = variable.path.rsplit("/", 1)[-1]
        shape = tuple(variable.shape)
        if kind in ("gamma", "moving_variance"):
            variable.assign(rng.uniform(0.5, 1.5, shape).astype("float32"))
        elif kind in ("beta", "moving_mean", "bias"):
            variable.assign(rng.normal(0.0, 0.1, shape).astype("float32"))


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|: the error relative to the output's scale."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / max(np.max(np.abs(reference)), 1e-30))
