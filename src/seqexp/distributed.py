"""Data parallelism: one process per device, started by torchrun (or by submitit on SLURM).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT; a job of Hydra's submitit
launcher with tasks_per_node > 1 has submitit's job environment instead, which `env()`
exports as the same variables. Without them a process gets a `Local`, whose operations are
identities: it creates no process group, wraps no model and pays for no collective, and the
trainer never asks which of the two it has.

- `data.batch_size` is the global batch: each rank takes its rows of every batch
  (`Sharded`), so K processes see the batches one process would, and the step count,
  schedule and data position in checkpoints do not depend on K.
- One process group serves both devices ("cpu:gloo,cuda:nccl"): CUDA tensors (DDP's
  gradients, the per-step flags) go through NCCL, Python objects through gloo.
- Decisions that change control flow (a non-finite step, a stop signal, the time budget) are
  all-reduced, so every rank takes the same branch and no collective is left waiting.
- The trainer's state in a checkpoint holds the global carried RNN state and each rank's RNG and
  logging window (`Dist.gather_trainer_state`); a resume under any number of processes splits
  it again (`Dist.shard_trainer_state`). The model says where a state's rows are
  (`SequenceModel.state_batch_dim`).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from seqexp.build import seed_everything
from seqexp.checkpoint import rng_state, set_rng_state
from seqexp.errors import UserError, require


def env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) of this process; (0, 0, 1) when not launched in parallel."""
    if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:  # tasks_per_node x nodes processes: one job
            # CUDA_VISIBLE_DEVICES is left as SLURM set it; the device is picked by local rank
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def launched() -> bool:
    return env()[2] > 1


