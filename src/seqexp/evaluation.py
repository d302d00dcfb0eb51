"""The one evaluation forward loop: task metrics, ensembles, predictions and visuals all read it.

`outputs` runs the model in eval mode without gradients over some batches and yields each
batch (on the device) with its logits; a stateful model's state is carried from one chunk of a
stream to the next exactly as in training (`batch["carry"]`). What to do with the logits --
sum a loss, count a confusion matrix, keep log-probabilities -- is the caller's.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterable, Iterator

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
