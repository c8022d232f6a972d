"""torchvision state dicts imported into zoo models, checked without torchvision.

torchvision does not import on this machine, so state dicts are built here from
torchvision's documented parameter names and shapes (random values), saved as
safetensors (and .pth when PyTorch is installed), imported, and compared with an
independent forward pass written with `torch.nn.functional` from the same dict.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import zoo
from zoo.importers import import_torch, read_torch_state_dict
from zoo.importers.loading import build_abstract, fill_model, head_dense_paths, weight_shapes
from zoo.importers.reference import relative_error
from zoo.importers.torch import torch_to_zoo
from zoo.saving import WeightsMismatchError

TOLERANCE = 1e-4


def run(model, x):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, x))


class StateDict:
    """Random tensors under torchvision's names: conv (out, in, kh, kw), linear (out, in), BatchNorm."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.tensors: dict[str, np.ndarray] = {}

    def conv(self, name, out, cin, k, bias=False):
        self.tensors[f"{name}.weight"] = self.rng.normal(0, (2 / (cin * k * k)) ** 0.5, (out, cin, k, k))
        if bias:
            self.tensors[f"{name}.bias"] = self.rng.normal(0, 0.1, out)

    def bn(self, name, c):
        self.tensors[f"{name}.weight"] = self.rng.uniform(0.5, 1.5, c)
        self.tensors[f"{name}.bias"] = self.rng.normal(0, 0.1, c)
        self.tensors[f"{name}.running_mean"] = self.rng.normal(0, 0.1, c)
        self.tensors[f"{name}.running_var"] = self.rng.uniform(0.5, 1.5, c)
        self.tensors[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    def linear(self, name, out, cin):
        self.tensors[f"{name}.weight"] = self.rng.normal(0, cin ** -0.5, (out, cin))
        self.tensors[f"{name}.bias"] = self.rng.normal(0, 0.1, out)

    def arrays(self):
        return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in self.tensors.items()}


def resnet_state_dict(block, depths, num_classes=1000, seed=0):
    """torchvision.models.resnet names: conv1, bn1, layer{1-4}.{b}.conv{i}/bn{i}/downsample.{0,1}, fc."""
    sd = StateDict(seed)
    sd.conv("conv1", 64, 3, 7)
    sd.bn("bn1", 64)
    channels = 64
    for s, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512))):
        for b in range(depth):
            p = f"layer{s + 1}.{b}"
            if block == "basic":
                sd.conv(f"{p}.conv1", width, channels, 3), sd.bn(f"{p}.bn1", width)
                sd.conv(f"{p}.conv2", width, width, 3), sd.bn(f"{p}.bn2", width)
                out = width
            else:
                sd.conv(f"{p}.conv1", width, channels, 1), sd.bn(f"{p}.bn1", width)
                sd.conv(f"{p}.conv2", width, width, 3), sd.bn(f"{p}.bn2", width)
                sd.conv(f"{p}.conv3", 4 * width, width, 1), sd.bn(f"{p}.bn3", 4 * width)
                out = 4 * width
            if b == 0 and (s > 0 or channels != out):
                sd.conv(f"{p}.downsample.0", out, channels, 1), sd.bn(f"{p}.downsample.1", out)
            channels = out
    sd.linear("fc", num_classes, channels)
    return sd.arrays()


