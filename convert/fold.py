"""BatchNorm folded into the convolution before it, for inference.

Ioffe & Szegedy 2015, "Batch Normalization", https://arxiv.org/abs/1502.03167 (sec. 3.1: at
inference BatchNorm is a fixed per-channel affine map), and Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
https://arxiv.org/abs/1712.05877 (sec. 3.2: folding it into the weights). In eval mode

    bn(conv(x)) = a * (conv(x) + b - mean) + beta,   a = gamma / sqrt(var + eps)  (per output channel)

which is one convolution with kernel[..., c] * a[c] and bias (b[c] - mean[c]) * a[c] + beta[c]:
one pass over the activations fewer per BatchNorm.

Which BatchNorm follows which convolution is read from the forward pass, not from names: a copy
of the model is traced abstractly with every `nnx.Conv` tagging its output and every
`nnx.BatchNorm` its input, and a BatchNorm is folded when its input is a convolution's output
that nothing else reads (a convolution whose output also feeds a skip connection, a module
called twice, a BatchNorm that normalizes with batch statistics in eval mode: left as they are).
Any module works: a zoo classifier, an FCN from `convert.to_fcn`, a user's `nnx.Sequential`.
"""

from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jax_core

from zoo.layers import Activation

# An identity that marks a value in the traced program: (kind, index) of the module it leaves
# ("conv") or enters ("bn"). Only ever traced (make_jaxpr), never lowered or differentiated.
_TAG = jax_core.Primitive("fcnzoo_fold_tag")
_TAG.def_impl(lambda x, **_: x)
_TAG.def_abstract_eval(lambda aval, **_: aval)


class FoldedBatchNorm(Activation):
    """The identity left where a BatchNorm was folded into the convolution before it.

    An `Activation("identity")`, so that the converter, the geometry walk and `zoo.summarize`
    read it as the per-position no-op it is. x: any shape -> x.
    """

    def __init__(self):
        super().__init__("identity")


def _foldable_conv(module) -> bool:
    return type(module) is nnx.Conv


def _foldable_bn(module) -> bool:
    return type(module) is nnx.BatchNorm


def _tag_pairs(jaxpr) -> tuple[list[tuple[int, int]], Counter]:
    """(conv index, bn index) where a tagged BatchNorm input is a tagged conv output read by it alone,
    and how often each (kind, index) was tagged, over `jaxpr` and every jaxpr inside it."""
    pairs, calls = [], Counter()

    def walk(jaxpr):
        uses, produced_by, candidates = Counter(), {}, []
        for eqn in jaxpr.eqns:
            uses.update(v for v in eqn.invars if isinstance(v, jax_core.Var))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                walk(sub)
            if eqn.primitive is not _TAG:
                continue
            kind, index = eqn.params["kind"], eqn.params["index"]
            calls[kind, index] += 1
            if kind == "conv":
                produced_by[eqn.outvars[0]] = index
            elif eqn.invars[0] in produced_by:
                candidates.append((produced_by[eqn.invars[0]], index, eqn.invars[0]))
        uses.update(v for v in jaxpr.outvars if isinstance(v, jax_core.Var))
        pairs.extend((conv, bn) for conv, bn, v in candidates if uses[v] == 1)

    walk(jaxpr)
    return pairs, calls


def find_conv_batchnorm_pairs(model: nnx.Module, input_shape=None) -> list[tuple[str, str]]:
    """The (conv path, BatchNorm path) pairs `fold_batchnorm` folds (in eval mode), as dotted paths.

    Args:
        model: any nnx.Module taking a batch of images (N, H, W, C).
        input_shape: (H, W, C) to trace the forward pass at (default: `model.input_shape`).
    """
    return [(_dotted(c), _dotted(b)) for c, b in _pairs(model, input_shape)]


def _dotted(path) -> str:
    return ".".join(str(k) for k in path)


