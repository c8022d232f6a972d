"""FCN-32s, FCN-16s and FCN-8s grown from any classifier that `convert.to_fcn` made fully convolutional.

Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation",
https://arxiv.org/abs/1411.4038 (sec. 4.1-4.2, fig. 3):

- FCN-32s: the converted head scores every cell of the backbone's last map (stride S, the total
  stride); one transposed convolution, initialized to bilinear interpolation and learned, upsamples
  the scores by S to one score vector per pixel.
- FCN-16s: the coarse scores are upsampled by 2 and added to the scores of a 1x1 convolution on
  the stage of stride S/2 (zero-initialized, so training starts from FCN-32s's answer); the sum is
  upsampled by S/2. FCN-8s: one more such skip from the stage of stride S/4.

The stages come from the backbone's description as data (`zoo.stages.Stage`: name, stride,
channels; `convert.FCN.stages`), so the same code grows VGG-16 into the paper's FCN-8s (skips from
pool4 and pool3), a ResNet, an EfficientNet or a user's `nnx.Sequential`. For a backbone of total
stride 4 (mnistnet, LeNet-5) the three nets end at strides 4, 2 and 1: "32s/16s/8s" name the
architecture (no skip, one, two), `SegmentationFCN.output_strides` the actual strides.

Net surgery (sec. 3.1, 4.1), from the converted head (`convert.FCN.head`):
- flatten heads: the first converted conv (the paper's fc6, a k x k conv over the training feature
  map) is padded so that each output cell is centred on its feature cell; fc7 and the other 1x1
  convs follow unchanged; the last conv becomes the score conv with `num_classes` filters.
- average-pool heads: the head without its average pool, i.e. the classifier's Dense as a 1x1
  score conv on the last map (`FCN.score_map`).
With `keep_class_filters` the score conv keeps the classifier's trained class filters as its first
classes (the data set's classes extend the classifier's, e.g. ten digits + background); otherwise
it starts at zero, as in the paper.

Alignment (the paper's crop layers): every map's cell i is centred at input pixel c + i * s. For
SAME-padded backbones run on a multiple of S, c = (s - 1) / 2 at every stage, and the maps line up
as they are. For VALID backbones (LeNet-5) the centres come from each stage's geometry
(`convert.walk_geometry`), the input is padded so that the output covers every pixel, and each sum
crops its inputs by the integer offset between the two grids.

    net = grow_segmentation(convert.to_fcn(classifier), "fcn8s", num_classes=21, preprocessing=record)
    net(x): (N, H, W, C) floats in [0, 1] (uint8 / 255), any H, W -> (N, H, W, num_classes) logits
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import export
import numpy as np
from flax import nnx

from convert.fcn import FCN
from zoo import cpu_conv
from zoo.layers import AvgPool
from zoo.saving import SEGMENTATION_CONFIG, SEGMENTATION_FORMAT
from zoo.stages import Stage, backbone_steps, stage_maps

VARIANTS = {"fcn32s": 0, "fcn16s": 1, "fcn8s": 2}  # name -> number of skip connections
DISPLAY_NAMES = {"fcn32s": "FCN-32s", "fcn16s": "FCN-16s", "fcn8s": "FCN-8s"}


def bilinear_kernel(factor: int, channels: int) -> np.ndarray:
    """(2f, 2f, C, C) kernel of a transposed conv that upsamples each channel bilinearly by f.

    Tap t of the 2f-long 1-D filter weighs 1 - |t - (2f - 1) / 2| / f: with stride f and padding
    f/2 (see `TransposedConv`), output pixel p gets input cell i with weight 1 - |(p + 0.5) / f
    - 0.5 - i|, the tent of bilinear interpolation with half-pixel centres. Channels do not mix
    (the kernel is diagonal in (C_in, C_out)); training may change that.
    """
    taps = 1.0 - np.abs(np.arange(2 * factor) - (2 * factor - 1) / 2) / factor
    kernel = np.zeros((2 * factor, 2 * factor, channels, channels), np.float32)
    kernel[:, :, np.arange(channels), np.arange(channels)] = np.outer(taps, taps)[..., None]
    return kernel


class TransposedConv(nnx.Module):
    """Learned upsampling by an even `factor`: transposed convolution, kernel 2f, stride f, padding f/2.

    Initialized to bilinear interpolation (`bilinear_kernel`), as the paper does.
    x: (N, h, w, C) -> (N, h*f, w*f, C); output cell j is centred at input position (j + 0.5) / f - 0.5.
    """

    def __init__(self, channels: int, factor: int):
        if factor < 2 or factor % 2:
            raise ValueError(f"learned upsampling needs an even factor >= 2 between stages, got {factor}")
        self.factor = factor
        self.kernel = nnx.Param(jnp.asarray(bilinear_kernel(factor, channels)))

    def __call__(self, x):
        f = self.factor
        if f >= SUBPIXEL_MIN_FACTOR and cpu_conv.enabled() and not any(map(export.is_symbolic_dim, x.shape)):
            return _subpixel_upsample(x, self.kernel[...].astype(x.dtype), f)
        # A transposed conv is a conv over the input dilated by f (f - 1 zeros between cells) with the
        # spatially flipped kernel; padding k - 1 - f/2 on each side gives exactly h*f outputs.
        pad = 2 * f - 1 - f // 2
        kernel = self.kernel[...][::-1, ::-1].astype(x.dtype)
        # (zoo.cpu_conv runs it on CPU as oneDNN's transposed convolution, without the zeros.)
        return cpu_conv.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=[(pad, pad), (pad, pad)],
                                             lhs_dilation=(f, f), dimension_numbers=("NHWC", "HWIO", "NHWC"))


# From this factor on, `TransposedConv` runs on CPU as `_subpixel_upsample`: at x32 (FCN-32s) 6.4x and
# at x16 2.9x faster than the transposed convolution (oneDNN's), slower at x8 (docs/BENCHMARKS.md).
SUBPIXEL_MIN_FACTOR = 16


def _subpixel_upsample(x, kernel, f: int):
    """`TransposedConv`'s output (kernel (2f, 2f, C, C'), stride f, padding f/2) as one 2x2
    convolution to f*f*C' channels, one per output phase, then depth-to-space and a crop.

    Output cell o (per axis) with o + f/2 = a*f + r takes x[a] * kernel[r] + x[a - 1] * kernel[r + f]:
    two taps of x per phase r. The zeros the dilated form multiplies are never formed.
    x: (N, h, w, C) -> (N, h*f, w*f, C').
    """
    n, h, w, cin = x.shape
    cout, q = kernel.shape[3], f // 2
    # (tap over x[a - 1], x[a]) x (tap) x C x (phase r, phase s, C'): tap 0 reads kernel[r + f], tap 1 kernel[r].
    taps = kernel.reshape(2, f, 2, f, cin, cout)[::-1, :, ::-1].transpose(0, 2, 4, 1, 3, 5)
    phases = cpu_conv.conv_general_dilated(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))),
                                           taps.reshape(2, 2, cin, f * f * cout), (1, 1), ((0, 0), (0, 0)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    shuffled = phases.reshape(n, h + 1, w + 1, f, f, cout).transpose(0, 1, 3, 2, 4, 5)
    return shuffled.reshape(n, (h + 1) * f, (w + 1) * f, cout)[:, q:q + h * f, q:q + w * f]


def _copy_conv(conv: nnx.Conv, *, padding, out_features: int | None = None, keep_filters: bool = True) -> nnx.Conv:
    """A copy of `conv` with `padding`; with `out_features`, filters beyond the kept ones start at zero."""
    kernel = np.asarray(conv.kernel[...])
    bias = np.asarray(conv.bias[...]) if conv.use_bias else np.zeros(kernel.shape[-1], np.float32)
    out = out_features or kernel.shape[-1]
    kept = min(out, kernel.shape[-1]) if keep_filters else 0
    grown = nnx.Conv(kernel.shape[2], out, kernel_size=tuple(conv.kernel_size), padding=padding,
                     dtype=conv.dtype, param_dtype=conv.param_dtype, precision=conv.precision, rngs=nnx.Rngs(0))
    new_kernel = np.zeros((*kernel.shape[:3], out), np.float32)
    new_kernel[..., :kept] = kernel[..., :kept]
    new_bias = np.zeros(out, np.float32)
    new_bias[:kept] = bias[:kept]
    grown.kernel.set_value(jnp.asarray(new_kernel, grown.kernel[...].dtype))
    grown.bias.set_value(jnp.asarray(new_bias, grown.bias[...].dtype))
    return grown


def centred_padding(kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Padding that centres a k x k conv's output cell on its input cell ((k-1)//2 before, k//2 after)."""
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)


