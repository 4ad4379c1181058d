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

import importlib.util
import inspect
import io
import json
import math
import os
import socket
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _training import SMALL, prepare_corpus  # noqa: E402

from spannorm_megatron.data.errors import TokenizerError  # noqa: E402
from spannorm_megatron.data.tokenizer import build_tokenizer  # noqa: E402

TEXTS = [
    "Hello world", "def main():\n    return 42  # don't\n", "  two  spaces\n\n\ttab",
    "naïve café — 数字 ≤ 3 € 😀", "trailing ", "<|endoftext|> spelled out", "",
]
MODEL_FLAGS = ["--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
               "--disable-bias-linear", "--untie-embeddings-and-output-weights",
               "--hidden-dropout", "0", "--attention-dropout", "0"]


# ------------------------------------------------------------------------------ materials
def _corpus_texts(jsonl, limit=None):
    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts[:limit]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every tokenizer file, made from a 150 kB slice of the embedded corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tokenizer_types")
    _prefix, sp_model = prepare_corpus(root, max_bytes=150_000)
    jsonl = root / "stdlib.jsonl"
    texts = _corpus_texts(jsonl)

    # GPT-2 style byte-level BPE: vocab.json + merges.txt ("#version: 0.2" first)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    bpe.model.save(str(gpt2))  # vocab.json, merges.txt

    # A Hugging Face folder: another BPE, with <s> put before every text as Llama's tokenizers
    # do, </s> as eos and <pad>.
    hf_bpe = Tokenizer(models.BPE())
    hf_bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_bpe.decoder = decoders.ByteLevel()
    hf_bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", hf_bpe.token_to_id("<s>"))])
    hf_bpe.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>")])
    hf = root / "hf_tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=hf_bpe, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(hf))
    # Folders that are not usable: no eos (no end of document), a tokenizer.json that is not one
    PreTrainedTokenizerFast(tokenizer_object=hf_bpe).save_pretrained(str(root / "hf_no_eos"))
    (root / "hf_broken").mkdir()
    (root / "hf_broken" / "tokenizer.json").write_text("not json")

    # NullTokenizer's data: the SentencePiece ids of the same documents, as text
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    null_jsonl = root / "ids.jsonl"
    with open(null_jsonl, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": " ".join(map(str, sp.encode(text)))}) + "\n")
    heldout = root / "heldout.txt"
    heldout.write_text("naïve café — 数字\n" + open(inspect.__file__).read()[:3000],
                       encoding="utf-8")
    heldout_ids = root / "heldout_ids.txt"
    heldout_ids.write_text(" ".join(map(str, sp.encode(heldout.read_text(encoding="utf-8")))))
    return dict(root=root, jsonl=jsonl, sp_model=str(sp_model), vocab=str(gpt2 / "vocab.json"),
                merges=str(gpt2 / "merges.txt"), hf=str(hf), null_jsonl=null_jsonl,
                heldout=heldout, heldout_ids=heldout_ids, null_vocab=sp.get_piece_size())


def _flags(kind, files):
    return {
        "GPT2BPETokenizer": ["--vocab-file", files["vocab"], "--merge-file", files["merges"]],
        "HuggingFaceTokenizer": ["--tokenizer-model", files["hf"]],
        "Llama2Tokenizer": ["--tokenizer-model", files["sp_model"]],
        "NullTokenizer": ["--vocab-size", str(files["null_vocab"])],
    }[kind]


def _tokenizer(kind, files):
    flags = dict(zip(*[iter(_flags(kind, files))] * 2))
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
    texts = TEXTS + _corpus_texts(files["jsonl"], 20)
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
    for text in TEXTS + _corpus_texts(files["jsonl"], 10):
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
def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}",
                                                  os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(name, *argv):
    """(exit status, stdout, stderr) of a tool's main, run in this process."""
    from spannorm_megatron.hf.cli import run_cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = run_cli(_tool(name).main, [str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


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

    flags = _flags(kind, files)
    tok = _tokenizer(kind, files)
    null = kind == "NullTokenizer"
    source = files["null_jsonl"] if null else files["jsonl"]

    # Preprocess with two workers: every document is its ids and the end of document.
    status, _out, err = _run_tool("preprocess_data", "--input", source, "--output-prefix",
                                  tmp_path / "data", "--tokenizer-type", kind, *flags,
                                  "--append-eod", "--workers", "2")
    assert status == 0, err
    prefix = str(tmp_path / "data_text_document")
    data = IndexedDataset(prefix)
    documents = _corpus_texts(source)
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
    status, out, err = _run_tool("convert_to_hf", "--load", ckpt, "--save", hf)
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
        status, _out, err = _run_tool("evaluate", "--load", load, "--input", text, "--json",
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
        status, out, err = _run_tool("generate", "--load", load, "--prompt", prompt, "--greedy",
                                     "--max-new-tokens", "4", "--json", "--device", "cpu")
        assert status == 0, err
        outputs[name] = json.loads(out.strip().splitlines()[-1])
    assert outputs["megatron"]["prompt_ids"] == tok.tokenize(prompt)
    assert outputs["megatron"]["prompt_ids"] == outputs["hf"]["prompt_ids"]
    assert outputs["megatron"]["output_ids"] == outputs["hf"]["output_ids"]
    assert outputs["megatron"]["text"] == tok.detokenize(outputs["megatron"]["output_ids"])
