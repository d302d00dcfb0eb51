"""`optimizer=muon`: Muon (Jordan et al. 2024; torch.optim.Muon) for the hidden weight matrices,
AdamW for everything else, as one optimizer.

Muon replaces a matrix's momentum by its nearest semi-orthogonal matrix (Newton-Schulz), so
every direction of the update moves alike. That suits the matrices between hidden vectors only:
an embedding row or a head row is a lookup, not a linear map of a hidden vector, and gains and
biases are not matrices. Which matrices: `build.hidden_matrices` (a rule on module types, never on
the model family).

The trainer, the checkpoints, the schedules, the gradient clipping and the non-finite guard all
see one `torch.optim.Optimizer`: its `param_groups` are Muon's groups followed by AdamW's (the
same dicts, so a schedule that scales every group's lr scales both optimizers'), `step` and
`zero_grad` run both, and the state dict is torch's format over both (as one optimizer's).

The two learning rates: `lr` is AdamW's, as in every other optimizer config (a recipe's
`optimizer.lr` keeps its meaning), and `muon_lr` Muon's, the same number when null. That works
because of `adjust_lr_fn=match_rms_adamw` (Moonshot, Liu et al. 2025): Muon's lr is multiplied
by 0.2 x sqrt(max(fan_out, fan_in)), which brings its orthogonal update to an RMS of 0.2, a
typical AdamW update's, so AdamW's lr and weight decay carry over. A schedule multiplies both by the same factor: their ratio never changes.
(lr_find sets every group to the same ramp: it finds one lr for both.)

Recurrent layers: torch stores a GRU's or LSTM's gates stacked in one weight_ih and one weight_hh
(3H or 4H x H); Muon takes each as one matrix, as torch stores it (splitting per gate would need
views torch.optim.Muon cannot take). Measured on the character LM (BENCHMARKS.md): Muon helps
attention at AdamW's lr; the GRU only with a larger muon_lr (1e-2; at AdamW's 3e-3 it is worse).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Iterable, Literal, Optional

import torch

from seqexp.errors import UserError


class MuonAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],  # the builder's groups (build.build_optimizer): decaying, and weight_decay 0
        matrices: Iterable[torch.Tensor] = (),  # runtime: which of them Muon takes (build.hidden_matrices)
        lr: float = 2e-3,  # AdamW's (embeddings, head, gains, biases); adamw.yaml's
        betas: tuple[float, float] = (0.9, 0.99),  # AdamW's, adamw.yaml's
        eps: float = 1e-8,
        weight_decay: float = 0.1,  # both, decoupled (lr x wd); never on the weight_decay 0 group
        muon_lr: Optional[float] = None,  # Muon's; null: lr (see adjust_lr_fn)
        momentum: float = 0.95,  # Muon's (torch's default)
        nesterov: bool = True,
        ns_steps: int = 5,  # Newton-Schulz iterations
        # match_rms_adamw: Muon's update at AdamW's RMS, so one lr suits both; original: Keller
        # Jordan's sqrt(max(1, fan_out / fan_in)), whose lr is ~0.02
        adjust_lr_fn: Literal["original", "match_rms_adamw"] = "match_rms_adamw",
    ):
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        groups = [{**g, "params": list(g["params"])} for g in groups]
        hidden = {id(p) for p in matrices}
        split = lambda keep: [{**g, "params": [p for p in g["params"] if keep(id(p) in hidden)]} for g in groups]
        muon_groups = [g for g in split(lambda h: h) if g["params"]]
        adamw_groups = [g for g in split(lambda h: not h) if g["params"]]
        if not muon_groups:
            raise UserError("optimizer=muon: this model has no hidden weight matrices (2-D weights of nn.Linear or "
                            "recurrent layers besides the embedding and the head) for Muon; use optimizer=adamw.")
        muon_lr = lr if muon_lr is None else muon_lr
        if not muon_lr > 0:  # torch's Muon takes 0; build.check_optimization words this as a config error
            raise ValueError(f"optimizer.muon_lr must be positive (or null: optimizer.lr), got {muon_lr}.")
        self.muon = torch.optim.Muon(muon_groups, lr=muon_lr, weight_decay=weight_decay, momentum=momentum,
                                     nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=str(adjust_lr_fn))
        # never empty: a model without an embedding or a bias is not built here
        self.adamw = torch.optim.AdamW(adamw_groups or [{"params": []}], lr=lr, betas=tuple(betas), eps=eps,
                                       weight_decay=weight_decay)
        # the children's group dicts themselves: a schedule writing group["lr"] writes theirs
        # (defaults: only keys every group has already, so the children's groups stay as they were)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], dict(lr=lr))
        self.state = Both(self.muon.state, self.adamw.state)  # read: whether a step made state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    # state_dict: torch's own, over the union (the groups in order, then each parameter's state):
    # the format of every other optimizer, which the checkpoint checks read
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch's checks (groups and their sizes) and its casts
        # torch's load makes new group dicts and a new state: hand each child its part again
        n = len(self.muon.param_groups)
        for child, groups in ((self.muon, self.param_groups[:n]), (self.adamw, self.param_groups[n:])):
            child.param_groups = groups
            child.state = defaultdict(dict, {p: self.state[p] for g in groups for p in g["params"] if p in self.state})
        self.state = Both(self.muon.state, self.adamw.state)


class Both(Mapping):
    """The two optimizers' per-parameter state as one read-only mapping (a ChainMap would ask the
    first one's defaultdict for every key, and so fill it with empty entries)."""

    def __init__(self, *parts: Mapping):
        self.parts = parts

    def __getitem__(self, param):
        for part in self.parts:
            if param in part:
                return part[param]
        raise KeyError(param)

    def __iter__(self):
        return (param for part in self.parts for param in part)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)
