"""``python -m bench <command> [options]``: the one runner of the benchmark package.

A command is a module of this package whose docstring is its help, with ``add_arguments(parser)`` (argparse
options, ``--kebab-case``) and ``main(args)``. The runner imports only the command it runs, so the list and
each command's help come without loading torch for every other command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one line for the list); the Makefile's targets call the first six
COMMANDS: dict[str, tuple[str, str]] = {
    "suite": (
        "bench.suite",
        "the embedded suite: quality, speed, scaling, DDP (make bench, make bench-quick)",
    ),
    "photos": (
        "bench.photos",
        "every stage on the real-photo benchmark (make bench-photos, bench-photos-quick)",
    ),
    "loader": ("bench.loader", "large originals with and without the resized cache (make bench)"),
    "scale": ("bench.scale", "the rank-0 decisions at CelebA scale (make bench)"),
    "speed": ("bench.speed", "speed ratios, each against its baseline in the same run (the suite runs it)"),
    "quality": ("bench.quality", "one config's group accuracies over seeds"),
    "photo-variants": (
        "bench.photo_variants",
        "settings of one photo stage from the suite's ERM checkpoints",
    ),
    "embedded-variants": ("bench.embedded_variants", "settings of one suite method on the embedded variants"),
    "cluster-groups": ("bench.cluster_groups", "whether PruSC's k-means clusters find the minority groups"),
    "reachable-share": (
        "bench.reachable_share",
        "the share of a ResNet-18 that can read a pixel, and pruned",
    ),
    "stage": ("bench.stage", "one stage from an ERM checkpoint on the embedded benchmark, outside the CLI"),
    "sscore-shift": ("bench.sscore_shift", "how a stage moved the s-scores: broader maps or another region"),
    "score-neurons": (
        "bench.score_neurons",
        "how many channels SCORE's mining takes, and their s-scores on the oracle masks",
    ),
}


def usage() -> str:
    """The command list."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    return "usage: python -m bench <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Runs one command with its options."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in COMMANDS:
        raise SystemExit(f"{usage()}\n\npython -m bench: no command {argv[0]!r}")
    name, (module_name, _) = argv[0], COMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"python -m bench {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    module.main(parser.parse_args(argv[1:]))


if __name__ == "__main__":
    main()
