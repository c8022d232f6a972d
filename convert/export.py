"""A converted network as one file that runs on any image size without this project (jax.export).

The FCN is traced once with symbolic height and width (and batch), constrained to the sizes it
accepts, and serialized as StableHLO with its weights inside. Anything with jax can serve it:

    exported = convert.export_fcn(fcn)               # symbolic (n, h, w, C) -> (n, h', w', K)
    exported.save("model.stablehlo")                 # + model.stablehlo.json: input constraints, geometry
    # elsewhere, with jax (and flatbuffers, which jax reads the file with) only:
    run = jax.export.deserialize(open("model.stablehlo", "rb").read())
    scores = run.call(images)                        # images (N, H, W, C) float32, any H, W allowed

Symbolic shapes decide every size comparison from the constraints (H >= min_size ...). A layer
that branches on something they leave open, such as EfficientNet's padding that depends on
whether a side is even, would silently trace one branch, so the export is checked against the
live network at sizes of both parities; sizes of one form (`multiple_of`, e.g. the total stride)
make such layers exportable. BatchNorms are folded first (`convert.fold`): fewer operations to
serve, outputs equal to float rounding. A server should check sizes against the constraints in the
.json: outside them jax's `call` fails, e.g. with a bare MLIR "invalid tensor dimension size".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import export
from jax.errors import InconclusiveDimensionOperation

from convert.fcn import FCN
from convert.fold import FoldedBatchNorm, fold_batchnorm
from zoo import cpu_conv, saving

EXPORT_FORMAT = "fcnzoo-stablehlo"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
VERIFY_TOLERANCE = 1e-4  # relative to max(1, largest |score|): float rounding, not a wrong branch

# What `zoo export --format onnx` answers (see the README's dependency note).
ONNX_UNAVAILABLE = (
    "ONNX export is not offered: jax2onnx, the maintained JAX-to-ONNX converter, fails on the zoo's FCNs under "
    "jax 0.10 / flax 0.12 (0.17.1 and 0.13.0 tried on LeNet-5, MnistNet, ResNet-18, Xception and EfficientNet-B0: "
    "its rewrites of flax's pooling and convolution break), and since 0.13.1 it pins orbax-checkpoint below this "
    "project's 0.12.8; export StableHLO (the default --format) and serve it with jax")


@dataclasses.dataclass
class ExportedFCN:
    """A serialized-ready export and its description.

    exported: the `jax.export.Exported` (call it, or `serialize()` it).
    info: plain data saved beside it: input shape and constraints, output shape, geometry, checks.
    """

    exported: export.Exported
    info: dict

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the artifact to `path` and its description to `path` + ".json", atomically; returns `path`.

        An existing `path` is replaced only with `force`, and only when it is an earlier export.
        """
        path = check_export_path(path, force=force)
        saving.write_files_atomically(path.parent, {path.name: bytes(self.exported.serialize()),
                                                    f"{path.name}.json": json.dumps(self.info, indent=2).encode()})
        return path


