"""Stages as data (zoo.stages): what each family declares against the maps its backbone returns.

Declared stages come from each variant's configuration arithmetic; here they are compared
with the shapes the backbone actually gives (jax.eval_shape, nothing runs), so the two are
independent. Strides are checked as geometry: an input k * stride pixels larger gives
exactly k more cells, which holds for SAME and VALID networks alike.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.classifier import cheap_tracer_error_messages
from zoo.stages import Stage


def map_shapes(extractor, hw):
    """Shapes of the extractor's maps on one (H, W) input, computed abstractly."""
    graphdef, state = nnx.split(extractor)
    x = jax.ShapeDtypeStruct((1, *hw, extractor.input_shape[2]), jnp.float32)
    with cheap_tracer_error_messages():
        maps = jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, x)
    return [tuple(m.shape) for m in maps]


@pytest.mark.parametrize("name", zoo.list_models())
def test_declared_stages_match_the_maps(name):
    spec = zoo.get_spec(name)
    extractor = zoo.create_model(name, features_only=True, abstract=True)
    extractor.eval()
    stages = extractor.feature_info
    steps = [step for step, _ in zoo.backbone_steps(extractor.features)]
    assert stages[-1].name == steps[-1], "the last stage is the backbone's output"
    assert stages[-1].stride == spec.total_stride
    strides = [stage.stride for stage in stages]
    assert strides == sorted(set(strides)) and all(spec.total_stride % s == 0 for s in strides)

    size, total = spec.input_shape[0], spec.total_stride
    at_default = map_shapes(extractor, (size, size))
    grown = map_shapes(extractor, (size + total, size + 2 * total))  # W grows twice as much as H
    assert at_default[-1][1:] == spec.feature_shape
    for stage, before, after in zip(stages, at_default, grown, strict=True):
        assert before[3] == after[3] == stage.channels, stage
        extra_cells = (after[1] - before[1], after[2] - before[2])
        assert (extra_cells[0] * stage.stride, extra_cells[1] * stage.stride) == (total, 2 * total), stage


@pytest.mark.parametrize("name, size", [("lenet5", 32), ("mnistnet", 28), ("resnet18", 64)])
def test_the_last_map_is_the_backbone_output(name, size):
    extractor = zoo.create_model(name, features_only=True, input_size=size)
    extractor.eval()
    x = jax.random.normal(jax.random.key(0), (2, size, size, extractor.input_shape[2]))
    names = [stage.name for stage in extractor.stages]
    graphdef, state = nnx.split((extractor, nnx.clone(extractor.features)))

    @jax.jit
    def run(state, x):
        extractor, clone = nnx.merge(graphdef, state)
        return extractor(x), extractor.features(x), zoo.stage_maps(clone, x, names)

    maps, features, from_clone = run(state, x)
    np.testing.assert_allclose(maps[-1], features, rtol=1e-6, atol=1e-6)
    for a, b in zip(maps, from_clone, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_inner_map_is_that_steps_output():
    extractor = zoo.create_model("lenet5", features_only=True, out_indices=(1,))
    f = extractor.features
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
    (c3,) = extractor(x)
    np.testing.assert_allclose(c3, f.act2(f.conv2(f.pool1(f.act1(f.conv1(x))))), rtol=1e-5, atol=1e-5)
    assert c3.shape == (2, 10, 10, 16)  # the paper's C3


def test_out_indices_select_stages_and_keep_parameter_paths():
    full = zoo.create_model("resnet18", features_only=True, abstract=True)
    some = zoo.create_model("resnet18", features_only=True, out_indices=(1, -1), abstract=True)
    assert some.feature_info == [full.feature_info[1], full.feature_info[-1]]
    assert map_shapes(some, (64, 64)) == [(1, 16, 16, 64), (1, 2, 2, 512)]
    classifier = zoo.create_model("resnet18", abstract=True)
    assert full.feature_info == list(classifier.stages)  # features_only keeps every declared stage
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(some))}
    assert paths == {path for path, _ in nnx.to_flat_state(nnx.state(classifier)) if path[0] == "features"}


def test_bad_selections_are_refused():
    with pytest.raises(ValueError, match=r"valid indices are -5 \.\. 4"):
        zoo.create_model("resnet18", features_only=True, out_indices=(5,), abstract=True)
    with pytest.raises(ValueError, match="features_only"):
        zoo.create_model("resnet18", out_indices=(0,), abstract=True)
    lenet = zoo.create_model("lenet5", abstract=True)
    with pytest.raises(ValueError, match="'act1'"):
        zoo.stage_maps(lenet.features, jnp.zeros((1, 32, 32, 1)), ["pool9"])
    with pytest.raises(ValueError, match="positive int"):
        Stage("pool1", 2.0, 6)


def test_find_stages_of_a_users_sequential():
    rngs = nnx.Rngs(0)
    pool = functools.partial(nnx.max_pool, window_shape=(2, 2), strides=(2, 2))
    net = nnx.Sequential(
        nnx.Conv(3, 8, (3, 3), rngs=rngs), jax.nn.relu, pool,                     # 30 -> 30 -> 15
        nnx.Conv(8, 16, (3, 3), padding="VALID", rngs=rngs), jax.nn.relu, pool,   # 15 -> 13 -> 6
        nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs), jax.nn.relu,               # 6 -> 3
        lambda x: x.reshape(x.shape[0], -1), nnx.Linear(3 * 3 * 32, 10, rngs=rngs))
    # By hand: each pool and the strided conv end the stage before them; the VALID conv only
    # trims the border; the flatten and Dense are no maps, so layers.7 ends the last stage.
    expected = (Stage("layers.1", 1, 8), Stage("layers.4", 2, 16), Stage("layers.5", 4, 16),
                Stage("layers.7", 8, 32))
    assert zoo.find_stages(net, (30, 30, 3)) == expected
    maps = zoo.stage_maps(net, jnp.ones((1, 30, 30, 3)), [s.name for s in expected])
    assert [m.shape for m in maps] == [(1, 30, 30, 8), (1, 13, 13, 16), (1, 6, 6, 16), (1, 3, 3, 32)]


@pytest.mark.parametrize("name", ["mnistnet", "resnet18", "xception", "efficientnet_b0"])
def test_find_stages_agrees_where_a_family_taps_the_end_of_each_resolution(name):
    model = zoo.create_model(name, abstract=True, include_top=False)
    assert zoo.find_stages(model.features, model.input_shape) == model.stages
