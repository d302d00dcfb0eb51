"""Load a trained run for use: its checkpoint, model, text encoder and data, from the file alone.

A run directory resolves to its best checkpoint, else its last (RunDir.for_use); a path to a
`.pt` file is used as is. Checkpoints load onto the CPU first (`checkpoint.read` maps every
tensor there), so one written on CUDA works on a CPU-only machine; the model then moves to
the device asked for.

Everything specific to a dataset is asked of its class (the saved config's data `_target_`):
its text encoder (`text_encoder(saved)`: `encode(str) -> (N,) ids`, `decode(ids) -> str`) and
how to read a config an older seqexp saved (`upgrade_config`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seqexp import build, checkpoint
from seqexp.build import locate, pick_device
from seqexp.checkpoint import Checkpoint
from seqexp.errors import UserError
from seqexp.options import convert
from seqexp.rundir import RunDir

HEAD_NAMES = {"lm": "a language model", "classify": "a classifier"}


def find_checkpoint(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        from seqexp.resume import suggest_runs

        raise UserError(f"no such run directory or checkpoint: {p}.{suggest_runs(p)}")
    run = RunDir(p.parent) if p.name == RunDir.CHECKPOINTS else RunDir(p)  # (the checkpoints folder itself)
    found = run.for_use()
    if found is None:
        raise UserError(f"{p} holds no checkpoint (looked for {run.best} and {run.last}). Give the directory "
                        f"of a run of seqexp-train; it writes them at its first evaluation.")
    return found


@dataclass
class Run:
    path: Path  # the checkpoint file
    ckpt: Checkpoint  # checkpoint.py describes its keys
    model: torch.nn.Module  # in eval mode, on `device`
    device: torch.device

    @property
    def head(self) -> str:
        return self.ckpt["model_kwargs"]["head"]

    @property
    def step(self) -> int:
        return self.ckpt["trainer"]["step"]

    def require(self, head: str, command: str, instead: str) -> None:
        if self.head != head:
            raise UserError(f"{self.path} is {HEAD_NAMES.get(self.head, self.head)}; {command} needs "
                            f"{HEAD_NAMES[head]}. {instead}")


def build_model(ckpt: Checkpoint) -> torch.nn.Module:
    target = ckpt["config"]["model"].get("_target_")
    try:
        model = build.build_model(ckpt["config"]["model"], ckpt["model_kwargs"])
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"could not rebuild the model ({target}) from the checkpoint: "
                        f"{str(e).splitlines()[0]}") from None
    return model


def load_run(path: str | Path, device: str = "cpu") -> Run:
    ckpt_path = find_checkpoint(path)
    ckpt = checkpoint.read(ckpt_path)  # every tensor on the CPU, whatever device wrote it
    dev = pick_device(device)
    model = build_model(ckpt).to(dev).eval()
    return Run(ckpt_path, ckpt, model, dev)


def text_encoder(ckpt: Checkpoint):
    """The checkpoint's own text -> ids mapping: `encode(str) -> (N,) ids`, `decode(ids) -> str`,
    built by its data class from the saved data state alone."""
    data_class = locate(ckpt["config"]["data"]["_target_"])
    try:
        return data_class.text_encoder(ckpt["data"])
    except KeyError as e:  # a state this code never wrote: another data kind, or a newer seqexp's
        raise UserError(f"this seqexp cannot encode text for data kind '{ckpt['data'].get('kind')}' "
                        f"({data_class.__name__} needs {e} in the saved data state); update seqexp or use "
                        f"a run it wrote.") from None


def label_names(ckpt: Checkpoint) -> list[str]:
    """Class names saved by the data (`state()["classes"]`), else the class indices."""
    n = ckpt["model_kwargs"]["num_outputs"]
    names = ckpt["data"].get("classes")
    return [str(x) for x in names] if names and len(names) == n else [str(i) for i in range(n)]


def build_data(ckpt: Checkpoint, overrides: dict[str, str] | None = None):
    """The run's data from its saved config (e.g. for its validation split), with the
    checkpoint's vocabulary. `overrides`: `{"data.path": "..."}`, keys of the saved data config."""
    cfg = copy.deepcopy(ckpt["config"]["data"])  # today's keys (checkpoint.read upgraded them)
    if "cache_dir" in cfg:  # a place on the machine that wrote the run: here, ours (trust.py), unless overridden
        cfg["cache_dir"] = None
    for key, value in (overrides or {}).items():
        leaf = key.removeprefix("data.")
        if leaf not in cfg or leaf.startswith("_"):
            keys = ", ".join(f"data.{k}" for k in cfg if not k.startswith("_"))
            raise UserError(f"'{key}' is not a key of this run's data config. Its keys: {keys}.")
        cfg[leaf] = _like(key, value, cfg[leaf])
    try:
        data = build.build_data(cfg, seed=ckpt["config"]["trainer"]["seed"], saved=ckpt["data"])
    except UserError as e:
        raise UserError(f"{e} (the run's data source; point data.path=... at a copy)") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"could not rebuild the data ({cfg.get('_target_')}): {str(e).splitlines()[0]}") from None
    want, got = ckpt["model_kwargs"]["vocab_size"], data.model_kwargs()["vocab_size"]
    if want != got:  # ids would mean other tokens: every metric would be wrong
        raise UserError(f"the rebuilt data has a vocabulary of {got}, the checkpoint {want}; "
                        f"this data does not match the run.")
    return data


def _like(key: str, value: str, old: Any) -> Any:
    """A command-line string as the type of the value it replaces; 'null' for None."""
    if value.lower() in ("null", "none"):
        return None
    kind = type(old) if isinstance(old, (bool, int, float)) else str
    return convert(key, value, kind)
