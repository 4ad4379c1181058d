"""Megatron-LM's other `--tokenizer-type`s: GPT2BPETokenizer, HuggingFaceTokenizer,
Llama2Tokenizer and NullTokenizer, as megatron-core tokenizers (`MegatronTokenizerText`, what
`GPTDatasetConfig` takes).

Each follows what the type means in Megatron-LM core_v0.16.1. Where megatron-core 0.16.1 has the
class it is megatron-core's; where it has none, or its class cannot do the job, the class here says
why. What each type gives (ids of a text, `vocab_size`, `eod`, `pad`):

* GPT2BPETokenizer: GPT-2's byte-level BPE from `--vocab-file` (vocab.json) and `--merge-file`
  (merges.txt); `vocab_size` is the number of vocab.json entries and `eod` the id of
  `<|endoftext|>`, as Megatron-LM's `_GPT2BPETokenizer`. Text that spells `<|endoftext|>` is
  encoded as text (Megatron-LM's GPT-2 encoder has no special tokens), so a document cannot
  end itself early.
* HuggingFaceTokenizer: a local transformers tokenizer folder through megatron-core's
  `huggingface` library, with Megatron-LM's defaults (`--tokenizer-hf-use-fast`,
  `--tokenizer-hf-include-special-tokens` and `--trust-remote-code` all off): a text's ids are
  its tokens' ids, no BOS/EOS added (what Megatron-LM's tools/preprocess_data.py writes; special
  tokens spelled in the text become their ids, as there); `eod` is the tokenizer's `eos_token`,
  `vocab_size` is `len(tokenizer)` (added tokens included).
* Llama2Tokenizer: a SentencePiece model with Megatron-LM's `_Llama2Tokenizer` semantics:
  every tokenized text starts with the model's `<s>` (bos), `eod` is its `</s>` (eos), nothing is
  appended to the vocabulary (`vocab_size` is the model's piece count).
* NullTokenizer: megatron-core's `null` library: a text is whitespace-separated integer ids,
  `--vocab-size N` makes ids 0..N-1 the data's and N the end of document (`eod`), so
  `vocab_size` is N+1.

`pad` is -1 where the tokenizer has none: megatron-core's datasets then mask nothing as padding
(what they fall back to when Megatron-LM's tokenizer has no pad).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

from spannorm_megatron.errors import TokenizerError
from spannorm_megatron.config.tokenizer_files import hf_tokenizer_files

NO_PAD = -1
"""megatron-core's `_PAD_TOKEN_ID`: an id no dataset holds."""

Ids = Union[Sequence[int], numpy.ndarray]


def _as_list(ids: Ids) -> List[int]:
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


# ------------------------------------------------------------------------------ GPT-2 BPE
GPT2_EOD = "<|endoftext|>"


