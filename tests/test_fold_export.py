"""BatchNorm folding (convert/fold.py) and the exported FCN (convert/export.py, `zoo export`).

References from outside the code under test: the unfolded model itself in eval mode (flax's
BatchNorm), with random BatchNorm statistics and affine parameters so that no BatchNorm is
an identity; `lax.conv_general_dilated` and `lax.reduce_window` at concrete sizes for the CPU
paths traced with symbolic sizes; and the artifact run in a fresh process that imports jax only.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export, lax

import convert
import zoo
from model_sets import smallest_of_each_family
from convert import FoldedBatchNorm, find_conv_batchnorm_pairs, fold_batchnorm, to_fcn
from convert.export import export_fcn, load_exported
from zoo import cpu_conv, saving
from zoo.efficientnet import DownsampleConv
from zoo.layers import Activation, GlobalAvgPool, MaxPool

TOL = 1e-5


def randomize_batchnorms(model, seed=0):
    """Random statistics, scale and shift in every BatchNorm (set with nnx.update)."""
    bn_paths = {tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)}
    state = nnx.state(model, lambda path, _: tuple(path[:-1]) in bn_paths)
    rng = np.random.default_rng(seed)

    def draw(name, shape):
        values = rng.uniform(0.5, 1.5, shape) if name in ("var", "scale") else rng.normal(0, 0.3, shape)
        return jnp.asarray(values, jnp.float32)

    nnx.update(model, nnx.from_flat_state([(p, draw(p[-1], v.get_value().shape))
                                           for p, v in nnx.to_flat_state(state)]))
    return model


def count(model, cls):
    return sum(type(node) is cls for _, node in nnx.iter_graph(model))


def relative_diff(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    return float(np.max(np.abs(ours - reference))) / max(1.0, float(np.max(np.abs(reference))))


forward = nnx.jit(lambda module, x: module(x))


def small_input(spec):
    return max(spec.min_size[0], 32), max(spec.min_size[1], 32)


def random_model(name, seed=0, **kwargs):
    """A registry model with random weights drawn by numpy (no initializer to compile): kernels
    normal with variance 1/fan-in, biases zero, and BatchNorms random as in `randomize_batchnorms`.

    Random BatchNorm statistics on He-scaled random weights make deep nets chaotic (SE-ResNet-101:
    a 1e-7 input change moves the logits by 30%), which no float rounding test survives.
    """
    model = zoo.create_model(name, abstract=True, **kwargs)
    rng = np.random.default_rng(seed)

    def draw(path, value):
        if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            return jnp.zeros(value.shape, value.dtype)
        if path[-1] == "kernel":
            return jnp.asarray(rng.standard_normal(value.shape) / np.sqrt(np.prod(value.shape[:-1])), value.dtype)
        return jnp.zeros(value.shape, value.dtype)

    flat = nnx.to_flat_state(nnx.state(model))
    nnx.update(model, nnx.from_flat_state([(p, draw(p, v.get_value())) for p, v in flat]))
    return randomize_batchnorms(model, seed)


# ---------------------------------------------------------------- folding
@pytest.mark.parametrize("name", zoo.list_models())
def test_every_registered_batchnorm_follows_a_conv(name):
    # Read from the forward pass of the abstract model (nothing allocated): the biggest variants too.
    model = zoo.create_model(name, num_classes=3, input_size=small_input(zoo.get_spec(name)), abstract=True)
    modules = {".".join(map(str, p)): node for p, node in nnx.iter_graph(model)}
    pairs = find_conv_batchnorm_pairs(model)
    assert sorted(bn for _, bn in pairs) == sorted(p for p, node in modules.items() if type(node) is nnx.BatchNorm)
    assert all(type(modules[conv]) is nnx.Conv for conv, _ in pairs) and len({c for c, _ in pairs}) == len(pairs)
    assert (len(pairs) > 0) == (zoo.get_spec(name).family in ("resnet", "xception", "efficientnet", "mnistnet"))


@pytest.mark.parametrize("name", smallest_of_each_family())
def test_folding_keeps_the_outputs_of_every_family(name):
    spec = zoo.get_spec(name)
    size = small_input(spec)
    model = random_model(name, num_classes=3, input_size=size)
    model.eval()
    batchnorms = count(model, nnx.BatchNorm)
    params = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    folded = fold_batchnorm(model)
    assert count(folded, nnx.BatchNorm) == 0 and count(folded, FoldedBatchNorm) == batchnorms
    assert count(model, nnx.BatchNorm) == batchnorms  # the input is untouched
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        np.testing.assert_array_equal(v.get_value(), params[p])
    x = jax.random.normal(jax.random.key(1), (2, *size, spec.input_shape[2]))
    assert relative_diff(forward(folded, x), forward(model, x)) <= TOL


def mnistnet_fcn():
    model = randomize_batchnorms(zoo.create_model("mnistnet", num_classes=10, rngs=0), seed=3)
    model.eval()
    return to_fcn(model)


def test_folded_fcn_gives_the_same_score_maps():
    fcn = mnistnet_fcn()
    folded = fold_batchnorm(fcn)
    assert isinstance(folded, convert.FCN) and count(folded, nnx.BatchNorm) == 0
    assert folded.geometry == fcn.geometry
    x = jax.random.normal(jax.random.key(2), (1, 45, 61, 1))
    assert relative_diff(forward(folded, x), forward(fcn, x)) <= TOL


def test_dense_predictor_folds_by_default():
    """The predictor (predict-dense, segment) runs eval-mode nets folded; the scores stay the unfolded ones."""
    fcn = mnistnet_fcn()
    net = convert.load_shipped_segmentation("mnistnet_fcn8s", "digit_scenes")
    image = np.asarray(jax.random.uniform(jax.random.key(2), (45, 61, 1)))
    for network in (fcn, net):
        folded, unfolded = convert.DensePredictor(network), convert.DensePredictor(network, fold=False)
        assert folded.folded_batchnorms == count(network, nnx.BatchNorm) > 0
        assert unfolded.folded_batchnorms == 0 and count(network, nnx.BatchNorm) > 0  # the network is untouched
        assert count(nnx.merge(folded._graphdef, folded._state), nnx.BatchNorm) == 0
        assert relative_diff(folded.predict(image).scores, unfolded.predict(image).scores) <= TOL


class SkipAfterConv(nnx.Module):
    """bn(conv(x)) + conv(x): the conv's output is read twice, folding would change the skip."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class TrainStatistics(nnx.Module):
    """A BatchNorm told to use batch statistics even in eval mode: not a fixed affine map."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x), use_running_average=False)


class SharedConv(nnx.Module):
    """One conv called twice, a BatchNorm after one of the calls."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.conv(self.bn(self.conv(x)))


