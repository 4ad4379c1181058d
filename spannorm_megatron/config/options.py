"""Configuration fields declared once: a dataclass field carries its doc, default, Megatron-LM
flag and valid range, and everything else is generated from it.

    num_layers: int = option(4, "Transformer layers in the whole model.", at_least=1)

- `check(instance)` validates every declared field (type, choices, range) and names the flag;
  the dataclasses call it in `__post_init__`, so Python users get the same checks as the CLI.
- `add_arguments(parser, cls)` adds one argparse flag per field: `--help` shows the doc and the
  default, and a bad value ends in argparse's exit 2, naming the flag, before anything runs.
- `from_namespace(cls, args)` builds the dataclass from parsed flags; `parse_sections(parser,
  classes, argv)` parses a tool's command line into one instance of each of its classes.
- `invalid_values(cls, field)` lists values a flag must refuse, derived from the declaration, so the
  test that feeds every flag a bad value covers a new flag without being edited.
- `megatron_kwargs(instance)` gives megatron-core's `TransformerConfig` keywords of the fields
  declared with `megatron=` (the keyword's name, True for the field's own).

Written here rather than taken from megatron-core: its `ArgumentGroupFactory`
(megatron.training) is not part of megatron-core's package, and Megatron-LM keeps flags and
dataclass fields apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from spannorm_megatron.config.environment import check_environment
from spannorm_megatron.config.paths import PATH_KINDS, path_problem
from spannorm_megatron.errors import ConfigError

_MISSING = dataclasses.MISSING

SEED = dict(at_least=0, below=2 ** 32)
"""The range of every seed option (`option(1234, "...", **SEED)`): numpy and SentencePiece take
32-bit seeds, and a larger one would end in their traceback, not in the flag's refusal."""

_INT64 = 2 ** 63
"""Every integer flag fits in 64 bits: torch, numpy and the checkpoints hold it as int64."""


def option(default: Any = _MISSING, doc: str = "", *, flag: Optional[str] = None,
           choices: Optional[Tuple] = None, at_least: Optional[float] = None,
           above: Optional[float] = None, below: Optional[float] = None,
           parse: Optional[Callable[[str], Any]] = None, fallback: Optional[str] = None,
           default_factory: Any = _MISSING, derived_from: Optional[str] = None,
           path: Optional[str] = None, required: bool = False, negative: bool = False,
           nargs: Any = None, aliases: Tuple[str, ...] = (),
           metavar: Optional[str] = None, megatron: Union[bool, str] = False,
           megatron_if: Optional[str] = None) -> Any:
    """A dataclass field with its flag. `flag` defaults to `--` + the name with dashes;
    `choices` is a tuple, or a callable returning one (a registry that can grow);
    `at_least`/`above`/`below` bound numbers; `parse` turns the flag's text into a value (for
    union types); `fallback` names the flag whose value the command line uses when this one is
    not given (the dataclass default serves Python users); `derived_from` marks a field without
    a flag of its own, which the run sets from what it names (see `derived`); `path` is the
    kind of path the flag takes (`config.paths.PATH_KINDS`: input_file, data_prefix,
    checkpoint, output_folder, ...), whose check runs on every value given, while the flags
    are parsed. `required` marks a flag the command line must give, as
    Megatron-LM requires it (the dataclass default still serves Python users;
    `missing_required` lists what a command line left out). `negative` makes a boolean's flag
    switch it off, as Megatron-LM's store_false flags do (`--disable-bias-linear` sets
    add_bias_linear False; in YAML `disable-bias-linear: true` means the same). `nargs` is
    argparse's, for flags that take several values (lists take any number unless it is given;
    a scalar field with `nargs` takes a list too, as Megatron-LM's --moe-aux-loss-coeff).
    `aliases` are further spellings of the flag (an older name of ours beside Megatron-LM's).
    `metavar` names the flag's value in `--help`. A list field with `parse` takes one argument
    that `parse` splits (`--control-symbols A,B`); a list field with `choices` checks each
    element against them.
    `megatron` names the megatron-core `TransformerConfig` field this one sets (True: the same
    name), with the value of the owner's `resolved_<name>` property where it has one (the value
    an unset flag stands for); `megatron_if` names a property of the owner that must be true for
    the field to be passed (e.g. "is_moe": the MoE fields of a dense model are left out)."""
    if not doc:
        raise TypeError("option() needs its doc")
    if path is not None and path not in PATH_KINDS:
        raise TypeError(f"option(path={path!r}): the kinds are {sorted(PATH_KINDS)}")
    metadata = dict(doc=doc, flag=flag, choices=choices, at_least=at_least, above=above,
                    below=below, parse=parse, fallback=fallback, derived_from=derived_from,
                    path=path, required=required, negative=negative, nargs=nargs,
                    aliases=tuple(aliases), metavar=metavar, megatron=megatron,
                    megatron_if=megatron_if)
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def derived(default: Any, doc: str, *, source: str, **bounds) -> Any:
    """A checked field without a flag of its own: the run sets it from `source` (another flag,
    or the tokenizer)."""
    return option(default, doc, derived_from=source, **bounds)


