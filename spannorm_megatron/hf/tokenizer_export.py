"""The tokenizer of a run, for every `--tokenizer-type`, as files of the Hugging Face folder.

`prepare_export_tokenizer` builds and checks everything before the export writes a file; the
result's `write` then puts the files into the folder. Every type becomes a `tokenizer.json` that
transformers' AutoTokenizer loads (class `PreTrainedTokenizerFast`, no remote code) and that
encodes text as training did, checked on sample texts:

| type | folder | `tok(text)` |
|---|---|---|
| SentencePieceTokenizer | tokenizer.json (+ tokenizer.model), `hf/tokenizer.py` | the pieces |
| Llama2Tokenizer | the same, with `<s>` put before every text | `<s>` + the pieces |
| GPT2BPETokenizer | tokenizer.json (+ vocab.json, merges.txt): GPT-2's byte-level BPE | the BPE ids |
| HuggingFaceTokenizer | the tokenizer folder's own files, copied unchanged | the folder's |
| NullTokenizer | tokenizer.json: the ids "0".."N" as words split at whitespace | the ids |
| ByteLevelTokenizer | tokenizer.json: the 256 bytes, `<EOD>` 256 | the bytes |

A checkpoint trained with HuggingFaceTokenizer was fed its tokens without the special tokens a
tokenizer may add around a text (Megatron-LM's default); where the folder's tokenizer adds one
(e.g. Llama-3's `<|begin_of_text|>`), the export says so.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.tokenizer import SAMPLES, check_vocab


@dataclass
class ExportTokenizer:
    kind: str
    vocab_size: int
    special_ids: Dict[str, Optional[int]]
    """bos, eos, pad for config.json (None where the tokenizer has none)."""
    stop_ids: List[int]
    """generation_config.json's eos_token_id: where generation ends."""
    write: Callable[[str, int], None]
    """write(directory, model_max_length)"""
    mismatches: List[str] = field(default_factory=list)
    """Sample texts the written tokenizer encodes differently from training (empty when exact)."""
    notes: List[str] = field(default_factory=list)


def _ours(config):
    from spannorm_megatron.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(config)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def _id(value: Optional[int]) -> Optional[int]:
    return value if isinstance(value, int) and value >= 0 else None


def _compare(fast, encode: Callable[[str], List[int]], texts, **kwargs) -> List[str]:
    encoded = fast(list(texts), add_special_tokens=False, **kwargs)["input_ids"]
    return [text for text, ids in zip(texts, encoded) if ids != encode(text)]


def prepare_export_tokenizer(config, model_vocab: int, pad_multiple: Optional[int] = None,
                             log: Callable[[str], None] = print) -> ExportTokenizer:
    """Build and check the export of the tokenizer `config` (a TokenizerConfig) for a model of
    `model_vocab` embedding rows; writes nothing."""
    kind = config.tokenizer_type
    builder = {
        "SentencePieceTokenizer": _sentencepiece, "Llama2Tokenizer": _llama2,
        "GPT2BPETokenizer": _gpt2, "HuggingFaceTokenizer": _huggingface,
        "NullTokenizer": _null, "ByteLevelTokenizer": _byte_level}.get(kind)
    if builder is None:  # pragma: no cover - TokenizerConfig refuses other types
        raise ConversionError(f"--tokenizer-type {kind} has no Hugging Face export here.")
    result = builder(config, model_vocab, pad_multiple)
    check_vocab(result.vocab_size, model_vocab, pad_multiple)
    return result


# ------------------------------------------------------------------------------ SentencePiece
def _sentencepiece(config, model_vocab, pad_multiple) -> ExportTokenizer:
    from spannorm_megatron.hf.tokenizer import prepare_tokenizer, save_tokenizer

    fast, _ours_tok, info = prepare_tokenizer(config.tokenizer_model, model_vocab, pad_multiple)
    ids = info.special_ids
    # `<EOD>` too: documents of data prepared before 2026-12 end with it.
    stop = [ids["eos"]] + ([ids["eod_piece"]] if ids.get("eod_piece") not in
                           (None, ids["eos"]) else [])
    return ExportTokenizer(
        config.tokenizer_type, info.vocab_size, {k: ids.get(k) for k in ("bos", "eos", "pad")},
        stop, lambda d, n: save_tokenizer(fast, config.tokenizer_model, d, n), info.mismatches)


def _llama2(config, model_vocab, pad_multiple) -> ExportTokenizer:
    from spannorm_megatron.hf.tokenizer import (
        build_fast_tokenizer,
        compare_with_sentencepiece,
        save_tokenizer,
    )

    fast, ours = build_fast_tokenizer(config.tokenizer_model, llama2=True)
    return ExportTokenizer(
        config.tokenizer_type, ours.vocab_size,
        {"bos": ours.bos, "eos": ours.eos, "pad": _id(ours.pad)}, [ours.eod],
        lambda d, n: save_tokenizer(fast, config.tokenizer_model, d, n, add_bos_token=True),
        compare_with_sentencepiece(fast, ours, llama2=True))


