"""oneDNN convolutions (zoo/onednn.py) against zoo's XLA paths (zoo/cpu_conv.py), one layer at a time.

    .venv/bin/python scripts/bench_onednn.py [--cases stem,r1x1a,...] [--repeats 5]

For each case: forward, input gradient and kernel gradient, jitted separately, once through
`cpu_conv.conv_general_dilated` with oneDNN turned off (zoo's matrix-product / shifted-sum /
XLA paths) and once through `onednn.conv`. Calls alternate (median of `repeats`), so background
load hits both alike. Prints milliseconds and the ratio current / oneDNN (> 1: oneDNN faster),
and the implementation oneDNN chose.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax

from side_by_side import alternating_medians
from zoo import cpu_conv, onednn

NHWC = ("NHWC", "HWIO", "NHWC")
# name: (N, H, W, Cin, k, Cout, stride, padding, groups)
CASES = {
    "stem7x7/2": (8, 224, 224, 3, 7, 64, 2, "SAME", 1),        # ResNet stem
    "vgg3x3_3": (8, 224, 224, 3, 3, 64, 1, "SAME", 1),         # VGG first layer (few input channels)
    "r1x1_64_256": (8, 56, 56, 64, 1, 256, 1, "VALID", 1),
    "r1x1_256_64": (8, 56, 56, 256, 1, 64, 1, "VALID", 1),
    "r1x1/2_512_1024": (8, 28, 28, 512, 1, 1024, 2, "VALID", 1),  # ResNet shortcut
    "r3x3_64": (8, 56, 56, 64, 3, 64, 1, "SAME", 1),
    "r3x3/2_128": (8, 56, 56, 128, 3, 128, 2, "SAME", 1),
    "r3x3_256_14": (8, 14, 14, 256, 3, 256, 1, "SAME", 1),
    "vgg3x3_64_224": (8, 224, 224, 64, 3, 64, 1, "SAME", 1),
    "vgg3x3_128_112": (8, 112, 112, 128, 3, 128, 1, "SAME", 1),
    "vgg3x3_256_56": (8, 56, 56, 256, 3, 256, 1, "SAME", 1),
    "vgg3x3_512_28": (8, 28, 28, 512, 3, 512, 1, "SAME", 1),
    "vgg3x3_512_14": (8, 14, 14, 512, 3, 512, 1, "SAME", 1),
    "mnist3x3_1": (128, 28, 28, 1, 3, 16, 1, "SAME", 1),
    "mnist3x3_16_32": (128, 14, 14, 16, 3, 32, 1, "SAME", 1),
    "mnist3x3_32_64": (128, 7, 7, 32, 3, 64, 1, "SAME", 1),
    "fc6_7x7_512_4096": (1, 14, 14, 512, 7, 4096, 1, "VALID", 1),  # FCN's fc6 on a 448-pixel image
    "dw3x3_32_112": (8, 112, 112, 32, 3, 32, 1, "SAME", 32),   # EfficientNet-B0 depthwise
    "dw5x5/2_144_56": (8, 56, 56, 144, 5, 144, 2, "SAME", 144),
    "dw3x3_728_19": (8, 19, 19, 728, 3, 728, 1, "SAME", 728),  # Xception middle flow
}


def functions(conv, x, w, strides, padding, groups):
    y = conv(x, w)
    g = jax.random.normal(jax.random.key(9), y.shape)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    dw = jax.jit(lambda x, w: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return [lambda f=f: jax.block_until_ready(f(x, w)) for f in (fwd, dx, dw)]


def bench(name, repeats):
    n, h, wd, cin, k, cout, s, padding, groups = CASES[name]
    x = jax.random.normal(jax.random.key(0), (n, h, wd, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout)) * 0.1
    strides = (s, s)
    pads = tuple(map(tuple, lax.padtype_to_pads((h, wd), (k, k), strides, padding)))
    current = lambda x, w: cpu_conv.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC,  # noqa: E731
                                                         feature_group_count=groups)
    ours = lambda x, w: onednn.conv(x, w, strides, pads, groups)  # noqa: E731
    impls = onednn.implementations(x.shape, w.shape, strides, pads, groups)
    with cpu_conv.without_onednn():
        a = functions(current, x, w, strides, pads, groups)
    b = functions(ours, x, w, strides, pads, groups)
    fns = {}
    for part, fa, fb in zip(("fwd", "dx", "dw"), a, b):
        fns[part + "_cur"], fns[part + "_dnn"] = fa, fb
    with cpu_conv.without_onednn():  # the current side compiles (on its warm-up call) without oneDNN
        for part in ("fwd", "dx", "dw"):
            fns[part + "_cur"]()
    times = alternating_medians(fns, repeats)
    cells = "  ".join(f"{part} {1e3 * times[part + '_cur']:8.2f} {1e3 * times[part + '_dnn']:8.2f} "
                      f"{times[part + '_cur'] / times[part + '_dnn']:5.2f}x" for part in ("fwd", "dx", "dw"))
    print(f"{name:<18} {cells}   {impls}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layout", type=int, default=onednn.LAYOUT, help="onednn.LAYOUT (0: NHWC, 1: blocked)")
    args = parser.parse_args(argv)
    onednn.LAYOUT = args.layout
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    print(f"oneDNN {onednn.version()}; {uptime()}")
    print(f"{'case':<18} " + "  ".join(f"{p:<3} {'cur ms':>8} {'dnn ms':>8} {'ratio':>6}" for p in ("fwd", "dx", "dw")))
    for name in args.cases.split(","):
        bench(name, args.repeats)
    print(f"(median of {args.repeats}; ratio = current / oneDNN; {uptime()})")
    return 0


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
