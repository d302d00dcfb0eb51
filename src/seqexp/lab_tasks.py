"""The tasks of the memory lab (data/memory.py): a loss and metrics only where the answer is.

- `AnswerPositions`: every position gets logits, as in language modelling, but only a few
  positions hold an answer (the copied symbols, the recalled values); every other target is
  IGNORE (-100), so loss and metrics are taken there alone -- a mask, not padding. Metrics:
  cross-entropy per answer token, per-token accuracy and whole-answer exact match (every answer
  position of a row right).
- `Regression`: one real number per sequence (the adding problem). Loss and metric: MSE, with
  the trivial baseline's beside it -- always predicting the split's mean target, whose MSE is the
  variance of the targets (~0.167 for a sum of two U(0, 1) values) -- and the fraction of rows
  within 0.04 of the target (Hochreiter & Schmidhuber's criterion for a solved sequence).

A task tells models which head it needs (`head`): "lm" (B, T, V) logits, causal -- the answers
come after what they depend on, so a causal model can give them -- or "classify" (B, C) logits
pooled over each sequence; regression asks for C = 1 (the data's `num_outputs`).

Both evaluate, beside a split, its variants at other lengths (the data's splits named
`<split>@<length>`, from `data.eval_lengths`): their metrics are recorded with the suffix, e.g.
`val/exact@512`, at every evaluation and, for the test split, once on the best weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from seqexp.evaluation import outputs
from seqexp.tasks import IGNORE, Classification, LanguageModeling, last_position, test_on_best


class LengthVariants:
    """Hooks shared by the lab's tasks: variant splits at other lengths, the test split once."""

    tests_on_best = True  # after_training: the test split on best.pt (test_on_best)

    def after_evaluation(self, trainer, split: str, metrics: dict, step: int) -> None:
        # every rank evaluates (the sums are all-reduced); the keys join what the trainer records
        for name in trainer.data.splits:
            if name.startswith(split + "@"):
                suffix = name[len(split):]  # "@512"
                more = trainer.evaluate(name)
                metrics.update({f"{k}{suffix}": v for k, v in more.items() if not isinstance(v, list)})

    def after_training(self, trainer) -> None:
        test_on_best(self, trainer)  # with its length variants (after_evaluation adds them)


class AnswerPositions(LengthVariants):
    name, head = "answer", "lm"
    objective, mode = "val/loss", "min"  # nats per answer token: smooth, unlike exact match
    # every validation metric it logs (as val/<name>), and which way is better (None: a count)
    metric_modes = {"loss": "min", "acc": "max", "exact": "max", "count": None}

    # cross-entropy where the target is not IGNORE (here: the answers), as in language modelling
    loss, loss_terms = LanguageModeling.loss, LanguageModeling.loss_terms
    num_tokens = Classification.num_tokens  # every position of every row is read

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each row's mean loss over its answer positions, (B,) the first of them (-1:
        none): distances count back from where the answer starts (gradients.py)."""
        y = batch["targets"]  # (B, T)
        answer = y != IGNORE
        T = y.shape[1]
        first = torch.where(answer, torch.arange(T, device=y.device), T).amin(1)  # (B,)
        anchor = torch.where(first < T, first, -1)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                    reduction="none").view_as(y)  # (B, T), 0 off the answer
        return per_token.sum(1) / answer.sum(1).clamp(min=1), anchor

    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict:
        loss = torch.zeros((), dtype=torch.float64, device=device)
        counts = torch.zeros(4, dtype=torch.long, device=device)  # right tokens, answer tokens, exact rows, rows
        for batch, logits in outputs(model, batches, device, autocast):
            y = batch["targets"]  # (B, T)
            answer = y != IGNORE
            loss += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                    reduction="sum").double()
            right = (logits.argmax(-1) == y) & answer
            exact = (right | ~answer).all(1) & answer.any(1)  # (B,): every answer of the row
            counts += torch.stack([right.sum(), answer.sum(), exact.sum(), answer.any(1).sum()])
        return {"loss": loss, "counts": counts}

    def metrics(self, sums: dict) -> dict[str, float]:
        right, answers, exact, rows = (int(c) for c in sums["counts"].cpu())
        return {"loss": float(sums["loss"]) / max(answers, 1), "acc": right / max(answers, 1),
                "exact": exact / max(rows, 1), "count": rows}

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return self.metrics(self.sums(model, batches, device, autocast))


class Regression(LengthVariants):
    name, head = "regress", "classify"  # one output per sequence: the data says num_outputs=1
    objective, mode = "val/mse", "min"
    # (None: not a score of the model -- the baseline's MSE is a property of the split)
    metric_modes = {"loss": "min", "mse": "min", "baseline_mse": None, "r2": "max", "acc": "max", "count": None}
    TOLERANCE = 0.04  # |error| below which a row counts as solved (Hochreiter & Schmidhuber, 1997)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, 1), targets (B,) float
        return F.mse_loss(logits.float().squeeze(-1), batch["targets"].float())

    loss_terms, num_tokens = Classification.loss_terms, Classification.num_tokens  # one target per row

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each row's squared error, (B,) its anchor: the last position, as a classifier's."""
        err = logits.float().squeeze(-1) - batch["targets"].float()
        return err.square(), last_position(batch)

    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict:
        # squared error, sum y, sum y^2, solved rows, rows: the baseline's MSE is Var(y) from these
        total = torch.zeros(5, dtype=torch.float64, device=device)
        for batch, logits in outputs(model, batches, device, autocast):
            y = batch["targets"].double()
            err = logits.double().squeeze(-1) - y
            total += torch.stack([err.square().sum(), y.sum(), y.square().sum(),
                                  (err.abs() < self.TOLERANCE).sum().double(), y.new_tensor(float(len(y)))])
        return {"sums": total}

    def metrics(self, sums: dict) -> dict[str, float]:
        sse, sy, syy, solved, n = sums["sums"].cpu().tolist()
        n = max(n, 1.0)
        mse = sse / n
        baseline = max(syy / n - (sy / n) ** 2, 0.0)  # predicting the mean target: Var(y)
        return {"loss": mse, "mse": mse, "baseline_mse": baseline,
                "r2": 1.0 - mse / baseline if baseline > 0 else 0.0, "acc": solved / n, "count": int(n)}

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return self.metrics(self.sums(model, batches, device, autocast))