@pytest.mark.parametrize("factory, channels", [(SkipAfterConv, 3), (TrainStatistics, 3), (SharedConv, 4)])
def test_what_cannot_fold_stays(factory, channels):
    model = randomize_batchnorms(factory(nnx.Rngs(0)))
    model.eval()
    assert find_conv_batchnorm_pairs(model, (9, 9, channels)) == []
    folded = fold_batchnorm(model, (9, 9, channels))
    assert count(folded, nnx.BatchNorm) == 1
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, channels))
    np.testing.assert_array_equal(folded(x), model(x))


def test_user_sequential_folds_with_and_without_conv_bias():
    rngs = nnx.Rngs(0)
    model = randomize_batchnorms(nnx.Sequential(
        nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs), nnx.BatchNorm(8, rngs=rngs), Activation("relu"),
        nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs), nnx.BatchNorm(8, use_scale=False, rngs=rngs),
        MaxPool(2), nnx.Conv(8, 5, (1, 1), rngs=rngs), nnx.BatchNorm(5, use_bias=False, epsilon=0.1, rngs=rngs)))
    model.eval()
    assert find_conv_batchnorm_pairs(model, (12, 12, 3)) == [("layers.0", "layers.1"), ("layers.3", "layers.4"),
                                                             ("layers.6", "layers.7")]
    folded = fold_batchnorm(model, (12, 12, 3))
    assert folded.layers[0].use_bias and count(folded, nnx.BatchNorm) == 0
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 3))
    assert relative_diff(folded(x), model(x)) <= TOL


# ---------------------------------------------------------------- CPU paths under symbolic sizes
@pytest.fixture
def every_size_takes_the_fast_path(monkeypatch):
    monkeypatch.setattr(cpu_conv, "MIN_WORK", 0)
    monkeypatch.setattr(cpu_conv, "MIN_POOL_SIZE", 0)


NHWC = ("NHWC", "HWIO", "NHWC")
SYMBOLIC_CASES = [  # (cin, cout, kernel, stride, padding, groups)
    (2, 6, 3, 2, "SAME", 1),      # im2col product, padding an expression of the size
    (16, 8, 3, 2, "SAME", 1),     # XLA's forward, per-tap kernel gradient
    (8, 8, 3, 2, "SAME", 8),      # depthwise
    (8, 4, 1, 2, "SAME", 1),      # strided 1x1
    (4, 4, 5, 1, "VALID", 1),
]


