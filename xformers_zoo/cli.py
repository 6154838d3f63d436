"""The ``xformers-zoo`` command: models | data | train | recipes | eval | table | bench."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from xformers_zoo.overrides import ConfigError, parse_assignments
from xformers_zoo.registry import UnknownNameError

# Commands (their leading words) whose implementation lives in its own module with a
# ``main(argv) -> int`` (``bench NAME`` runs the benchmark registered under NAME in
# xformers_zoo.bench).
DELEGATED = {
    ("data", "show"): "xformers_zoo.data.show",
    ("data", "stats"): "xformers_zoo.data.stats",
    ("sweep",): "xformers_zoo.train.sweep",
}
OVERRIDES_HELP = ("Overrides section.field=value (e.g. data.train_size=1000 train.lr=0.01) may "
                  "stand anywhere after the subcommand.")


def _quiet_libraries() -> None:
    """TFDS and absl log every build step at WARNING; keep the terminal for our own output."""
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:
        pass
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()


def cmd_models(args) -> int:
    """Lists variants with capabilities and parameter counts per task."""
    import xformers_zoo as xz
    from xformers_zoo.task_specs import TASKS

    tasks = [args.task] if args.task else TASKS.names()
    for task in tasks:
        TASKS.get(task)
    base = {t: xz.param_count("full", t) for t in tasks}
    print(f"{'variant':<26}" + "".join(f"{t:>14}" for t in tasks) + "  capabilities / paper")
    for name in xz.list_models():
        spec = xz.VARIANTS.get(name)
        cells = []
        for t in tasks:
            try:
                n = xz.param_count(name, t)
                flag = "!" if n > 1.1 * base[t] else " "
                cells.append(f"{n / 1e6:>12.3f}M{flag}")
            except (ConfigError, ValueError) as e:
                cells.append(f"{'n/a':>13} ")
                logging.debug("%s on %s: %s", name, t, e)
        caps = [k for k, v in vars(spec.capabilities).items() if v is True]
        print(f"{name:<26}" + "".join(cells) + f"  {','.join(caps)} | {spec.paper}")
    print("\n'!' marks more than 10% above the full-attention Transformer's parameters "
          "(LRA keeps comparisons within +10%); n/a: the variant cannot serve that task's config.")
    return 0


def cmd_data_prepare(args) -> int:
    """Builds a task's data set (reused if already built)."""
    from xformers_zoo import data
    from xformers_zoo.configs import resolve_config

    overrides = parse_assignments(args.overrides)
    cfg = resolve_config(args.task, presets=args.preset, overrides=overrides)
    start = time.perf_counter()
    builder = data.prepare(cfg.data)
    seconds = time.perf_counter() - start
    for split, (count, spent) in builder.generated.items():
        print(f"{args.task} {split}: {count} examples generated in {spent:.1f} s "
              f"({count / max(spent, 1e-9):.0f}/s)")
    if builder.generated:
        print(f"{args.task}: built in {seconds:.1f} s")
    sizes = {split: len(data.data_source(cfg.data, split))
             for split in ("train", "validation", "test")}
    print(f"{args.task}: {builder.data_dir} {json.dumps(sizes)}")
    return 0


def _default_workdir(args, variant: str) -> str:
    """runs/<task>-<model>[-<recipe>][-<preset>...]"""
    recipe = [args.recipe] if args.recipe else []
    return f"runs/{args.task}-{variant}" + "".join(f"-{p}" for p in recipe + args.preset)


def _join_processes(args) -> None:
    """Joins a multi-host run when the environment or ``--distributed`` asks for one
    (``train/distributed.py``); the first process then prints for the run, the others not."""
    from xformers_zoo.train.distributed import initialize_distributed, is_primary

    initialize_distributed(args.distributed)
    if not is_primary():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process


