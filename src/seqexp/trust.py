"""What a config read from a file may build.

A config composed from the command line is the user's own: every `_target_` in it is code they
chose to run. A config read from a file -- the `config` inside a checkpoint, which `resume=`,
evaluate, sample, predict and ensemble rebuild a run from -- is data, and a run directory may
come from anyone. So before anything in such a config is imported or called:
- each component group (model, data, optimizer, scheduler) must name, as its `_target_`, a
  component that seqexp's own config files name for that group, or one in a module the user
  trusts by name ($SEQEXP_TRUST, comma-separated module prefixes, e.g. `mylab.models`);
- no other key that starts with `_` may appear at any depth (`_target_` in a nested node,
  `_partial_`, `_args_`, `_recursive_`, ...), and no value may be an interpolation (`${...}`);
- seqexp builds components itself (build.py): one call with plain values, never a recursive
  instantiation, so a nested node is only ever a plain dict.
Anything else is refused with one line naming the key and the target.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from seqexp.configs import CONFIG_DIR
from seqexp.errors import UserError

GROUPS = ("model", "data", "optimizer", "scheduler")  # the config groups that build an object
SCHEMA = re.compile(r"^/?schema/([\w.]+?)(?:@.*)?$")  # a defaults entry naming a signature schema


def _targets_in(path: Path) -> set[str]:
    """The `_target_`s a YAML file names: its own key, or its `/schema/<target>` defaults entry."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return set()
    found = {doc["_target_"]} if isinstance(doc.get("_target_"), str) else set()
    for entry in doc.get("defaults") or []:
        if isinstance(entry, str) and (m := SCHEMA.match(entry.strip())):
            found.add(m.group(1))
    return found


@lru_cache(maxsize=None)
def shipped_targets(config_dir: str) -> dict[str, frozenset[str]]:
    """group -> the targets seqexp's own config files name for it."""
    return {g: frozenset(t for f in sorted(Path(config_dir, g).glob("*.yaml")) for t in _targets_in(f))
            for g in GROUPS}


_session: set[tuple[str, str]] = set()  # (group, target) that this process was told to build


def allow(cfg: Any) -> None:
    """Trust the components of a config this process builds (composed from the command line, or
    checked already), so that it may read back the checkpoints it writes."""
    for group in GROUPS:
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if node is not None and isinstance(node.get("_target_"), str):
            _session.add((group, node.get("_target_")))


def trusted_prefixes() -> tuple[str, ...]:
    return tuple(p.strip() for p in os.environ.get("SEQEXP_TRUST", "").split(",") if p.strip())


def is_allowed(group: str, target: Any) -> bool:
    if not isinstance(target, str):
        return False
    if target in shipped_targets(str(CONFIG_DIR))[group] or (group, target) in _session:
        return True
    return any(target == p or target.startswith(p + ".") for p in trusted_prefixes())


def _walk(node: Any, key: str):
    """(dotted key, value) of every leaf and every dict key below `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{key}.{k}" if key else str(k)
            yield path, k, v
            yield from _walk(v, path)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _walk(v, f"{key}[{i}]")


def check_file_config(cfg: Any, source: str | Path) -> None:
    """Refuse a config read from `source` unless it builds only trusted components (module doc)."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: its config is not a mapping; not loaded.")
    for group in GROUPS:
        node = cfg.get(group)
        if not isinstance(node, dict):
            raise UserError(f"{source}: its config has no '{group}' section; not loaded.")
        target = node.get("_target_")
        if not is_allowed(group, target):
            raise UserError(f"{source}: {group}._target_ '{target}' is not a {group} that seqexp ships; refused "
                            f"without importing it (a saved config may only build seqexp's own components; "
                            f"to load your own code, set SEQEXP_TRUST=<its module>).")
    for path, k, v in _walk(cfg, ""):
        top_target = k == "_target_" and path.count(".") == 1 and path.split(".")[0] in GROUPS
        if isinstance(k, str) and k.startswith("_") and not top_target:
            shown = f" ({v['_target_']})" if isinstance(v, dict) and "_target_" in v else \
                f" ({v})" if isinstance(v, str) else ""
            raise UserError(f"{source}: its config holds '{path}'{shown}; refused: a saved config may not name "
                            f"code to call (only each group's own _target_ is read).")
        if isinstance(v, str) and "${" in v:
            raise UserError(f"{source}: its config holds an interpolation at '{path}' ({v}); refused: saved "
                            f"configs are stored resolved.")
