"""`python tools/signal_propagation.py`: per-layer signals of every placement x depth x
output-projection init, at initialization and optionally after N training steps.

    python tools/signal_propagation.py                        # all placements, L = 8..128,
                                                              # scale_init megatron/sqrt_depth/none
    python tools/signal_propagation.py --placements spannorm postnorm --depths 32 128 \\
        --scale-init sqrt_depth none --train-steps 50 --out runs/sigprop

Writes into --out: layers.csv (per layer), summary.csv + summary.md (one row per model and
step), signals.json (settings, summary, per-layer values, training losses) and PNG plots
(see spannorm_megatron.lab.plots). Single process, CPU or one GPU; small width by default
(hidden 64, 4 heads, init std 1/sqrt(hidden)), so the default grid runs in minutes on a CPU.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List, Optional

from spannorm_megatron.errors import ConfigError, UserError

DEFAULT_DEPTHS = (8, 16, 32, 64, 128)
DEFAULT_SCALE_INITS = ("megatron", "sqrt_depth", "none")


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
    if value in ("megatron", "sqrt_depth", "none", "default"):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(
            f"--scale-init {value!r} is not understood: use megatron (sigma/sqrt(2L)), "
            f"sqrt_depth (sigma/sqrt(L)), none (sigma), default (each placement's own) or a "
            f"positive number c (c * sigma).") from None
    if not (math.isfinite(number) and number > 0):
        raise ConfigError(f"--scale-init {value}: a number must be positive (c * sigma).")
    return number


def build_parser() -> argparse.ArgumentParser:
    from spannorm_megatron.placements import PLACEMENTS

    p = argparse.ArgumentParser(
        prog="signal_propagation.py",
        description="Per-layer forward/backward signals of deep models for every norm "
                    "placement, depth and output-projection init (spannorm_megatron.lab).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("grid")
    g.add_argument("--placements", nargs="+", default=list(PLACEMENTS),
                   help=f"Placements to probe (registered: {', '.join(PLACEMENTS)}).")
    g.add_argument("--depths", nargs="+", default=[str(d) for d in DEFAULT_DEPTHS],
                   help="Layer counts L (>= 2).")
    g.add_argument("--scale-init", nargs="+", default=list(DEFAULT_SCALE_INITS),
                   help="Output-projection inits (ModelConfig.scale_init): megatron = "
                        "sigma/sqrt(2L), sqrt_depth = sigma/sqrt(L), none = sigma, a number c = "
                        "c*sigma, default = each placement's own default. Several at once.")
    m = p.add_argument_group("model")
    m.add_argument("--hidden-size", type=int, default=64)
    m.add_argument("--num-attention-heads", type=int, default=4)
    m.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 x hidden.")
    m.add_argument("--init-std", default="inv_sqrt_hidden",
                   help="Base init std sigma: a number, or inv_sqrt_hidden for 1/sqrt(hidden).")
    m.add_argument("--normalization", default="RMSNorm", choices=["RMSNorm", "LayerNorm"])
    d = p.add_argument_group("batch")
    d.add_argument("--tokens", default="corpus", choices=["corpus", "random"],
                   help="corpus: real text from the embedded corpus (stdlib sources); random: "
                        "uniform random ids.")
    d.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model for --tokens corpus (e.g. runs/quickstart/"
                        "tokenizer.model); default: UTF-8 bytes, vocabulary 256.")
    d.add_argument("--vocab-size", type=int, default=None,
                   help="Model vocabulary; default: the tokenizer's (256 for bytes/random).")
    d.add_argument("--corpus-bytes", type=int, default=1_000_000,
                   help="How much of the embedded corpus to tokenize for --tokens corpus.")
    d.add_argument("--seq-length", type=int, default=32)
    d.add_argument("--batch-size", type=int, default=4)
    t = p.add_argument_group("training on the fixed batch")
    t.add_argument("--train-steps", type=int, default=0,
                   help="Also measure after this many AdamW steps on the fixed batch (0: only "
                        "at initialization).")
    t.add_argument("--measure-at", nargs="+", default=None,
                   help="Explicit step counts to measure at (overrides --train-steps), e.g. "
                        "0 10 50.")
    t.add_argument("--lr", type=float, default=1e-3, help="Constant AdamW learning rate.")
    t.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping.")
    o = p.add_argument_group("run and output")
    o.add_argument("--seed", type=int, default=1234)
    o.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    o.add_argument("--out", default="runs/signal_propagation", help="Output directory.")
    o.add_argument("--no-plots", action="store_true", help="Skip the PNG files.")
    o.add_argument("--from-json", default=None, metavar="SIGNALS_JSON",
                   help="Run no model: write the summary, CSV and plots again from an earlier "
                        "run's signals.json (one written with per-layer values) into --out.")
    o.add_argument("--no-per-layer-json", action="store_true",
                   help="Leave the per-layer values out of signals.json (they stay in "
                        "layers.csv); keeps the JSON small for large grids.")
    return p


def parse(argv: Optional[List[str]] = None):
    """Parsed and checked arguments: (args, placements, depths, scale_inits, settings)."""
    from spannorm_megatron.lab.propagation import ProbeSettings, check_grid
    from spannorm_megatron.placements import get_placement

    args = build_parser().parse_args(argv)
    placements = _split(args.placements)
    for placement in placements:
        get_placement(placement)  # ConfigError listing the registered ones
    depths = _ints(args.depths, "--depths")
    scale_inits = [_scale_init(v) for v in _split(args.scale_init)]
    if args.init_std == "inv_sqrt_hidden":
        init_std = None
    else:
        try:
            init_std = float(args.init_std)
        except ValueError:
            raise ConfigError(f"--init-std {args.init_std!r}: give a number (e.g. 0.02) or "
                              f"inv_sqrt_hidden.") from None
    if args.measure_at is not None:
        measure_at = sorted(set(_ints(args.measure_at, "--measure-at")))
    else:
        if args.train_steps < 0:
            raise ConfigError(f"--train-steps {args.train_steps} must be >= 0.")
        measure_at = sorted({0, args.train_steps})
    settings = ProbeSettings(
        hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, init_method_std=init_std,
        normalization=args.normalization, seed=args.seed, measure_at=tuple(measure_at),
        lr=args.lr, clip_grad=args.clip_grad,
    )
    check_grid(placements, depths, scale_inits, settings)
    return args, placements, depths, scale_inits, settings


def run(argv: Optional[List[str]] = None) -> List[str]:
    import torch

    from spannorm_megatron.lab.batch import make_batch
    from spannorm_megatron.lab.propagation import run_propagation
    from spannorm_megatron.lab.results import write_outputs
    from spannorm_megatron.runtime import destroy
    from spannorm_megatron.process import initialize

    args, placements, depths, scale_inits, settings = parse(argv)
    if args.from_json:
        from spannorm_megatron.lab.results import load_json

        return write_outputs(load_json(args.from_json), args.out, plots=not args.no_plots,
                             per_layer_json=not args.no_per_layer_json,
                             log=lambda line: print(line, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = make_batch(args.tokens, batch_size=args.batch_size, seq_length=args.seq_length,
                       seed=args.seed, vocab_size=args.vocab_size,
                       tokenizer_model=args.tokenizer_model, corpus_bytes=args.corpus_bytes)
    models = len(placements) * len(depths) * len(scale_inits)
    print(f"signal propagation: {len(placements)} placements x depths {depths} x scale_init "
          f"{[str(s) for s in scale_inits]} = {models} models; hidden {settings.hidden_size}, "
          f"init std {settings.resolved_init_std:.4g}; measured at steps "
          f"{list(settings.measure_at)}; tokens: {batch.description}", flush=True)
    started = time.perf_counter()
    initialize(seed=args.seed)
    try:
        result = run_propagation(placements, depths, scale_inits, settings, batch,
                                 log=lambda line: print(line, flush=True))
    finally:
        destroy()
    written = write_outputs(result, args.out, plots=not args.no_plots,
                            per_layer_json=not args.no_per_layer_json,
                            log=lambda line: print(line, flush=True))
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    return written


def quiet_optional_kernel_warnings() -> None:
    """megatron-core warns at import that Apex / Transformer Engine kernels are missing; on a
    CPU run that is expected and says nothing about the measurement."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed.*")


def main(argv: Optional[List[str]] = None) -> int:
    quiet_optional_kernel_warnings()
    try:
        run(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
