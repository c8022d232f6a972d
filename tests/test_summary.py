"""Checks of `zoo.summarize` against outside numbers.

The book's network and its figures are from Géron, Hands-On Machine Learning (3rd ed.),
chapter 14, exercise 2: 903,400 parameters, 12,613,600 bytes for one inference,
565,613,600 bytes to train on a batch of 50. Per-layer parameters are checked against
the k*k*cin*cout + cout formula, FLOPs and memory against what XLA itself reports.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import zoo
from zoo import cli, registry
from zoo.classifier import Classifier, dense_head
from zoo.layers import Activation, Flatten, MaxPool
from zoo.summary import summarize


def book_network(between=None):
    """Three 3x3 stride-2 SAME convolutions with 100, 200, 400 maps, as a user would write it."""
    rngs = nnx.Rngs(0)
    convs = [nnx.Conv(cin, cout, kernel_size=(3, 3), strides=2, padding="SAME", rngs=rngs)
             for cin, cout in [(3, 100), (100, 200), (200, 400)]]
    layers = []
    for conv in convs:
        layers.append(conv)
        if between is not None:
            layers.append(between())
    return nnx.Sequential(*layers)


@pytest.mark.parametrize("between", [None, lambda: jax.nn.relu, lambda: Activation("relu")],
                         ids=["no-activation", "relu-function", "relu-module"])
def test_book_network_numbers(between):
    # Built with real weights once, as a user would; abstractly (no init compute) otherwise.
    model = book_network(between) if between is None else zoo.eval_shape(lambda: book_network(between))
    summary = summarize(model, (200, 300, 3), batch_size=50, xla=False)
    assert summary.params == 903_400
    assert summary.inference_bytes(1) == 12_613_600
    assert summary.training_bytes() == 565_613_600
    assert [r.output_shape for r in summary.layers if r.kind == "Conv"] == [
        (1, 100, 150, 100), (1, 50, 75, 200), (1, 25, 38, 400)]


def small_net():
    rngs = nnx.Rngs(1)
    return nnx.Sequential(
        nnx.Conv(3, 8, kernel_size=(3, 3), padding="VALID", rngs=rngs),
        Activation("relu"),
        nnx.Conv(8, 16, kernel_size=(5, 5), strides=2, padding="VALID", rngs=rngs),
        Flatten(),
        nnx.Linear(16 * 6 * 6, 10, rngs=rngs),
    )


def test_parameters_match_formula_and_count_params():
    model = zoo.eval_shape(small_net)
    summary = summarize(model, (18, 18, 3), xla=False)
    expected = {"Conv": [3 * 3 * 3 * 8 + 8, 5 * 5 * 8 * 16 + 16], "Linear": [16 * 6 * 6 * 10 + 10]}
    got = {kind: [r.params for r in summary.layers if r.kind == kind] for kind in expected}
    assert got == expected
    assert summary.params == zoo.count_params(model) == sum(sum(v) for v in expected.values())
    assert summary.param_bytes == 4 * summary.params
    assert summary.unattributed_params == 0


def test_flops_match_xla_cost_analysis():
    # With VALID padding every kernel tap meets a real pixel, so XLA's count of a conv or
    # dense layer is 2 x multiply-adds, as ours; XLA also counts one flop per output element
    # of each bias add and of the relu, which the book-style count leaves out. We add those
    # (computed from the output shapes) and allow 0.1% for any bookkeeping XLA adds. Without
    # them the two differ by about 1 / (2 k k cin) of a layer's FLOPs per op (1.3% here).
    summary = summarize(zoo.eval_shape(small_net), (18, 18, 3), batch_size=2)
    elementwise = sum(math.prod(r.output_shape) for r in summary.layers
                      if r.kind in ("Conv", "Linear", "Activation"))
    inference_1 = next(f for f in summary.xla if f.what == "inference" and f.batch_size == 1)
    assert inference_1.flops == pytest.approx(summary.flops + elementwise, rel=1e-3)
    assert inference_1.flops == pytest.approx(summary.flops, rel=0.02)


def test_xla_memory_figures_present_and_positive():
    summary = summarize(zoo.eval_shape(book_network), (200, 300, 3), batch_size=4)
    assert [(f.what, f.batch_size) for f in summary.xla] == [("inference", 1), ("inference", 4), ("training", 4)]
    for fig in summary.xla:
        assert fig.argument_bytes > 0 and fig.output_bytes > 0 and fig.temp_bytes > 0 and fig.total_bytes > 0
    for fig in summary.xla[:2]:
        # Inference arguments are exactly the parameters and the input batch.
        assert fig.argument_bytes == summary.param_bytes + fig.batch_size * 200 * 300 * 3 * 4
        # The logits of the last conv come out: 25x38x400 floats per image.
        assert fig.output_bytes == fig.batch_size * 25 * 38 * 400 * 4
    # A training step returns a gradient for every parameter.
    assert summary.xla[2].output_bytes >= summary.param_bytes
    assert [c["estimate_bytes"] for c in summary.comparisons()] == [
        summary.inference_bytes(1), summary.inference_bytes(4), summary.training_bytes(4)]


def tiny_classifier(rngs, *, num_classes=10, input_shape=(32, 32, 3), dtype=jnp.float32, **_):
    features = nnx.Sequential(
        nnx.Conv(input_shape[2], 16, kernel_size=(3, 3), dtype=dtype, rngs=rngs),
        nnx.BatchNorm(16, dtype=dtype, rngs=rngs), Activation("relu"), MaxPool(2),
        nnx.Conv(16, 32, kernel_size=(3, 3), dtype=dtype, rngs=rngs), Activation("relu"))
    h, w = input_shape[0] // 2, input_shape[1] // 2
    head = dense_head("flatten", h * w * 32, num_classes, hidden=(64,), dropout=0.5, dtype=dtype, rngs=rngs)
    return Classifier(features, head, input_shape=input_shape, min_size=(8, 8), name="tiny")


def test_nested_abstract_classifier_and_grouping():
    model = zoo.eval_shape(lambda: tiny_classifier(nnx.Rngs(params=0, dropout=1)))
    before = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(model))
    summary = summarize(model, (32, 32, 3), batch_size=3)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(model)) == before
    assert summary.params == zoo.count_params(model)
    # BatchNorm scale and bias are parameters; its statistics (2 x 16 floats) are not.
    assert [r.params for r in summary.layers if r.kind == "BatchNorm"] == [32]
    assert summary.other_state_bytes >= 2 * 16 * 4
    # In-place layers take no new memory; counted activations are the conv, pool, dense outputs.
    counted = [r.kind for r in summary.layers if not r.in_place]
    assert counted == ["Conv", "MaxPool", "Conv", "Linear", "Linear"]
    grouped = summary.grouped(1)
    assert [r.path for r in grouped] == ["features", "head"]
    assert grouped[0].output_shape == zoo.output_shape(model.features, (1, 32, 32, 3)) == (1, 16, 16, 32)
    for field in ("params", "activation_bytes", "flops"):
        assert sum(getattr(r, field) for r in grouped) == sum(getattr(r, field) for r in summary.layers)
    text = str(summary)
    assert "features.layers.0" in text and "training, batch 3" in text
    assert json.loads(json.dumps(summary.to_dict()))["params"] == summary.params


def test_shared_module_counts_parameters_once():
    def twice():
        conv = nnx.Conv(4, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0))
        return nnx.Sequential(conv, conv)

    model = zoo.eval_shape(twice)
    summary = summarize(model, (8, 8, 4), xla=False)
    assert [r.params for r in summary.layers] == [3 * 3 * 4 * 4 + 4, 0]
    assert summary.params == zoo.count_params(model.layers[0])


@pytest.mark.parametrize("bad", [(224, 224, 0), (), (224.0, 224, 3)])
def test_bad_input_shape_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="input_shape"):
        summarize(zoo.eval_shape(small_net), bad)


@pytest.mark.parametrize("bad", ["224x224", "axb", "224x224x3x1", "0x224x3"])
def test_cli_bad_input_is_one_line(bad, capsys):
    assert cli.main(["summary", "anything", "--input", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "HxWxC" in err and "224x224x3" in err


@pytest.fixture
def tiny_registered(monkeypatch):
    """A test-only model in the registry for the duration of one test."""
    spec = registry.ModelSpec(
        name="summary_test_tiny", family="test", builder=tiny_classifier, options={"test_only": True},
        paper="test", year=2026, url="https://example.org", introduced="test", input_shape=(32, 32, 3),
        min_size=(8, 8), head_kind="flatten", total_stride=2, feature_shape=(16, 16, 32), num_params=0)
    monkeypatch.setitem(registry._REGISTRY, spec.name, spec)
    return spec.name


def test_cli_json(tiny_registered, capsys):
    assert cli.main(["summary", tiny_registered, "--input", "16x16x3", "--batch", "2",
                     "--num-classes", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    model = zoo.eval_shape(lambda: tiny_classifier(nnx.Rngs(0), num_classes=5, input_shape=(16, 16, 3)))
    assert data["params"] == zoo.count_params(model)
    assert data["input_shape"] == [16, 16, 3]
    assert [c["what"] for c in data["comparisons"]] == ["inference", "inference", "training"]
    assert all(c["xla_total_bytes"] > 0 for c in data["comparisons"])


def test_cli_table_depth(tiny_registered, capsys):
    assert cli.main(["summary", tiny_registered, "--depth", "1", "--no-xla"]) == 0
    out = capsys.readouterr().out
    assert "grouped to depth 1" in out and "features.layers.0" not in out and "inference, 1 example" in out


@pytest.mark.parametrize("name,input_size", [("lenet5", "32x32x1"), ("resnet18", "64x64x3")])
def test_cli_json_registered_model(name, input_size, capsys):
    if name not in zoo.list_models():
        pytest.skip(f"{name} is not registered yet")
    assert cli.main(["summary", name, "--input", input_size, "--batch", "2", "--json", "--no-xla"]) == 0
    data = json.loads(capsys.readouterr().out)
    h, w, c = map(int, input_size.split("x"))
    model = zoo.eval_shape(lambda: zoo.create_model(name, input_size=(h, w), in_channels=c))
    assert data["params"] == zoo.count_params(model)
    assert data["unattributed_params"] == 0
