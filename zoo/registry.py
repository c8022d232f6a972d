"""The model registry: one `ModelSpec` per variant, with the facts a user looks up.

Family files register their variants as data at import time:

    register(ModelSpec(name="resnet50", family="resnet", builder=build_resnet,
                       options={"block": "bottleneck", "stage_depths": (3, 4, 6, 3)}, ...))

`create_model(name, ...)` calls `builder(num_classes=..., input_shape=..., include_top=...,
dtype=..., rngs=..., **options)`, which returns a `zoo.classifier.Classifier` whose `stages`
the builder declares; `features_only=True` wraps its features in a `zoo.stages.FeatureExtractor`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src import core as jax_core  # trace_state_clean: no public equivalent

from zoo import cpu_conv
from zoo.classifier import cheap_tracer_error_messages
from zoo.stages import FeatureExtractor, select_stages


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the registry knows about one model variant.

    Attributes:
        name: registry key, e.g. "resnet50".
        family: architecture family, e.g. "resnet" (one source file per family).
        builder: callable building the Classifier (see module docstring).
        options: variant data passed to the builder (depths, widths, block kind, ...).
        paper: "Author et al., Title"; year; url (arXiv or proceedings link).
        introduced: one line on what the architecture brought (chapter 14, exercise 6).
        input_shape: default (H, W, C).
        min_size: smallest (H, W) the backbone accepts.
        head_kind: "flatten" or "avg".
        total_stride: input pixels per feature-map cell.
        feature_shape: (h, w, c) of `features` at the default input.
        num_params: published trainable-parameter count at the default num_classes and input.
        num_classes: default number of classes (1000 for ImageNet models).
    """

    name: str
    family: str
    builder: Callable[..., nnx.Module]
    options: dict[str, Any]
    paper: str
    year: int
    url: str
    introduced: str
    input_shape: tuple[int, int, int]
    min_size: tuple[int, int]
    head_kind: str
    total_stride: int
    feature_shape: tuple[int, int, int]
    num_params: int
    num_classes: int = 1000

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-ready data (the builder left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "builder"}
        d["options"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.options.items()}
        return d


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _ensure_families_loaded() -> None:
    # Importing the package imports every family file, which registers its variants.
    import zoo  # noqa: F401


