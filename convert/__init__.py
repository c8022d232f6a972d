"""Any trained classifier into a fully convolutional network, and dense prediction on any image size.

    import convert
    fcn = convert.to_fcn(classifier)              # same weights, no retraining; Linen: to_fcn(module, variables)
    fcn = convert.from_keras("model.keras")       # a Keras file, read as data
    fcn(images)                                   # (N, H, W, C) -> (N, h', w', K)
    fcn.geometry                                  # stride, receptive field, offset of each cell's window
    predictor = convert.DensePredictor(fcn)       # one compilation per shape bucket
    result = predictor.predict(image)             # result.scores (h', w', K), result.window(i, j)
    net = convert.grow_segmentation(fcn, "fcn8s", num_classes=21)   # FCN-32s/16s/8s from any converted classifier
    convert.DensePredictor(net).predict(image).labels()             # (H, W) class per pixel
    fast = convert.fold_batchnorm(fcn)            # BatchNorms folded into their convs, for inference
    convert.export_fcn(fcn).save("fcn.stablehlo") # any image size, served with jax alone
"""

from convert.checkpoint import convert_checkpoint, load_fcn, save_fcn
from convert.export import ExportedFCN, export_fcn, load_exported
from convert.fcn import FCN, convert_head, to_fcn
from convert.fold import FoldedBatchNorm, find_conv_batchnorm_pairs, fold_batchnorm
from convert.geometry import Geometry, shape_geometry, walk_geometry
from convert.keras_file import from_keras, keras_classifier
from convert.predict import DensePredictor, DenseScores, enable_compilation_cache, load_image, save_heatmap
from convert.segment import (SegmentationFCN, grow_from, grow_segmentation, is_segmentation_dir, load_segmentation,
                             load_shipped_segmentation, save_segmentation)
from convert.trace import ConversionError

__all__ = [
    "FCN", "ConversionError", "DensePredictor", "DenseScores", "Geometry", "convert_checkpoint", "convert_head",
    "enable_compilation_cache", "load_fcn", "load_image", "save_fcn", "save_heatmap", "shape_geometry",
    "to_fcn", "walk_geometry", "SegmentationFCN", "grow_from", "grow_segmentation", "is_segmentation_dir",
    "load_segmentation", "load_shipped_segmentation", "save_segmentation",
    "ExportedFCN", "FoldedBatchNorm", "export_fcn", "find_conv_batchnorm_pairs", "fold_batchnorm", "load_exported",
    "from_keras", "keras_classifier",
]
