"""The grid's data: corpus -> (SentencePiece model) -> indexed dataset for every corpus and
tokenizer its runs use, prepared once under OUT/data and reused."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from typing import Dict, List, Sequence, Tuple

from spannorm_megatron.lab.grid.factors import GridError
from spannorm_megatron.lab.grid.spec import ROOT, Grid, corpus_path


def prepare_data(grid: Grid, data_dir: str, keys: Sequence[Tuple[str, str]], python: str,
                 log=print) -> Dict[str, dict]:
    """Corpus -> (SentencePiece model) -> indexed dataset for every (corpus, tokenizer) pair;
    each step is skipped when its output exists. Returns {key: info} with bytes per token."""
    os.makedirs(data_dir, exist_ok=True)
    infos = {}
    for corpus, tokenizer in keys:
        key = f"{corpus}_{tokenizer}"
        info_path = os.path.join(data_dir, f"{key}.json")
        if os.path.isfile(info_path) and os.path.isfile(
                os.path.join(data_dir, f"{key}_text_document.idx")):
            with open(info_path) as f:
                infos[key] = json.load(f)
            continue
        source = grid.corpora[corpus]
        if source == "embedded":
            text_input = os.path.join(data_dir, f"{corpus}.jsonl")
            if not os.path.isfile(text_input):
                log(f"== data: writing the embedded corpus ({grid.corpus_max_bytes} bytes) -> "
                    f"{text_input}")
                _call([python, "-m", "spannorm_megatron.data.corpus", "--max-bytes",
                       str(grid.corpus_max_bytes), text_input])
            input_format = "jsonl"
        else:
            text_input = corpus_path(source)
            input_format = "text"
        flags = []
        if tokenizer == "bytes":
            flags = ["--tokenizer-type", "ByteLevelTokenizer"]
        else:
            model_prefix = os.path.join(data_dir, key)
            if not os.path.isfile(model_prefix + ".model"):
                log(f"== data: training SentencePiece {tokenizer} on {corpus}")
                _call([python, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input",
                       text_input, "--model-prefix", model_prefix, "--vocab-size",
                       tokenizer[2:]])
            flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                     model_prefix + ".model"]
        log(f"== data: preprocessing {corpus} with {tokenizer}")
        _call([python, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", text_input,
               "--input-format", input_format, "--output-prefix", os.path.join(data_dir, key),
               "--append-eod", "--workers", "1"] + flags)
        infos[key] = _dataset_info(text_input, input_format,
                                   os.path.join(data_dir, f"{key}_text_document"))
        with open(info_path, "w") as f:
            json.dump(infos[key], f, indent=1)
    return infos



def _dataset_info(text_input: str, input_format: str, prefix: str) -> dict:
    """UTF-8 bytes of the text, tokens of the dataset (EOD included): bytes per token, which turns
    a loss per token into one per byte (corpus average)."""
    from spannorm_megatron.data.indexed import check_indexed_dataset

    nbytes = 0
    if input_format == "jsonl":
        with open(text_input) as f:
            for line in f:
                if line.strip():
                    nbytes += len(json.loads(line).get("text", "").encode("utf-8"))
    else:
        nbytes = os.path.getsize(text_input)
    tokens = check_indexed_dataset(prefix).num_tokens
    return {"text": text_input, "bytes": nbytes, "tokens": tokens,
            "bytes_per_token": nbytes / tokens if tokens else None}


def child_env(**extra) -> Dict[str, str]:
    """The children import this checkout's package, whatever an editable install points at."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=ROOT + (os.pathsep + path if path else ""), **extra)


def _call(command: List[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env())
    if result.returncode != 0:
        raise GridError(f"Data preparation failed: {shlex.join(command)}\n"
                        f"{(result.stderr or result.stdout).strip()[-2000:]}")

