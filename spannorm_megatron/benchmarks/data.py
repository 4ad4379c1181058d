"""`spannorm-benchmark-data` (tools/benchmark_data.py): preprocessing throughput (tokens/s, MB/s),
one worker against all workers.

Example:
    spannorm-benchmark-data --input /work/shared/data/wikitext2-valid.txt \\
        --runs 5 --output bench.json

Runs spannorm-preprocess's engine on --input (JSON Lines, or .txt with blank-line separated
documents) once per run and worker count, into a temporary directory that is deleted
afterwards, and reports the median of the runs. Times cover reading, tokenizing (including
starting the worker pool) and writing .bin/.idx, not Python's start-up or imports. Without
--tokenizer-model, a BPE tokenizer (--vocab-size) is first trained on the input itself.
The corpus is read where it is: pass its path, do not copy it into the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from spannorm_megatron.data.cli import run_cli
from spannorm_megatron.errors import DataError
from spannorm_megatron.config.options import add_arguments, option, parse_sections


def _worker_counts(value: str):
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma list of positive integers")
    return counts


_CORES = os.cpu_count() or 1


@dataclass
class DataBenchmarkOptions:
    """The command line of `spannorm-benchmark-data`."""

    input: str = option(doc="Corpus file (JSONL or .txt).", required=True, path="input_file")
    json_keys: List[str] = option(doc="JSONL keys (default text).", nargs="+",
                                  default_factory=lambda: ["text"])
    tokenizer_model: Optional[str] = option(
        None, "SentencePiece .model; default: train one on the input (see --vocab-size).",
        path="tokenizer_model")
    vocab_size: int = option(
        8000, "Vocabulary of the tokenizer trained when --tokenizer-model is absent (default "
        "8000).")
    workers: List[int] = option(
        doc=f"Comma list of worker counts to compare (default: 1,{_CORES} = all cores).",
        parse=_worker_counts, metavar="N,N,...", default_factory=lambda: sorted({1, _CORES}))
    runs: int = option(3, "Runs per worker count (default 3).")
    chunk_size: int = option(32, "Documents per task (default 32).")
    append_eod: bool = option(False, "Append the eod id as in training data.")
    output: Optional[str] = option(None, "Write the results as JSON to this file.",
                                   path="output_file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser, DataBenchmarkOptions)
    return parser


def _median_run(runs):
    """The run with the median time (lower median for an even count)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return ordered[(len(ordered) - 1) // 2]


def benchmark(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and measure; bad input raises DataError."""
    (options,) = parse_sections(build_parser(), [DataBenchmarkOptions], argv)
    if options.runs < 1:
        raise DataError(f"--runs {options.runs} must be at least 1.")
    from spannorm_megatron.data.documents import check_input_file
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    input_path = check_input_file(options.input)
    with tempfile.TemporaryDirectory(prefix="benchmark_data_") as workdir:
        tokenizer_model = options.tokenizer_model
        tokenizer_note = tokenizer_model
        if tokenizer_model is None:
            from spannorm_megatron.data.tokenizer_training import (
                TokenizerTrainingConfig,
                train_sentencepiece,
            )

            trained = train_sentencepiece(
                TokenizerTrainingConfig(
                    model_prefix=os.path.join(workdir, "tokenizer"),
                    inputs=[str(input_path)],
                    json_keys=options.json_keys,
                    vocab_size=options.vocab_size,
                ),
                log=io.StringIO(),
            )
            tokenizer_model = trained.model_path
            tokenizer_note = f"BPE, vocab {options.vocab_size}, trained on the input"
        results = []
        for workers in options.workers:
            runs = []
            for run in range(options.runs):
                result = preprocess(
                    PreprocessConfig(
                        input=str(input_path),
                        output_prefix=os.path.join(workdir, f"out_w{workers}_r{run}"),
                        tokenizer_model=tokenizer_model,
                        json_keys=options.json_keys,
                        append_eod=options.append_eod,
                        workers=workers,
                        chunk_size=options.chunk_size,
                        log_interval=10**12,
                    ),
                    log=io.StringIO(),
                )
                runs.append(
                    {
                        "seconds": result.seconds,
                        "tokens_per_second": result.tokens_per_second,
                        "mb_per_second": result.mb_per_second,
                        "documents_per_second": result.documents / result.seconds,
                    }
                )
                for prefix in result.outputs.values():
                    for ext in (".bin", ".idx"):
                        os.remove(prefix + ext)
            median = _median_run(runs)
            results.append(
                {
                    "workers": workers,
                    "documents": result.documents,
                    "tokens": result.tokens,
                    "bytes": result.bytes,
                    "median_seconds": statistics.median(r["seconds"] for r in runs),
                    "median_tokens_per_second": statistics.median(
                        r["tokens_per_second"] for r in runs
                    ),
                    "median_mb_per_second": statistics.median(r["mb_per_second"] for r in runs),
                    "median_documents_per_second": median["documents_per_second"],
                    "runs": runs,
                }
            )
    base = results[0]["median_tokens_per_second"]
    for entry in results:
        entry["speedup_vs_first"] = entry["median_tokens_per_second"] / base
    report = {
        "input": str(input_path),
        "input_bytes": input_path.stat().st_size,
        "tokenizer": tokenizer_note,
        "append_eod": options.append_eod,
        "chunk_size": options.chunk_size,
        "runs_per_setting": options.runs,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "results": results,
    }
    print(
        f"Preprocessing throughput, {input_path} ({report['input_bytes'] / 1e6:.2f} MB, "
        f"{results[0]['documents']:,} documents, {results[0]['tokens']:,} tokens), tokenizer: "
        f"{tokenizer_note}; median of {options.runs} run(s), {os.cpu_count()} cores"
    )
    header = (
        f"{'workers':>7} | {'seconds':>8} | {'tokens/s':>12} | {'MB/s':>7} | {'docs/s':>9} | "
        f"{'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    for entry in results:
        print(
            f"{entry['workers']:>7} | {entry['median_seconds']:>8.3f} | "
            f"{entry['median_tokens_per_second']:>12,.0f} | "
            f"{entry['median_mb_per_second']:>7.2f} | "
            f"{entry['median_documents_per_second']:>9,.0f} | "
            f"{entry['speedup_vs_first']:>6.2f}x"
        )
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        Path(options.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"Wrote {options.output}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(benchmark, argv)


if __name__ == "__main__":
    sys.exit(main())