def cmd_train(args) -> int:
    """Trains one variant on one task (or runs a recipe's stages, ``--recipe``) and prints test
    accuracy beside the majority class."""
    from xformers_zoo import overrides as cfglib
    from xformers_zoo.configs import resolve_config
    from xformers_zoo.train import run
    from xformers_zoo.train.tables import summary_line

    _join_processes(args)
    if args.recipe:
        return _train_recipe(args)
    if args.dry_run:
        raise ValueError("--dry-run describes the stages of a recipe; give --recipe NAME "
                         "(xformers-zoo recipes lists them)")
    cfg = resolve_config(args.task, args.model, presets=args.preset,
                         overrides=parse_assignments(args.overrides))
    workdir = args.workdir or _default_workdir(args, cfg.model.variant)
    print(f"config ({workdir}/config.json):\n{cfglib.dumps(cfg)}", flush=True)
    result = run(cfg, workdir, progress=not args.no_progress)
    print(json.dumps(result, indent=2))
    print(summary_line(result))
    return 0


def _train_recipe(args) -> int:
    """Plans a recipe's stages, prints them, and (unless ``--dry-run``) trains them."""
    from xformers_zoo.recipes import check_stages, describe_stages, plan_recipe, run_stages
    from xformers_zoo.train.tables import summary_line

    workdir = args.workdir or _default_workdir(args, args.model)
    stages = plan_recipe(args.recipe, args.task, args.model, args.preset, args.overrides,
                         workdir)
    print(describe_stages(args.recipe, stages, check_stages(stages)), flush=True)
    if args.dry_run:
        return 0
    results = run_stages(stages, progress=not args.no_progress,
                         echo=lambda line: print(line, flush=True))
    print(json.dumps(results[-1], indent=2))
    print(f"{args.recipe} ({stages[-1].workdir}): {summary_line(results[-1])}")
    return 0


def cmd_recipes(args) -> int:
    """Lists the registered recipes and their stages' rule for overrides."""
    from xformers_zoo.recipes import RECIPES

    del args
    for name, recipe in RECIPES.items():
        print(f"{name:<15} {recipe.summary} ({recipe.paper})")
    print("\nRun one with `xformers-zoo train --task T --model V --recipe NAME` (--dry-run "
          "prints its stages). Overrides: model.* and data.* reach every stage, train.* the "
          "final one; STAGE:section.field=value reaches one stage.")
    return 0


def cmd_eval(args) -> int:
    """Scores a run's checkpoint on a split."""
    from xformers_zoo.train import evaluate_run

    _join_processes(args)
    result = evaluate_run(args.workdir, split=args.split, checkpoint=args.checkpoint,
                          data_dir=args.data_dir)
    print(json.dumps(result, indent=2))
    return 0


