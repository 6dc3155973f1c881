"""The ``gattn`` command line: one sub-command per pipeline stage or tool.

Each sub-command lives in its own module under ``pipelines/`` and exposes
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their
command runs, so ``gattn --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help). Add a line when a stage lands.
COMMANDS: dict[str, tuple[str, str]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gattn",
        description="Global-context vision models: prepare, pretrain, tune, fine-tune, "
        "evaluate and serve. Every command reads params.yaml.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
