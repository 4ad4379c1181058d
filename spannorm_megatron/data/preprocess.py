"""Text/JSONL to Megatron's indexed dataset (the engine behind `spannorm-preprocess`).

Same result as Megatron-LM's `tools/preprocess_data.py` without `--split-sentences` (for each
tokenizer type's ids see `tokenizer_types.py`): one `.bin`/`.idx` pair per JSON key,
named `{output_prefix}_{key}_document`, one document per input record, each string value one
sequence of its document (a list of strings: one sequence per element), `<EOD>` appended to
the document's last sequence with `--append-eod`, a document that tokenizes to nothing kept
as an empty document (a document boundary without sequences), token dtype uint16 when the
vocabulary fits (`DType.optimal_dtype`), else int32.

Parallelism: the main process reads raw records (JSONL lines or text paragraphs) and writes the
output; `workers` processes parse, decode and tokenize them (`multiprocessing.Pool.imap` with
`chunk_size` records per task, results in input order). With `workers == 1` everything runs in
the main process, which avoids inter-process copies. The pool uses the `fork` start method
where the platform has it, so workers inherit the already-imported modules instead of
re-importing megatron-core (seconds each).

Safety: inputs, tokenizer and settings are checked before anything is written; outputs are
written under temporary names and renamed only once complete (`AtomicIndexedDatasetWriter`),
so a failure (bad line, Ctrl-C) leaves existing files as they were.
"""

from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, TextIO, Tuple

import numpy

from spannorm_megatron.config.options import option
from spannorm_megatron.config.tokenizer import (
    TYPES_HELP,
    TokenizerConfig,
    check_tokenizer_args,
    tokenizer_config,
)
from spannorm_megatron.data.documents import (
    INPUT_FORMATS,
    INPUT_FORMATS_HELP,
    Record,
    RecordDecoder,
    check_input_file,
    iter_records,
    resolve_format,
)
from spannorm_megatron.errors import DataError, InputFileError, TokenizerError
from spannorm_megatron.data.indexed import (
    AtomicIndexedDatasetWriter,
    existing_outputs,
    gpt_index_cache_dir,
    output_prefix,
)
from spannorm_megatron.data.progress import ProgressPrinter, Throughput
from spannorm_megatron.data.provenance import sidecar_path, write_sidecar


@dataclass
class PreprocessConfig:
    """One preprocessing run; each field is the `spannorm-preprocess` flag of its name
    (Megatron-LM's tools/preprocess_data.py flags)."""

    input: str = option(doc="Input file: JSON Lines (Megatron-LM's loose JSON) or plain .txt; see "
                        "documents.py.", required=True, path="input_file")
    output_prefix: str = option(
        doc="Path prefix of the outputs, written as {prefix}_{key}_document.bin/.idx (parent "
        "directories are created).", required=True, path="output_file")
    tokenizer_model: Optional[str] = option(
        None, "SentencePiece .model file (spannorm-train-tokenizer writes one), or the "
        "HuggingFaceTokenizer folder; unset for the other types.", path="tokenizer_model")
    tokenizer_type: str = option("SentencePieceTokenizer", f"{TYPES_HELP} (default: "
                                 "SentencePieceTokenizer).")
    vocab_file: Optional[str] = option(None, "GPT2BPETokenizer: vocab.json.",
                                       path="input_file")
    merge_file: Optional[str] = option(None, "GPT2BPETokenizer: merges.txt.",
                                       path="input_file")
    vocab_size: Optional[int] = option(
        None, "NullTokenizer: ids 0..N-1 are data, N is the end of document.")
    json_keys: List[str] = option(
        doc="Space separated keys to extract from the JSON objects, one output each (default: "
        "text); for plain text, the one name its output is filed under.", nargs="+",
        default_factory=lambda: ["text"])
    input_format: str = option("auto", INPUT_FORMATS_HELP, choices=INPUT_FORMATS)
    split_sentences: bool = option(
        False, "Not supported (Megatron-LM needs NLTK for it); give pre-split documents as a "
        "JSON list of strings instead, each string becomes one sequence.")
    append_eod: bool = option(
        False, "Append the tokenizer's end-of-document id (eod: </s> for SentencePiece models, "
        "<|endoftext|> for GPT-2, the eos_token of a Hugging Face tokenizer) to every non-empty "
        "document.")
    workers: int = option(
        1, "Tokenizer processes (the command line's default: all cores; 1 tokenizes in this "
        "process).")
    chunk_size: int = option(32, "Documents per task sent to a worker (default 32, as "
                             "Megatron-LM).")
    partitions: int = option(
        1, "Only 1 is supported: preprocess split inputs separately and list their prefixes in "
        "--data-path instead.")
    log_interval: int = option(1000, "Print a progress line every this many documents (default "
                               "1000).")

    def __post_init__(self) -> None:
        if self.split_sentences:
            raise DataError(
                "--split-sentences is not supported here (Megatron-LM uses NLTK for it). Split "
                "the documents beforehand and store each one as a JSON list of strings: every "
                "string becomes one sequence of its document, as with --split-sentences."
            )
        if self.partitions != 1:
            raise DataError(
                f"--partitions {self.partitions} is not supported here. Split the input into "
                "files yourself, preprocess each with its own --output-prefix, and list the "
                "prefixes in --data-path (a blend needs no merge step)."
            )
        self.json_keys = list(self.json_keys)
        if not self.json_keys or len(set(self.json_keys)) != len(self.json_keys):
            raise DataError(
                f"--json-keys {' '.join(self.json_keys)}: give one or more distinct keys "
                "(default: text)."
            )
        if self.workers < 1 or self.chunk_size < 1 or self.log_interval < 1:
            raise DataError(
                f"--workers ({self.workers}), --chunk-size ({self.chunk_size}) and "
                f"--log-interval ({self.log_interval}) must each be at least 1."
            )

    @property
    def tokenizer(self) -> TokenizerConfig:
        """The tokenizer flags as one (checked) TokenizerConfig."""
        return tokenizer_config(tokenizer_type=self.tokenizer_type,
                                tokenizer_model=self.tokenizer_model, vocab_file=self.vocab_file,
                                merge_file=self.merge_file, vocab_size=self.vocab_size)

    @property
    def output_prefixes(self) -> Dict[str, str]:
        """key -> `{output_prefix}_{key}_document`, Megatron-LM's naming."""
        return {key: output_prefix(self.output_prefix, key) for key in self.json_keys}


