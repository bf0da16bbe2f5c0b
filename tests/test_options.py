"""One option spec: every command of the CLI walked, one name one type, runtime settings with one
default, and `ttd.load` fed by the same spec."""

from __future__ import annotations

import ast
import inspect
import textwrap

import click
import pytest

import ttd
from ttd.cli import main
from ttd.options import RUNTIME, SETTINGS

MODEL_COMMANDS = ("tag", "segment", "eval", "eval-segmentation", "calibrate")


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield " ".join((*path, name)), command


def _options(command: click.Command):
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def _kind(option: click.Option) -> tuple:
    """What a name must mean the same everywhere: its type's class, its choices, whether it is a flag."""
    choices = getattr(option.type, "choices", None)
    return type(option.type).__name__, frozenset(choices or ()), option.is_flag


def test_one_option_name_has_one_type_everywhere():
    kinds: dict[str, dict[tuple, list[str]]] = {}
    for path, command in _commands():
        for option in _options(command):
            for flag in option.opts:
                kinds.setdefault(flag, {}).setdefault(_kind(option), []).append(path)
    clashes = {flag: found for flag, found in kinds.items() if len(found) > 1}
    assert clashes == {}


def test_every_option_has_help():
    missing = [(path, option.opts[0]) for path, command in _commands() for option in _options(command)
               if not option.help]
    assert missing == []


def test_runtime_settings_have_one_default_everywhere():
    by_flag = {s.flag: s for s in SETTINGS.values()}
    wrong = []
    for path, command in _commands():
        for option in _options(command):
            setting = by_flag.get(option.opts[0])
            if setting is not None and (option.default != setting.default or option.name != setting.name):
                wrong.append((path, option.opts[0], option.default, setting.default))
    assert wrong == []


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_every_command_that_runs_a_model_takes_the_runtime_settings(command):
    flags = {flag for option in _options(main.commands[command]) for flag in option.opts}
    assert sorted(SETTINGS[name].flag for name in RUNTIME if SETTINGS[name].flag not in flags) == []


def test_load_takes_the_specs_defaults():
    parameters = inspect.signature(ttd.load).parameters
    assert {name: parameters[name].default for name in SETTINGS if name in parameters} == \
        {name: s.default for name, s in SETTINGS.items() if name in parameters}
    assert set(SETTINGS) - set(parameters) == set()



def _body_lines(function) -> int:
    """Lines of a command's body after its docstring: the options come in, one library call, out."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(function)))
    body = ast.parse(source).body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return body[-1].end_lineno - body[0].lineno + 1


def test_every_command_body_is_at_most_30_lines():
    lengths = {path: _body_lines(command.callback) for path, command in _commands() if command.callback}
    assert len(lengths) >= 15 and lengths["tag"] > 5
    assert {path: n for path, n in lengths.items() if n > 30} == {}
