"""One real number per sequence (the memory lab's adding problem, data/memory.py).

Loss and metric: MSE, with the trivial baseline's beside it -- always predicting the split's mean
target, whose MSE is the variance of the targets (~0.167 for a sum of two U(0, 1) values) -- and
the fraction of rows within 0.04 of the target (Hochreiter & Schmidhuber's criterion for a solved
sequence). Models give it a classifier's head with one output (the data's `num_outputs` = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqexp.tasks.base import Task, all_positions, last_position


class Regression(Task):
    name, head = "regress", "classify"
    objective, mode = "val/mse", "min"
    # (None: not a score of the model -- the baseline's MSE is a property of the split)
    metric_modes = {"loss": "min", "mse": "min", "baseline_mse": None, "r2": "max", "acc": "max", "count": None}
    TOLERANCE = 0.04  # |error| below which a row counts as solved (Hochreiter & Schmidhuber, 1997)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, 1), targets (B,) float
        return F.mse_loss(logits.float().squeeze(-1), batch["targets"].float())

    def loss_terms(self, batch: dict) -> int:
        return len(batch["targets"])  # one target per row

    def num_tokens(self, batch: dict) -> int:
        return all_positions(batch)

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's squared error, anchored on its last position, as a classifier's."""
        err = logits.float().squeeze(-1) - batch["targets"].float()
        return err.square(), last_position(batch)

    def batch_sums(self, logits: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        # squared error, sum y, sum y^2, solved rows, rows: the baseline's MSE is Var(y) from these
        y = batch["targets"].double()
        err = logits.double().squeeze(-1) - y
        return {"sums": torch.stack([err.square().sum(), y.sum(), y.square().sum(),
                                     (err.abs() < self.TOLERANCE).sum().double(), y.new_tensor(float(len(y)))])}

    def metrics(self, sums: dict) -> dict:
        sse, sy, syy, solved, n = sums["sums"].cpu().tolist()
        n = max(n, 1.0)
        mse = sse / n
        baseline = max(syy / n - (sy / n) ** 2, 0.0)  # predicting the mean target: Var(y)
        return {"loss": mse, "mse": mse, "baseline_mse": baseline,
                "r2": 1.0 - mse / baseline if baseline > 0 else 0.0, "acc": solved / n, "count": int(n)}