@dataclass
class PreprocessResult:
    """What a run read and wrote."""

    outputs: Dict[str, str]
    """key -> dataset prefix written (pass it to --data-path)."""

    documents: int
    bytes: int
    tokens: int
    empty_documents: int
    """Documents that tokenized to nothing (kept as empty documents, as Megatron-LM does)."""
    seconds: float
    workers: int
    tokens_per_key: Dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def mb_per_second(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


EncodedRecord = Tuple[int, Dict[str, Tuple[numpy.ndarray, List[int]]]]
"""(input bytes, {key: (token ids, sequence lengths)})."""


class RecordEncoder:
    """Decode and tokenize one raw record; the per-process state of a worker."""

    def __init__(
        self,
        decoder: RecordDecoder,
        tokenizer_flags: TokenizerConfig,
        append_eod: bool,
        dtype: type,
        tokenizer=None,
    ) -> None:
        from spannorm_megatron.data.tokenizer import build_tokenizer

        self.decoder = decoder
        # Workers load their own copy from the flags (works under any start method); the
        # in-process encoder reuses the main process's tokenizer.
        self.tokenizer = tokenizer or build_tokenizer(tokenizer_flags)
        self.append_eod = append_eod
        self.dtype = dtype

    def __call__(self, record: Record) -> EncodedRecord:
        document = self.decoder(record)
        encoded = {}
        for key, sentences in document.items():
            ids: List[int] = []
            lengths: List[int] = []
            for sentence in sentences:
                try:
                    sentence_ids = self.tokenizer.tokenize(sentence)
                except TokenizerError as err:  # NullTokenizer's text that is not ids
                    raise InputFileError(f"Line {record[0]} of '{self.decoder.path}' (key "
                                         f"{key!r}): {err}") from None
                if sentence_ids:  # Megatron-LM drops empty sentences
                    ids.extend(sentence_ids)
                    lengths.append(len(sentence_ids))
            if self.append_eod and lengths:
                ids.append(self.tokenizer.eod)
                lengths[-1] += 1
            encoded[key] = (numpy.asarray(ids, dtype=self.dtype), lengths)
        return len(record[1]), encoded


_WORKER_ENCODER: Optional[RecordEncoder] = None


def _init_worker(*args) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = RecordEncoder(*args)


def _encode_in_worker(record: Record):
    # Bad-input errors travel back as values, so the main process raises them itself (with the
    # file/line message, no worker traceback) after stopping the pool and removing temp files.
    try:
        return _WORKER_ENCODER(record)
    except DataError as err:
        return err


def _pool_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def preprocess(config: PreprocessConfig, log: Optional[TextIO] = None) -> PreprocessResult:
    """Run one preprocessing job; raises DataError (and leaves outputs untouched) on bad input."""
    log = log if log is not None else sys.stderr
    # Everything a user can get wrong is checked before megatron-core is imported or a file opened.
    input_path = check_input_file(config.input)
    fmt = resolve_format(input_path, config.input_format)
    if fmt == "text" and len(config.json_keys) != 1:
        raise InputFileError(
            f"'{input_path}' is plain text, which holds one text per document; --json-keys "
            f"names the output it is filed under and takes one key, not {len(config.json_keys)} "
            "(default: text)."
        )
    tokenizer_flags = config.tokenizer
    check_tokenizer_args(tokenizer_flags)

    from megatron.core.datasets.indexed_dataset import DType

    from spannorm_megatron.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(tokenizer_flags)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    decoder = RecordDecoder(str(input_path), fmt, tuple(config.json_keys))
    encoder_args = (decoder, tokenizer_flags, config.append_eod, dtype)
    prefixes = config.output_prefixes
    replacing = existing_outputs(prefixes)

    size_mb = input_path.stat().st_size / 1e6
    printer = ProgressPrinter(config.log_interval, log)
    layout = "JSON Lines" if fmt == "jsonl" else "plain text, blank-line separated documents"
    printer.line(
        f"Preprocessing '{input_path}' ({size_mb:,.2f} MB, {layout}) with {tokenizer!r}, "
        f"{config.workers} worker(s), dtype {numpy.dtype(dtype).name}"
        + (f", appending eod id {tokenizer.eod}" if config.append_eod else "")
    )

    totals = Throughput()
    tokens_per_key = {key: 0 for key in prefixes}
    empty = 0
    try:
        writer = AtomicIndexedDatasetWriter(prefixes, dtype)
    except OSError as err:
        raise DataError(
            f"Cannot create the output files for --output-prefix {config.output_prefix}: "
            f"{err.strerror or err} ('{err.filename}'). Choose a prefix in a directory you can "
            "write to."
        ) from None
    pool = None
    try:
        records = iter_records(input_path, fmt)
        if config.workers == 1:
            encoder = RecordEncoder(*encoder_args, tokenizer=tokenizer)
            results = map(encoder, records)
        else:
            from spannorm_megatron.orphans import die_with_parent

            die_with_parent()  # a killed preprocessing run must not leave its workers behind
            pool = _pool_context().Pool(
                config.workers, initializer=_init_worker, initargs=encoder_args
            )
            results = pool.imap(_encode_in_worker, records, config.chunk_size)
        for result in results:
            if isinstance(result, DataError):
                raise result
            nbytes, encoded = result
            document_tokens = 0
            for key, (ids, lengths) in encoded.items():
                writer.add_document(key, ids, lengths)
                tokens_per_key[key] += len(ids)
                document_tokens += len(ids)
            empty += document_tokens == 0
            totals.add(documents=1, nbytes=nbytes, tokens=document_tokens)
            printer.update(totals)
        if totals.documents == 0:
            raise InputFileError(
                f"'{input_path}' holds no documents (it is empty or only blank lines); nothing "
                "was written. Check that --input is the file you meant."
            )
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        outputs = writer.commit()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        writer.abort()
        raise
    seconds = totals.elapsed
    printer.line(f"Done: {totals.summary()}.")
    for key, prefix in outputs.items():
        write_sidecar(prefix, tokenizer_flags, tokenizer.vocab_size)
        printer.line(f"Wrote {prefix}.bin and {prefix}.idx ({tokens_per_key[key]:,} tokens), "
                     f"and the tokenizer's record {sidecar_path(prefix)}")
        stale = gpt_index_cache_dir(prefix)
        if stale is not None:
            printer.line(
                f"warning: '{stale}' holds GPTDataset indices built for the earlier data at this "
                "prefix; they do not fit the new data (build_gpt_datasets refuses them). Delete "
                "that directory."
            )
    if replacing:
        printer.line(f"Replaced the existing {', '.join(replacing)}")
    if empty:
        printer.line(f"{empty:,} document(s) tokenized to nothing and are empty in the output")
    return PreprocessResult(
        outputs=outputs,
        documents=totals.documents,
        bytes=totals.bytes,
        tokens=totals.tokens,
        empty_documents=empty,
        seconds=seconds,
        workers=config.workers,
        tokens_per_key=tokens_per_key,
    )
