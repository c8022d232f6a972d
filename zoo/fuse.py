"""Convolution epilogues run in oneDNN's output pass, for inference.

After a convolution, a network adds a bias (or a folded BatchNorm's shift), maybe a residual, and
applies an activation. XLA:CPU fuses those into one elementwise pass, but not into oneDNN's
convolution (a custom call): one more read and write of every activation map. oneDNN runs them
in the convolution's own output pass ("post-ops"), which is what PyTorch's CPU inference does too.

`conv_epilogues(fn)` traces `fn` to a jaxpr and evaluates it again with each chain

    y = conv(x, w)  [+ b]  [+ r]  [act]      b: (O,) or (1, 1, 1, O); r: y's shape;
                                             act: relu, swish (x * sigmoid(x)), sigmoid

of a oneDNN forward convolution (`zoo.onednn`, routed there by `zoo.cpu_conv`) replaced by one
`zoo.onednn.forward_post` call, where each intermediate value is read by the next step alone and
oneDNN builds an optimized primitive for it. A zero padding of x's height and width that only the
convolution reads (`jnp.pad` before a VALID convolution: Keras's ZeroPadding2D, EfficientNet's
strided convolutions) becomes the convolution's own padding. The chain is read from the program, not from module
names, so it works for any model (a zoo classifier, a converted FCN, a user's network); with
`convert.fold_batchnorm` first, a Conv-BatchNorm-ReLU becomes one call. Everything else is bound
as it was, so results equal `fn`'s to float rounding. Inference only: the fused call has no
gradient rule. Without oneDNN (or on other backends) there is nothing to fuse and `fn` runs as is.
"""

from __future__ import annotations

import functools
from collections import Counter

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from zoo import onednn

_FORWARD = onednn._TARGETS["fwd"]


