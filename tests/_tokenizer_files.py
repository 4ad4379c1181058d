"""Tokenizer files of every Megatron-LM type, made from nothing downloaded, and the tools run in
this process: shared by the tokenizer-type tests and the Megatron-LM script tests."""

from __future__ import annotations

import inspect
import io
import json
from contextlib import redirect_stderr, redirect_stdout

from _tools import tool_module
from _training import prepare_corpus


def corpus_texts(jsonl, limit=None):
    with open(jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return texts[:limit]


def make_tokenizer_files(root):
    """Every tokenizer file, made under `root` from a 150 kB slice of the embedded corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers import trainers
    from transformers import PreTrainedTokenizerFast

    _prefix, sp_model = prepare_corpus(root, max_bytes=150_000)
    jsonl = root / "stdlib.jsonl"
    texts = corpus_texts(jsonl)

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


def tokenizer_flags(kind, files):
    return {
        "GPT2BPETokenizer": ["--vocab-file", files["vocab"], "--merge-file", files["merges"]],
        "HuggingFaceTokenizer": ["--tokenizer-model", files["hf"]],
        "Llama2Tokenizer": ["--tokenizer-model", files["sp_model"]],
        "NullTokenizer": ["--vocab-size", str(files["null_vocab"])],
    }[kind]


def tool(name):
    """The package module behind tools/NAME.py (its `main` is the console script's)."""
    return tool_module(name)


def run_tool(name, *argv):
    """(exit status, stdout, stderr) of a tool's main, run in this process."""
    from spannorm_megatron.hf.cli import run_cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = run_cli(tool(name).main, [str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


