"""The root config: the trainer's, logging's and sweeps' settings, and the checks before a run.

The component groups (model, data, optimizer, scheduler) take their keys, types and defaults
from their constructors (seqexp/schema.py); the settings of the loop itself are written here,
once. Hydra merges the YAML files onto these schemas, so a mistyped key, a wrong type or a value
outside an enum fails while the config is composed -- before any data is read -- naming the key.
`validate()` then runs the checks that span several fields, each beside the class it checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from seqexp.build import RUNTIME, check_optimization, locate, parameters
from seqexp.data.base import Dataset
from seqexp.errors import UserError
from seqexp.models.base import SequenceModel
from seqexp.monitor import metric_and_mode
from seqexp.reports.base import report_classes
from seqexp.schema import defaults, settings_schema
from seqexp.trust import GROUPS



class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Mode(StrEnum):
    min = "min"
    max = "max"


class NonFinite(StrEnum):
    stop = "stop"  # raise, naming the step and the last good checkpoint
    skip = "skip"  # drop the batch, count it, keep going


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    device: Device = Device.auto  # auto: CUDA when present
    max_epochs: int = 1000
    max_steps: int = -1  # -1: run max_epochs; otherwise stop after this many optimizer steps
    max_time_s: float = 0.0  # training-time budget in seconds (0: none); evaluation time not counted
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # micro-batches (data.batch_size rows each) per optimizer step: the update of one batch of
    # accumulate x batch_size rows; every count and interval here counts optimizer steps
    accumulate: int = 1
    # decay of an exponential moving average of the weights (0: off). When on, the average is what
    # is evaluated, chosen as best and saved as a checkpoint's "model". Ramped: update n uses
    # min(ema, (1 + n) / (10 + n)), so e.g. 0.999 averages ~the last 1000 steps only after ~9000
    ema: float = 0.0
    eval_every: int = 500  # steps between validations on the full validation split
    checkpoint_every: int = 500  # steps between writes of the last checkpoint and a step checkpoint
    # the validation metric that chooses the best checkpoint and that sweeps and Optuna compare, e.g. val/acc
    # (null: the task's objective); mode: which way is better (null: inferred, seqexp/monitor.py)
    monitor: Optional[str] = None
    mode: Optional[Mode] = None
    patience: int = 0  # stop after this many evaluations without improvement (0: never)
    min_delta: float = 0.0  # what counts as an improvement for patience: better by more than this
    # stop at the first evaluation where the monitored metric reaches this value (null: none), e.g.
    # trainer.target=0.99 with trainer.monitor=val/exact: time-to-target, in the run's record
    target: Optional[float] = None
    keep_last: int = 3  # step checkpoints kept (never the best, nor the one resumed from); 0: none written
    log_every: int = 25  # steps between reads of loss/grad norm (each read syncs the device)
    precision: Precision = Precision.fp32  # bf16/fp16 run the forward pass under autocast
    seed: int = 1337
    compile: bool = False  # torch.compile the model (a model it cannot compile trains eager, with a warning); checkpoints keep uncompiled names
    # CUDA: fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa, ~bf16-level
    # rounding, several times the fp32 throughput on Ampere and later); the usual training choice
    # (nanoGPT's), hence on. false: IEEE fp32 throughout. No effect on a CPU.
    tf32: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # a new run in a directory that holds one (an explicit hydra.run.dir) moves the old run aside,
    # to <dir>.old-<time>, instead of being refused; never deletes it
    overwrite: bool = False
    nonfinite: NonFinite = NonFinite.stop
    progress: bool = True  # tqdm progress bars: training, and an evaluation that lasts (on a terminal)
    # torch.profiler over steps 4-6: a trace in <run>/profile/ and the top operators logged (seqexp/profile.py)
    profile: bool = False


class Backend(StrEnum):
    """Where the logger writes (seqexp/logger.py); every backend gets the same names and steps."""
    tensorboard = "tensorboard"  # event files in the run directory
    mlflow = "mlflow"  # an MLflow run (seqexp/mlflow_backend.py); needs `pip install 'seqexp[mlflow]'`


@dataclass
class MlflowConfig:
    """`logging.mlflow`: read only when `mlflow` is in logging.backends."""
    experiment: str = "seqexp"  # the MLflow experiment the runs are recorded in (created if missing)
    log_checkpoint: bool = False  # also upload checkpoints/best.pt when the run ends (it can be large)


def logging_schema() -> type:
    """`logging`: the backends, and each report's settings under its name
    (`logging.sample.chars`, `logging.wrong_examples.count`, ...), from the report's constructor
    (seqexp/reports/): a new report brings its settings, nothing here names them."""
    fields = [
        ("backends", list[Backend], field(default_factory=lambda: [Backend.tensorboard])),
        # the switch from before `backends`, kept so that earlier commands and saved configs mean
        # what they meant: false turns TensorBoard off even where `backends` lists it
        ("tensorboard", bool, field(default=True)),
        ("mlflow", MlflowConfig, field(default_factory=MlflowConfig)),
    ]
    for cls in report_classes():
        schema = settings_schema(cls)
        fields.append((cls.name, schema, field(default_factory=schema)))
    return dataclasses.make_dataclass("LoggingConfig", fields)


LoggingConfig = logging_schema()


@dataclass
class SweepConfig:
    """How a multirun (`-m`) treats its jobs; see seqexp/sweep/job.py."""
    fail_fast: bool = False  # stop the sweep at the first failed job (default: record it, run the rest)
    skip_finished: bool = True  # re-running into the same hydra.sweep.dir skips jobs already finished


@dataclass
class TrainConfig:
    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # continue a run: its directory, a checkpoint in it, or `latest` (seqexp/resume.py)
    resume: Optional[str] = None


def safe_dirname(name: str, max_len: int = 200) -> str:
    """A sweep job's directory name from its overrides: `/` in a value (a path) would nest
    directories, and most filesystems cap a name at 255 bytes."""
    name = name.replace("/", "_")
    if len(name.encode()) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = name.encode()[: max_len - 11].decode(errors="ignore") + "-" + digest
    return name


OmegaConf.register_new_resolver("safe_dirname", safe_dirname, replace=True)


# ----------------------------------------------------------------------------- checks
def check_trainer(t: DictConfig) -> None:
    """TrainerConfig's cross-field checks."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    need(t.max_steps == -1 or t.max_steps > 0, f"trainer.max_steps must be -1 or positive, got {t.max_steps}.")
    need(t.max_epochs > 0, f"trainer.max_epochs must be positive, got {t.max_epochs}.")
    for key in ("eval_every", "checkpoint_every", "log_every"):
        need(t[key] > 0, f"trainer.{key} must be positive, got {t[key]}.")
    need(t.max_time_s >= 0, f"trainer.max_time_s must be >= 0 (0: no budget), got {t.max_time_s}.")
    need(t.keep_last >= 0, f"trainer.keep_last must be >= 0 (0: no step checkpoints), got {t.keep_last}.")
    need(t.accumulate >= 1, f"trainer.accumulate must be >= 1 (1: no accumulation), got {t.accumulate}.")
    need(t.patience >= 0, f"trainer.patience must be >= 0 (0: no early stopping), got {t.patience}.")
    need(t.min_delta >= 0, f"trainer.min_delta must be >= 0, got {t.min_delta}.")
    need(t.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 disables), got {t.grad_clip}.")
    need(0.0 <= t.ema < 1.0, f"trainer.ema must be in [0, 1) (0: off; e.g. 0.999), got {t.ema}.")
    if str(t.precision) == "fp16":
        from seqexp.build import pick_device

        need(pick_device(str(t.device)).type != "cpu",
             "trainer.precision=fp16 needs a GPU: a CPU has no fast fp16 kernels (and oneDNN's LSTM has none at "
             "all). Use trainer.precision=bf16 on a CPU.")


