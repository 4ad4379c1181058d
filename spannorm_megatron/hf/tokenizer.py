"""The SentencePiece tokenizer of a run, as files `AutoTokenizer.from_pretrained` loads.

Written into the export folder:

* ``tokenizer.model``: the SentencePiece model itself (for tools that want it);
* ``tokenizer.json``: the same tokenizer for the `tokenizers` library (what transformers loads
  by default; no sentencepiece or protobuf needed at load time), built here from the model's
  pieces: BPE (or Unigram) with byte fallback, SentencePiece's dummy-prefix / space handling as
  a normalizer, the control pieces (``<s> </s> <pad> <CLS> <SEP> <EOD> <MASK>``) as special
  tokens with their SentencePiece ids, and no BOS/EOS added on encoding (training data has none;
  documents end with ``</s>``, ``<EOD>`` in data prepared before 2026-12);
* ``tokenizer_config.json`` / ``special_tokens_map.json``: class `PreTrainedTokenizerFast`,
  ``<s>``/``</s>``/``<pad>``/``<unk>`` as bos/eos/pad/unk (SentencePiece ids 1/2/3/0 for models
  from tools/train_tokenizer.py).

The export checks that the result encodes like SentencePiece (every vocabulary piece and a set of
sample texts) and that the model's vocabulary fits the tokenizer's (equal, or padded as
training pads it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

from spannorm_megatron.hf.errors import ConversionError

SAMPLES = (
    "Hello world",
    "  two  spaces\n\tnewline and tabs 12345 67.89",
    "def f(x):\n    return x**2  # comment\n",
    " leading space",
    "trailing space ",
    "unicode: é ü ß 中文 😀 ∑",
    "",
    "\n\n\n",
    "MiXeD CaSe, punctuation!? (brackets) [x] {y} <z>",
)

SPECIAL_NAMES = ("cls", "sep", "eod_piece", "mask", "pad", "bos", "eos")


@dataclass
class TokenizerInfo:
    vocab_size: int
    """Ids the tokenizer can produce (model pieces plus any Megatron-LM appends)."""
    special_ids: Dict[str, int]
    """cls, sep, eod_piece, mask, pad, bos, eos (our SentencePieceTokenizer's), plus unk."""
    mismatches: List[str]
    """Texts the exported tokenizer encodes differently from SentencePiece (empty when exact)."""


def _load(model_path: str):
    from spannorm_megatron.config.tokenizer_files import check_sentencepiece_model

    try:
        check_sentencepiece_model(model_path)
    except ValueError as err:
        raise ConversionError(str(err)) from None
    from spannorm_megatron.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(model_path)


def check_vocab(tokenizer_vocab: int, model_vocab: int, pad_multiple: Optional[int] = None) -> None:
    """The model's embedding must have a row per token id, padded at most as training pads it
    (`--make-vocab-size-divisible-by` x TP, Megatron-LM's padding)."""
    if model_vocab < tokenizer_vocab:
        raise ConversionError(
            f"The tokenizer has {tokenizer_vocab} ids but the model's vocabulary is {model_vocab}: "
            f"they do not belong together. Pass the tokenizer the model was trained with "
            f"(--tokenizer-model).")
    limit = pad_multiple or 1024
    if model_vocab - tokenizer_vocab >= limit:
        raise ConversionError(
            f"The model's vocabulary ({model_vocab}) exceeds the tokenizer's ({tokenizer_vocab}) by "
            f"{model_vocab - tokenizer_vocab}, more than training pads (< {limit}): the tokenizer "
            f"is not the one the model was trained with. Pass the right --tokenizer-model.")


def _merges(pieces: List[str], usable: set) -> List[tuple]:
    """BPE merges that rebuild every usable piece from two usable pieces, in SentencePiece's
    priority order (a BPE model's pieces are ordered by merge score: lower id = earlier merge)."""
    rank = {piece: i for i, piece in enumerate(pieces)}
    merges = []
    for piece in pieces:
        if piece not in usable or len(piece) < 2:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in usable and piece[k:] in usable]
        splits.sort(key=lambda lr: (rank[lr[0]], rank[lr[1]]))
        merges += [(left, right, rank[piece]) for left, right in splits]
    merges.sort(key=lambda m: m[2])
    return [(left, right) for left, right, _ in merges]


def _load_llama2(model_path: str):
    from spannorm_megatron.data.tokenizer import Llama2Tokenizer

    try:
        return Llama2Tokenizer(model_path)
    except ValueError as err:
        raise ConversionError(str(err)) from None


