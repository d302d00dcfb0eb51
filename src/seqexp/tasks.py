"""What differs between tasks: the loss, the evaluation metrics, and what is logged and run
around training. A dataset names its task (`task = LanguageModeling()`); the trainer and
train() call these methods without asking which task it is.

Both heads output unnormalised logits, so both losses are cross-entropy (log-softmax + NLL).
Language-model padding is marked with target -100 and skipped by loss and metrics alike.
Metrics are sums over the whole split divided once at the end, never means of batch means:
`sums()` over some batches, `metrics()` of their sums -- under DDP the sums of every rank.

Hooks (the trainer's `logging` config says how much of each to do):
- `after_evaluation(trainer, split, metrics, step)`, with the evaluated weights in the model:
  language models log a text sample, classifiers a confusion matrix and, on the validation
  split, their most confidently wrong examples;
- `after_training(trainer)`: language models print a sample (not in a sweep's jobs: the
  trainer is `quiet`); classifiers evaluate the test split (when the data has one) on best.pt's
  weights, once (`tests_on_best`: the plan line says so beforehand).

`answer_loss(logits, batch) -> (B,) losses, (B,) anchors`: each row's loss at its answer and
where that answer is, for the gradient-by-distance picture (gradients.py): a language model's
last prediction, a classifier's example anchored on its last real token.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from seqexp import checkpoint
from seqexp.evaluation import outputs, to_device  # noqa: F401  (to_device: the trainer's too)
from seqexp.sampling import sample_text
from seqexp.visuals import confidently_wrong

log = logging.getLogger("seqexp")

IGNORE = -100  # target id that losses and metrics skip (padding of the last eval rows)


def detach_state(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


class LanguageModeling:
    name = "lm"
    head = "lm"  # what models are built for (their `task` runtime fact): (B, T, V) logits, causal
    objective, mode = "val/loss", "min"  # nats per character
    # every validation metric it logs (as val/<name>), and which way is better (None: a count)
    metric_modes = {"loss": "min", "bpc": "min", "ppl": "min", "tokens": None}
    tests_on_best = False  # after_training evaluates no test split (the plan line says so)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, T, V), targets (B, T); float32 softmax even under autocast
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=IGNORE)

    def loss_terms(self, batch: dict) -> int:
        """How many targets the mean loss averages over: every position but the padding."""
        return int((batch["targets"] != IGNORE).sum())

    def num_tokens(self, batch: dict) -> int:
        """Tokens a batch (or a rank's rows of it) trains on: one per target."""
        return self.loss_terms(batch)

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's loss at its answer, and where that answer is (gradients.py): (B,) losses,
        (B,) anchor positions (-1: the row has none). A language model's answer is its last
        prediction: the loss at the last position with a target, nothing else."""
        valid = batch["targets"] != IGNORE  # (B, T)
        anchor = last_true(valid)  # (B,)
        rows = torch.arange(len(anchor), device=anchor.device)
        at = anchor.clamp(min=0)
        loss = F.cross_entropy(logits[rows, at].float(), batch["targets"][rows, at].clamp(min=0), reduction="none")
        return loss * (anchor >= 0), anchor

    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict:
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        for batch, logits in outputs(model, batches, device, autocast):
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                     ignore_index=IGNORE, reduction="sum").double()
            count += batch["num_tokens"]
        return {"loss": total, "tokens": count}

    def metrics(self, sums: dict) -> dict[str, float]:
        count = sums["tokens"]
        loss = float(sums["loss"]) / max(count, 1)
        return {"loss": loss, "bpc": loss / math.log(2), "ppl": math.exp(min(loss, 700.0)), "tokens": count}

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return self.metrics(self.sums(model, batches, device, autocast))

    # ---------------------------------------------------------------- hooks
    @staticmethod
    def sample(trainer, step: int) -> str | None:
        """`logging.sample_chars` characters from the model's current weights, on the main
        process; None when sampling is off (sample_chars=0) or on another rank."""
        cfg = trainer.logging_cfg
        if not trainer.is_main or cfg.sample_chars <= 0:
            return None
        return sample_text(trainer.model, trainer.data, cfg.sample_prompt, cfg.sample_chars,
                           temperature=cfg.sample_temperature, top_k=cfg.sample_top_k,
                           seed=trainer.cfg.seed + step, device=trainer.device)

    def after_evaluation(self, trainer, split: str, metrics: dict, step: int) -> None:
        if trainer.logger.enabled:
            text = self.sample(trainer, step)
            if text is not None:
                trainer.logger.text("samples", text, step)

    def after_training(self, trainer) -> None:
        if trainer.quiet:  # a sweep's job: the final evaluation's sample is in TensorBoard already
            return
        with trainer.averaged():  # the weights that were validated
            text = self.sample(trainer, trainer.step)
        if text is not None:
            print(f"\n--- sample at step {trainer.step} ---\n{text}\n---", flush=True)


def last_true(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B,) the index of each row's last True, -1 where it has none."""
    t = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, t, -1).amax(1)


def last_position(batch: dict) -> torch.Tensor:
    """(B,) each row's last real position: length - 1 (T - 1 when the batch has no lengths)."""
    tokens, lengths = batch["tokens"], batch.get("lengths")
    if lengths is None:
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
    return lengths.to(tokens.device) - 1


