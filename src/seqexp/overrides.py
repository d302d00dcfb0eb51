"""The command line's Hydra overrides, read with Hydra's own parser (its grammar: quoting,
escapes, sweeps, `+`/`~` prefixes), never split by hand. Used before Hydra starts: to check the
command line (cli.py), to find `resume=` (resume.py) and the run directory (locks.py)."""

from __future__ import annotations

from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


def parse(argv: list[str]) -> Optional[list[Override]]:
    """The overrides among the command's arguments; None when Hydra would refuse the command line
    itself (its own message then says why)."""
    from hydra._internal.utils import get_args_parser

    try:
        args = get_args_parser().parse_args(argv)
        return OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, Exception):
        return None


def last_value(argv: list[str], key: str, default: Any = None) -> Any:
    """The value the last `key=...` of the command line gives (unquoted), else `default`."""
    found = [o for o in parse(argv) or [] if o.key_or_group == key and not o.is_delete() and not o.is_sweep_override()]
    return found[-1].value() if found else default
