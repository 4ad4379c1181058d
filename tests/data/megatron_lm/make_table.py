"""Dump Megatron-LM's real command-line parser to arguments_<tag>.json.

    /work/main/.venv/bin/python tests/data/megatron_lm/make_table.py \
        [--mirror /work/.mirror/NVIDIA+Megatron-LM/repo] [--tag core_v0.16.1] [--output FILE]

Megatron-LM's parser is `add_megatron_arguments` in megatron/training/arguments.py. Much of it is
generated at run time from dataclasses (ArgumentGroupFactory over megatron/training/*config*.py
and megatron-core's TransformerConfig), so reading the source cannot list the flags: the script
builds the parser itself. It extracts megatron/training at the tag into a temporary directory
(nothing of Megatron-LM is kept or committed), makes it importable beside the installed
megatron-core (which must be the release matching the tag: TransformerConfig's fields are flags),
calls `add_megatron_arguments` on a fresh ArgumentParser and records every action.

It also records what Megatron-LM does after parsing, read from the AST of its source: the dests
it refuses to run without (`required_after_parse`, see `_requirements`) and the values it gives
dests left unset (`fallbacks_after_parse`).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import enum
import importlib
import importlib.metadata
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import types
from typing import Any, Dict, Iterable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MIRROR = "/work/.mirror/NVIDIA+Megatron-LM/repo"
DEFAULT_TAG = "core_v0.16.1"
ARGUMENTS = "megatron/training/arguments.py"
TRAINING = "megatron/training/training.py"
TOKENIZER = "megatron/training/tokenizer/tokenizer.py"
# A value for each environment variable arguments.py reads, to see which defaults move with it
# (those that do are int(...)'d, so a number).
ENV_SENTINEL = "12345"


# ---------------------------------------------------------------------------- source at the tag
def git(mirror: str, *args: str) -> str:
    return subprocess.run(["git", "-C", mirror, *args], check=True, capture_output=True,
                          text=True).stdout


def extract_training(mirror: str, tag: str, into: str) -> None:
    """megatron/training at `tag` under `into` (the whole folder: lazy imports inside the
    _add_*_args functions reach config modules beside arguments.py)."""
    archive = subprocess.run(["git", "-C", mirror, "archive", "--format=tar", tag,
                              "megatron/training"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)


# ---------------------------------------------------------------------------- building the parser
def _not_for_parser(name: str):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"shimmed megatron.training.utils.{name} was called while building the "
                           "parser; make_table.py must import the real module now")
    refuse.__name__ = name
    return refuse


def import_arguments(root: str) -> types.ModuleType:
    """megatron.training.arguments from the extracted tree, with two shims.

    Both stand in for modules that arguments.py imports at its top but uses only when it parses
    and validates (parse_args / validate_args), never while it adds arguments:
    - the package megatron.training: its __init__ imports the whole training loop (training.py,
      initialize.py, checkpointing, global state, one_logger, wandb, ...). A bare package whose
      __path__ is the extracted folder lets its submodules (argument_utils, *_config) import from
      the real files without running that __init__.
    - megatron.training.utils: imports megatron.legacy (not part of the megatron-core package) and
      the package's global state. arguments.py takes four helpers from it, called only in
      parse_args/validate_args; the shim's versions raise if anything calls them.
    """
    import megatron  # the installed megatron-core's namespace package

    megatron.__path__.append(os.path.join(root, "megatron"))
    package = types.ModuleType("megatron.training")
    package.__path__ = [os.path.join(root, "megatron", "training")]
    sys.modules["megatron.training"] = package
    utils = types.ModuleType("megatron.training.utils")
    for name in ("get_device_arch_version", "update_use_dist_ckpt", "print_rank_0",
                 "warn_rank_0"):
        setattr(utils, name, _not_for_parser(name))
    sys.modules["megatron.training.utils"] = utils
    package.utils = utils
    return importlib.import_module("megatron.training.arguments")


def build_parser(arguments: types.ModuleType) -> argparse.ArgumentParser:
    # As Megatron-LM's parse_args makes it.
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    # ArgumentGroupFactory prints a warning for each field it cannot infer a type for.
    with contextlib.redirect_stdout(io.StringIO()):
        return arguments.add_megatron_arguments(parser)


@contextlib.contextmanager
def environment(values: Dict[str, Optional[str]]):
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def env_names(source: str) -> List[str]:
    """Environment variables arguments.py reads (os.getenv / os.environ.get / os.environ[...])."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = ast.unparse(node.func)
            if func in ("os.getenv", "os.environ.get"):
                names.add(node.args[0].value)
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" \
                and isinstance(node.slice, ast.Constant):
            names.add(node.slice.value)
    return sorted(names)


