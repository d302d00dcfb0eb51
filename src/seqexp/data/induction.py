"""Induction heads (Olsson et al., 2022; as a synthetic task: Fu et al., 2023, H3, section 3.1, and
Gu & Dao, 2023, Mamba, Table 2): after a special token comes some symbol; at the end the special
token comes again, and the model must say which symbol followed it the first time. No files,
no download.

    tokens   c a ! d b a c ... b a !      (length T; "!" the special token, once inside, once last)
    target   - - - - - - - ... - - d      (the symbol after the first "!", at the last position)

The first "!" is anywhere in positions 0..T-3, so the distance back is 2..T-1, uniform. The rest
are random symbols (the special token never among them). One answer per sequence, so `exact`
and `acc` agree. Trained at `length` and evaluated at `data.eval_lengths` (2x..16x: the splits
`test@<L>`), it asks whether what was learnt is the lookup itself -- which works at any length
-- or a pattern of positions seen in training: attention's learned positions past the training
length are never trained (Mamba's Table 2: attention with rotary positions falls to 31.3% at 4x
the training length, the selective SSM holds 100% to 2^20).

Everything else -- seeds, disjoint splits, fresh training sets, eval lengths, batches -- is the
memory lab's (memory.MemoryData).
"""

from __future__ import annotations

import torch

from seqexp.data.memory import MemoryData, letters
from seqexp.errors import require
from seqexp.tasks.base import IGNORE

SPECIAL = 0  # the token whose successor is asked for


class InductionData(MemoryData):
    kind = "induction"

    def __init__(self, *,
                 length: int = 32,  # T: the whole sequence (Mamba: 256, tested to 2^20)
                 alphabet: int = 16,  # distinct symbols besides the special token (Mamba: 16)
                 **common):
        self.alphabet = alphabet
        self.names = ["!"] + letters(alphabet)
        super().__init__(length=length, **common)

    @classmethod
    def check_config(cls, cfg) -> None:
        cls.check_common(cfg)
        require(cfg.alphabet >= 2, f"data.alphabet must be >= 2, got {cfg.alphabet}.")
        require(min([cfg.length, *cfg.eval_lengths]) >= 3, "data.length and data.eval_lengths must be >= 3 (the "
                "special token, its successor, the special token again).")

    def total_length(self, length: int) -> int:
        return length

    def generate(self, n: int, length: int, g: torch.Generator) -> dict:
        tokens = torch.randint(SPECIAL + 1, SPECIAL + 1 + self.alphabet, (n, length), generator=g)
        first = torch.randint(0, length - 2, (n, 1), generator=g)  # (n, 1): its successor is before the end
        tokens.scatter_(1, first, SPECIAL)
        tokens[:, -1] = SPECIAL
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = tokens.gather(1, first + 1).squeeze(1)
        return {"tokens": tokens, "targets": targets}
