"""`key=value` options for the commands that use a trained run (evaluate, sample, predict).

They look like Hydra overrides, but free text (prompts, reviews) passes through untouched,
which Hydra's override grammar would not allow (commas, brackets, quotes, `:`). Each command
declares its options as a dataclass; values are converted to the field's type, and an
unknown key fails with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from typing import Any

from seqexp.errors import UserError

OPTION = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$", re.DOTALL)  # `key=value`; text with spaces before `=` is not
TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def convert(key: str, value: str, kind: Any) -> Any:
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        if value.lower() in ("null", "none", ""):
            return None
        kind = next(a for a in args if a is not type(None))
    try:
        if kind is bool:
            if value.lower() in TRUE | FALSE:
                return value.lower() in TRUE
            raise ValueError
        return kind(value)
    except ValueError:
        expected = "true or false" if kind is bool else f"type {kind.__name__}"
        raise UserError(f"option {key}={value!r}: expected {expected}.") from None


def usage(doc: str, options_cls: type) -> str:
    hints = typing.get_type_hints(options_cls)
    rows = []
    for f in dataclasses.fields(options_cls):
        kind = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        null = " or null" if type(None) in typing.get_args(hints[f.name]) else ""
        default = "null" if f.default is None else repr(f.default) if isinstance(f.default, str) else f.default
        rows.append((f"{f.name}={default}", f"{kind[0].__name__}{null}", f.metadata.get("help", "")))
    w0, w1 = (max(len(r[i]) for r in rows) for i in (0, 1))
    lines = [doc.strip(), "", "options (key=value):"]
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def version_line() -> str:
    """What `--version` prints, for every seqexp command (the installed package's version)."""
    import seqexp

    return f"seqexp {seqexp.__version__}"


def parse(argv: list[str], options_cls: type, doc: str, *,
          prefixes: tuple[str, ...] = ()) -> tuple[list[str], Any, dict[str, str]]:
    """argv -> (positional arguments, options, {key: raw value} for keys under `prefixes`).

    `--` ends the options: every later argument is positional, even one that looks like `a=b`.
    `-h`/`--help` prints the usage and exits.
    """
    hints = typing.get_type_hints(options_cls)
    fields = {f.name for f in dataclasses.fields(options_cls)}
    positional, values, extra = [], {}, {}
    rest = False
    for arg in argv:
        if rest:
            positional.append(arg)
        elif arg == "--":
            rest = True
        elif arg in ("-h", "--help"):
            print(usage(doc, options_cls))
            sys.exit(0)
        elif arg == "--version":
            print(version_line())
            sys.exit(0)
        elif arg.startswith("--"):
            raise UserError(f"unknown flag {arg}; options are key=value (see --help).")
        elif m := OPTION.match(arg):
            key, value = m.groups()
            if key in fields:
                values[key] = convert(key, value, hints[key])
            elif key.startswith(prefixes) and prefixes:
                extra[key] = value
            else:
                known = ", ".join(sorted(fields) + [f"{p}*" for p in prefixes])
                raise UserError(f"unknown option '{key}'. Options: {known}. "
                                f"(Text that contains '=' goes after `--`.)")
        else:
            positional.append(arg)
    return positional, options_cls(**values), extra
