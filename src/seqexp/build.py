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

# Facts seqexp passes when it builds a component of each group (never config keys: schema.py
# leaves them out): a model's come from the data; a dataset gets the run's seed and, rebuilt from
# a checkpoint, the data state it saved.
RUNTIME = {
    "model": ("vocab_size", "num_outputs", "head", "max_len"),
    "data": ("seed", "saved"),
    "optimizer": ("params", "matrices"),  # matrices: the hidden weight matrices (Muon's, muon.py)
    "scheduler": ("optimizer", "total_steps"),
}


def runtime_facts(fn: Callable) -> tuple[str, ...]:
    """The runtime facts of the group `fn` builds for (by its base class; else optimizer/schedule)."""
    from seqexp.data.base import Dataset
    from seqexp.models.base import SequenceModel

    if isinstance(fn, type) and issubclass(fn, SequenceModel):
        return RUNTIME["model"]
    if isinstance(fn, type) and issubclass(fn, Dataset):
        return RUNTIME["data"]
    return RUNTIME["optimizer"] + RUNTIME["scheduler"]


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


def parameters(fn: Callable) -> tuple[dict[str, tuple[inspect.Parameter, Callable]], bool]:
    """-> ({name: (parameter, the function that declares it)}, whether it takes other keywords too).

    A class's constructor that passes `**kwargs` on to its base class's takes the base's named
    parameters as well (a family's shared knobs, written once: data/memory.py), down the MRO
    until a constructor without `**kwargs`; a function's are its own."""
    if isinstance(fn, type):
        chain = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c) and c is not object]
    else:
        chain = [fn]
    found: dict[str, tuple[inspect.Parameter, Callable]] = {}
    for f in chain:
        params = list(inspect.signature(f).parameters.values())
        if isinstance(fn, type):
            params = params[1:]  # self
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, (p, f))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return found, False
    return found, True


def accepted(fn: Callable, kwargs: dict) -> dict:
    """The entries of `kwargs` that `fn` takes (parameters), all of them when it takes any keyword."""
    params, takes_any = parameters(fn)
    if takes_any or any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values()):
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


def build_data(node: Any, *, seed: int, saved: dict | None = None):
    """A dataset (data/base.py) from its config. `saved`: a checkpoint's data `state()`, whose
    vocabulary it reuses so that ids keep their meaning."""
    return instantiate(node, seed=seed, saved=saved)


def build_model(node: Any, model_kwargs: dict) -> torch.nn.Module:
    """A model (models/base.py) from its config and the data's runtime facts (`model_kwargs()`)."""
    return instantiate(node, **model_kwargs)


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


def decays(p: torch.Tensor) -> bool:
    """Whether weight decay applies: to matrices (linear and embedding weights), never to biases or
    norms, nor to a matrix its model marks `p.no_weight_decay = True` (a state space's decay rates,
    models/mamba.py: decaying them towards 0 would lengthen every memory)."""
    return p.dim() >= 2 and not getattr(p, "no_weight_decay", False)


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices that map hidden vectors to hidden vectors, which Muon orthogonalises
    (muon.py): the 2-D weights of every nn.Linear and of torch's recurrent layers (weight_ih and
    weight_hh, the gates stacked: one matrix as torch stores it, as Muon's authors and the speedruns
    treat a fused QKV), except the input embedding's and the output head's (a SequenceModel's
    `input_embedding()` and `head`; a tied head is the embedding) and a matrix with one row or
    column (a vector in disguise: an attention-pooling score). By module type, never by family."""
    outside = {id(p) for m in (model.input_embedding(), getattr(model, "head", None)) if m is not None
               for p in m.parameters()}
    found: dict[int, torch.nn.Parameter] = {}  # by id: a shared matrix once
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.RNNBase)):
            for p in module.parameters(recurse=False):
                if p.dim() == 2 and min(p.shape) > 1 and p.requires_grad and id(p) not in outside:
                    found[id(p)] = p
    return list(found.values())


def build_optimizer(node: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Weight decay where `decays` says (one group), none elsewhere (another). An optimizer that
    asks for `matrices` (muon.py) gets the hidden weight matrices too."""
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) weights once
    groups = [
        {"params": [p for p in params if decays(p)]},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
    ]
    opt = instantiate(node, params=groups, matrices=hidden_matrices(model))
    for g in opt.param_groups:  # a list from YAML; torch documents a tuple
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return opt


def check_optimization(optimizer: Any, scheduler: Any) -> None:
    """Build the optimizer and the schedule on one dummy parameter: torch's own argument checks
    (and the schedule's) run before any data is read, and a learning rate must be positive."""
    param, matrix = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(2, 2))
    try:
        opt = instantiate(optimizer, params=[param, matrix], matrices=[matrix])
        instantiate(scheduler, optimizer=opt, total_steps=1)
    except (TypeError, ValueError) as e:
        raise UserError(f"optimizer/scheduler: {e}") from None
    if not opt.defaults.get("lr", 1.0) > 0:
        raise UserError(f"optimizer.lr must be positive, got {opt.defaults['lr']}.")
