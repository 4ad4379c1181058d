"""The tokenizers megatron-core's GPTDataset and the training loop use: `build_tokenizer` for
every `--tokenizer-type` (the others are in `tokenizer_types.py`), and the SentencePiece one.

`SentencePieceTokenizer` is megatron-core's own text tokenizer (`MegatronTokenizerText` from
`megatron.core.tokenizers`, library `sentencepiece`), so it is a `MegatronTokenizerBase` as
`GPTDatasetConfig` expects: megatron-core loads the model and provides `unique_identifiers`
(which GPTDataset hashes into its index-cache names) and the chat-template support. `tokenize`
calls the SentencePiece processor directly: the same ids as megatron-core's `text_to_ids` with
its defaults, without its per-call checks. What this subclass adds is what megatron-core's
SentencePiece wrapper lacks for GPT pre-training: special ids that agree with Megatron-LM's
`--tokenizer-type SentencePieceTokenizer`:

* `eod` is megatron-core's: its SentencePiece library has no end-of-document piece and answers
  the model's end-of-sentence id (`</s>`), which is what Megatron-LM's `tools/preprocess_data.py`
  (core_v0.16.1) appends, so `.bin` files agree between the stacks;
* `pad`/`bos`/`eos` are the model's pad/bos/eos pieces;
* a model lacking one of `<CLS> <SEP> <EOD> <MASK>` or pad/bos/eos gets it appended after the
  model's pieces, in Megatron-LM's order (`<PAD>`/`<BOS>`/`<EOS>` when the model disables one),
  and `vocab_size` counts them, so `.bin` files Megatron-LM wrote with such a model read here
  with the same ids. Models from `tools/train_tokenizer.py` contain all of them: nothing is
  appended and `vocab_size` is the model's piece count.

One deliberate difference from Megatron-LM: `tokenize` never turns text such as "<EOD>" that
occurs inside a document into a special id (Megatron-LM's wrapper does); special ids come only
from `--append-eod` and the dataset, so a document cannot inject them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Sequence, Union

import numpy
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

from spannorm_megatron.config.tokenizer import (
    SUPPORTED_TOKENIZER_TYPES,
    TokenizerConfig,
    check_tokenizer_args,
    check_tokenizer_type,
    tokenizer_config,
)
from spannorm_megatron.errors import TokenizerError
from spannorm_megatron.config.tokenizer_files import check_sentencepiece_model
from spannorm_megatron.data.sp_model import MEGATRON_SPECIAL_PIECES
from spannorm_megatron.data.tokenizer_types import (  # noqa: F401  (re-exported)
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
    Llama2Tokenizer,
    NullTokenizer,
)


class SentencePieceTokenizer(MegatronTokenizerText):
    """A SentencePiece `.model` as a megatron-core tokenizer (a `MegatronTokenizerBase`).

    Args:
        model_path: the SentencePiece `.model` file. A missing file or one that is not a
            SentencePiece model raises `TokenizerError` naming the file and the fix.
    """

    def __init__(self, model_path: Union[str, os.PathLike]) -> None:
        path = str(check_sentencepiece_model(model_path))
        # megatron-core's MegatronTokenizer.from_pretrained would read these from a metadata
        # JSON next to the model; passing them directly needs no extra file.
        config = {"library": "sentencepiece", "model_type": "gpt", "chat_template": None}
        try:
            super().__init__(path, config)
        except (RuntimeError, OSError) as err:  # pragma: no cover - check_... loaded it already
            raise TokenizerError(f"Tokenizer model '{path}' could not be loaded: {err}") from None
        self._processor = self._tokenizer.tokenizer  # the sentencepiece.SentencePieceProcessor
        self._model_size = self._processor.get_piece_size()
        self._appended: List[str] = []  # pieces past the model, Megatron-LM's order
        self._special: Dict[str, int] = OrderedDict()
        # `<EOD>` is kept as a control piece (Megatron-LM appends it in this order, and data
        # prepared here before 2026-12 ends documents with it) but is not the eod id.
        for name, piece in zip(("cls", "sep", "eod_piece", "mask"), MEGATRON_SPECIAL_PIECES):
            self._special[name] = self._resolve(piece)
        for name, model_id, fallback in (
            ("pad", self._processor.pad_id(), "<PAD>"),
            ("bos", self._processor.bos_id(), "<BOS>"),
            ("eos", self._processor.eos_id(), "<EOS>"),
        ):
            in_model = 0 <= model_id < self._model_size
            piece = self._processor.id_to_piece(model_id) if in_model else fallback
            self._special[name] = self._resolve(piece)

    def _resolve(self, piece: str) -> int:
        """The piece's id in the model, else its id among the pieces appended after the model."""
        model_id = self._processor.piece_to_id(piece)
        if self._processor.id_to_piece(model_id) == piece:
            return model_id
        if piece not in self._appended:
            self._appended.append(piece)
        return self._model_size + self._appended.index(piece)

    # --- what GPTDataset and the training loop read -------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Model pieces plus appended special pieces: the embedding table needs this many rows."""
        return self._model_size + len(self._appended)

    @property
    def eod(self) -> int:
        """End-of-document id, appended by `--append-eod`; GPTDataset resets at it. megatron-core's
        own (`MegatronTokenizer.from_pretrained(..., {"library": "sentencepiece"}).eod`): the
        model's `</s>`."""
        return self._special["eos"]

    @property
    def pad(self) -> int:
        return self._special["pad"]

    @property
    def bos(self) -> int:
        return self._special["bos"]

    @property
    def eos(self) -> int:
        return self._special["eos"]

    @property
    def cls(self) -> int:
        return self._special["cls"]

    @property
    def sep(self) -> int:
        return self._special["sep"]

    @property
    def mask(self) -> int:
        return self._special["mask"]

    @property
    def special_token_ids(self) -> Dict[str, int]:
        """name -> id for cls, sep, eod_piece (`<EOD>`), mask, pad, bos, eos."""
        return dict(self._special)

    @property
    def model_path(self) -> str:
        return self.path

    def tokenize(self, text: str) -> List[int]:
        """Encode one document; special ids never come out of text (see the module docstring)."""
        return self._processor.encode(text)

    def detokenize(self, ids: Union[Sequence[int], numpy.ndarray]) -> str:
        """Decode ids; control pieces (eod, pad, ...) and appended special ids decode to ''."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._processor.decode([i for i in ids if 0 <= i < self._model_size])

    @property
    def vocab(self) -> List[str]:
        return [self._processor.id_to_piece(i) for i in range(self._model_size)] + self._appended

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return dict(enumerate(self.vocab))

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer('{self.path}', vocab_size={self.vocab_size}, eod={self.eod}, "
            f"pad={self.pad}, bos={self.bos}, eos={self.eos})"
        )


class ByteLevelTokenizer(MegatronTokenizerText):
    """UTF-8 bytes as token ids: megatron-core's byte-level tokenizer library
    (`megatron.core.tokenizers.text.libraries.ByteLevelTokenizer`) with a GPT end-of-document id.

    Ids 0-255 are the bytes of the UTF-8 text, id 256 is `<EOD>` (`eod`, also `eos` and `pad`),
    so `vocab_size` is 257: every text is encodable, nothing is ever unknown, and the vocabulary
    is the same for any corpus. megatron-core's default (`eos` 0, `pad` 1, vocabulary 512) would
    put the end of document on the NUL byte; here no byte value is special. Needs no model file
    (`--tokenizer-type ByteLevelTokenizer`, no `--tokenizer-model`).
    """

    NUM_BYTES = 256
    EOD_ID = 256

    def __init__(self) -> None:
        config = {"library": "byte-level", "model_type": "gpt", "chat_template": None}
        super().__init__("byte-level", config, vocab_size=self.NUM_BYTES + 1,
                         _eos_id=self.EOD_ID, _pad_id=self.EOD_ID)

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + 1

    @property
    def eod(self) -> int:
        return self.EOD_ID

    @property
    def eos(self) -> int:
        return self.EOD_ID

    @property
    def pad(self) -> int:
        return self.EOD_ID

    @property
    def bos(self) -> int:
        return self.EOD_ID

    @property
    def special_token_ids(self) -> Dict[str, int]:
        return {"eod": self.EOD_ID, "eos": self.EOD_ID, "pad": self.EOD_ID}

    @property
    def model_path(self) -> None:
        return None

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Union[Sequence[int], numpy.ndarray]) -> str:
        """Bytes back to text; `<EOD>` and ids outside the vocabulary are dropped, and byte
        sequences that are not UTF-8 (a window cut inside a character) decode to U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return bytes(i for i in ids if 0 <= i < self.NUM_BYTES).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> List[str]:
        return [bytes([i]).decode("latin-1") for i in range(self.NUM_BYTES)] + ["<EOD>"]

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return dict(enumerate(self.vocab))

    def __repr__(self) -> str:
        return f"ByteLevelTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


