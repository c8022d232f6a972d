"""Reading a classifier as an ordered list of steps, without knowing its class.

Four ways a classifier can be written, all read here:

- the zoo protocol (`zoo.classifier.Classifier`): `features`, then a `Head` that is data;
- `nnx.Sequential(...)`: its `layers`, which may be modules or plain callables
  (`jax.nn.relu`, `functools.partial(nnx.max_pool, ...)`, a reshape lambda);
- a small `nnx.Module` whose `__call__` chains its submodules: the call order is
  recorded while tracing abstractly, and checked to be a plain chain (each call
  takes exactly the previous call's output);
- any forward pass (`read_traced`): a Module whose `__call__` interleaves submodules
  with functions (`x = self.pool(nnx.relu(self.conv1(x)))`, `x.reshape(x.shape[0], -1)`),
  or a Flax Linen module (`convert.linen`). Its jaxpr (`jax.make_jaxpr`) says what it
  computes: the last (N, h, w, c) map on the way to the logits, the step that turns it
  into (N, features) (checked numerically to be a row-major flatten or the spatial
  mean), and the Dense calls after it, each marked while tracing by a named scope. The
  part before the map is the user's own code, traced again at each input size and run
  up to the map (`TracedBackbone`); what cannot be converted is named with the line of
  the user's code that does it (jaxpr equations carry their source).

Plain callables are identified by what they do on probe inputs, never by name:
rank 4 -> rank 2 with h*w*c features equal to a row-major reshape is a flatten,
with c features equal to the spatial mean a global average pool; a callable that
keeps the shape and commutes with any permutation of the elements is element-wise
(an activation).
"""

from __future__ import annotations

import dataclasses
import linecache
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.layers import ACTIVATIONS, Activation, Flatten, GlobalAvgPool


class ConversionError(ValueError):
    """A classifier that cannot be turned into a fully convolutional network; says which layer and why."""


class NotAChain(ConversionError):
    """A Module whose `__call__` is not a plain chain of submodule calls (`read_traced` reads those)."""


@dataclasses.dataclass
class Step:
    """One call in a classifier's forward pass.

    name: path of the layer inside the model (e.g. "layers.3", "fc1").
    layer: the module or plain callable.
    in_shape, out_shape: abstract shapes seen at the training input size.
    """

    name: str
    layer: Callable
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


def layer_label(name: str, layer: Any) -> str:
    kind = type(layer).__name__
    if kind == "function":
        kind = getattr(layer, "__name__", "function")
    elif kind == "partial":
        kind = f"partial({getattr(layer.func, '__name__', layer.func)})"
    return f"layer {name!r} ({kind})"


def _shape_of(fn: Callable, shape: tuple[int, ...], dtype=jnp.float32) -> tuple[int, ...]:
    """Abstract output shape of fn on an input of `shape`; modules are not modified."""
    if isinstance(fn, nnx.Module):
        graphdef, state = nnx.split(fn)
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, dtype))
    else:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype))
    return tuple(getattr(out, "shape", ()))


def _probe(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, *shape[1:])).astype(np.float32)


def is_elementwise(fn: Callable, shape: tuple[int, ...]) -> bool:
    """True when fn keeps the shape and commutes with a random permutation of all elements."""
    x = _probe(shape)
    try:
        y = np.asarray(fn(jnp.asarray(x)))
    except Exception:
        return False
    if y.shape != x.shape:
        return False
    perm = np.random.default_rng(1).permutation(x.size)
    y_perm = np.asarray(fn(jnp.asarray(x.reshape(-1)[perm].reshape(x.shape))))
    return np.allclose(y_perm, y.reshape(-1)[perm].reshape(x.shape), rtol=1e-6, atol=1e-6, equal_nan=True)


def is_per_position(fn: Callable, width: int) -> bool:
    """True when fn maps (N, width) rows independently (softmax over classes, feature slicing, ...)."""
    x = _probe((2, width), seed=3)
    try:
        y = np.asarray(fn(jnp.asarray(x)))
        single = np.asarray(fn(jnp.asarray(x[1:])))
    except Exception:
        return False
    return y.ndim == 2 and y.shape[0] == 2 and np.allclose(y[1:], single, rtol=1e-6, atol=1e-6)


