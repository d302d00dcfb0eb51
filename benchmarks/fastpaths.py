"""Speed-ups of the fast paths, each against its slow twin, measured side by side.

For every pair the two variants train the same model on the same random batch, alternating
A B A B ... (`--rounds` pairs of `--steps` steps each, after a warm-up), and the table gives
the median time per step of each and the median of the per-pair ratios.

- fused attention: `F.scaled_dot_product_attention` against the explicit softmax(QK^T)V path
- autocast bf16 (or fp16 with a grad scaler on CUDA) against fp32
- `torch.compile` against eager (compilation itself excluded: it happens in the warm-up)
- the recurrent classifier's two exact paths: packed sequences (CUDA's default) against padded
  input with each row reversed within its length for the backward direction (the CPU's)

    python benchmarks/fastpaths.py [--device cpu] [--steps 5] [--rounds 5] [--only attention,autocast]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seqexp.models.attention import AttentionModel
from seqexp.models.recurrent import RecurrentModel

V = 96


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def lm_step(model, opt, x, device, dtype=None, scaler=None, **fwd):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits, _ = model(x[:, :-1], **fwd)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def timed(fn, steps, device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def compare(name, a, b, steps, rounds, device, warmup=2) -> dict:
    for _ in range(warmup):
        a(), b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(timed(a, steps, device))
        tb.append(timed(b, steps, device))
    return {"pair": name, "fast_ms": 1000 * statistics.median(ta), "slow_ms": 1000 * statistics.median(tb),
            "speedup": statistics.median(s / f for f, s in zip(ta, tb)),
            "min": min(s / f for f, s in zip(ta, tb)), "max": max(s / f for f, s in zip(ta, tb))}


def attention_model(T, device):
    torch.manual_seed(0)
    return AttentionModel(vocab_size=V, num_outputs=V, head="lm", max_len=T, d_model=128, n_heads=4,
                          n_layers=4, dropout=0.0).to(device)


def lstm_model(device, head="lm", bidirectional=False):
    torch.manual_seed(0)
    return RecurrentModel(vocab_size=V, num_outputs=V if head == "lm" else 2, head=head, cell="lstm",
                          embed_dim=64, hidden_size=256, num_layers=2 if head == "lm" else 1,
                          bidirectional=bidirectional, pooling="max").to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--only", default="attention,autocast,compile,packing")
    a = p.parse_args()
    device, B, T = torch.device(a.device), a.batch, a.seq_len
    x = torch.randint(V, (B, T + 1), device=device)
    low = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    rows = []
    todo = a.only.split(",")

    if "attention" in todo:
        m = attention_model(T, device)
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        rows.append(compare(f"fused SDPA vs explicit attention (attention, T={T})",
                            lambda: lm_step(m, opt, x, device), lambda: lm_step(m, opt, x, device, need_weights=True),
                            a.steps, a.rounds, device))
    if "autocast" in todo:
        for name, make in (("attention", lambda: attention_model(T, device)), ("lstm", lambda: lstm_model(device))):
            m = make()
            opt = torch.optim.AdamW(m.parameters(), 1e-3)
            scaler = torch.amp.GradScaler(device.type) if low is torch.float16 else None
            rows.append(compare(f"autocast {str(low)[6:]} vs fp32 ({name})",
                                lambda: lm_step(m, opt, x, device, dtype=low, scaler=scaler),
                                lambda: lm_step(m, opt, x, device), a.steps, a.rounds, device))
    if "compile" in todo:
        for name, make in (("attention", lambda: attention_model(T, device)), ("lstm", lambda: lstm_model(device))):
            m = make()
            c = torch.compile(m)
            opt = torch.optim.AdamW(m.parameters(), 1e-3)
            rows.append(compare(f"torch.compile vs eager ({name})", lambda: lm_step(c, opt, x, device),
                                lambda: lm_step(m, opt, x, device), a.steps, a.rounds, device))
    if "packing" in todo:
        # Both paths compute the same logits (tests/test_models.py); which is faster depends on
        # the device: packing lets cuDNN skip the padding, while torch's CPU recurrence slices a
        # packed batch once per step and pays O(T^2) in the backward pass.
        m = lstm_model(device, head="classify", bidirectional=True)
        opt = torch.optim.AdamW(m.parameters(), 1e-3)
        g = torch.Generator().manual_seed(0)
        # IMDB-like lengths within one length bucket: similar, not equal
        lengths = torch.randint(int(0.9 * T), T + 1, (B,), generator=g)
        tokens = torch.randint(1, V, (B, T), generator=g).to(device)
        y = torch.randint(2, (B,), generator=g).to(device)

        def cls_step(pack):
            m.pack = pack
            logits, _ = m(tokens, lengths)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fast, slow = (True, False) if device.type == "cuda" else (False, True)
        name = {True: "packed", False: "padded, per-row reversal"}
        rows.append(compare(f"{name[fast]} vs {name[slow]} (BiLSTM classifier, lengths {int(0.9 * T)}-{T})",
                            lambda: cls_step(fast), lambda: cls_step(slow), a.steps, a.rounds, device))

    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{hw}; torch {torch.__version__}; batch {B}, seq_len {T}; {a.rounds} rounds of {a.steps} steps")
    print("| fast path vs slow twin | fast ms/step | slow ms/step | speed-up (median) | min | max |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pair']} | {r['fast_ms']:.1f} | {r['slow_ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['min']:.2f} | {r['max']:.2f} |")


if __name__ == "__main__":
    main()