def symbolic_images(channels, least=5):
    n, h, w = export.symbolic_shape("n, h, w", constraints=(f"h >= {least}", f"w >= {least}"))
    return jax.ShapeDtypeStruct((n, h, w, channels), jnp.float32)


def test_cpu_conv_exports_with_symbolic_sizes(every_size_takes_the_fast_path):
    kernels = [jax.random.normal(jax.random.key(k), (kernel, kernel, cin // groups, cout)) / kernel
               for k, (cin, cout, kernel, _, _, groups) in enumerate(SYMBOLIC_CASES)]

    def values_and_grads(conv):
        """Each case's value and (input, kernel) gradients, all on one image batch."""
        def run(x, kernels):
            out = []
            for (cin, _, _, stride, padding, groups), w in zip(SYMBOLIC_CASES, kernels):
                def loss(x, w, cin=cin, stride=stride, padding=padding, groups=groups):
                    return jnp.sin(conv(x[..., :cin], w, (stride, stride), padding, dimension_numbers=NHWC,
                                        feature_group_count=groups)).sum()
                out.append(jax.value_and_grad(loss, argnums=(0, 1))(x, w))
            return out
        return run

    for (cin, _, kernel, stride, padding, groups), w in zip(SYMBOLIC_CASES, kernels):
        def conv(x, w=w, stride=stride, padding=padding, groups=groups):
            return cpu_conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC,
                                                 feature_group_count=groups)
        jaxpr = str(jax.make_jaxpr(conv)(symbolic_images(cin)))
        assert "custom_vjp" in jaxpr or "conv_general_dilated" not in jaxpr  # the fast path, not XLA's op
    exported = export.export(jax.jit(values_and_grads(cpu_conv.conv_general_dilated)))(
        symbolic_images(16), [jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in kernels])
    reference = jax.jit(values_and_grads(lax.conv_general_dilated))
    for size in [(5, 6), (11, 8)]:  # odd and even sides
        x = jax.random.normal(jax.random.key(size[0]), (2, *size, 16))
        for ours, ref in zip(jax.tree.leaves(exported.call(x, kernels)), jax.tree.leaves(reference(x, kernels))):
            np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))


def test_max_pool_exports_with_symbolic_sizes(every_size_takes_the_fast_path):
    pools = [MaxPool(3, 2, "SAME"), MaxPool(2, 2, "VALID"), MaxPool(3, 1, "VALID")]

    def values_and_grads(pool_fn):
        return lambda x: [jax.value_and_grad(lambda x, pool=pool: jnp.sin(pool_fn(pool, x)).sum())(x)
                          for pool in pools]

    ours = values_and_grads(lambda pool, x: pool(x))
    exported = export.export(jax.jit(ours))(symbolic_images(3, least=4))
    reference = jax.jit(values_and_grads(
        lambda pool, x: nnx.max_pool(x, pool.window, strides=pool.strides, padding=pool.padding)))
    for size in [(4, 5), (9, 8)]:
        x = jnp.round(2 * jax.random.normal(jax.random.key(size[1]), (2, *size, 3))) / 2  # ties, as ReLU makes
        for value, ref in zip(jax.tree.leaves(exported.call(x)), jax.tree.leaves(reference(x))):
            np.testing.assert_array_equal(value, ref)


# ---------------------------------------------------------------- export
RUN_WITH_JAX_ONLY = textwrap.dedent("""
    import sys
    import numpy as np
    from jax import export
    run = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
    for path in sys.argv[2:]:
        np.save(path + ".scores.npy", np.asarray(run.call(np.load(path))))
    ours = {m.split(".")[0] for m in sys.modules}
    assert not ours & {"flax", "zoo", "convert", "train"}, sorted(ours & {"flax", "zoo", "convert", "train"})
""")


def saved_fcn(tmp_path, name, **kwargs):
    from zoo.cli import main

    model = randomize_batchnorms(zoo.create_model(name, rngs=0, **kwargs), seed=5)
    saving.save_model(model, tmp_path / "clf", model_name=name, kwargs=kwargs)
    assert main(["convert", str(tmp_path / "clf"), "--out", str(tmp_path / "fcn")]) == 0
    return tmp_path / "fcn"


