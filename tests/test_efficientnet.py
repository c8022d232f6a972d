"""EfficientNet B0-B7: the derived architecture against published numbers, and its parts.

The reference numbers below are not computed by our code: per-stage widths and
repeats, SE widths and stochastic-depth rates are those of Keras Applications'
EfficientNets (layer configs of `keras.applications.EfficientNetB0..B7`), which
match Table 1 of the paper for B0. One test runs Keras side by side with the
same weights when Keras is importable with the JAX backend.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import efficientnet as E

# variant -> (stem width, output width of the 7 stages, blocks per stage, top-conv width)
PUBLISHED_STRUCTURE = {
    "b0": (32, (16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), 1280),
    "b1": (32, (16, 24, 40, 80, 112, 192, 320), (2, 3, 3, 4, 4, 5, 2), 1280),
    "b2": (32, (16, 24, 48, 88, 120, 208, 352), (2, 3, 3, 4, 4, 5, 2), 1408),
    "b3": (40, (24, 32, 48, 96, 136, 232, 384), (2, 3, 3, 5, 5, 6, 2), 1536),
    "b4": (48, (24, 32, 56, 112, 160, 272, 448), (2, 4, 4, 6, 6, 8, 2), 1792),
    "b5": (48, (24, 40, 64, 128, 176, 304, 512), (3, 5, 5, 7, 7, 9, 3), 2048),
    "b6": (56, (32, 40, 72, 144, 200, 344, 576), (3, 6, 6, 8, 8, 11, 3), 2304),
    "b7": (64, (32, 48, 80, 160, 224, 384, 640), (4, 7, 7, 10, 10, 13, 4), 2560),
}

# Number of MBConv blocks (Keras's block1a ... block7x layers).
PUBLISHED_BLOCK_COUNTS = {"b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39, "b6": 45, "b7": 55}
# Keras's block{i}{x}_se_reduce filters for B0, block by block.
B0_SE_WIDTHS = (8, 4, 6, 6, 10, 10, 20, 20, 20, 28, 28, 28, 48, 48, 48, 48)
# Keras's block{i}{x}_drop rates for B0 (the blocks with an identity shortcut).
B0_DROP_RATES = {2: 0.025, 4: 0.05, 6: 0.075, 7: 0.0875, 9: 0.1125, 10: 0.125,
                 12: 0.15, 13: 0.1625, 14: 0.175}


_ABSTRACT = {}


def abstract_model(name, **options):
    """`nnx.eval_shape` of a registered model, built once per test session (tracing is slow)."""
    key = (name, repr(sorted(options.items())))
    if key not in _ABSTRACT:
        _ABSTRACT[key] = zoo.eval_shape(lambda: zoo.create_model(name, **options))
    return _ABSTRACT[key]


def stage_summary(configs):
    widths, repeats = {}, {}
    for c in configs:
        widths[c.stage] = c.out_filters
        repeats[c.stage] = repeats.get(c.stage, 0) + 1
    return tuple(widths.values()), tuple(repeats.values())


@pytest.mark.parametrize("variant", sorted(PUBLISHED_STRUCTURE))
def test_derived_structure_matches_published(variant):
    stem, widths, repeats, top = PUBLISHED_STRUCTURE[variant]
    scaling = E.COMPOUND_SCALING[variant]
    configs = E.block_configs(scaling.width_multiplier, scaling.depth_multiplier)
    assert stage_summary(configs) == (widths, repeats)
    assert len(configs) == PUBLISHED_BLOCK_COUNTS[variant]
    assert E.round_filters(E.STEM_FILTERS, scaling.width_multiplier) == stem
    assert E.round_filters(E.TOP_FILTERS, scaling.width_multiplier) == top
    spec = zoo.get_spec(f"efficientnet_{variant}")
    assert spec.feature_shape[2] == top
    assert spec.input_shape[:2] == (scaling.resolution, scaling.resolution)


def test_rounding_rules():
    # Nearest multiple of 8, bumped up when rounding lost more than 10%.
    assert E.round_filters(112, 1.1) == 120  # 123.2 -> 120
    assert E.round_filters(40, 1.1) == 48  # 44 -> 48 (ties go up)
    assert E.round_filters(4, 1.0) == 8  # never below the divisor
    assert E.round_filters(12, 1.0) == 16  # 12 -> 16 (nearest, ties up)
    assert E.round_filters(20, 1.0) == 24
    assert E.round_filters(36, 0.25) == 16  # 9 -> 8 would keep 89% < 90%: bumped to 16
    assert E.round_repeats(3, 1.4) == 5 and E.round_repeats(1, 3.1) == 4


@pytest.mark.parametrize("variant", ["b0", "b2"])
def test_built_model_follows_the_derived_blocks(variant):
    scaling = E.COMPOUND_SCALING[variant]
    stem, widths, repeats, top = PUBLISHED_STRUCTURE[variant]
    model = abstract_model(f"efficientnet_{variant}")
    f = model.features
    assert f.stem.conv.conv.out_features == stem
    assert len(f.blocks) == sum(repeats)
    configs = E.block_configs(scaling.width_multiplier, scaling.depth_multiplier)
    for block, c in zip(f.blocks, configs):
        assert block.project_conv.out_features == c.out_filters
        expanded = c.in_filters * c.expand_ratio
        assert (block.expand_conv is None) == (c.expand_ratio == 1)
        assert block.depthwise_bn.num_features == expanded
        assert isinstance(block.depthwise_conv, E.DownsampleConv) == (c.stride == 2)
        assert block.has_skip == (c.stride == 1 and c.in_filters == c.out_filters)
    assert f.top_conv.out_features == top
    assert model.head.layers[0].rate == scaling.dropout_rate


def test_b0_se_widths_and_drop_rates_match_keras():
    model = abstract_model("efficientnet_b0")
    assert tuple(b.se.reduce.out_features for b in model.features.blocks) == B0_SE_WIDTHS
    rates = {i: b.drop_path.rate for i, b in enumerate(model.features.blocks) if b.drop_path is not None}
    assert rates.keys() == B0_DROP_RATES.keys()
    for i, rate in B0_DROP_RATES.items():
        assert rates[i] == pytest.approx(rate)


MEAN, VARIANCE = (0.485, 0.456, 0.406), (0.229**2, 0.224**2, 0.225**2)
# Options as they come back from JSON (lists), on a model built once for the two tests below.
CUSTOM_OPTIONS = {"bn_epsilon": 1e-5, "input_normalization": [1 / 255, list(MEAN), list(VARIANCE)]}


def test_bn_epsilon_is_keras_by_default_and_an_option():
    model = abstract_model("efficientnet_b0")
    assert model.features.stem.bn.epsilon == 1e-3
    assert model.features.blocks[3].project_bn.epsilon == 1e-3
    assert model.features.input_norm is None
    other = abstract_model("efficientnet_b0", **CUSTOM_OPTIONS)
    assert other.features.top_bn.epsilon == 1e-5


def tf_same_pads(size, kernel, stride=2):
    """TensorFlow's SAME padding (before, after) for one side, written from its definition."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [1, 2, 7, 8, 75, 112, 113])
