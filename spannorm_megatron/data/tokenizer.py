"""The SentencePiece tokenizer megatron-core's GPTDataset and the training loop use.

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

from spannorm_megatron.data.errors import TokenizerError
from spannorm_megatron.data.sp_model import (  # noqa: F401  (check_tokenizer_type re-exported)
    MEGATRON_SPECIAL_PIECES,
    SUPPORTED_TOKENIZER_TYPES,
    check_sentencepiece_model,
    check_tokenizer_type,
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


def build_tokenizer(
    tokenizer_type: str, tokenizer_model: Union[str, os.PathLike]
) -> SentencePieceTokenizer:
    """Megatron-LM's `--tokenizer-type` / `--tokenizer-model` pair to a tokenizer."""
    check_tokenizer_type(tokenizer_type)
    return SentencePieceTokenizer(tokenizer_model)
