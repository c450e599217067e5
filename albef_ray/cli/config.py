"""``albef-ray config show|validate``: the resolved config, and what differs from the defaults."""

from __future__ import annotations

import argparse

from ..config import AlbefConfig, dump_yaml, flatten
from .common import add_config_args, load


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``config`` and its actions ``show`` and ``validate``.

    Args:
        commands: The top-level subcommands of ``albef-ray``.
    """
    config = commands.add_parser("config", help="show or validate a resolved config")
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = actions.add_parser(
        "show", help="print the resolved config (defaults <- file <- overrides) as YAML",
        description="Print the resolved config (defaults <- file <- overrides) as YAML.",
    )
    add_config_args(show)
    show.set_defaults(func=_show)
    validate = actions.add_parser(
        "validate", help="check a config and list the settings that differ from the defaults",
        description="Check a config; exit 2 naming the dotted path of the first problem.",
    )
    add_config_args(validate)
    validate.set_defaults(func=_validate)


def changed_settings(cfg: AlbefConfig) -> dict[str, object]:
    """Dotted settings whose value differs from the defaults.

    Args:
        cfg: A validated config.

    Returns:
        ``{"optim.lr": 2e-4, ...}`` in the config's field order.
    """
    defaults = flatten(AlbefConfig())
    return {k: v for k, v in flatten(cfg).items() if defaults.get(k) != v}


def _show(args: argparse.Namespace) -> int:
    print(dump_yaml(load(args)), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    changed = changed_settings(load(args))
    counted = "1 setting differs" if len(changed) == 1 else f"{len(changed)} settings differ"
    print(f"{args.config or 'defaults'}: valid; {counted} from the defaults")
    for key, value in changed.items():
        print(f"  {key} = {value!r}")
    return 0