def list_models() -> list[str]:
    """Names of every registered model, in registration order."""
    _ensure_families_loaded()
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of `name`; an unknown name raises a ValueError listing the closest names."""
    _ensure_families_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(_REGISTRY)} (see `zoo list`)."
        )
    return _REGISTRY[name]


def eval_shape(fn, *args, **kwargs):
    """`nnx.eval_shape`, fast on big models: builds `fn(*args)` with abstract arrays only."""
    with cheap_tracer_error_messages():
        return nnx.eval_shape(fn, *args, **kwargs)


def build_initialized(make):
    """`make()` (a function building an NNX module), with all initializers in one quick compile.

    Eagerly, every weight initializer compiles on its own (tens of seconds for LeNet-5 on a
    busy CPU). Here the structure comes from `eval_shape` (nothing runs) and the values from
    one jitted call compiled without XLA's backend optimizations (it runs once). The values
    equal eager `make()`'s up to float rounding (about 1 ulp in truncated-normal initializers).
    """
    graphdef = nnx.split(eval_shape(make))[0]
    state = jax.jit(lambda: nnx.state(make()), compiler_options={"xla_backend_optimization_level": 0})()
    return nnx.merge(graphdef, state)


# Arguments create_model passes to every builder itself: not family options.
_BUILDER_ARGUMENTS = {"num_classes", "input_shape", "include_top", "dtype", "rngs", "name"}


def check_options(spec: ModelSpec, options: dict[str, Any]) -> None:
    """A ValueError naming any option the family's builder does not take (with the closest names)."""
    import inspect

    if "input_shape" in options:
        raise ValueError(f"create_model takes the input's size as input_size=(H, W) and in_channels=C, not "
                         f"input_shape=; e.g. create_model({spec.name!r}, input_size=(64, 64), in_channels=3)")
    if "name" in options:
        raise ValueError(f"create_model's first argument is the registered name ({spec.name!r}); there is no name= option")
    parameters = inspect.signature(spec.builder).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = sorted(set(parameters) - _BUILDER_ARGUMENTS)
    unknown = sorted(set(options) - set(known))
    if unknown:
        hints = [f"{name!r} (did you mean {', '.join(map(repr, close))}?)" if (close := difflib.get_close_matches(
            name, known, n=2)) else repr(name) for name in unknown]
        raise ValueError(f"{spec.name} has no option {', '.join(hints)}; its {spec.family} options are: "
                         f"{', '.join(known) or 'none'}")


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    input_size: tuple[int, int] | int | None = None,
    in_channels: int | None = None,
    include_top: bool = True,
    dtype=jnp.float32,
    rngs: nnx.Rngs | int = 0,
    pretrained: str | None = None,
    abstract: bool = False,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **options,
) -> nnx.Module:
    """Build a registered model.

    Args:
        name: a name from `list_models()`.
        num_classes: classes of the head (default: the spec's).
        input_size: (H, W) or one int for square; matters for Flatten heads (default: the spec's).
        in_channels: image channels (default: the spec's).
        include_top: False returns the backbone's feature map (N, h, w, c) instead of logits.
        dtype: computation dtype (parameters stay float32), e.g. jnp.bfloat16.
        rngs: an `nnx.Rngs` or an int seed.
        pretrained: tag of shipped weights (see `zoo list`); loads them offline.
        abstract: build with shape/dtype placeholders only (nothing allocated or initialized):
            for counting parameters, summaries and shape checks of the biggest models.
        features_only: return a `zoo.stages.FeatureExtractor` over the backbone instead (no head;
            `include_top` is ignored): x -> one NHWC map per selected stage of `model.stages`.
        out_indices: with features_only, which stages (indices into the model's stages, negatives
            count from the end); default all.
        **options: family options overriding the variant's (e.g. `aux_logits=True` for GoogLeNet).
    Returns:
        a `zoo.classifier.Classifier` (or a `FeatureExtractor`), in train mode (call `.eval()` for inference).
    """
    spec = get_spec(name)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    h, w = input_size if input_size is not None else spec.input_shape[:2]
    c = in_channels if in_channels is not None else spec.input_shape[2]
    if h < spec.min_size[0] or w < spec.min_size[1]:
        raise ValueError(
            f"{name} needs an input of at least {spec.min_size[0]}x{spec.min_size[1]}; got input_size=({h}, {w})"
        )
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects the stages of features_only=True; pass features_only=True too")

    def extractor(model):
        return FeatureExtractor(model.features, select_stages(model.stages, out_indices),
                                input_shape=model.input_shape, min_size=model.min_size, name=model.name)

    if pretrained is not None:
        model = load_pretrained(name, pretrained, dtype=dtype, **options)
        return extractor(model) if features_only else model
    check_options(spec, options)
    merged = {**spec.options, **options}

    def build(rngs):
        model = spec.builder(
            num_classes=num_classes if num_classes is not None else spec.num_classes,
            input_shape=(h, w, c), include_top=include_top and not features_only, dtype=dtype, rngs=rngs,
            name=name, **merged)
        if features_only:  # a bad index fails here, before build_initialized compiles anything
            model = extractor(model)
        cpu_conv.use_cpu_conv(model)  # the same numbers, faster on XLA:CPU (see zoo/cpu_conv.py)
        return model

    if abstract:  # values are irrelevant, so a fresh seed avoids tracing the caller's Rngs
        return eval_shape(lambda: build(nnx.Rngs(params=0, dropout=1)))  # the streams of a concrete build
    if not isinstance(rngs, int):
        return build(rngs)  # the caller's Rngs advance as they would eagerly
    seed = rngs

    def make():
        return build(nnx.Rngs(params=seed, dropout=seed + 1))

    # Inside a trace (jit, eval_shape) the initializers are traced anyway.
    return build_initialized(make) if jax_core.trace_state_clean() else make()


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves); BatchNorm statistics are not counted."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def load_pretrained(name: str, tag: str, *, dtype=jnp.float32, weights_dir=None, **options) -> nnx.Module:
    """The registry model `name` with its shipped weights `tag` (`zoo.pretrained`), in eval mode.

    Args:
        dtype: computation dtype (parameters stay float32).
        weights_dir: another store directory than the package's zoo/weights.
        options: family options passed on to `create_model` (they must fit the weights).
    Raises:
        ValueError: unknown tag (lists those that exist), a weights file whose sha256 differs from
            the recorded one, or weights that do not fit the model (names every difference).
    """
    from zoo import pretrained
    from zoo.saving import load_flat_into

    meta, weights = pretrained.verified(name, tag, weights_dir, kind="classifier")
    kwargs = dict(meta["kwargs"])
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    kwargs.update(options)
    model = create_model(name, dtype=dtype, **kwargs)
    load_flat_into(model, weights, source=f"{name}-{tag}")
    model.eval()
    return model
