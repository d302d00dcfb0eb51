"""What the model does, drawn for TensorBoard at every evaluation.

Pure functions make the figures and texts; `make_visuals` binds them to one run and returns
the single hook the trainer calls after each evaluation (or None when there is nothing to draw):
- attention models: a heat map per layer of the attention weights (heads side by side) for
  one fixed validation example, so the maps of successive evaluations compare directly;
- `logging.gradient_distance`: the mean norm of the loss gradient with respect to the input at
  each distance back from the answer (seqexp/gradients.py), a line plot and a few scalars;
- `logging.histograms`: weight and gradient histograms (off by default: large event files).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from seqexp.gradients import DISTANCES, GradientProbe, mean

MAX_TOKENS = 48  # attention maps: beyond this the token labels on the axes are unreadable
SHOWN = {"\n": "↵", "\t": "→", " ": "␣"}  # whitespace drawn as something visible


# ----------------------------------------------------------------------------- pure functions
def attention_figure(weights: torch.Tensor, labels: Sequence[str], title: str = ""):
    """(heads, T, T) weights of one layer -> a matplotlib Figure, one heat map per head.

    Rows are queries, columns keys; each row sums to 1.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    heads, T, _ = weights.shape
    w = weights.float().cpu().numpy()
    size, font = 2.0 + 0.05 * T, 8 if T <= 24 else 6  # inches per head; labels stay legible
    fig = Figure(figsize=(size * heads + 0.8, size + 0.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, heads, squeeze=False)[0]
    ticks = [SHOWN.get(s, s) for s in labels]
    for h, ax in enumerate(axes):
        # one colour scale for all heads, so the colour bar reads for every panel
        im = ax.imshow(w[h], cmap="viridis", vmin=0.0, vmax=float(w.max()), aspect="equal")
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(T), ticks, fontsize=font, rotation=90 if max(map(len, ticks)) > 1 else 0)
        ax.set_yticks(range(T), ticks if h == 0 else [], fontsize=font)
        ax.tick_params(length=0)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def gradient_distance_figure(norms: torch.Tensor, title: str = ""):
    """(D,) mean gradient norm at distances 0..D-1 (NaN: not measured) -> a line plot, log y.
    Exact zeros (a distance the answer cannot depend on) have no place on a log axis: they
    are drawn as a separate row of marks at the bottom."""
    from matplotlib.figure import Figure

    y = norms.double().cpu().numpy()
    d = np.arange(len(y))
    fig = Figure(figsize=(5.0, 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    positive = y > 0
    ax.plot(d[positive], y[positive], marker="." if positive.sum() < 64 else None, lw=1.2)
    zero = y == 0
    if zero.any():
        floor = y[positive].min() / 10 if positive.any() else 1e-12
        ax.plot(d[zero], np.full(zero.sum(), floor), "x", color="tab:red", ms=4, label="exactly 0")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_yscale("log")
    ax.set_xlabel("distance back from the answer (positions)")
    ax.set_ylabel("mean |d loss / d input|")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def log_gradient_distance(logger, sums: torch.Tensor, counts: torch.Tensor, step: int) -> None:
    """The picture as `gradient_distance/plot` and scalars `gradient_distance/<d>` (d in
    DISTANCES, where measured)."""
    norms = mean(sums, counts)
    logger.image("gradient_distance/plot", figure_to_array(gradient_distance_figure(norms, f"step {step}")), step)
    logger.scalars({f"gradient_distance/{d}": float(norms[d]) for d in DISTANCES
                    if d < len(counts) and counts[d] > 0}, step)


def figure_to_array(fig) -> np.ndarray:
    """Figure -> (H, W, 3) uint8 RGB, rendered off-screen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def confidently_wrong(logits: torch.Tensor, labels: torch.Tensor, texts: Sequence[str], k: int = 5,
                      names: Optional[Sequence[str]] = None, max_chars: int = 500) -> str:
    """(N, C) logits, (N,) true labels, N texts -> the k wrong predictions the model was most
    sure of, most confident first, as plain text."""
    probs = torch.softmax(logits.float(), dim=-1)
    confidence, predicted = probs.max(-1)
    wrong = (predicted != labels).nonzero().flatten()
    if len(wrong) == 0:
        return f"no wrong predictions among {len(labels)} examples"
    order = wrong[confidence[wrong].argsort(descending=True)][:k]
    name = (lambda c: names[c]) if names else str
    blocks = [f"{len(wrong)} of {len(labels)} wrong; the {len(order)} most confident:"]
    for i in order.tolist():
        text = texts[i] if len(texts[i]) <= max_chars else texts[i][:max_chars] + " [...]"
        blocks.append(f"p={confidence[i]:.3f}  true {name(int(labels[i]))}, predicted "
                      f"{name(int(predicted[i]))}\n{text}")
    return "\n\n".join(blocks)


def has_attention_maps(model: torch.nn.Module) -> bool:
    return "need_weights" in inspect.signature(model.forward).parameters


# ----------------------------------------------------------------------------- one run's hook
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


def make_visuals(cfg, *, model, data, logger, device) -> Optional[Callable[[torch.nn.Module, int, dict], None]]:
    """The hook `(model, step, val metrics) -> None` for this run (`cfg`: the logging config), or
    None when it draws nothing. A classifier's wrong examples are its task's (tasks.py)."""
    decode = getattr(data, "decode", None)
    example = None
    if cfg.attention_maps and has_attention_maps(model):
        # a fixed example: the first validation row (its first MAX_TOKENS tokens)
        batch = next(iter(data.batches("val", stateful=False)))
        n = MAX_TOKENS if batch.get("lengths") is None else min(MAX_TOKENS, int(batch["lengths"][0]))
        tokens = batch["tokens"][:1, :n]
        lengths = None if batch.get("lengths") is None else torch.tensor([n])
        labels = [decode([t]) if decode else str(t) for t in tokens[0].tolist()]
        example = (tokens, lengths, labels)
    probe = GradientProbe.make(cfg, model=model, data=data, device=device)
    if example is None and probe is None and not cfg.histograms:
        return None

    def visuals(model, step: int, metrics: dict) -> None:
        if example is not None:
            tokens, lengths, labels = example
            maps = attention_maps(model, tokens.to(device), None if lengths is None else lengths.to(device))
            for layer, w in enumerate(maps):
                fig = attention_figure(w, labels, f"layer {layer}, step {step}")
                logger.image(f"attention/layer{layer}", figure_to_array(fig), step)
        if probe is not None:
            log_gradient_distance(logger, *probe(model), step)
        if cfg.histograms:
            for name, p in model.named_parameters():
                logger.histogram(f"weights/{name}", p.detach(), step)
                if p.grad is not None:  # the last training step's (clipped) gradients
                    logger.histogram(f"grads/{name}", p.grad, step)

    return visuals
