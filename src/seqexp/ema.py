"""An exponential moving average of a model's weights (`trainer.ema`).

The average never feeds back into training: the optimizer steps the model's own weights, and
the average is only swapped in to evaluate, to sample and to be saved as a checkpoint's
"model" -- the weights whose validation score the run reports.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

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
    def update(self) -> None:
        """average += (1 - decay) * (weights - average). The decay ramps up as (1 + n) / (10 + n)
        to `decay` (TensorFlow's ExponentialMovingAverage with num_updates), so early averages do
        not cling to the initial weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for a, p in zip(self.average, self.params):
            a.lerp_(p, 1.0 - decay)

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