def rows(n: int, rank: int, world_size: int) -> slice:
    """This rank's share of n rows: contiguous, sizes differ by at most one."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


@dataclass
class Local:
    """A single process: every operation is the identity, so the trainer has one straight path
    whether or not it runs under DDP (no collective, no wrapper, nothing paid for)."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return ""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def shard(self, data):
        """What this process iterates of the data: all of it."""
        return data

    def seed_ranks(self, seed: int) -> None:
        """Give each rank its own dropout masks (the weights are built already): one rank, nothing."""

    # ------------------------------------------------------------ one optimizer step
    def no_sync(self, net: torch.nn.Module, last: bool) -> AbstractContextManager:
        """Around a micro-batch's backward: DDP all-reduces the gradients in the last one only."""
        return nullcontext()

    def scale_loss(self, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """This rank's share of the global batch's mean loss (data sharding: `Sharded`)."""
        return loss

    def batch_terms(self, batch: dict, task) -> int:
        """The loss terms of the global batch this batch belongs to (weighs micro-batches)."""
        return task.loss_terms(batch)

    # ------------------------------------------------------------ decisions and metrics
    def any(self, flag: bool) -> bool:
        return flag

    def all(self, ok: torch.Tensor) -> torch.Tensor:
        return ok

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum(self, sums: dict) -> dict:
        return sums

    def barrier(self) -> None:
        pass

    # ------------------------------------------------------------ the trainer's state in checkpoints
    def gather_trainer_state(self, carried, window: torch.Tensor, batch_dim: Optional[int]) -> dict:
        return {}

    def shard_trainer_state(self, state: dict, carried, window: torch.Tensor, seed: int, step: int,
                            batch_dim: Optional[int]):
        return carried, window


@dataclass
class Dist(Local):
    """One of several processes (torchrun, or a multi-task submitit job)."""

    def describe(self) -> str:
        return f" (rank {self.rank} of {self.world_size})"

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP averages gradients over ranks during backward(); it broadcasts rank 0's weights now."""
        # checked here, before training: the carried state is sharded by the model's layout
        require(not model.stateful or model.state_batch_dim is not None,
                f"{type(model).__name__} is stateful but declares no state_batch_dim (the dim of its "
                "carried state that holds the batch's rows), which data parallelism needs.")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def shard(self, data):
        return Sharded(data, self.rank, self.world_size)

    def seed_ranks(self, seed: int) -> None:
        seed_everything(seed + 1_000_003 * self.rank)

    def no_sync(self, net: torch.nn.Module, last: bool) -> AbstractContextManager:
        return nullcontext() if last else net.no_sync()

    def scale_loss(self, loss: torch.Tensor, batch: dict) -> torch.Tensor:
        return loss * batch["loss_scale"]

    def batch_terms(self, batch: dict, task) -> int:
        return batch["batch_terms"]

    # ------------------------------------------------------------ decisions and metrics
    def any(self, flag: bool) -> bool:
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def all(self, ok: torch.Tensor) -> torch.Tensor:
        t = ok.float().reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t[0] > 0

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def gather(self, obj: Any) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum(self, sums: dict) -> dict:
        """Evaluation sums of every rank added up (a rank that saw no batch has none)."""
        parts = self.gather({k: v.cpu() if torch.is_tensor(v) else v for k, v in sums.items()})
        total = {}
        for part in parts:
            for k, v in part.items():
                total[k] = total[k] + v if k in total else v
        return total

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------ the trainer's state in checkpoints
    def gather_trainer_state(self, carried, window: torch.Tensor, batch_dim: Optional[int]) -> dict:
        """A collective (every rank calls it): the global carried state (rows on `batch_dim`: the
        model's state_batch_dim), and what each rank keeps for itself -- its RNG (dropout masks
        differ by rank) and its logging window."""
        ranks = self.gather({"rng": rng_state(), "window": window.cpu()})
        return {"carried": self.gather_state(carried, batch_dim), "ranks": ranks}

    def shard_trainer_state(self, state: dict, carried, window: torch.Tensor, seed: int, step: int,
                            batch_dim: Optional[int]):
        """-> (this rank's carried state, its logging window), from a checkpoint's trainer `state`
        whose global `carried` state (rows on `batch_dim`) is given. With as many processes as the
        checkpoint had, each rank's own RNG and window come back (exact resume); otherwise fresh
        per-rank RNG streams."""
        carried = self.shard_state(carried, batch_dim)
        ranks = state.get("ranks", [])
        if len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank]["rng"])
            window = ranks[self.rank]["window"].to(self.device)
        elif self.rank > 0:
            torch.manual_seed(seed + 1_000_003 * self.rank + step)
        return carried, window

    # ------------------------------------------------------------ carried RNN state
    def gather_state(self, state, batch_dim: Optional[int]):
        """Every rank's rows (on `batch_dim`) of the carried state, in rank order: the global state."""
        if state is None:
            return None
        if isinstance(state, tuple):
            return tuple(self.gather_state(s, batch_dim) for s in state)
        parts = [torch.empty_like(state) for _ in range(self.world_size)]
        dist.all_gather(parts, state.contiguous())
        return torch.cat(parts, dim=batch_dim)

    def shard_state(self, state, batch_dim: Optional[int]):
        """This rank's rows (on `batch_dim`) of a global carried state (saved by any number of
        processes)."""
        if state is None:
            return None
        if isinstance(state, tuple):
            return tuple(self.shard_state(s, batch_dim) for s in state)
        s = rows(state.shape[batch_dim], self.rank, self.world_size)
        return state.narrow(batch_dim, s.start, s.stop - s.start).contiguous()


