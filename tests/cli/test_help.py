"""One CLI voice: every command and option says what it does in one line of one style, and the bare
command lists the commands. Walks the real parser, so a new option without help fails here."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from cohortgate import __version__
from cohortgate.cli import build_parser, main

# A help line may start with a capital only where the word is a name or an acronym.
NAMES = {"Envoy", "Envoy's", "Redis", "OIP", "JSON", "HPA", "PVC", "SPIFFE", "Istio", "Kubernetes"}
STRAY = (
    (re.compile(r"`"), "a reST/Markdown backtick"),
    (re.compile(r"\bsee \S+\.py\b|\b\w+/\w+\.py\b"), "a pointer to a source file"),
    (re.compile(r"^\s*cohortgate \w+.*\[", re.M), "a hand-written usage block"),
)


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser, help line of the command) for every command and group."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield (*path, name), child, helps.get(name)
                yield from _walk(child, (*path, name))


COMMANDS = list(_walk(build_parser()))


def _style_problems(text: str | None) -> list[str]:
    if not text:
        return ["no help"]
    problems = [why for pattern, why in STRAY if pattern.search(text)]
    if "\n" in text:
        problems.append("more than one line")
    if text.rstrip().endswith("."):
        problems.append("ends with a period")
    first = text.split()[0]
    if first[0].isupper() and first not in NAMES and not first.isupper():
        problems.append(f"starts with a capital ({first!r})")
    return problems


@pytest.mark.parametrize(("path", "parser", "helpline"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_command_and_option_has_one_line_of_help_in_one_style(path, parser, helpline):
    problems = [f"command help: {p}" for p in _style_problems(helpline)]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        problems += [f"{name}: {p}" for p in _style_problems(action.help)]
    description = parser.description or ""
    problems += [f"description: {why}" for pattern, why in STRAY if pattern.search(description)]
    if parser.formatter_class is argparse.RawDescriptionHelpFormatter:
        problems.append("description: hand-wrapped (RawDescriptionHelpFormatter)")
    assert not problems, f"cohortgate {' '.join(path)}: " + "; ".join(problems)


def test_the_style_check_catches_what_it_should():
    assert _style_problems("Policy file (YAML).") == ["ends with a period", "starts with a capital ('Policy')"]
    assert _style_problems("see gateway/stack.py") == ["a pointer to a source file"]
    assert _style_problems("the `sub` claim") == ["a reST/Markdown backtick"]
    assert _style_problems(None) == ["no help"]
    assert _style_problems("Envoy's admin port (default 9901)") == []


def test_bare_command_prints_the_command_list():
    out = subprocess.run([sys.executable, "-m", "cohortgate.cli"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = set(re.findall(r"^    (\w[\w-]*)", out.stdout, re.M))
    assert {"up", "call", "status", "rollback", "policy", "traffic", "token", "controller"} <= listed


def test_a_group_without_its_action_prints_its_actions(capsys):
    assert main(["policy"]) == 0
    out = capsys.readouterr().out
    assert all(action in out for action in ("validate", "explain", "diff", "apply", "schema"))


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cohortgate {__version__}"
