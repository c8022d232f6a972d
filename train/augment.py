"""On-device augmentation of digit-sized images: random shift, rotation and zoom in one affine warp.

Small affine distortions are the classic MNIST augmentation (Simard, Steinkraus and Platt,
"Best Practices for Convolutional Neural Networks Applied to Visual Document Analysis",
ICDAR 2003, https://doi.org/10.1109/ICDAR.2003.1227801). One bilinear resampling per image
(`jax.scipy.ndimage.map_coordinates`), inside the jitted step, so no host round trip.

Random erasing (Zhong et al., "Random Erasing Data Augmentation", AAAI 2020,
https://arxiv.org/abs/1708.04896) then fills one random rectangle per chosen image with noise:
a regularizer for models that fit their augmented data better than the test set (Fashion-MNIST).

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


def requested(config) -> bool:
    """Whether a `train.config.TrainConfig` asks for any augmentation (else no keys are drawn)."""
    return bool(config.augment_shift or config.augment_rotate or config.augment_scale or config.augment_flip
                or config.augment_erase)


def from_config(keys, images, config):
    """Apply the augmentation a `train.config.TrainConfig` asks for (warp, then erasing).

    keys: (N,) PRNG keys; images: (N, H, W, C) float in [0, 255]. Returns the same shape.
    """
    images = random_affine(keys, images, max_shift=config.augment_shift, max_rotate_degrees=config.augment_rotate,
                           max_scale=config.augment_scale, horizontal_flip=config.augment_flip)
    if config.augment_erase:
        images = random_erase(keys, images, probability=config.augment_erase)
    return images


# The paper's defaults: erased area 2-40% of the image, aspect ratio 0.3-3.3.
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)


def random_erase(keys, images, *, probability: float, max_value: float = 255.0):
    """With `probability`, replace one random rectangle of each image by uniform noise in [0, max_value].

    Args:
        keys: (N,) PRNG keys, one per image (the draws fold in their own constant, so they are
            independent of `random_affine`'s draws from the same keys).
        images: (N, H, W, C) float.
    Returns:
        (N, H, W, C), same dtype: each image unchanged, or changed inside one axis-aligned rectangle.
    """
    def erase_one(key, image):
        h, w = image.shape[:2]
        k_apply, k_area, k_aspect, k_y, k_x, k_noise = jax.random.split(jax.random.fold_in(key, 2), 6)
        area = h * w * jax.random.uniform(k_area, (), minval=ERASE_AREA[0], maxval=ERASE_AREA[1])
        log_aspect = jax.random.uniform(k_aspect, (), minval=jnp.log(ERASE_ASPECT[0]), maxval=jnp.log(ERASE_ASPECT[1]))
        box_h = jnp.clip(jnp.round(jnp.sqrt(area * jnp.exp(log_aspect))), 1, h).astype(jnp.int32)
        box_w = jnp.clip(jnp.round(jnp.sqrt(area / jnp.exp(log_aspect))), 1, w).astype(jnp.int32)
        top = jax.random.randint(k_y, (), 0, h - box_h + 1)
        left = jax.random.randint(k_x, (), 0, w - box_w + 1)
        rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
        inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w)
        inside = inside & jax.random.bernoulli(k_apply, probability)
        noise = jax.random.uniform(k_noise, image.shape, minval=0.0, maxval=max_value)
        return jnp.where(inside, noise, image.astype(jnp.float32)).astype(image.dtype)

    return jax.vmap(erase_one)(keys, images)


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
