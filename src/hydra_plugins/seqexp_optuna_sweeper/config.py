"""Config schema of the seqexp Optuna sweeper. Imported by Hydra's plugin scan: no optuna here."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.seqexp_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # minimize | maximize | auto: the mode of trainer.monitor (by default the task objective: val/loss minimize, val/acc maximize)
    direction: str = "auto"
    n_trials: int = 20  # in total: a re-run against a stored study only runs the missing ones
    # trials launched together, one launcher batch; > 1 pairs with hydra/launcher=joblib
    n_jobs: int = 1
    sampler: Any = field(default_factory=lambda: {"_target_": "optuna.samplers.TPESampler", "seed": 1337})
    study_name: Optional[str] = None
    storage: Optional[str] = None  # e.g. sqlite:///outputs/study.db: the study outlives the sweep
    # the search space, in Hydra's override grammar: choice(...), range(...), interval(...),
    # tag(log, interval(...)); plain values are fixed for every trial
    params: Dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="seqexp_optuna", node=OptunaSweeperConf,
                             provider="seqexp")
