"""A component's constructor is its config's schema.

`schema_for("seqexp.models.recurrent.RecurrentModel")` is a dataclass with one field per
parameter that has a default -- its type from the annotation, its default the constructor's --
plus `_target_`. Hydra merges a group's YAML file onto it (through the config source in
src/hydra_plugins/seqexp_schema), so each default is written once, in the code, and a YAML
file holds only what differs, with its reason:

    defaults:
      - /schema/seqexp.models.recurrent.RecurrentModel@_here_
      - _self_
    cell: rnn

A mistyped key, a wrong type or a value outside a `Literal[...]` then fails while the config is
composed, naming the key. Parameters without a default, and the runtime facts seqexp passes
when it builds the object (build.RUNTIME, by the component's base class), are not config keys.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from functools import lru_cache
from typing import Any, List, Optional

from seqexp.build import locate, parameters, runtime_facts


def _enum(name: str, values: tuple) -> type[enum.Enum]:
    # StrEnum: members compare equal to their strings, so constructors need no conversion
    return enum.StrEnum(name, [(str(v), str(v)) for v in values])


def config_type(hint: Any, name: str) -> Any:
    """An annotation as a type OmegaConf can check: Literal -> an enum, Union with Tensor ->
    the plain part, tuple/list -> List; anything it cannot check -> Any."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return config_type(args[0], name)
    if origin is typing.Literal:
        return _enum(name, args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None) and getattr(a, "__name__", "") != "Tensor"]
        inner = config_type(rest[0], name) if len(rest) == 1 else Any
        return Optional[inner] if type(None) in args and inner is not Any else inner
    if origin in (list, tuple, typing.List, typing.Tuple) or hint in (list, tuple):
        items = {config_type(a, name) for a in args if a is not Ellipsis}
        return List[items.pop()] if len(items) == 1 and None not in items else List[Any]
    if hint in (bool, int, float, str) or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return hint
    return Any


@lru_cache(maxsize=None)
def _hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: those parameters are untyped (Any)
        return {}


def defaults(target: str) -> dict:
    """The schema's values as plain data (enums as strings): what a config of `target` holds
    when its YAML file changes nothing."""
    values = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
              for f in dataclasses.fields(schema_for(target))}
    return {k: str(v) if isinstance(v, enum.Enum) else v for k, v in values.items()}


@lru_cache(maxsize=None)
def schema_for(target: str) -> type:
    fn = locate(target)
    fields = [("_target_", str, dataclasses.field(default=target))] + settings_fields(fn, target, runtime_facts(fn))
    return dataclasses.make_dataclass(target.rsplit(".", 1)[-1] + "Config", fields)


def settings_schema(cls: type) -> type:
    """The schema of an object seqexp builds by itself (a report, seqexp/reports/): its
    constructor's parameters, no `_target_`."""
    return dataclasses.make_dataclass(cls.__name__ + "Settings", settings_fields(cls, cls.__qualname__, ()))


def settings_fields(fn, name_prefix: str, runtime: tuple[str, ...]) -> list:
    fields = []
    for name, (p, owner) in parameters(fn)[0].items():
        if name in runtime or p.default is p.empty:
            continue
        kind = config_type(_hints(owner).get(name, Any), f"{name_prefix}.{name}")
        default = p.default
        if kind is Any and isinstance(default, (bool, int, float, str)):
            kind = type(default)  # unannotated: the default's type
        if isinstance(kind, type) and issubclass(kind, enum.Enum) and default is not None:
            default = kind(str(default))
        if isinstance(default, (list, tuple)):
            fields.append((name, kind, dataclasses.field(default_factory=lambda d=list(default): list(d))))
        else:
            fields.append((name, kind, dataclasses.field(default=default)))
    return fields
