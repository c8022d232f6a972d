"""`zoo.summarize`: parameters, activation memory and FLOPs of any NNX module, beside XLA's own figures.

Géron, "Hands-On Machine Learning with Scikit-Learn, Keras and TensorFlow" (3rd ed.),
chapter 14, exercise 2: a CNN of three 3x3 convolutions (stride 2, SAME padding,
100/200/400 maps) on 200x300 RGB images has 903,400 parameters, needs at least
12,613,600 bytes to classify one image and about 565.6 MB to train on a batch of 50.

    import zoo
    summary = zoo.summarize(model, input_shape=(224, 224, 3), batch_size=32)
    print(summary)            # per-layer table, totals, estimate vs XLA
    summary.to_dict()         # the same as JSON-ready data

How the layers are found: the model is split (`nnx.split`), merged back inside
`jax.eval_shape` (so nothing is computed and the model is not modified), and
the `__call__` of every module records its output shape, in call order. Leaf
modules (no submodules, e.g. `nnx.Conv`, `nnx.BatchNorm`, `zoo.layers.MaxPool`)
and modules owning parameters directly are the layers of the table; a block's
own output (after a residual add or an Inception concatenation) only labels its
grouped row, as its branches are already counted. Plain functions (`jax.nn.relu`
in an `nnx.Sequential`) are invisible, which is what the book's count wants anyway.

The book's rule, and ours:
  * a layer's output is an activation; the model's input is the first one;
  * outputs of element-wise or normalizing layers that keep the size and dtype
    of their input (`Activation`, `BatchNorm`, `LayerNorm`, `GroupNorm`, `RMSNorm`,
    `Dropout`) and of `Flatten` (a reshape) can overwrite their input, so they
    take no new memory and are not counted (the table marks them "in place");
  * one inference >= parameter bytes + the largest sum of two consecutive
    counted activations (a layer's input can be released once its output exists);
  * training a batch of N >= parameter bytes + N x (input + every counted activation),
    since backpropagation needs every layer's output.
Both are lower bounds for a plain chain of layers: a branch (a ResNet shortcut,
an Inception module) keeps more alive than two consecutive outputs.

FLOPs are 2 x multiply-adds of convolutions and dense layers, from shapes,
padding ignored (as the book counts); other layers are counted as 0.

XLA's figures come from compiling the real computation for abstract inputs
(`jax.jit(f).lower(...).compile()`, nothing is run): `memory_analysis()` gives
argument bytes (parameters, other state such as BatchNorm statistics, the input),
output bytes (logits; for training also the gradients and updated statistics),
temp bytes (XLA's scratch buffers for intermediates after it has fused ops and
shared buffers whose lifetimes do not overlap) and alias bytes (outputs written
into donated arguments); generated code bytes is the compiled program's size,
often 0 on CPU. We report argument + output + temp - alias as "XLA total".
The training step is the forward and backward pass of a mean-squared-output loss
returning the gradients and updated statistics; no optimizer state is included.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.layers import Activation, Flatten
from zoo.registry import eval_shape

# Layers whose output can overwrite their input (same size and dtype checked at run time).
IN_PLACE_KINDS = (Activation, Flatten, nnx.BatchNorm, nnx.LayerNorm, nnx.GroupNorm, nnx.RMSNorm, nnx.Dropout)

MAX_TABLE_ROWS = 60  # the CLI groups nested blocks beyond this many rows


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One recorded layer call (or, from `Summary.grouped`, a group of them), per example.

    Attributes:
        path: dotted path of the module in the model, e.g. "features.layers.0".
        kind: class name, e.g. "Conv".
        output_shape: shape of the output for a batch of 1, e.g. (1, 100, 150, 100).
        params: trainable parameters of the module (counted at its first call only).
        activation_bytes: bytes of the output for one example, 0 when computed in place.
        in_place: True when the output overwrites the input (see module docstring).
        flops: 2 x multiply-adds for one example (convolutions and dense layers only).
    """

    path: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    activation_bytes: int
    in_place: bool
    flops: int


