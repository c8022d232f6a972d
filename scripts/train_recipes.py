"""Run the training recipes of train/recipes.py; ship their weights into zoo/weights/.

    python scripts/train_recipes.py list
    python scripts/train_recipes.py run mnistnet_mnist --seed 0 [--ship] [--out runs/]
    python scripts/train_recipes.py ship runs/mnistnet_mnist-seed0     # a finished run, after the fact
    python scripts/train_recipes.py time-to-99 [--target 0.99] [--allocator retain|glibc]
    python scripts/train_recipes.py summarize runs/mnistnet_mnist-seed*/result.json

`run` trains with `train.loop.train` (no validation hold-out, no best-epoch picking: the final
weights, EMA where the recipe has it, are evaluated on the test split), writes
<out>/<recipe>-seed<N>/{metrics.jsonl, curves.png, model/, result.json}, and with --ship exports
model/ to zoo/weights/<model>-<tag>.{safetensors,json} through `zoo.pretrained.export`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), shared"


def cmd_list(args) -> int:
    from train.recipes import RECIPES

    for name, fn in RECIPES.items():
        print(f"{name:26s} {fn.__doc__.strip().splitlines()[0]}")
    return 0


def cmd_run(args) -> int:
    from train import data, loop, tasks
    from train.recipes import SHIPPED_AS, get_recipe, run_dir

    config = get_recipe(args.recipe, seed=args.seed)
    if args.ship and args.recipe not in SHIPPED_AS:  # say so now, not after hours of training
        raise SystemExit(f"recipe {args.recipe!r} ships no weights; shipping recipes: {', '.join(SHIPPED_AS)}")
    if args.epochs:
        config = dataclasses.replace(config, epochs=args.epochs)
    out_dir = Path(run_dir(args.recipe, args.seed, args.out))
    out_dir.mkdir(parents=True, exist_ok=True)
    data.prepare(config.dataset, config.data_dir, quiet=True)
    started = time.perf_counter()
    result = loop.train(config)  # out_dir=None: the returned model is the final (EMA) weights
    model, history, test_accuracy, steps = result.model, result.history, result.test_accuracy, result.steps
    seconds = time.perf_counter() - started
    steps_per_epoch = steps // config.epochs
    tasks.save_classifier(model, out_dir / "model", config, test_accuracy, steps, steps_per_epoch)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    loop.plot_curves(history, out_dir / "curves.png", title=f"{config.model} on {config.dataset}")
    summary = {
        "recipe": args.recipe, "seed": args.seed, "model": config.model, "dataset": config.dataset,
        "test_accuracy": test_accuracy, "epochs": config.epochs, "steps": steps,
        "wall_seconds": round(seconds, 1), "machine": machine(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loop": "train.loop.train", "config": config.to_dict(), "history": history,
    }
    (out_dir / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("recipe", "seed", "test_accuracy", "wall_seconds")}))
    if args.ship:
        ship(out_dir)
    return 0


def ship(run_dir: Path) -> None:
    """Export a finished run's model (run_dir/model) as the shipped weights of its recipe."""
    from train.recipes import SHIPPED_AS
    from zoo import pretrained

    summary = json.loads((run_dir / "result.json").read_text())
    recipe, seed = summary["recipe"], summary["seed"]
    if recipe not in SHIPPED_AS:
        raise SystemExit(f"recipe {recipe!r} ships no weights; shipping recipes: {', '.join(SHIPPED_AS)}")
    _, tag = SHIPPED_AS[recipe]
    paths = pretrained.export(run_dir / "model", tag, extra={
        "recipe": recipe, "seed": seed, "wall_seconds": summary["wall_seconds"],
        "machine": summary["machine"], "date": summary["date"],
        "command": f"python scripts/train_recipes.py run {recipe} --seed {seed} --ship"})
    print("shipped", *paths)


def cmd_ship(args) -> int:
    ship(Path(args.run_dir))
    return 0


def cmd_time_to_99(args) -> int:
    """Wall time of a fresh process that trains the fast recipe and reaches `target` test accuracy."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from zoo import allocator; allocator.retain_freed_memory()\n"  # as `zoo train` runs
        "from train.loop import train\n"
        "from train.recipes import fast_mnist\n"
        f"accuracy = train(fast_mnist(seed={args.seed})).test_accuracy\n"
        "import json; print('RESULT', json.dumps({'test_accuracy': accuracy, "
        "'in_process_seconds': time.perf_counter() - t0}))\n"
    )
    from train import data

    data.prepare("mnist", quiet=True)  # outside the timing: preparation happens once per machine
    started = time.perf_counter()
    env = dict(os.environ, FCNZOO_ALLOCATOR=args.allocator)  # zoo/allocator.py
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env,
                          check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return done.returncode
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT"))
    result = json.loads(line.split(" ", 1)[1])
    result.update(wall_seconds_with_process_start=round(wall, 1), target=args.target,
                  reached=result["test_accuracy"] >= args.target, machine=machine(),
                  date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    print(json.dumps(result))
    return 0 if result["reached"] else 1


def cmd_summarize(args) -> int:
    runs = [json.loads(Path(p).read_text()) for p in args.results]
    accs = [100 * r["test_accuracy"] for r in runs]
    times = [r["wall_seconds"] for r in runs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"{runs[0]['recipe']}: {len(runs)} seed(s) {[r['seed'] for r in runs]}: test accuracy "
          f"{statistics.mean(accs):.3f} +- {std:.3f} % (each: {', '.join(f'{a:.2f}' for a in accs)}); "
          f"wall {statistics.mean(times):.0f} s per run")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list").set_defaults(func=cmd_list)
    p = sub.add_parser("run", help="train one recipe")
    p.add_argument("recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (smoke runs)")
    p.add_argument("--out", default="runs")
    p.add_argument("--ship", action="store_true", help="export the weights to zoo/weights/")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("ship", help="export a finished run (RUN_DIR from `run`) as shipped weights")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_ship)
    p = sub.add_parser("time-to-99", help="time a fresh process training to 99%% MNIST test accuracy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--allocator", choices=("retain", "glibc"), default="retain",
                   help="retain: freed memory kept for reuse, as `zoo train` runs (default); glibc: as it comes")
    p.set_defaults(func=cmd_time_to_99)
    p = sub.add_parser("summarize", help="mean +- std over seeds of result.json files")
    p.add_argument("results", nargs="+")
    p.set_defaults(func=cmd_summarize)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from zoo import allocator

    allocator.retain_freed_memory()  # as the `zoo` command runs (zoo/allocator.py); FCNZOO_ALLOCATOR=glibc: without
    sys.exit(main())
