"""The commands: every console script is a package module's `main`, every tools/NAME.py a thin
entry point to one of them (no sys.path edits), and versions are pinned in one place."""

import ast
import contextlib
import importlib
import io
import os
import json
import re
import subprocess
import sys

import pytest

from _tools import TOOL_MODULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")


def console_scripts():
    """name -> "module:function" of setup.py's console_scripts, read without running setup."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    entries = ast.literal_eval(value)
                    return dict(entry.split("=", 1) for entry in entries)
    raise AssertionError("setup.py declares no console_scripts")


def tool_files():
    return sorted(name[:-3] for name in os.listdir(TOOLS) if name.endswith(".py"))


def test_no_file_under_tools_edits_sys_path():
    offenders = []
    for folder, _, names in os.walk(TOOLS):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                if re.search(r"\bsys\.path\b", open(path).read()):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []


def test_every_console_script_resolves_to_a_callable_main():
    scripts = console_scripts()
    assert len(scripts) >= 13
    for name, target in scripts.items():
        module_name, function = target.split(":")
        assert name.startswith("spannorm-") and function == "main", (name, target)
        assert callable(getattr(importlib.import_module(module_name), function)), name


@pytest.mark.parametrize("tool", tool_files())
def test_each_tool_is_a_documented_entry_point_to_a_console_script(tool):
    """tools/NAME.py: a docstring naming its console script, then that script's `main`."""
    tree = ast.parse(open(os.path.join(TOOLS, f"{tool}.py")).read())
    module = TOOL_MODULES[tool]
    imports = [node for node in tree.body if isinstance(node, ast.ImportFrom)
               and node.module.startswith("spannorm_megatron")]
    assert [(node.module, [a.name for a in node.names]) for node in imports] == [
        (module, ["main"])]
    script = next(name for name, target in console_scripts().items()
                  if target == f"{module}:main")
    assert f"`{script}`" in ast.get_docstring(tree)
    functions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert functions == [], "the tool's code belongs in the package"


@pytest.mark.parametrize("tool", sorted(TOOL_MODULES))
def test_each_command_answers_help(tool):
    """Every parser builds from its declarations (`--help` exits 0 and lists the flags)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = importlib.import_module(TOOL_MODULES[tool]).main(["--help"])
        except SystemExit as exit_:  # a main that leaves argparse's exit to the interpreter
            status = exit_.code
    assert status == 0 and "usage:" in out.getvalue()


_HELP_WITHOUT_TORCH = """
import contextlib, importlib, io, json, sys
loaded = {}
for name, target in json.loads(sys.argv[1]).items():
    main = getattr(importlib.import_module(target.split(":")[0]), "main")
    for argv in (["--help"], ["--no-such-flag"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                status = main(argv)
            except SystemExit as exit_:
                status = exit_.code
        loaded[f"{name} {argv[0]}"] = [status, "torch" in sys.modules]
print(json.dumps(loaded))
"""


def test_help_and_a_mistyped_flag_are_answered_without_importing_torch():
    """torch and megatron-core take seconds to import: every command answers --help (status 0)
    and an unknown flag (status 2) before it loads them. One process asks them all, in
    setup.py's order: the first command that loads torch is the one named."""
    scripts = console_scripts()
    result = subprocess.run([sys.executable, "-c", _HELP_WITHOUT_TORCH, json.dumps(scripts)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.splitlines()[-1])
    assert len(answers) == 2 * len(scripts)
    assert [case for case, (_, torch) in answers.items() if torch] == []
    assert {case: status for case, (status, _) in answers.items()} == {
        case: 0 if case.endswith("--help") else 2 for case in answers}


def _dev_pin(name):
    text = open(os.path.join(TOOLS, "requirements-dev.txt")).read()
    (version,) = re.findall(rf"^{re.escape(name)}==(\S+)$", text, re.MULTILINE)
    return version


def test_versions_are_pinned_in_setup_py_and_the_requirements_file_only():
    """The GPU kit reads its versions from tools/requirements-dev.txt, and no other file spells
    the megatron-core or Transformer Engine pin."""
    kit = subprocess.run(["bash", os.path.join(TOOLS, "gpu", "prepare.sh"), "--print-pins"],
                         capture_output=True, text=True, timeout=60)
    assert kit.returncode == 0, kit.stderr
    pins = dict(item.split("==") for item in kit.stdout.split())
    assert pins["megatron-core"] == _dev_pin("megatron-core")
    te = pins["transformer-engine"]
    setup = open(os.path.join(ROOT, "setup.py")).read()
    low, high = re.search(r'"transformer-engine\[pytorch\]>=([\d.]+),<([\d.]+)"', setup).groups()
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(te) < as_tuple(high)
    spelled = []
    for folder in ("tools", ".ci", "examples"):
        for path, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in names:
                if name == "requirements-dev.txt" or not name.endswith((".sh", ".py", ".txt")):
                    continue
                text = open(os.path.join(path, name), errors="replace").read()
                if re.search(r"(megatron[-_]core|transformer[-_]engine)==\d", text):
                    spelled.append(os.path.relpath(os.path.join(path, name), ROOT))
    assert spelled == []


def test_gpu_check_caps_add_up_inside_each_call_s_budget():
    """tools/gpu/check.sh's caps (docs/gpu.md's arithmetic): setup, first light and the target
    rows fill the first call's 340 s budget at most, setup and the tests the second's 270 s."""
    result = subprocess.run(["bash", os.path.join(TOOLS, "gpu", "check.sh"), "--plan"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = (int(n) for n in re.findall(r"\): (\d+) s of a", result.stdout))
    assert 0 < first <= 340 and 0 < second <= 270, result.stdout
