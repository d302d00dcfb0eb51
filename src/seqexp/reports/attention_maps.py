"""An attention model's weights, a heat map per layer (heads side by side), for one fixed
validation example at every validation, so the maps of successive evaluations compare."""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from seqexp.reports.base import Context, Report
from seqexp.visuals import attention_figure, figure_to_array

MAX_TOKENS = 48  # beyond this the token labels on the axes are unreadable


def has_attention_maps(model: torch.nn.Module) -> bool:
    return "need_weights" in inspect.signature(model.forward).parameters


@torch.no_grad()
def attention_maps(model, tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """One example's maps: a (heads, T, T) tensor per layer, computed in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        _, maps = model(tokens, lengths, None, need_weights=True)
    finally:
        model.train(was_training)
    return [m[0] for m in maps]


class AttentionMaps(Report):
    name = "attention_maps"

    def applies(self, ctx: Context) -> bool:
        if not (self.enabled and ctx.logger.enabled and has_attention_maps(ctx.model)):
            return False
        # the fixed example: the first validation row (its first MAX_TOKENS tokens)
        batch = next(iter(ctx.data.batches("val", stateful=False)))
        n = MAX_TOKENS if batch.get("lengths") is None else min(MAX_TOKENS, int(batch["lengths"][0]))
        self.tokens = batch["tokens"][:1, :n]
        self.lengths = None if batch.get("lengths") is None else torch.tensor([n])
        self.labels = [ctx.data.decode([t]) for t in self.tokens[0].tolist()]
        return True

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        if split != "val":
            return {}
        lengths = None if self.lengths is None else self.lengths.to(ctx.device)
        for layer, w in enumerate(attention_maps(ctx.model, self.tokens.to(ctx.device), lengths)):
            fig = attention_figure(w, self.labels, f"layer {layer}, step {step}")
            ctx.logger.image(f"attention/layer{layer}", figure_to_array(fig), step)
        return {}
