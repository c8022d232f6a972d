"""On-device augmentation of digit-sized images: random shift, rotation and zoom in one affine warp.

Small affine distortions are the classic MNIST augmentation (Simard, Steinkraus and Platt,
"Best Practices for Convolutional Neural Networks Applied to Visual Document Analysis",
ICDAR 2003, https://doi.org/10.1109/ICDAR.2003.1227801). One bilinear resampling per image
(`jax.scipy.ndimage.map_coordinates`), inside the jitted step, so no host round trip.

Each example's parameters come from its own key, so an example is augmented the same way
whatever the batch is split into (gradient accumulation, devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_affine(keys, images, *, max_shift: float, max_rotate_degrees: float, max_scale: float,
                  horizontal_flip: bool = False):
    """Warp each image by a random rotation, zoom and shift about its centre (and mirror it).

    Args:
        keys: (N,) PRNG keys, one per image.
        images: (N, H, W, C) float, background 0 (augment before normalizing).
        max_shift: shift drawn uniformly in [-max_shift, max_shift] pixels, per axis.
        max_rotate_degrees: rotation drawn uniformly in [-max, max] degrees.
        max_scale: zoom factor drawn uniformly in [1 - max_scale, 1 + max_scale].
        horizontal_flip: also mirror left-right with probability 1/2 (clothes, not digits).
    Returns:
        (N, H, W, C), same dtype; pixels from outside the image are 0.
    """
    if max_shift == 0 and max_rotate_degrees == 0 and max_scale == 0 and not horizontal_flip:
        return images
    return jax.vmap(lambda k, x: _warp_one(k, x, max_shift, max_rotate_degrees, max_scale, horizontal_flip))(
        keys, images)


def _warp_one(key, image, max_shift, max_rotate_degrees, max_scale, horizontal_flip):
    h, w, c = image.shape
    k_angle, k_scale, k_shift = jax.random.split(key, 3)
    angle = jnp.deg2rad(max_rotate_degrees) * jax.random.uniform(k_angle, (), minval=-1.0, maxval=1.0)
    scale = 1.0 + max_scale * jax.random.uniform(k_scale, (), minval=-1.0, maxval=1.0)
    shift = max_shift * jax.random.uniform(k_shift, (2,), minval=-1.0, maxval=1.0)
    # Output pixel p samples the input at centre + R(-angle) (p - centre - shift) / scale:
    # the inverse of "rotate by angle, zoom by scale, then shift".
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2])
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    dy = rows - centre[0] - shift[0]
    dx = cols - centre[1] - shift[1]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    src_y = centre[0] + (cos * dy - sin * dx) / scale
    src_x = centre[1] + (sin * dy + cos * dx) / scale
    if horizontal_flip:  # its own key (folded in), so the other draws match a run without flips
        src_x = jnp.where(jax.random.bernoulli(jax.random.fold_in(key, 1)), (w - 1) - src_x, src_x)
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(  # noqa: E731
        channel, [src_y, src_x], order=1, mode="constant", cval=0.0)
    warped = jax.vmap(sample, in_axes=2, out_axes=2)(image.astype(jnp.float32))
    return warped.astype(image.dtype)
