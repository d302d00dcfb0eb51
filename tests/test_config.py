"""Every combination composes and builds; bad overrides fail early, naming the key."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

import torch

from seqexp.build import build_optimizer, instantiate, locate
from seqexp.configs import CONFIG_DIR
from seqexp.config import validate
from seqexp.errors import UserError
from tests.helpers import EXTENSION, ROOT, SEARCH, lm_capable, make_cfg

# discovered, not listed: a new YAML file of a group is tested by being there
GROUPS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml"))
          for g in ("model", "optimizer", "scheduler", "data", "recipe", "experiment")}
LM_MODELS = [m for m in GROUPS["model"] if lm_capable(m)]  # the model's own check_config decides
# every model: shipped, and found through the search path (tests/extension)
ALL_MODELS = sorted({*GROUPS["model"], *(p.stem for p in (EXTENSION / "configs" / "model").glob("*.yaml"))})
HEAD_DATA = {"lm": "char", "classify": "imdb"}  # a dataset whose task asks each head of models


def test_every_group_offers_what_a_run_needs():
    for group in ("model", "optimizer", "scheduler", "data"):
        assert GROUPS[group], f"configs/{group}/ is empty"
    assert LM_MODELS, "no model models language: the default data (a character corpus) needs one"

def test_train_yaml_composes_typed_in_a_process_that_imported_nothing_of_seqexp():
    """The root schema comes from the same plugin as every group's (hydra_plugins/seqexp_schema):
    a script that composes train.yaml (benchmarks/imdb.py once did) finds it without importing
    seqexp.config first, and a typo in a trainer key is still refused at composition."""
    code = ("import sys\nfrom hydra import compose, initialize_config_dir\n"
            "from seqexp.configs import CONFIG_DIR\n"
            "with initialize_config_dir(str(CONFIG_DIR), version_base='1.3'):\n"
            "    cfg = compose('train', overrides=sys.argv[1:])\n"
            "print(cfg.trainer.max_steps)\n")
    ok = subprocess.run([sys.executable, "-c", code, "trainer.max_steps=7"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.split() == ["7"]
    typo = subprocess.run([sys.executable, "-c", code, "trainer.max_stepz=7"], capture_output=True, text=True, timeout=120)
    assert typo.returncode != 0 and "Could not override 'trainer.max_stepz'" in typo.stderr


@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_composes_and_builds_for_every_head_it_accepts(name):
    """Each model YAML, with a dataset of each head its check_config accepts: the composed config
    validates, and the model builds from it and gives that head's logits."""
    accepted = []
    for head, data in HEAD_DATA.items():
        cfg = make_cfg(SEARCH, f"model={name}", f"data={data}")
        try:
            locate(cfg.model._target_).check_config(cfg.model, head)
        except UserError as e:
            assert "\n" not in str(e), e  # refused in one line
            continue
        accepted.append(head)
        validate(cfg)
        torch.manual_seed(0)
        V, C = 50, 2
        model = instantiate(cfg.model, vocab_size=V, num_outputs=V if head == "lm" else C, head=head, max_len=16)
        tokens, lengths = torch.randint(1, V, (3, 16)), torch.tensor([16, 9, 2])
        model.prepare(lambda: [{"tokens": tokens, "lengths": lengths, "targets": torch.tensor([0, 1, 0])}])
        logits, _ = model(tokens, lengths if head == "classify" else None)
        assert logits.shape == ((3, 16, V) if head == "lm" else (3, C)), head
    assert accepted, f"model={name} accepts no head"


def composes_and_builds(tiny_text, *overrides: str) -> None:
    """The composed config validates; model, optimizer and schedule build and take a step."""
    cfg = make_cfg(*overrides, f"data.path={tiny_text}", "data.batch_size=4", "data.seq_len=16")
    validate(cfg)
    data = instantiate(cfg.data, seed=0)
    net = instantiate(cfg.model, **data.model_kwargs())
    opt = build_optimizer(cfg.optimizer, net)
    sched = instantiate(cfg.scheduler, optimizer=opt, total_steps=100)
    batch = next(data.batches("train", stateful=net.stateful))
    logits, _ = net(batch["tokens"])
    assert logits.shape == (4, 16, data.vocab_size)
    logits.float().logsumexp(-1).mean().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] > 0


# Every combination, without the product: a model's YAML and the optimizer and scheduler YAMLs
# meet only in the composed config (no model YAML of the language models chooses its own
# optimizer or schedule; model/ngram.yaml does: test_a_model_that_chooses_its_optimizer_gets_it),
# and building an optimizer asks of a model only its parameters (build_optimizer's weight-decay
# groups: tests/test_model_contract.py). So every model with the default optimizer and schedule,
# and every optimizer with every schedule on one model, cover what the full product did.
@pytest.mark.parametrize("model", LM_MODELS)
def test_every_model_composes_and_builds_with_the_default_optimizer_and_schedule(model, tiny_text):
    composes_and_builds(tiny_text, f"model={model}")