def score_path(fcn: FCN, num_classes: int, *, keep_class_filters: bool) -> list[nnx.Module]:
    """The converted head as per-cell scoring layers (see the module docstring): copies, fcn unchanged."""
    layers = [m for m in fcn.head if not isinstance(m, AvgPool)]
    while layers and not isinstance(layers[-1], nnx.Conv):  # a trailing softmax or activation: we want logits
        layers.pop()
    convs = [i for i, m in enumerate(layers) if isinstance(m, nnx.Conv)]
    if not convs:
        raise ValueError(f"{fcn.source}'s converted head has no convolution to score with")
    path = []
    for i, layer in enumerate(layers):
        if isinstance(layer, nnx.Conv):
            first, last = i == convs[0], i == convs[-1]
            padding = centred_padding(layer.kernel_size) if first else "VALID"
            if last:
                layer = _copy_conv(layer, padding=padding, out_features=num_classes, keep_filters=keep_class_filters)
            else:
                layer = _copy_conv(layer, padding=padding)
        elif isinstance(layer, nnx.Dropout):
            layer = nnx.Dropout(layer.rate, rngs=nnx.Rngs(dropout=0))
        else:
            layer = nnx.clone(layer) if isinstance(layer, nnx.Module) else layer
        path.append(layer)
    return path


