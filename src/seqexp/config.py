"""Typed schemas for every config group.

Hydra merges each YAML file onto its schema, so a mistyped key or a value of the wrong type
fails while the config is composed -- before any data is read -- naming the key. Enums list
their allowed values in that message. `validate()` adds the checks that span several fields.

A new model needs a module plus a YAML file; a schema here is optional but gives it the same
early checking (see `check_targets`, which binds every `_target_`'s keys to its signature).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from seqexp.data.aclimdb import SHA256 as IMDB_SHA256, URL as IMDB_URL
from seqexp.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: installed with seqexp


class Cell(StrEnum):
    rnn = "rnn"  # Elman RNN with tanh
    lstm = "lstm"
    gru = "gru"


class Pooling(StrEnum):
    last = "last"  # final valid state (both directions when bidirectional)
    mean = "mean"
    max = "max"
    attention = "attention"  # learned score per position, softmax over valid positions


class Positional(StrEnum):
    learned = "learned"
    sinusoidal = "sinusoidal"
    alibi = "alibi"  # no position vectors: attention scores fall off with distance (Press et al., 2022)


# "head+tail" is no identifier, hence the functional form; values and names are the same
Truncation = StrEnum("Truncation", [(v, v) for v in ("head", "tail", "head+tail")])


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ValSplit(StrEnum):
    contiguous = "contiguous"  # blocks of consecutive review ids: the validation movies are not trained on
    random = "random"  # any reviews: other reviews of the same movies train


class NonFinite(StrEnum):
    stop = "stop"  # raise, naming the step and the last good checkpoint
    skip = "skip"  # drop the batch, count it, keep going


# ----------------------------------------------------------------------------- models
@dataclass
class RecurrentConfig:
    _target_: str = "seqexp.models.recurrent.RecurrentModel"
    cell: Cell = Cell.lstm
    embed_dim: int = 64
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    word_dropout: float = 0.0  # fraction of the vocabulary dropped each step (heads.embed_words)
    bidirectional: bool = False  # classification only: a language model must not see the future
    pooling: Pooling = Pooling.last  # classification only
    tie_weights: bool = False  # language modelling; needs embed_dim == hidden_size


@dataclass
class AttentionConfig:
    _target_: str = "seqexp.models.attention.AttentionModel"
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    word_dropout: float = 0.0  # fraction of the vocabulary dropped each step (heads.embed_words)
    positional: Positional = Positional.learned
    pooling: Pooling = Pooling.mean  # classification only
    conv_kernel: int = 0  # > 0: a depthwise convolution of this width opens each block (Conformer)
    tie_weights: bool = True  # language modelling: share input embedding and output projection


@dataclass
class NgramConfig:
    _target_: str = "seqexp.models.ngram.NgramModel"
    n: int = 3  # uni-, bi- and trigrams
    max_features: int = 1_000_000  # the most frequent n-grams of the training reviews
    min_count: int = 2  # seen at least this often in training (rarer ones only memorise)
    smoothing: float = 1.0  # added to each class's count in the naive Bayes ratio
    w_adj: float = 0.4  # vote = (w + w_adj) * r / r_adj, fast.ai's NBSVM++ parametrisation
    r_adj: float = 10.0


# ----------------------------------------------------------------------------- data
@dataclass
class CharDataConfig:
    _target_: str = "seqexp.data.char.CharData"
    # A UTF-8 text file. When null, `source` decides: `stdlib` reads the Python standard
    # library's own source (no download), a URL source downloads and verifies `sha256`.
    path: Optional[str] = None
    source: str = "stdlib"
    sha256: Optional[str] = None
    max_chars: int = 2_000_000  # cap for the stdlib corpus
    val_fraction: float = 0.1  # the last 10% of the text, contiguous
    batch_size: int = 32  # recurrent: number of parallel streams; attention: windows per batch
    seq_len: int = 128  # recurrent: truncated-BPTT chunk; attention: context window (block size)
    cache_dir: Optional[str] = None  # default: $SEQEXP_CACHE or ~/.cache/seqexp


@dataclass
class ImdbDataConfig:
    _target_: str = "seqexp.data.imdb.ImdbData"
    # The official archive, any archive with its layout, or an extracted aclImdb directory.
    # When null, `url` is downloaded into the cache and checked against `sha256`.
    path: Optional[str] = None
    url: str = IMDB_URL
    sha256: Optional[str] = IMDB_SHA256
    cache_dir: Optional[str] = None  # default: $SEQEXP_CACHE or ~/.cache/seqexp
    lowercase: bool = True
    max_vocab: int = 25_000  # most frequent training tokens kept; pad and unknown come on top
    min_freq: int = 2  # a token seen once in training only teaches the model to memorise
    max_len: int = 400  # tokens per review after truncation (median review: ~200)
    truncation: Truncation = Truncation["head+tail"]  # head+tail: first quarter + last three quarters
    val_fraction: float = 0.1  # of the 25k training reviews, stratified, chosen by the seed
    val_split: ValSplit = ValSplit.contiguous  # contiguous: unseen movies, as in the test set (data/imdb.py)
    batch_size: int = 32
    bucket_chunks: int = 100  # sort by length within chunks of this many batches; 1: no bucketing


# ----------------------------------------------------------------------------- optimizers
@dataclass
class SGDConfig:
    _target_: str = "torch.optim.SGD"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class AdamConfig:
    _target_: str = "torch.optim.Adam"
    lr: float = 2e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = 0.1


@dataclass
class AdagradConfig:
    _target_: str = "torch.optim.Adagrad"
    lr: float = 0.1
    lr_decay: float = 0.0
    eps: float = 1e-10
    weight_decay: float = 0.0


@dataclass
class RMSpropConfig:
    _target_: str = "torch.optim.RMSprop"
    lr: float = 2e-3
    alpha: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0


# ----------------------------------------------------------------------------- schedulers
@dataclass
class ConstantScheduleConfig:
    _target_: str = "seqexp.schedules.constant"
    warmup_steps: int = 0


@dataclass
class CosineScheduleConfig:
    _target_: str = "seqexp.schedules.cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr


@dataclass
class StepScheduleConfig:
    _target_: str = "seqexp.schedules.step"
    warmup_steps: int = 0
    step_size: int = 1000  # multiply the lr by gamma every step_size steps
    gamma: float = 0.5


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    device: Device = Device.auto  # auto: CUDA when present
    max_epochs: int = 1000
    max_steps: int = -1  # -1: run max_epochs; otherwise stop after this many optimizer steps
    max_time_s: float = 0.0  # training-time budget in seconds (0: none); evaluation time not counted
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # decay of an exponential moving average of the weights (0: off). When on, the average is what
    # is evaluated, chosen as best and saved as a checkpoint's "model". Ramped: update n uses
    # min(ema, (1 + n) / (10 + n)), so e.g. 0.999 averages ~the last 1000 steps only after ~9000
    ema: float = 0.0
    eval_every: int = 500  # steps between validations on the full validation split
    checkpoint_every: int = 500  # steps between writes of checkpoints/last.pt and step_XXXXXX.pt
    keep_last: int = 3  # step checkpoints kept (never best.pt, nor the one resumed from); 0: none written
    log_every: int = 25  # steps between reads of loss/grad norm (each read syncs the device)
    precision: Precision = Precision.fp32  # bf16/fp16 run the forward pass under autocast
    seed: int = 1337
    compile: bool = False  # torch.compile the model; checkpoints keep uncompiled names
    deterministic: bool = False  # torch.use_deterministic_algorithms
    nonfinite: NonFinite = NonFinite.stop
    progress: bool = True  # tqdm progress bar


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    sample_chars: int = 300  # language models: characters generated at each evaluation
    sample_prompt: str = "\n"
    sample_temperature: float = 0.8
    sample_top_k: int = 40
    attention_maps: bool = True  # attention models: each layer's weights for one validation example
    wrong_examples: int = 5  # classifiers: the most confidently wrong validation texts; 0: off (costs a val pass)
    histograms: bool = False  # weight and gradient histograms; large event files


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


def register_configs() -> None:
    """Put the schemas where the YAML files' defaults lists find them (`/schema/<group>/<name>`)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, name, node in [
        ("model", "recurrent", RecurrentConfig),
        ("model", "attention", AttentionConfig),
        ("model", "ngram", NgramConfig),
        ("data", "char", CharDataConfig),
        ("data", "imdb", ImdbDataConfig),
        ("optimizer", "sgd", SGDConfig),
        ("optimizer", "adam", AdamConfig),
        ("optimizer", "adamw", AdamWConfig),
        ("optimizer", "adagrad", AdagradConfig),
        ("optimizer", "rmsprop", RMSpropConfig),
        ("scheduler", "constant", ConstantScheduleConfig),
        ("scheduler", "cosine", CosineScheduleConfig),
        ("scheduler", "step", StepScheduleConfig),
    ]:
        cs.store(group=f"schema/{group}", name=name, node=node)


