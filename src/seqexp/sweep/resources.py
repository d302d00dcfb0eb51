"""CPU threads and GPUs for jobs that run side by side (`hydra/launcher=joblib`).

N jobs each using every core fight over them and all run slower than one at a time, so each
job gets cores // N threads. With several GPUs, each worker process claims a free one with a
file lock and keeps it for its life: joblib reuses workers, and a process cannot move to another
GPU once CUDA is initialised. Claims by lock rather than by job number: jobs finish at different
times, so job i and job i + N may well run at the same time.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Optional

log = logging.getLogger("seqexp")

_claimed: Optional[tuple[str, Optional[IO]]] = None  # this process's GPU and the lock that holds it


def cpu_name() -> str:
    """The processor's model name, for benchmark tables (e.g. 'AMD EPYC 7B13')."""
    import platform

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_jobs(launcher_cfg) -> int:
    """Jobs that run at once: joblib's n_jobs (-1: all cores), else 1 (the basic launcher)."""
    n = launcher_cfg.get("n_jobs") if launcher_cfg is not None else None
    if n is None:
        return 1
    from joblib import effective_n_jobs

    return max(1, effective_n_jobs(int(n)))


def visible_gpus() -> list[str]:
    """GPU ids this process may use, read without initialising CUDA (NVML-based count)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def claim_gpu(lock_dir: Path, gpus: list[str], job_num: int) -> tuple[str, Optional[IO]]:
    """The first GPU no other process holds, locked until `lock` is closed (or the process ends).
    When all are taken (more parallel jobs than GPUs), share one by job number."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu in gpus:
        f = open(lock_dir / f"gpu{gpu}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return gpu, f
        except BlockingIOError:
            f.close()
    return gpus[job_num % len(gpus)], None


def configure_job(n_parallel: int, job_num: int, lock_dir: Path, device: str) -> dict:
    """Set this job's threads and GPU; returns what was chosen (recorded in job.json)."""
    global _claimed
    import torch

    chosen: dict = {"parallel_jobs": n_parallel}
    if n_parallel > 1:
        threads = max(1, available_cores() // n_parallel)
        torch.set_num_threads(threads)
        if device != "cpu" and _claimed is None and not torch.cuda.is_initialized():
            gpus = visible_gpus()
            if len(gpus) > 1:
                _claimed = claim_gpu(lock_dir, gpus, job_num)
                os.environ["CUDA_VISIBLE_DEVICES"] = _claimed[0]
        if _claimed is not None:
            chosen["gpu"] = _claimed[0]
    chosen["threads"] = torch.get_num_threads()
    return chosen
