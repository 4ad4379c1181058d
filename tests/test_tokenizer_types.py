"""Megatron-LM's other tokenizer types: GPT2BPETokenizer, HuggingFaceTokenizer, Llama2Tokenizer
and NullTokenizer.

Every tokenizer file is made here, from nothing downloaded: GPT-2 vocab.json/merges.txt and a
Hugging Face folder trained with the `tokenizers` library, a SentencePiece model by our own
tools. Ids are checked against independent computations (a plain-Python GPT-2 BPE and
transformers' GPT2Tokenizer on the same files, transformers' AutoTokenizer on the folder,
sentencepiece itself), bad flags against their messages, and each type once end to end:
tools/preprocess_data.py -> spannorm-train (3 steps, in this process) -> tools/evaluate.py on the
checkpoint and its export -> tools/generate.py on both -> the exported tokenizer in transformers.
"""

from __future__ import annotations

import io
import json
import math
import os
import socket
from contextlib import redirect_stdout

import pytest

from _tokenizer_files import (
    corpus_texts,
    make_tokenizer_files,
    run_tool,
    tokenizer_flags,
)
from _training import SMALL

from spannorm_megatron.errors import TokenizerError  # noqa: E402
from spannorm_megatron.data.tokenizer import build_tokenizer  # noqa: E402

TEXTS = [
    "Hello world", "def main():\n    return 42  # don't\n", "  two  spaces\n\n\ttab",
    "naïve café — 数字 ≤ 3 € 😀", "trailing ", "<|endoftext|> spelled out", "",
]
MODEL_FLAGS = ["--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights",
               "--hidden-dropout", "0", "--attention-dropout", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tokenizer_files(tmp_path_factory.mktemp("tokenizer_types"))


def _tokenizer(kind, files):
    flags = dict(zip(*[iter(tokenizer_flags(kind, files))] * 2))
    return build_tokenizer(kind, **{k[2:].replace("-", "_"): (int(v) if k == "--vocab-size"
                                                               else v) for k, v in flags.items()})


# ------------------------------------------------------------------------------ ids
def _gpt2_reference(text, vocab, merges):
    """GPT-2's encoder written out: its pattern, its byte-to-symbol map, merges by rank."""
    import regex

    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                            r"""|\s+(?!\S)|\s+""")
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbol, extra = {}, 0
    for b in range(256):
        symbol[b] = chr(b) if b in printable else chr(256 + extra)
        extra += b not in printable
    rank = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for word in pattern.findall(text):
        parts = [symbol[b] for b in word.encode("utf-8")]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: rank.get(pair, math.inf))
            if best not in rank:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids += [vocab[p] for p in parts]
    return ids


def test_gpt2_bpe_ids_match_gpt2_encoders(files):
    from transformers import GPT2Tokenizer

    tok = _tokenizer("GPT2BPETokenizer", files)
    vocab = json.load(open(files["vocab"], encoding="utf-8"))
    merges = [tuple(line.split()) for line in
              open(files["merges"], encoding="utf-8").read().split("\n")[1:] if line]
    reference = GPT2Tokenizer.from_pretrained(os.path.dirname(files["vocab"]),
                                              local_files_only=True)
    texts = TEXTS + corpus_texts(files["jsonl"], 20)
    for text in texts:
        ids = tok.tokenize(text)
        assert ids == _gpt2_reference(text, vocab, merges), text
        assert ids == reference(text, split_special_tokens=True).input_ids, text
        assert tok.detokenize(ids) == text
    assert tok.vocab_size == len(vocab) and tok.eod == vocab["<|endoftext|>"]
    assert "<|endoftext|>" not in [tok.inv_vocab[i] for i in tok.tokenize("<|endoftext|>")]
    assert tok.pad == -1


def test_huggingface_ids_match_transformers_and_never_reach_the_hub(files, monkeypatch):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(files["hf"], local_files_only=True)

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = _tokenizer("HuggingFaceTokenizer", files)
    for text in TEXTS + corpus_texts(files["jsonl"], 10):
        # no <s>: Megatron-LM's HuggingFaceTokenizer adds no special tokens
        assert tok.tokenize(text) == reference.encode(text, add_special_tokens=False), text
    assert reference("a").input_ids[0] == reference.convert_tokens_to_ids("<s>")
    assert tok.vocab_size == len(reference) and tok.eod == reference.eos_token_id
    assert tok.pad == reference.pad_token_id
    assert tok.detokenize(tok.tokenize("def f(x):") + [tok.eod]) == "def f(x):"