def check_logging(logging: DictConfig) -> None:
    """A backend whose package is missing is refused now, naming the extra that installs it."""
    if Backend.mlflow in logging.backends:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UserError("logging.backends=[mlflow] needs MLflow: pip install 'seqexp[mlflow]'") from None


def schema_keys() -> list[str]:
    """Every key the root schema defines: the top-level names and trainer.*, logging.*, sweep.*
    (the groups' keys come from their constructors and are checked by check_targets)."""
    keys = []
    for f in dataclasses.fields(TrainConfig):
        keys.append(f.name)
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(f.default_factory)]
    return keys


# keys renamed since a release: an old run's saved config is upgraded (`upgrade`), an old command
# line is told the new name (`did_you_mean`)
RENAMED = {
    "logging.sample_chars": "logging.sample.chars", "logging.sample_prompt": "logging.sample.prompt",
    "logging.sample_temperature": "logging.sample.temperature", "logging.sample_top_k": "logging.sample.top_k",
    "logging.attention_maps": "logging.attention_maps.enabled", "logging.wrong_examples": "logging.wrong_examples.count",
    "logging.histograms": "logging.histograms.enabled", "logging.gradient_distance": "logging.gradient_distance.enabled",
    "logging.gradient_rows": "logging.gradient_distance.rows",
}


def did_you_mean(key: str, keys: list[str] | None = None) -> str:
    """' Did you mean trainer.seed?' for 'seed': a renamed key's new name, keys with the same last
    part, else the closest spelling among `keys` (default: the root schema's)."""
    if key in RENAMED:
        return f" It is {RENAMED[key]} now."
    keys = schema_keys() if keys is None else keys
    parent, _, leaf = key.rpartition(".")
    near = [k for k in keys if k.rpartition(".")[2] == leaf and k != key]
    if not near:  # a misspelling: the closest key beside it
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        near = [siblings[m] for m in difflib.get_close_matches(leaf, list(siblings), n=1)]
    return f" Did you mean {' or '.join(near)}?" if near else ""