# ---------------------------------------------------------------------------- recording actions
def jsonable(value: Any) -> Any:
    """`value` as JSON; what JSON cannot hold becomes {"repr": ...} (enums also keep their name)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"repr": repr(value)}
    if isinstance(value, enum.Enum):
        return {"enum": type(value).__name__, "name": value.name, "repr": repr(value)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return {"repr": repr(value)}


def kind_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The `action=` name argparse registers for this action's class (its class name if none)."""
    for name, cls in parser._registries["action"].items():
        if name is not None and cls is type(action):
            return name
    return type(action).__name__


def type_name(kind: Any) -> Optional[str]:
    if kind is None:
        return None
    if kind in (int, float, str, bool):
        return kind.__name__
    return getattr(kind, "__qualname__", None) or repr(kind)


# Texts tried on a flag that takes values, by its type's name; for a callable of Megatron-LM's own
# (moe_freq_type, tuple_type, ...) every text of CUSTOM_SAMPLES is tried and those it accepts kept.
SAMPLES = {"int": ["3"], "float": ["0.25"], "str": ["abc"], None: ["abc"], "bool": ["True"]}
CUSTOM_SAMPLES = ["2", "0.25", "abc", "1,2", "(1,2)", "[1,0,1,1]", "([0]*1+[1]*3)"]


def _texts(action: argparse.Action) -> List[str]:
    if action.choices is not None:
        return [c.name if isinstance(c, enum.Enum) else str(c) for c in action.choices]
    return SAMPLES.get(type_name(action.type), CUSTOM_SAMPLES)


def _argvs(action: argparse.Action, option: str) -> List[List[str]]:
    """Command lines that give `option`: alone for a switch, else once per sample text (and with
    two texts where it takes several)."""
    if action.nargs == 0:
        return [[option]]
    texts = _texts(action)
    if isinstance(action.nargs, int):
        return [[option] + [t] * action.nargs for t in texts]
    argvs = [[option, t] for t in texts]
    if action.nargs in ("*", "+"):
        argvs.append([option, texts[0], texts[-1]])
    if action.nargs in ("*", "?"):
        argvs.append([option])
    return argvs


def examples(parser: argparse.ArgumentParser, action: argparse.Action) -> List[Dict[str, Any]]:
    """What Megatron-LM's parser stores in the action's dest for each of _argvs (those it refuses
    are left out), so that another parser's meaning can be compared without Megatron-LM's code."""
    found = []
    for option in action.option_strings:
        for argv in _argvs(action, option):
            try:
                # Quiet: argparse reports a refusal on stderr, -h prints the help on stdout.
                with contextlib.redirect_stderr(io.StringIO()), \
                        contextlib.redirect_stdout(io.StringIO()):
                    namespace = parser.parse_args(argv)
            except (SystemExit, Exception):  # a type= callable may raise anything (KeyError, ...)
                continue
            found.append({"argv": argv, "value": jsonable(getattr(namespace, action.dest))})
    return found


def record(parser: argparse.ArgumentParser) -> List[Dict[str, Any]]:
    group_of = {id(a): g.title for g in parser._action_groups for a in g._group_actions}
    exclusive = {}
    for group in parser._mutually_exclusive_groups:
        for action in group._group_actions:
            exclusive[id(action)] = [s for other in group._group_actions if other is not action
                                     for s in other.option_strings]
    rows = []
    for action in parser._actions:
        rows.append({
            "option_strings": list(action.option_strings),
            "dest": action.dest,
            "kind": kind_of(parser, action),
            "type": type_name(action.type),
            "nargs": action.nargs,
            "choices": None if action.choices is None else jsonable(list(action.choices)),
            "default": jsonable(action.default),
            "const": jsonable(action.const),
            "required": action.required,
            "group": group_of.get(id(action)),
            "mutually_exclusive_with": exclusive.get(id(action), []),
            "help": action.help,
            "examples": examples(parser, action),
        })
    return rows