def test_llama2_puts_bos_first_and_ends_documents_with_eos(files):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=files["sp_model"])
    tok = _tokenizer("Llama2Tokenizer", files)
    for text in TEXTS:
        assert tok.tokenize(text) == [sp.bos_id()] + sp.encode(text)
        assert tok.detokenize(tok.tokenize(text)) == sp.decode(sp.encode(text))
    assert (tok.bos, tok.eod, tok.eos) == (sp.bos_id(), sp.eos_id(), sp.eos_id())
    assert tok.vocab_size == sp.get_piece_size()  # nothing appended, unlike SentencePiece's


def test_null_tokenizer_reads_ids(files):
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod) == (101, 100)
    assert tok.tokenize("3 1  4\n1\t5 100") == [3, 1, 4, 1, 5, 100]
    assert tok.detokenize([3, 1, 4]) == "3 1 4"
    for bad in ("3 x 4", "101", "-1", "2.5"):
        with pytest.raises(TokenizerError, match="whitespace-separated integer ids 0..100"):
            tok.tokenize(bad)


@pytest.mark.parametrize("flags, message", [
    (dict(tokenizer_type="GPT2BPETokenizer"), "--vocab-file and --merge-file are required"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="{vocab}"),
     "--merge-file is required with --tokenizer-type GPT2BPETokenizer"),
    (dict(tokenizer_type="NullTokenizer"), "--vocab-size is required with --tokenizer-type "
                                           "NullTokenizer"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="gpt2"),
     "no such folder. HuggingFaceTokenizer loads a local tokenizer folder only"),
    (dict(tokenizer_type="SentencePieceTokenizer", tokenizer_model="{sp_model}", vocab_size=9),
     "takes --tokenizer-model, not --vocab-size \\(9\\).*belongs to NullTokenizer"),
    (dict(tokenizer_type="GPT2BPETokenizer", tokenizer_model="{sp_model}", vocab_file="{vocab}",
          merge_file="{merges}"), "takes --vocab-file and --merge-file, not --tokenizer-model"),
    (dict(tokenizer_type="NullTokenizer", vocab_size=5, vocab_file="{vocab}"),
     "takes --vocab-size, not --vocab-file"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="{root}"),
     "is not a Hugging Face tokenizer folder"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="{sp_model}"),
     "is a file; HuggingFaceTokenizer takes the folder"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="{root}/hf_no_eos"),
     "the tokenizer has no eos_token, which HuggingFaceTokenizer uses as the end of document"),
    (dict(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="{root}/hf_broken"),
     "AutoTokenizer cannot load this folder"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="{merges}", merge_file="{merges}"),
     "is not JSON"),
    (dict(tokenizer_type="GPT2BPETokenizer", vocab_file="{vocab}", merge_file="{vocab}"),
     "does not start with GPT-2's '#version: 0.2' line"),
    (dict(tokenizer_type="BertWordPieceCase"), "is not supported here"),
])
def test_bad_tokenizer_flags_are_refused(files, flags, message):
    flags = {k: v.format(**{k2: str(v2) for k2, v2 in files.items()}) if isinstance(v, str)
             else v for k, v in flags.items()}
    with pytest.raises(TokenizerError, match=message):
        build_tokenizer(flags.pop("tokenizer_type"), **flags)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["GPT2BPETokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer",
                                  "NullTokenizer"])