def test_downsample_padding(size, kernel):
    # Keras's correct_pad at a known size is TF's SAME; at an unknown size it assumes even.
    assert E.downsample_pads(size, kernel, "correct_pad") == tf_same_pads(size, kernel)
    assert E.downsample_pads(size, kernel, "assume_even") == tf_same_pads(2 * size, kernel)
    conv = E.DownsampleConv(4, 4, kernel, groups=4, padding_mode="correct_pad", dtype=jnp.float32,
                            rngs=nnx.Rngs(0))
    out = conv(jnp.ones((1, size, size + 1, 4)))
    assert out.shape == (1, -(-size // 2), -(-(size + 1) // 2), 4)


def test_stochastic_depth_identity_in_eval_drops_whole_samples_in_train():
    layer = E.StochasticDepth(0.5, rngs=nnx.Rngs(dropout=3))
    x = jax.random.normal(jax.random.key(0), (256, 3, 4, 5)) + 10.0  # no zeros in x
    y = np.asarray(layer(x))
    per_sample_kept = (y != 0).reshape(256, -1)
    # Every sample is dropped entirely or kept entirely, and the kept ones are scaled by 1/(1-rate).
    assert np.all(per_sample_kept.all(axis=1) | ~per_sample_kept.any(axis=1))
    kept = per_sample_kept.all(axis=1)
    np.testing.assert_allclose(y[kept], 2.0 * np.asarray(x)[kept], rtol=1e-6)
    # Binomial(256, 0.5): 128 +- 8 std; [88, 168] is a 5-sigma band.
    assert 88 <= kept.sum() <= 168
    assert not np.array_equal(np.asarray(layer(x)) != 0, y != 0)  # a fresh mask per call
    layer.eval()
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x))


def test_stochastic_depth_in_a_block_follows_train_and_eval():
    config = E.BlockConfig(stage=0, in_filters=8, out_filters=8, kernel=3, stride=1, expand_ratio=2,
                           se_ratio=0.25, drop_rate=0.5)
    block = E.MBConv(config, bn_epsilon=1e-3, padding_mode="correct_pad", dtype=jnp.float32,
                     rngs=nnx.Rngs(params=0, dropout=1))
    x = jax.random.normal(jax.random.key(2), (64, 6, 6, 8))
    y = block(x)
    # A dropped sample passes through the shortcut unchanged.
    passed = np.all(np.isclose(np.asarray(y), np.asarray(x)), axis=(1, 2, 3))
    assert 0 < passed.sum() < 64
    block.eval()
    y_eval = np.asarray(block(x))
    assert not np.any(np.all(np.isclose(y_eval, np.asarray(x)), axis=(1, 2, 3)))


# The forward/backward pass of b0 runs in tests/test_models.py with every family's smallest variant.


def test_input_normalization_matches_numpy():
    norm = abstract_model("efficientnet_b0", **CUSTOM_OPTIONS).features.input_norm
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    expected = (x / 255 - np.array(MEAN)) / np.sqrt(np.array(VARIANCE))
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options,match", [
    ({"input_normalization": (1 / 255, (0.5, 0.5), (1.0, 1.0, 1.0))}, "per channel"),
    ({"downsample_padding": "same"}, "downsample_padding"),
    ({"width_multiplier": 0}, "positive"),
    ({"dropout_rate": 1.0}, r"\[0, 1\)"),
    ({"se_rate": 0.25}, "unknown EfficientNet option"),
])
def test_bad_options_are_clear_value_errors(options, match):
    with pytest.raises(ValueError, match=match):
        zoo.create_model("efficientnet_b0", **options)


# Side by side with Keras's EfficientNetB0 (same weights, logits to 1e-4): tests/test_import_keras.py.