@pytest.mark.parametrize("optimizer,scheduler", list(itertools.product(GROUPS["optimizer"], GROUPS["scheduler"])))
def test_every_optimizer_and_schedule_compose_and_build(optimizer, scheduler, tiny_text):
    composes_and_builds(tiny_text, "model=rnn", f"optimizer={optimizer}", f"scheduler={scheduler}")


def test_a_model_that_chooses_its_optimizer_gets_it_and_the_command_line_wins(imdb_archive, tmp_path):
    """model/ngram.yaml overrides the optimizer and the schedule (train.yaml lists them before the
    model); an optimizer= or scheduler= on the command line still wins. Its choice builds."""
    from seqexp.data.imdb import ImdbData

    cfg = make_cfg("model=ngram", "data=imdb")
    validate(cfg)
    assert (cfg.optimizer._target_, cfg.scheduler._target_) == ("torch.optim.Adam", "seqexp.schedules.constant")
    chosen = make_cfg("model=ngram", "data=imdb", "optimizer=adamw", "scheduler=cosine")
    assert (chosen.optimizer._target_, chosen.scheduler._target_) == ("torch.optim.AdamW", make_cfg().scheduler._target_)
    assert make_cfg().scheduler._target_ != cfg.scheduler._target_
    data = ImdbData(seed=0, path=str(imdb_archive), cache_dir=str(tmp_path), min_freq=1, batch_size=8)
    net = instantiate(cfg.model, **data.model_kwargs())
    net.prepare(lambda: data.batches("train"))
    opt = build_optimizer(cfg.optimizer, net)
    sched = instantiate(cfg.scheduler, optimizer=opt, total_steps=100)
    batch = next(data.batches("train"))
    logits, _ = net(batch["tokens"], batch["lengths"])
    torch.nn.functional.cross_entropy(logits, batch["targets"]).backward()
    opt.step()
    sched.step()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == cfg.optimizer.lr


def test_data_presets_compose(shakespeare):
    cfg = make_cfg("data=shakespeare", f"data.path={shakespeare}")
    validate(cfg)
    d = instantiate(cfg.data, seed=0)
    assert d.vocab_size == 66  # 65 characters + unknown
    assert len(d.splits["train"]) == int(1_115_394 * 0.9)


@pytest.mark.parametrize("override,match", [
    ("trainer.max_step=10", "max_step"),
    ("model.hidden=10", "hidden"),
    ("trainer.max_steps=ten", "max_steps"),
    ("trainer.precision=fp8", "fp32, bf16, fp16"),
    ("model.cell=transformer", "rnn, lstm, gru"),
])
def test_bad_override_fails_at_compose_time(override, match):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(override)
    assert match in str(e.value) + str(e.value.__cause__)


@pytest.mark.parametrize("overrides,match", [
    (["model=attention", "model.n_heads=3"], "divisible"),
    (["model=lstm", "model.bidirectional=true"], "see the next"),
    (["model=lstm", "model.tie_weights=true"], "embed_dim"),
    (["model.dropout=1.5"], "dropout"),
    (["model=attention", "model.word_dropout=1.0"], "model.word_dropout"),
    (["model=attention", "model.conv_kernel=-1"], "model.conv_kernel"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["trainer.max_steps=0"], "max_steps"),
    (["trainer.precision=fp16", "trainer.device=cpu"], "fp16 needs a GPU"),
])
def test_cross_field_checks(overrides, match):
    with pytest.raises(UserError, match=match):
        validate(make_cfg(*overrides))


def test_unknown_key_in_a_yaml_without_schema_is_caught():
    cfg = make_cfg()
    with open_dict(cfg.model):  # as if a YAML file had the typo
        cfg.model.hiden_size = 3
    with pytest.raises(UserError, match="hiden_size is not a parameter"):
        validate(cfg)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_mistyped_override_exits_nonzero_naming_the_key_and_the_keys(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli("trainer.max_step=5")
    err = capsys.readouterr().err
    assert e.value.code != 0
    assert "max_step" in err
    assert "max_steps" in err and "eval_every" in err  # the keys that do exist
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_missing_data_file_is_one_line_without_traceback(tmp_path):
    """The real process: its exit status, and stderr as the terminal shows it."""
    r = run_script(f"data.path={tmp_path}/nope.txt", f"hydra.run.dir={tmp_path}/run")
    assert r.returncode == 2
    assert "nope.txt" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- what a dataset brings
def plain(*overrides: str) -> dict:
    return OmegaConf.to_container(make_cfg(*overrides), resolve=True)


def data_and_model(recipe: str) -> tuple[str, str]:
    """recipe/<data>_<model>.yaml: what `data=<data> model=<model>` brings."""
    found = [(d, recipe[len(d) + 1:]) for d in GROUPS["data"] if recipe.startswith(f"{d}_")]
    found = [(d, m) for d, m in found if m in GROUPS["model"]]
    assert len(found) == 1, f"recipe/{recipe}.yaml is not named <data>_<model>"
    return found[0]


def leaves(node: dict, prefix: str = "") -> dict:
    """{"optimizer.lr": 0.003, ...}: the values a YAML file writes (not its defaults list)."""
    out = {}
    for key, value in node.items():
        if key == "defaults":
            continue
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("recipe", GROUPS["recipe"])
def test_every_recipe_is_chosen_by_its_data_and_model(recipe):
    """Recipes are optional; one that exists is what `data=D model=M` brings, on top of
    data_defaults/D.yaml: it validates, and the values its file writes are the run's."""
    data, model = data_and_model(recipe)
    cfg = make_cfg(f"data={data}", f"model={model}")
    validate(cfg)
    assert plain(f"data={data}", f"model={model}") != plain(f"data={data}", f"model={model}", "~recipe")
    # (a recipe may also be another's as it is: recipe/imdb_minlstm.yaml writes nothing of its own)
    own = leaves(OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "recipe" / f"{recipe}.yaml")))
    composed = plain(f"data={data}", f"model={model}")
    for key, value in own.items():
        node = composed
        for part in key.split("."):
            node = node[part]
        assert node == value, key


