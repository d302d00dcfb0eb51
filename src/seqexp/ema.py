"""An exponential moving average of a model's weights (`trainer.ema`).

The average never feeds back into training: the optimizer steps the model's own weights, and
the average is only swapped in to evaluate, to sample and to be saved as a checkpoint's
"model" -- the weights whose validation score the run reports. Without it (`trainer.ema=0`) the
trainer holds a `NoAverage`, whose operations do nothing: one code path either way.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.model, self.decay = model, decay
        # the trained parameters, each once: named_parameters() lists a tied weight under one name
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.average = [p.detach().clone() for p in self.params]  # starts at the current weights
        self.updates = 0

    @torch.no_grad()
    def update(self, ok: Optional[torch.Tensor] = None) -> None:
        """average += (1 - decay) * (weights - average). The decay ramps up as (1 + n) / (10 + n)
        to `decay` (TensorFlow's ExponentialMovingAverage with num_updates), so early averages do
        not cling to the initial weights.

        `ok`: a device flag (0-dim bool), false for a step the optimizer skipped: the average
        stays exactly as it is, decided on the device (no host read). Such a step still counts
        in n (the host cannot know it was skipped without a read)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        # multi-tensor kernels: one launch for all parameters, not one per tensor
        if ok is None:  # the same lerp as a per-tensor a.lerp_(p, 1 - decay), bit for bit
            torch._foreach_lerp_(self.average, self.params, 1.0 - decay)
            return
        if not self.average:
            return
        # the weight as a device tensor (0 on a skipped step). Not a lerp: its foreach kernel takes
        # a device weight only as one full-size tensor per parameter. Equal to the lerp within
        # float rounding. A skipped step adds exactly 0 x (weights - average) = 0: the weights are
        # finite (weights that are not stop the run before the average is used or saved)
        weight = torch.where(ok, 1.0 - decay, 0.0).to(self.average[0].dtype)
        diff = torch._foreach_sub(self.params, self.average)  # weights - average
        torch._foreach_mul_(diff, weight)
        torch._foreach_add_(self.average, diff)

    def restart(self, saved: Optional[dict]) -> None:
        """After the model's weights were restored (a resume): from those weights, then the saved
        average if the checkpoint has one (it has none when trainer.ema is turned on at a resume)."""
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0
        if saved is not None:
            self.load_state_dict(saved)

    def state_dict(self) -> dict:
        """{"updates": n, "average": {parameter name: averaged tensor}} (the tensors themselves)."""
        return {"updates": self.updates, "average": dict(zip(self.names, self.average))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """`state["average"]` may be a whole model state_dict (a checkpoint's averaged "model"):
        only the trained parameters are taken from it."""
        self.updates = state["updates"]
        for name, a in zip(self.names, self.average):
            a.copy_(state["average"][name])

    def averaged_state(self) -> dict:
        """model.state_dict() with the average in place of the trained weights (copies)."""
        # by storage, so that a tied weight's two names both get the average
        average = {p.data_ptr(): a for p, a in zip(self.params, self.average)}
        return {k: average.get(v.data_ptr(), v).clone() for k, v in self.model.state_dict().items()}

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Inside the block the model holds the average; after it, exactly its trained weights."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)


class NoAverage:
    """trainer.ema=0: the model's own weights are evaluated and saved."""
    updates = 0

    def update(self, ok: Optional[torch.Tensor] = None) -> None:
        pass

    def restart(self, saved: Optional[dict]) -> None:
        pass

    def averaged_state(self) -> None:
        return None  # the checkpoint's "model" is the trained weights

    def swapped(self):
        return nullcontext()


def averaging(model: torch.nn.Module, decay: float) -> EMA | NoAverage:
    return EMA(model, decay) if decay > 0 else NoAverage()
