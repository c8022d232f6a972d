"""Published ImageNet weights into zoo models: Keras Applications and torchvision checkpoints.

    from zoo.importers import import_keras, import_torch, preprocess_input
    imported = import_keras("resnet50", "resnet50_weights_tf_dim_ordering_tf_kernels.h5")
    logits = imported.model(preprocess_input(images, imported.metadata["preprocessing"]))
    imported.save("resnet50-keras")          # zoo.saving.load_model("resnet50-keras") reads it back

Files are read as data only (h5py, safetensors, or torch.load(weights_only=True));
no pickle ever runs. A file that does not fit the architecture raises
`zoo.saving.WeightsMismatchError` naming every missing, unexpected and
mismatched weight. The command line is `zoo import keras|torch ARCH FILE --out DIR`.
"""

from zoo.importers.keras import import_keras, read_keras_weights
from zoo.importers.loading import Imported
from zoo.importers.preprocess import preprocess_input, preprocessing_for
from zoo.importers.torch import import_torch, read_torch_state_dict

__all__ = ["Imported", "import_keras", "import_torch", "preprocess_input", "preprocessing_for",
           "read_keras_weights", "read_torch_state_dict"]
