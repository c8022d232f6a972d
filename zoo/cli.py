"""The `zoo` command line.

Each package contributes its own subcommands through a function
`add_commands(subparsers)` in one module listed in `COMMAND_MODULES`; this
file owns only the entry point and `zoo list`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

COMMAND_MODULES = (
    "zoo.summary",        # zoo summary
    "zoo.importers.cli",  # zoo import keras|torch
    "convert.cli",        # zoo convert, zoo predict-dense, zoo segment
    "train.cli",          # zoo data prepare, zoo train
    "train.segment_train",  # zoo segment-train
)


def _format_table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_list(args) -> int:
    from zoo import pretrained
    from zoo.pretrained import available_tags
    from zoo.registry import get_spec, list_models

    specs = [get_spec(n) for n in list_models()]
    if args.family:
        specs = [s for s in specs if s.family == args.family]
        if not specs:
            families = sorted({get_spec(n).family for n in list_models()})
            raise ValueError(f"no model of family {args.family!r}; families: {', '.join(families)}")
    shipped = [pretrained.metadata(name, tag) for name, tag in pretrained.shipped()]
    if args.json:
        print(json.dumps({"models": [{**s.to_dict(), "pretrained": available_tags(s.name)} for s in specs],
                          "shipped": [{"name": m["model"], "tag": m["tag"], "kind": pretrained.kind_of(m),
                                       "dataset": m["dataset"], "result": pretrained.result_line(m)}
                                      for m in shipped]}, indent=2))
        return 0
    rows = [[s.name, f"{s.num_params:,}", "x".join(map(str, s.input_shape)),
             "x".join(map(str, s.min_size)), s.head_kind, str(s.total_stride),
             ", ".join(available_tags(s.name)) or "-", f"{s.paper.split(',')[0]} {s.year}", s.introduced]
            for s in specs]
    header = ["model", "params", "input", "min", "head", "stride", "weights", "paper", "introduced"]
    print(_format_table(rows, header, right={1, 5}))
    if not args.family:
        print("\nshipped weights (zoo/weights, sha256-checked; create_model(NAME, pretrained=TAG) or "
              "zoo segment --model NAME-TAG):")
        print(_format_table([[f"{m['model']}-{m['tag']}", pretrained.kind_of(m), m["dataset"],
                              pretrained.result_line(m)] for m in shipped],
                            ["weights", "kind", "dataset", "measured result"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoo", description="Landmark CNNs in Flax NNX, and classifiers turned into FCNs.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also FCNZOO_DEBUG=1), for bug reports")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("list", help="list the registered models and their metadata")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--family", help="only this family (e.g. resnet)")
    p.set_defaults(func=cmd_list)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that package has no commands yet
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `zoo` command: 0 done, 2 bad input (one line: what was wrong, what to do), 1 a failed run,
    130 interrupted. `--debug` (or FCNZOO_DEBUG=1) shows the full traceback instead, for bug reports."""
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.debug or os.environ.get("FCNZOO_DEBUG"):
        return args.func(args) or 0
    try:
        return args.func(args) or 0
    except KeyboardInterrupt as e:
        print(f"zoo {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        # Bad input is reported in one line; anything else is a bug and keeps its traceback.
        print(f"zoo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable, occupied or full output paths, unreadable inputs
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"zoo {args.command}: error: {e.strerror or e}{where}; check the path and its permissions or free space",
              file=sys.stderr)
        return 2


def command() -> None:
    """The `zoo` console script: freed memory kept for reuse (zoo/allocator.py), then `main`."""
    from zoo import allocator

    allocator.retain_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    command()
