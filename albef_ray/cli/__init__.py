"""The ``albef-ray`` command (also ``python -m albef_ray``).

Subcommands::

    albef-ray config show     [--config F] [a.b=c ...]   print the resolved config as YAML
    albef-ray config validate [--config F] [a.b=c ...]   check it, list what differs from defaults
    albef-ray pretrain         --config F  [a.b=c ...]   pretrain on Ray Train (--local: one process)
    albef-ray data build OUT --source SPEC [...]         image-caption inputs -> Parquet shards + manifest
    albef-ray data synth OUT [--train N ...]             generate the embedded benchmark and its tokenizer
    albef-ray data synth-init DATASET [--size NAME ...]  unimodal initial weights (ViT, BERT) for a synth dataset
    albef-ray sweep SPEC [a.b=c ...]                     run an ablation sweep (Ray Tune); again: resume
    albef-ray compare (--sweep NAME | --run-id ID)       a sweep's table and figures, from MLflow
    albef-ray eval retrieval --config F [--checkpoint P]  zero-shot image-text retrieval, Recall@1/5/10
    albef-ray finetune retrieval --config F [--checkpoint P] [--resume NAME]
                                                         fine-tune for retrieval on Ray Train, best by r_mean
    albef-ray eval ve --config F [--checkpoint P]         SNLI-VE accuracy on eval.split
    albef-ray finetune ve --config F [--checkpoint P] [--resume NAME]
                                                         fine-tune for SNLI-VE on Ray Train, best by ve_acc
    albef-ray finetune nlvr_pretrain --config F [--checkpoint P]  NLVR2 text assignment on caption data
    albef-ray finetune nlvr --config F [--checkpoint P] [--resume NAME]
                                                         fine-tune for NLVR2 on Ray Train, best by nlvr_acc
    albef-ray eval nlvr --config F [--checkpoint P]       NLVR2 accuracy on eval.split
    albef-ray finetune vqa --config F [--checkpoint P] [--resume NAME]
                                                         fine-tune for VQA on Ray Train, best by vqa_acc
    albef-ray eval vqa --config F [--checkpoint P] [--results FILE]  VQA answers (result file), accuracy
    albef-ray finetune grounding --config F [--checkpoint P] [--resume NAME]
                                                         fine-tune for grounding on Ray Train, best by grounding_acc
    albef-ray eval grounding --config F [--checkpoint P] [--heatmaps DIR]  Grad-CAM box ranking accuracy per split
    albef-ray explain --checkpoint P IMAGE TEXT [--variant itm|itc] [--layer N] [--out PNG]
                                                         Grad-CAM heat map of TEXT over IMAGE (PNG)

Config problems exit with status 2 and one line naming the dotted path, never a traceback;
so do bad data-build arguments (an unknown source format, an output holding another dataset).

Layout: one module per command family (:mod:`.config`, :mod:`.pretrain`, :mod:`.data`,
:mod:`.sweep`) in :data:`COMMANDS`, and one per downstream task (:mod:`.retrieval`) in
:data:`TASKS`, each with a ``register`` function; :mod:`.common` holds what they share
(config arguments, ``--resume``). Every leaf parser sets ``func``, and :func:`main` runs
``args.func(args)``. A new task (say ``vqa``) is one module whose
``register(finetune, evaluate)`` adds ``finetune vqa`` and/or ``eval vqa``, listed in
:data:`TASKS`; nothing else here changes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .. import __version__
from ..config import ConfigError
from . import config, data, explain, pretrain, retrieval, sweep
from . import nlvr
from . import ve
from . import vqa
from . import grounding

#: Modules whose ``register(commands)`` adds top-level commands, in ``--help`` order.
COMMANDS = (config, pretrain, data, sweep, explain)
#: Modules whose ``register(finetune, evaluate)`` adds a task to ``finetune`` and ``eval``.
TASKS = (retrieval, ve, nlvr, vqa, grounding)


def build_parser() -> argparse.ArgumentParser:
    """The ``albef-ray`` parser: every command, each leaf with its ``func`` default.

    Returns:
        The top-level parser; ``parse_args`` gives a namespace whose ``func(args)`` runs the
        chosen subcommand and returns its exit status.
    """
    parser = argparse.ArgumentParser(
        prog="albef-ray",
        description="ALBEF vision-language pretraining (Li et al., NeurIPS 2021) on Ray.",
        epilog="Settings are one typed config tree; every field has a dotted name (optim.lr, "
        "train.batch_size) used in YAML, overrides and error messages.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(commands)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint: zero-shot image-text retrieval")
    eval_tasks = evaluate.add_subparsers(dest="eval_command", required=True, metavar="TASK")
    finetune = commands.add_parser("finetune", help="fine-tune a pretrained ALBEF on a downstream task (Ray Train)")
    finetune_tasks = finetune.add_subparsers(dest="finetune_task", required=True, metavar="TASK")
    for module in TASKS:
        module.register(finetune_tasks, eval_tasks)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``albef-ray``: parse ``argv``, run the subcommand, map errors to statuses.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: the command's own, 2 after one ``albef-ray: ... error`` line for an
        invalid config or weights file, 130 when interrupted. Bad usage exits 2 from argparse.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"albef-ray: config error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        from ..model.loading import CheckpointError  # imported already when one was raised

        if not isinstance(err, CheckpointError):
            raise
        print(f"albef-ray: checkpoint error: {err}", file=sys.stderr)  # empty, corrupt or unsafe weights file
        return 2
    except KeyboardInterrupt:
        print("albef-ray: interrupted", file=sys.stderr)
        return 130