@dataclasses.dataclass(frozen=True)
class XlaFigures:
    """What XLA reports for one compiled computation (see module docstring for the meaning).

    Attributes:
        what: "inference" or "training".
        batch_size: images per call.
        argument_bytes, output_bytes, temp_bytes, alias_bytes, generated_code_bytes:
            from `compiled.memory_analysis()`.
        flops: from `compiled.cost_analysis()["flops"]` (whole batch).
    """

    what: str
    batch_size: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    generated_code_bytes: int
    flops: float

    @property
    def total_bytes(self) -> int:
        """Memory the buffers of this computation need: argument + output + temp - alias."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


@dataclasses.dataclass(frozen=True)
class Summary:
    """Result of `summarize`; all per-example figures unless the name says batch.

    Attributes:
        name: the model's `name` attribute, or its class name.
        input_shape: (H, W, C) of one example; dtype: name of the input dtype.
        batch_size: the training (and second inference) batch size.
        layers: one `LayerRow` per recorded call, in call order.
        params: trainable parameters (nnx.Param leaves); param_bytes: their bytes.
        other_state_bytes: non-trainable state (BatchNorm statistics, RNG keys); not in the
            book's bound, part of XLA's arguments.
        unattributed_params: parameters of modules never called on this input (e.g. an
            auxiliary head used in training only), or of modules not recorded.
        input_bytes: one example.
        flops: 2 x multiply-adds of one example.
        xla: XLA's figures ("inference" at batch 1 and batch_size, "training" at batch_size),
            empty when skipped.
        module_kinds: dotted path -> class name of every module, to name grouped rows.
        block_outputs: dotted path -> output shape (batch 1) of every called non-layer module.
    """

    name: str
    input_shape: tuple[int, ...]
    dtype: str
    batch_size: int
    layers: tuple[LayerRow, ...]
    params: int
    param_bytes: int
    other_state_bytes: int
    unattributed_params: int
    input_bytes: int
    flops: int
    xla: tuple[XlaFigures, ...] = ()
    module_kinds: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    block_outputs: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def activation_bytes(self) -> int:
        """Sum of counted activations of one example (the input not included)."""
        return sum(r.activation_bytes for r in self.layers)

    @property
    def peak_consecutive_bytes(self) -> int:
        """Largest sum of two consecutive counted activations of one example, the input first."""
        chain = [self.input_bytes] + [r.activation_bytes for r in self.layers if not r.in_place]
        return max((a + b for a, b in zip(chain, chain[1:])), default=self.input_bytes)

    def inference_bytes(self, batch_size: int = 1) -> int:
        """The book's lower bound for inference on `batch_size` examples."""
        return self.param_bytes + batch_size * self.peak_consecutive_bytes

    def training_bytes(self, batch_size: int | None = None) -> int:
        """The book's lower bound for training on a batch (default: `self.batch_size`)."""
        n = self.batch_size if batch_size is None else batch_size
        return self.param_bytes + n * (self.input_bytes + self.activation_bytes)

    def comparisons(self) -> list[dict[str, Any]]:
        """Book-style estimate beside XLA's total, one dict per compiled computation."""
        rows = []
        for fig in self.xla:
            estimate = (self.inference_bytes(fig.batch_size) if fig.what == "inference"
                        else self.training_bytes(fig.batch_size))
            rows.append({"what": fig.what, "batch_size": fig.batch_size, "estimate_bytes": estimate,
                         "xla_total_bytes": fig.total_bytes, "xla_over_estimate": fig.total_bytes / estimate})
        return rows

    def grouped(self, depth: int | None) -> list[LayerRow]:
        """Rows summed by their first `depth` module levels (containers such as lists don't count).

        Consecutive calls sharing the prefix become one row, with the output of the last;
        its activation bytes are the counted ones summed. None or 0: every layer.
        """
        if not depth:
            return list(self.layers)
        groups: list[list[LayerRow]] = []
        keys: list[str] = []
        for row in self.layers:
            key = _prefix(row.path, depth)
            if keys and keys[-1] == key:
                groups[-1].append(row)
            else:
                keys.append(key)
                groups.append([row])
        out = []
        for key, rows in zip(keys, groups):
            if len(rows) == 1 and rows[0].path == key:
                out.append(rows[0])
                continue
            out.append(LayerRow(
                path=key, kind=f"{self.module_kinds.get(key, 'group')} ({len(rows)} layer{'s' * (len(rows) > 1)})",
                output_shape=self.block_outputs.get(key, rows[-1].output_shape),
                params=sum(r.params for r in rows),
                activation_bytes=sum(r.activation_bytes for r in rows),
                in_place=all(r.in_place for r in rows), flops=sum(r.flops for r in rows)))
        return out

    def auto_depth(self, max_rows: int = MAX_TABLE_ROWS) -> int:
        """Deepest grouping with at most `max_rows` rows (0: every layer fits).

        Depth 1 sums a whole backbone into one row, which says little, so depth 2 is
        kept while it has at most twice `max_rows` rows (ResNet-152's 50 blocks).
        """
        if len(self.layers) <= max_rows:
            return 0
        deepest = max((_depth(r.path) for r in self.layers), default=1)
        for depth in range(deepest, 1, -1):
            if len(self.grouped(depth)) <= max_rows:
                return depth
        return 2 if len(self.grouped(2)) <= 2 * max_rows else 1

    def format(self, depth: int | None = None) -> str:
        """Readable table and totals; `depth` groups nested blocks (see `grouped`)."""
        rows = self.grouped(depth)
        header = ["layer", "kind", "output/example", "params", "activation", "FLOPs"]
        body = [[r.path or "(model)", r.kind, "x".join(map(str, r.output_shape[1:])) or "-",
                 f"{r.params:,}", "in place" if r.in_place else f"{r.activation_bytes:,}",
                 f"{r.flops:,}" if r.flops else "-"] for r in rows]
        lines = [f"{self.name}: input {'x'.join(map(str, self.input_shape))} {self.dtype}, "
                 f"batch {self.batch_size}" + (f" (layers grouped to depth {depth})" if depth else ""),
                 _table(body, header, right={3, 4, 5}), ""]
        lines += [
            f"parameters         {self.params:>16,}   ({_mb(self.param_bytes)} MB)",
            f"other state        {self.other_state_bytes:>16,} B (BatchNorm statistics etc.)",
            f"activations        {self.activation_bytes:>16,} B per example (input {self.input_bytes:,} B)",
            f"FLOPs              {self.flops:>16,} per example (2 x multiply-adds of conv/dense)",
        ]
        if self.unattributed_params:
            lines.append(f"parameters not in any recorded call: {self.unattributed_params:,}")
        lines += ["", "Lower bounds as the book reasons (parameters + live activations):",
                  f"  inference, 1 example   {self.inference_bytes(1):>16,} B  ({_mb(self.inference_bytes(1))} MB)",
                  f"  training, batch {self.batch_size:<6} {self.training_bytes():>16,} B  "
                  f"({_mb(self.training_bytes())} MB)"]
        if self.xla:
            lines += ["", "Estimate vs XLA (argument + output + temp - alias bytes of the compiled step):"]
            table = []
            for cmp, fig in zip(self.comparisons(), self.xla):
                table.append([f"{fig.what}, batch {fig.batch_size}", f"{cmp['estimate_bytes']:,}",
                              f"{fig.total_bytes:,}", f"{cmp['xla_over_estimate']:.2f}",
                              f"{fig.argument_bytes:,}", f"{fig.output_bytes:,}", f"{fig.temp_bytes:,}",
                              f"{fig.flops:,.0f}"])
            lines.append(_table(table, ["computation", "estimate", "XLA total", "XLA/est",
                                        "arguments", "outputs", "temp", "XLA FLOPs"],
                                right=set(range(1, 8))))
            lines.append("training = forward + backward of a mean-squared-output loss, "
                         "returning the gradients and updated statistics.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format(self.auto_depth())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: totals, bounds, XLA figures and every layer."""
        return {
            "name": self.name, "input_shape": list(self.input_shape), "dtype": self.dtype,
            "batch_size": self.batch_size, "params": self.params, "param_bytes": self.param_bytes,
            "other_state_bytes": self.other_state_bytes, "unattributed_params": self.unattributed_params,
            "input_bytes": self.input_bytes, "activation_bytes": self.activation_bytes,
            "peak_consecutive_bytes": self.peak_consecutive_bytes, "flops": self.flops,
            "inference_bytes": self.inference_bytes(1), "training_bytes": self.training_bytes(),
            "xla": [f.to_dict() for f in self.xla], "comparisons": self.comparisons(),
            "layers": [{**dataclasses.asdict(r), "output_shape": list(r.output_shape)} for r in self.layers],
        }


def summarize(
    model: nnx.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    dtype=jnp.float32,
    xla: bool = True,
) -> Summary:
    """Per-layer table, the book's memory bounds, and XLA's figures for `model`.

    Args:
        model: any NNX module taking one array (N, *input_shape); may be abstract
            (built under `nnx.eval_shape`). It is not modified.
        input_shape: one example's shape, e.g. (H, W, C), without the batch axis.
        batch_size: the training batch (and second inference batch) to size.
        dtype: the input's dtype.
        xla: False skips compiling (the XLA figures are then empty).
    Returns:
        a `Summary`; `print(summary)` shows the table, `summary.to_dict()` gives JSON data.
    """
    input_shape = tuple(input_shape)
    if not input_shape or not all(isinstance(d, (int, np.integer)) and d > 0 for d in input_shape):
        raise ValueError(f"input_shape must be positive ints without the batch axis, e.g. (224, 224, 3); "
                         f"got {input_shape!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(model, nnx.Module):
        raise ValueError(f"summarize takes an nnx.Module, got {type(model).__name__}")
    dtype = jnp.dtype(dtype)

    modules = {path: m for path, m in nnx.iter_modules(model)}
    callable_paths = {path for path, m in modules.items() if _has_call(m)}
    calls = _record_calls(model, callable_paths, jax.ShapeDtypeStruct((1, *input_shape), dtype))

    rows, seen, block_outputs = [], set(), {}
    for path, inputs, outputs in calls:
        module = modules[path]
        if not _is_layer(module):  # a block: only its output shape is kept, to label grouped rows
            block_outputs.setdefault(".".join(map(str, path)), tuple(outputs[0].shape) if outputs else ())
            continue
        params = 0 if path in seen else _param_count(module)
        seen.add(path)
        out_bytes = sum(o.size * o.dtype.itemsize for o in outputs)
        in_place = (isinstance(module, IN_PLACE_KINDS) and len(outputs) == 1 and bool(inputs)
                    and outputs[0].size == inputs[0].size and outputs[0].dtype == inputs[0].dtype)
        rows.append(LayerRow(
            path=".".join(map(str, path)), kind=type(module).__name__,
            output_shape=tuple(outputs[0].shape) if outputs else (),
            params=params, activation_bytes=0 if in_place else out_bytes, in_place=in_place,
            flops=_flops(module, inputs, outputs)))

    param_state = nnx.state(model, nnx.Param)
    total_params = sum(x.size for x in jax.tree.leaves(param_state))
    figures = ()
    if xla:
        figures = (_compile_figures(model, "inference", 1, input_shape, dtype),)
        if batch_size > 1:
            figures += (_compile_figures(model, "inference", batch_size, input_shape, dtype),)
        figures += (_compile_figures(model, "training", batch_size, input_shape, dtype),)
    return Summary(
        name=str(getattr(model, "name", None) or type(model).__name__),
        input_shape=input_shape, dtype=dtype.name, batch_size=int(batch_size), layers=tuple(rows),
        params=total_params, param_bytes=_nbytes(param_state),
        other_state_bytes=_nbytes(nnx.state(model, nnx.Not(nnx.Param))),
        unattributed_params=total_params - sum(r.params for r in rows),
        input_bytes=math.prod(input_shape) * dtype.itemsize,
        flops=sum(r.flops for r in rows), xla=figures,
        module_kinds={".".join(map(str, p)): type(m).__name__ for p, m in modules.items()},
        block_outputs=block_outputs)


# --- recording layer calls -------------------------------------------------------------


def _has_call(module: nnx.Module) -> bool:
    return any("__call__" in vars(cls) for cls in type(module).__mro__[:-1])  # not nnx.List etc.


def _is_layer(module: nnx.Module) -> bool:
    """Callable leaf modules, plus any module that owns parameters directly (its own math)."""
    if not _has_call(module):
        return False
    attributes = list(vars(module).values())
    has_submodules = any(isinstance(a, nnx.Module) for a in attributes) or any(
        isinstance(m, nnx.Module) for a in attributes if isinstance(a, (list, tuple)) for m in a)
    return not has_submodules or any(isinstance(a, nnx.Param) for a in attributes)


def _record_calls(model, recorded_paths, x_abstract):
    """[(path, input arrays, output arrays)] of every call of a module in `recorded_paths`,
    in completion order (a block after its layers).

    The `__call__` of each such module's class is wrapped for the duration of one
    `jax.eval_shape` over a merged copy of the model in eval mode; the wrapper recognises
    the copy's modules by identity, so other instances of those classes are untouched.
    """
    classes = {type(m) for p, m in nnx.iter_modules(model) if p in recorded_paths}
    calls: list = []
    live: dict[int, tuple] = {}  # id(module in the merged copy) -> path
    running: set[int] = set()    # guards against a subclass calling a wrapped parent's __call__

    def wrap(original):
        def recording_call(self, *args, **kwargs):
            path = live.get(id(self))
            if path is None or id(self) in running:
                return original(self, *args, **kwargs)
            running.add(id(self))
            try:
                out = original(self, *args, **kwargs)
            finally:
                running.discard(id(self))
            calls.append((path, _arrays(args[:1]), _arrays(out)))
            return out
        return recording_call

    graphdef, state = nnx.split(model)

    def forward(state, x):
        copy = nnx.merge(graphdef, state, copy=True)
        copy.eval()
        live.clear()
        live.update({id(m): p for p, m in nnx.iter_modules(copy) if p in recorded_paths})
        return copy(x)

    patched = []
    try:
        for cls in classes:
            patched.append((cls, cls.__dict__.get("__call__")))
            cls.__call__ = wrap(cls.__call__)
        jax.eval_shape(forward, state, x_abstract)
    finally:
        for cls, own in reversed(patched):
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
    return [(p, [_shape_only(a) for a in i], [_shape_only(a) for a in o]) for p, i, o in calls]


def _arrays(tree) -> list:
    return [leaf for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape") and hasattr(leaf, "dtype")]


def _shape_only(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)


def _param_count(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _nbytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "dtype"))  # keys too


def _flops(module, inputs, outputs) -> int:
    """2 x multiply-adds of one call, from shapes (padding ignored); 0 for other layers."""
    if not outputs:
        return 0
    if isinstance(module, nnx.ConvTranspose):
        kernel = module.kernel.shape  # (*window, in, out): every input pixel meets the whole kernel
        return 2 * (inputs[0].size // kernel[-2]) * math.prod(kernel) if inputs else 0
    if isinstance(module, nnx.Conv):
        kernel = module.kernel.shape  # (*window, in / groups, out)
        return 2 * outputs[0].size * math.prod(kernel[:-1])
    if isinstance(module, nnx.Linear):
        return 2 * outputs[0].size * module.kernel.shape[0]
    return 0


# --- XLA's figures ---------------------------------------------------------------------


def _compile_figures(model, what: str, batch_size: int, input_shape, dtype) -> XlaFigures:
    """Compile inference (eval mode) or one training step (train mode) for abstract inputs."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.ShapeDtypeStruct((batch_size, *input_shape), dtype)

    def infer(params, rest, x):
        copy = nnx.merge(graphdef, params, rest, copy=True)
        copy.eval()
        return copy(x)

    def train_step(params, rest, x):
        def loss_fn(params, rest):  # rest passed in: BatchNorm updates it at this trace level
            copy = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables BatchNorm may update here
            copy.train()
            out = copy(x)
            loss = sum(jnp.mean(jnp.square(y.astype(jnp.float32))) for y in jax.tree.leaves(out))
            return loss, nnx.state(copy, nnx.Not(nnx.Param))
        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
        return loss, grads, new_rest

    abstract = lambda tree: jax.tree.map(_shape_only, tree)  # noqa: E731
    fn = infer if what == "inference" else train_step
    compiled = jax.jit(fn).lower(abstract(params), abstract(rest), x).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0] if cost else {}
    return XlaFigures(
        what=what, batch_size=batch_size,
        argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
        generated_code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float((cost or {}).get("flops", 0.0)))


# --- formatting ------------------------------------------------------------------------


def _path_parts(path: str) -> list[str]:
    return path.split(".") if path else []


def _module_parts(path: str) -> list[str]:
    """Path components naming modules: list indices join their list's name ("layers.0")."""
    parts: list[str] = []
    for part in _path_parts(path):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}.{part}"
        else:
            parts.append(part)
    return parts


def _prefix(path: str, depth: int) -> str:
    return ".".join(_module_parts(path)[:depth])


def _depth(path: str) -> int:
    return len(_module_parts(path))


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def _table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# --- command line ----------------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """"224x224x3" -> (224, 224, 3); anything else raises a ValueError saying the expected form."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not match or 0 in (shape := tuple(int(g) for g in match.groups())):
        raise ValueError(f"--input must be HxWxC with positive integers, e.g. 224x224x3; got {text!r}")
    return shape


def cmd_summary(args) -> int:
    import json

    from zoo.registry import create_model, get_spec

    shape = parse_input_shape(args.input) if args.input else None  # bad input fails first
    spec = get_spec(args.name)
    h, w, c = shape or spec.input_shape
    if args.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {args.batch}")
    if args.depth is not None and args.depth < 0:
        raise ValueError(f"--depth must be 0 (every layer) or more, got {args.depth}")
    dtype = DTYPES[args.dtype]
    model = eval_shape(lambda: create_model(
        args.name, num_classes=args.num_classes, input_size=(h, w), in_channels=c, dtype=dtype))
    summary = summarize(model, (h, w, c), batch_size=args.batch, dtype=dtype, xla=not args.no_xla)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.format(summary.auto_depth() if args.depth is None else args.depth))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "summary", help="per-layer parameters, activation memory and FLOPs, and XLA's memory figures",
        description="Per-layer table and the book's memory lower bounds (Hands-On ML ch. 14, ex. 2) "
                    "beside what XLA reports for the compiled inference and training step.")
    p.add_argument("name", help="a registered model (see `zoo list`)")
    p.add_argument("--input", help="HxWxC of one image, e.g. 224x224x3 (default: the model's)")
    p.add_argument("--batch", type=int, default=32, help="training batch size (default 32)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (default: the model's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="computation and input dtype")
    p.add_argument("--depth", type=int, default=None,
                   help="sum nested blocks to this many module levels (0: every layer; default: fit about 60 rows)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--no-xla", action="store_true", help="skip compiling (no XLA figures; much faster)")
    p.set_defaults(func=cmd_summary)
