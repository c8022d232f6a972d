"""`zoo import keras ARCH FILE --out DIR` and `zoo import torch ARCH FILE --out DIR`."""

from __future__ import annotations


def cmd_import(args) -> int:
    from zoo import saving
    from zoo.importers import import_keras, import_torch

    saving.check_output_dir(args.out, owns={saving.CONFIG_FILE, saving.WEIGHTS_FILE}, what="saved model",
                            force=args.force)
    options = {"num_classes": args.num_classes}
    if args.no_top:
        options["include_top"] = False
    if args.source == "keras":
        if args.input_size is not None:
            options["input_size"] = args.input_size
        imported = import_keras(args.arch, args.file, **options)
    else:
        if args.input_size is not None:
            raise ValueError("--input-size applies to Keras files; torchvision models are built at 224x224")
        imported = import_torch(args.arch, args.file, **options)
    directory = imported.save(args.out)
    meta = imported.metadata
    print(f"imported {args.file} ({meta['source']}) into {imported.model_name}; saved to {directory}")
    print(f"  create_model options: {imported.kwargs}")
    print(f"  preprocess images with zoo.importers.preprocess_input(images, {meta['preprocessing']!r})")
    if meta.get("new_head"):
        print(f"  new, untrained layers: {', '.join(meta['new_head'])}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("import", help="import Keras Applications or torchvision weights into a zoo model")
    p.add_argument("source", choices=("keras", "torch"), help="who published the weights")
    p.add_argument("arch", help="zoo model name (resnet50, vgg16, xception, efficientnet_b0, ...); "
                                "Keras names (ResNet50) work for keras")
    p.add_argument("file", help="keras: .weights.h5, .keras or legacy .h5; torch: .safetensors or .pth")
    p.add_argument("--out", required=True, help="directory to save the zoo model in (new or empty)")
    p.add_argument("--force", action="store_true", help="replace the saved model already in --out")
    p.add_argument("--num-classes", type=int, default=None,
                   help="build a new classifier with this many classes (every other weight imported)")
    p.add_argument("--no-top", action="store_true", help="import the feature extractor only")
    p.add_argument("--input-size", type=int, default=None,
                   help="keras: square input size (VGG's Flatten head; read from the file by default)")
    p.set_defaults(func=cmd_import)