def build_tokenizer(config: Union[TokenizerConfig, str],
                    tokenizer_model: Union[str, os.PathLike, None] = None, **flags):
    """The tokenizer of Megatron-LM's tokenizer flags: a `TokenizerConfig`, or the type plus
    `tokenizer_model` and the other flags as keywords (`vocab_file`, `merge_file`,
    `vocab_size`). Bad combinations raise TokenizerError naming the fix, before anything loads."""
    if not isinstance(config, TokenizerConfig):
        config = tokenizer_config(tokenizer_type=config, tokenizer_model=tokenizer_model, **flags)
    check_tokenizer_args(config)
    kind = config.tokenizer_type
    if kind == "ByteLevelTokenizer":
        return ByteLevelTokenizer()
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(config.vocab_file, config.merge_file)
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(config.tokenizer_model)
    if kind == "Llama2Tokenizer":
        return Llama2Tokenizer(config.tokenizer_model)
    if kind == "NullTokenizer":
        return NullTokenizer(config.vocab_size)
    return SentencePieceTokenizer(config.tokenizer_model)


def check_data_fits_vocab(prefixes: Sequence[str], vocab_size: int, tokenizer=None,
                          max_tokens: int = 1 << 24) -> None:
    """Raise TokenizerError when a data prefix holds token ids outside the tokenizer's
    vocabulary (ids >= `vocab_size`): data written with another tokenizer (e.g. SentencePiece
    4096 data trained with `ByteLevelTokenizer`), which would otherwise train on ids that mean
    nothing to the tokenizer or fail deep in the embedding lookup (an IndexError on CPU, a
    device-side assert on GPU). Reads the first `max_tokens` ids of each
    `.bin` (all of them for data up to 16M tokens)."""
    from spannorm_megatron.data.indexed import check_indexed_dataset

    for prefix in prefixes:
        info = check_indexed_dataset(prefix)
        count = min(info.num_tokens, max_tokens)
        if count == 0:
            continue
        ids = numpy.memmap(prefix + ".bin", dtype=info.dtype, mode="r", shape=(count,))
        top = int(ids.max())
        del ids
        if top >= vocab_size:
            which = f" ({tokenizer!r})" if tokenizer is not None else ""
            raise TokenizerError(
                f"Data path '{prefix}' holds token id {top}, but the tokenizer's vocabulary has "
                f"{vocab_size} ids{which}, so the data was preprocessed with another tokenizer. "
                "Pass the tokenizer flags the data was written with (--tokenizer-type and its "
                "--tokenizer-model / --vocab-file / --merge-file / --vocab-size), or "
                "preprocess the text again with this tokenizer (tools/preprocess_data.py)."
            )
