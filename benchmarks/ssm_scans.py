"""Micro-benchmark of the parallel forms that models/mamba.py and models/deltanet.py chose between:
forward + backward of the recurrence alone, on random inputs, best of `--reps` rounds.

    OMP_NUM_THREADS=1 python benchmarks/ssm_scans.py [--reps 3] [--only mamba|deltanet]

Mamba (ns per state element, B x T x E x N):
  fused Q=...    the chosen scan (mamba.selective_scan) with Q steps per chunk (SCAN_CHUNK: 8)
  materialised   exp(Δ A) and Δ B u as (B, T, E, N) tensors through minrnn's chunked scan
  ssd_per_n      Mamba-2's chunked form with Mamba's decay per (channel, state): a (Q, Q, E, N)
                 within-chunk decay (only at the small shape: its memory is Q times the state's)
  ssd P=.. Q=..  mamba.ssd_scan, the scan of model.head_dim=P: one Δ and decay per head of P
                 channels (Mamba-2's), so the chunk is matmuls (each head's Δ and A taken from its
                 first channel's inputs; the same state, E x N per row)
DeltaNet (ns per token and head, B x T, 4 heads of 64): the chunked WY form at several chunk
sizes, and the step loop.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from seqexp.models.deltanet import chunked_delta_rule, sequential_delta_rule
from seqexp.models.mamba import selective_scan, ssd_scan
from seqexp.models.minrnn import chunked_scan


def materialised(dt, u, A, Bm, Cm):
    B, T, E = u.shape
    dA = torch.exp(dt[..., None] * A).reshape(B, T, -1)  # (B, T, E * N)
    dBu = ((dt * u)[..., None] * Bm[:, :, None, :]).reshape(B, T, -1)
    return torch.einsum("bten,btn->bte", chunked_scan(dA, dBu, None).view(B, T, E, -1), Cm)


def ssd_per_n(dt, u, A, Bm, Cm, Q=16):
    B, T, E = u.shape
    N, C = A.shape[1], T // Q
    cum = (dt[..., None] * A).view(B, C, Q, E, N).cumsum(2)  # log-decay since the chunk's start
    causal = torch.ones(Q, Q, dtype=torch.bool).tril()[:, :, None, None]
    L = (cum[:, :, :, None] - cum[:, :, None, :]).masked_fill(~causal, -torch.inf).exp()  # (B, C, Q, Q, E, N)
    x = (dt * u).view(B, C, Q, E)
    Bc, Cc = Bm.view(B, C, Q, N), Cm.view(B, C, Q, N)
    y = torch.einsum("bctn,bcsn,bctsen,bcse->bcte", Cc, Bc, L, x)
    ends = torch.einsum("bcsn,bcsen,bcse->bcen", Bc, torch.exp(cum[:, :, -1:] - cum), x)  # each chunk from 0
    h, entering = torch.zeros(B, E, N), []
    for c in range(C):
        entering.append(h)
        h = torch.exp(cum[:, c, -1]) * h + ends[:, c]
    y = y + torch.einsum("bctn,bcten,bcen->bcte", Cc, cum.exp(), torch.stack(entering, 1))
    return y.reshape(B, T, E)


def timed(forms: dict, make_inputs, reps: int) -> dict:
    """Best forward + backward time (s) of each form; rounds rotate over the forms, so that a slow
    spell of a shared machine hits all of them alike."""
    inputs = {name: [x.requires_grad_() for x in make_inputs()] for name in forms}
    best = {name: float("inf") for name in forms}
    for r in range(reps + 1):  # round 0 warms up
        for name, fn in forms.items():
            t0 = time.perf_counter()
            out = fn(*inputs[name])
            out.backward(torch.ones_like(out))
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def mamba(reps):
    for B, T, E, N in [(8, 256, 256, 16), (32, 128, 512, 16)]:
        inputs = lambda: [torch.rand(B, T, E) * 0.1, torch.randn(B, T, E), -torch.arange(1.0, N + 1).repeat(E, 1),
                          torch.randn(B, T, N), torch.randn(B, T, N)]
        forms = {f"fused Q={Q}": (lambda Q: lambda *a: selective_scan(*a, chunk=Q)[0])(Q) for Q in (1, 4, 8, 16, 64)}
        forms["materialised"] = materialised
        if B * T * E * N * 16 <= 3e8:
            forms["ssd_per_n"] = ssd_per_n
        for P, Q in [(64, 16), (64, 32), (64, 64), (16, 32)]:
            forms[f"ssd P={P} Q={Q}"] = (lambda P, Q: lambda dt, u, A, Bm, Cm: ssd_scan(
                dt[..., ::P], u, A[::P, 0], Bm, Cm, chunk=Q)[0])(P, Q)
        for name, s in timed(forms, inputs, reps).items():
            print(f"| mamba | {B}x{T}x{E}x{N} | {name} | {s / (B * T * E * N) * 1e9:.1f} ns/state element |")


def deltanet(reps):
    H, K = 4, 64
    for B, T in [(8, 512), (32, 128)]:
        inputs = lambda: [torch.randn(B, H, T, K), F.normalize(torch.randn(B, H, T, K), dim=-1),
                          torch.randn(B, H, T, K), -torch.rand(B, H, T) * 0.1, torch.rand(B, H, T)]
        forms = {f"chunked Q={Q}": (lambda Q: lambda *a: chunked_delta_rule(*a, None, Q)[0])(Q) for Q in (16, 32, 64)}
        forms["sequential"] = lambda *a: sequential_delta_rule(*a, None)[0]
        for name, s in timed(forms, inputs, reps).items():
            print(f"| deltanet | {B}x{T}, {H}x{K} | {name} | {s / (B * T * H) * 1e9:.0f} ns/token/head |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", choices=["mamba", "deltanet"])
    a = p.parse_args()
    torch.manual_seed(0)
    if a.only != "deltanet":
        mamba(a.reps)
    if a.only != "mamba":
        deltanet(a.reps)