register_configs()


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
def _locate(target: str) -> Any:
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"_target_ '{target}' cannot be imported ({e}).") from None


def check_targets(cfg: DictConfig, runtime: dict[str, tuple[str, ...]]) -> None:
    """Every key of a `_target_` node must be a parameter of the callable it names.

    `runtime` lists, per group, the arguments passed at build time (vocab_size, params, ...),
    which must not be in the YAML. This catches typos in YAML files of models without a schema.
    """
    for group, passed in runtime.items():
        node = cfg[group]
        target = node.get("_target_")
        if target is None:
            raise UserError(f"config group '{group}' has no _target_.")
        params = inspect.signature(_locate(target)).parameters
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in node:
            if key.startswith("_"):
                continue
            if key in passed:
                raise UserError(f"{group}.{key} is a runtime fact passed by seqexp; remove it from the config.")
            if key not in params and not takes_kwargs:
                allowed = ", ".join(k for k in params if k not in passed and k not in ("self",))
                raise UserError(f"{group}.{key} is not a parameter of {target}. Allowed: {allowed}.")


def validate(cfg: DictConfig) -> None:
    """Checks that span several fields. Runs before any data is read."""
    m, t, d = cfg.model, cfg.trainer, cfg.data
    task = getattr(_locate(d._target_), "task", "lm")  # data classes declare their task

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(msg)

    if m._target_ == NgramConfig._target_:
        need(task == "classify", "model=ngram is a bag of n-grams: it classifies (data=imdb) and cannot "
             "model language.")
        need(1 <= m.n <= 5, f"model.n must be in 1..5, got {m.n}.")
        need(m.max_features > 0 and m.min_count > 0, "model.max_features and model.min_count must be positive.")
    if "n_heads" in m and "d_model" in m:
        need(m.n_heads > 0 and m.d_model % m.n_heads == 0,
             f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}.")
    if "bidirectional" in m and task == "lm":
        need(not m.bidirectional, "model.bidirectional=true lets a language model see the next "
             "character; use it only with a classification dataset (data=imdb).")
    if m.get("tie_weights") and task == "lm" and "hidden_size" in m:
        need(m.embed_dim == m.hidden_size, f"model.tie_weights=true needs model.embed_dim "
             f"({m.embed_dim}) == model.hidden_size ({m.hidden_size}).")
    for key in ("embed_dim", "hidden_size", "num_layers", "d_model", "n_layers", "mlp_ratio"):
        if key in m:
            need(m[key] > 0, f"model.{key} must be positive, got {m[key]}.")
    if "dropout" in m:
        need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}.")
    if "word_dropout" in m:
        need(0.0 <= m.word_dropout < 1.0, f"model.word_dropout must be in [0, 1), got {m.word_dropout}.")
    if "conv_kernel" in m:
        need(m.conv_kernel >= 0, f"model.conv_kernel must be 0 (none) or a width >= 1, got {m.conv_kernel}.")
    if "batch_size" in d:
        need(d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}.")
    if "seq_len" in d:
        need(d.seq_len > 1, f"data.seq_len must be > 1, got {d.seq_len}.")
    if "val_fraction" in d:
        need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}.")
    for key in ("max_len", "max_vocab", "min_freq", "bucket_chunks"):
        if key in d:
            need(d[key] > 0, f"data.{key} must be positive, got {d[key]}.")
    need(t.max_steps == -1 or t.max_steps > 0, f"trainer.max_steps must be -1 or positive, got {t.max_steps}.")
    need(t.max_epochs > 0, f"trainer.max_epochs must be positive, got {t.max_epochs}.")
    for key in ("eval_every", "checkpoint_every", "log_every"):
        need(t[key] > 0, f"trainer.{key} must be positive, got {t[key]}.")
    need(t.max_time_s >= 0, f"trainer.max_time_s must be >= 0 (0: no budget), got {t.max_time_s}.")
    need(t.keep_last >= 0, f"trainer.keep_last must be >= 0 (0: no step checkpoints), got {t.keep_last}.")
    need(t.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 disables), got {t.grad_clip}.")
    need(0.0 <= t.ema < 1.0, f"trainer.ema must be in [0, 1) (0: off; e.g. 0.999), got {t.ema}.")
    need(cfg.optimizer.lr > 0, f"optimizer.lr must be positive, got {cfg.optimizer.lr}.")
    check_targets(cfg, {
        "model": ("vocab_size", "num_outputs", "task", "pad_id", "max_len"),
        "data": ("seed",),
        "optimizer": ("params",),
        "scheduler": ("optimizer", "total_steps"),
    })


def to_container(cfg: DictConfig) -> dict:
    """Resolved plain dict (enums as strings): what checkpoints store."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
