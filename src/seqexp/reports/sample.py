"""A language model's own text: a sample at every validation, printed once more at the end."""

from __future__ import annotations

from seqexp.reports.base import Context, Report
from seqexp.sampling import TEMPERATURE, TOP_K, sample_text
from seqexp.tasks.lm import LanguageModeling


class TextSample(Report):
    name = "sample"

    def __init__(self, enabled: bool = True,
                 chars: int = 300,  # characters generated at each evaluation (0: none)
                 prompt: str = "\n", temperature: float = TEMPERATURE, top_k: int = TOP_K):
        super().__init__(enabled)
        self.chars, self.prompt, self.temperature, self.top_k = chars, prompt, temperature, top_k

    def applies(self, ctx: Context) -> bool:
        # a next-token model of text the data can encode (the memory lab's tasks have no text)
        return self.enabled and self.chars > 0 and isinstance(ctx.data.task, LanguageModeling) \
            and ctx.data.can("encode")

    def text(self, ctx: Context, step: int) -> str:
        # its own generator, seeded by the step: training's RNG streams are never touched
        return sample_text(ctx.model, ctx.data, self.prompt, self.chars, temperature=self.temperature,
                           top_k=self.top_k, seed=ctx.seed + step, device=ctx.device)

    def after_evaluation(self, ctx: Context, split: str, metrics: dict, step: int) -> dict:
        if ctx.logger.enabled and split == "val":
            ctx.logger.text("samples", self.text(ctx, step), step)
        return {}

    def after_training(self, ctx: Context) -> dict:
        if ctx.is_main and not ctx.quiet:  # a sweep's job: its last sample is in TensorBoard already
            print(f"\n--- sample at step {ctx.step} ---\n{self.text(ctx, ctx.step)}\n---", flush=True)
        return {}
