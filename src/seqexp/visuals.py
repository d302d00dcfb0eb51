"""What the model does, drawn: pure functions that make the figures and texts the reports log
(seqexp/reports/): attention heat maps, the gradient-by-distance plot, the most confidently
wrong examples. No pyplot: no global state, no GUI backend."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

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