def test_preprocess_train_evaluate_generate_export(files, kind, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from spannorm_megatron.checkpoint import read_run_record
    from spannorm_megatron.errors import ConfigError
    from spannorm_megatron.train import pretrain
    from spannorm_megatron.training.arguments import parse_args
    from spannorm_megatron.training.trainer import Trainer

    flags = tokenizer_flags(kind, files)
    tok = _tokenizer(kind, files)
    null = kind == "NullTokenizer"
    source = files["null_jsonl"] if null else files["jsonl"]

    # Preprocess with two workers: every document is its ids and the end of document.
    status, _out, err = run_tool("preprocess_data", "--input", source, "--output-prefix",
                                  tmp_path / "data", "--tokenizer-type", kind, *flags,
                                  "--append-eod", "--workers", "2")
    assert status == 0, err
    prefix = str(tmp_path / "data_text_document")
    data = IndexedDataset(prefix)
    documents = corpus_texts(source)
    assert len(data) == len(documents)
    for i in (0, 1, len(documents) - 1):
        assert data[i].tolist() == tok.tokenize(documents[i]) + [tok.eod]

    # Train 3 steps; the embedding is the vocabulary padded to a multiple of 128.
    ckpt = tmp_path / "ckpt"
    argv = [*SMALL, *MODEL_FLAGS, "--data-path", prefix, "--tokenizer-type", kind, *flags,
            "--train-iters", "3", "--save", str(ckpt)]
    with redirect_stdout(io.StringIO()):
        history = pretrain(argv)
    assert len(history["train_loss"]) >= 1 and all(math.isfinite(x)
                                                   for x in history["train_loss"])
    record = read_run_record(str(ckpt / "iter_0000003"))
    assert record["model_config"]["vocab_size"] == -(-tok.vocab_size // 128) * 128
    assert record["args"]["tokenizer_type"] == kind
    assert (record["args"]["tokenizer_sha256"] is None) == null

    # A resume with another tokenizer is refused before anything starts.
    other = {"GPT2BPETokenizer": ["--tokenizer-type", "HuggingFaceTokenizer",
                                  "--tokenizer-model", files["hf"]],
             "HuggingFaceTokenizer": ["--tokenizer-type", "GPT2BPETokenizer",
                                      "--vocab-file", files["vocab"], "--merge-file",
                                      files["merges"]],
             "Llama2Tokenizer": ["--tokenizer-type", "SentencePieceTokenizer",
                                 "--tokenizer-model", files["sp_model"]],
             "NullTokenizer": ["--tokenizer-type", "NullTokenizer", "--vocab-size",
                               str(files["null_vocab"] + 1)]}[kind]
    resume = [*SMALL, *MODEL_FLAGS, "--data-path", prefix, "--train-iters", "4", "--save",
              str(ckpt), "--load", str(ckpt)]
    with pytest.raises(ConfigError, match="trained with another tokenizer"):
        Trainer(parse_args(resume + other))

    # Export: the tokenizer goes along and reads text as training did.
    hf = tmp_path / "hf"
    status, out, err = run_tool("convert_to_hf", "--load", ckpt, "--save", hf)
    assert status == 0, err
    assert "WARNING" not in out, out
    exported = AutoTokenizer.from_pretrained(str(hf), local_files_only=True,
                                             trust_remote_code=True)  # the model's class
    sample = documents[0][:300]
    expected = tok.tokenize(sample)
    if kind == "Llama2Tokenizer":
        assert exported(sample).input_ids == expected  # <s> first, as transformers' Llama
    else:
        assert exported.encode(sample, add_special_tokens=False) == expected
    config = json.loads((hf / "config.json").read_text())
    assert config["eos_token_id"] == tok.eod
    if kind == "HuggingFaceTokenizer":
        assert "before a text when called as tok(text)" in out  # <s>, which training never saw

    # Evaluate the checkpoint and its export on held-out text: the same windows and numbers.
    text = files["heldout_ids"] if null else files["heldout"]
    results = {}
    for name, load in (("megatron", ckpt), ("hf", hf)):
        status, _out, err = run_tool("evaluate", "--load", load, "--input", text, "--json",
                                      tmp_path / f"{name}.json", "--seq-length", "64")
        assert status == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    meg, hfr = results["megatron"], results["hf"]
    assert (meg["tokens"], meg["windows"]) == (hfr["tokens"], hfr["windows"])
    assert abs(meg["loss"] - hfr["loss"]) <= 0.005 * meg["loss"]
    # windows of 64 over the text's ids (Llama2: <s> first); each scores all but its first
    total = len(tok.tokenize(open(text, encoding="utf-8").read()))
    rest = total % 64
    assert meg["tokens"] == total // 64 * 63 + (rest - 1 if rest >= 2 else 0)

    # Generate greedily from both: the same ids, the prompt read as training data is.
    prompt = "17 4 9" if null else "def main"
    outputs = {}
    for name, load in (("megatron", ckpt), ("hf", hf)):
        status, out, err = run_tool("generate", "--load", load, "--prompt", prompt, "--greedy",
                                     "--max-new-tokens", "4", "--json", "--device", "cpu")
        assert status == 0, err
        outputs[name] = json.loads(out.strip().splitlines()[-1])
    assert outputs["megatron"]["prompt_ids"] == tok.tokenize(prompt)
    assert outputs["megatron"]["prompt_ids"] == outputs["hf"]["prompt_ids"]
    assert outputs["megatron"]["output_ids"] == outputs["hf"]["output_ids"]
    assert outputs["megatron"]["text"] == tok.detokenize(outputs["megatron"]["output_ids"])