def _normalization(preprocessing: dict | None, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, offset) per channel so that x_net = x * scale + offset for x = uint8 / 255.

    The recorded preprocessing is x_net = (uint8 * s - mean) / std, so scale = 255 s / std and
    offset = -mean / std. None: the network sees x as it is.
    """
    if preprocessing is None:
        return (1.0,) * channels, (0.0,) * channels
    mean = np.broadcast_to(np.asarray(preprocessing["mean"], np.float64), (channels,))
    std = np.broadcast_to(np.asarray(preprocessing["std"], np.float64), (channels,))
    scale = 255.0 * float(preprocessing["scale"]) / std
    return tuple(float(v) for v in scale), tuple(float(v) for v in -mean / std)


def pick_skip_stages(stages: Sequence[Stage], skips: int) -> list[Stage]:
    """The stages of stride S/2, S/4, ... (S the last stage's) that feed `skips` skips, coarse to fine."""
    final = stages[-1]
    chosen = []
    for k in range(1, skips + 1):
        want = final.stride // 2**k
        stage = next((s for s in reversed(stages[:-1]) if s.stride == want and want * 2**k == final.stride), None)
        if stage is None:
            have = ", ".join(f"{s.name} (stride {s.stride})" for s in stages)
            raise ValueError(f"{skips} skip(s) need stages of stride {final.stride // 2}"
                             f"{' and ' + str(final.stride // 4) if skips > 1 else ''}; this backbone's stages are "
                             f"{have}. Use a variant with fewer skips (fcn32s has none).")
        chosen.append(stage)
    return chosen


class SegmentationFCN(nnx.Module):
    """Backbone + score path + FCN decoder with 0, 1 or 2 skips (FCN-32s / 16s / 8s).

    Build it with `grow_segmentation` (from a converted classifier) or `grow_from` (staged training).

    Args:
        backbone: the converted classifier's backbone (a copy).
        stages: the backbone's stages (`zoo.stages.Stage`), the last one its final map.
        score: per-cell scoring layers on the final map, (N, h, w, c) -> (N, h, w, num_classes).
        skips: 0, 1 or 2.
        num_classes: classes scored per pixel.
        normalization: (scale, offset) per channel: x_net = x * scale + offset (`_normalization`).
        centres: {stage name: (row, col) input position of cell (0, 0)'s centre}; None for SAME-
            padded backbones, whose stage s has its centre at (s - 1) / 2.
        source: {"model", "kwargs"} of the registry classifier the backbone came from (for saving),
            or {"model": name} for a user's network.
        input_shape: (H, W, C) the classifier was trained at (for measuring the backbone's geometry).
    x: (N, H, W, C) floats in [0, 1], any H, W -> (N, H, W, num_classes) logits.
    """

    def __init__(self, backbone, stages: Sequence[Stage], score: Sequence, *, skips: int, num_classes: int,
                 normalization, centres: dict | None = None, source: dict | None = None, input_shape=None):
        if skips not in VARIANTS.values():
            raise ValueError(f"skips must be 0, 1 or 2, got {skips}")
        self.backbone = backbone
        self.stages_json = json.dumps([s.to_dict() for s in stages])
        self.score = nnx.List(score)
        self.skips = int(skips)
        self.num_classes = int(num_classes)
        self.scale, self.offset = (tuple(float(v) for v in part) for part in normalization)
        self.centres_json = json.dumps(centres) if centres is not None else None
        self.source_json = json.dumps(source or {})
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._field: int | None = None
        finer = pick_skip_stages(stages, self.skips)
        final = stages[-1]
        self.total_stride = final.stride
        self.skip_scores = nnx.List([
            nnx.Conv(s.channels, num_classes, kernel_size=(1, 1), kernel_init=nnx.initializers.zeros,
                     bias_init=nnx.initializers.zeros, rngs=nnx.Rngs(0)) for s in finer])
        strides = [final.stride, *(s.stride for s in finer)]
        self.upsample = nnx.List([TransposedConv(num_classes, a // b) for a, b in itertools.pairwise(strides)])
        self.final_factor = strides[-1]
        self.final_upsample = TransposedConv(num_classes, strides[-1]) if strides[-1] > 1 else None
        cpu_conv.use_cpu_conv(self)  # the score and skip convolutions; zoo/cpu_conv.py

    # -- structure -------------------------------------------------------------------------------
    @property
    def stages(self) -> list[Stage]:
        return [Stage(**d) for d in json.loads(self.stages_json)]

    @property
    def skip_stages(self) -> list[Stage]:
        return pick_skip_stages(self.stages, self.skips)

    @property
    def source(self) -> dict:
        return json.loads(self.source_json)

    @property
    def variant(self) -> str:
        return {v: k for k, v in VARIANTS.items()}[self.skips]

    @property
    def in_channels(self) -> int:
        return len(self.scale)

    @property
    def receptive_field(self) -> int:
        """Pixels (per side) one output pixel depends on, about: the backbone's field, the score path's
        kernels and the decoder's reach. Measured once (`convert.walk_geometry`); tiling margins come from it."""
        if self._field is None:
            from convert.geometry import walk_geometry

            field = max(walk_geometry(self.backbone, self.input_shape).receptive_field)
            kernels = [max(m.kernel_size) for m in self.score if isinstance(m, nnx.Conv)]
            self._field = field + sum(k - 1 for k in kernels) * self.total_stride + 2 * self.total_stride
        return self._field

    @property
    def output_strides(self) -> dict[str, int]:
        """Strides of the coarse score map, of each skip, and the final upsampling factor."""
        return {"score": self.total_stride, **{f"skip{i + 1}": s.stride for i, s in enumerate(self.skip_stages)},
                "final_upsampling": self.final_factor}

    def _centre(self, stage: Stage) -> tuple[float, float]:
        if self.centres_json is None:
            return ((stage.stride - 1) / 2,) * 2
        return tuple(json.loads(self.centres_json)[stage.name])

    def _plan(self):
        """Static alignment: per axis, the input padding before the image and each fusion's crop.

        Returns (pad_before (2,), crops [(up_crop (2,), skip_crop (2,)) per skip], final_crop (2,)).
        """
        final = self.stages[-1]
        centre, stride = np.array(self._centre(final)), final.stride
        crops = []
        for stage in self.skip_stages:
            # Cell j of the map upsampled by f = stride / s is centred at c + (j + 0.5) s - stride / 2.
            up_centre = centre - stride / 2 + stage.stride / 2
            skip_centre = np.array(self._centre(stage))
            shift = np.rint((skip_centre - up_centre) / stage.stride).astype(int)
            up_crop, skip_crop = np.maximum(shift, 0), np.maximum(-shift, 0)
            crops.append((tuple(int(v) for v in up_crop), tuple(int(v) for v in skip_crop)))
            centre, stride = skip_centre + skip_crop * stage.stride, stage.stride
        if stride > 1:
            centre = centre - stride / 2 + 0.5
        # Output pixel 0 is centred at `centre` of the padded input: pad so it lands on image pixel 0.
        pad_before = np.maximum(np.ceil(centre), 0).astype(int)
        final_crop = np.rint(pad_before - centre).astype(int)
        return tuple(int(v) for v in pad_before), crops, tuple(int(v) for v in final_crop)

    # -- forward ---------------------------------------------------------------------------------
    def stage_outputs(self, x):
        """x: (N, H, W, C) normalized and padded -> [final map, skip maps coarse to fine]."""
        names = [self.stages[-1].name, *(s.name for s in self.skip_stages)]
        return stage_maps(self.backbone, x, names)

    def coarse_scores(self, x):
        """x: (N, H, W, C) in [0, 1], H and W multiples of the total stride -> (N, H/S, W/S, K) scores."""
        y = self.stage_outputs(self._normalize(x))[0]
        for layer in self.score:
            y = layer(y)
        return y

    def _normalize(self, x):
        scale = jnp.asarray(self.scale, x.dtype)
        offset = jnp.asarray(self.offset, x.dtype)
        return x * scale + offset

    def __call__(self, x):
        """x: (N, H, W, C) in [0, 1], any H, W -> (N, H, W, num_classes) logits."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"the segmentation net expects (N, H, W, {self.in_channels}) images, got shape "
                             f"{tuple(x.shape)}")
        height, width = x.shape[1], x.shape[2]
        pad_before, crops, final_crop = self._plan()
        s = self.total_stride
        # Zero is black in [0, 1] pixels: the scene goes on a little further. VALID backbones also need
        # as much beyond the far edge as before the near one.
        extra = pad_before if self.centres_json is not None else (0, 0)
        padded = [math.ceil((n + p + e) / s) * s for n, p, e in zip((height, width), pad_before, extra)]
        x = jnp.pad(x, ((0, 0), (pad_before[0], padded[0] - height - pad_before[0]),
                        (pad_before[1], padded[1] - width - pad_before[1]), (0, 0)))
        maps = self.stage_outputs(self._normalize(x))
        y = maps[0]
        for layer in self.score:
            y = layer(y)
        for up, skip_score, skip_map, (up_crop, skip_crop) in zip(self.upsample, self.skip_scores, maps[1:], crops):
            y = up(y)
            z = skip_score(skip_map).astype(y.dtype)
            y, z = y[:, up_crop[0]:, up_crop[1]:], z[:, skip_crop[0]:, skip_crop[1]:]
            rows, cols = min(y.shape[1], z.shape[1]), min(y.shape[2], z.shape[2])
            y = y[:, :rows, :cols] + z[:, :rows, :cols]
        if self.final_upsample is not None:
            y = self.final_upsample(y)
        y = y[:, final_crop[0]:final_crop[0] + height, final_crop[1]:final_crop[1] + width]
        if y.shape[1] != height or y.shape[2] != width:
            raise AssertionError(f"the decoder covers {y.shape[1]}x{y.shape[2]} of a {height}x{width} image "
                                 f"(alignment plan {pad_before}, {crops}, {final_crop}): a bug, please report it")
        return y

    # -- description -----------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """How to rebuild this net's structure (the weights are saved beside it)."""
        return {"variant": self.variant, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "normalization": {"scale": list(self.scale), "offset": list(self.offset)},
                "backbone": self.source, "output_strides": self.output_strides,
                "stages": [s.to_dict() for s in self.stages]}


def _same_aligned(fcn: FCN) -> bool:
    """Whether every stage map of stride s has exactly n / s cells for inputs n that are multiples of S.

    Then stage s has cell 0 centred at (s - 1) / 2 (SAME padding everywhere, up to the half pixel by
    which a strided SAME layer may sit off-centre). Shapes only: nothing runs.
    """
    stages = fcn.stages
    total = stages[-1].stride
    c = fcn.input_shape[-1]
    for n in (2 * total, 3 * total):
        x = jax.ShapeDtypeStruct((1, n, n, c), jnp.float32)
        graphdef, state = nnx.split(fcn.backbone)
        shapes = jax.eval_shape(lambda st, x: stage_maps(nnx.merge(graphdef, st), x, [s.name for s in stages]),
                                state, x)
        if any(m.shape[1:3] != (n // s.stride, n // s.stride) for m, s in zip(shapes, stages)):
            return False
    return True


def _stage_centres(fcn: FCN) -> dict | None:
    """{stage name: centre of cell (0, 0)} from each stage's geometry; None when SAME-aligned (`_same_aligned`)."""
    from convert.geometry import walk_geometry

    if _same_aligned(fcn):
        return None
    steps = backbone_steps(fcn.backbone)
    names = [name for name, _ in steps]
    centres = {}
    for stage in fcn.stages:
        prefix = nnx.Sequential(*[step for _, step in steps[:names.index(stage.name) + 1]])
        g = walk_geometry(prefix, fcn.input_shape)
        centres[stage.name] = [o + (r - 1) / 2 for o, r in zip(g.offset, g.receptive_field)]
    return centres


def grow_segmentation(fcn: FCN, variant: str, *, num_classes: int, preprocessing: dict | None = None,
                      keep_class_filters: bool | None = None, backbone: dict | None = None) -> SegmentationFCN:
    """FCN-32s/16s/8s from a converted classifier: backbone and head weights copied (fcn unchanged).

    Args:
        fcn: a `convert.FCN` with stages (`convert.to_fcn` of a zoo classifier or an nnx.Sequential).
        variant: "fcn32s", "fcn16s" or "fcn8s".
        num_classes: classes per pixel.
        preprocessing: the classifier's recorded preprocessing ({"scale", "mean", "std"}: x_net =
            (uint8 * scale - mean) / std); None when the classifier takes [0, 1] pixels.
        keep_class_filters: start the score conv from the classifier's class filters (its classes are
            the first classes of the data set); default: when num_classes >= the classifier's classes.
        backbone: {"model": registry name, "kwargs": create_model options} of the classifier, so the
            net can be saved and rebuilt (`save_segmentation`).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    stages = list(fcn.stages)
    if not stages:
        raise ValueError(f"{fcn.source} describes no stages; convert it with convert.to_fcn (zoo models and "
                         f"nnx.Sequential backbones have them)")
    if keep_class_filters is None:
        keep_class_filters = num_classes >= fcn.num_classes
    return SegmentationFCN(nnx.clone(fcn.backbone), stages, score_path(fcn, num_classes,
                                                                        keep_class_filters=keep_class_filters),
                           skips=VARIANTS[variant], num_classes=num_classes,
                           normalization=_normalization(preprocessing, fcn.input_shape[-1]),
                           centres=_stage_centres(fcn), source=backbone or {"model": fcn.source},
                           input_shape=fcn.input_shape)


def grow_from(previous: SegmentationFCN, variant: str) -> SegmentationFCN:
    """The next net of the paper's staged training: FCN-16s from a trained FCN-32s, FCN-8s from 16s.

    Backbone, score path and the skips both nets have are copied; a new skip starts at zero and new
    upsamplings at bilinear, so the grown net's first answer is the previous net's, up to how two
    bilinear steps differ from one (sec. 4.2: "initialized with the parameters of the last, coarser net").
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    centres = json.loads(previous.centres_json) if previous.centres_json is not None else None
    grown = SegmentationFCN(nnx.clone(previous.backbone), previous.stages, [nnx.clone(m) if isinstance(m, nnx.Module)
                                                                           else m for m in previous.score],
                            skips=VARIANTS[variant], num_classes=previous.num_classes,
                            normalization=(previous.scale, previous.offset), centres=centres,
                            source=previous.source, input_shape=previous.input_shape)
    for mine, theirs in zip(grown.skip_scores, previous.skip_scores):
        nnx.update(mine, nnx.state(nnx.clone(theirs)))
    for mine, theirs in zip(grown.upsample, previous.upsample):
        if mine.factor == theirs.factor:
            nnx.update(mine, nnx.state(nnx.clone(theirs)))
    return grown


# ---------------------------------------------------------------------------------------------
# Saving: a directory like zoo.saving's, with segmentation.json instead of model.json


def save_segmentation(net: SegmentationFCN, directory: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Write weights.safetensors and segmentation.json (how to rebuild, `metadata`) atomically, config last."""
    from safetensors.numpy import save

    from zoo import saving

    source = net.source
    if "kwargs" not in source:
        raise ValueError(f"this net's backbone ({source.get('model')!r}) is not a registry model with known options, "
                         f"so it cannot be rebuilt from a file; pass backbone={{'model': NAME, 'kwargs': {{...}}}} to "
                         f"grow_segmentation, or save the weights with zoo.saving.flat_state")
    weights = save({k: np.ascontiguousarray(v) for k, v in saving.flat_state(net).items()})
    config = {"format": SEGMENTATION_FORMAT, **net.spec(), "metadata": dict(metadata or {}),
              **saving.weights_digest(weights)}
    directory = Path(directory)
    saving.write_files_atomically(directory, {saving.WEIGHTS_FILE: weights})
    saving.write_files_atomically(directory, {SEGMENTATION_CONFIG: json.dumps(config, indent=2).encode()})
    return directory


def is_segmentation_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / SEGMENTATION_CONFIG).is_file()


def read_segmentation_config(directory: str | os.PathLike) -> dict[str, Any]:
    from zoo import saving

    path = Path(directory) / SEGMENTATION_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved segmentation net: {SEGMENTATION_CONFIG} is missing")
    return saving.read_json_record(path, SEGMENTATION_FORMAT, "segmentation net")


def build_from_spec(spec: dict[str, Any], *, dtype=jnp.float32) -> SegmentationFCN:
    """An untrained net of the structure `spec` describes (`SegmentationFCN.spec`), ready for its weights."""
    import zoo
    from convert.fcn import to_fcn

    backbone = spec["backbone"]
    kwargs = dict(backbone.get("kwargs", {}))
    if isinstance(kwargs.get("input_size"), list):
        kwargs["input_size"] = tuple(kwargs["input_size"])
    classifier = zoo.create_model(backbone["model"], dtype=dtype, **kwargs)
    classifier.eval()
    net = grow_segmentation(to_fcn(classifier), spec["variant"], num_classes=int(spec["num_classes"]),
                            keep_class_filters=False, backbone=backbone)
    norm = spec["normalization"]
    net.scale, net.offset = tuple(norm["scale"]), tuple(norm["offset"])
    return net


def load_segmentation(directory: str | os.PathLike, *, dtype=jnp.float32) -> SegmentationFCN:
    """Rebuild a net saved by `save_segmentation`, in eval mode; its config is `net.saved_config`."""
    from zoo import saving

    directory = Path(directory)
    config = read_segmentation_config(directory)
    net = build_from_spec(config, dtype=dtype)
    weights_path = saving.check_weights_file(directory, config)
    saving.load_flat_into(net, saving.read_weights(weights_path), source=str(weights_path))
    net.eval()
    return net


def load_shipped_segmentation(name: str = "mnistnet_fcn8s", tag: str = "digit_scenes", *,
                              weights_dir=None) -> SegmentationFCN:
    """A segmentation net from the one weight store (`zoo.pretrained`), sha256 checked, in eval mode.

    Its metadata (class names, data set, measured mean IU) is `zoo.pretrained.metadata(name, tag)`.
    """
    from zoo import pretrained, saving

    meta, weights = pretrained.verified(name, tag, weights_dir, kind="segmentation")
    net = build_from_spec(meta["segmentation"])
    saving.load_flat_into(net, weights, source=f"{name}-{tag}")
    net.eval()
    return net


DEFAULT_SHIPPED = "mnistnet_fcn8s-digit_scenes"


def load_any_segmentation(reference: str | os.PathLike = DEFAULT_SHIPPED) -> tuple[SegmentationFCN, dict]:
    """(net in eval mode, its metadata) from a saved net's directory or a shipped name ("NAME" or "NAME-TAG").

    The metadata holds at least "class_names" and "dataset" for nets trained by `train.loop.train`.
    """
    from zoo import pretrained

    path = Path(reference)
    if path.is_dir():
        config = read_segmentation_config(path)
        return load_segmentation(path), dict(config.get("metadata", {}))
    name, _, tag = str(reference).partition("-")
    shipped = pretrained.shipped("segmentation")
    if not tag:
        tags = [t for n, t in shipped if n == name]
        if len(tags) != 1:
            names = ", ".join(f"{n}-{t}" for n, t in shipped) or "none"
            raise ValueError(f"{reference!r} is neither a saved segmentation net's directory nor one shipped net "
                             f"(shipped: {names}); train one with `zoo segment-train`")
        tag = tags[0]
    if (name, tag) not in shipped:
        names = ", ".join(f"{n}-{t}" for n, t in shipped) or "none"
        raise ValueError(f"no shipped segmentation net {name}-{tag}; shipped: {names}")
    return load_shipped_segmentation(name, tag), pretrained.metadata(name, tag)