def _pairs(model: nnx.Module, input_shape) -> list[tuple[tuple, tuple]]:
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
        if input_shape is None:
            raise ValueError(f"pass input_shape=(H, W, C) to trace {type(model).__name__} at")
    input_shape = tuple(int(v) for v in input_shape)
    graphdef, state = nnx.split(model)
    paths: list[tuple] = []
    eval_mode: dict[int, bool] = {}

    def tagging(cls, kind: str):
        def call(self, x, *args, **kwargs):
            index = self._fold_tag_index
            if kind == "conv":
                return _TAG.bind(cls.__call__(self, x, *args, **kwargs), kind=kind, index=index)
            # Folding needs the running statistics; a mask or an explicit batch-statistics call is not that.
            running = kwargs.get("use_running_average", args[0] if args else None)
            eval_mode[index] = (running if running is not None else self.use_running_average) is True \
                and kwargs.get("mask") is None
            return cls.__call__(self, _TAG.bind(x, kind=kind, index=index), *args, **kwargs)

        return type(f"FoldTagging{cls.__name__}", (cls,), {"__call__": call})

    def run(state, x):
        copy = nnx.merge(graphdef, state)
        copy.eval()
        for path, node in nnx.iter_graph(copy):
            kind = "conv" if _foldable_conv(node) else "bn" if _foldable_bn(node) else None
            if kind is not None:
                node.__class__ = tagging(type(node), kind)
                node._fold_tag_index = len(paths)
                paths.append(tuple(path))
        return copy(x)

    closed = jax.make_jaxpr(run)(state, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
    pairs, calls = _tag_pairs(closed.jaxpr)
    return [(paths[c], paths[b]) for c, b in pairs
            if calls["conv", c] == 1 and calls["bn", b] == 1 and eval_mode.get(b, False)]


def _fold_into(conv: nnx.Conv, bn: nnx.BatchNorm) -> None:
    """Fold eval-mode `bn` into `conv` (in place), in float64 then cast to the conv's parameter dtype."""
    kernel = np.asarray(conv.kernel.get_value())
    channels = kernel.shape[-1]
    if bn.num_features != channels:
        raise ValueError(f"BatchNorm over {bn.num_features} features follows a conv with {channels} outputs")
    gamma = np.ones(channels) if bn.scale is None else np.asarray(bn.scale.get_value(), np.float64)
    beta = np.zeros(channels) if bn.bias is None else np.asarray(bn.bias.get_value(), np.float64)
    mean = np.asarray(bn.mean.get_value(), np.float64)
    var = np.asarray(bn.var.get_value(), np.float64)
    bias = np.zeros(channels) if conv.bias is None else np.asarray(conv.bias.get_value(), np.float64)
    factor = gamma / np.sqrt(var + bn.epsilon)
    conv.kernel.set_value(jnp.asarray(kernel.astype(np.float64) * factor, kernel.dtype))
    new_bias = jnp.asarray((bias - mean) * factor + beta, kernel.dtype)
    if conv.bias is None:
        conv.bias = nnx.Param(new_bias)
        conv.use_bias = True
    else:
        conv.bias.set_value(new_bias)


def fold_batchnorm(model: nnx.Module, input_shape=None) -> nnx.Module:
    """A copy of `model` for inference, each BatchNorm that directly follows a conv folded into it.

    Args:
        model: any nnx.Module taking a batch of images (N, H, W, C): a zoo classifier, an FCN
            (`convert.to_fcn`), a feature extractor, an `nnx.Sequential`.
        input_shape: (H, W, C) to trace the forward pass at (default: `model.input_shape`).
    Returns:
        a new model in eval mode whose outputs equal `model`'s in eval mode up to float rounding;
        the folded BatchNorms are `FoldedBatchNorm` (identities), their convs carry the scale in
        the kernel and the shift in a bias. `model` is not modified. The copy is for inference
        only (there is no BatchNorm left to train) and its weights are not those of the model's
        checkpoint format: save the model, fold after loading.
    """
    folded = nnx.clone(model)
    folded.eval()
    modules = {tuple(path): node for path, node in nnx.iter_graph(folded)}
    for conv_path, bn_path in _pairs(folded, input_shape):
        _fold_into(modules[conv_path], modules[bn_path])
        parent, key = modules[bn_path[:-1]], bn_path[-1]
        if isinstance(key, int):
            parent[key] = FoldedBatchNorm()
        else:
            setattr(parent, key, FoldedBatchNorm())
    return folded
