"""`train(cfg, run_dir) -> metrics`: build every object from the config, run the trainer.

Importable and free of Hydra's runtime, so tests call it directly with a composed config.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from seqexp import distributed, resume, trust
from seqexp.build import build_optimizer, instantiate, pick_device, seed_everything
from seqexp.checkpoint import load_checkpoint, remove_stale_tmp
from seqexp.config import to_container, validate
from seqexp.data.shard import Sharded
from seqexp.errors import UserError
from seqexp.logger import Logger
from seqexp.preempt import stop_on_signals
from seqexp.sampling import sample_text
from seqexp.tasks import TASKS
from seqexp.trainer import Trainer
from seqexp.visuals import make_visuals

log = logging.getLogger("seqexp")


def evaluate_test(trainer: Trainer, logger: Logger) -> None:
    """Load best.pt's weights, evaluate the test split, record test/* in metrics.json and TensorBoard."""
    if trainer.dist is not None:
        trainer.dist.barrier()  # every rank reads best.pt only once the main process has written it
    trainer.model.load_state_dict(load_checkpoint(trainer.ckpt_dir / "best.pt")["model"])
    metrics = trainer.evaluate("test")
    test = {f"test/{k}": v for k, v in metrics.items() if not isinstance(v, list)}
    trainer.extra_metrics["test"] = test
    logger.scalars(test, trainer.best_step)
    if "confusion" in metrics:
        logger.confusion("test/confusion", metrics["confusion"], trainer.best_step, getattr(trainer.data, "classes", None))
    log.info("test (best checkpoint, step %d): %s", trainer.best_step,
             "  ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, float)))


def train(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """With `cfg.resume` set, continues that run in its directory (run_dir may then be None)."""
    validate(cfg)  # cross-field checks: before any data is read
    trust.allow(cfg)  # what this run builds, its own checkpoints may build again (test split)
    ckpt = None
    if cfg.get("resume"):  # refuses a changed model/data before anything is written
        run_dir, ckpt_path, ckpt = resume.load(cfg, run_dir)
    run_dir = Path(run_dir)
    t = cfg.trainer
    seed_everything(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    device = pick_device(str(t.device))
    dist = distributed.setup(device)  # None unless started by torchrun or as a multi-task submitit job
    if dist is not None:
        device = dist.device

    data = instantiate(cfg.data, seed=t.seed)
    model_kwargs = data.model_kwargs()
    model = instantiate(cfg.model, **model_kwargs)
    if hasattr(model, "prepare") and ckpt is None:
        # data-dependent initialisation (the n-gram model's features): a pure function of the
        # full training split, so every rank computes the same, before the optimizer is built.
        # A resume skips it: the checkpoint holds the prepared buffers and weights (fixed shapes).
        t0 = time.perf_counter()
        model.prepare(data.batches("train", epoch=0))
        log.info("model prepared from the training split in %.1f s", time.perf_counter() - t0)
    model = model.to(device)
    main = dist is None or dist.is_main  # the process that writes files and logs
    trainer_data = data  # what the trainer iterates: under DDP, this rank's rows of every batch
    if dist is not None:
        if data.batch_size % dist.world_size:
            raise UserError(f"data.batch_size={data.batch_size} is the global batch: it must be a multiple of "
                            f"the {dist.world_size} processes.")
        trainer_data = Sharded(data, dist.rank, dist.world_size)
        seed_everything(t.seed + 1_000_003 * dist.rank)  # same weights (built above); own dropout masks
    task = TASKS[data.task]()
    optimizer = build_optimizer(cfg.optimizer, model)
    steps_per_epoch = data.num_batches("train", stateful=model.stateful)
    total_steps = t.max_epochs * steps_per_epoch
    if t.max_steps != -1:
        total_steps = min(total_steps, t.max_steps)
    scheduler = instantiate(cfg.scheduler, optimizer=optimizer, total_steps=total_steps)
    meta = {"config": to_container(cfg), "model_kwargs": model_kwargs, "data": data.state()}
    if ckpt is not None:
        resume.check_data(meta["data"], ckpt, ckpt_path)

    sampler = None
    lg = cfg.logging
    if data.task == "lm" and lg.sample_chars > 0 and main:
        def sampler(m, step):
            return sample_text(m, data, lg.sample_prompt, lg.sample_chars, temperature=lg.sample_temperature,
                               top_k=lg.sample_top_k, seed=t.seed + step, device=device)

    # all checks passed: only now is anything written
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for d in (run_dir, run_dir / "checkpoints"):
            remove_stale_tmp(d)  # left by a killed writer; never loaded
    # a resumed run appends to its TensorBoard run; events after the checkpoint are dropped
    purge_step = ckpt["trainer"]["step"] + 1 if ckpt is not None else None
    logger = Logger(run_dir, enabled=lg.tensorboard and main, purge_step=purge_step)
    visuals = make_visuals(lg, model=model, data=data, logger=logger, device=device) if lg.tensorboard and main else None
    trainer = Trainer(t, model=model, task=task, data=trainer_data, optimizer=optimizer, scheduler=scheduler,
                      logger=logger, run_dir=run_dir, device=device, total_steps=total_steps, meta=meta,
                      sampler=sampler, visuals=visuals, dist=dist)
    if ckpt is not None:
        trainer.restore(ckpt, ckpt_path)
        del ckpt  # the trainer holds its own copies now
        log.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, trainer.step, trainer.epoch,
                 trainer.batch_in_epoch)
    log.info("%s: %s, %d parameters, %d steps (%d per epoch) on %s%s; run dir %s", data.task,
             type(model).__name__, trainer.num_params, total_steps, steps_per_epoch, device,
             f" (rank {dist.rank} of {dist.world_size})" if dist else "", run_dir)
    try:
        with stop_on_signals(trainer.request_stop):
            trainer.fit()
        if "test" in getattr(data, "splits", {}):  # held out until now: evaluated once, on the best weights
            evaluate_test(trainer, logger)
        trainer.write_metrics("finished")
        if dist is not None:
            # leave together: a rank tearing down its process group while rank 0 still writes
            # was seen to abort ("terminate called without an active exception")
            dist.barrier()
    finally:
        logger.close()
    metrics = trainer.summary()
    if sampler is not None:
        with trainer.averaged():  # the weights that were validated
            print(f"\n--- sample at step {trainer.step} ---\n{sampler(model, trainer.step)}\n---", flush=True)
    return metrics
