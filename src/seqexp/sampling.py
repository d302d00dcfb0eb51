"""Text generation from a language model, one token at a time.

Recurrent models read the prompt once and then carry their state, so each new character costs
one step. Attention models re-read a sliding window of their last `context_size` tokens.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from seqexp.errors import UserError

# the defaults of every sampler (the training report, seqexp-sample): a little sharper than the
# model's own distribution, among its 40 likeliest tokens
TEMPERATURE, TOP_K = 0.8, 40


class NonFiniteSample(UserError):
    """The model's next-token scores hold NaN or infinity: its weights have diverged."""


@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int, *, temperature: float = TEMPERATURE,
             top_k: Optional[int] = TOP_K, greedy: bool = False,
             generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    """prompt (N, P) ids -> yields (N,) ids, `steps` times. N samples are drawn in parallel."""
    if not greedy and not 0 < temperature < math.inf:  # NaN fails this too
        raise UserError(f"temperature must be > 0 and finite, got {temperature}; for the likeliest "
                        f"text use greedy=true.")
    was_training = model.training
    model.eval()
    try:
        context = model.context_size  # None: recurrent, no limit
        tokens, state = prompt, None
        for _ in range(steps):
            if context is None:
                logits, state = model(tokens, None, state)  # tokens: whole prompt, then (N, 1)
            else:
                logits, _ = model(tokens[:, -context:], None, None)
            logits = logits[:, -1, :].float()  # (N, V)
            if not torch.isfinite(logits).all():  # multinomial would fail with a RuntimeError
                raise NonFiniteSample("the model's next-token scores are not finite (NaN or infinity): its "
                                      "weights have diverged. Sample from an earlier checkpoint.")
            if greedy:
                nxt = logits.argmax(-1)
            else:
                logits = logits / max(temperature, 1e-6)
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                # sampled on the CPU with our own generator: training's RNG streams stay untouched
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
            yield nxt
            nxt = nxt[:, None]
            tokens = nxt if context is None else torch.cat([tokens, nxt], dim=1)
    finally:
        model.train(was_training)


def sample_text(model, data, prompt: str, length: int, *, temperature: float = TEMPERATURE,
                top_k: Optional[int] = TOP_K, seed: int = 0, device: torch.device | str = "cpu") -> str:
    """Prompt followed by `length` generated characters (`data.encode`/`decode`)."""
    ids = data.encode(prompt or "\n")[None, :].to(device)  # (1, P)
    g = torch.Generator().manual_seed(seed)
    try:
        out = [int(t[0]) for t in generate(model, ids, length, temperature=temperature, top_k=top_k, generator=g)]
    except NonFiniteSample as e:  # during training: a sample is no reason to lose the checkpoint
        return f"{prompt}[no sample: {e}]"
    return prompt + data.decode(out)
