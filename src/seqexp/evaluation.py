"""The one evaluation forward loop: task metrics, ensembles, predictions and visuals all read it.

`outputs` runs the model in eval mode without gradients over some batches and yields each
batch (on the device) with its logits; a stateful model's state is carried from one chunk of a
stream to the next exactly as in training (`batch["carry"]`). What to do with the logits --
sum a loss, count a confusion matrix, keep log-probabilities -- is the caller's.

`tracked` wraps the batches of a long evaluation (the 25,000 IMDB test reviews take minutes on a
CPU): a progress bar that shows only once the evaluation has run a few seconds, and a check
between batches that may abandon it (a stop signal after training: resuming evaluates again).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterable, Iterator, Optional

import torch
from tqdm import tqdm

SHOW_AFTER_S = 3.0  # a bar for evaluations that last; the short ones print nothing


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def tracked(batches: Iterable[dict], *, total: int, desc: str, show: bool,
            stop: Optional[Callable[[], None]] = None) -> Iterator[dict]:
    """The batches, with a progress bar when `show` (trainer.progress on the main process) and
    stderr is a terminal, as for training, and `stop()` called before each batch: it raises to
    abandon the evaluation."""
    bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True, delay=SHOW_AFTER_S,
               disable=None if show else True)  # None: off when stderr is not a terminal
    try:
        for batch in batches:
            if stop is not None:
                stop()
            yield batch
            bar.update()
    finally:
        bar.close()


@torch.no_grad()
def outputs(model: torch.nn.Module, batches: Iterable[dict], device: torch.device,
            autocast: Callable[[], AbstractContextManager] = nullcontext) -> Iterator[tuple[dict, torch.Tensor]]:
    """-> (batch, logits) per batch: logits (B, T, V) for language modelling, (B, C) for
    classification, in the autocast dtype (callers upcast). The model's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        state = None
        for batch in batches:
            batch = to_device(batch, device)
            with autocast():
                logits, new_state = model(batch["tokens"], batch.get("lengths"), state if batch["carry"] else None)
            yield batch, logits
            state = new_state
    finally:
        model.train(was_training)