def read_gpt2_files(vocab_file: str, merge_file: str) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """(vocab, merges) of GPT-2's vocab.json and merges.txt, checked: TokenizerError naming the
    file (and line) for anything Megatron-LM's GPT-2 encoder would fail on or read differently."""
    try:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise TokenizerError(f"--vocab-file {vocab_file} is not JSON ({err}); GPT2BPETokenizer "
                             f"takes GPT-2's vocab.json (token -> id).") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
            for k, v in vocab.items()):
        raise TokenizerError(f"--vocab-file {vocab_file} is not a GPT-2 vocab.json: it must be "
                             f"one JSON object of token -> integer id.")
    ids = sorted(vocab.values())
    if ids != list(range(len(vocab))):
        raise TokenizerError(
            f"--vocab-file {vocab_file}: its ids must be 0..{len(vocab) - 1}, each once (the "
            f"model's vocabulary is the number of entries, {len(vocab)}), but they are not.")
    if GPT2_EOD not in vocab:
        raise TokenizerError(
            f"--vocab-file {vocab_file} has no {GPT2_EOD} entry, which GPT2BPETokenizer uses as "
            f"the end of document (eod). Add it, or use --tokenizer-type HuggingFaceTokenizer "
            f"with a folder whose tokenizer names its eos_token.")
    from tokenizers.pre_tokenizers import ByteLevel

    missing = [c for c in ByteLevel.alphabet() if c not in vocab]
    if missing:
        raise TokenizerError(
            f"--vocab-file {vocab_file} lacks {len(missing)} of the 256 byte symbols of GPT-2's "
            f"byte-level BPE (e.g. {missing[0]!r}), so some texts could not be encoded: it is "
            f"not a byte-level BPE vocabulary.")
    try:
        with open(merge_file, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as err:
        raise TokenizerError(f"--merge-file {merge_file} is not UTF-8 text ({err}).") from None
    if not lines[0].startswith("#version"):
        raise TokenizerError(
            f"--merge-file {merge_file} does not start with GPT-2's '#version: 0.2' line. "
            f"Megatron-LM skips the first line of merges.txt whatever it holds, so without that "
            f"line it would lose the first merge and encode differently from here: add the line "
            f"'#version: 0.2' at the top.")
    merges = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split()  # as Megatron-LM's reader (a CRLF file reads the same)
        if not parts:
            continue
        if len(parts) != 2:
            raise TokenizerError(f"Line {number} of --merge-file {merge_file} is {line!r}, not "
                                 f"two tokens separated by a space.")
        merges.append((parts[0], parts[1]))
    return vocab, merges


class GPT2BPETokenizer(MegatronTokenizerText):
    """GPT-2's byte-level BPE from vocab.json and merges.txt (`--tokenizer-type
    GPT2BPETokenizer`), run by the `tokenizers` library.

    Written here: megatron-core 0.16.1's GPT2BPETokenizer (`megatron` library,
    `MegatronHFTokenizer`) loads the hub model `gpt2` through AutoTokenizer and passes the merge
    file under a keyword transformers does not read, so it needs the network and cannot load a
    local merges.txt. This class builds the same BPE from the two files alone: GPT-2's
    pre-tokenizing pattern and byte-to-symbol map (`tokenizers`' ByteLevel) and its merges in
    file order, the algorithm of Megatron-LM's `_GPT2BPETokenizer`."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        vocab_file, merge_file = os.fspath(vocab_file), os.fspath(merge_file)
        self._vocab_dict, self._merges = read_gpt2_files(vocab_file, merge_file)
        config = {"library": "megatron", "model_type": "gpt", "chat_template": None}
        super().__init__(vocab_file, config, vocab_file=vocab_file, merges_file=merge_file)
        self._eod = self._vocab_dict[GPT2_EOD]
        self._inv: Optional[Dict[int, str]] = None

    def _restore_model(self, **_files):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            model = models.BPE(vocab=self._vocab_dict, merges=self._merges)
        except Exception as err:  # tokenizers raises its own exception types
            raise TokenizerError(
                f"GPT2BPETokenizer: merges.txt does not fit vocab.json ({err}): a merge names "
                f"a token, or makes one, that vocab.json lacks. Pass the two files of one "
                f"tokenizer.") from None
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                           use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._vocab_dict)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def bos(self) -> int:
        """GPT-2's `<|endoftext|>` is its bos, eos and unk alike (transformers' convention)."""
        return self._eod

    @property
    def pad(self) -> int:
        return NO_PAD

    @property
    def vocab_file(self) -> str:
        return self.additional_args["vocab_file"]

    @property
    def merges_file(self) -> str:
        return self.additional_args["merges_file"]

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Ids) -> str:
        """Ids back to text (invalid UTF-8 from a cut character decodes to U+FFFD)."""
        size = self.vocab_size
        return self._tokenizer.decode([i for i in _as_list(ids) if 0 <= i < size],
                                      skip_special_tokens=False)

    @property
    def vocab(self) -> List[str]:
        return [token for token, _ in sorted(self._vocab_dict.items(), key=lambda kv: kv[1])]

    @property
    def inv_vocab(self) -> Dict[int, str]:
        if self._inv is None:
            self._inv = {i: token for token, i in self._vocab_dict.items()}
        return self._inv

    def __repr__(self) -> str:
        return (f"GPT2BPETokenizer('{self.vocab_file}', '{self.merges_file}', "
                f"vocab_size={self.vocab_size}, eod={self.eod})")


# ------------------------------------------------------------------------------ Hugging Face
class HuggingFaceTokenizer(MegatronTokenizerText):
    """A local Hugging Face tokenizer folder through megatron-core's `huggingface` library
    (`--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`).

    megatron-core's loader calls `AutoTokenizer.from_pretrained` without `local_files_only`, so
    it is handed nothing but an existing folder (absolute path), checked first: transformers
    then reads that folder's files and never contacts the hub; a hub name is refused before."""

    def __init__(self, folder: str) -> None:
        folder = os.fspath(folder)
        hf_tokenizer_files(folder)
        path = os.path.abspath(folder)
        config = {"library": "huggingface", "model_type": "gpt", "chat_template": None}
        try:
            super().__init__(path, config)
        except (ValueError, OSError, ImportError) as err:
            cause = str(err).split("Exception: ", 1)[-1].strip().splitlines()[0]
            raise TokenizerError(
                f"--tokenizer-model {folder}: transformers' AutoTokenizer cannot load this "
                f"folder ({cause}). Pass a folder a tokenizer was saved to with "
                f"save_pretrained (tokenizer.json and tokenizer_config.json).") from None
        self.folder = folder
        hf = self._tokenizer.tokenizer
        if self._tokenizer.eod is None:
            raise TokenizerError(
                f"--tokenizer-model {folder}: the tokenizer has no eos_token, which "
                f"HuggingFaceTokenizer uses as the end of document (eod, appended by "
                f"--append-eod, where the data resets). Set \"eos_token\" in its "
                f"tokenizer_config.json to a token of its vocabulary.")
        self._size = len(hf)

    @property
    def transformers_tokenizer(self):
        """The transformers tokenizer megatron-core wraps."""
        return self._tokenizer.tokenizer

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def pad(self) -> int:
        pad = self._tokenizer.pad_id
        return NO_PAD if pad is None else pad

    def tokenize(self, text: str) -> List[int]:
        return self._tokenizer.text_to_ids(text)

    def detokenize(self, ids: Ids) -> str:
        """Ids back to text; special tokens (eos, pad, ...) are dropped, as megatron-core does."""
        return self._tokenizer.ids_to_text([i for i in _as_list(ids) if 0 <= i < self._size])

    def __repr__(self) -> str:
        return (f"HuggingFaceTokenizer('{self.folder}', vocab_size={self.vocab_size}, "
                f"eod={self.eod})")