def confusion_counts(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, C) scores and (B,) labels -> (C, C) counts: rows true class, columns predicted."""
    C = logits.shape[-1]
    return torch.bincount(y * C + logits.argmax(-1), minlength=C * C).view(C, C)


class Classification:
    name = "classify"
    head = "classify"  # (B, C) logits, one row per sequence
    objective, mode = "val/acc", "max"
    # every validation metric it logs (as val/<name>; tn/fp/fn/tp too when binary: counts, not monitored)
    metric_modes = {"loss": "min", "acc": "max", "count": None}
    tests_on_best = True  # after_training: the data's test split, if any, on best.pt (test_on_best)

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        # logits (B, C) with C >= 2 and integer labels: softmax cross-entropy matches the head
        return F.cross_entropy(logits.float(), batch["targets"])

    def loss_terms(self, batch: dict) -> int:
        """How many targets the mean loss averages over: one label per row."""
        return len(batch["targets"])

    def num_tokens(self, batch: dict) -> int:
        """Tokens a batch (or a rank's rows of it) reads: the true lengths, padding left out."""
        lengths = batch.get("lengths")
        return int(lengths.sum()) if lengths is not None else batch["tokens"].numel()

    def answer_loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each example's loss, (B,) its anchor: the last real token (length - 1), so a
        review's distances count back from its own end, never from padding (gradients.py)."""
        return F.cross_entropy(logits.float(), batch["targets"], reduction="none"), last_position(batch)

    def sums(self, model, batches: Iterable[dict], device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> dict:
        total = torch.zeros((), dtype=torch.float64, device=device)
        confusion = None  # (C, C): rows true class, columns predicted
        for batch, logits in outputs(model, batches, device, autocast):
            y = batch["targets"]
            total += F.cross_entropy(logits.float(), y, reduction="sum").double()
            counts = confusion_counts(logits, y)
            confusion = counts if confusion is None else confusion + counts
        return {"loss": total, "confusion": confusion}

    def metrics(self, sums: dict) -> dict[str, float]:
        confusion = sums["confusion"].cpu()
        n = int(confusion.sum())
        out = {"loss": float(sums["loss"]) / n, "acc": float(confusion.trace()) / n, "count": n}
        if confusion.shape == (2, 2):  # class 1 is the positive class
            out.update(tn=int(confusion[0, 0]), fp=int(confusion[0, 1]), fn=int(confusion[1, 0]),
                       tp=int(confusion[1, 1]))
        out["confusion"] = confusion.tolist()
        return out

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return self.metrics(self.sums(model, batches, device, autocast))

    # ---------------------------------------------------------------- hooks
    def after_evaluation(self, trainer, split: str, metrics: dict, step: int) -> None:
        logger, data = trainer.logger, trainer.data
        logger.confusion(f"{split}/confusion", metrics["confusion"], step, getattr(data, "classes", None))
        if split == "val" and logger.enabled and trainer.logging_cfg.wrong_examples > 0:  # (main process only)
            logits, labels, texts = self.predictions(trainer.model, data.batches(split, stateful=trainer.stateful),
                                                     trainer.device, data.decode)  # one more pass over the split
            logger.text("wrong", confidently_wrong(logits, labels, texts, trainer.logging_cfg.wrong_examples,
                                                   getattr(data, "classes", None)), step)

    @staticmethod
    def predictions(model, batches: Iterable[dict], device, decode: Callable) -> tuple:
        """(N, C) float32 logits, (N,) labels and the N texts (decoded tokens) of some batches.
        In float32 (no autocast): the confidences are ranked."""
        logits, labels, texts = [], [], []
        for batch, out in outputs(model, batches, device):
            logits.append(out.float().cpu())
            labels.append(batch["targets"].cpu())
            lengths = batch.get("lengths")
            for i, row in enumerate(batch["tokens"].tolist()):
                texts.append(decode(row[: int(lengths[i])] if lengths is not None else row))
        return torch.cat(logits), torch.cat(labels), texts

    def after_training(self, trainer) -> None:
        test_on_best(self, trainer)


def test_on_best(task, trainer) -> None:
    """The test split, held out until now (when the data has one): evaluated once, on best.pt's
    weights, the task's after_evaluation run on it; recorded as test/* in metrics.json and
    TensorBoard at the best step."""
    if "test" not in trainer.data.splits:
        return
    if trainer.dist is not None:
        trainer.dist.barrier()  # every rank reads best.pt only once the main process has written it
    trainer.model.load_state_dict(checkpoint.read(trainer.ckpt_dir / "best.pt")["model"])
    log.info("evaluating the test split on best.pt (step %s): %d batches", trainer.best_step,
             trainer.data.num_batches("test", stateful=trainer.stateful))  # a long one shows progress too
    metrics = trainer.evaluate("test")
    task.after_evaluation(trainer, "test", metrics, trainer.best_step)
    test = {f"test/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
    trainer.extra_metrics["test"] = test
    trainer.logger.scalars(test, trainer.best_step)
    log.info("test (best checkpoint, step %d): %s", trainer.best_step,
             "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))
