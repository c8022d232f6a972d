"""Checks every registered model goes through, plus the published parameter counts.

The counts below are copied from the papers / reference implementations (Keras
Applications, torchvision, the SENet and EfficientNet papers), not from our code.
Every variant is checked abstractly (`create_model(abstract=True)`); forward/backward
passes run on the smallest variant of each family, on a small input.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from model_sets import smallest_of_each_family
from zoo.classifier import Classifier, Head
from zoo.layers import Activation

# (model, options) -> published trainable parameters at the default input and classes.
PUBLISHED_PARAMS = {
    ("lenet5", ()): 61_706,
    ("alexnet", ()): 60_965_224,
    ("alexnet", (("groups", 1),)): 62_378_344,
    ("vgg11", ()): 132_863_336,
    ("vgg13", ()): 133_047_848,
    ("vgg16", ()): 138_357_544,
    ("vgg19", ()): 143_667_240,
    ("googlenet", ()): 6_998_552,
    ("googlenet", (("aux_logits", True),)): 13_378_280,
    ("resnet18", ()): 11_689_512,
    ("resnet34", ()): 21_797_672,
    ("resnet50", ()): 25_557_032,
    ("resnet101", ()): 44_549_160,
    ("resnet152", ()): 60_192_808,
    ("seresnet50", ()): 28_088_024,
    ("seresnet101", ()): 49_326_872,
    ("seresnet152", ()): 66_821_848,
    ("xception", ()): 22_855_952,
    ("efficientnet_b0", ()): 5_288_548,
    ("efficientnet_b1", ()): 7_794_184,
    ("efficientnet_b2", ()): 9_109_994,
    ("efficientnet_b3", ()): 12_233_232,
    ("efficientnet_b4", ()): 19_341_616,
    ("efficientnet_b5", ()): 30_389_784,
    ("efficientnet_b6", ()): 43_040_704,
    ("efficientnet_b7", ()): 66_347_960,
    # Our own MNIST design, counted by hand: 3x3 convs without bias 1-16-32-32-64 (32,400),
    # their BatchNorm scales and offsets (288), Dense 7*7*64 -> 10 (31,370).
    ("mnistnet", ()): 32_400 + 288 + 31_370,
    # The same at twice the width: convs 1-32-64-64-128 (129,312), BatchNorm (576), Dense 7*7*128 -> 10 (62,730).
    ("mnistnet_wide", ()): 9 * (32 + 32 * 64 + 64 * 64 + 64 * 128) + 2 * (32 + 64 + 64 + 128) + 7 * 7 * 128 * 10 + 10,
    # Four times the width: convs 1-64-128-128-256 (516,672), BatchNorm (1,152), Dense 7*7*256 -> 10 (125,450).
    ("mnistnet_large", ()): 9 * (64 + 64 * 128 + 128 * 128 + 128 * 256) + 2 * (64 + 128 + 128 + 256)
    + 7 * 7 * 256 * 10 + 10,
}

ALL_MODELS = zoo.list_models()


@functools.cache
def _abstract_model(name, frozen_kwargs):
    return zoo.create_model(name, abstract=True, **dict(frozen_kwargs))


def abstract_model(name, **kwargs):
    """The model with shape-only leaves, built once per (name, kwargs) for the whole module."""
    return _abstract_model(name, tuple(sorted(kwargs.items())))



def test_every_published_model_is_registered():
    missing = sorted({name for name, _ in PUBLISHED_PARAMS} - set(ALL_MODELS))
    assert not missing, f"not registered: {missing}"


@pytest.mark.parametrize("name,options", sorted(PUBLISHED_PARAMS), ids=lambda v: str(v))
def test_published_parameter_count(name, options):
    model = abstract_model(name, **dict(options))
    assert zoo.count_params(model) == PUBLISHED_PARAMS[(name, options)]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_spec_matches_model(name):
    spec = zoo.get_spec(name)
    assert spec.head_kind in ("flatten", "avg")
    assert spec.paper and spec.url.startswith("http") and spec.introduced
    if not spec.options.get("test_only"):
        assert spec.num_params == PUBLISHED_PARAMS[(name, ())]
    model = abstract_model(name)
    assert isinstance(model, Classifier)
    # The head is readable as data: a pool step then only Dense/activation/dropout.
    assert isinstance(model.head, Head) and model.head.pool == spec.head_kind
    steps = model.head.describe()
    assert steps[0]["op"] == spec.head_kind
    assert {s["op"] for s in steps[1:]} <= {"dense", "activation", "dropout"}
    assert steps[-1] == {"op": "dense", "name": steps[-1]["name"],
                         "in_features": steps[-1]["in_features"], "out_features": spec.num_classes}
    # Feature map at the default input, and the stride that produced it.
    fmap = zoo.output_shape(model.features, (1, *spec.input_shape))
    assert fmap[1:] == spec.feature_shape
    assert fmap[1] <= -(-spec.input_shape[0] // spec.total_stride)
    # The minimum input size is accepted by the backbone.
    mh, mw = spec.min_size
    small = zoo.output_shape(abstract_model(name, include_top=False), (1, mh, mw, spec.input_shape[2]))
    assert small[1] >= 1 and small[2] >= 1


@pytest.mark.parametrize("name", smallest_of_each_family())
def test_forward_backward_reaches_every_parameter(name):
    spec = zoo.get_spec(name)
    h, w = max(spec.min_size[0], 32), max(spec.min_size[1], 32)
    model = zoo.create_model(name, num_classes=7, input_size=(h, w), rngs=0)
    x = jax.random.normal(jax.random.key(1), (2, h, w, spec.input_shape[2]))

    def loss_fn(model):
        logits = model(x)
        return jnp.mean(logits**2), logits

    grads, logits = nnx.jit(nnx.grad(loss_fn, has_aux=True))(model)
    assert logits.shape == (2, 7)
    assert bool(jnp.all(jnp.isfinite(logits)))
    flat = jax.tree.leaves_with_path(nnx.state(grads, nnx.Param))
    # numpy, not jnp: one jnp check per parameter shape would compile hundreds of tiny programs.
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, f"parameters with zero gradient: {dead[:10]}"
    # Eval mode runs too, and deterministically.
    model.eval()
    forward = nnx.jit(lambda model: model(x))
    a, b = forward(model), forward(model)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ALL_MODELS)
def test_feature_extraction(name):
    spec = zoo.get_spec(name)
    model = abstract_model(name, include_top=False)
    assert model.head is None
    out = zoo.output_shape(model, (2, *spec.input_shape))
    assert out == (2, *spec.feature_shape)


@pytest.mark.parametrize("name", ["lenet5", "resnet18", "vgg11"])
def test_bad_input_is_a_clear_value_error(name):
    spec = zoo.get_spec(name)
    model = abstract_model(name)
    h, w, c = spec.input_shape
    with pytest.raises(ValueError, match="NHWC"):
        zoo.output_shape(model, (h, w, c))  # no batch axis
    with pytest.raises(ValueError, match="channel"):
        zoo.output_shape(model, (1, h, w, c + 2))
    with pytest.raises(ValueError, match=f"at least {spec.min_size[0]}x{spec.min_size[1]}"):
        zoo.output_shape(model, (1, spec.min_size[0] - 1, spec.min_size[1] - 1, c))


def test_alexnet_refuses_a_32x32_image_before_tracing():
    model = abstract_model("alexnet")
    with pytest.raises(ValueError, match="at least"):
        model(jnp.zeros((1, 32, 32, 3)))


def test_unknown_model_lists_closest_names():
    with pytest.raises(ValueError, match="resnet50"):
        zoo.create_model("resnet5O")


def test_bfloat16_computation_keeps_float32_parameters():
    model = zoo.create_model("resnet18", num_classes=3, input_size=32, dtype=jnp.bfloat16)
    out = nnx.jit(lambda model, x: model(x))(model, jnp.ones((1, 32, 32, 3)))
    assert out.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_head_activation_names_are_data():
    head = zoo.dense_head("flatten", 12, 3, hidden=(5,), activation="tanh", dropout=0.5, rngs=nnx.Rngs(0))
    ops = [s["op"] for s in head.describe()]
    assert ops == ["flatten", "dense", "activation", "dropout", "dense"]
    assert isinstance(head.layers[1], Activation) and head.layers[1].name == "tanh"
