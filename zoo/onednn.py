"""oneDNN convolutions on CPU, as XLA custom calls (zoo/native/onednn_conv.cc), forward and both gradients.

`conv(x, w, strides, pads, groups)` is a float32 NHWC/HWIO convolution whose forward pass, input
gradient and kernel gradient are oneDNN primitives (the library PyTorch runs on CPU);
`zoo.cpu_conv.conv_general_dilated` sends it the convolutions where it is measured faster than
XLA's (see there). For inference, `forward_post` adds a bias, a residual and an activation in the
convolution's output pass (`zoo.fuse` finds where), and `max_pool` is oneDNN's max pooling
(`zoo.cpu_conv.max_pool` sends it large ones). The library is built by scripts/build-onednn (from scripts/setup-env) into
the virtual environment, next to the oneDNN wheel (onednn-cpu-gomp). Where it is missing or does
not load, `available()` is False, one warning says why, and zoo keeps its other paths;
FCNZOO_ONEDNN=0 turns it off (for A/B runs). Only ever used with the CPU backend, and only for
static shapes (under jax.export's symbolic sizes zoo keeps its XLA paths: an exported module
could not carry these custom calls). The library also holds `materialize`, a custom call that
costs nothing and that XLA cannot fuse across (`zoo.cpu_conv.dot_general`).

oneDNN is its OpenMP (GOMP) build, 3.2 (the newer PyPI `onednn` wheels are the SYCL/TBB build,
with 2 GB of Intel runtimes); each call uses every core (OMP_NUM_THREADS), one call at a time.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LIBRARY = Path(sys.prefix) / "lib" / "fcnzoo-onednn" / "libfcnzoo_onednn.so"
_TARGETS = {"fwd": "fcnzoo_onednn_conv_fwd", "bwd_data": "fcnzoo_onednn_conv_bwd_data",
            "bwd_weights": "fcnzoo_onednn_conv_bwd_weights"}
_POST_TARGET = "fcnzoo_onednn_conv_fwd_post"
_POOL_TARGET = "fcnzoo_onednn_max_pool"
_KINDS = {"fwd": 0, "bwd_data": 1, "bwd_weights": 2}
# The activations `forward_post` runs in the convolution's output pass (oneDNN eltwise post-ops),
# by the code the native handler reads.
ACTIVATIONS = {"relu": 1, "swish": 2, "sigmoid": 3}
_BIAS, _SUM = 1, 2
# 0: activations stay NHWC (oneDNN's nhwc kernels), kernels go to oneDNN's blocked format;
# 1: every tensor in oneDNN's chosen (blocked) format, reordered at the boundaries.
LAYOUT = 0

_state: dict = {}


def _load():
    """The loaded ctypes library with its targets registered, or None (and one warning)."""
    if os.environ.get("FCNZOO_ONEDNN", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(LIBRARY))
        for name in (*_TARGETS.values(), _POST_TARGET, _POOL_TARGET, "fcnzoo_materialize"):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
        lib.fcnzoo_onednn_prepare.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p,
                                              ctypes.c_int64]
        lib.fcnzoo_onednn_prepare.restype = ctypes.c_int
        lib.fcnzoo_onednn_prepare_pool.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p, ctypes.c_int64]
        lib.fcnzoo_onednn_prepare_pool.restype = ctypes.c_int
        return lib
    except Exception as err:  # noqa: BLE001  (any failure to load or register: fall back, never crash)
        # One line (no source line under it): where it was asked from does not matter.
        warnings.warn_explicit(f"oneDNN convolutions unavailable ({err}); zoo uses its XLA paths (build them "
                               f"with scripts/setup-env, or set FCNZOO_ONEDNN=0 to silence this)",
                               UserWarning, filename="fcnzoo", lineno=0)
        return None


def available() -> bool:
    """Whether the oneDNN library is loaded (loading it on first call)."""
    if "lib" not in _state:
        _state["lib"] = _load()
    return _state["lib"] is not None


def version() -> str | None:
    """The oneDNN version the library runs with ('3.2.0'), or None when it is unavailable."""
    if not available():
        return None
    v = _state["lib"].fcnzoo_onednn_version()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def _shape(x_shape, w_shape, strides, pads, groups, layout, post=0):
    n, h, w, c = x_shape
    kh, kw, cin, cout = w_shape
    (plh, phh), (plw, phw) = pads
    oh, ow = (h + plh + phh - kh) // strides[0] + 1, (w + plw + phw - kw) // strides[1] + 1
    return (n, h, w, c, kh, kw, cin, cout, oh, ow, *strides, plh, plw, phh, phw, groups, layout, post)


def implementations(x_shape, w_shape, strides, pads, groups=1, layout=None):
    """oneDNN's implementation names for (forward, input gradient, kernel gradient) of this
    convolution, building the primitives; None where oneDNN does not take it (or is unavailable)."""
    if not available():
        return None
    return _implementations(tuple(x_shape), tuple(w_shape), tuple(strides), tuple(map(tuple, pads)), groups,
                            LAYOUT if layout is None else layout)


@functools.lru_cache(maxsize=None)
def _implementations(x_shape, w_shape, strides, pads, groups, layout, post=0, kinds=tuple(_KINDS.values())):
    fields = (ctypes.c_int64 * 19)(*_shape(x_shape, w_shape, strides, pads, groups, layout, post))
    names = []
    for kind in kinds:
        buf = ctypes.create_string_buffer(256)
        if _state["lib"].fcnzoo_onednn_prepare(kind, fields, buf, len(buf)) != 0:
            return None
        names.append(buf.value.decode())
    return tuple(names)


# Inputs above this many elements (8 GiB of float32) keep zoo's XLA paths.
MAX_ELEMENTS = 1 << 31


def supports(x, w, strides, pads, groups=1) -> bool:
    """Whether `conv` takes this convolution: static float32 shapes, non-negative padding, and
    primitives oneDNN builds with an optimized (not reference) implementation."""
    if not available() or x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 4 or w.ndim != 4:
        return False
    sizes = (*x.shape, *w.shape, *sum(pads, ()))
    if not all(isinstance(d, (int, np.integer)) for d in sizes) or any(p < 0 for p in sum(pads, ())):
        return False
    if x.shape[3] != w.shape[2] * groups or w.shape[3] % groups:
        return False
    if x.size > MAX_ELEMENTS:
        # Building primitives for such maps takes oneDNN seconds to minutes, and they come from
        # abstract probes (zoo.find_stages traces inputs 40,000 pixels wide), never from real batches.
        return False
    impls = implementations(tuple(x.shape), tuple(w.shape), tuple(strides), tuple(map(tuple, pads)), groups, LAYOUT)
    return impls is not None and not any(name.startswith("ref") for name in impls)


def supports_post(x, w, strides, pads, groups=1, *, activation=None, residual=False) -> bool:
    """Whether `forward_post` takes this convolution (as `supports`, with these post-ops)."""
    if LAYOUT != 0 or not supports(x, w, strides, pads, groups):
        return False
    post = _BIAS | (_SUM if residual else 0) | (ACTIVATIONS[activation] << 2 if activation else 0)
    impls = _implementations(tuple(x.shape), tuple(w.shape), tuple(strides), tuple(map(tuple, pads)), groups,
                             LAYOUT, post, (_KINDS["fwd"],))
    return impls is not None and not impls[0].startswith("ref")


def forward_post(x, w, bias, residual, strides, pads, groups=1, activation=None):
    """activation(conv(x, w) + bias [+ residual]) in one oneDNN call (its post-ops), for inference
    (no gradient rule). bias (O,); residual None or the result's shape, whose buffer the result
    takes (XLA copies it first if it is still needed); activation None or one of ACTIVATIONS.
    Check `supports_post` first."""
    (plh, phh), (plw, phw) = pads
    operands = (x, w, bias) if residual is None else (x, w, bias, residual)
    return jax.ffi.ffi_call(_POST_TARGET, jax.ShapeDtypeStruct(_out_shape(x.shape, w.shape, strides, pads),
                                                                       jnp.float32),
                            input_output_aliases={} if residual is None else {3: 0}, vmap_method="sequential")(
        *operands, strides=np.array(strides, np.int64), pad_lo=np.array([plh, plw], np.int64),
        pad_hi=np.array([phh, phw], np.int64), groups=np.int64(groups), layout=np.int64(LAYOUT),
        activation=np.int64(ACTIVATIONS[activation] if activation else 0))


def _pool_fields(x_shape, window, strides, pads):
    n, h, w, c = x_shape
    (plh, phh), (plw, phw) = pads
    oh, ow = (h + plh + phh - window[0]) // strides[0] + 1, (w + plw + phw - window[1]) // strides[1] + 1
    return (n, h, w, c, oh, ow, *window, *strides, plh, plw, phh, phw)


@functools.lru_cache(maxsize=None)
def _pool_implementation(fields):
    buf = ctypes.create_string_buffer(256)
    if _state["lib"].fcnzoo_onednn_prepare_pool((ctypes.c_int64 * 14)(*fields), buf, len(buf)) != 0:
        return None
    return buf.value.decode()


def supports_max_pool(x, window, strides, pads) -> bool:
    """Whether `max_pool` takes this pooling: static float32 NHWC, non-negative padding smaller
    than the window, an optimized oneDNN implementation."""
    if not available() or x.dtype != jnp.float32 or x.ndim != 4:
        return False
    sizes = (*x.shape, *sum(pads, ()))
    if not all(isinstance(d, (int, np.integer)) for d in sizes) or x.size > MAX_ELEMENTS:
        return False
    if any(p < 0 or p >= k for (lo, hi), k in zip(pads, window) for p in (lo, hi)):
        return False
    fields = _pool_fields(tuple(x.shape), tuple(window), tuple(strides), tuple(map(tuple, pads)))
    if min(fields[4:6]) < 1:
        return False
    impl = _pool_implementation(fields)
    return impl is not None and not impl.startswith("ref")


def max_pool(x, window, strides, pads):
    """Max pooling x (N, H, W, C) -> (N, H', W', C) with oneDNN, windows (kh, kw), pads ((top, bottom),
    (left, right)) where the padding never wins (as XLA's reduce_window from -inf). No gradient
    rule (`zoo.cpu_conv.max_pool` has one); check `supports_max_pool` first."""
    fields = _pool_fields(x.shape, window, strides, pads)
    (plh, phh), (plw, phw) = pads
    out_shape = (fields[0], fields[4], fields[5], fields[3])
    return jax.ffi.ffi_call(_POOL_TARGET, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")(
        x, window=np.array(window, np.int64), strides=np.array(strides, np.int64),
        pad_lo=np.array([plh, plw], np.int64), pad_hi=np.array([phh, phw], np.int64))


def _call(kind, out_shape, a, b, strides, pads, groups):
    (plh, phh), (plw, phw) = pads
    return jax.ffi.ffi_call(_TARGETS[kind], jax.ShapeDtypeStruct(out_shape, jnp.float32),
                            vmap_method="sequential")(
        a, b, strides=np.array(strides, np.int64), pad_lo=np.array([plh, plw], np.int64),
        pad_hi=np.array([phh, phw], np.int64), groups=np.int64(groups), layout=np.int64(LAYOUT))


def _out_shape(x_shape, w_shape, strides, pads):
    s = _shape(x_shape, w_shape, strides, pads, 1, LAYOUT)
    return (x_shape[0], s[8], s[9], w_shape[3])


def forward(x, w, strides, pads, groups=1):
    """The convolution alone (no gradient rule; `conv` has one)."""
    return _call("fwd", _out_shape(x.shape, w.shape, strides, pads), x, w, strides, pads, groups)


def input_grad(dy, w, x_shape, strides, pads, groups=1):
    """The gradient with respect to the input (N, H, W, C) of x_shape, given the output's dy."""
    return _call("bwd_data", tuple(x_shape), dy, w, strides, pads, groups)


def kernel_grad(x, dy, w_shape, strides, pads, groups=1):
    """The gradient with respect to the kernel (kh, kw, C / groups, O) of w_shape, given dy."""
    return _call("bwd_weights", tuple(w_shape), x, dy, strides, pads, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv(x, w, strides, pads, groups=1):
    """NHWC x (N, H, W, C) * HWIO w (kh, kw, C / groups, O) -> (N, Ho, Wo, O) with oneDNN, forward
    and both gradients; strides (sh, sw), pads ((top, bottom), (left, right)) as ints. Check
    `supports` first."""
    return forward(x, w, strides, pads, groups)


def _conv_fwd(x, w, strides, pads, groups):
    return forward(x, w, strides, pads, groups), (x, w)


def _conv_bwd(strides, pads, groups, residuals, dy):
    x, w = residuals
    return input_grad(dy, w, x.shape, strides, pads, groups), kernel_grad(x, dy, w.shape, strides, pads, groups)


conv.defvjp(_conv_fwd, _conv_bwd)


def materialize(x):
    """x itself, written to memory: XLA cannot fuse what computes x into what uses it (the custom
    call's result is its operand's buffer, so it costs nothing). Check `available` first."""
    return jax.ffi.ffi_call("fcnzoo_materialize", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)