def check_keys(cfg: DictConfig) -> None:
    """No key outside the schema: `+seed=3` (Hydra's advice for an unknown key) would otherwise add
    a top-level key that nothing reads, and the run would train with the default seed."""
    known = schema_keys()
    top = [k for k in known if "." not in k]
    for key in cfg.keys():
        if key not in known:
            raise UserError(f"'{key}' is not a top-level config key (those are {', '.join(top)}).{did_you_mean(key)}")
    for section in ("trainer", "logging", "sweep"):
        for key in cfg[section].keys():
            if f"{section}.{key}" not in known:
                own = ", ".join(k.partition(".")[2] for k in known if k.startswith(f"{section}."))
                raise UserError(f"'{section}.{key}' is not a key of '{section}'.{did_you_mean(f'{section}.{key}')} "
                                f"Its keys: {own}.")


def check_targets(cfg: DictConfig, groups=("model", "data", "optimizer", "scheduler")) -> None:
    """Every key of a group must be a parameter of the callable its `_target_` names, and no
    runtime fact (build.RUNTIME). Composition already checks groups on a signature schema; this
    catches YAML files written without one."""
    for group in groups:
        node = cfg[group]
        target = node.get("_target_")
        if target is None:
            raise UserError(f"config group '{group}' has no _target_.")
        params, takes_kwargs = parameters(locate(target))
        for key in node:
            if key.startswith("_"):
                continue
            if key in RUNTIME[group]:
                raise UserError(f"{group}.{key} is a runtime fact passed by seqexp; remove it from the config.")
            if key not in params and not takes_kwargs:
                allowed = ", ".join(k for k in params if k not in RUNTIME[group])
                raise UserError(f"{group}.{key} is not a parameter of {target}. Allowed: {allowed}.")


def validate(cfg: DictConfig) -> None:
    """Every check that needs no data, run before any is read: the keys of each group against
    its constructor, then each component's own cross-field checks (the model's and the data's
    `check_config`; the optimizer and schedule are built on a dummy parameter, which runs torch's
    own argument checks), then the trainer's."""
    check_keys(cfg)
    check_targets(cfg)
    data_cls, model_cls = locate(cfg.data._target_), locate(cfg.model._target_)
    if not (isinstance(data_cls, type) and issubclass(data_cls, Dataset)):
        raise UserError(f"data._target_ {cfg.data._target_} is not a seqexp.data.base.Dataset.")
    if not (isinstance(model_cls, type) and issubclass(model_cls, SequenceModel)):
        raise UserError(f"model._target_ {cfg.model._target_} is not a seqexp.models.base.SequenceModel.")
    data_cls.check_config(cfg.data)
    model_cls.check_config(cfg.model, data_cls.task.head)  # the head the task asks of models
    check_optimization(cfg.optimizer, cfg.scheduler)
    check_trainer(cfg.trainer)
    check_logging(cfg.logging)
    for cls in report_classes():  # a report checks its settings when it is built
        cls(**cfg.logging[cls.name])
    metric_and_mode(cfg.trainer, data_cls.task, data_cls.metric_modes(cfg.data))  # one not logged is refused now


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict (enums as strings): what checkpoints store."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def upgrade(config: dict) -> dict:
    """A config an older seqexp saved (in a checkpoint), as today's code reads it: the one place
    that knows what changed. The data class upgrades what changed meaning
    (`Dataset.upgrade_config`); renamed keys get their new names; a key added since gets its
    default -- a component's from its constructor, the trainer's from TrainerConfig: the
    behaviour of the version that saved it, where the new key only adds an option. Idempotent.
    Only for configs that passed trust.py."""
    config = dict(config)
    config["data"] = locate(config["data"]["_target_"]).upgrade_config(config["data"])  # first: it sees what is missing
    for group in GROUPS:
        config[group] = {**defaults(config[group]["_target_"]), **config[group]}
    trainer = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    config["trainer"] = {**{k: str(v) if isinstance(v, StrEnum) else v for k, v in trainer.items()},
                         **config.get("trainer", {})}
    logging = dict(config.get("logging", {}))
    for old, new in RENAMED.items():
        section, key = old.split(".", 1)
        if section == "logging" and key in logging and not isinstance(logging[key], dict):
            report, setting = new.split(".")[1:]
            value = logging.pop(key)  # first: the old key may be the report's own name (attention_maps)
            logging[report] = {**logging.get(report, {}), setting: value}
    config["logging"] = logging
    return config