def declared(cls) -> List[dataclasses.Field]:
    """The fields declared with `option` or `derived`, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def options(cls) -> List[dataclasses.Field]:
    """The declared fields that are flags."""
    return [f for f in declared(cls) if not f.metadata["derived_from"]]


def megatron_kwargs(instance) -> Dict[str, Any]:
    """megatron-core `TransformerConfig` keywords of `instance`'s fields declared `megatron=`."""
    owner = type(instance)
    kwargs = {}
    for field in declared(owner):
        name, condition = field.metadata["megatron"], field.metadata["megatron_if"]
        if not name or (condition and not getattr(instance, condition)):
            continue
        resolved = "resolved_" + field.name
        value = getattr(instance, resolved if hasattr(owner, resolved) else field.name)
        kwargs[field.name if name is True else name] = value
    return kwargs


def megatron_flags(owners) -> Dict[str, List[str]]:
    """megatron-core field name -> the flags that set it: the fields declared `megatron=`, and
    those named as megatron-core names them (which a section hands over under that name)."""
    flags: Dict[str, List[str]] = {}
    for owner in owners:
        for field in options(owner):
            declared_name = field.metadata["megatron"]
            names = {field.name, declared_name if isinstance(declared_name, str) else field.name}
            for name in names:
                flags.setdefault(name, [])
                if flag_of(field) not in flags[name]:
                    flags[name].append(flag_of(field))
    return flags


def flag_of(field: dataclasses.Field) -> str:
    if field.metadata["derived_from"]:
        return field.name
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


# ---------------------------------------------------------------------------- types and ranges
def _base_type(field: dataclasses.Field, owner) -> Tuple[Any, bool]:
    """(type, optional) of a field's annotation: Optional[int] -> (int, True)."""
    annotation = _type_hints(owner)[field.name]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


@functools.lru_cache(maxsize=None)
def _type_hints(owner) -> Dict[str, Any]:
    # Resolving string annotations is the slow part of every check; a class's do not change.
    return typing.get_type_hints(owner)


def _is_list(kind) -> bool:
    return typing.get_origin(kind) in (list, List)


