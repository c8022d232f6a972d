"""A backbone's stages as data, and the maps they return (timm's `feature_info` / `features_only`).

A backbone is read as an ordered flat list of steps (`backbone_steps`): applying them in
order is `backbone(x)`. A `Stage` names the step whose output is one of its multi-scale
maps, with the map's stride and channels. Every zoo classifier declares its stages
(`Classifier.stages`) from its variant's data, and one generic runner (`stage_maps`)
returns them for any family; `find_stages` finds them from shapes for any sequential
backbone, e.g. your own `nnx.Sequential`.

    extractor = zoo.create_model("resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    maps = extractor(x)                # list of (N, H/4, W/4, 256) ... (N, H/32, W/32, 2048)
    extractor.feature_info             # [Stage(name='stage1.2', stride=4, channels=256), ...]

Stride is the spacing of the map's cells in input pixels, an exact integer. On an input of
size H the map has about H / stride cells per side: ceil(H / stride) where every layer pads
SAME (H a multiple of the stride gives H / stride exactly), fewer where VALID convolutions
and pools drop border pixels (LeNet-5, AlexNet, Xception's stem). What holds for every
family is that H + k * stride pixels give exactly k more cells.

Pattern after timm's `FeatureListNet` (timm/models/_features.py), with the steps read from
the module tree instead of traced: NNX modules are plain Python objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.classifier import cheap_tracer_error_messages, check_images
from zoo.layers import NamedSequential

# Extra pixels of the second shape probe of `find_stages`: a multiple of every stride
# 2^a 3^b 5^c 7^d with a <= 8, b <= 2 (so up to a total stride of 256). Shapes only: nothing is allocated.
PROBE_PIXELS = 2**8 * 3**2 * 5 * 7


@dataclasses.dataclass(frozen=True)
class Stage:
    """One multi-scale map of a backbone.

    Attributes:
        name: dotted path of the step (as named by `backbone_steps`) whose output is the map,
            e.g. "pool4" (VGG), "stage2.1" (ResNet).
        stride: input pixels per cell of the map (1, 2, 4, 8, 16, 32 ...).
        channels: channels of the map.
    """

    name: str
    stride: int
    channels: int

    def __post_init__(self):
        for field in ("stride", "channels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Stage {self.name!r}: {field} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def last_at_each_stride(taps: Iterable[Stage]) -> tuple[Stage, ...]:
    """The last of each run of `taps` at one stride, `taps` in forward order: the end of each resolution.

    Families list their candidate maps (every step, or every pool, plus the last step);
    this keeps one stage per stride, the deepest.
    """
    stages: list[Stage] = []
    for tap in taps:
        if stages and stages[-1].stride == tap.stride:
            stages[-1] = tap
        else:
            stages.append(tap)
    return tuple(stages)


def _open(module) -> list[tuple[str, Callable]] | None:
    """The direct steps of a sequential container, or None for a single step."""
    if callable(getattr(module, "sequential_steps", None)):  # a zoo *Features module, a ResNet stem
        return list(module.sequential_steps())
    if isinstance(module, NamedSequential):
        return [(name, getattr(module, name)) for name in module.step_names]
    if isinstance(module, nnx.Sequential):
        return [(f"layers.{i}", layer) for i, layer in enumerate(module.layers)]
    if isinstance(module, nnx.List):
        return [(str(i), item) for i, item in enumerate(module)]
    return None


def backbone_steps(backbone) -> list[tuple[str, Callable]]:
    """The backbone as an ordered flat list of (dotted name, step); applying the steps in order is backbone(x).

    Opens, recursively, `nnx.Sequential` ("layers.3"), `zoo.layers.NamedSequential`
    ("conv1"), `nnx.List` ("stage1.0") and modules with a `sequential_steps()` method,
    which lists (name, step) pairs whose application in order is the module's `__call__`
    (the zoo's *Features modules and ResNet's stem). Anything else is one step. Names are
    the modules' attribute paths, so "stage1.0" holds the parameters "stage1.0.conv1.kernel";
    a backbone that opens to nothing is the one step "".
    """
    children = _open(backbone)
    if children is None:
        return [("", backbone)]
    steps: list[tuple[str, Callable]] = []
    for name, child in children:
        inner = _open(child)
        if inner is None:
            steps.append((name, child))
        else:
            steps += [(f"{name}.{sub}", step) for sub, step in backbone_steps(child)]
    return steps


def stage_maps(backbone, x, names: Sequence[str]) -> list[jax.Array]:
    """The outputs of the named steps of `backbone` on x, in the order of `names`.

    Runs `backbone_steps(backbone)` on x: (N, H, W, C), up to the deepest named step; the
    last step's name gives backbone(x) itself. Plain Python over the steps, so it works
    eagerly, under `jax.jit` / `jax.eval_shape` (of a merged module) and on an `nnx.clone`.
    Raises a ValueError listing the step names when a name is not one of them.
    """
    steps = backbone_steps(backbone)
    index = {name: i for i, (name, _) in enumerate(steps)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise ValueError(f"{unknown} are not steps of this {type(backbone).__name__}; its steps are: "
                         f"{', '.join(repr(name) for name in index)}")
    wanted = {index[name] for name in names}
    outputs = {}
    for i, (_, step) in enumerate(steps[:max(wanted, default=-1) + 1]):
        x = step(x)
        if i in wanted:
            outputs[i] = x
    return [outputs[index[name]] for name in names]


def _map_shapes(backbone, shape, dtype) -> list[tuple[str, tuple[int, ...]]]:
    """(step name, output shape) of each step up to the first output that is not a 4-D map; nothing runs."""
    graphdef, state = nnx.split(backbone) if isinstance(backbone, nnx.Module) else (None, None)

    def run(state, x):
        module = backbone if graphdef is None else nnx.merge(graphdef, state)
        outputs = []
        for _, step in backbone_steps(module):
            x = step(x)
            outputs.append(x)
            if getattr(x, "ndim", 0) != 4:
                break
        return outputs

    with cheap_tracer_error_messages():
        outputs = jax.eval_shape(run, state, jax.ShapeDtypeStruct(tuple(shape), dtype))
    names = [name for name, _ in backbone_steps(backbone)]
    return [(name, tuple(out.shape)) for name, out in zip(names, outputs)]


def find_stages(backbone, input_shape, *, dtype=jnp.float32) -> tuple[Stage, ...]:
    """Stages of any sequential backbone, found from shapes only (`jax.eval_shape`, nothing runs).

    A stage ends at the step before one that lowers the resolution (raises the stride);
    the last step whose output is a 4-D map ends the last stage (steps from the first
    output that is not one, a flatten or a global pool, are not read). The stride of each
    step's map is measured exactly as input pixels per extra cell, between the input
    (1, H, W, C) and one `PROBE_PIXELS` larger, so a VALID convolution, which drops border
    pixels but keeps the resolution, does not end a stage.

    Args:
        backbone: anything `backbone_steps` reads (an `nnx.Sequential`, a zoo `features`, ...).
        input_shape: (H, W, C) the backbone accepts.
    Returns:
        the stages, strides increasing.
    Raises:
        ValueError: a map whose stride is not an integer dividing PROBE_PIXELS (up-sampling,
            a total stride above 256) or differs between H and W.
    """
    h, w, c = input_shape
    base = _map_shapes(backbone, (1, h, w, c), dtype)
    probe = dict(_map_shapes(backbone, (1, h + PROBE_PIXELS, w + PROBE_PIXELS, c), dtype))
    taps = []
    for name, shape in base:
        if len(shape) != 4 or len(probe.get(name, ())) != 4:
            break
        grown = (probe[name][1] - shape[1], probe[name][2] - shape[2])
        if grown == (0, 0):  # a map of fixed size (a global pool keeping dims): not a stage
            break
        if min(grown) < 1 or any(PROBE_PIXELS % g for g in grown) or grown[0] != grown[1]:
            raise ValueError(
                f"step {name!r} gives a map whose stride is not one integer for H and W: "
                f"{PROBE_PIXELS} more input pixels give {grown} more cells (H, W)")
        taps.append(Stage(name, PROBE_PIXELS // grown[0], shape[3]))
    return last_at_each_stride(taps)


def select_stages(stages: Sequence[Stage], out_indices: Sequence[int] | None) -> tuple[Stage, ...]:
    """The stages at `out_indices` (negatives count from the end), in that order; None: all.

    Raises a ValueError naming the valid range for an index out of it.
    """
    stages = tuple(stages)
    if out_indices is None:
        return stages
    n = len(stages)
    bad = [i for i in out_indices if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n]
    if bad:
        names = ", ".join(f"{i}: {s.name} (stride {s.stride})" for i, s in enumerate(stages))
        raise ValueError(f"out_indices {tuple(out_indices)}: {bad} out of range; there are {n} stages, "
                         f"valid indices are {-n} .. {n - 1} ({names})")
    return tuple(stages[i] for i in out_indices)


class FeatureExtractor(nnx.Module):
    """A backbone returning the maps of selected stages (timm's `features_only=True`).

    Args:
        features: the backbone, e.g. a zoo classifier's `features` (its parameters keep their
            paths under `features.`).
        stages: the selected `Stage`s, in the order the maps are returned.
        input_shape: (H, W, C) of the model, or None; its C is checked on each call.
        min_size: smallest (H, W) the backbone accepts.
        name: used in error messages.
    x: (N, H, W, C) -> [(N, h_i, w_i, stages[i].channels) for each stage]
    """

    def __init__(self, features, stages: Sequence[Stage], *, input_shape=None, min_size=(1, 1),
                 name: str = "backbone"):
        self.features = features
        self.stages = tuple(stages)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.min_size = tuple(min_size)
        self.name = name

    @property
    def feature_info(self) -> list[Stage]:
        """The selected stages, one per returned map."""
        return list(self.stages)

    def __call__(self, x) -> list[jax.Array]:
        if self.input_shape is not None:
            check_images(x, channels=self.input_shape[-1], min_size=self.min_size, name=self.name)
        return stage_maps(self.features, x, [stage.name for stage in self.stages])
