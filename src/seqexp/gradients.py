"""How far back does the loss reach? The gradient-by-distance picture of vanishing gradients.

For each row of a batch, the gradient of its loss at its answer with respect to the model's
input representation -- the output of its input embedding (`model.input_embedding()`), one
vector per position -- and that gradient's norm at every position up to the answer, binned by
the distance back from it. A vanilla RNN's norms fall off geometrically with the distance (the
loss can barely change what the model read long ago: it forgets); gates slow the fall;
attention reaches every position in one step, and a window of W cuts it to exactly zero past W.

The task says what the answer is (`task.answer_loss(logits, batch) -> (B,) losses, (B,) anchor
positions`): a language model's last prediction, a classifier's whole sequence (anchored on its
last real token, so padding never counts), the memory lab's answer positions (anchored on the
first). Distance d = anchor - t for positions t <= anchor; positions after the anchor are not
counted. Results are sums of norms and counts per distance, so batches (or ranks) add up.

Measured in eval mode (no dropout), in float32, from no carried state, with `autograd.grad` on
the embedding's output only: no parameter's `.grad` is touched and no RNG is drawn, so training
is exactly what it would be without it.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from seqexp.evaluation import to_device

DISTANCES = (1, 4, 16, 64, 256, 1024, 4096, 16384)  # logged as scalars, those within range


def input_gradient_norms(model, task, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (B, T) norms of d(sum of the rows' answer losses)/d(input embedding output), and the
    (B,) anchors. Rows are independent, so row b's gradient is that of its own loss alone."""
    captured = []

    def hook(module, inputs, output):
        x = output.detach().requires_grad_(True)  # (B, T, D): a leaf, so the gradient stops here
        captured.append(x)
        return x

    handle = model.input_embedding().register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        # cuDNN's RNN refuses a backward in eval mode; the native kernels compute the same
        with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
            logits, _ = model(batch["tokens"], batch.get("lengths"), None)
            loss, anchor = task.answer_loss(logits.float(), batch)
            if len(captured) != 1:
                raise RuntimeError(f"{type(model).__name__}.input_embedding() ran {len(captured)} times in one "
                                   f"forward; the picture needs exactly one per-position input")
            (x,) = captured
            grad = None
            if loss.requires_grad:
                (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    finally:
        handle.remove()
        model.train(was_training)
    if grad is None:  # no answer depends on the input (e.g. no row has one)
        grad = torch.zeros_like(x)
    return grad.float().norm(dim=-1), anchor


def by_distance(norms: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) norms, (B,) anchors -> (T,) float64 sums of norms and (T,) counts per distance
    d = anchor - t, over positions t <= anchor (rows with anchor -1 add nothing)."""
    B, T = norms.shape
    d = anchor[:, None] - torch.arange(T, device=norms.device)[None, :]  # (B, T)
    keep = d >= 0
    sums = torch.zeros(T, dtype=torch.float64, device=norms.device).index_add_(0, d[keep], norms[keep].double())
    counts = torch.bincount(d[keep], minlength=T)[:T]
    return sums, counts


def add(a: Optional[tuple], b: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) + (sums, counts), of any two lengths."""
    if a is None:
        return b
    n = max(len(a[0]), len(b[0]))
    pad = lambda t: torch.nn.functional.pad(t, (0, n - len(t)))  # noqa: E731
    return pad(a[0]) + pad(b[0]), pad(a[1]) + pad(b[1])


def measure(model, task, batches: Iterable[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts) per distance over some batches, on the CPU."""
    total = None
    for batch in batches:
        norms, anchor = input_gradient_norms(model, task, to_device(batch, device))
        total = add(total, by_distance(norms, anchor))
    return total[0].cpu(), total[1].cpu()


def mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean norm per distance, NaN where nothing was measured."""
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)


def take_rows(batch: dict, keep: torch.Tensor) -> dict:
    """The rows `keep` (indices) of a batch: every tensor with one entry per row is indexed."""
    B = batch["tokens"].shape[0]
    return {k: v[keep] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B else v for k, v in batch.items()}


def fixed_rows(data, rows: int) -> list[dict]:
    """About `rows` validation rows spread evenly over the split (every k-th, in the data's
    order), as non-stateful batches: the same rows at every evaluation, so the curves of
    successive evaluations compare. (IMDB's validation batches go by length: spread, they
    cover short and long reviews alike.)"""
    estimate = data.num_batches("val", stateful=False) * data.batch_size
    stride = max(1, estimate // rows)
    picked, seen, taken = [], 0, 0
    for batch in data.batches("val", stateful=False):
        B = batch["tokens"].shape[0]
        start = -seen % stride  # the first row of this batch whose global index is divisible by stride
        keep = torch.arange(min(start, B), B, stride)[: rows - taken]  # empty when start >= B
        if len(keep):
            picked.append(take_rows(batch, keep))
            taken += len(keep)
        seen += B
        if taken >= rows:
            break
    return picked
