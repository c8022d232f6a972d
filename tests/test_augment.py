"""train.augment against exact expectations: identity, mirror images, per-example randomness."""

import jax
import numpy as np

from train import augment

IMAGES = np.asarray(jax.random.uniform(jax.random.key(0), (64, 12, 10, 1)) * 255).round()
KEYS = jax.random.split(jax.random.key(1), len(IMAGES))


def warp(images, **settings):
    options = dict(max_shift=0.0, max_rotate_degrees=0.0, max_scale=0.0)
    options.update(settings)
    return np.asarray(augment.random_affine(KEYS, images, **options))


def test_no_augmentation_is_the_identity():
    np.testing.assert_array_equal(warp(IMAGES), IMAGES)


def test_flip_alone_mirrors_about_half_of_the_images_exactly():
    out = warp(IMAGES, horizontal_flip=True)
    same = [np.allclose(o, x, atol=1e-3) for o, x in zip(out, IMAGES)]
    mirrored = [np.allclose(o, x[:, ::-1], atol=1e-3) for o, x in zip(out, IMAGES)]
    assert all(s != m for s, m in zip(same, mirrored))  # each image is one or the other
    assert 16 <= sum(mirrored) <= 48


def test_flip_mirrors_the_input_and_keeps_the_other_draws():
    # Mirroring first, then the same shift/zoom: a flipped example equals the unflipped
    # warp of the mirrored image, an unflipped one the plain warp.
    settings = dict(max_shift=2.0, max_scale=0.1)
    flipped = warp(IMAGES, horizontal_flip=True, **settings)
    plain = warp(IMAGES, **settings)
    of_mirror = warp(IMAGES[:, :, ::-1], **settings)
    mirrored = np.array([not np.allclose(f, p, atol=1e-3) for f, p in zip(flipped, plain)])
    assert 16 <= mirrored.sum() <= 48
    np.testing.assert_allclose(flipped[~mirrored], plain[~mirrored], atol=1e-3)
    np.testing.assert_allclose(flipped[mirrored], of_mirror[mirrored], atol=1e-3)


DIGIT_SIZED = np.asarray(jax.random.uniform(jax.random.key(2), (64, 28, 28, 1)) * 255).round()


def test_random_erase_changes_one_rectangle_of_the_papers_size():
    out = np.asarray(augment.random_erase(KEYS, DIGIT_SIZED, probability=1.0))
    assert out.min() >= 0 and out.max() <= 255
    for before, after in zip(DIGIT_SIZED, out):
        changed = np.abs(after - before)[..., 0] > 1e-6
        rows, cols = np.nonzero(changed)
        # Every changed pixel lies in the bounding box of the changes, and fills it: one rectangle.
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()
        # Zhong et al.'s defaults: 2-40% of the area (whole pixels, so a little slack).
        assert 0.01 <= box.size / changed.size <= 0.5


def test_random_erase_probability():
    np.testing.assert_array_equal(np.asarray(augment.random_erase(KEYS, DIGIT_SIZED, probability=0.0)), DIGIT_SIZED)
    out = np.asarray(augment.random_erase(KEYS, DIGIT_SIZED, probability=0.5))
    erased = [not np.array_equal(o, x) for o, x in zip(out, DIGIT_SIZED)]
    assert 16 <= sum(erased) <= 48
