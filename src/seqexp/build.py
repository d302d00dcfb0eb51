"""Objects from config nodes: the builders that training and the commands share.

`instantiate(node, **runtime)` calls the node's `_target_` once, with the node's plain values
and the runtime facts its signature asks for (vocab_size, params, total_steps, ...). It never
instantiates recursively: a nested node is passed on as a plain dict. Configs read from a file
are checked by trust.py before they get here.
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from seqexp.errors import UserError


def locate(target: str) -> Callable:
    """'package.module.Name' -> the object, or a one-line error naming the target."""
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"_target_ '{target}' cannot be imported ({e}).") from None


def plain(node: Any) -> dict:
    """A config node as a plain dict: resolved, enums as strings."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return dict(node)


def accepted(fn: Callable, kwargs: dict) -> dict:
    """The entries of `kwargs` that `fn` takes (all of them when it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def instantiate(node: Any, **runtime) -> Any:
    """`node._target_(**node's values, **the runtime facts it accepts)`."""
    kwargs = plain(node)
    target = kwargs.pop("_target_", None)
    if target is None:
        raise UserError(f"config node has no _target_: {kwargs}.")
    special = [k for k in kwargs if str(k).startswith("_")]
    if special:
        raise UserError(f"{target}: seqexp builds components from _target_ and plain values; "
                        f"'{special[0]}' is not supported.")
    fn = locate(target)
    return fn(**kwargs, **accepted(fn, runtime))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda, but torch sees no CUDA device. Use trainer.device=cpu or auto.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"device '{name}' is not a device torch knows; use cpu, cuda or auto.") from None


def build_optimizer(node: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay on matrices (linear and embedding weights) only; never on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) weights once
    groups = [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = instantiate(node, params=groups)
    for g in opt.param_groups:  # a list from YAML; torch documents a tuple
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return opt
