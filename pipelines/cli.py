"""The ``gattn`` command line: one sub-command per pipeline stage or tool.

Each sub-command lives in its own module (a DVC stage under ``pipelines/stages/``, the
serving commands under ``pipelines/serve/``, the other tools under ``pipelines/commands/``) and
exposes
``add_arguments(parser)`` and ``run(args) -> int``; a module is imported only when its
command runs, so ``gattn --help`` and every stage start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help). Add a line when a stage lands.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": (
        "pipelines.stages.prepare",
        "generate or index the data set, split it, report on it",
    ),
    "pretrain": (
        "pipelines.stages.pretrain",
        "self-supervised pretraining (MAE/DINO) on Ray Train",
    ),
    "tune": (
        "pipelines.stages.tune.stage",
        "search global modules under memory budgets (Ray Tune)",
    ),
    "recommend": (
        "pipelines.commands.recommend",
        "which global strategy fits a memory budget, and why",
    ),
    "finetune": (
        "pipelines.stages.finetune",
        "fine-tune the searched config on Ray Train, register it",
    ),
    "evaluate": (
        "pipelines.stages.evaluate",
        "score the model: test split, large images, TTA, ERF",
    ),
    "explain": (
        "pipelines.commands.explain",
        "draw where the model looks (rollout/Grad-CAM) on an image",
    ),
    "deploy": ("pipelines.stages.deploy", "write the Ray Serve config for the registered model"),
    "serve": ("pipelines.serve.runner", "run the Ray Serve app locally, until Ctrl-C or SIGTERM"),
    "predict": (
        "pipelines.serve.client",
        "send an image to the running app, print or save the answer",
    ),
    "pipeline": (
        "pipelines.commands.pipeline",
        "run every stage (dvc repro) under one MLflow parent run",
    ),
    "launch": (
        "pipelines.commands.launch",
        "run a stage (tune, pretrain) on a Ray cluster as a Ray job",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (to add its arguments), so
    ``gattn --help`` and each stage start without loading the others (Ray Serve, Tune …)."""
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
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def input_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input (params, data layout), not a bug.

    Looked up after the command ran: ``DataLayoutError`` lives in ``gattn.data``, which
    imports torch, and a command that never imported it cannot have raised it; importing it
    up front would cost ``gattn --help`` and ``gattn predict`` seconds.
    """
    from pipelines.config import ParamsError

    errors: list[type[Exception]] = [ParamsError]
    datasets = sys.modules.get("gattn.data.datasets")
    if datasets is not None:
        errors.append(datasets.DataLayoutError)
    coco = sys.modules.get("gattn.data.coco")
    if coco is not None:
        errors.append(coco.AnnotationError)  # an invalid COCO file (folder-det)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except input_errors() as err:
        # Bad input, not a bug: say what is wrong and how to fix it, without a traceback.
        print(f"gattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