def torch_resnet(state, x, block, depths):
    """torchvision's ResNet forward (v1.5: a bottleneck strides in its 3x3), from functional ops."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}

    def bn(name, y):
        return F.batch_norm(y, t[f"{name}.running_mean"], t[f"{name}.running_var"], t[f"{name}.weight"],
                            t[f"{name}.bias"], training=False, eps=1e-5)

    y = torch.from_numpy(x).permute(0, 3, 1, 2)
    y = F.max_pool2d(F.relu(bn("bn1", F.conv2d(y, t["conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    for s, depth in enumerate(depths):
        for b in range(depth):
            p, stride = f"layer{s + 1}.{b}", 2 if s > 0 and b == 0 else 1
            if block == "basic":
                z = F.relu(bn(f"{p}.bn1", F.conv2d(y, t[f"{p}.conv1.weight"], stride=stride, padding=1)))
                z = bn(f"{p}.bn2", F.conv2d(z, t[f"{p}.conv2.weight"], padding=1))
            else:
                z = F.relu(bn(f"{p}.bn1", F.conv2d(y, t[f"{p}.conv1.weight"])))
                z = F.relu(bn(f"{p}.bn2", F.conv2d(z, t[f"{p}.conv2.weight"], stride=stride, padding=1)))
                z = bn(f"{p}.bn3", F.conv2d(z, t[f"{p}.conv3.weight"]))
            shortcut = y
            if f"{p}.downsample.0.weight" in t:
                shortcut = bn(f"{p}.downsample.1", F.conv2d(y, t[f"{p}.downsample.0.weight"], stride=stride))
            y = F.relu(z + shortcut)
    return F.linear(y.mean(dim=(2, 3)), t["fc.weight"], t["fc.bias"]).numpy()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    state = resnet_state_dict("basic", (2, 2, 2, 2))
    path = tmp_path_factory.mktemp("torch") / "resnet18.safetensors"
    save_file(state, str(path))
    return state, path


def test_resnet18_from_safetensors_matches_torch(resnet18_file):
    state, path = resnet18_file
    imported = import_torch("resnet18", path)
    assert imported.metadata["preprocessing"] == "torch"
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    assert relative_error(run(imported.model, x), torch_resnet(state, x, "basic", (2, 2, 2, 2))) < TOLERANCE


def test_resnet50_pth_read_with_weights_only_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    state = resnet_state_dict("bottleneck", (3, 4, 6, 3), seed=2)
    path = tmp_path / "resnet50.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    imported = import_torch("resnet50", path)
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    assert relative_error(run(imported.model, x), torch_resnet(state, x, "bottleneck", (3, 4, 6, 3))) < TOLERANCE


class NotATensor:
    """Anything a pickle could carry besides tensors; weights_only loading must refuse it."""


def test_pth_with_arbitrary_objects_is_refused_not_unpickled(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        read_torch_state_dict(path)


def test_vgg_flatten_order_is_converted(tmp_path):
    """torchvision flattens (512, 7, 7) channel-first; our Flatten is (7, 7, c). Narrow VGG-11 at 224."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    table = zoo.get_spec("vgg11").options["layers"]
    narrow = tuple(e if e == "M" else e // 16 for e in table)  # same layer positions, 4..32 maps
    sd, index, cin = StateDict(4), 0, 3
    for entry in narrow:
        if entry == "M":
            index += 1
            continue
        sd.conv(f"features.{index}", entry, cin, 3, bias=True)
        index, cin = index + 2, entry
    sd.linear("classifier.0", 4096, cin * 49), sd.linear("classifier.3", 4096, 4096), sd.linear("classifier.6", 5, 4096)
    state = sd.arrays()
    model = build_abstract("vgg11", layers=narrow, num_classes=5)
    fill_model(model, torch_to_zoo("vgg11", state, head_dense_paths(model)), source="narrow vgg11")
    x = np.random.default_rng(5).normal(size=(1, 224, 224, 3)).astype(np.float32)
    t = {k: torch.from_numpy(v) for k, v in state.items()}
    y, index = torch.from_numpy(x).permute(0, 3, 1, 2), 0
    for entry in narrow:
        if entry == "M":
            y, index = F.max_pool2d(y, 2, 2), index + 1
        else:
            y = F.relu(F.conv2d(y, t[f"features.{index}.weight"], t[f"features.{index}.bias"], padding=1))
            index += 2
    y = torch.flatten(F.adaptive_avg_pool2d(y, (7, 7)), 1)
    y = F.relu(F.linear(y, t["classifier.0.weight"], t["classifier.0.bias"]))
    y = F.relu(F.linear(y, t["classifier.3.weight"], t["classifier.3.bias"]))
    expected = F.linear(y, t["classifier.6.weight"], t["classifier.6.bias"]).numpy()
    assert relative_error(run(model, x), expected) < TOLERANCE


def efficientnet_b0_state_dict(seed=6):
    """torchvision.models.efficientnet_b0 names: features.0 stem, features.1-7 stages of
    `block` Sequentials (expand, depthwise, SE fc1/fc2, project), features.8 top conv, classifier.1."""
    from zoo.efficientnet import B0_STAGES

    sd = StateDict(seed)
    sd.conv("features.0.0", 32, 3, 3), sd.bn("features.0.1", 32)
    for s, stage in enumerate(B0_STAGES):
        for r in range(stage.repeats):
            cin = stage.in_filters if r == 0 else stage.out_filters
            width, p, j = cin * stage.expand_ratio, f"features.{s + 1}.{r}.block", 0
            if stage.expand_ratio != 1:
                sd.conv(f"{p}.0.0", width, cin, 1), sd.bn(f"{p}.0.1", width)
                j = 1
            sd.conv(f"{p}.{j}.0", width, 1, stage.kernel), sd.bn(f"{p}.{j}.1", width)
            squeeze = max(1, cin // 4)
            sd.conv(f"{p}.{j + 1}.fc1", squeeze, width, 1, bias=True)
            sd.conv(f"{p}.{j + 1}.fc2", width, squeeze, 1, bias=True)
            sd.conv(f"{p}.{j + 2}.0", stage.out_filters, width, 1), sd.bn(f"{p}.{j + 2}.1", stage.out_filters)
    sd.conv("features.8.0", 1280, 320, 1), sd.bn("features.8.1", 1280)
    sd.linear("classifier.1", 1000, 1280)
    return sd.arrays()


def test_efficientnet_mapping_is_complete_but_the_import_is_refused(tmp_path):
    state = efficientnet_b0_state_dict()
    abstract = build_abstract("efficientnet_b0", bn_epsilon=1e-5)
    flat = torch_to_zoo("efficientnet_b0", state, head_dense_paths(abstract))
    assert {k: v.shape for k, v in flat.items()} == weight_shapes(abstract)
    path = tmp_path / "efficientnet_b0.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="symmetric"):
        import_torch("efficientnet_b0", path)


@pytest.mark.parametrize("arch,reason", [("alexnet", "One weird trick"), ("googlenet", "BatchNorm")])
def test_different_torchvision_networks_are_refused_with_the_reason(arch, reason, tmp_path):
    with pytest.raises(ValueError, match=reason):
        import_torch(arch, tmp_path / "unused.pth")


def test_vgg_bn_state_dict_is_refused(tmp_path):
    sd = StateDict()
    sd.conv("features.0", 64, 3, 3, bias=True), sd.bn("features.1", 64)
    path = tmp_path / "vgg11_bn.safetensors"
    save_file(sd.arrays(), str(path))
    with pytest.raises(ValueError, match="BatchNorm"):
        import_torch("vgg11", path)


def test_a_state_dict_that_does_not_fit_is_reported(resnet18_file, tmp_path):
    state, _ = resnet18_file
    broken = dict(state)
    del broken["layer1.0.conv1.weight"]
    broken["layer1.0.conv9.weight"] = np.zeros((1,), np.float32)
    broken["fc.bias"] = np.zeros(7, np.float32)
    path = tmp_path / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(WeightsMismatchError) as error:
        import_torch("resnet18", path)
    message = str(error.value)
    assert "features.stage1.0.conv1.kernel" in message and "missing from the file" in message
    assert "torch:layer1.0.conv9.weight" in message and "not in the model" in message
    assert "head.layers.0.bias" in message and "(7,)" in message


def test_new_classifier_and_the_command_line(resnet18_file, tmp_path, capsys):
    _, path = resnet18_file
    imported = import_torch("resnet18", path, num_classes=10)
    assert imported.metadata["new_head"] == ["head.layers.0"]
    assert imported.model.head.layers[0].kernel.shape == (512, 10)
    from zoo.cli import main

    out = tmp_path / "resnet18-torch"
    assert main(["import", "torch", "resnet18", str(path), "--out", str(out), "--num-classes", "10"]) == 0
    assert "preprocess_input(images, 'torch')" in capsys.readouterr().out
    saved = zoo.saving.read_weights(out / zoo.saving.WEIGHTS_FILE)
    ours = zoo.saving.flat_state(imported.model)
    for key in ("features.stem.conv.kernel", "features.stage4.1.bn2.var"):
        key = next(k for k in ours if k.startswith(key))
        np.testing.assert_array_equal(saved[key], ours[key])
    assert zoo.saving.read_config(out)["kwargs"]["num_classes"] == 10
    assert main(["import", "torch", "googlenet", str(path), "--out", str(out)]) == 2