def build_fast_tokenizer(model_path: str, llama2: bool = False):
    """(PreTrainedTokenizerFast, our tokenizer) for a SentencePiece model: our
    SentencePieceTokenizer (Megatron-LM's special pieces appended where the model lacks them),
    or with `llama2` our Llama2Tokenizer (the model's pieces only, and `<s>` put before every
    text as transformers' Llama tokenizers do, so `tok(text)` gives its ids)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    ours = _load_llama2(model_path) if llama2 else _load(model_path)
    sp = ours._processor
    size = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(size)]
    normal = {pieces[i] for i in range(size)
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    spec = _model_spec(model_path)
    byte_fallback = any(sp.is_byte(i) for i in range(size))
    unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
    if spec.get("model_type", 2) == 1:  # unigram
        model = models.Unigram([(pieces[i], sp.get_score(i)) for i in range(size)],
                               unk_id=sp.unk_id() if sp.unk_id() >= 0 else None,
                               byte_fallback=byte_fallback)
    else:
        model = models.BPE(vocab={p: i for i, p in enumerate(pieces)},
                           merges=_merges(pieces, normal), unk_token=unk,
                           byte_fallback=byte_fallback, fuse_unk=True)
    tk = Tokenizer(model)
    steps = []
    if spec.get("precompiled_charsmap"):
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec.get("remove_extra_whitespaces", False):
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip(left=True, right=True)]
    if spec.get("add_dummy_prefix", True):
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tk.normalizer = normalizers.Sequence(steps)
    tk.pre_tokenizer = None
    parts = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.get("add_dummy_prefix", True):
        parts.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(parts)

    specials = [pieces[i] for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
    # pieces our SentencePieceTokenizer puts after the model (Megatron-LM's); Llama2: none
    appended = [] if llama2 else list(ours._appended)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in specials + appended])
    if llama2:
        bos = pieces[ours.bos]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ours.bos)])

    def piece(name: str) -> Optional[str]:
        if llama2:
            idx = getattr(ours, name)
            return pieces[idx] if 0 <= idx < size else None
        idx = ours.special_token_ids.get(name)
        return ours.vocab[idx] if idx is not None else None

    kwargs = dict(
        tokenizer_object=tk,
        bos_token=piece("bos"), eos_token=piece("eos"), pad_token=piece("pad"),
        unk_token=unk, clean_up_tokenization_spaces=False,
        model_max_length=int(1e30),
    )
    extra = [t for t in specials + appended if t not in {kwargs["bos_token"], kwargs["eos_token"],
                                                          kwargs["pad_token"], unk}]
    fast = PreTrainedTokenizerFast(**kwargs)
    fast.add_special_tokens({"additional_special_tokens": extra})
    return fast, ours


def _model_spec(model_path: str) -> dict:
    """Trainer/normalizer settings of the model (needs protobuf; defaults of
    tools/train_tokenizer.py without it)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # pragma: no cover - protobuf missing
        return {}
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    norm = proto.normalizer_spec
    return {
        "model_type": proto.trainer_spec.model_type,
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "precompiled_charsmap": bytes(norm.precompiled_charsmap) if norm.name != "identity"
        else b"",
    }


def compare_with_sentencepiece(fast, ours, extra_texts=(), llama2: bool = False) -> List[str]:
    """Texts on which `fast` and SentencePiece give other ids or other decoded text (with
    `llama2`, `fast(text)` against our Llama2Tokenizer's `<s>` + pieces)."""
    sp = ours._processor
    texts = list(SAMPLES) + list(extra_texts)
    for i in range(sp.get_piece_size()):
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)):
            texts.append(sp.id_to_piece(i).replace("▁", " "))
    mismatches = []
    encoded = fast(texts, add_special_tokens=llama2)["input_ids"]
    for text, ids in zip(texts, encoded):
        expected = ours.tokenize(text) if llama2 else sp.encode(text)
        if ids != expected or fast.decode(ids, skip_special_tokens=llama2) != sp.decode(expected):
            mismatches.append(text)
    return mismatches


def prepare_tokenizer(model_path: str, model_vocab: int, pad_multiple: Optional[int] = None):
    """(fast tokenizer, ours, TokenizerInfo), checked against the model's vocabulary; writes
    nothing (the export calls it before writing any file)."""
    fast, ours = build_fast_tokenizer(model_path)
    check_vocab(ours.vocab_size, model_vocab, pad_multiple)
    ids = dict(ours.special_token_ids)
    ids["unk"] = ours._processor.unk_id()
    for name, token_id in (("bos", fast.bos_token_id), ("eos", fast.eos_token_id),
                           ("pad", fast.pad_token_id)):
        if token_id != ids[name]:  # pragma: no cover - guards the construction above
            raise ConversionError(f"internal: the HF tokenizer's {name} id {token_id} is not "
                                  f"SentencePiece's {ids[name]}")
    mismatches = compare_with_sentencepiece(fast, ours)
    return fast, ours, TokenizerInfo(vocab_size=ours.vocab_size, special_ids=ids,
                                     mismatches=mismatches)


def save_tokenizer(fast, model_path: Optional[str], directory: str, model_max_length: int,
                   add_bos_token: bool = False, copies: Dict[str, str] = None) -> None:
    """Write the tokenizer files; tokenizer_config.json uses the keys transformers 4.x and 5.x
    both read (class `PreTrainedTokenizerFast`, `additional_special_tokens`). `model_path` (a
    SentencePiece model) is copied as tokenizer.model, `copies` ({name in the folder: source})
    beside it."""
    fast.save_pretrained(directory)
    if model_path is not None:
        shutil.copyfile(model_path, os.path.join(directory, "tokenizer.model"))
    for name, source in (copies or {}).items():
        shutil.copyfile(source, os.path.join(directory, name))
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    config.pop("backend", None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
                  add_bos_token=add_bos_token, add_eos_token=False)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
