"""`train(cfg, run_dir) -> metrics`: build every object from the config, run the trainer.

Importable and free of Hydra's runtime, so tests call it directly with a composed config.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from seqexp import distributed, locks, resume, trust
from seqexp.build import build_data, build_model, build_optimizer, instantiate, pick_device, seed_everything
from seqexp.checkpoint import Recipe
from seqexp.config import to_container, validate
from seqexp.errors import UserError
from seqexp.files import remove_stale_tmp
from seqexp.hparams import write_run_hparams
from seqexp.logger import Logger, open_logger, tensorboard_on
from seqexp.plan import plan_line
from seqexp.preempt import stop_on_signals
from seqexp.record import closing_line
from seqexp.rundir import RunDir
from seqexp.trainer import Trainer

log = logging.getLogger("seqexp")


def model_summary(model: torch.nn.Module) -> str:
    """Parameters per top-level module, then total and trainable; a weight shared by two modules
    (tied embeddings) counts once, with the first that holds it."""
    seen, rows = set(), []
    children = [("(own)", model, False), *((n, m, True) for n, m in model.named_children())]
    for name, module, recurse in children:
        params = list(module.parameters(recurse=recurse)) if recurse else list(model.parameters(recurse=False))
        new = [p for p in params if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            count = f"{sum(p.numel() for p in new):>12,}" if new else f"{'shared':>12}"
            rows.append(f"  {name:<16} {type(module).__name__ if recurse else '':<22} {count}")
    unique = {id(p): p for p in model.parameters()}.values()
    total, trainable = sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)
    return "\n".join([f"model {type(model).__name__}: {total:,} parameters, {trainable:,} trainable", *rows])


def train(cfg: DictConfig, run_dir: str | Path | None = None, *, sweep: str | Path | None = None) -> dict:
    """With `cfg.resume` set, continues that run in its directory (run_dir may then be None).
    `sweep`: the sweep directory of a multirun's job, which writes the job's HParams itself
    (sweep/job.py), prints no text sample per job, and is a child of the sweep's MLflow run."""
    in_sweep = sweep is not None
    validate(cfg)  # cross-field checks: before any data is read
    trust.allow(cfg)  # what this run builds, its own checkpoints may build again (test split)
    ckpt = None
    if cfg.get("resume"):  # refuses a changed model/data before anything is written
        run_dir, ckpt_path, ckpt = resume.load(cfg, run_dir)
        if (record := resume.finished(cfg, ckpt, RunDir(run_dir))) is not None:
            log.info("the run has finished; nothing to do (raise trainer.max_steps or max_epochs to train on)")
            log.info(closing_line(record, run_dir))
            return record
    run = RunDir(run_dir)
    t = cfg.trainer
    # a fresh run into a directory that holds one (the command line refused it before Hydra)
    replaces = ckpt is None and not in_sweep and run.holds_results()
    if replaces and not t.overwrite:
        raise UserError(f"{run.path} holds a run already; continue it with resume={run.path}, give this run "
                        f"another directory, or set trainer.overwrite=true to move that run aside.")
    seed_everything(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    # torchrun or a multi-task submitit job: one process per device; else a Local (identities)
    dist = distributed.setup(pick_device(str(t.device)))
    device = dist.device

    # one preparation per machine: its first process downloads and tokenizes, the others then
    # read its cache (and concurrent runs on one cache take turns: locks.py)
    with locks.local_main_first(distributed.env()[1], dist.barrier):
        data = build_data(cfg.data, seed=t.seed)
    model_kwargs = data.model_kwargs()
    model = build_model(cfg.model, model_kwargs)
    if ckpt is None:
        # data-dependent set-up (the n-gram model's features): a pure function of the training
        # split, so every rank computes the same, before the optimizer is built. A resume skips
        # it: the checkpoint holds the prepared buffers and weights (fixed shapes).
        model.prepare(lambda: data.batches("train", stateful=model.stateful, epoch=0))
    model = model.to(device)
    if data.batch_size % dist.world_size:
        raise UserError(f"data.batch_size={data.batch_size} is the global batch: it must be a multiple of "
                        f"the {dist.world_size} processes.")
    dist.seed_ranks(t.seed)  # same weights (built above); each rank its own dropout masks
    optimizer = build_optimizer(cfg.optimizer, model)
    batches_per_epoch = data.num_batches("train", stateful=model.stateful)
    if batches_per_epoch < t.accumulate:
        raise UserError(f"trainer.accumulate={t.accumulate} needs that many training batches per epoch; the data "
                        f"has {batches_per_epoch}. Lower trainer.accumulate or data.batch_size.")
    steps_per_epoch = batches_per_epoch // t.accumulate  # optimizer steps
    total_steps = t.max_epochs * steps_per_epoch
    if t.max_steps != -1:
        total_steps = min(total_steps, t.max_steps)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=total_steps)
    # what every checkpoint carries besides weights and trainer state, to rebuild the run alone
    recipe = Recipe(config=to_container(cfg), model_kwargs=model_kwargs, data=data.state())
    if ckpt is not None:
        resume.check_data(recipe["data"], ckpt, ckpt_path)

    # all checks passed: only now is anything written
    if dist.is_main:
        if replaces:  # trainer.overwrite=true: never deleted
            log.warning("trainer.overwrite=true: the run that was in %s is now in %s", run.path, run.move_aside())
        run.path.mkdir(parents=True, exist_ok=True)
        locks.hold_run_dir(run.path)  # a second run in this directory is refused until this one ends
        for d in (run.path, run.checkpoints):
            remove_stale_tmp(d)  # left by a killed writer; never loaded
    # a resumed run continues its TensorBoard and MLflow runs after the checkpoint's step
    logger = open_logger(cfg, run, resumed_step=None if ckpt is None else ckpt["trainer"]["step"],
                         sweep=sweep) if dist.is_main else Logger()
    trainer = Trainer(t, model=model, data=data, optimizer=optimizer, scheduler=scheduler, logger=logger,
                      reports=cfg.logging, run_dir=run, device=device, total_steps=total_steps, recipe=recipe,
                      dist=dist, quiet=in_sweep, metric_modes=type(data).metric_modes(cfg.data))
    if ckpt is not None:
        trainer.restore(ckpt, ckpt_path)
        del ckpt  # the trainer holds its own copies now
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, trainer.p.step, trainer.p.epoch,
                 trainer.p.batch_in_epoch)
    if dist.is_main:
        log.info("%s", model_summary(model))
    log.info("%s: %s, %d parameters, %d steps (%d per epoch) on %s%s; run directory %s", data.task.name,
             type(model).__name__, trainer.num_params, total_steps, steps_per_epoch, device, dist.describe(), run)
    if dist.is_main:
        log.info(plan_line(start=trainer.p.step, total=total_steps, steps_per_epoch=steps_per_epoch,
                           accumulate=t.accumulate, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                           keep_last=t.keep_last, max_time_s=t.max_time_s,
                           after=trainer.reports.splits_after_training(),
                           target=f"{trainer.monitor.metric} {t.target:g}" if t.target is not None else ""))
    try:
        with trainer.record.ending(trainer.summary):  # however the run ends, the record says how
            # a stop signal, while training or in the evaluation after it, saves and exits 75 (preempt.py)
            with stop_on_signals(trainer.request_stop):
                trainer.fit()
                summary = trainer.finish()  # e.g. the held-out test split, once, on the best weights
        if dist.is_main:
            log.info(closing_line(summary, run))
    finally:  # this rank's last I/O, however the run ends: before the ranks leave together (below)
        logger.close()
        if dist.is_main:
            if tensorboard_on(cfg.logging) and not in_sweep:  # a sweep's job writes its own (its overrides)
                write_run_hparams(cfg, run)
            locks.release_run_dir(run.path)
    summary = trainer.summary()
    del trainer  # its DDP wrapper holds the process group, which finish() destroys
    distributed.finish()  # every rank: a barrier, then the group destroyed and gloo's threads joined
    return summary
