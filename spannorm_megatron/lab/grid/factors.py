"""The grid's factors: what a cell may vary from the base setting, the levels each takes, and
one planned run (a setting, its group and its cell)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from spannorm_megatron.errors import UserError
from spannorm_megatron.placements import SCALE_INIT_NAMES


class GridError(UserError):
    """A grid file that cannot run as declared (named factor, level or budget, and the fix)."""


@dataclass
class Setting:
    """What one run trains with (flags derived from it in `train_flags`)."""

    placement: str
    depth: int
    seed: int
    corpus: str = "stdlib"
    tokenizer: str = "sp4096"
    scale_mode: str = "init"
    scale_init: str = "default"
    lr: Optional[float] = None              # None: the base config's
    warmup: Optional[int] = None
    tokens_per_step: Optional[int] = None
    train_iters: Optional[int] = None
    width: Optional[int] = None
    embeddings: str = "untied"              # spannorm-train's default
    on_collapse: str = "warn"               # spannorm-train's default: the alarm only warns


def _number(kind: type) -> Callable[[object], object]:
    def parse(level):
        try:
            value = kind(level)
        except (TypeError, ValueError):
            raise ValueError(f"not a {kind.__name__}") from None
        if value <= 0:
            raise ValueError("must be positive")
        return value
    return parse


def _choice(*choices: str) -> Callable[[object], object]:
    def parse(level):
        if str(level) not in choices:
            raise ValueError(f"one of {', '.join(choices)}")
        return str(level)
    return parse


def _tokenizer_level(level):
    text = str(level)
    if text == "bytes" or re.fullmatch(r"sp\d+", text):
        return text
    raise ValueError("`bytes` (ByteLevelTokenizer) or `sp<N>` (SentencePiece, vocabulary N, "
                     "trained on the run's corpus), e.g. sp4096")


def _scale_init_level(level):
    text = str(level)
    if text in ("default", *SCALE_INIT_NAMES):
        return text
    try:
        if float(text) > 0:
            return text
    except ValueError:
        pass
    raise ValueError(f"default, {', '.join(SCALE_INIT_NAMES)} or a positive number")


@dataclass(frozen=True)
class Factor:
    name: str
    attribute: str
    parse: Callable[[object], object]
    help: str


FACTORS: Dict[str, Factor] = {f.name: f for f in (
    Factor("corpus", "corpus", str, "a name under `corpora` (stdlib = the quickstart's corpus)"),
    Factor("tokenizer", "tokenizer", _tokenizer_level,
           "bytes (ByteLevelTokenizer, vocabulary 257) or sp<N> (SentencePiece N, base sp4096)"),
    Factor("scale_mode", "scale_mode", _choice("init", "forward"), "--scale-mode"),
    Factor("scale_init", "scale_init", _scale_init_level, "--scale-init (default: placement's)"),
    Factor("lr", "lr", _number(float), "peak --lr (--min-lr follows at 10% of it)"),
    Factor("warmup", "warmup", _number(int), "--lr-warmup-iters"),
    Factor("tokens_per_step", "tokens_per_step", _number(int),
           "tokens per optimizer step (global batch = tokens / seq-length, one micro-batch)"),
    Factor("train_iters", "train_iters", _number(int), "run length, --train-iters"),
    Factor("width", "width", _number(int),
           "--hidden-size (heads fixed, --ffn-hidden-size scaled with it)"),
    Factor("embeddings", "embeddings", _choice("tied", "untied"),
           "tied = --no-untie-embeddings-and-output-weights (the base is untied)"),
    Factor("on_collapse", "on_collapse", _choice("warn", "rollback"),
           "--on-collapse (rollback: back to the checkpoint before the collapse alarm's fall, "
           "with the rollback flags' defaults; the base warns)"),
)}


def parse_cell(cell, where: str, corpora: Dict[str, str]) -> Dict[str, object]:
    """{factor: level} of one declared cell, checked (GridError names the cell and the fix)."""
    if cell is None:
        return {}
    if not isinstance(cell, dict):
        raise GridError(f"{where}: a cell is a mapping of factor names to levels (e.g. "
                        f"{{tokenizer: bytes}}, or {{}} for the base setting), not {cell!r}.")
    parsed = {}
    for name, level in cell.items():
        factor = FACTORS.get(name)
        if factor is None:
            raise GridError(
                f"{where}: unknown factor '{name}'. The factors are: "
                + "; ".join(f"{f.name} ({f.help})" for f in FACTORS.values())
                + ". (placement, depth and seed are a group's placements/depths/seeds.)")
        try:
            value = factor.parse(level)
        except ValueError as err:
            raise GridError(f"{where}: factor '{name}' has no level {level!r}: it takes "
                            f"{err}.") from None
        if name == "corpus" and value not in corpora:
            raise GridError(f"{where}: corpus '{value}' is not declared under `corpora` (known: "
                            f"{', '.join(sorted(corpora)) or 'none'}); add `{value}: PATH`.")
        parsed[name] = value
    return parsed


def cell_label(cell: Dict[str, object]) -> str:
    if not cell:
        return "base"
    return "+".join(f"{name}={level}" for name, level in cell.items())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


@dataclass
class PlannedRun:
    index: int
    group: str
    cell: Dict[str, object]
    setting: Setting

    @property
    def name(self) -> str:
        s = self.setting
        cell = "base" if not self.cell else "_".join(
            f"{_slug(k)}-{_slug(str(v))}" for k, v in self.cell.items())
        return f"{s.placement}_L{s.depth}_s{s.seed}_{cell}"

