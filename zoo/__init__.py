"""fcnzoo's model zoo: landmark CNNs in Flax NNX behind one registry.

    import zoo
    zoo.list_models()
    model = zoo.create_model("resnet50", num_classes=10)
    zoo.summarize(model, input_shape=(224, 224, 3), batch_size=32)
"""

from zoo.classifier import Classifier, Head, check_images, dense_head, output_shape
from zoo.registry import (ModelSpec, count_params, create_model, eval_shape, get_spec, list_models, load_pretrained,
                          register)
from zoo.stages import FeatureExtractor, Stage, backbone_steps, find_stages, stage_maps

# Each family file registers its variants when imported.
from zoo import lenet, alexnet, vgg, googlenet, resnet, xception, efficientnet, mnistnet  # noqa: E402,F401
from zoo.summary import summarize  # noqa: E402

__all__ = [
    "Classifier", "FeatureExtractor", "Head", "ModelSpec", "Stage", "backbone_steps", "check_images",
    "count_params", "create_model", "dense_head", "eval_shape", "find_stages", "get_spec", "list_models",
    "load_pretrained", "output_shape", "register", "stage_maps", "summarize",
]
