"""Optuna's ask-and-tell loop as a Hydra sweeper.

Each round asks Optuna for `n_jobs` trials, turns their values into override strings
(`optimizer.lr=0.0021`), runs them through the configured launcher (basic or joblib) like any
sweep job -- so each trial gets its own job directory, record and HParams -- and tells
Optuna the returned objective. A job that failed returns None (seqexp/sweep/job.py) and is told
as a failed trial; the search goes on. After a stop signal (seqexp/preempt.py) no trial is asked.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from seqexp import preempt
from seqexp.rundir import RunDir

log = logging.getLogger(__name__)


def to_distribution(override: Override) -> Any:
    """The Optuna distribution of a sweep override: choice -> categorical, range -> int,
    interval -> float (int when cast with int(...)), tag(log, ...) -> log scale."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    values = lambda: list(override.sweep_iterator(transformer=Transformer.encode))  # noqa: E731
    if override.is_choice_sweep():
        return CategoricalDistribution(values())
    if override.is_range_sweep():
        vs = values()  # Python's range: the stop value is excluded
        if value.shuffle or not all(isinstance(v, int) for v in vs) or value.step <= 0:
            return CategoricalDistribution(vs)
        return IntDistribution(vs[0], vs[-1], step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{override.input_line}: the Optuna sweeper cannot search this sweep.")


def short(v: Any) -> Any:
    """6 significant digits: readable job directory names; the search never needs more."""
    return float(f"{v:.6g}") if isinstance(v, float) else v


def objective_direction(config: DictConfig) -> str:
    """minimize or maximize: the mode of the monitored metric (trainer.monitor, trainer.mode; by
    default the objective of the task the data class declares, seqexp/monitor.py)."""
    from seqexp.monitor import metric_and_mode

    data_cls = get_class(config.data._target_)
    _, mode = metric_and_mode(config.trainer, data_cls.task, data_cls.metric_modes(config.data))
    return "minimize" if mode == "min" else "maximize"


class OptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, sampler: Any,
                 study_name: Optional[str], storage: Optional[str], params: Optional[DictConfig]) -> None:
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, max(1, n_jobs)
        self.sampler_cfg, self.study_name, self.storage = sampler, study_name, storage
        self.params = params or {}
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        import optuna

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        # config params first: a command-line override of the same key replaces its entry
        lines = {o.get_key_element(): o for o in parser.parse_overrides(
            [f"{k}={v}" for k, v in self.params.items()] + list(arguments))}
        space = {k: to_distribution(o) for k, o in lines.items() if o.is_sweep_override()}
        fixed = [o.input_line for k, o in lines.items() if not o.is_sweep_override()]

        direction = objective_direction(self.config) if self.direction == "auto" else self.direction
        sampler = self.sampler_cfg  # Hydra built it already (recursive instantiation of the sweeper)
        if isinstance(sampler, (dict, DictConfig)):
            sampler = instantiate(sampler)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage, sampler=sampler,
                                    direction=direction, load_if_exists=True)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        done = sum(t.state.is_finished() for t in study.trials)  # from a stored study
        if done and sampler is not None:
            # a seeded sampler would repeat the stored study's first trials; an in-memory study
            # keeps its seed, so a re-run into the same sweep dir meets its finished jobs again
            sampler.reseed_rng()
        log.info("Optuna: %s, %d trials (%d done before), %d at a time; search space: %s", direction,
                 self.n_trials, done, self.n_jobs,
                 " ".join(o.input_line for k, o in lines.items() if k in space))

        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [[*(f"{k}={short(v)}" for k, v in t.params.items()), *fixed] for t in trials]
            self.validate_batch_is_legal(batch)
            # job number = trial number: a re-run of a seeded search maps each trial to its directory
            returns = self.launcher.launch(batch, initial_job_idx=trials[0].number)
            for trial, ret, overrides in zip(trials, returns, batch):
                value = ret.return_value if ret.status == JobStatus.COMPLETED else None
                if isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("trial %d failed (%s)", trial.number, " ".join(overrides))
            done += len(trials)
            if preempt.received():  # stopped (Ctrl-C, SIGTERM): ask no more; a re-run continues
                log.warning("Optuna: stopped by %s after %d trials", preempt.received(), done)
                break

        return self.report(study, sweep_dir, direction)

    def report(self, study, sweep_dir: Path, direction: str) -> Optional[dict]:
        import optuna

        finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not finished:
            log.error("Optuna: no trial finished; see the failed jobs' records (%s) in %s", RunDir.METRICS, sweep_dir)
            return None
        best = study.best_trial
        params = {k: short(v) for k, v in best.params.items()}  # as the job ran them
        result = {"best_trial": best.number, "best_value": best.value, "best_params": params,
                  "direction": direction, "n_trials": len(study.trials), "n_complete": len(finished)}
        OmegaConf.save(OmegaConf.create(result), sweep_dir / "optimization_results.yaml")
        log.info("Best trial #%d of %d (%s): objective %.6g with %s", best.number, len(study.trials),
                 direction, best.value, " ".join(f"{k}={v}" for k, v in params.items()))
        return result