def conv_epilogues(fn):
    """fn with its convolution epilogues fused (module docstring); use under `jax.jit`.

    fn: any function of arrays / pytrees of arrays. Returns a function of the same arguments and
    outputs.
    """

    @functools.wraps(fn)
    def fused(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return fused


def fusions(fn, *args) -> Counter:
    """How many chains `conv_epilogues(fn)` fuses for these arguments, by their post-ops
    ("bias", "bias+sum+relu", ...): the convolutions it reaches and what they absorbed."""
    closed = jax.make_jaxpr(fn)(*args)
    found = Counter()

    def walk(jaxpr):
        for chain in _chains(jaxpr).values():
            found[chain.describe()] += 1
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("pjit", "jit"):
                walk(eqn.params["jaxpr"].jaxpr)

    walk(closed.jaxpr)
    return found


class _Chain:
    """One convolution and the epilogue eqns after it: `steps` are (eqn index, part, operand), part
    "bias", "sum" or an activation's name, in order; the last step's output is the chain's result
    (the convolution's own without steps). `pad_index`: a zero padding before it, absorbed into
    its padding (x and pads are then the padding's input and the sum of both)."""

    def __init__(self, conv_index, x, w, strides, pads, groups):
        self.conv_index, self.x, self.w = conv_index, x, w
        self.strides, self.pads, self.groups = strides, pads, groups
        self.steps: list[tuple[int, str, object]] = []
        self.pad_index = None

    @property
    def end(self) -> int:
        return self.steps[-1][0] if self.steps else self.conv_index

    @property
    def absorbed(self) -> list[int]:
        """The eqns the fused call replaces, but the last."""
        return [i for i in (self.pad_index, self.conv_index, *(s[0] for s in self.steps)) if i is not None][:-1]

    def operand(self, part):
        return next((v for _, p, v in self.steps if p == part), None)

    @property
    def activation(self):
        return next((p for _, p, _ in self.steps if p in onednn.ACTIVATIONS), None)

    def describe(self) -> str:
        return "+".join((["pad"] if self.pad_index is not None else []) + [p for _, p, _ in self.steps])


def _attribute(params, name):
    value = dict(params["attributes"])[name]
    return getattr(value, "val", value)


def _onednn_forward(eqn):
    """(x, w, strides, pads, groups) of a oneDNN forward convolution eqn (the custom VJP around it,
    or the bare custom call), else None."""
    call = eqn
    if eqn.primitive.name == "custom_vjp_call":
        body = eqn.params["call_jaxpr"].jaxpr
        if len(body.eqns) != 1 or list(body.eqns[0].invars) != list(body.invars):
            return None
        call = body.eqns[0]
    if call.primitive.name != "ffi_call" or call.params.get("target_name") != _FORWARD:
        return None
    if int(_attribute(call.params, "layout")) != 0:
        return None
    lo, hi = _attribute(call.params, "pad_lo"), _attribute(call.params, "pad_hi")
    strides = tuple(int(s) for s in _attribute(call.params, "strides"))
    pads = ((int(lo[0]), int(hi[0])), (int(lo[1]), int(hi[1])))
    return eqn.invars[0], eqn.invars[1], strides, pads, int(_attribute(call.params, "groups"))


def _body(eqn):
    """The eqns an elementwise call stands for (custom_jvp relu, jit silu, ...), nested calls
    flattened, with the body's input; None for a primitive that is not a call."""
    inner = eqn.params.get("call_jaxpr", eqn.params.get("jaxpr"))
    if inner is None:
        return None
    jaxpr = getattr(inner, "jaxpr", inner)
    if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        return None
    if len(jaxpr.eqns) == 1 and _body(jaxpr.eqns[0]) is not None and jaxpr.eqns[0].invars == jaxpr.invars \
            and jaxpr.eqns[0].outvars == jaxpr.outvars:
        return _body(jaxpr.eqns[0])
    return jaxpr.invars[0], jaxpr.eqns, jaxpr.outvars[0]


def _zero_pad(eqn):
    """(x, ((top, bottom), (left, right))) of an eqn that pads an NHWC map x with zeros along its
    height and width only (`lax.pad`, or `jnp.pad`'s jit around it: Keras's ZeroPadding2D,
    EfficientNet's padding before a strided convolution), else None."""
    if eqn.primitive.name == "pad":
        x, config = eqn.invars[0], eqn.params["padding_config"]
        if not _is_zero(eqn.invars[1]):
            return None
    elif eqn.primitive.name in ("pjit", "jit"):
        inner = eqn.params["jaxpr"].jaxpr
        pads = [e for e in inner.eqns if e.primitive.name == "pad"]
        if len(pads) != 1 or len(inner.eqns) > 2 or pads[0].outvars != inner.outvars \
                or pads[0].invars[0] is not inner.invars[0]:
            return None
        value = pads[0].invars[1]  # a zero here, or a zero passed in and converted to the dtype
        if not _is_zero(value):
            cast = [e for e in inner.eqns if e.primitive.name == "convert_element_type" and e.outvars[0] is value]
            passed = [v for v, inner_v in zip(eqn.invars, inner.invars) if cast and inner_v is cast[0].invars[0]]
            if not passed or not _is_zero(passed[0]):
                return None
        x, config = eqn.invars[0], pads[0].params["padding_config"]
    else:
        return None
    if len(config) != 4 or config[0] != (0, 0, 0) or config[3] != (0, 0, 0) \
            or any(lo < 0 or hi < 0 or interior for lo, hi, interior in config[1:3]):
        return None
    return x, tuple((int(lo), int(hi)) for lo, hi, _ in config[1:3])


def _is_zero(v) -> bool:
    return isinstance(v, jax_core.Literal) and not v.aval.shape and v.val == 0


def _activation(eqn, x):
    """The name (onednn.ACTIVATIONS) of the activation `eqn` applies to x alone, else None."""
    if len(eqn.outvars) != 1:
        return None
    found = _body(eqn)
    if found is None:
        source, eqns, result = x, [eqn], eqn.outvars[0]
    else:
        source, eqns, result = found
        if eqn.invars != [x]:
            return None
    names = [e.primitive.name for e in eqns]
    if names == ["max"] and set(map(id, eqns[0].invars)) >= {id(source)} and any(map(_is_zero, eqns[0].invars)):
        return "relu" if eqns[0].outvars[0] is result else None
    if names == ["logistic"] and eqns[0].invars == [source] and eqns[0].outvars[0] is result:
        return "sigmoid"
    if names == ["logistic", "mul"] and eqns[0].invars == [source] and eqns[1].outvars[0] is result:
        if set(map(id, eqns[1].invars)) == {id(source), id(eqns[0].outvars[0])}:
            return "swish"
    return None


def _per_channel(v, channels) -> bool:
    shape = v.aval.shape
    return v.aval.dtype == jnp.float32 and shape[-1:] == (channels,) and all(d == 1 for d in shape[:-1]) \
        and len(shape) in (1, 4)


def _chains(jaxpr) -> dict[int, _Chain]:
    """The fusable chains of one jaxpr (not of the jaxprs inside it), by their last eqn's index."""
    uses, consumer, producer = Counter(), {}, {}
    for index, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jax_core.Var):
                uses[v] += 1
                consumer[v] = index
        producer.update((v, index) for v in eqn.outvars)
    uses.update(v for v in jaxpr.outvars if isinstance(v, jax_core.Var))

    chains, claimed = {}, set()
    for index, eqn in enumerate(jaxpr.eqns):
        conv = _onednn_forward(eqn)
        if conv is None:
            continue
        chain = _Chain(index, *conv)
        padded = _zero_pad(jaxpr.eqns[producer[chain.x]]) if chain.x in producer and uses[chain.x] == 1 else None
        if padded is not None:
            chain.pad_index = producer[chain.x]
            chain.x = padded[0]
            chain.pads = tuple((lo + a, hi + b) for (lo, hi), (a, b) in zip(chain.pads, padded[1]))
        value = eqn.outvars[0]
        channels = value.aval.shape[-1]
        parts = set()
        # Two chains can reach one eqn (a block's last convolution and its projection shortcut, both
        # into the residual sum): the first takes it, the second stops before it.
        while uses[value] == 1 and value in consumer and consumer[value] not in claimed \
                and not parts & set(onednn.ACTIVATIONS):
            step = jaxpr.eqns[consumer[value]]
            others = [v for v in step.invars if v is not value]
            part = operand = None
            if step.primitive.name == "add" and len(step.invars) == 2 and len(others) == 1 \
                    and isinstance(others[0], jax_core.Var):
                operand = others[0]
                if not parts and _per_channel(operand, channels):
                    part = "bias"
                elif "sum" not in parts and operand.aval.shape == value.aval.shape \
                        and operand.aval.dtype == jnp.float32:
                    part = "sum"
            else:
                part = _activation(step, value)
            if part is None:
                break
            chain.steps.append((consumer[value], part, operand))
            parts.add(part)
            value = step.outvars[0]
        # Where oneDNN has no optimized primitive for the whole chain, a shorter one may still fuse.
        while chain.steps or chain.pad_index is not None:
            if onednn.supports_post(chain.x.aval, chain.w.aval, chain.strides, chain.pads, chain.groups,
                                    activation=chain.activation, residual=chain.operand("sum") is not None):
                chains[chain.end] = chain
                claimed.update(i for i, _, _ in chain.steps)
                break
            if not chain.steps:
                break
            chain.steps.pop()
    return chains


def _evaluate(jaxpr, consts, args):
    """jaxpr's outputs for args (flat), its fusable chains bound as `onednn.forward_post` calls."""
    env = {}

    def read(v):
        return v.val if isinstance(v, jax_core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    chains = _chains(jaxpr)
    absorbed = {i for chain in chains.values() for i in chain.absorbed}
    for index, eqn in enumerate(jaxpr.eqns):
        if index in absorbed:
            continue
        if index in chains:
            chain = chains[index]
            channels = chain.w.aval.shape[-1]
            bias, residual = chain.operand("bias"), chain.operand("sum")
            bias = jnp.zeros((channels,), jnp.float32) if bias is None else read(bias).reshape(channels)
            residual = None if residual is None else read(residual)
            env[eqn.outvars[0]] = onednn.forward_post(read(chain.x), read(chain.w), bias, residual, chain.strides,
                                                      chain.pads, chain.groups, chain.activation)
            continue
        invals = [read(v) for v in eqn.invars]
        if eqn.primitive.name in ("pjit", "jit"):
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, invals)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