# ----------------------------------------------------------------------------- one rank's rows
class Sharded:
    """One rank's share of any data object's batches: rows [rank * B // W, (rank + 1) * B // W).

    Wraps the batches() contract (data/base.py), so every data kind shards the same way without
    knowing about processes:
    - training: `data.batch_size` stays the global batch. Stateful BPTT batches hold chunk i of
      every stream, so a rank owns the same streams in every batch; window and classification
      batches are split by rows. `loss_scale` (world_size x this rank's share of the batch's loss
      terms) makes DDP's average of per-rank mean losses the mean over the global batch, even
      when the shares differ (a short last batch). `batch_terms` (the global batch's loss terms)
      weighs a micro-batch within an accumulated step the same on every rank.
    - evaluation: each rank takes its rows too; metrics are sums, added over ranks once
      (Dist.sum), so they cover the split exactly once. A rank left with no rows skips the batch
      (evaluation runs the plain module: no collective in it).
    Everything but batches() is the wrapped object's."""

    def __init__(self, data, rank: int, world_size: int):
        self.data, self.rank, self.world_size = data, rank, world_size

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batches(self, split: str, *, stateful: bool, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        for batch in self.data.batches(split, stateful=stateful, epoch=epoch, start=start):
            n = batch["tokens"].shape[0]
            s = rows(n, self.rank, self.world_size)
            if s.start == s.stop:
                if split == "train":  # every rank must take every step: DDP's all-reduce waits for all
                    raise UserError(f"a training batch of {n} rows cannot be split over {self.world_size} "
                                    f"processes; use a data.batch_size that is a multiple of {self.world_size}.")
                continue
            part = {k: v[s] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v
                    for k, v in batch.items()}
            task = self.data.task  # it knows what a token and a loss term are in its batches
            part["num_tokens"] = task.num_tokens(part)
            if split == "train":
                total = task.loss_terms(batch)
                part["loss_scale"] = self.world_size * task.loss_terms(part) / total if total else 1.0
                part["batch_terms"] = total
            yield part


_owned = False  # whether this module created the process group (then it also destroys it)


def setup(device: Optional[torch.device] = None) -> Local:
    """Join the process group (once per process); a `Local` in a single process.

    `device` is the one the config chose (train.pick_device); on CUDA each rank takes its own.
    """
    global _owned
    rank, local_rank, world_size = env()
    if world_size == 1:
        return Local(device=device or torch.device("cpu"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # imported before the group exists: its functions take `group=group.WORLD` as a default,
        # evaluated on import. Imported after (DDP's constructor imports it, through torch._dynamo),
        # they would hold the default group: destroy_process_group could not free it, and gloo's C++
        # threads would be joined only by the interpreter's last garbage collection, as it exits.
        importlib.import_module("torch.distributed.nn.functional")
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        _owned = True
        atexit.register(teardown)  # a run that failed; a finished one calls finish()
    if device is not None and device.type == "cuda":
        # LOCAL_RANK among the visible GPUs (just one when SLURM binds a GPU per task)
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return Dist(rank=rank, world_size=world_size, device=device or torch.device("cpu"))


def finish() -> None:
    """The end of a finished run, on every rank, once it has done all of its I/O and let go of its
    DDP wrapper: wait for every rank, then destroy the process group, its C++ threads (gloo's
    workers and socket loop) joined here, while Python is whole. Left to atexit, the group outlived
    destroy_process_group and was freed in the interpreter's last garbage collection, at a moment
    set by module teardown and machine load: a rank aborted now and then as it exited ("terminate
    called without an active exception"). Nothing in a single process."""
    if _owned and dist.is_initialized():
        dist.barrier()
        gc.collect()  # the DDP wrapper is in reference cycles (the trainer's): it holds the group
    teardown()


def teardown() -> None:
    global _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _owned = False


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files."""
    return env()[0] == 0


# ----------------------------------------------------------------------------- one Hydra run directory
# Hydra's run directory has microseconds in it, so every rank would make its own. Rank 0 lets
# Hydra choose and then sends it; the others wait for it before Hydra starts and use it,
# writing neither .hydra/ nor a log file there.
def receive_run_dir(argv: list[str]) -> list[str]:
    """Before Hydra, on every rank: the command line a non-zero rank runs Hydra with."""
    setup()
    if is_main():
        return argv
    box = [None]
    dist.broadcast_object_list(box, src=0)  # sent by send_run_dir once rank 0's Hydra made it
    quoted = "'" + box[0].replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [*argv, f"hydra.run.dir={quoted}", "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def send_run_dir(run_dir: str) -> None:
    """On rank 0, inside Hydra's run: the directory Hydra made, to the other ranks."""
    if is_main():
        dist.broadcast_object_list([str(run_dir)], src=0)


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    setup().barrier()
