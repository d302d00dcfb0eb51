"""The pure functions behind the TensorBoard figures and texts."""

from __future__ import annotations

import numpy as np
import torch

from seqexp.visuals import attention_figure, confidently_wrong, figure_to_array


def test_confidently_wrong_ranks_wrong_predictions_by_confidence():
    logits = torch.tensor([[4.0, 0.0],   # right, very sure
                           [0.0, 1.0],   # wrong (true 0), p(1) = 0.73
                           [0.0, 3.0],   # wrong (true 0), p(1) = 0.95
                           [2.0, 0.0],   # wrong (true 1), p(0) = 0.88
                           [0.0, 0.5]])  # right
    labels = torch.tensor([0, 0, 0, 1, 1])
    texts = ["a", "b", "c", "d" * 600, "e"]
    out = confidently_wrong(logits, labels, texts, k=2, names=["neg", "pos"], max_chars=100)
    assert out.startswith("3 of 5 wrong; the 2 most confident:")
    blocks = out.split("\n\n")[1:]
    assert len(blocks) == 2
    assert blocks[0] == "p=0.953  true neg, predicted pos\nc"
    assert blocks[1] == f"p=0.881  true pos, predicted neg\n{'d' * 100} [...]"  # long texts cut


def test_confidently_wrong_with_nothing_wrong():
    out = confidently_wrong(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), ["x"])
    assert out == "no wrong predictions among 1 examples"


def test_attention_figure_renders_one_panel_per_head():
    w = torch.softmax(torch.randn(3, 10, 10), -1)
    one = figure_to_array(attention_figure(w[:1], list("abcdefghi\n")))
    three = figure_to_array(attention_figure(w, list("abcdefghi\n"), "layer 0"))
    assert one.dtype == np.uint8 and one.ndim == 3 and one.shape[2] == 3
    assert three.shape[0] == one.shape[0] and three.shape[1] > 2 * one.shape[1]  # heads side by side
    assert three.std() > 10  # something was drawn, not a blank canvas