def _range_problem(value, meta) -> Optional[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    choices = _choices(meta)
    if choices is not None and value not in choices:
        return f"is not one of {list(choices)}"
    if meta["at_least"] is not None and value < meta["at_least"]:
        return f"must be >= {meta['at_least']}"
    if meta["above"] is not None and not value > meta["above"]:
        return f"must be > {meta['above']}"
    if meta["below"] is not None and not value < meta["below"]:
        return f"must be < {meta['below']}"
    if isinstance(value, int) and not isinstance(value, bool) and not -_INT64 <= value < _INT64:
        return "does not fit in 64 bits"
    return None


def _choices(meta) -> Optional[Tuple]:
    """A field's choices; a callable is asked when needed (registries that grow at run time)."""
    choices = meta["choices"]
    return tuple(choices()) if callable(choices) else choices


def _type_problem(value, kind) -> Optional[str]:
    if kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if kind is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else \
            "must be an integer"
    if kind is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            "must be a number"
    if kind is str:
        return None if isinstance(value, str) else "must be a string"
    if _is_list(kind):
        element = _element_type(kind)
        if not isinstance(value, (list, tuple, str)):
            return f"must be a list of {element.__name__}s"
        if element is not str and isinstance(value, (list, tuple)):
            return next((why for v in value if (why := _type_problem(v, element))), None)
        return None
    return None  # unions: the owner's own check (and the field's `parse`) decide


def problem(owner, field: dataclasses.Field, value) -> Optional[str]:
    """Why `value` cannot be this field's, or None."""
    kind, optional = _base_type(field, owner)
    if value is None:
        return None if optional else "must be set"
    if isinstance(value, (list, tuple)) and field.metadata["nargs"] is not None \
            and not _is_list(kind):  # one value, or several on the command line
        return next((why for v in value if (why := problem(owner, field, v))), None)
    return _type_problem(value, kind) or (
        None if kind is bool or _is_list(kind) else _range_problem(value, field.metadata))


def check(instance) -> None:
    """Raise ConfigError for the first declared field whose value is out of its type or range."""
    for field in declared(type(instance)):
        value = getattr(instance, field.name)
        why = problem(type(instance), field, value)
        if why:
            name = flag_of(field)
            name += "" if name == field.name else f" ({field.name})"
            raise ConfigError(f"{name} = {value!r} {why}.")


# ---------------------------------------------------------------------------- argparse
def _element_type(kind):
    """The element type of List[X] (str when unannotated)."""
    args = typing.get_args(kind)
    return args[0] if args else str


def _converter(owner, field: dataclasses.Field, kind=None) -> Callable[[str], Any]:
    """Text -> value of one flag argument (one element of a list flag when `kind` is given)."""
    kind = kind or _base_type(field, owner)[0]
    meta = field.metadata

    def convert(text: str):
        try:
            value = meta["parse"](text) if meta["parse"] else kind(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(
                str(error) if meta["parse"] else
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        why = _range_problem(value, meta) if isinstance(value, (int, float, str)) else None
        if why:
            raise argparse.ArgumentTypeError(f"{text!r} {why}")
        why = _path_problem(field, value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    # argparse names the type in its errors; Megatron-LM's table compares it too.
    named = meta["parse"] if meta["parse"] in (int, float, str) else kind
    convert.__name__ = named.__name__ if isinstance(named, type) else "value"
    convert.path_kind = meta["path"]  # for whoever inspects a parser (tests find paths by it)
    return convert


def add_arguments(parser, owner) -> None:
    """One flag per declared field of `owner` (dest = the field's name)."""
    for field in options(owner):
        kind, optional = _base_type(field, owner)
        meta = field.metadata
        default = None if meta["fallback"] or meta["required"] else _default(field)
        help_text = meta["doc"] + (f" Default: {meta['fallback']}." if meta["fallback"] else "") \
            + (" Required." if meta["required"] else "")
        kwargs: Dict[str, Any] = dict(dest=field.name, help=help_text, default=default)
        if kind is bool and meta["negative"]:
            parser.add_argument(*_spellings(field), action="store_false", **kwargs)
            continue
        if kind is bool:
            # Every switch also has its --no- form, so a command line can undo a --config key
            # (Megatron-LM's store_true flags mean the same; the --no- form is an addition).
            negatable = not flag_of(field).startswith(("--no-", "--disable-"))
            action = argparse.BooleanOptionalAction if negatable else "store_true"
            parser.add_argument(*_spellings(field), action=action, **kwargs)
            continue
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if _is_list(kind) and meta["parse"] is not None:  # one argument, split by `parse`
            parser.add_argument(*_spellings(field), type=_list_converter(field), **kwargs)
            continue
        if _is_list(kind):
            element = _element_type(kind)
            if element is not str or meta["choices"] is not None or meta["path"]:
                kwargs["type"] = _converter(owner, field, element)
            parser.add_argument(*_spellings(field), nargs=meta["nargs"] or "*", **kwargs)
            continue
        if meta["nargs"] is not None:
            kwargs["nargs"] = meta["nargs"]
        kwargs.setdefault("metavar", _metavar(kind, meta))
        parser.add_argument(*_spellings(field), type=_converter(owner, field), **kwargs)


def _list_converter(field: dataclasses.Field) -> Callable[[str], Any]:
    parse = field.metadata["parse"]

    def convert(text: str):
        try:
            return parse(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = "value"
    return convert


def parse_options(parser: argparse.ArgumentParser, owners, argv=None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, refusing what leaves out a flag declared `required=True` as
    argparse refuses a missing required argument (exit status 2, the flags named), and an
    environment variable the package reads whose value is not of its kind
    (`config.environment`)."""
    args = parser.parse_args(argv)
    missing = missing_required(owners, args)
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    check_environment()
    return args


def parse_sections(parser: argparse.ArgumentParser, owners, argv=None) -> List[Any]:
    """`parse_options`, then one instance of each of `owners` built from the flags it declares:
    what a tool's entry point reads, never the namespace."""
    args = parse_options(parser, owners, argv)
    return [from_namespace(owner, args) for owner in owners]


def _spellings(field: dataclasses.Field) -> Tuple[str, ...]:
    return (flag_of(field), *field.metadata["aliases"])


def _default(field: dataclasses.Field):
    if field.default_factory is not _MISSING:
        return field.default_factory()
    return None if field.default is _MISSING else field.default


def _metavar(kind, meta) -> Optional[str]:
    if meta["choices"] is not None and not callable(meta["choices"]):
        return "{" + ",".join(str(c) for c in meta["choices"]) + "}"
    return {int: "N", float: "X"}.get(kind)  # strings: argparse shows the flag name


def coerce(owner, field: dataclasses.Field, value, where: str):
    """A YAML value for this field, checked as the flag's text would be."""
    kind, optional = _base_type(field, owner)
    if value is None and optional:
        return None
    if isinstance(value, (list, tuple)) and field.metadata["nargs"] is not None \
            and not _is_list(kind):  # a scalar field that takes several values on the command line
        return [coerce_one(owner, field, v, where) for v in value]
    return coerce_one(owner, field, value, where)


def coerce_one(owner, field: dataclasses.Field, value, where: str):
    kind, optional = _base_type(field, owner)
    if value is None and optional:
        return None
    if kind is bool or _is_list(kind):
        why = _type_problem(value, kind)
        if why is None and _is_list(kind) and (_element_type(kind) is not str
                                               or field.metadata["path"]):
            items = value.split() if isinstance(value, str) else value
            try:
                return [_converter(owner, field, _element_type(kind))(str(v)) for v in items]
            except argparse.ArgumentTypeError as error:
                why = str(error)
    elif isinstance(value, bool):
        why = f"{value!r} is not a value of this flag"
    else:
        try:
            return _converter(owner, field)(str(value))
        except argparse.ArgumentTypeError as error:
            why = str(error)
    if why:
        raise ConfigError(f"{where}: {flag_of(field)[2:]}: {why.rstrip('.')}.")
    return value


def from_namespace(owner, args: argparse.Namespace, **overrides):
    """`owner` built from the parsed flags (fields without a flag keep their default unless
    given in `overrides`)."""
    values = {f.name: getattr(args, f.name) for f in options(owner)}
    values.update(overrides)
    return owner(**values)


def fill_fallbacks(owners, args: argparse.Namespace) -> None:
    """Give flags declared with `fallback=` the value of the flag they fall back to."""
    for owner in owners:
        for field in options(owner):
            source = field.metadata["fallback"]
            if source and getattr(args, field.name) is None:
                setattr(args, field.name, getattr(args, source.lstrip("-").replace("-", "_")))


def missing_required(owners, args: argparse.Namespace) -> List[str]:
    """The flags declared `required=True` that neither the command line nor --config gave."""
    return [flag_of(field) for owner in owners for field in options(owner)
            if field.metadata["required"] and getattr(args, field.name, None) is None]


# ---------------------------------------------------------------------------- paths
def _path_problem(field: dataclasses.Field, value) -> Optional[str]:
    """Why `value` is not a path of the field's declared kind (`config.paths`), or None. A
    data prefix list's blend weights are numbers, not paths."""
    kind = field.metadata["path"]
    if kind is None or not isinstance(value, str) or kind == "data_prefix" and is_number(value):
        return None
    return path_problem(kind, flag_of(field), value)


def path_type(kind: str) -> Callable[[str], str]:
    """argparse's `type=` for an argument that is not a declared field (a positional, a file of
    flags): the value, checked as a path of `kind`."""
    if kind not in PATH_KINDS:
        raise TypeError(f"path_type({kind!r}): the kinds are {sorted(PATH_KINDS)}")

    def convert(text: str) -> str:
        why = path_problem(kind, "", text)
        if why:
            raise argparse.ArgumentTypeError(why)
        return text

    convert.__name__ = "path"
    convert.path_kind = kind
    return convert


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------- bad values
def invalid_values(owner, field: dataclasses.Field) -> List[str]:
    """Texts the flag must refuse, derived from the declaration alone."""
    kind, _ = _base_type(field, owner)
    meta = field.metadata
    if kind is bool or _is_list(kind):
        return []
    values = []
    if meta["parse"] is not None:
        values.append("no-such-value")
    if meta["choices"] is not None:
        values.append("no-such-choice")
    if kind in (int, float):
        values.append("not-a-number")
    if kind is float:
        values.append("nan")
    if kind is int:
        values.append("1.5")
    for bound, step in (("at_least", -1), ("above", 0)):
        if meta[bound] is not None:
            values.append(repr(meta[bound] + step) if kind is not int or step else
                          str(int(meta[bound]) + step))
    if meta["below"] is not None:
        values.append(repr(meta["below"]))
    return values
