"""Every path an entry point takes is declared with its kind (spannorm_megatron/config/paths.py)
and checked for that kind while the flags are parsed: a path that is missing, empty, a folder
where a file belongs (or the other way round), or cut short ends the command with exit status 2
and one message naming the flag, before anything heavy runs. The environment variables the
package reads are checked the same way (spannorm_megatron/config/environment.py).

The options are found in the entry points' real parsers, so a new path option is covered (and
must declare its kind) without editing this file."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re

import pytest

from _path_kinds import BAD, make_bad, make_good
from test_tools import console_scripts

from spannorm_megatron.config.environment import ENVIRONMENT
from spannorm_megatron.config.paths import PATH_KINDS, check_path
from spannorm_megatron.errors import UserError

# Entry points besides the console scripts (module -> its main), each with a build_parser().
MORE_ENTRY_POINTS = ("spannorm_megatron.lab.grid.cli", "spannorm_megatron.lab.sweep",
                     "spannorm_megatron.data.corpus")
PARSERS = {"spannorm_megatron.train": "spannorm_megatron.training.arguments"}
"""Where an entry point's build_parser lives when not in its own module."""

# An option whose name says path but that takes none, and why.
NOT_PATHS: dict = {}
PATH_WORDS = re.compile(r"^(load|save|inputs?|output|out|grid|export|json)$|"
                        r"_(path|dir|file|prefix|model|json|config)$")


def entry_points():
    modules = [target.split(":")[0] for target in console_scripts().values()]
    return sorted(set(modules) | set(MORE_ENTRY_POINTS))


@functools.lru_cache(maxsize=None)
def _parser(module: str) -> argparse.ArgumentParser:
    return importlib.import_module(PARSERS.get(module, module)).build_parser()


def _takes_a_value(action) -> bool:
    return action.nargs != 0 and action.dest != "help" and action.choices is None and (
        action.type is None or getattr(action.type, "path_kind", None) is not None
        or getattr(action.type, "__name__", "") == "str")


def path_options():
    """(entry point, flag or positional name, kind) of every path option of every parser."""
    found = []
    for module in entry_points():
        for action in _parser(module)._actions:
            kind = getattr(action.type, "path_kind", None)
            if kind:
                found.append((module, (action.option_strings or [action.dest])[0], kind))
    return found


def test_every_path_option_declares_its_kind():
    undeclared = [f"{module} {(action.option_strings or [action.dest])[0]}"
                  for module in entry_points() for action in _parser(module)._actions
                  if _takes_a_value(action) and PATH_WORDS.search(action.dest)
                  and action.dest not in NOT_PATHS
                  and getattr(action.type, "path_kind", None) is None]
    assert undeclared == [], "declare option(..., path=KIND) (config/paths.py lists the kinds)"
    kinds = {kind for _, _, kind in path_options()}
    assert kinds == set(PATH_KINDS), "a kind no option declares"
    assert len(path_options()) >= 45


def test_an_unknown_kind_is_refused_when_declared():
    from spannorm_megatron.config.options import option

    with pytest.raises(TypeError, match="the kinds are"):
        option(None, "A file.", path="file")


@pytest.mark.parametrize("kind", sorted(PATH_KINDS))
def test_a_path_of_each_kind_passes_and_bad_ones_do_not(kind, tmp_path):
    check_path(kind, make_good(kind, tmp_path / "good"))
    for index, (name, maker) in enumerate(BAD[kind]):
        with pytest.raises(UserError):
            check_path(kind, make_bad(maker, tmp_path / f"bad{index}"))


def _run(module: str, argv) -> tuple:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = importlib.import_module(module).main(argv)
        except SystemExit as exit_:
            status = exit_.code
    return status, err.getvalue()


CASES = [pytest.param(module, flag, kind, name, id=f"{module.split('.', 1)[1]} {flag} {name}")
         for module, flag, kind in path_options() for name, _ in BAD[kind]]


@pytest.mark.parametrize("module,flag,kind,fixture", CASES)
def test_a_bad_path_is_refused_naming_the_flag(module, flag, kind, fixture, tmp_path):
    maker = dict(BAD[kind])[fixture]
    bad = make_bad(maker, tmp_path / "given")
    status, err = _run(module, [flag, bad] if flag.startswith("--") else [bad])
    assert status == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {flag}" in errors[0], err


# Variables the package reads that take any text, and why.
FREE_TEXT = {"MASTER_ADDR": "a host name or address, resolved by torch's rendezvous",
             "TORCHELASTIC_RUN_ID": "only whether it is set (under torchrun) is read",
             "PYTHONPATH": "handed on to the lab's child processes as it is",
             "OMP_NUM_THREADS": "handed on to the conversion benchmark's children, for OpenMP"}


def test_every_environment_variable_the_package_reads_is_declared():
    import pathlib

    import spannorm_megatron

    names = set()
    for path in pathlib.Path(spannorm_megatron.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        names |= set(re.findall(r"os\.environ\.get\(\s*\"([A-Z_0-9]+)\"", text))
        names |= set(re.findall(r"os\.environ\[\"([A-Z_0-9]+)\"\](?!\s*=[^=])", text))
        names |= set(re.findall(r"\"([A-Z_0-9]+)\" (?:not )?in os\.environ", text))
        names |= set(re.findall(r"os\.getenv\(\s*\"([A-Z_0-9]+)\"", text))
    assert {"RANK", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE"} <= names  # the scan sees them
    assert sorted(names - set(ENVIRONMENT) - set(FREE_TEXT)) == []


BAD_VALUES = {"count": ["x", "-1"], "switch": ["maybe"], "bit": ["2"], "port": ["0", "70000"],
              "tflops": ["inf", "-5", "fast"], "output_file": ["/"]}


@pytest.mark.parametrize("name", sorted(ENVIRONMENT))
def test_an_environment_variable_not_of_its_kind_is_refused_by_name(name, monkeypatch):
    from spannorm_megatron.config.environment import check_environment

    for value in BAD_VALUES[ENVIRONMENT[name].kind]:
        monkeypatch.setenv(name, value)
        with pytest.raises(UserError, match=f"^{name}="):
            check_environment()
    monkeypatch.delenv(name)
    check_environment()


def test_entry_points_check_the_environment_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("SPANNORM_PEAK_TFLOPS", "fast")
    status, err = _run("spannorm_megatron.train", [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
        "--lr", "1e-3", "--train-iters", "1", "--tokenizer-type", "ByteLevelTokenizer",
        "--mock-data"])
    assert status == 2 and "SPANNORM_PEAK_TFLOPS='fast'" in err and "Traceback" not in err, err
    text = tmp_path / "in.txt"
    text.write_text("some text\n")
    status, err = _run("spannorm_megatron.data.preprocess_cli", [
        "--input", str(text), "--output-prefix", str(tmp_path / "out"),
        "--tokenizer-type", "ByteLevelTokenizer"])
    assert status == 2 and "SPANNORM_PEAK_TFLOPS='fast'" in err, err
    assert list(tmp_path.iterdir()) == [text]  # nothing written


def test_good_paths_of_every_kind_parse(tmp_path):
    """The fixtures the bad cases start from are accepted where declared (the refusals above
    are about the path, not about the rest of the command line)."""
    for index, (module, flag, kind) in enumerate(path_options()):
        given = make_good(kind, tmp_path / f"good{index}")
        action = next(a for a in _parser(module)._actions
                      if (a.option_strings or [a.dest])[0] == flag)
        assert action.type(given) == given
