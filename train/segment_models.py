"""FCN-32s, FCN-16s and FCN-8s grown from a classifier that `convert` made fully convolutional.

Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation",
https://arxiv.org/abs/1411.4038 (sec. 4.1-4.2, fig. 3):

- FCN-32s: the converted classifier scores every cell of its coarsest map (stride S, the total
  stride), then one transposed convolution, initialized to bilinear interpolation and learned,
  upsamples the scores by S to one score vector per pixel.
- FCN-16s: the coarse scores are upsampled by 2 and added to the scores of a 1x1 convolution on
  the finer map one stage earlier (stride S/2; zero-initialized, so training starts from FCN-32s's
  answer); the sum is upsampled by S/2.
- FCN-8s: one more such skip from the map two stages earlier (stride S/4).

Our backbone is MnistNet (`zoo.mnistnet`, total stride 4, not VGG's 32), so the three nets end at
stride 4, 2 and 1: "32s/16s/8s" name the architecture (no skip, one skip, two skips), and
`SegmentationFCN.output_strides` gives the actual strides.

Net surgery (the paper's sec. 3.1 and 4.1): the classifier's Flatten->Dense head, which `convert`
turned into a 7x7 convolution over the 7x7 feature map, becomes the score layer. Its 10 trained
class filters are kept, and an 11th, background, filter is added with zero weights. The converted
convolution is VALID (one output per whole 28x28 window); here it is padded by 3 cells on each side
so the score map has one cell per feature cell, centred on it, which is what the decoders'
alignment needs. Inside the image the scores are exactly the converted classifier's (tested).

    x: (N, H, W, 1) floats in [0, 1] (uint8 / 255, white digits on black), any H, W
    SegmentationFCN(x): (N, H, W, 11) logits, classes 0..9 and 10 = background
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.layers import AvgPool, MaxPool

VARIANTS = {"fcn32s": 0, "fcn16s": 1, "fcn8s": 2}  # name -> number of skip connections


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
    x: (N, h, w, C) -> (N, h*f, w*f, C)
    """

    def __init__(self, channels: int, factor: int):
        if factor < 2 or factor % 2:
            raise ValueError(f"TransposedConv upsamples by an even factor >= 2, got {factor}")
        self.factor = factor
        self.kernel = nnx.Param(jnp.asarray(bilinear_kernel(factor, channels)))

    def __call__(self, x):
        f = self.factor
        # A transposed conv is a conv over the input dilated by f (f - 1 zeros between cells) with the
        # spatially flipped kernel; padding k - 1 - f/2 on each side gives exactly h*f outputs.
        pad = 2 * f - 1 - f // 2
        kernel = self.kernel[...][::-1, ::-1].astype(x.dtype)
        return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=[(pad, pad), (pad, pad)],
                                            lhs_dilation=(f, f), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def backbone_layers(backbone) -> list:
    """The backbone as a flat list of layers (it must expose them as `.layers`)."""
    layers = getattr(backbone, "layers", None)
    if layers is None:
        raise ValueError(f"the segmentation decoders need a backbone that lists its layers in `.layers` "
                         f"(like zoo.mnistnet's features or nnx.Sequential); got {type(backbone).__name__}")
    return list(layers)


def _downsamples(layer) -> bool:
    if isinstance(layer, (MaxPool, AvgPool)):
        return max(layer.strides) > 1
    if isinstance(layer, nnx.Conv):
        strides = layer.strides if isinstance(layer.strides, (tuple, list)) else (layer.strides,)
        return max(strides) > 1
    return False


