"""key=value options of the commands: typed values, free text untouched, unknown keys named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from seqexp.errors import UserError
from seqexp.options import parse


@dataclass
class Opts:
    length: int = 5
    temperature: float = 1.0
    greedy: bool = False
    top_k: Optional[int] = 40
    prompt: str = "\n"


def test_values_take_the_type_of_their_field():
    args, o, extra = parse(["run", "length=7", "temperature=0.5", "greedy=true", "top_k=null",
                            "prompt=To be, or not: [to] be=", "data.path=/x"], Opts, "doc", prefixes=("data.",))
    assert args == ["run"]
    assert (o.length, o.temperature, o.greedy, o.top_k) == (7, 0.5, True, None)
    assert o.prompt == "To be, or not: [to] be="  # commas, brackets, '=' kept as typed
    assert extra == {"data.path": "/x"}


def test_free_text_is_positional():
    args, o, _ = parse(["run", "a great film = two hours well spent", "--", "rating=10/10"], Opts, "doc")
    assert args == ["run", "a great film = two hours well spent", "rating=10/10"]
    assert o == Opts()


@pytest.mark.parametrize("argv, message", [
    (["lenght=3"], "unknown option 'lenght'. Options: greedy, length, prompt, temperature, top_k"),
    (["length=three"], "length='three': expected type int"),
    (["greedy=maybe"], "expected true or false"),
    (["--length", "3"], "unknown flag --length"),
    (["data.path=x"], "unknown option 'data.path'"),  # no prefixes allowed here
])
def test_bad_options_name_the_problem(argv, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        parse(argv, Opts, "doc")


def test_help_prints_every_option_and_exits(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"], Opts, "seqexp-thing RUN_DIR")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("seqexp-thing RUN_DIR")
    assert "top_k=40" in out and "int or null" in out and "greedy=False" in out
