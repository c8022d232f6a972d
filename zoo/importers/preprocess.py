"""The input preprocessing that imported weights were trained with.

Weights only reproduce their published accuracy on images prepared as their
trainers prepared them. Keras Applications name three modes in
`imagenet_utils.preprocess_input`, and torchvision uses the third:

    "caffe"  RGB -> BGR, then subtract the ImageNet BGR means (103.939, 116.779, 123.68);
             no scaling (VGG16/19, ResNet50/101/152: weights converted from Caffe)
    "tf"     x / 127.5 - 1, into [-1, 1] (Xception, Inception)
    "torch"  x / 255, then (x - mean) / std per RGB channel with ImageNet's mean
             (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) (torchvision models)
    "none"   pixels in [0, 255] as they are (Keras's EfficientNets rescale and
             normalize inside the model; the importer builds that into the zoo model)

images: (..., H, W, 3) RGB pixel values in [0, 255] (uint8 or float), channels last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("caffe", "tf", "torch", "none")
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)

# What each source's weights expect, by zoo model name.
KERAS_PREPROCESSING = {
    "vgg16": "caffe", "vgg19": "caffe",
    "resnet50": "caffe", "resnet101": "caffe", "resnet152": "caffe",
    "xception": "tf",
    **{f"efficientnet_b{i}": "none" for i in range(8)},
}
TORCHVISION_PREPROCESSING = "torch"


def preprocess_input(images, mode: str):
    """Prepare RGB images in [0, 255] for weights trained with `mode` (see the module docstring).

    images: (..., H, W, 3), numpy or jax, uint8 or float -> float32 of the same shape
    (numpy in, numpy out; jax in, jax out).
    """
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; choose one of {MODES}")
    xp = jnp if isinstance(images, jax.Array) else np
    x = xp.asarray(images).astype(xp.float32)
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"expected RGB images shaped (..., H, W, 3) (channels last), got shape {x.shape}")
    if mode == "caffe":
        return x[..., ::-1] - xp.asarray(CAFFE_BGR_MEAN, xp.float32)
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "torch":
        return (x / 255.0 - xp.asarray(IMAGENET_MEAN_RGB, xp.float32)) / xp.asarray(IMAGENET_STD_RGB, xp.float32)
    return x


def preprocessing_for(source: str, model_name: str) -> str:
    """The mode the weights of `model_name` published by `source` ("keras" or "torch") expect."""
    if source == "keras":
        if model_name not in KERAS_PREPROCESSING:
            raise ValueError(f"no Keras preprocessing known for {model_name!r}; "
                             f"known: {', '.join(KERAS_PREPROCESSING)}")
        return KERAS_PREPROCESSING[model_name]
    if source in ("torch", "torchvision"):
        return TORCHVISION_PREPROCESSING
    raise ValueError(f"unknown weights source {source!r}; 'keras' or 'torch'")