class SegmentationFCN(nnx.Module):
    """Backbone + score layer + FCN decoder with 0, 1 or 2 skips (FCN-32s / 16s / 8s).

    Args:
        backbone: the converted classifier's backbone (its layers in `.layers`, downsampling by
            pooling or strided convs between stages).
        score: the score convolution, (N, h, w, c) -> (N, h, w, num_classes), SAME-aligned.
        skips: 0, 1 or 2 skip connections.
        mean, std: the classifier's input normalization, x_net = (x - mean) / std.
        num_classes: 11 (digits + background).
    x: (N, H, W, 1) in [0, 1], any H, W -> (N, H, W, num_classes) logits.
    """

    def __init__(self, backbone, score: nnx.Conv, *, skips: int, mean: float, std: float, num_classes: int,
                 source: str = "mnistnet"):
        self.backbone = backbone
        self.score = score
        self.skips = int(skips)
        self.mean, self.std = float(mean), float(std)
        self.num_classes = int(num_classes)
        self.source = source
        stage_strides, stage_channels = self._stages()
        if self.skips > len(stage_strides) - 1:
            raise ValueError(f"this backbone has {len(stage_strides) - 1} finer stage(s) to skip from; "
                             f"{self.skips} skips asked")
        self.total_stride = stage_strides[-1]
        # Finer stages, coarse to fine, that feed skips: (stride, channels).
        finer = list(zip(stage_strides[:-1], stage_channels[:-1]))[::-1][:self.skips]
        self.skip_strides = tuple(s for s, _ in finer)
        self.skip_scores = nnx.List([
            nnx.Conv(c, num_classes, kernel_size=(1, 1), kernel_init=nnx.initializers.zeros,
                     bias_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
            for _, c in finer])
        strides = [self.total_stride, *self.skip_strides]
        self.upsample = nnx.List([TransposedConv(num_classes, a // b) for a, b in itertools.pairwise(strides)])
        self.final_factor = strides[-1]
        self.final_upsample = TransposedConv(num_classes, strides[-1]) if strides[-1] > 1 else None

    # -- structure -------------------------------------------------------------------------------
    def _stages(self) -> tuple[list[int], list[int]]:
        """Stride and channels at the end of each backbone stage (a stage ends before a downsampling)."""
        x = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
        graphdef, state = nnx.split(self.backbone)

        def run(state, x):
            maps = []
            for layer in backbone_layers(nnx.merge(graphdef, state)):
                if _downsamples(layer):
                    maps.append(x)
                x = layer(x)
            return [*maps, x]

        shapes = jax.eval_shape(run, state, x)
        return [64 // s.shape[1] for s in shapes], [s.shape[3] for s in shapes]

    @property
    def variant(self) -> str:
        return {v: k for k, v in VARIANTS.items()}[self.skips]

    @property
    def output_strides(self) -> dict[str, int]:
        """Strides of the coarse score map, of each skip, and the final upsampling factor."""
        return {"score": self.total_stride, **{f"skip{i + 1}": s for i, s in enumerate(self.skip_strides)},
                "final_upsampling": self.final_factor}

    # -- forward ---------------------------------------------------------------------------------
    def features(self, x):
        """x: (N, H, W, 1) in [0, 1] with H, W multiples of the total stride -> (coarse map, skip maps fine-last)."""
        y = (x - self.mean) / self.std
        stage_maps = []
        for layer in backbone_layers(self.backbone):
            if _downsamples(layer):
                stage_maps.append(y)
            y = layer(y)
        return y, stage_maps[::-1][:self.skips]

    def __call__(self, x):
        """x: (N, H, W, 1) in [0, 1], any H, W -> (N, H, W, num_classes) logits."""
        height, width = x.shape[1], x.shape[2]
        s = self.total_stride
        padded_h, padded_w = math.ceil(height / s) * s, math.ceil(width / s) * s
        if (padded_h, padded_w) != (height, width):
            # Zero is the black background in [0, 1] pixels: the scene just goes on a little further.
            x = jnp.pad(x, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)))
        coarse, skip_maps = self.features(x)
        y = self.score(coarse)
        for up, skip_score, skip_map in zip(self.upsample, self.skip_scores, skip_maps):
            y = up(y) + skip_score(skip_map).astype(y.dtype)
        if self.final_upsample is not None:
            y = self.final_upsample(y)
        return y[:, :height, :width]

    def coarse_scores(self, x):
        """x: (N, H, W, 1), H and W multiples of the total stride -> (N, H/S, W/S, num_classes)."""
        return self.score(self.features(x)[0])


def centered_score_conv(conv: nnx.Conv, num_classes: int | None = None) -> nnx.Conv:
    """A copy of a converted head conv, padded so each output cell is centred on its feature cell.

    The converted conv is VALID: output cell k reads feature cells k..k+K-1. Padded by (K-1)/2 on
    each side, output cell k reads cells k-(K-1)/2..k+(K-1)/2, so cell k of this map equals cell
    k-(K-1)/2 of the VALID one wherever the window lies inside the map. With `num_classes` larger
    than the conv's outputs, the extra filters (background) start at zero.
    """
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"the score conv needs an odd kernel to be centred, got {kh}x{kw}")
    kernel = np.asarray(conv.kernel[...])
    bias = np.asarray(conv.bias[...]) if conv.use_bias else np.zeros(kernel.shape[-1], np.float32)
    out = num_classes or kernel.shape[-1]
    if out < kernel.shape[-1]:
        raise ValueError(f"num_classes={out} is fewer than the converted head's {kernel.shape[-1]} classes")
    grown = nnx.Conv(kernel.shape[2], out, kernel_size=(kh, kw),
                     padding=(((kh - 1) // 2, (kh - 1) // 2), ((kw - 1) // 2, (kw - 1) // 2)),
                     rngs=nnx.Rngs(0))
    new_kernel = np.zeros((kh, kw, kernel.shape[2], out), np.float32)
    new_kernel[..., :kernel.shape[-1]] = kernel
    new_bias = np.zeros(out, np.float32)
    new_bias[:kernel.shape[-1]] = bias
    grown.kernel.set_value(jnp.asarray(new_kernel))
    grown.bias.set_value(jnp.asarray(new_bias))
    return grown


def head_conv(fcn) -> nnx.Conv:
    """The single conv of a converted Flatten->[Dropout]->Dense head (MnistNet's)."""
    convs = [layer for layer in fcn.head if isinstance(layer, nnx.Conv)]
    if len(convs) != 1:
        raise ValueError(f"the segmentation nets grow from a classifier whose head is one Dense layer "
                         f"(converted to one conv); {fcn.source}'s converted head has {len(convs)} convs")
    return convs[0]


def grow_from_classifier(fcn, variant: str, *, mean: float, std: float, num_classes: int = 11) -> SegmentationFCN:
    """FCN-32s/16s/8s from a converted classifier (`convert.to_fcn`): backbone and class filters kept.

    Args:
        fcn: a `convert.FCN`; its backbone and head conv are copied (the fcn is not modified).
        mean, std: the classifier's input normalization.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    score = centered_score_conv(head_conv(fcn), num_classes)
    return SegmentationFCN(nnx.clone(fcn.backbone), score, skips=VARIANTS[variant], mean=mean, std=std,
                           num_classes=num_classes, source=fcn.source)


def grow_from(previous: SegmentationFCN, variant: str) -> SegmentationFCN:
    """The next net of the paper's staged training: FCN-16s from a trained FCN-32s, FCN-8s from 16s.

    Backbone, score layer and the skips both nets have are copied; a new skip starts at zero and
    new upsamplings at bilinear, so the grown net's first answer is the previous net's, up to how
    two bilinear steps differ from one (sec. 4.2: "initialized with the parameters of the last,
    coarser net").
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    grown = SegmentationFCN(nnx.clone(previous.backbone), nnx.clone(previous.score), skips=VARIANTS[variant],
                            mean=previous.mean, std=previous.std, num_classes=previous.num_classes,
                            source=previous.source)
    for mine, theirs in zip(grown.skip_scores, previous.skip_scores):
        nnx.update(mine, nnx.state(nnx.clone(theirs)))
    for mine, theirs in zip(grown.upsample, previous.upsample):
        if mine.factor == theirs.factor:
            nnx.update(mine, nnx.state(nnx.clone(theirs)))
    return grown


class ConvertedClassifierScores(nnx.Module):
    """The converted classifier alone, as a per-pixel 10-class score map (the baseline).

    The centred copy of the converted head scores every stride-S cell (the classifier's answer for
    the window centred there), and fixed bilinear interpolation spreads the scores to pixels. No
    parameter is trained. `train.segment.classifier_labels` turns the scores into 11 classes.
    x: (N, H, W, 1) in [0, 1] -> (N, H, W, 10) logits; `coarse_scores` gives the stride-S map.
    """

    def __init__(self, fcn, *, mean: float, std: float):
        self.net = SegmentationFCN(nnx.clone(fcn.backbone), centered_score_conv(head_conv(fcn)), skips=0,
                                   mean=mean, std=std, num_classes=head_conv(fcn).out_features, source=fcn.source)
        self.net.eval()

    @property
    def total_stride(self) -> int:
        return self.net.total_stride

    def __call__(self, x):
        return jax.lax.stop_gradient(self.net(x))

    def coarse_scores(self, x):
        return self.net.coarse_scores(x)