# ---------------------------------------------------------------------------- required after parse
def _args_attr(node: ast.AST) -> Optional[str]:
    """'x' for the expression `args.x`."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
            and node.value.id == "args":
        return node.attr
    return None


def _not_none(node: ast.AST) -> Optional[str]:
    """'x' for the test `args.x is not None`."""
    if isinstance(node, ast.Compare) and len(node.ops) == 1 \
            and isinstance(node.ops[0], ast.IsNot) \
            and isinstance(node.comparators[0], ast.Constant) \
            and node.comparators[0].value is None:
        return _args_attr(node.left)
    return None


def _chain_ending_in_raise(node: ast.AST) -> Optional[List[str]]:
    """The dests an `if args.x: ... elif args.y == 'c': ... else: raise` chain tests, or None:
    with none of them set, no branch but the raise is taken."""
    dests = []
    while isinstance(node, ast.If):
        test = node.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 \
                and isinstance(test.ops[0], ast.Eq) \
                and isinstance(test.comparators[0], ast.Constant):
            test = test.left
        if not _args_attr(test):
            return None
        if _args_attr(test) not in dests:
            dests.append(_args_attr(test))
        if len(node.orelse) == 1 and isinstance(node.orelse[0], ast.Raise):
            return dests
        if len(node.orelse) != 1:
            return None
        node = node.orelse[0]
    return None


def _is_none(node: ast.AST) -> Optional[str]:
    """'x' for the test `args.x is None`."""
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Is) \
            and isinstance(node.comparators[0], ast.Constant) and node.comparators[0].value is None:
        return _args_attr(node.left)
    return None


def fallbacks_after_parse(arguments_source: str, training_source: str) -> List[Dict[str, Any]]:
    """`if args.x is None: ... args.x = <expression>` (also `if ... and args.x is None`) in
    validate_args and get_optimizer_param_scheduler: the value Megatron-LM gives a flag left
    unset, and when."""
    found = []
    for file, source, name in ((ARGUMENTS, arguments_source, "validate_args"),
                               (TRAINING, training_source, "get_optimizer_param_scheduler")):
        for node in ast.walk(_function(ast.parse(source), name)):
            if not isinstance(node, ast.If):
                continue
            tests = node.test.values if isinstance(node.test, ast.BoolOp) \
                and isinstance(node.test.op, ast.And) else [node.test]
            for dest in filter(None, map(_is_none, tests)):
                assigns = [a for statement in node.body for a in ast.walk(statement)
                           if isinstance(a, ast.Assign) and len(a.targets) == 1]
                local = {a.targets[0].id: a.value for a in assigns
                         if isinstance(a.targets[0], ast.Name)}
                values = [ast.unparse(local.get(getattr(a.value, "id", None), a.value))
                          for a in assigns if _args_attr(a.targets[0]) == dest]
                if values:
                    found.append({"dest": dest, "value": " | ".join(values),
                                  "when": ast.unparse(node.test),
                                  "source": f"{file}:{node.lineno}"})
    return found


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _requirements(arguments_source: str, training_source: str,
                  tokenizer_source: str) -> List[Dict[str, Any]]:
    """Dests Megatron-LM refuses to run without, whatever else is given. Three patterns, each
    read from the AST (conditional checks, e.g. --vocab-file for a GPT2BPETokenizer only, are
    not requirements of every run and are left out):

    1. validate_args: `_check_arg_is_not_none(args, 'x')`, also inside
       `for a in [...]: _check_arg_is_not_none(args, a)`, and `assert args.x is not None` at the
       function's top level.
    2. validate_args: `if args.x is not None: ... else: assert args.y is not None` -- x or y (the
       else branch copies y into x, so a later check of x is also satisfied by y).
    3. get_optimizer_param_scheduler (training.py) and build_tokenizer (tokenizer.py): an
       if/elif chain on args.x (truthy, or == a constant) that ends in `else: raise`.
    One more, --lr, is a crash rather than a check, and is listed by hand below.
    """
    found: List[Dict[str, Any]] = []
    validate = _function(ast.parse(arguments_source), "validate_args")

    alternatives = {}  # x -> (y, line)
    for node in ast.walk(validate):
        if isinstance(node, ast.If) and _not_none(node.test):
            for statement in node.orelse:
                if isinstance(statement, ast.Assert) and _not_none(statement.test):
                    alternatives[_not_none(node.test)] = (_not_none(statement.test),
                                                          statement.lineno)

    def add(dests: List[str], line: int, file: str, how: str) -> None:
        if dests[0] in alternatives and len(dests) == 1:
            other, other_line = alternatives[dests[0]]
            dests = [dests[0], other]
            how += f"; {file}:{other_line} accepts {other} instead"
        found.append({"any_of": dests, "source": f"{file}:{line}", "how": how})

    for node in ast.walk(validate):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "_check_arg_is_not_none":
            target = node.args[1]
            if isinstance(target, ast.Constant):
                add([target.value], node.lineno, ARGUMENTS, "_check_arg_is_not_none")
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and any(
                isinstance(c, ast.Call) and ast.unparse(c.func) == "_check_arg_is_not_none"
                and isinstance(c.args[1], ast.Name) and c.args[1].id == node.target.id
                for c in ast.walk(node)):
            names = node.iter
            if isinstance(names, ast.Name):  # `required_args = [...]` assigned just before
                names = next(a.value for a in ast.walk(validate) if isinstance(a, ast.Assign)
                             and ast.unparse(a.targets[0]) == names.id)
            for element in names.elts:
                add([element.value], node.lineno, ARGUMENTS, "_check_arg_is_not_none (loop)")
    for statement in validate.body:
        if isinstance(statement, ast.Assert) and _not_none(statement.test):
            add([_not_none(statement.test)], statement.lineno, ARGUMENTS,
                "assert ... is not None")
    for x, (y, line) in alternatives.items():
        if not any(r["any_of"] == [x, y] for r in found):
            found.append({"any_of": [x, y], "source": f"{ARGUMENTS}:{line}",
                          "how": f"if args.{x} is not None ... else: assert args.{y} is not None"})

    for file, source, name in ((TRAINING, training_source, "get_optimizer_param_scheduler"),
                               (TOKENIZER, tokenizer_source, "build_tokenizer")):
        function = _function(ast.parse(source), name)
        elifs = {id(n.orelse[0]) for n in ast.walk(function) if isinstance(n, ast.If)
                 and len(n.orelse) == 1 and isinstance(n.orelse[0], ast.If)}
        for node in ast.walk(function):
            dests = None if id(node) in elifs else _chain_ending_in_raise(node)
            if dests:
                found.append({"any_of": dests, "source": f"{file}:{node.lineno}",
                              "how": f"{name}: if/elif on {' / '.join(dests)}, else raise"})

    # Not a check but a crash: get_optimizer_param_scheduler passes max_lr=args.lr to
    # megatron-core's OptimizerParamScheduler, whose __init__ does float(max_lr)
    # (megatron/core/optimizer_param_scheduler.py:145 in 0.16.1): without --lr, TypeError.
    scheduler = _function(ast.parse(training_source), "get_optimizer_param_scheduler")
    line = next(k.value.lineno for k in ast.walk(scheduler) if isinstance(k, ast.keyword)
                and k.arg == "max_lr" and _args_attr(k.value) == "lr")
    found.append({"any_of": ["lr"], "source": f"{TRAINING}:{line}",
                  "how": "max_lr=args.lr; OptimizerParamScheduler does float(max_lr) "
                         "(megatron/core/optimizer_param_scheduler.py:145): listed by hand"})
    return found


def required_after_parse(actions, *sources: str) -> List[Dict[str, Any]]:
    """_requirements, merged by dest set, keeping those the parser leaves unset by default (a
    check of a dest that always has a value never fires)."""
    defaults = {a["dest"]: a["default"] for a in actions}
    merged: Dict[tuple, Dict[str, Any]] = {}
    for requirement in _requirements(*sources):
        if any(defaults.get(d, None) is not None for d in requirement["any_of"]):
            continue
        key = tuple(requirement["any_of"])
        if key in merged:
            merged[key]["source"] += ", " + requirement["source"]
            merged[key]["how"] += "; " + requirement["how"]
        else:
            merged[key] = dict(requirement)
    return list(merged.values())


def write(table: Dict[str, Any], f) -> None:
    """Indented JSON, but one line per action, so a regenerated table diffs line by line."""
    listed = ("required_after_parse", "fallbacks_after_parse", "actions")
    header = {k: v for k, v in table.items() if k not in listed}
    f.write(json.dumps(header, indent=1)[:-2])
    for key in listed:
        f.write(f',\n "{key}": [\n' + ",\n".join("  " + json.dumps(row) for row in table[key])
                + "\n ]")
    f.write("\n}\n")


# ---------------------------------------------------------------------------- main
def main(argv: Optional[Iterable[str]] = None) -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_argument("--mirror", default=DEFAULT_MIRROR, help="Megatron-LM's git (bare) mirror.")
    cli.add_argument("--tag", default=DEFAULT_TAG)
    cli.add_argument("--output", default=None,
                     help="Default: arguments_<tag>.json beside this script.")
    options = cli.parse_args(argv)
    output = options.output or os.path.join(HERE, f"arguments_{options.tag}.json")

    core = importlib.metadata.version("megatron-core")
    expected = options.tag.removeprefix("core_v").removeprefix("core_r")
    if core != expected:
        raise SystemExit(f"megatron-core {core} is installed; the table of {options.tag} needs "
                         f"megatron-core {expected} (its TransformerConfig's fields are flags).")
    commit = git(options.mirror, "rev-parse", f"{options.tag}^{{commit}}").strip()
    arguments_source = git(options.mirror, "show", f"{options.tag}:{ARGUMENTS}")
    training_source = git(options.mirror, "show", f"{options.tag}:{TRAINING}")
    tokenizer_source = git(options.mirror, "show", f"{options.tag}:{TOKENIZER}")

    with tempfile.TemporaryDirectory(prefix="megatron-lm-") as root:
        extract_training(options.mirror, options.tag, root)
        arguments = import_arguments(root)
        names = env_names(arguments_source)
        # Some defaults are read from the environment (WORLD_SIZE, LOCAL_RANK): the table holds
        # the defaults with those variables unset, and names the variable for each.
        with environment({n: None for n in names}):
            parser = build_parser(arguments)
        # One build per variable, set alone, tells which defaults it moves.
        moved: Dict[str, List[str]] = {}
        for name in names:
            with environment({n: (ENV_SENTINEL if n == name else None) for n in names}):
                env_parser = build_parser(arguments)
            for action, env_action in zip(parser._actions, env_parser._actions):
                assert action.dest == env_action.dest
                if jsonable(action.default) != jsonable(env_action.default):
                    moved.setdefault(action.dest, []).append(name)
        used = sorted(os.path.relpath(m.__file__, root) for m in list(sys.modules.values())
                      if getattr(m, "__file__", None) and m.__file__.startswith(root))

    actions = record(parser)
    for row in actions:
        if row["dest"] in moved:
            row["default_from_env"] = moved[row["dest"]]

    command = "python tests/data/megatron_lm/make_table.py" + (
        "" if options.tag == DEFAULT_TAG else f" --tag {options.tag}")
    table = {
        "tag": options.tag,
        "commit": commit,
        "megatron_core": core,
        "python": sys.version.split()[0],
        "command": command,
        "source": "megatron.training.arguments.add_megatron_arguments on a fresh "
                  "argparse.ArgumentParser(allow_abbrev=False), as parse_args makes it",
        "notes": [
            "default is the value argparse gives when the flag is absent; values JSON cannot hold "
            "are {\"repr\": ...}, enum members {\"enum\", \"name\", \"repr\"}.",
            "type is the `type=` callable's name (null: the string as given).",
            "examples: command lines giving the flag (its choices, or sample values by type) and "
            "the value Megatron-LM's parser stores in dest for each; ones it refuses are left out.",
            "fallbacks_after_parse: `if args.x is None: args.x = <value>` (when: the whole test) "
            "in validate_args and get_optimizer_param_scheduler (value: the expression(s) "
            "assigned, ' | ' between branches).",
            "defaults read from the environment were taken with these variables unset: "
            + ", ".join(names) + "; default_from_env names the variable.",
            "the 'kitchen' group (--kitchen-config-file, --kitchen-recipe-number) exists only "
            "where megatron.core.extensions.kitchen imports (NVIDIA's kitchen package); "
            "it was " + ("present" if any("--kitchen-config-file" in a["option_strings"]
                                          for a in actions) else "absent") + " here.",
            "required_after_parse: dests Megatron-LM refuses to run without (one of any_of must "
            "be set), read from the AST of validate_args, get_optimizer_param_scheduler and "
            "build_tokenizer (lr by hand: see make_table.py); source gives file:line at the tag.",
        ],
        "files_imported": used,
        "required_after_parse": required_after_parse(actions, arguments_source, training_source,
                                                     tokenizer_source),
        "fallbacks_after_parse": fallbacks_after_parse(arguments_source, training_source),
        "actions": actions,
    }
    with open(output, "w") as f:
        write(table, f)
    print(f"{output}: {len(actions)} actions, "
          f"{sum(len(a['option_strings']) for a in actions)} option strings, "
          f"{len(table['required_after_parse'])} requirements after parsing")


if __name__ == "__main__":
    main()
