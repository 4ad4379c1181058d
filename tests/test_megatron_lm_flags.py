"""Every flag `spannorm-train` shares with Megatron-LM core_v0.16.1 means what it means there.

The reference is `tests/data/megatron_lm/arguments_core_v0.16.1.json`: Megatron-LM's own parser
(`add_megatron_arguments`), dumped by `make_table.py` beside it. For every option string both
parsers know, `differences()` compares, by kind:

- meaning: given as in each of the table's examples (the flag alone for a switch; its choices or
  a sample value otherwise), the shared dest holds the value Megatron-LM's parser stored there.
  The shared dest is Megatron-LM's dest where our namespace has one of that name (so our
  `--disable-bias-linear` is judged by `add_bias_linear`, as Megatron-LM's is), else our
  action's own. This compares what a switch stores, not its argparse class: our
  BooleanOptionalAction `--x/--no-x` and Megatron-LM's store_false `--no-x` agree when `--no-x`
  stores the same value in the same dest. A value is compared as JSON, so 3 and 3.0, [3] and 3,
  None and False differ. The examples go through our whole parse (`BASE_ARGV` + the example,
  then the checks `parse_args` runs); where those checks refuse the combination for reasons of
  their own (`--fp8-format` needs `--bf16`), argparse's value is taken. Examples are skipped
  where type or nargs differ (reported there) and for choices we do not have (reported under
  choices).
- type: int / float / str / bool by name (argparse without type= stores a str); a converter of
  either side's own (Megatron-LM's moe_freq_type, our union parsers) is judged by meaning only.
- nargs; choices (ours: argparse's, or the choices the field declares and its converter checks).
- default: the dest's value when the flag is absent, compared as JSON (an enum member as its
  name). Our flags declared with `fallback=` (config/options.py) have no value until
  `parse_args` copies the other flag's: they match only where Megatron-LM fills the same dest from the same flag after
  parsing (the table's fallbacks_after_parse: `--lr-decay-iters` from `--train-iters`);
  elsewhere the effective default differs and is reported (`--max-position-embeddings` falls
  back to `--seq-length` here, Megatron-LM has none and requires it).
- required: argparse's `required`, and the table's required_after_parse: a dest Megatron-LM
  refuses to run without must be refused here too: no default of ours, and `parse_args` without
  the shared flags of that requirement (from `BASE_ARGV`) raises ConfigError naming one of them.

Deliberate differences are listed in ALLOWED_DIFFERENCES with the reason. The test fails on a
difference not listed, and on a listed entry that no longer matches any difference, so the list
cannot outlive the difference it excuses. `python tests/test_megatron_lm_flags.py` prints all
differences by kind, and the flags only one side has.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import namedtuple
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional

from _path_kinds import make_good
from spannorm_megatron.config.options import fill_fallbacks, options
from spannorm_megatron.errors import ConfigError, UserError
from spannorm_megatron.training import arguments

TABLE = Path(__file__).parent / "data" / "megatron_lm" / "arguments_core_v0.16.1.json"

# Deliberate differences from Megatron-LM. A key is "--flag" (every difference of that flag) or
# "--flag kind" (only that kind: default, type, nargs, choices, required, meaning); the value says
# why. Keep each entry commented.
ALLOWED_DIFFERENCES: Dict[str, str] = {
    # Megatron-LM runs on GPUs only, where nccl is the one backend; unset here picks nccl on
    # GPUs and gloo on CPU (nccl cannot run there), so a GPU run gets Megatron-LM's value.
    "--distributed-backend default": "unset: nccl on GPUs, gloo on CPU",
    # Unset means 1e-3, Megatron-LM's value
    # (ModelConfig.resolved_moe_router_bias_update_rate); unset is kept
    # so that a rate given without --moe-router-enable-expert-bias can be refused.
    "--moe-router-bias-update-rate default": "unset means Megatron-LM's 1e-3",
    # Both are switches whose absence means "load": False here, None there; no run differs.
    "--no-load-optim default": "False and None both mean: load the optimizer",
    "--no-load-rng default": "False and None both mean: load the RNG state",
    # Megatron-LM counts --num-query-groups only under --group-query-attention (its default 1
    # is never read otherwise); so do we, and unset means one group per head.
    "--num-query-groups default": "read only with --group-query-attention, in both stacks",
    # auto is ours: Transformer Engine where it imports and a GPU is present, local elsewhere.
    # Megatron-LM's three choices mean the same here (inference_optimized is refused by name).
    "--transformer-impl choices": "adds auto",
    # ByteLevelTokenizer is ours (UTF-8 bytes, no model file); Megatron-LM's types we do not
    # build are refused by name (spannorm_megatron/data/sp_model.py).
    "--tokenizer-type choices": "adds ByteLevelTokenizer",
}

KINDS = ("default", "type", "nargs", "choices", "required", "meaning")

# A command line our parse_args accepts, giving one flag of each of Megatron-LM's
# required_after_parse groups (the required-check drops them one group at a time). The model
# values need only be valid together.
BASE_ARGV = {
    "--num-layers": "2",
    "--hidden-size": "64",
    "--num-attention-heads": "4",
    "--max-position-embeddings": "64",
    "--seq-length": "32",
    "--micro-batch-size": "1",
    "--train-iters": "2",
    "--lr": "0.001",
    "--tokenizer-type": "ByteLevelTokenizer",
}

Difference = namedtuple("Difference", "flag kind detail")


# ---------------------------------------------------------------------------- the two parsers
@lru_cache(maxsize=None)
def table() -> Dict[str, Any]:
    return json.loads(TABLE.read_text())


@lru_cache(maxsize=None)
def parser():
    return arguments.build_parser()


def megatron_actions() -> Dict[str, Dict[str, Any]]:
    return {option: action for action in table()["actions"]
            for option in action["option_strings"]}


def our_actions() -> Dict[str, Any]:
    return {option: action for action in parser()._actions for option in action.option_strings}


@lru_cache(maxsize=None)
def our_fields() -> Dict[str, Any]:
    """dest -> the dataclass field declaring the flag."""
    return {field.name: field for _, owner in arguments.SECTIONS for field in options(owner)}


def _argv(flags: Dict[str, str]) -> List[str]:
    return [text for flag, value in flags.items() for text in (flag, value)]


def _parse(argv: List[str]):
    """Our namespace for BASE_ARGV + argv: the flags `parse_args` resolves (the parser is built
    once; test_parse_matches_parse_args keeps the two equal). Where parse_args' checks refuse the
    combination, argparse's namespace with fallbacks filled: the value a flag stores does not
    depend on them. ConfigError if argparse itself refuses."""
    full = _argv(BASE_ARGV) + argv
    namespace = parser().parse_args(full)
    try:
        arguments._resolve(namespace)
    except UserError:  # a check of a combination (ConfigError, TokenizerError, ...)
        namespace = parser().parse_args(full)
        fill_fallbacks([owner for _, owner in arguments.SECTIONS], namespace)
    return namespace


# ---------------------------------------------------------------------------- comparing
def _plain(value: Any) -> str:
    """A value as JSON text, enum members (the table's {"enum", "name"}) as their name."""
    def walk(v):
        if isinstance(v, dict) and "enum" in v:
            return v["name"]
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v if v is None or isinstance(v, (bool, int, float, str)) else {"repr": repr(v)}
    return json.dumps(walk(value))


def _type_name(action) -> Optional[str]:
    kind = action.type
    if kind is None:
        return "str" if action.nargs != 0 else None
    return getattr(kind, "__name__", repr(kind))


def _our_choices(action) -> Optional[List[str]]:
    if action.choices is not None:
        return [str(c) for c in action.choices]
    field = our_fields().get(action.dest)
    choices = field.metadata["choices"] if field is not None else None
    choices = choices() if callable(choices) else choices
    return None if choices is None else [str(c) for c in choices]


def _their_choices(mlm) -> Optional[List[str]]:
    if mlm["choices"] is None:
        return None
    return [c["name"] if isinstance(c, dict) else str(c) for c in mlm["choices"]]


def _shared_dest(mlm, ours) -> str:
    dests = {a.dest for a in parser()._actions}
    return mlm["dest"] if mlm["dest"] in dests else ours.dest


def _default(flag, mlm, ours, dest) -> Optional[Difference]:
    theirs, mine = mlm["default"], parser().get_default(dest)
    field = our_fields().get(dest)
    fallback = field.metadata["fallback"] if field is not None else None
    if fallback and mine is None:
        source = megatron_actions().get(fallback)
        same = source is not None and any(
            f["dest"] == mlm["dest"] and f["value"] == "args." + source["dest"]
            for f in table()["fallbacks_after_parse"])
        if same:
            return None
        later = "".join(f", then {f['value']} if {f['when']} ({f['source']})"
                        for f in table()["fallbacks_after_parse"] if f["dest"] == mlm["dest"])
        return Difference(flag, "default", f"ours: unset, then {fallback}'s value after "
                          f"parsing; Megatron-LM: {_plain(theirs)}{later or ' and no fallback'}")
    if _plain(mine) != _plain(theirs):
        later = "".join(f", then {f['value']} if {f['when']} ({f['source']})"
                        for f in table()["fallbacks_after_parse"] if f["dest"] == mlm["dest"])
        return Difference(flag, "default", f"ours {_plain(mine)} ({dest}), Megatron-LM "
                                           f"{_plain(theirs)} ({mlm['dest']}){later}")
    return None


def _meaning(flag, mlm, ours, dest, choices) -> List[Difference]:
    found = []
    for example in mlm["examples"]:
        argv = example["argv"]
        if argv[0] != flag or (choices is not None and not set(argv[1:]) <= set(choices)):
            continue
        try:
            with _paths_that_exist(ours, argv[1:]):
                value = _plain(getattr(_parse(argv), dest))
        except ConfigError as error:
            value = f"refused ({error})"
        if value != _plain(example["value"]):
            found.append(Difference(flag, "meaning", f"{' '.join(argv)}: ours {dest} = {value}, "
                                    f"Megatron-LM {mlm['dest']} = {_plain(example['value'])}"))
    return found


@contextlib.contextmanager
def _paths_that_exist(action, values: List[str]):
    """A path flag's example values, made to exist as paths of the flag's kind (ours are checked
    while parsing, Megatron-LM's when first read: what a flag stores is compared here)."""
    kind = getattr(action.type, "path_kind", None)
    if kind is None:
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        before = os.getcwd()
        os.chdir(folder)
        try:
            for value in dict.fromkeys(values):
                make_good(kind, Path(folder) / value)
            yield
        finally:
            os.chdir(before)


def _compare(flag: str, mlm: Dict[str, Any], ours) -> List[Difference]:
    found = []
    dest = _shared_dest(mlm, ours)
    theirs_type = mlm["type"] if mlm["type"] is not None or mlm["nargs"] == 0 else "str"
    mine_type = _type_name(ours)
    plain_types = {"int", "float", "str", "bool"}
    type_differs = theirs_type in plain_types and mine_type in plain_types \
        and theirs_type != mine_type
    if type_differs:
        found.append(Difference(flag, "type", f"ours {mine_type}, Megatron-LM {theirs_type}"))
    if ours.nargs != mlm["nargs"]:
        found.append(Difference(flag, "nargs", f"ours {ours.nargs!r}, Megatron-LM "
                                               f"{mlm['nargs']!r}"))
    mine_choices, theirs_choices = _our_choices(ours), _their_choices(mlm)
    if (mine_choices and sorted(mine_choices)) != (theirs_choices and sorted(theirs_choices)):
        found.append(Difference(flag, "choices", f"ours {mine_choices}, Megatron-LM "
                                                 f"{theirs_choices}"))
    if ours.required != mlm["required"]:
        found.append(Difference(flag, "required", f"argparse required: ours {ours.required}, "
                                                  f"Megatron-LM {mlm['required']}"))
    default = _default(flag, mlm, ours, dest)
    if default:
        found.append(default)
    if not type_differs and ours.nargs == mlm["nargs"]:
        found += _meaning(flag, mlm, ours, dest, mine_choices)
    return found


def _required_after_parse() -> List[Difference]:
    """Each of Megatron-LM's required_after_parse groups that we share a flag of: parse_args
    without those flags must raise ConfigError naming one of them."""
    found = []
    by_dest = {}
    for action in table()["actions"]:
        by_dest.setdefault(action["dest"], []).extend(action["option_strings"])
    mine = our_actions()
    for requirement in table()["required_after_parse"]:
        flags = [f for dest in requirement["any_of"] for f in by_dest.get(dest, []) if f in mine]
        if not flags:
            continue
        label, where = " / ".join(flags), requirement["source"]
        if not set(flags) & set(BASE_ARGV):
            found.append(Difference(flags[0], "required", f"BASE_ARGV gives none of {label}: "
                                    "add one, so the check can leave it out"))
            continue
        # A default fills the absence, so such a flag cannot be required (and the ConfigError
        # below could then come from the default's value rather than the absence).
        defaults = {f: parser().get_default(mine[f].dest) for f in flags}
        if any(value is not None for value in defaults.values()):
            found += [Difference(f, "required", f"Megatron-LM refuses to run without {label} "
                                 f"({where}); here it defaults to {_plain(value)}")
                      for f, value in defaults.items() if value is not None]
            continue
        argv = _argv({f: v for f, v in BASE_ARGV.items() if f not in flags})
        try:
            arguments.parse_args(argv)
        except ConfigError as error:
            if not any(f in str(error) for f in flags):
                found.append(Difference(flags[0], "required", f"without {label}: ConfigError "
                                        f"names none of them: {error}"))
            continue
        for flag in flags:
            found.append(Difference(flag, "required", f"Megatron-LM refuses to run without "
                                    f"{label} ({where}); parse_args here accepts its absence"))
    return found


def differences() -> List[Difference]:
    """Every difference between our flags and Megatron-LM's, for the option strings both have."""
    theirs, mine = megatron_actions(), our_actions()
    found = []
    for flag in sorted(set(theirs) & set(mine)):
        found += _compare(flag, theirs[flag], mine[flag])
    return found + _required_after_parse()


def allowed(difference: Difference) -> Optional[str]:
    """The ALLOWED_DIFFERENCES key that excuses this difference, if any."""
    for key in (f"{difference.flag} {difference.kind}", difference.flag):
        if key in ALLOWED_DIFFERENCES:
            return key
    return None


def report(found: List[Difference]) -> str:
    lines = []
    for kind in KINDS:
        rows = [d for d in found if d.kind == kind]
        lines.append(f"== {kind} differs ({len(rows)})")
        lines += [f"  {d.flag}: {d.detail}" + (f"  [allowed: {allowed(d)}]" if allowed(d) else "")
                  for d in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- tests
def test_parse_matches_parse_args():
    """_parse is parse_args (with BASE_ARGV), so the meaning checks see what a run sees."""
    assert vars(_parse([])) == arguments.parse_args(_argv(BASE_ARGV)).recorded_args()


def test_table_is_megatron_lm_core_v0_16_1():
    header = table()
    assert (header["tag"], header["commit"], header["megatron_core"]) == (
        "core_v0.16.1", "55ac7082517c3878ae653c07c09c534b8aed49f6", "0.16.1")
    assert {"--num-layers", "--hidden-size", "--lr"} <= set(megatron_actions()) & set(our_actions())


def test_shared_flags_mean_what_they_mean_in_megatron_lm():
    found = differences()
    unexpected = [d for d in found if not allowed(d)]
    stale = [key for key in ALLOWED_DIFFERENCES
             if not any(allowed(d) == key for d in found)]
    message = []
    if unexpected:
        message.append(f"{len(unexpected)} difference(s) from Megatron-LM core_v0.16.1 "
                       "(fix the flag, or list it in ALLOWED_DIFFERENCES with the reason):\n"
                       + report(unexpected))
    if stale:
        message.append("ALLOWED_DIFFERENCES entries that match no difference any more "
                       f"(remove them): {stale}")
    assert not message, "\n\n".join(message)


def test_the_package_knows_megatron_lm_flags_by_the_table():
    """spannorm_megatron/training/megatron_lm_flags.txt names what the refusals below know;
    after the table is regenerated it must follow (write the table's option strings there)."""
    from spannorm_megatron.training.megatron_lm import megatron_lm_flags

    assert megatron_lm_flags() == {o for o in megatron_actions() if o.startswith("--")}


def test_every_megatron_lm_flag_we_lack_is_refused_by_name_with_a_reason(tmp_path, capsys):
    from spannorm_megatron.train import main as train_main

    missing = sorted(o for o in set(megatron_actions()) - set(our_actions())
                     if o.startswith("--"))
    assert len(missing) > 100  # the table holds what it should
    assert train_main([*_argv(BASE_ARGV), *missing]) == 2
    err = capsys.readouterr().err
    assert f"{len(missing)} Megatron-LM flags that spannorm-train does not take" in err
    assert "Traceback" not in err
    for flag in missing:
        assert f"\n  {flag}: " in err, flag
    # The same for a --config key, in either spelling.
    config = tmp_path / "run.yaml"
    config.write_text(f"{missing[0][2:].replace('-', '_')}: 1\n")
    assert train_main(["--config", str(config)]) == 2
    assert f"{missing[0]} is a Megatron-LM flag that spannorm-train does not take" in \
        capsys.readouterr().err


if __name__ == "__main__":
    theirs, mine = megatron_actions(), our_actions()
    print(report(differences()))
    print(f"\n== ours only ({len(set(mine) - set(theirs))})")
    print("  " + " ".join(sorted(set(mine) - set(theirs))))
    print(f"\n== Megatron-LM only ({len(set(theirs) - set(mine))})")
    print("  " + " ".join(sorted(set(theirs) - set(mine))))
