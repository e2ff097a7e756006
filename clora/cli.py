"""The `clora` command. Each subcommand lives in the module that does its work and is imported
only when used, so `clora validate` needs neither torch nor kopf."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module has `add_arguments(parser)` and `main(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("clora_runtime.local_run", "train every experiment in a folder on a local warm runtime"),
    "validate": ("clora.validation", "check manifests as the API server and the operator would"),
    "operator": ("clora_operator.main", "run the operator (kopf) with clora's settings"),
    "runtime": ("clora_runtime.server", "run one runtime server"),
    "bench": ("clora_runtime.bench.cli", "benchmarks: throughput, rewards, scaling, join, ops, vllm-seeds"),
    "crds": ("clora.crdgen", "regenerate crds/ from the resource models"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints usage and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"clora {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    return int(module.main(sub.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
