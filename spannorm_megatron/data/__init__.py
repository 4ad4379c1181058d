"""Data: embedded corpus, SentencePiece tokenizer, Megatron indexed datasets and batches.

The pipeline, in the order a run uses it (each step also has a command-line tool):

1. `corpus`     the embedded default corpus (Python stdlib sources), no download needed
2. `tokenizer_training` train a SentencePiece model (`spannorm-train-tokenizer`:
                `tokenizer_training_cli`)
3. `tokenizer`  `build_tokenizer` for Megatron-LM's `--tokenizer-type`s: the SentencePiece model
                as a megatron-core tokenizer (`eod`, `pad`, `vocab_size`, ...),
                `ByteLevelTokenizer`, and (`tokenizer_types`) GPT2BPETokenizer,
                HuggingFaceTokenizer, Llama2Tokenizer, NullTokenizer
4. `preprocess` text or JSONL → `.bin`/`.idx`, Megatron's format (`spannorm-preprocess`:
                `preprocess_cli`)
5. `dataset`    megatron-core GPT datasets from `--data-path` / `--split`
6. `loader`     resumable micro-batches for `training.gpt_step.forward_step`

Helpers: `documents` (input formats), `indexed` (output names, safe writing, `.bin`/`.idx`
check), `tokenizer_args` (the tools' tokenizer flags, the run record's tokenizer digest),
`sp_model` (SentencePiece file check), `progress`, `cli`, `errors`. The flags' sections,
`DataConfig` and `TokenizerConfig`, are `spannorm_megatron.config.data` and `.tokenizer`.

Importing this package is cheap; megatron-core (seconds to import) loads only when a name that
needs it is first used, e.g. `spannorm_megatron.data.SentencePieceTokenizer`.
"""

from importlib import import_module

_EXPORTS = {
    "DataError": "errors",
    "TokenizerError": "errors",
    "InputFileError": "errors",
    "IndexedDatasetError": "errors",
    "embedded_corpus": "corpus",
    "embedded_corpus_documents": "corpus",
    "write_embedded_corpus": "corpus",
    "SentencePieceTokenizer": "tokenizer",
    "ByteLevelTokenizer": "tokenizer",
    "GPT2BPETokenizer": "tokenizer_types",
    "HuggingFaceTokenizer": "tokenizer_types",
    "Llama2Tokenizer": "tokenizer_types",
    "NullTokenizer": "tokenizer_types",
    "TokenizerConfig": "spannorm_megatron.config.tokenizer",
    "build_tokenizer": "tokenizer",
    "check_data_fits_vocab": "tokenizer",
    "TokenizerTrainingConfig": "tokenizer_training",
    "train_sentencepiece": "tokenizer_training",
    "PreprocessConfig": "preprocess",
    "preprocess": "preprocess",
    "check_indexed_dataset": "indexed",
    "output_prefix": "indexed",
    "DataConfig": "spannorm_megatron.config.data",
    "build_gpt_datasets": "dataset",
    "num_samples_for": "dataset",
    "PretrainingSampler": "loader",
    "build_data_loader": "loader",
    "build_data_iterators": "loader",
    "iterate_batches": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = _EXPORTS[name]  # a module of this package, or the config section it reads
        return getattr(import_module(module if "." in module else f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
