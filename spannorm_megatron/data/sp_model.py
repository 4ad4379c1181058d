"""Megatron-LM's special pieces in SentencePiece models. (A model file's check is
`config.tokenizer_files.check_sentencepiece_model`: a `TokenizerConfig` runs it while the flags
are parsed.)"""

MEGATRON_SPECIAL_PIECES = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
"""The pieces Megatron-LM's `SentencePieceTokenizer` looks up by name, in the order it resolves
them. `tools/train_tokenizer.py` puts them into every model as control symbols, so a model
trained here has the same ids (and `<EOD>` is the end-of-document id) in Megatron-LM and here,
and Megatron-LM does not need to grow the vocabulary past the model."""

EOD_PIECE = "<EOD>"
"""The end-of-document piece (`tokenizer.eod`), appended to each document by `--append-eod`."""
