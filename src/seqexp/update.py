"""One optimizer step: K micro-batches forward and backward, then the update or, for a
non-finite step, none (guard.py) -- the same path in one process or many (distributed.py).

Gradient accumulation (`trainer.accumulate` = K): one step takes K consecutive batches of the
data; each micro-batch's mean loss is weighted by its share of the K micro-batches' loss terms
(task.loss_terms: targets for language models, examples for classifiers), so the step's loss is
the mean over all K together and K micro-batches of B rows update the weights as one batch of
K x B rows would. Stateful BPTT: micro-batch k of step s is chunk s x K + k of every stream, its
state carried (detached) from micro-batch k - 1. Under DDP the gradients are all-reduced once
per step: the first K - 1 backward passes run under `no_sync`.

`trainer.precision`: bf16/fp16 run the forward pass under autocast; fp16 adds loss scaling,
whose own inf checks skip overflowing steps. `trainer.compile`: torch.compile compiles at the
first forward and backward; a model it cannot compile trains eager from there, with one warning.
"""

from __future__ import annotations

import logging

import torch

from seqexp.errors import UserError
from seqexp.evaluation import to_device
from seqexp.guard import poison_unless

log = logging.getLogger("seqexp")


def detach_state(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def zeros_unless(ok: torch.Tensor, state):
    """The carried state where ok, else zeros (a tensor or a tuple of them; decided on the device)."""
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(zeros_unless(ok, s) for s in state)
    return torch.where(ok, state, 0.0)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Update:
    def __init__(self, cfg, *, model: torch.nn.Module, optimizer, scheduler, task, dist, guard, average,
                 device: torch.device):
        self.model, self.optimizer, self.scheduler, self.task = model, optimizer, scheduler, task
        self.dist, self.guard, self.average, self.device = dist, guard, average, device
        self.eager = dist.wrap(model)  # under DDP the wrapper, whose backward all-reduces
        self.net = torch.compile(self.eager) if cfg.compile else self.eager
        self.compile_pending = bool(cfg.compile)
        # every module, wrappers included: a step sets training mode only when something (an
        # evaluation) left one in eval mode; net.train() walks them all (~0.1 ms a step on a CPU)
        self.modules = list(self.net.modules())
        dtype = AUTOCAST.get(str(cfg.precision))
        self.autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        self.clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.params = [p for p in model.parameters() if p.requires_grad]  # tied weights once

    def __call__(self, micro: list[dict], carried, step: int):
        """Step number `step` on its micro-batches, from the carried state -> (the state to carry,
        the step's loss, gradient norm and ok flag: device tensors, read later by the trainer)."""
        if not self.compile_pending:
            return self.step(micro, carried, step)
        self.compile_pending = False
        try:
            return self.step(micro, carried, step)
        except UserError:  # e.g. nonfinite=stop: not about compiling
            raise
        except Exception as e:
            reason = next((line for line in str(e).splitlines() if line.strip()), "")[:200]
            log.warning("trainer.compile: %s does not compile (%s: %s); training eager",
                        type(self.model).__name__, type(e).__name__, reason)
            self.net = self.eager
            return self.step(micro, carried, step)

    def step(self, micro: list[dict], carried, step: int):
        if not all(m.training for m in self.modules):
            self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        # the step's loss is the mean over the loss terms of all K micro-batches: each micro-batch's
        # mean loss weighs its share of them (under DDP the global batch's terms)
        terms = [self.dist.batch_terms(b, self.task) for b in micro] if len(micro) > 1 else [1]
        total = sum(terms)
        loss = torch.zeros((), device=self.device)
        for k, batch in enumerate(micro):
            batch = to_device(batch, self.device)
            state = detach_state(carried) if batch["carry"] else None  # truncate BPTT here
            with self.dist.no_sync(self.net, last=k == len(micro) - 1):
                with self.autocast():
                    logits, carried = self.net(batch["tokens"], batch.get("lengths"), state)
                part = self.dist.scale_loss(self.task.loss(logits, batch), batch)
                if len(micro) > 1:
                    part = part * (terms[k] / total if total else 1.0 / len(micro))
                self.scaler.scale(part).backward()
            loss = loss + part.detach()
        if self.scaler.is_enabled():
            # fp16: an overflowing gradient is the scaler's to skip (and to lower its scale for), so
            # the loss and the weights decide here; a bad step's gradients are made NaN so that the
            # scaler's own inf check skips it (on the device for fused optimizers)
            ok = self.dist.all(self.guard.verdict(loss))
            poison_unless([p.grad for p in self.params if p.grad is not None], ok)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not self.scaler.is_enabled():
            ok = self.dist.all(self.guard.verdict(loss, grad_norm))  # a NaN on one rank skips on all
        # decided on the device, before the update: neither the weights nor the optimizer state
        # (nor so any checkpoint) ever see a NaN; the host reads the verdict later (guard.settle)
        self.guard.record(step, ok, loss, grad_norm)
        self.guard.update(self.scaler, ok)
        self.scaler.update()
        self.scheduler.step()  # on a skipped step too, as always: the schedule counts steps
        self.average.update(ok)  # a skipped step leaves the average as it is
        # a state that produced NaN is no start for the next chunk: zeros instead (what None means)
        carried = zeros_unless(ok, detach_state(carried)) if self.model.stateful else None
        return carried, loss, grad_norm, ok