# ------------------------------------------------------------------------------ Llama 2
class Llama2Tokenizer(MegatronTokenizerText):
    """A SentencePiece model with Megatron-LM's Llama-2 semantics (`--tokenizer-type
    Llama2Tokenizer`): `tokenize` puts the model's bos (`<s>`) before every text, `eod` is its
    eos (`</s>`), and the vocabulary is the model's pieces, nothing appended.

    Written here over megatron-core's `sentencepiece` library: megatron-core 0.16.1 has no
    Llama-2 class (its build_tokenizer maps Llama2Tokenizer to the plain SentencePiece wrapper,
    which adds no bos), while Megatron-LM's `_Llama2Tokenizer`, what its training, text
    generation and `preprocess_data.py --legacy-tokenizer` use, starts every text with bos."""

    def __init__(self, model_path: str) -> None:
        from spannorm_megatron.config.tokenizer_files import check_sentencepiece_model

        path = str(check_sentencepiece_model(model_path))
        config = {"library": "sentencepiece", "model_type": "gpt", "chat_template": None}
        super().__init__(path, config)
        self._processor = self._tokenizer.tokenizer  # sentencepiece.SentencePieceProcessor
        self._size = self._processor.get_piece_size()
        missing = [name for name, i in (("bos (<s>)", self._processor.bos_id()),
                                        ("eos (</s>)", self._processor.eos_id())) if i < 0]
        if missing:
            raise TokenizerError(
                f"Tokenizer model '{path}' has no {' and no '.join(missing)} piece, which "
                f"Llama2Tokenizer puts before every text (bos) and after every document (eos, "
                f"the eod). Train the model with them (tools/train_tokenizer.py does), or pass "
                f"--tokenizer-type SentencePieceTokenizer.")

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def eos(self) -> int:
        return self._processor.eos_id()

    @property
    def bos(self) -> int:
        return self._processor.bos_id()

    @property
    def pad(self) -> int:
        return self._processor.pad_id()

    @property
    def model_path(self) -> str:
        return self.path

    def tokenize(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        """`<s>` + the text's pieces (+ `</s>` with eos=True): Megatron-LM's defaults for
        text completion."""
        ids = self._processor.encode(text)
        return ([self.bos] if bos else []) + ids + ([self.eos] if eos else [])

    def detokenize(self, ids: Ids) -> str:
        """Ids back to text; control pieces (<s>, </s>) decode to ''."""
        return self._processor.decode([i for i in _as_list(ids) if 0 <= i < self._size])

    @property
    def vocab(self) -> List[str]:
        return [self._processor.id_to_piece(i) for i in range(self._size)]

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return dict(enumerate(self.vocab))

    def __repr__(self) -> str:
        return (f"Llama2Tokenizer('{self.path}', vocab_size={self.vocab_size}, bos={self.bos}, "
                f"eod={self.eod})")


# ------------------------------------------------------------------------------ null
class NullTokenizer(MegatronTokenizerText):
    """megatron-core's `null` library (`--tokenizer-type NullTokenizer --vocab-size N`): a text
    is its integer ids, N is the end of document, the vocabulary N+1.

    `tokenize` checks what megatron-core's does not: every word is an integer in 0..N (else a
    TokenizerError naming it, where megatron-core would store an id the embedding cannot look
    up). Words may be separated by any whitespace (megatron-core splits on single spaces and
    fails on anything else, so every text it reads gives the same ids here)."""

    def __init__(self, vocab_size: int) -> None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise TokenizerError(f"--vocab-size {vocab_size!r} must be an integer >= 1.")
        config = {"library": "null", "model_type": "gpt", "chat_template": None}
        super().__init__(None, config, vocab_size=vocab_size)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self._tokenizer.eod

    @property
    def eos(self) -> Optional[int]:
        return None

    @property
    def bos(self) -> Optional[int]:
        return None

    @property
    def pad(self) -> int:
        return NO_PAD

    def tokenize(self, text: str) -> List[int]:
        ids = []
        for word in text.split():
            try:
                value = int(word)
            except ValueError:
                value = None
            if value is None or not 0 <= value <= self.eod:
                raise TokenizerError(
                    f"NullTokenizer reads whitespace-separated integer ids 0..{self.eod} "
                    f"(--vocab-size {self.eod}; {self.eod} is the end of document), not "
                    f"{word[:40]!r}. Give the ids as text, e.g. \"17 4 4095\", or raise "
                    f"--vocab-size above the largest id.")
            ids.append(value)
        return ids

    def detokenize(self, ids: Ids) -> str:
        return " ".join(str(i) for i in _as_list(ids))

    @property
    def vocab(self) -> List[str]:
        return [str(i) for i in range(self.vocab_size)]

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return dict(enumerate(self.vocab))

    def __repr__(self) -> str:
        return f"NullTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"