def cmd_table(args) -> int:
    """Prints a Markdown table of finished runs, or the LRA table of a sweep directory."""
    from xformers_zoo.train.lra_table import is_sweep_dir, table_command
    from xformers_zoo.train.tables import load_results, markdown_table

    if is_sweep_dir(args.runs):
        return table_command(args)

    print(markdown_table(load_results(args.runs)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="xformers-zoo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list attention variants and parameter counts")
    p.add_argument("--task", help="only this task (default: every registered task)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="prepare, show or measure a task's data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="build a task's data set (reused once built)")
    prep.add_argument("task")
    prep.add_argument("--preset", action="append", default=[], help="e.g. tiny")
    _takes_overrides(prep)
    prep.set_defaults(func=cmd_data_prepare)
    data_sub.add_parser("show", help="write a PNG grid of samples (see --help)", add_help=False)
    data_sub.add_parser("stats", help="image statistics of generated Pathfinder data (see --help)",
                        add_help=False)

    p = sub.add_parser("train", help="train a variant on a task")
    p.add_argument("--task", default="listops")
    p.add_argument("--model", default="full", help="attention variant (xformers-zoo models)")
    p.add_argument("--preset", action="append", default=[], help="tiny, lra (repeatable)")
    p.add_argument("--workdir", help="run directory, or the folder of a recipe's stages (default "
                   "runs/<task>-<model>[-<recipe>][-<preset>])")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--recipe", help="train a recipe's stages, each from the previous one "
                   "(xformers-zoo recipes lists them)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --recipe: print the stages, their configs and status, train nothing")
    _distributed_option(p)
    _takes_overrides(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("recipes", help="list the recipes of train --recipe")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("eval", help="score a run's checkpoint on a split")
    p.add_argument("--workdir", required=True)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "latest"])
    p.add_argument("--data-dir", help="where the data lives, if it moved")
    _distributed_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("table", help="Markdown table of finished runs")
    p.add_argument("runs", nargs="+", help="run directories or their final.json files, or one "
                   "sweep directory for the LRA table (variants x tasks, seeds, published)")
    p.add_argument("--out", help="sweep table: also write OUT.md, OUT.csv and OUT.json")
    p.add_argument("--curves", help="sweep table: write learning curves per task to this folder")
    p.add_argument("--speed", help="sweep table: bench speed JSON, for --chart")
    p.add_argument("--chart", help="sweep table: write the LRA chart (accuracy, speed, memory)")
    p.add_argument("--chart-length", type=int, default=4096, help="sequence length of --chart")
    p.set_defaults(func=cmd_table)

    sub.add_parser("sweep", help="train tasks x variants x seeds (see sweep --help)",
                   add_help=False)

    from xformers_zoo.bench import BENCHMARKS

    p = sub.add_parser("bench", help=f"benchmarks: {' | '.join(BENCHMARKS.names())}")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    for name, bench in BENCHMARKS.items():
        bench_sub.add_parser(name, help=f"{bench.help} (see --help)", add_help=False)
    return parser


def _distributed_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--distributed", action="store_true",
        help="join a multi-host run from the cluster JAX detects (srun, mpirun); without it a "
             "process joins when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
             "are set, else uses this host's devices only")


def _takes_overrides(parser: argparse.ArgumentParser) -> None:
    """Marks a subcommand as taking config overrides: ``parse_args`` collects them from any
    position (an argparse positional would only take them before or after all options)."""
    parser.set_defaults(takes_overrides=True)
    usage = parser.format_usage().removeprefix("usage: ").rstrip()
    parser.usage = f"{usage} [section.field=value ...]"
    parser.epilog = OVERRIDES_HELP


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parses a command line; the words ``section.field=value`` of a subcommand that takes
    overrides become ``args.overrides``, wherever they stand."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    wrong = [w for w in extra if w.startswith("-") or "=" not in w]
    if wrong or (extra and not getattr(args, "takes_overrides", False)):
        parser.error(f"unrecognized arguments: {' '.join(wrong or extra)}")
    args.overrides = extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``xformers-zoo`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    words = [a for a in argv if not a.startswith("-")]
    if len(words) >= 2 and words[0] == "bench":
        from xformers_zoo.bench import BENCHMARKS

        try:
            bench = BENCHMARKS.get(words[1])
        except UnknownNameError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _quiet_libraries()
        return bench.main(argv[argv.index(words[1]) + 1:])
    for command, module_name in DELEGATED.items():
        if tuple(words[:len(command)]) == command:
            _quiet_libraries()
            return importlib.import_module(module_name).main(
                argv[argv.index(command[-1]) + 1:])
    args = parse_args(argv)
    # force: a library that logged while the parser was built has already given the root
    # logger a WARNING handler, which would make this call (and --verbose) a no-op.
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", force=True)
    _quiet_libraries()
    from xformers_zoo.train.loop import TrainingDivergedError

    try:
        return args.func(args)
    except (ValueError, UnknownNameError, OSError, TrainingDivergedError) as e:
        # Bad input, file-system errors (they name their path) and divergence get one clear
        # line; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