def test_exported_fcn_runs_without_this_project_on_odd_sizes(tmp_path, capsys):
    from zoo.cli import main

    fcn_dir = saved_fcn(tmp_path, "mnistnet", num_classes=10)
    artifact = tmp_path / "mnistnet.stablehlo"
    capsys.readouterr()
    assert main(["export", str(fcn_dir), "--out", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert main(["export", str(fcn_dir), "--out", str(artifact)]) == 2  # an earlier export: only with --force
    assert "--force" in capsys.readouterr().err
    live = convert.load_fcn(fcn_dir)
    assert f"BatchNorms folded into their convolutions: {count(live, nnx.BatchNorm)}" in text and "h >= 28" in text
    info = json.loads((tmp_path / "mnistnet.stablehlo.json").read_text())
    assert info["input"]["shape"] == ["n", "h", "w", "1"] and len(info["verified"]) == 3
    sizes = [(29, 31), (37, 45), (53, 33)]
    inputs = []
    for k, (h, w) in enumerate(sizes):
        inputs.append(tmp_path / f"x{k}.npy")
        np.save(inputs[-1], np.asarray(jax.random.normal(jax.random.key(k), (1 + k % 2, h, w, 1))))
    subprocess.run([sys.executable, "-c", RUN_WITH_JAX_ONLY, str(artifact), *map(str, inputs)], check=True,
                   timeout=120, cwd=tmp_path)
    for path in inputs:
        scores, reference = np.load(f"{path}.scores.npy"), forward(live, jnp.asarray(np.load(path)))
        assert scores.shape == reference.shape
        assert relative_diff(scores, reference) <= TOL


def lenet5_fcn():
    model = zoo.create_model("lenet5", num_classes=10, rngs=0)
    model.eval()
    return to_fcn(model)


def test_export_refuses_sizes_smaller_than_the_receptive_field():
    with pytest.raises(ValueError, match=r"receptive field\).*20x20.*at least 32x32"):
        export_fcn(lenet5_fcn(), min_size=20, verify=False)
    # A padded net: the symbolic backbone map must provably hold the head's 7x7 window.
    with pytest.raises(ValueError, match=r"needs a backbone map of at least 7x7 cells.*h >= 8"):
        export_fcn(mnistnet_fcn(), min_size=8, verify=False)


def test_export_cli_errors_are_one_line(tmp_path, capsys):
    from zoo.cli import main

    model = zoo.create_model("lenet5", num_classes=10, rngs=0)
    saving.save_model(model, tmp_path / "clf", model_name="lenet5", kwargs={"num_classes": 10})
    assert main(["convert", str(tmp_path / "clf"), "--out", str(tmp_path / "fcn")]) == 0
    capsys.readouterr()
    for extra, message in [(["--min-size", "16x40"], "receptive field"), (["--format", "onnx"], "ONNX export"),
                           (["--min-size", "big"], "HxW")]:
        assert main(["export", str(tmp_path / "fcn"), "--out", str(tmp_path / "x.stablehlo"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert main(["export", str(tmp_path / "clf"), "--out", str(tmp_path / "x.stablehlo")]) == 2
    assert "zoo convert" in capsys.readouterr().err
    assert not (tmp_path / "x.stablehlo").exists()
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["export", str(tmp_path / "fcn"), "--out", str(tmp_path / "notes.txt"), "--force"]) == 2
    assert "not an export" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "mine"


def parity_fcn():
    """EfficientNet's stride-2 conv, whose padding depends on whether the side is even."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(DownsampleConv(1, 4, 3, padding_mode="correct_pad", dtype=jnp.float32, rngs=rngs),
                           Activation("relu"),
                           DownsampleConv(4, 4, 3, padding_mode="correct_pad", dtype=jnp.float32, rngs=rngs),
                           GlobalAvgPool(), nnx.Linear(4, 3, rngs=rngs))
    return to_fcn(model, (16, 16, 1))


def test_export_catches_a_size_branch_symbolic_shapes_cannot_see(tmp_path):
    fcn = parity_fcn()
    with pytest.raises(ValueError, match="--multiple-of 4: the total stride"):
        export_fcn(fcn)
    exported = export_fcn(fcn, multiple_of=4)
    assert exported.info["input"]["shape"] == ["n", "4*h", "4*w", "1"] and len(exported.info["verified"]) == 3
    run = load_exported(exported.save(tmp_path / "parity.stablehlo"))
    x = jax.random.normal(jax.random.key(0), (1, 20, 28, 1))
    assert relative_diff(run.call(x), fcn(x)) <= TOL
