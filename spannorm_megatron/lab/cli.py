"""`python tools/signal_propagation.py`: per-layer signals of every placement x depth x
output-projection init, at initialization and optionally after N training steps.

    python tools/signal_propagation.py                        # all placements, L = 8..128,
                                                              # scale_init megatron/sqrt_depth/none
    python tools/signal_propagation.py --placements spannorm postnorm --depths 32 128 \\
        --scale-init sqrt_depth none --train-steps 50 --out runs/sigprop

Writes into --out: layers.csv (per layer), summary.csv + summary.md (one row per model and
step), signals.json (settings, summary, per-layer values, training losses) and PNG plots
(see spannorm_megatron.lab.plots); with --export (for docs/), summary.md, the plots and
signals.json.gz only. Single process, CPU or one GPU; small width by default
(hidden 64, 4 heads, init std 1/sqrt(hidden)), so the default grid runs in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from spannorm_megatron.errors import ConfigError, UserError
from spannorm_megatron.config.options import (SEED, add_arguments, from_namespace, option,
                                               parse_options)
from spannorm_megatron.placements import PLACEMENTS, SCALE_INIT_NAMES, SCALE_INIT_RULES

if TYPE_CHECKING:
    from spannorm_megatron.lab.propagation import ProbeSettings

DEFAULT_DEPTHS = (8, 16, 32, 64, 128)
# Megatron-LM's own first, then the others in the registry's order.
DEFAULT_SCALE_INITS = ("megatron", *(name for name in SCALE_INIT_NAMES if name != "megatron"))
_SCALE_INIT_TEXT = ", ".join(f"{name} ({rule.std})" for name, rule in SCALE_INIT_RULES.items())


def _split(values: Optional[List[str]]) -> List[str]:
    """`a b`, `a,b` and `a, b` all give [a, b]."""
    out = []
    for value in values or []:
        out += [v.strip() for v in str(value).split(",") if v.strip()]
    return out


def _ints(values: List[str], flag: str) -> List[int]:
    try:
        return [int(v) for v in _split(values)]
    except ValueError:
        raise ConfigError(f"{flag} takes integers, e.g. `{flag} 8 32 128`; got {values}.") from None


def _scale_init(value: str):
    if value in (*SCALE_INIT_NAMES, "default"):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"--scale-init {value!r} is not understood: use {_SCALE_INIT_TEXT}, default (each "
            f"placement's own) or a positive number c (c * sigma).") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"--scale-init {value}: a number must be positive (c * sigma).")
    return number


# The options, declared once (spannorm_megatron.config.options); one dataclass per --help group. Lists
# are read as text: `8,32` and `8 32` both work, checked in `parse`.
@dataclass
class GridOptions:
    placements: List[str] = option(
        doc=f"Placements to probe (registered: {', '.join(PLACEMENTS)}).",
        default_factory=lambda: list(PLACEMENTS), nargs="+")
    depths: List[str] = option(doc="Layer counts L (>= 2).",
                               default_factory=lambda: [str(d) for d in DEFAULT_DEPTHS],
                               nargs="+")
    scale_init: List[str] = option(
        doc=f"Output-projection inits (ModelConfig.scale_init): {_SCALE_INIT_TEXT}, a number "
            f"c = c*sigma, default = each placement's own default. Several at once.",
        default_factory=lambda: list(DEFAULT_SCALE_INITS), nargs="+")


@dataclass
class ModelOptions:
    hidden_size: int = option(64, "Hidden size of every probed model.")
    num_attention_heads: int = option(4, "Attention heads.")
    ffn_hidden_size: Optional[int] = option(None, "Default: 4 x hidden.")
    init_std: str = option("inv_sqrt_hidden", "Base init std sigma: a number, or "
                                              "inv_sqrt_hidden for 1/sqrt(hidden).")
    normalization: str = option("RMSNorm", "The norm layers.", choices=("RMSNorm", "LayerNorm"))


@dataclass
class BatchOptions:
    tokens: str = option("corpus", "corpus: real text from the embedded corpus (stdlib "
                                   "sources); random: uniform random ids.",
                         choices=("corpus", "random"))
    tokenizer_model: Optional[str] = option(
        None, "SentencePiece model for --tokens corpus (e.g. runs/quickstart/tokenizer.model); "
              "default: UTF-8 bytes, vocabulary 256.", path="tokenizer_model")
    vocab_size: Optional[int] = option(
        None, "Model vocabulary; default: the tokenizer's (256 for bytes/random).")
    corpus_bytes: int = option(1_000_000, "How much of the embedded corpus to tokenize for "
                                          "--tokens corpus.")
    seq_length: int = option(32, "Tokens per sequence.")
    batch_size: int = option(4, "Sequences in the fixed batch.")


@dataclass
class TrainingOptions:
    train_steps: int = option(0, "Also measure after this many AdamW steps on the fixed batch "
                                 "(0: only at initialization).")
    measure_at: Optional[List[str]] = option(
        None, "Explicit step counts to measure at (overrides --train-steps), e.g. 0 10 50.",
        nargs="+")
    lr: float = option(1e-3, "Constant AdamW learning rate.")
    clip_grad: float = option(1.0, "0 disables clipping.")


@dataclass
class OutputOptions:
    seed: int = option(1234, "Seeds the batch and every model's initialization.", **SEED)
    threads: Optional[int] = option(None, "torch intra-op threads.")
    out: str = option("runs/signal_propagation", "Output directory.", path="output_folder")
    no_plots: bool = option(False, "Skip the PNG files.")
    from_json: Optional[str] = option(
        None, "Run no model: write the summary, CSV and plots again from an earlier run's "
              "signals.json (one written with per-layer values) into --out.", path="input_file")
    no_per_layer_json: bool = option(
        False, "Leave the per-layer values out of signals.json (they stay in layers.csv); keeps "
               "the JSON small for large grids.")
    export: bool = option(
        False, "Write what the docs keep: summary.md, the plots and one compressed table, "
               "signals.json.gz with every per-layer value (no CSVs), overwriting the files in "
               "--out (e.g. with --from-json into docs/stability/propagation).")


SECTIONS: Tuple[Tuple[str, type], ...] = (
    ("grid", GridOptions), ("model", ModelOptions), ("batch", BatchOptions),
    ("training on the fixed batch", TrainingOptions), ("run and output", OutputOptions))


@dataclass
class PropagationCommand:
    """One invocation, parsed and checked: the options by section, and what they resolve to."""

    batch: BatchOptions
    output: OutputOptions
    placements: List[str]
    depths: List[int]
    scale_inits: List[Union[str, float]]
    settings: ProbeSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="signal_propagation.py",
        description="Per-layer forward/backward signals of deep models for every norm "
                    "placement, depth and output-projection init (spannorm_megatron.lab).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for title, owner in SECTIONS:
        add_arguments(p.add_argument_group(title), owner)
    return p


def parse(argv: Optional[List[str]] = None) -> PropagationCommand:
    """The command line, parsed into its sections and checked."""
    # --help, a mistyped flag, a path not of its kind: before torch loads
    namespace = parse_options(build_parser(), [owner for _, owner in SECTIONS], argv)
    from spannorm_megatron.lab.propagation import ProbeSettings, check_grid
    from spannorm_megatron.placements import get_placement

    grid, model, batch, training, output = (from_namespace(owner, namespace)
                                            for _, owner in SECTIONS)
    placements = _split(grid.placements)
    for placement in placements:
        get_placement(placement)  # ConfigError listing the registered ones
    depths = _ints(grid.depths, "--depths")
    scale_inits = [_scale_init(v) for v in _split(grid.scale_init)]
    if model.init_std == "inv_sqrt_hidden":
        init_std = None
    else:
        try:
            init_std = float(model.init_std)
        except ValueError:
            raise ConfigError(f"--init-std {model.init_std!r}: give a number (e.g. 0.02) or "
                              f"inv_sqrt_hidden.") from None
    if training.measure_at is not None:
        measure_at = sorted(set(_ints(training.measure_at, "--measure-at")))
    else:
        if training.train_steps < 0:
            raise ConfigError(f"--train-steps {training.train_steps} must be >= 0.")
        measure_at = sorted({0, training.train_steps})
    settings = ProbeSettings(
        hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size, init_method_std=init_std,
        normalization=model.normalization, seed=output.seed, measure_at=tuple(measure_at),
        lr=training.lr, clip_grad=training.clip_grad,
    )
    check_grid(placements, depths, scale_inits, settings)
    return PropagationCommand(batch=batch, output=output, placements=placements, depths=depths,
                              scale_inits=scale_inits, settings=settings)


def run(argv: Optional[List[str]] = None) -> List[str]:
    command = parse(argv)
    import torch

    from spannorm_megatron.lab.batch import make_batch
    from spannorm_megatron.lab.propagation import run_propagation
    from spannorm_megatron.lab.results import write_outputs
    from spannorm_megatron.runtime import destroy
    from spannorm_megatron.process import initialize

    out, batch_options, settings = command.output, command.batch, command.settings
    if out.from_json:
        from spannorm_megatron.lab.results import load_json

        try:
            run = load_json(out.from_json)
        except (ValueError, KeyError, TypeError, EOFError, OSError) as error:  # incl. gzip's
            raise UserError(f"--from-json {out.from_json} is not a signals.json this tool wrote "
                            f"({type(error).__name__}: {error}): pass the signals.json (or "
                            f".json.gz) of an earlier run's --out.") from None
        return write_outputs(run, out.out, plots=not out.no_plots,
                             per_layer_json=not out.no_per_layer_json, export=out.export,
                             log=lambda line: print(line, flush=True))
    if out.threads:
        torch.set_num_threads(out.threads)
    batch = make_batch(batch_options.tokens, batch_size=batch_options.batch_size,
                       seq_length=batch_options.seq_length, seed=out.seed,
                       vocab_size=batch_options.vocab_size,
                       tokenizer_model=batch_options.tokenizer_model,
                       corpus_bytes=batch_options.corpus_bytes)
    placements, depths, scale_inits = command.placements, command.depths, command.scale_inits
    models = len(placements) * len(depths) * len(scale_inits)
    print(f"signal propagation: {len(placements)} placements x depths {depths} x scale_init "
          f"{[str(s) for s in scale_inits]} = {models} models; hidden {settings.hidden_size}, "
          f"init std {settings.resolved_init_std:.4g}; measured at steps "
          f"{list(settings.measure_at)}; tokens: {batch.description}", flush=True)
    started = time.perf_counter()
    initialize(seed=out.seed)
    try:
        result = run_propagation(placements, depths, scale_inits, settings, batch,
                                 log=lambda line: print(line, flush=True))
    finally:
        destroy()
    written = write_outputs(result, out.out, plots=not out.no_plots,
                            per_layer_json=not out.no_per_layer_json, export=out.export,
                            log=lambda line: print(line, flush=True))
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    try:
        run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