def activation_name(fn: Callable) -> str | None:
    """The `zoo.layers.ACTIVATIONS` name of an element-wise callable, found by comparing outputs."""
    if isinstance(fn, Activation):
        return fn.name
    x = np.linspace(-4, 4, 97, dtype=np.float32)
    try:
        y = np.asarray(fn(jnp.asarray(x)))
    except Exception:
        return None
    for name, reference in ACTIVATIONS.items():
        if np.allclose(y, np.asarray(reference(jnp.asarray(x))), rtol=1e-6, atol=1e-6):
            return name
    return None


def pool_kind(fn: Callable, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str | None:
    """"flatten" or "avg" for a (N, h, w, c) -> (N, k) callable, checked numerically; else None."""
    if isinstance(fn, Flatten):
        return "flatten"
    if isinstance(fn, GlobalAvgPool):
        return "avg"
    if len(in_shape) != 4 or len(out_shape) != 2:
        return None
    _, h, w, c = in_shape
    x = _probe(in_shape, seed=2)
    y = np.asarray(fn(jnp.asarray(x)))
    if out_shape[1] == h * w * c and np.array_equal(y, x.reshape(x.shape[0], -1)):
        return "flatten"
    if out_shape[1] == c and np.allclose(y, x.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6):
        return "avg"
    return None


def _direct_layers(module: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(name, submodule) for each public attribute that is a module, with lists of modules
    (`nnx.List`, e.g. a ResNet stage) opened into "stage1.0", "stage1.1", ..."""
    layers = []
    for name, child in vars(module).items():
        if name.startswith("_"):
            continue
        if isinstance(child, (nnx.List, list, tuple)):
            layers += [(f"{name}.{i}", c) for i, c in enumerate(child) if isinstance(c, nnx.Module)]
        elif isinstance(child, nnx.Module):
            layers.append((name, child))
    return layers


def _record_chain(module: nnx.Module, in_shape: tuple[int, ...], dtype) -> list[Step]:
    """The submodules `module.__call__` calls, in order, checked to form a plain chain.

    The module is traced abstractly on a merged copy whose direct submodules are
    swapped for recording subclasses; the model itself is never touched.
    """
    graphdef, state = nnx.split(module)
    calls: list[tuple[str, Any, Any]] = []
    model_io: dict[str, Any] = {}

    def recording(name: str, cls: type):
        def call(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            calls.append((name, args, kwargs, out))
            return out

        return type(f"Recording{cls.__name__}", (cls,), {"__call__": call})

    def run(state, x):
        copy = nnx.merge(graphdef, state)
        for name, child in _direct_layers(copy):
            child.__class__ = recording(name, type(child))
        model_io["in"] = x
        y = copy(x)
        model_io["out"] = y
        return y

    jax.eval_shape(run, state, jax.ShapeDtypeStruct(in_shape, dtype))
    how = ("Write the whole forward pass as a chain of layers (`nnx.Sequential`, or submodules each "
           "called on the previous one's output, using zoo.layers.Activation / Flatten for functions), "
           "or follow the zoo protocol: expose `features` (the backbone) and `head` (zoo.classifier.Head).")
    layers = dict(_direct_layers(module))
    steps: list[Step] = []
    current = model_io["in"]
    for name, args, kwargs, out in calls:
        if len(args) != 1 or kwargs or args[0] is not current:
            raise NotAChain(
                f"cannot read {type(module).__name__} as a chain of layers: submodule {name!r} is not called on "
                f"the previous layer's output (something else happens between the layers, e.g. a plain "
                f"function call or a skip connection). {how}")
        steps.append(Step(name, layers[name], tuple(current.shape), tuple(out.shape)))
        current = out
    if current is not model_io["out"]:
        raise NotAChain(
            f"cannot read {type(module).__name__} as a chain of layers: its output is not the last "
            f"submodule's output (a plain function is applied after it). {how}")
    return steps


def forward_steps(module: Callable, in_shape: tuple[int, ...], *, dtype=jnp.float32, prefix: str = "") -> list[Step]:
    """The forward pass of `module` as an ordered list of steps (see the module docstring).

    Composite steps are not expanded here; `expand` does that for the step that holds the head.
    """
    if isinstance(module, nnx.Sequential):
        steps, shape = [], tuple(in_shape)
        for i, layer in enumerate(module.layers):
            try:
                out = _shape_of(layer, shape, dtype)
            except Exception as e:
                raise ConversionError(
                    f"{layer_label(f'{prefix}layers.{i}', layer)} fails on the shape {shape} it receives "
                    f"({type(e).__name__}: {str(e).splitlines()[0]}); pass the input_shape the model was "
                    f"trained on") from None
            steps.append(Step(f"{prefix}layers.{i}", layer, shape, out))
            shape = out
        return steps
    steps = _record_chain(module, tuple(in_shape), dtype)
    for s in steps:
        s.name = prefix + s.name
    return steps


LEAF_TYPES = (nnx.Linear, nnx.Conv, nnx.Dropout, nnx.BatchNorm, nnx.LayerNorm)


def is_composite(layer: Any) -> bool:
    """A module made of other modules that is not a known single layer (nor a `TracedBackbone`, read as one block)."""
    if not isinstance(layer, nnx.Module) or isinstance(layer, (*LEAF_TYPES, TracedBackbone)):
        return False
    return any(isinstance(v, nnx.Module) for _, v in nnx.iter_graph(layer) if v is not layer)


# ================================================================ any forward pass, read from its jaxpr

# Dense calls are marked in the jaxpr by a named scope; the analysis traces two images, because with
# one the batch axis of a (1, h*w*c) reshape could not be told apart.
_DENSE_SCOPE = "fcnzoo_dense_"
_DENSE_SCOPE_RE = re.compile(r"(?:^|/)fcnzoo_dense_(\d+)(?=/|$)")
PROBE_BATCH = 2
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class Forward:
    """How one kind of model runs with its Dense calls hooked; kinds register in `FORWARDS`.

    `run(model, x, hook)` returns model(x) with every Dense call `dense(v)` made as
    `hook(path, dense, v)` (model is a merged copy inside a trace: run may modify it);
    `linear(model, path)` returns the Dense at `path` as an `nnx.Linear` holding its weights.
    """

    kind = ""

    @staticmethod
    def run(model, x, hook):
        raise NotImplementedError

    @staticmethod
    def linear(model, path: str) -> nnx.Linear:
        raise NotImplementedError


FORWARDS: dict[str, type[Forward]] = {}


def register_forward(cls: type[Forward]) -> type[Forward]:
    FORWARDS[cls.kind] = cls
    return cls


_active_hooks = threading.local()
_HOOKED_LINEARS: dict[type, type] = {}


def _hooked_linear_class(cls: type) -> type:
    """A subclass of an nnx.Linear class whose calls go through the active hook (when one is set)."""
    if getattr(cls, "_fcnzoo_hooked", False):
        return cls
    if cls not in _HOOKED_LINEARS:
        def __call__(self, x, *args, **kwargs):
            hook, paths = getattr(_active_hooks, "value", None) or (None, {})
            path = paths.get(id(self))
            if hook is None or path is None or args or kwargs:
                return cls.__call__(self, x, *args, **kwargs)
            return hook(path, lambda inputs: cls.__call__(self, inputs), x)

        _HOOKED_LINEARS[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "_fcnzoo_hooked": True,
                                                            "__module__": cls.__module__,
                                                            "__qualname__": cls.__qualname__})
    return _HOOKED_LINEARS[cls]


def _path(path) -> str:
    return ".".join(map(str, path))


@register_forward
class NnxForward(Forward):
    """Flax NNX modules: every `nnx.Linear` in the module tree is a Dense, named by its attribute path."""

    kind = "nnx"

    @staticmethod
    def run(model, x, hook):
        paths = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Linear):
                paths[id(node)] = _path(path)
                node.__class__ = _hooked_linear_class(type(node))
        previous = getattr(_active_hooks, "value", None)
        _active_hooks.value = (hook, paths)
        try:
            return model(x)
        finally:
            _active_hooks.value = previous

    @staticmethod
    def linear(model, path):
        for p, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Linear) and _path(p) == path:
                return node
        raise KeyError(path)


def _is_var(v) -> bool:
    return not isinstance(v, jax.extend.core.Literal)


def _user_line(eqn) -> str:
    """'file:line (function): source' of the user's code that emitted `eqn`; '' when unknown."""
    try:
        from jax._src import source_info_util

        frames = list(source_info_util.user_frames(eqn.source_info.traceback))
    except Exception:  # source info is a private JAX API: messages only lose their line
        return ""
    for frame in frames:
        path = os.path.abspath(frame.file_name)
        if ("site-packages" in path or "dist-packages" in path or frame.file_name.startswith("<")
                or path.startswith(_PACKAGE_DIR + os.sep)):
            continue
        line = getattr(frame, "start_line", None) or getattr(frame, "line_num", 0)
        text = linecache.getline(frame.file_name, line).strip()
        return f"{frame.file_name}:{line} ({frame.function_name})" + (f": {text}" if text else "")
    return ""


def describe_equation(eqn) -> str:
    """`primitive` at file:line (function): source line."""
    where = _user_line(eqn)
    return f"`{eqn.primitive.name}`" + (f" at {where}" if where else "")


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        invals = [*subfuns, *invals]
    try:
        from jax._src import source_info_util

        context = source_info_util.user_context(eqn.source_info.traceback, name_stack=eqn.source_info.name_stack)
    except Exception:
        import contextlib

        context = contextlib.nullcontext()
    with context, eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


class _Graph:
    """A jaxpr's data flow: which equation makes each variable, which variables derive from the images,
    and which equations belong to which marked Dense call."""

    def __init__(self, closed, image_var):
        self.jaxpr, self.consts = closed.jaxpr, closed.consts
        self.eqns = self.jaxpr.eqns
        self.producer = {v: i for i, eqn in enumerate(self.eqns) for v in eqn.outvars}
        self.image_var = image_var
        self.data = {image_var}
        for eqn in self.eqns:
            if any(_is_var(v) and v in self.data for v in eqn.invars):
                self.data.update(eqn.outvars)
        self.dense_of = {}
        for i, eqn in enumerate(self.eqns):
            match = _DENSE_SCOPE_RE.search(str(eqn.source_info.name_stack))
            if match:
                self.dense_of[i] = int(match.group(1))

    def frontier(self, var) -> tuple[list, set[int]]:
        """(image-derived (N, h, w, c) variables reaching `var` through lower-rank ones, the equations between)."""
        maps, region, stack, seen = [], set(), [var], set()
        while stack:
            v = stack.pop()
            if not _is_var(v) or v in seen or v not in self.data:
                continue
            seen.add(v)
            if v.aval.ndim == 4:
                maps.append(v)
                continue
            i = self.producer.get(v)
            if i is not None:
                region.add(i)
                stack += self.eqns[i].invars
        maps.sort(key=lambda v: self.producer.get(v, -1))
        return maps, region

    def segment(self, start, end) -> list[int]:
        """Indices of the equations computing `end` from `start` (plus weights and constants), in order.

        Raises a ConversionError naming the equation that reads another image-derived value
        (a skip connection, a second branch, the images themselves).
        """
        begin = self.producer.get(start, -1)
        needed, stack = set(), [(end, None)]
        while stack:
            v, reader = stack.pop()
            if not _is_var(v) or v is start:
                continue
            i = self.producer.get(v)
            if v in self.data and (i is None or i <= begin):
                where = describe_equation(self.eqns[reader]) if reader is not None else "the output"
                raise ConversionError(
                    f"{where} combines the features with another image-derived value {v.aval.str_short()} "
                    f"(a skip connection or a second branch): the head after the feature map must be one chain")
            if i is None or i in needed:
                continue
            needed.add(i)
            stack += [(u, i) for u in self.eqns[i].invars]
        return sorted(needed)

    def evaluate(self, known: dict, targets: list) -> list:
        """Values of `targets`, running only the equations needed to get them from `known` (var -> value)."""
        env = dict(zip(self.jaxpr.constvars, self.consts))
        env.update(known)
        needed, stack = set(), list(targets)
        while stack:
            v = stack.pop()
            if not _is_var(v) or v in env:
                continue
            i = self.producer.get(v)
            if i is None:
                raise ConversionError(f"internal error: {v.aval.str_short()} is needed but not known")
            if i not in needed:
                needed.add(i)
                stack += self.eqns[i].invars
        for i in sorted(needed):
            eqn = self.eqns[i]
            outs = _bind(eqn, [v.val if not _is_var(v) else env[v] for v in eqn.invars])
            env.update(zip(eqn.outvars, outs))
        return [v.val if not _is_var(v) else env[v] for v in targets]


def _abstract(values) -> list:
    out = []
    for v in values:
        try:
            out.append(jax.ShapeDtypeStruct(v.shape, v.dtype, weak_type=getattr(v, "weak_type", False)))
        except TypeError:  # a JAX without weak_type in ShapeDtypeStruct
            out.append(jax.ShapeDtypeStruct(v.shape, v.dtype))
    return out


class TracedRows:
    """A function of (PROBE_BATCH, width) rows read from a trace, applied to any (..., width) array, row by row.

    fn: (PROBE_BATCH, width) -> (PROBE_BATCH, width'), checked to treat each row on its own.
    """

    def __init__(self, fn: Callable, width: int, label: str):
        self.fn, self.width, self.__name__ = fn, int(width), label

    def __call__(self, x):
        rows = x.reshape(-1, self.width)
        y = jax.vmap(lambda r: self.fn(jnp.broadcast_to(r, (PROBE_BATCH, self.width)))[0])(rows)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class TracedElementwise(TracedRows):
    """An element-wise function read from a trace at (PROBE_BATCH, width), applied to an array of any shape."""

    def __call__(self, x):
        flat = x.reshape(-1)
        chunk = PROBE_BATCH * self.width
        padded = jnp.pad(flat, (0, (-flat.size) % chunk)).reshape(-1, PROBE_BATCH, self.width)
        y = jax.vmap(self.fn)(padded).reshape(-1)
        return y[:flat.size].reshape(x.shape)


class TracedBackbone(nnx.Module):
    """A classifier's own forward pass up to its last feature map, on any input size.

    Each input shape, the model's code is traced once (cached) with the head's first Dense
    stubbed out, and the last (N, h, w, c) array on the way to that Dense's input is computed
    from the trace: exactly what the classifier computes there. In train mode the model's
    state updates (BatchNorm statistics, RNG counters) are written back.

    Args:
        model: the classifier (a copy: its weights are this backbone's).
        kind: its `Forward` kind ("nnx", "linen").
        stop_at: path of the head's first Dense; stop_features: that Dense's output width.
    x: (N, H, W, C) -> (N, h, w, c)
    """

    def __init__(self, model, *, kind: str, stop_at: str, stop_features: int):
        self.model = model
        self.kind = kind
        self.stop_at = stop_at
        self.stop_features = int(stop_features)

    def __call__(self, x):
        graphdef, state = nnx.split(self.model)
        values, treedef = jax.tree.flatten(state)
        plan = self._plan(graphdef, treedef, values, x)
        known = {**dict(zip(plan["leaf_vars"], values)), plan["graph"].image_var: x}
        fmap, *updated = plan["graph"].evaluate(known, [plan["fmap"], *(v for _, v in plan["updated"])])
        if updated:
            for (i, _), value in zip(plan["updated"], updated):
                values[i] = value
            nnx.update(self.model, jax.tree.unflatten(treedef, values))
        return fmap

    def _plan(self, graphdef, treedef, values, x) -> dict:
        key = (self.kind, self.stop_at, self.stop_features, graphdef, treedef,
               tuple((tuple(v.shape), str(v.dtype)) for v in values), tuple(x.shape), str(x.dtype))
        try:
            plan = _PLANS.get(key)
        except TypeError:  # an unhashable static attribute somewhere in the model: trace every call
            key, plan = None, None
        if plan is not None:
            return plan
        forward, stop_at, width = FORWARDS[self.kind], self.stop_at, self.stop_features

        def prefix(leaves, images):
            copy = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            captured = []

            def hook(path, dense, inputs):
                if path == stop_at and not captured:
                    captured.append(inputs)
                    return jnp.zeros((*inputs.shape[:-1], width), inputs.dtype)
                return dense(inputs)

            forward.run(copy, images, hook)
            if not captured:
                raise ConversionError(f"the model did not call its Dense {stop_at!r} on a {images.shape} input")
            return captured[0], jax.tree.leaves(nnx.state(copy))

        closed = jax.make_jaxpr(prefix)(_abstract(values), jax.ShapeDtypeStruct(tuple(x.shape), x.dtype))
        leaf_vars, image_var = closed.jaxpr.invars[:-1], closed.jaxpr.invars[-1]
        graph = _Graph(closed, image_var)
        head_input, *new_leaves = closed.jaxpr.outvars
        maps, _ = graph.frontier(head_input)
        if len(maps) != 1:
            raise ConversionError(f"on a {tuple(x.shape)} input, {len(maps)} feature maps reach the Dense {stop_at!r}")
        updated = [(i, v) for i, (v, old) in enumerate(zip(new_leaves, leaf_vars)) if v is not old]
        plan = {"graph": graph, "leaf_vars": leaf_vars, "fmap": maps[0], "updated": updated}
        if key is not None:
            if len(_PLANS) >= 64:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = plan
        return plan


_PLANS: dict = {}


def _per_image(fn: Callable, width: int) -> bool:
    """True when fn: (PROBE_BATCH, width) -> (PROBE_BATCH, k) treats each row on its own."""
    a, b = _probe((2, width), seed=5)
    y = np.asarray(fn(jnp.asarray(np.stack([a, b]))))
    alone_a = np.asarray(fn(jnp.asarray(np.stack([a, a]))))
    alone_b = np.asarray(fn(jnp.asarray(np.stack([b, b]))))
    return (y.ndim == 2 and np.allclose(y[0], alone_a[0], rtol=1e-6, atol=1e-6)
            and np.allclose(y[1], alone_b[1], rtol=1e-6, atol=1e-6))


def _traced_activation_name(fn: Callable, width: int) -> str | None:
    x = np.linspace(-4, 4, PROBE_BATCH * width, dtype=np.float32).reshape(PROBE_BATCH, width)
    y = np.asarray(fn(jnp.asarray(x)))
    if y.shape != x.shape:
        return None
    for name, reference in ACTIVATIONS.items():
        if np.allclose(y, np.asarray(reference(jnp.asarray(x))), rtol=1e-6, atol=1e-6):
            return name
    return None


def read_traced(model: nnx.Module, input_shape: tuple[int, ...], forward: type[Forward] = NnxForward, *,
                name: str | None = None, dtype=jnp.float32) -> tuple[TracedBackbone, str, list[tuple[str, Any]]]:
    """Read any classifier's forward pass from its jaxpr (see the module docstring).

    Args:
        model: an nnx.Module in eval mode that `forward` runs (the caller's copy: it becomes the backbone's).
        input_shape: (H, W, C) the classifier was trained on.
        forward: a `Forward` kind (`NnxForward`; `convert.linen.LinenForward`).
        name: used in messages.
    Returns:
        (backbone, pool, head): a `TracedBackbone` giving the feature map, "flatten" or "avg", and the
        head as (name, layer) pairs for `convert.fcn.convert_head` (nnx.Linear copies of the Dense
        layers, `Activation`s, and functions of the features read from the trace).
    Raises:
        ConversionError naming the operation, and the line of the user's code, that cannot be converted.
    """
    label = name or type(model).__name__
    graphdef, state = nnx.split(model)
    values, treedef = jax.tree.flatten(state)
    calls: list[str] = []

    def traced(leaves, x):
        copy = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

        def hook(path, dense, inputs):
            calls.append(path)
            with jax.named_scope(f"{_DENSE_SCOPE}{len(calls) - 1}"):
                return dense(inputs)

        return forward.run(copy, x, hook)

    shape = (PROBE_BATCH, *input_shape)
    try:
        closed = jax.make_jaxpr(traced)(_abstract(values), jax.ShapeDtypeStruct(shape, dtype))
    except ConversionError:
        raise
    except Exception as e:
        raise ConversionError(f"{label} fails on a batch of shape {shape} ({_first_line(e)}); pass the "
                              f"input_shape the model was trained on") from None
    jaxpr = closed.jaxpr
    graph = _Graph(closed, jaxpr.invars[-1])
    weights = dict(zip(jaxpr.invars[:-1], values))
    outs = jaxpr.outvars
    if len(outs) != 1 or not _is_var(outs[0]) or outs[0] not in graph.data or outs[0].aval.ndim != 2:
        got = ", ".join(v.aval.str_short() for v in outs)
        raise ConversionError(f"{label} is not a classifier: on {shape} images it returns {got}, not one "
                              f"(N, classes) array of scores")
    out = outs[0]
    maps, region = graph.frontier(out)
    if not maps:
        raise ConversionError(f"{label} is not a convolutional classifier: no (N, H, W, C) map reaches its output")
    if len(maps) > 1:
        readers = sorted(i for i in region if any(_is_var(v) and v in maps for v in graph.eqns[i].invars))
        raise ConversionError(
            f"{label}'s scores come from {len(maps)} different feature maps "
            f"({', '.join(m.aval.str_short() for m in maps)}), read by {describe_equation(graph.eqns[readers[-1]])}: "
            f"there is no single map to slide the head over")
    fmap = maps[0]

    # The Dense calls on the way to the output, each with its one input and one output.
    dense_calls = []
    for d in sorted({graph.dense_of[i] for i in region if i in graph.dense_of}):
        members = {i for i, k in graph.dense_of.items() if k == d}
        inputs = {v for i in members for v in graph.eqns[i].invars
                  if _is_var(v) and v in graph.data and graph.producer.get(v) not in members}
        used_outside = {v for j, eqn in enumerate(graph.eqns) if j not in members for v in eqn.invars if _is_var(v)}
        outputs = [v for i in sorted(members) for v in graph.eqns[i].outvars if v in used_outside or v is out]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ConversionError(f"the Dense {calls[d]!r} of {label} is not called on one array")
        dense_calls.append((calls[d], next(iter(inputs)), outputs[0]))
    if not dense_calls:
        first = min(region) if region else None
        step = describe_equation(graph.eqns[first]) if first is not None else "nothing"
        raise ConversionError(
            f"{label} has no Dense layer (nnx.Linear / nn.Dense) after its feature map {fmap.aval.str_short()} "
            f"(the map becomes the output through {step}): nothing to convert (already fully convolutional?)")
    stop_at = dense_calls[0][0]
    if calls.index(stop_at) != min(graph.dense_of[i] for i in region if i in graph.dense_of):
        raise ConversionError(f"the Dense {stop_at!r} of {label} is called before the feature map is made")

    # The pool step: a (N, k) value between the map and the first Dense that is a row-major
    # flatten or the spatial mean of the map (checked on probes), the last one if several.
    first_glue = graph.segment(fmap, dense_calls[0][1])
    pool, pooled = None, None
    candidates = [v for i in first_glue for v in graph.eqns[i].outvars
                  if v in graph.data and v.aval.ndim == 2 and v.aval.shape[0] == PROBE_BATCH]
    for v in reversed(candidates):
        kind = pool_kind(lambda m, v=v: graph.evaluate({**weights, fmap: m}, [v])[0], tuple(fmap.aval.shape),
                         tuple(v.aval.shape))
        if kind is not None:
            pool, pooled = kind, v
            break
    if pool is None:
        step = next((graph.eqns[i] for i in first_glue if graph.eqns[i].outvars[0].aval.ndim != 4), None)
        raise ConversionError(
            f"{label} turns its feature map {fmap.aval.str_short()} into features with "
            f"{describe_equation(step) if step is not None else 'an unknown step'}, which is neither a row-major "
            f"flatten nor a global average pool (checked on probe inputs), so the Dense after it has no "
            f"convolutional equivalent")

    # The code from the map to the first Dense, as a function of the pooled features: the map is
    # rebuilt from them (unflattened, or the mean at every position), which for a mean is checked
    # to change nothing (the code must read the map only through its mean).
    _, h, w, c = fmap.aval.shape
    a1 = dense_calls[0][1]
    if pool == "flatten":
        def lift(v):
            return v.reshape(v.shape[0], h, w, c)
    else:
        def lift(v):
            return jnp.broadcast_to(v[:, None, None, :], (v.shape[0], h, w, c))

    def first_fn(v):
        return graph.evaluate({**weights, fmap: lift(v)}, [a1])[0]

    probe = jnp.asarray(_probe(tuple(fmap.aval.shape), seed=7))
    direct = graph.evaluate({**weights, fmap: probe}, [a1])[0]
    if pool == "avg" and not np.allclose(np.asarray(first_fn(probe.mean(axis=(1, 2)))), np.asarray(direct),
                                         rtol=1e-5, atol=1e-5):
        raise ConversionError(
            f"{label} reads its feature map {fmap.aval.str_short()} other than through its spatial mean before "
            f"the Dense {stop_at!r} (at {describe_equation(graph.eqns[first_glue[-1]])}), so there is no single "
            f"pooled vector to convert")
    pool_eqns = set(graph.segment(fmap, pooled))
    glue_eqns = [i for i in first_glue if i not in pool_eqns]

    head: list[tuple[str, Any]] = []
    width = int(pooled.aval.shape[1])
    segments = [(first_fn, width, glue_eqns)]
    for k, (path, inputs, outputs) in enumerate(dense_calls):
        head_input = dense_calls[k + 1][1] if k + 1 < len(dense_calls) else out
        eqns = graph.segment(outputs, head_input)
        members = [i for i in eqns if i in graph.dense_of]
        if members:
            raise ConversionError(f"{describe_equation(graph.eqns[members[0]])} is a Dense call off the head's chain")

        def fn(v, start=outputs, end=head_input):
            return graph.evaluate({**weights, start: v}, [end])[0]

        segments.append((fn, int(outputs.aval.shape[-1]), eqns))
    for k, (fn, width, eqns) in enumerate(segments):
        if k > 0:
            path = dense_calls[k - 1][0]
            head.append((path, forward.linear(model, path)))
        if eqns:
            layer = _glue_layer(graph, fn, width, eqns, pool=pool, first=k == 0, label=label)
            if layer is not None:
                head.append((f"line {_line_of(graph, eqns)}", layer))
    backbone = TracedBackbone(model, kind=forward.kind, stop_at=stop_at,
                              stop_features=dense_calls[0][2].aval.shape[-1])
    larger = (1, 2 * input_shape[0], 2 * input_shape[1], input_shape[2])
    try:
        _shape_of(backbone, larger, dtype)
    except Exception as e:
        raise ConversionError(
            f"the part of {label} before its Dense {stop_at!r} does not run on larger images {larger} "
            f"({_first_line(e)}): a size is fixed in it (a Dense "
            f"layer inside the convolutional part, a reshape to a fixed shape), so it cannot slide") from None
    return backbone, pool, head


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _line_of(graph: _Graph, eqns: list[int]) -> str:
    for i in eqns:
        where = _user_line(graph.eqns[i])
        if where:
            return os.path.basename(where.split(" (")[0])
    return graph.eqns[eqns[0]].primitive.name


def _glue_layer(graph: _Graph, fn: Callable, width: int, eqns: list[int], *, pool: str, first: bool, label: str):
    """The code between two steps of the head (an activation, a softmax ...) as a layer for `convert_head`.

    fn: (PROBE_BATCH, width) -> (PROBE_BATCH, width') the code computes; eqns: its equations (for messages).
    """
    ends = [v for i in eqns for v in graph.eqns[i].outvars if v in graph.data]
    if ends and any(v.aval.ndim != 2 for v in ends[-1:]):
        raise ConversionError(
            f"{describe_equation(graph.eqns[eqns[-1]])} turns the features into {ends[-1].aval.str_short()}: only "
            f"functions of each image's (N, features) vector may follow the {pool} step")
    steps = "; ".join(dict.fromkeys(describe_equation(graph.eqns[i]) for i in eqns
                                    if any(v in graph.data for v in graph.eqns[i].outvars)))

    if not _per_image(fn, width):
        raise ConversionError(f"{steps} mixes the images of a batch, so it cannot run at every position of a map")
    activation = _traced_activation_name(fn, width)
    if activation == "identity":
        return None
    if activation is not None:
        return Activation(activation)
    where = f"line {_line_of(graph, eqns)}"
    if is_elementwise(fn, (PROBE_BATCH, width)):
        return TracedElementwise(fn, width, where)
    if first and pool == "flatten":
        raise ConversionError(
            f"{steps} follows the flatten of {label} and mixes the positions of the feature map (it is not "
            f"element-wise), so the Dense after it cannot slide over a larger map; do it before the flatten")
    return TracedRows(fn, width, where)
