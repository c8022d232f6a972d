"""scripts/bench_vs_torch.py's PyTorch twins compute what the zoo models compute, from the same weights.

PyTorch (torch.nn only, scripts/torch_reference.py) is the independent implementation: equal
parameter counts, equal eval-mode logits after the zoo's weights are copied over (random BatchNorm
statistics, so a swapped mean/variance or a wrong layout would show), and equal losses over one
SGD step with Nesterov momentum: the library's own training step (`train.loop`) against
`loss.backward(); opt.step()`. The ImageNet families run narrow (family width options, the same
layer names and layout as the registered variant) so that the file stays fast; VGG-16 and its FCN
are checked at full size by the benchmark itself (and by its --quick run) before it times them.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import bench_vs_torch as bench  # noqa: E402

TOLERANCE = 1e-5  # relative to the largest |logit|
NARROW_RESNET = {"stage_widths": (8, 16, 32, 64), "stem_width": 8}
NARROW_XCEPTION = {"stem_widths": (8, 16), "entry_widths": (16, 24, 32), "middle_width": 32, "middle_depth": 2,
                   "exit_widths": (32, 48), "final_widths": (48, 64)}


def images(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


def check_eval(ours, theirs, x):
    n_ours, n_theirs = bench.count_params(ours, theirs)
    assert n_ours == n_theirs
    equal = bench.check_equal(ours, theirs, x, fast_compile=True)
    assert equal["rel"] < TOLERANCE, equal


def check_two_steps(ours, theirs, x, y):
    """The losses of two SGD steps on one batch: the first from the same weights, the second after one update.

    Gradients through train-mode BatchNorm agree to about 1e-4 (float32 cancellation in the batch
    statistics), so the second loss is compared to 1e-3 and the first step's effect on it to 1%."""
    step_ours = bench.zoo_train_step(ours, x, y, learning_rate=0.02, fast_compile=True)
    step_theirs = bench.torch_train_step(theirs, bench.to_torch_images(x), torch.from_numpy(y.astype(np.int64)),
                                         learning_rate=0.02)
    first = step_ours(), step_theirs()
    second = step_ours(), step_theirs()
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    assert second[0] == pytest.approx(second[1], rel=1e-3)
    change = second[0] - first[0], second[1] - first[1]
    assert abs(change[1]) > 0.05  # the update moved the loss
    assert change[0] == pytest.approx(change[1], rel=1e-2)


def test_mnistnet_equals_pytorch():
    ours, theirs = bench.build_pair("mnistnet", dropout=0.0)
    assert bench.count_params(ours, theirs) == (64_058, 64_058)
    x = images((16, 28, 28, 1))
    check_eval(ours, theirs, x)
    check_two_steps(ours, theirs, x, np.arange(16) % 10)


def test_resnet_equals_pytorch():
    # 64x64: a 2x2 last map, so BatchNorm's batch statistics there average 16 values; at 32x32 (4 values)
    # the step's float rounding grows to 1e-4 of the second loss, on both sides alike.
    ours, theirs = bench.build_pair("resnet18", 64, num_classes=10, **NARROW_RESNET)
    x = images((4, 64, 64, 3), seed=1)
    check_eval(ours, theirs, x)
    check_two_steps(ours, theirs, x, np.array([0, 3, 7, 9]))


@pytest.mark.parametrize("arch, size, options", [("resnet50", 64, NARROW_RESNET),
                                                 ("efficientnet_b0", 64, {"width_multiplier": 0.25}),
                                                 ("xception", 73, NARROW_XCEPTION)])
def test_eval_equals_pytorch(arch, size, options):
    # resnet50: bottleneck blocks (stride in the 3x3 conv, as torchvision);
    # 64: every stride-2 conv of EfficientNet sees an even side, where Keras and the zoo pad (k/2 - 1, k/2)
    # and torchvision (k - 1)/2 on both; 73: Xception's stride-2 SAME max pools see even and odd sides.
    ours, theirs = bench.build_pair(arch, size, num_classes=10, **options)
    check_eval(ours, theirs, images((2, size, size, 3), seed=2))