@pytest.mark.parametrize("experiment", sorted(set(GROUPS["experiment"]) & set(GROUPS["recipe"])))
def test_model_and_data_compose_to_the_experiment(experiment):
    """`model=X data=D` is `experiment=D_X` where both exist: the measured settings, written once
    (recipe/), the experiment file only choosing the data and the model."""
    data, model = data_and_model(experiment)
    assert plain(f"model={model}", f"data={data}") == plain(f"experiment={experiment}")
    assert set(OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml")) == {"defaults"}
    if data == "imdb":
        t = make_cfg(f"model={model}", "data=imdb").trainer
        assert t.max_steps == -1 and t.max_epochs >= 1 and t.keep_last == 0  # epochs, not char's 600 steps


def test_the_recipe_is_the_measured_one():
    c = make_cfg("model=lstm", "data=imdb")
    assert (c.model.num_layers, c.model.bidirectional, c.model.pooling, c.data.max_len, c.data.batch_size) == \
        (2, True, "max", 1000, 64)
    assert (c.trainer.max_epochs, c.trainer.eval_every, c.trainer.ema) == (4, 176, 0.995)
    ngram = make_cfg("model=ngram", "data=imdb")  # model/ngram.yaml chooses its optimizer and schedule
    assert (ngram.optimizer._target_, ngram.scheduler._target_, ngram.trainer.max_epochs) == \
        ("torch.optim.Adam", "seqexp.schedules.constant", 4)
    assert (ngram.model.train_r, ngram.model.w_adj) == (False, 0.0)  # NBSVM's own form (recipe/imdb_ngram.yaml)
    assert make_cfg("model=ngram", "data=imdb", "optimizer=adamw").optimizer._target_ == "torch.optim.AdamW"


@pytest.mark.parametrize("model", [m for m in ALL_MODELS if f"imdb_{m}" not in GROUPS["recipe"]])
def test_a_model_without_a_recipe_gets_the_datasets_trainer_defaults(model):
    # e.g. the model added through the search path (tests/extension): no recipe, no edit anywhere
    c, alone = plain(SEARCH, f"model={model}", "data=imdb"), plain(SEARCH, f"model={model}")
    assert c["model"] == alone["model"] and c["optimizer"] == alone["optimizer"]
    t = c["trainer"]
    assert (t["max_steps"], t["max_epochs"], t["eval_every"], t["keep_last"], c["data"]["batch_size"]) == (-1, 4, 176, 0, 64)


def test_overrides_and_experiments_win_over_the_recipe():
    c = make_cfg("model=lstm", "data=imdb", "trainer.max_steps=600", "model.hidden_size=64", "trainer.keep_last=2",
                 "data.batch_size=32")
    assert (c.trainer.max_steps, c.model.hidden_size, c.trainer.keep_last, c.data.batch_size) == (600, 64, 2, 32)
    assert c.model.num_layers == 2  # the rest of the recipe stays
    seed = make_cfg("experiment=imdb_seed_rnn")  # its own settings, without recipe/imdb_rnn.yaml's
    assert (seed.model.bidirectional, seed.model.pooling, seed.model.dropout) == (False, "last", 0.0)
    assert (seed.trainer.max_epochs, seed.trainer.eval_every, seed.data.batch_size) == (1, 250, 32)
    assert seed.trainer.keep_last == 0  # data_defaults/imdb.yaml where the experiment says nothing
    bare = make_cfg("model=lstm", "data=imdb", "~recipe")
    assert bare.model == make_cfg("model=lstm").model and bare.trainer.max_steps == -1


@pytest.mark.parametrize("data", ["shakespeare"])  # the memory lab trains to a target: tests/test_lab_target.py
def test_char_and_the_lab_keep_the_default_trainer(data):
    assert plain(f"data={data}")["trainer"] == plain()["trainer"]
    assert make_cfg().trainer.max_steps == 600  # `python scripts/train.py`: about 2 minutes


def test_help_lists_the_recipes_and_says_how_they_are_chosen(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for group in ("recipe", "data_defaults"):  # every option of the two groups chosen for the user
        options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}\n" in out, group
    assert "data_defaults and recipe follow data and model" in out