# ------------------------------------------------------------------------------ GPT-2 BPE
def _gpt2(config, model_vocab, pad_multiple) -> ExportTokenizer:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from spannorm_megatron.data.tokenizer_types import GPT2_EOD
    from spannorm_megatron.hf.tokenizer import save_tokenizer

    ours = _ours(config)
    backend = ours._restore_model()  # the same BPE, pre-tokenizer and decoder as training
    backend.add_special_tokens([AddedToken(GPT2_EOD, special=True, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=GPT2_EOD,
                                   eos_token=GPT2_EOD, unk_token=GPT2_EOD,
                                   clean_up_tokenization_spaces=False)
    # Training reads a spelled-out "<|endoftext|>" as text; HF users get the eod id for it.
    mismatches = _compare(fast, ours.tokenize, SAMPLES, split_special_tokens=True)
    copies = {"vocab.json": config.vocab_file, "merges.txt": config.merge_file}
    return ExportTokenizer(
        config.tokenizer_type, ours.vocab_size, {"bos": ours.eod, "eos": ours.eod, "pad": None},
        [ours.eod], lambda d, n: save_tokenizer(fast, None, d, n, copies=copies), mismatches)


# ------------------------------------------------------------------------------ Hugging Face
def _huggingface(config, model_vocab, pad_multiple) -> ExportTokenizer:
    from spannorm_megatron.config.tokenizer_files import hf_tokenizer_files
    from spannorm_megatron.hf.generation import leading_special_ids

    ours = _ours(config)
    hf = ours.transformers_tokenizer
    folder = config.tokenizer_model
    names = hf_tokenizer_files(folder)
    notes = []
    added = leading_special_ids(hf)
    if added:
        notes.append(
            f"the tokenizer puts {hf.convert_ids_to_tokens(added)} before a text when called "
            f"as tok(text), which its training data did not have (Megatron-LM's "
            f"HuggingFaceTokenizer adds no special tokens); encode with "
            f"add_special_tokens=False to feed the model what it was trained on")

    def write(directory: str, _model_max_length: int) -> None:
        for name in names:  # the folder's own files, as the user gave them
            shutil.copyfile(os.path.join(folder, name), os.path.join(directory, name))

    mismatches = [text for text in SAMPLES
                  if hf.encode(text, add_special_tokens=False) != ours.tokenize(text)]
    return ExportTokenizer(
        config.tokenizer_type, ours.vocab_size,
        {"bos": _id(ours.bos), "eos": ours.eod, "pad": _id(ours.pad)}, [ours.eod], write,
        mismatches, notes)


# ------------------------------------------------------------------------------ ids and bytes
def _fast(backend, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   **special)


def _null(config, model_vocab, pad_multiple) -> ExportTokenizer:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from spannorm_megatron.hf.tokenizer import save_tokenizer

    ours = _ours(config)
    backend = Tokenizer(models.WordLevel({str(i): i for i in range(ours.vocab_size)},
                                         unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # decoding joins with spaces
    eod = str(ours.eod)
    backend.add_special_tokens([AddedToken(eod, special=True, normalized=False)])
    fast = _fast(backend, eos_token=eod)
    samples = ["0 1 2", f"{ours.eod - 1} 0\n{ours.eod}", "7"]
    return ExportTokenizer(
        config.tokenizer_type, ours.vocab_size, {"bos": None, "eos": ours.eod, "pad": None},
        [ours.eod], lambda d, n: save_tokenizer(fast, None, d, n),
        _compare(fast, ours.tokenize, samples))


def _byte_level(config, model_vocab, pad_multiple) -> ExportTokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from spannorm_megatron.hf.tokenizer import save_tokenizer

    ours = _ours(config)
    # Byte-level BPE without merges: each byte's symbol is the byte's own id.
    symbols = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: _byte_of(symbol) for symbol in symbols}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<EOD>", special=True, normalized=False)])
    fast = _fast(backend, eos_token="<EOD>", pad_token="<EOD>")
    if fast.eos_token_id != ours.eod:  # pragma: no cover - guards the construction above
        raise ConversionError(f"internal: <EOD> is {fast.eos_token_id}, not {ours.eod}")
    return ExportTokenizer(
        config.tokenizer_type, ours.vocab_size, {"bos": None, "eos": ours.eod, "pad": ours.eod},
        [ours.eod], lambda d, n: save_tokenizer(fast, None, d, n),
        _compare(fast, ours.tokenize, SAMPLES, split_special_tokens=True))


def _byte_of(symbol: str) -> int:
    """The byte GPT-2's byte-to-symbol map shows as `symbol`."""
    code = ord(symbol)
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