def check_export_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse, before anything is exported, an artifact path that may not be written (see `ExportedFCN.save`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out {path} is a directory; give the artifact's file name, e.g. {path / 'model.stablehlo'}")
    if path.exists():
        described = Path(f"{path}.json")
        ours = described.is_file() and EXPORT_FORMAT in described.read_text(errors="replace")[:200]
        if not ours:
            raise ValueError(f"--out {path} exists and is not an export written by `zoo export`; choose another "
                             f"--out. Nothing was written.")
        if not force:
            raise ValueError(f"--out {path} already holds an export; pass --force to replace it, or choose another "
                             f"--out. Nothing was written.")
    return path


def _pair(value, what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{what} must be a positive size or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def _at_least(size, bound) -> bool:
    """size >= bound for every size the constraints allow (size may be symbolic)."""
    try:
        return bool(size >= bound)
    except InconclusiveDimensionOperation:
        return False


def symbolic_input(channels: int, min_size, *, multiple_of=1, max_size=None):
    """ShapeDtypeStruct (n, H, W, channels) float32 with H, W symbolic: H = m*h >= min_size[0], ...

    Returns (spec, constraints as strings, the smallest allowed (H, W)).
    """
    (min_h, min_w), (m_h, m_w) = _pair(min_size, "min_size"), _pair(multiple_of, "multiple_of")
    low = (math.ceil(min_h / m_h), math.ceil(min_w / m_w))
    constraints = [f"h >= {low[0]}", f"w >= {low[1]}"]
    if max_size is not None:
        max_h, max_w = _pair(max_size, "max_size")
        high = (max_h // m_h, max_w // m_w)
        if high[0] < low[0] or high[1] < low[1]:
            raise ValueError(f"no size is allowed: max_size {max_h}x{max_w} is below the smallest "
                             f"{low[0] * m_h}x{low[1] * m_w} (min_size, rounded up to multiple_of)")
        constraints += [f"h <= {high[0]}", f"w <= {high[1]}"]
    n, h, w = export.symbolic_shape("n, h, w", constraints=constraints)
    spec = jax.ShapeDtypeStruct((n, m_h * h, m_w * w, channels), jnp.float32)
    return spec, constraints, (low[0] * m_h, low[1] * m_w)


def _describe_size(constraints, multiple_of) -> str:
    m_h, m_w = _pair(multiple_of, "multiple_of")
    side = lambda m, v: v if m == 1 else f"{m}*{v}"
    return f"H = {side(m_h, 'h')}, W = {side(m_w, 'w')} with " + ", ".join(constraints)


def verification_sizes(smallest, stride, multiple_of=1, max_size=None) -> list[tuple[int, int]]:
    """Three allowed (H, W) above `smallest`: odd and even sides where multiple_of allows, the last further off."""
    (m_h, m_w), (s_h, s_w) = _pair(multiple_of, "multiple_of"), _pair(stride, "stride")
    # In steps of multiple_of; with no such step, the last size is a couple of strides further.
    far = (2 * s_h + 1, s_w + 2) if (m_h, m_w) == (1, 1) else (3, 1)
    steps = [(1, 3), (2, 0), far]
    sizes = []
    for dh, dw in steps:
        h, w = smallest[0] + dh * m_h, smallest[1] + dw * m_w
        if max_size is not None:
            max_h, max_w = _pair(max_size, "max_size")
            h, w = min(h, max_h // m_h * m_h), min(w, max_w // m_w * m_w)
        sizes.append((h, w))
    return list(dict.fromkeys(sizes))


def export_fcn(fcn: FCN, *, min_size=None, multiple_of=1, max_size=None, platforms=None, fold: bool = True,
               verify: bool = True) -> ExportedFCN:
    """Export `fcn` for images of any allowed size, weights included.

    Args:
        fcn: a `convert.FCN` (from `convert.to_fcn` or `convert.load_fcn`), in eval mode.
        min_size: smallest (H, W) to allow (default: `fcn.min_size`, the receptive field of
            VALID nets, the training size of padded ones); one that leaves no output cell is refused.
        multiple_of: allow only sizes that are multiples of this (int or (H, W)); for layers
            whose computation depends on the size's parity (EfficientNet), use the total stride.
        max_size: largest (H, W) to allow (default: no limit).
        platforms: where the artifact may run, from `PLATFORMS` (default: this machine's).
            The CPU fast paths of `zoo.cpu_conv` are traced only for a CPU-only export.
        fold: fold BatchNorms into their convolutions first (`convert.fold_batchnorm`).
        verify: run the export against the live network at three sizes (needs this machine's
            platform among `platforms`) and refuse it when they differ.
    Returns:
        an `ExportedFCN`: (n, H, W, C) float32 -> (n, h', w', K) float32.
    Raises:
        ValueError saying which constraint or layer stands in the way; TypeError for anything but an FCN.
    """
    if not isinstance(fcn, FCN):
        raise TypeError(f"export_fcn takes a convert.FCN, got {type(fcn).__name__}")
    here = export.default_export_platform()
    platforms = tuple(platforms or (here,))
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        raise ValueError(f"unknown platform(s) {unknown}; choose from {list(PLATFORMS)}")
    min_size = _pair(min_size if min_size is not None else fcn.min_size, "min_size")
    g = fcn.geometry
    if g.valid and (min_size[0] < g.receptive_field[0] or min_size[1] < g.receptive_field[1]):
        raise ValueError(
            f"FCN({fcn.source}) judges windows of {g.receptive_field[0]}x{g.receptive_field[1]} pixels (its "
            f"receptive field) and gives no output cell on smaller images, but the export would allow "
            f"{min_size[0]}x{min_size[1]}; use a min_size of at least {g.receptive_field[0]}x{g.receptive_field[1]}")
    spec, constraints, smallest = symbolic_input(fcn.input_shape[-1], min_size, multiple_of=multiple_of,
                                                 max_size=max_size)
    sizes_text = _describe_size(constraints, multiple_of)
    network = fold_batchnorm(fcn) if fold else fcn
    folded = sum(isinstance(node, FoldedBatchNorm) for _, node in nnx.iter_graph(network)) if fold else 0
    graphdef, state = nnx.split(network)
    ops = cpu_conv.xla_ops_only if any(p != "cpu" for p in platforms) else contextlib.nullcontext
    too_small = (f"raise the smallest size (now {smallest[0]}x{smallest[1]}; the training size, "
                 f"{fcn.input_shape[0]}x{fcn.input_shape[1]}, always gives one cell)")
    open_question = (f"allow sizes of one form only (multiple_of, --multiple-of {g.stride[0]}: the total "
                     f"stride) or {too_small}")

    def scores(x):
        return nnx.merge(graphdef, state)(x)

    def traced(step, fn):
        # The network runs at concrete sizes (it was converted or loaded), so what fails here is
        # what symbolic sizes cannot express: an undecidable comparison, or two branches whose
        # equal sizes are written differently (ceil(H/2) as floordiv(H - 1, 2) + 1 and as -floordiv(-H, 2)).
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (re-raised as the one-line reason)
            raise ValueError(f"FCN({fcn.source}) cannot be {step} for every size {sizes_text}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0]} To fix it, {open_question}.") from None

    need = fcn.feature_shape[:2]
    with ops():
        # The backbone alone first: FCN.__call__ turns any backbone failure into a size message.
        features = traced("traced", lambda: jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).backbone(x), state, spec))
        if not all(_at_least(features.shape[1 + a], need[a]) for a in range(2)):
            raise ValueError(
                f"FCN({fcn.source}) needs a backbone map of at least {need[0]}x{need[1]} cells for one output cell, "
                f"which sizes {sizes_text} do not guarantee (the map is {features.shape[1]} x {features.shape[2]}); "
                f"{too_small}")
        exported = traced("exported", lambda: export.export(jax.jit(scores), platforms=platforms)(spec))

    info = {
        "format": EXPORT_FORMAT,
        "source": fcn.source,
        "input": {"shape": [str(d) for d in spec.shape], "dtype": "float32", "constraints": constraints,
                  "sizes": sizes_text, "smallest": list(smallest), "channels": fcn.input_shape[-1]},
        "output": {"shape": [str(d) for d in exported.out_avals[0].shape], "dtype": str(exported.out_avals[0].dtype),
                   "classes": fcn.num_classes},
        "geometry": g.to_dict(),
        "training_input_shape": list(fcn.input_shape),
        "platforms": list(platforms),
        "folded_batchnorms": folded,
        "jax_version": jax.__version__,
        "verified": [],
    }
    if verify and here in platforms:
        info["verified"] = verify_export(exported, fcn, verification_sizes(smallest, g.stride, multiple_of, max_size))
    return ExportedFCN(exported, info)


def verify_export(exported: export.Exported, fcn: FCN, sizes, *, seed: int = 0) -> list[dict]:
    """Run `exported` and the live `fcn` on random images of each (H, W) in `sizes`; refuse a mismatch.

    Returns one {"size", "batch", "max_abs_diff", "score_scale"} per size (scale: max(1, largest |score|)).
    """
    graphdef, state = nnx.split(fcn)
    live = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    report = []
    for k, (h, w) in enumerate(sizes):
        batch = 2 if k == 0 else 1  # the batch is symbolic too
        x = jax.random.normal(jax.random.key(seed + k), (batch, h, w, fcn.input_shape[-1]))
        ours, reference = np.asarray(exported.call(x)), np.asarray(live(state, x))
        if ours.shape != reference.shape:
            diff = math.inf
        else:
            diff = float(np.max(np.abs(ours.astype(np.float64) - reference))) if ours.size else 0.0
        scale = max(1.0, float(np.max(np.abs(reference)))) if reference.size else 1.0
        if not diff <= VERIFY_TOLERANCE * scale:
            raise ValueError(
                f"the export of FCN({fcn.source}) gives other scores than the live network on {h}x{w} images "
                f"(shapes {ours.shape} vs {reference.shape}, max |diff| {diff:.3g}): a layer decides on the "
                f"image size in a way the symbolic sizes do not express (e.g. padding that depends on whether "
                f"a side is even); allow sizes of one form only (multiple_of, --multiple-of "
                f"{fcn.geometry.stride[0]}: the total stride)")
        report.append({"size": [h, w], "batch": batch, "max_abs_diff": diff, "score_scale": scale})
    return report


def load_exported(path: str | os.PathLike) -> export.Exported:
    """The `jax.export.Exported` saved at `path` (what a server without this project does)."""
    return export.deserialize(bytearray(Path(path).read_bytes()))
