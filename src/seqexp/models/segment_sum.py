"""Sums of log decays over every segment of a chunk: the within-chunk decay matrix of the chunked
forms that Gated DeltaNet (models/deltanet.py) and Mamba with one decay per head (models/mamba.py,
`ssd_scan`) run, exp(segment_sum(log decay))[t, s] = the decay from step s to step t.
"""

from __future__ import annotations

import math

import torch


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """x (..., Q) -> (..., Q, Q): [t, s] = x_{s+1} + ... + x_t for s <= t, -inf above (exp: 0).
    Summed segment by segment (Mamba-2's segsum), not as cumsum_t - cumsum_s: with strong decays the
    cumulative sums reach hundreds of nats, and float32's difference of two of them loses the small
    differences of neighbouring steps (log α down to -60 per step, against a float64 loop: errors of
    2e-5 of the outputs' and gradients' scale that way, 2e-7 this way)."""
    Q = x.shape[-1]
    ones = torch.ones(Q, Q, dtype=torch.bool, device=x.device)
    terms = x[..., :, None].expand(*x.shape, Q).masked_fill(~ones.tril(-1), 0.0)  # [r, s] = x_r for r > s
    return terms.cumsum(-2).masked_fill(~ones.tril(), -math.inf)
