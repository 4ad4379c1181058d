"""Data pipeline: embedded corpus, tokenizer training, preprocessing, datasets and batches.

Real files in tmp_path, no mocks: a tiny SentencePiece model (vocab 400) trained by the CLI on a
slice of the embedded corpus, JSONL/text inputs preprocessed by the tool's engine (1 and 2
worker processes) and read back with megatron-core's IndexedDataset, and GPT datasets built by
megatron-core's BlendedMegatronDatasetBuilder. The tools run in this process through their
`main` (fast: megatron-core is imported once) except where the test is about running them as
scripts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from _tools import tool_module
from spannorm_megatron.data.cli import run_cli
from spannorm_megatron.data.corpus import (
    EXCLUDED_DIR_NAMES,
    embedded_corpus,
    embedded_corpus_documents,
    stdlib_root,
    write_embedded_corpus,
)
from spannorm_megatron.errors import DataError, IndexedDatasetError

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
CORPUS_SLICE = 150_000  # bytes of the embedded corpus: its first 12 files, about 0.1 MB
VOCAB = 400


def _load_tool(name):
    """The package module behind tools/NAME.py (its `main` is the console script's)."""
    return tool_module(name)


def _run_script(name, *args, cwd=None):
    return subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=120,
    )


def _digest(*paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def _documents_of(prefix):
    """Token ids per document (sequences concatenated) and sequence lengths, via megatron-core."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    docs, lengths = [], []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        seqs = [numpy.array(dataset[i]) for i in range(begin, end)]
        docs.append([int(t) for seq in seqs for t in seq])
        lengths.append([len(seq) for seq in seqs])
    del dataset
    return docs, lengths


# --- shared fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(work):
    """The train_tokenizer CLI run as a script on a slice of the embedded corpus."""
    prefix = work / "tok" / "stdlib"
    proc = _run_script(
        "train_tokenizer", "--embedded-corpus", "--embedded-corpus-max-bytes", CORPUS_SLICE,
        "--model-prefix", prefix, "--vocab-size", VOCAB, "--num-threads", 1,
    )
    return prefix, proc


@pytest.fixture(scope="module")
def tokenizer_model(trained):
    prefix, proc = trained
    assert proc.returncode == 0, proc.stderr
    return Path(f"{prefix}.model")


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model):
    from spannorm_megatron.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def paragraphs():
    """Several hundred small documents: the corpus slice's files cut at blank lines."""
    return [p for text in embedded_corpus(CORPUS_SLICE) for p in text.split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def jsonl_input(work, paragraphs):
    records = [
        {"text": text, "title": text.split("\n", 1)[0]} for text in embedded_corpus(CORPUS_SLICE)
    ]
    records += [{"text": p, "title": ""} for p in paragraphs[:100]]
    records += [
        {"text": "", "title": "an empty document"},
        {"text": "naïve café — 中文 🙂\n\tindented\n", "title": "unicode"},
        {"text": ["first sentence.", "", "second sentence."], "title": "pre-split"},
    ]
    return _write_jsonl(work / "docs.jsonl", records), records


@pytest.fixture(scope="module")
def dataset_prefix(work, paragraphs, tokenizer_model):
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    source = _write_jsonl(work / "paragraphs.jsonl", [{"text": p} for p in paragraphs])
    result = preprocess(
        PreprocessConfig(
            input=str(source), output_prefix=str(work / "ds" / "paragraphs"),
            tokenizer_model=str(tokenizer_model), append_eod=True, workers=1,
        ),
        log=io.StringIO(),
    )
    return result.outputs["text"]


# --- corpus -----------------------------------------------------------------------------------


def test_embedded_corpus_is_deterministic_stdlib_source(tmp_path):
    first = embedded_corpus_documents(CORPUS_SLICE)
    again = embedded_corpus_documents(CORPUS_SLICE)
    assert first == again and len(first) >= 5
    assert all(doc.text.strip() for doc in first)
    root = stdlib_root()
    for doc in first:
        assert doc.path.endswith(".py") and (root / doc.path).is_file()
        assert not set(doc.path.split("/")[:-1]) & EXCLUDED_DIR_NAMES
    # A larger cap extends a smaller one: small slices stay stable.
    larger = embedded_corpus_documents(4 * CORPUS_SLICE)
    assert larger[: len(first)] == first and len(larger) > len(first)
    assert embedded_corpus(CORPUS_SLICE) == [doc.text for doc in first]

    a = write_embedded_corpus(tmp_path / "a.jsonl", CORPUS_SLICE)
    b = write_embedded_corpus(tmp_path / "b.jsonl", CORPUS_SLICE)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert a.sha256 == b.sha256 and a.num_documents == len(first)
    lines = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in lines] == [doc.text for doc in first]


# --- tokenizer --------------------------------------------------------------------------------


def test_train_tokenizer_cli_model_round_trips(trained, tokenizer, tokenizer_model):
    prefix, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert "Wrote" in proc.stderr and Path(f"{prefix}.vocab").is_file()
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert tokenizer.vocab_size == VOCAB == len(tokenizer.vocab)
    assert tokenizer.vocab[tokenizer.eod] == "</s>"  # megatron-core's eod: the model's eos
    assert (tokenizer.pad, tokenizer.bos, tokenizer.eos, tokenizer.eod) == (3, 1, 2, 2)
    assert tokenizer.vocab[tokenizer.special_token_ids["eod_piece"]] == "<EOD>"
    samples = embedded_corpus(CORPUS_SLICE) + [
        "  two leading spaces\n\n\ttab, trailing  ", "naïve café — 中文 🙂", "x", "",
    ]
    for text in samples:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize(tokenizer.tokenize("a b") + [tokenizer.eod]) == "a b"
    assert tokenizer.eod not in tokenizer.tokenize("<EOD> in the text is plain text")


def test_train_tokenizer_is_deterministic_and_megatron_compatible(tmp_path, tokenizer_model):
    tool = _load_tool("train_tokenizer")
    base = ["--embedded-corpus", "--embedded-corpus-max-bytes", str(CORPUS_SLICE),
            "--vocab-size", str(VOCAB), "--num-threads", "1"]
    assert run_cli(tool.main, base + ["--model-prefix", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again.model").read_bytes() == tokenizer_model.read_bytes()

    # A model without Megatron-LM's special pieces gets them appended past its vocabulary,
    # in Megatron-LM's order, so ids agree with data Megatron-LM wrote with it.
    args = base + ["--control-symbols", "", "--model-prefix", str(tmp_path / "bare")]
    assert run_cli(tool.main, args) == 0
    from spannorm_megatron.data.tokenizer import SentencePieceTokenizer

    bare = SentencePieceTokenizer(tmp_path / "bare.model")
    pieces = bare.special_token_ids
    assert (pieces["cls"], pieces["sep"], pieces["eod_piece"], pieces["mask"]) == (
        VOCAB, VOCAB + 1, VOCAB + 2, VOCAB + 3)
    assert bare.vocab_size == VOCAB + 4 and bare.vocab[pieces["eod_piece"]] == "<EOD>"
    assert bare.detokenize(bare.tokenize("abc") + [bare.eod]) == "abc"


# --- preprocessing ----------------------------------------------------------------------------


def _expected(tokenizer, value, append_eod):
    sentences = value if isinstance(value, list) else [value]
    seqs = [tokenizer.tokenize(s) for s in sentences]
    seqs = [s for s in seqs if s]
    if append_eod and seqs:
        seqs[-1] = seqs[-1] + [tokenizer.eod]
    return [t for s in seqs for t in s], [len(s) for s in seqs]


@pytest.mark.parametrize("workers,append_eod", [(1, True), (2, True), (2, False)])
def test_preprocess_matches_tokenizer(tmp_path, jsonl_input, tokenizer, tokenizer_model,
                                      workers, append_eod, capsys):
    source, records = jsonl_input
    tool = _load_tool("preprocess_data")
    args = ["--input", str(source), "--output-prefix", str(tmp_path / "out"),
            "--json-keys", "text", "title", "--tokenizer-type", "SentencePieceTokenizer",
            "--tokenizer-model", str(tokenizer_model), "--workers", str(workers),
            "--chunk-size", "4", "--log-interval", "50"] + (["--append-eod"] if append_eod else [])
    assert run_cli(tool.main, args) == 0
    log = capsys.readouterr().err
    assert "Processed 50 documents" in log and "tokens/s" in log and "MB/s" in log
    assert sorted(os.listdir(tmp_path)) == sorted(
        f"out_{key}_document{ext}" for key in ("text", "title")
        for ext in (".bin", ".idx", ".tokenizer.json")
    )
    for key in ("text", "title"):
        docs, lengths = _documents_of(tmp_path / f"out_{key}_document")
        assert len(docs) == len(records)
        for record, doc, seq_lengths in zip(records, docs, lengths):
            ids, expected_lengths = _expected(tokenizer, record[key], append_eod)
            assert doc == ids and seq_lengths == expected_lengths
    text_docs, text_lengths = _documents_of(tmp_path / "out_text_document")
    assert text_docs[-3] == [] and text_lengths[-3] == []  # empty document kept, no sequences
    assert len(text_lengths[-1]) == 2  # pre-split document: one sequence per non-empty string


def test_documents_end_with_megatron_cores_own_eod(tmp_path, tokenizer_model):
    """The end-of-document id our preprocessing appends is the one megatron-core's tokenizer
    library gives for the same SentencePiece model (what Megatron-LM's preprocess_data.py
    appends), and each document's tokens are that library's `text_to_ids`."""
    from megatron.core.tokenizers import MegatronTokenizer

    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    theirs = MegatronTokenizer.from_pretrained(str(tokenizer_model),
                                               metadata_path={"library": "sentencepiece"})
    source = tmp_path / "docs.txt"
    texts = ["def f(x):\n    return x", "naïve café 中文", "last one"]
    source.write_text("\n\n".join(texts) + "\n")
    preprocess(PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "docs"),
                                tokenizer_model=str(tokenizer_model), append_eod=True),
               log=io.StringIO())
    docs, _ = _documents_of(tmp_path / "docs_text_document")
    assert docs == [list(theirs.tokenize(t)) + [theirs.eod] for t in texts]


def test_preprocess_plain_text_documents_are_paragraphs(tmp_path, tokenizer, tokenizer_model):
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    source = tmp_path / "book.txt"
    source.write_bytes(b"First para\r\nline two\r\n\r\n \n\nSecond para\n\n\nThird\n")
    result = preprocess(
        PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "book"),
                         tokenizer_model=str(tokenizer_model), append_eod=True, workers=2),
        log=io.StringIO(),
    )
    assert result.outputs == {"text": str(tmp_path / "book_text_document")}
    docs, _ = _documents_of(tmp_path / "book_text_document")
    texts = ["First para\nline two", "Second para", "Third"]
    assert docs == [tokenizer.tokenize(t) + [tokenizer.eod] for t in texts]


@pytest.mark.slow
def test_preprocess_script_runs_with_workers(tmp_path, tokenizer_model, paragraphs):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": p} for p in paragraphs[:300]])
    proc = _run_script(
        "preprocess_data", "--input", source, "--output-prefix", tmp_path / "corpus",
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tokenizer_model,
        "--append-eod", "--workers", 2, "--log-interval", 100,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Processed") == 3 and "Done: 300 documents" in proc.stderr
    assert "Apex" not in proc.stderr  # megatron-core's import-time noise is filtered
    from spannorm_megatron.data.indexed import check_indexed_dataset

    info = check_indexed_dataset(str(tmp_path / "corpus_text_document"))
    assert info.num_documents == 300 and info.dtype == numpy.uint16


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def existing_outputs(tmp_path):
    """Pre-existing outputs at the prefix the failing runs would write; they must survive."""
    paths = [tmp_path / "out_text_document.bin", tmp_path / "out_text_document.idx"]
    for path in paths:
        path.write_bytes(b"previous run " + path.suffix.encode())
    return paths


def _assert_untouched(tmp_path, paths, before):
    assert _digest(*paths) == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.slow
def test_preprocess_missing_input_and_bad_tokenizer_files(tmp_path, existing_outputs,
                                                          tokenizer_model):
    before = _digest(*existing_outputs)
    common = ["--output-prefix", tmp_path / "out", "--workers", 2]
    proc = _run_script("preprocess_data", "--input", tmp_path / "absent.jsonl",
                       "--tokenizer-model", tokenizer_model, *common)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "absent.jsonl' does not exist" in proc.stderr

    good_input = _write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    proc = _run_script("preprocess_data", "--input", good_input,
                       "--tokenizer-model", tmp_path / "nope.model", *common)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nope.model' does not exist" in proc.stderr and "train_tokenizer.py" in proc.stderr

    not_sp = tmp_path / "tokenizer.json"
    not_sp.write_text('{"model": {"type": "BPE"}}')
    proc = _run_script("preprocess_data", "--input", good_input,
                       "--tokenizer-model", not_sp, *common)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "tokenizer.json' is not a SentencePiece model" in proc.stderr

    proc = _run_script("preprocess_data", "--input", good_input, "--tokenizer-model",
                       tokenizer_model, "--tokenizer-type", "BertWordPieceCase", *common)
    assert proc.returncode == 2 and "tokenizer types are SentencePieceTokenizer" in proc.stderr
    _assert_untouched(tmp_path, existing_outputs, before)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_bad_json_and_missing_key(tmp_path, existing_outputs, tokenizer_model,
                                             workers, capsys):
    before = _digest(*existing_outputs)
    tool = _load_tool("preprocess_data")
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"document {i}"}) for i in range(40)]
    lines[36] = '{"text": "unterminated'  # line 37
    bad.write_text("\n".join(lines) + "\n")
    args = ["--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(tokenizer_model),
            "--workers", str(workers), "--chunk-size", "4"]
    assert run_cli(tool.main, ["--input", str(bad)] + args) == 2
    err = capsys.readouterr().err
    assert f"Line 37 of '{bad}' is not valid JSON" in err and "Traceback" not in err

    nokey = _write_jsonl(tmp_path / "nokey.jsonl", [{"text": "a"}, {"body": "b"}])
    assert run_cli(tool.main, ["--input", str(nokey)] + args) == 2
    err = capsys.readouterr().err
    assert f"Line 2 of '{nokey}' has no key 'text' (its keys: 'body')" in err

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert run_cli(tool.main, ["--input", str(empty)] + args) == 2
    assert "holds no documents" in capsys.readouterr().err
    _assert_untouched(tmp_path, existing_outputs, before)


def test_train_tokenizer_bad_input_keeps_existing_model(tmp_path, capsys):
    tool = _load_tool("train_tokenizer")
    model = tmp_path / "tok.model"
    model.write_bytes(b"previous model")
    before = _digest(model)
    prefix = ["--model-prefix", str(tmp_path / "tok")]
    assert run_cli(tool.main, ["--input", str(tmp_path / "absent.txt")] + prefix) == 2
    assert "absent.txt' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert run_cli(tool.main, ["--input", str(bad), "--vocab-size", "300"] + prefix) == 2
    assert f"Line 2 of '{bad}': the value of 'text' is a JSON int" in capsys.readouterr().err
    assert run_cli(tool.main, ["--embedded-corpus", "--vocab-size", "100"] + prefix) == 2
    assert "--vocab-size 100 leaves no room" in capsys.readouterr().err
    assert _digest(model) == before


# --- datasets and batches ---------------------------------------------------------------------


SEQ = 32


def _data_config(prefix, cache, **kw):
    from spannorm_megatron.config.data import DataConfig

    return DataConfig(seq_length=SEQ, data_path=prefix, split="80,10,10",
                      data_cache_path=str(cache), **kw)


def test_dataset_batches_have_forward_step_layout(work, dataset_prefix, tokenizer):
    from spannorm_megatron.data.dataset import build_gpt_datasets
    from spannorm_megatron.data.loader import build_data_loader, iterate_batches

    train, valid, test = build_gpt_datasets(
        _data_config(dataset_prefix, work / "cache"), tokenizer, [96, 16, 16]
    )
    assert len(train) >= 96 and len(valid) >= 16 and len(test) >= 16
    batches = list(iterate_batches(build_data_loader(train, 0, micro_batch_size=4)))
    assert len(batches) == len(train) // 4
    causal_mask = ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril()  # True: masked
    for batch in batches[:5]:
        assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
        # Megatron-LM's default (no --no-create-attention-mask-in-dataloader): the causal mask.
        assert torch.equal(batch.pop("attention_mask"), causal_mask.expand(4, 1, SEQ, SEQ))
        assert all(t.shape == (4, SEQ) for t in batch.values())
        assert batch["tokens"].dtype == torch.long and batch["loss_mask"].dtype == torch.float
        assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
        assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(4, SEQ))
        assert (batch["tokens"] < tokenizer.vocab_size).all()
    # Samples are the preprocessed token stream: every window occurs in some document + eod.
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    raw = IndexedDataset(dataset_prefix)
    stream = numpy.concatenate([numpy.array(raw[i]) for i in range(len(raw))]).tolist()
    del raw
    assert tokenizer.eod in stream
    sample = batches[0]["tokens"][0].tolist()
    assert any(stream[i : i + 8] == sample[:8] for i in range(len(stream) - 8))


@pytest.mark.slow
def test_resume_at_consumed_samples_gives_the_same_batches(work, dataset_prefix, tokenizer):
    from spannorm_megatron.data.dataset import build_gpt_datasets
    from spannorm_megatron.data.loader import build_data_loader, iterate_batches

    config = _data_config(dataset_prefix, work / "cache")
    train, _, _ = build_gpt_datasets(config, tokenizer, [96, 16, 16])
    mbs, dp = 2, 2
    for rank in range(dp):
        full = list(iterate_batches(build_data_loader(train, 0, mbs, rank, dp)))
        # A fresh process would rebuild the datasets (now from megatron-core's cache).
        rebuilt, _, _ = build_gpt_datasets(config, tokenizer, [96, 16, 16])
        k = 5  # global batches already trained
        resumed = list(iterate_batches(
            build_data_loader(rebuilt, k * mbs * dp, mbs, rank, dp, num_workers=1)
        ))
        assert len(resumed) == len(full) - k
        for a, b in zip(full[k:], resumed):
            assert all(torch.equal(a[key], b[key]) for key in a)
    # The ranks' micro-batches tile each global batch.
    from spannorm_megatron.data.loader import PretrainingSampler

    per_rank = [list(PretrainingSampler(20, 4, 2, r, 2)) for r in range(2)]
    assert per_rank == [
        [[4, 5], [8, 9], [12, 13], [16, 17]],
        [[6, 7], [10, 11], [14, 15], [18, 19]],
    ]
    with pytest.raises(DataError, match="Cannot resume at consumed_samples=21"):
        PretrainingSampler(20, 21, 2)


def test_weighted_blend(work, dataset_prefix, tokenizer):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    from spannorm_megatron.data.dataset import build_gpt_datasets, num_samples_for

    other = work / "ds" / "copy_text_document"
    for ext in (".bin", ".idx"):
        shutil.copyfile(dataset_prefix + ext, str(other) + ext)
    config = _data_config(f"0.75 {dataset_prefix} 0.25 {other}", work / "cache_blend")
    sizes = num_samples_for(train_iters=10, global_batch_size=4, eval_interval=5, eval_iters=2)
    assert sizes == (40, 24, 8)
    train, valid, test = build_gpt_datasets(config, tokenizer, sizes)
    assert isinstance(train, BlendedDataset) and len(train) == 40 and len(test) == 8
    from spannorm_megatron.data.loader import build_data_iterators

    train_it, valid_it, test_it = build_data_iterators((train, valid, test), micro_batch_size=4)
    batches = list(train_it)
    assert len(batches) == 10
    assert all(set(b) == {"tokens", "labels", "loss_mask", "position_ids", "attention_mask"}
               for b in batches)
    assert [next(test_it)["tokens"].shape for _ in range(3)] == [(4, SEQ)] * 3  # cycles


def test_mismatched_idx_bin_and_missing_data_path(work, tmp_path, dataset_prefix, tokenizer,
                                                  tokenizer_model):
    from spannorm_megatron.config.data import DataConfig
    from spannorm_megatron.data.dataset import build_gpt_datasets
    from spannorm_megatron.data.indexed import check_indexed_dataset
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    small = _write_jsonl(tmp_path / "small.jsonl", [{"text": "just a few words"}] * 3)
    other = preprocess(
        PreprocessConfig(input=str(small), output_prefix=str(tmp_path / "small"),
                         tokenizer_model=str(tokenizer_model), workers=1),
        log=io.StringIO(),
    ).outputs["text"]
    mixed = str(tmp_path / "mixed")
    shutil.copyfile(dataset_prefix + ".bin", mixed + ".bin")
    shutil.copyfile(other + ".idx", mixed + ".idx")
    truncated = str(tmp_path / "truncated")
    shutil.copyfile(dataset_prefix + ".idx", truncated + ".idx")
    Path(truncated + ".bin").write_bytes(Path(dataset_prefix + ".bin").read_bytes()[:-6])
    files = [p + ext for p in (mixed, truncated) for ext in (".bin", ".idx")]
    before = _digest(*files)
    for prefix in (mixed, truncated):
        with pytest.raises(IndexedDatasetError) as err:
            build_gpt_datasets(_data_config(prefix, tmp_path / "cache"), tokenizer, [8, 2, 2])
        message = str(err.value)
        assert f"'{prefix}.bin'" in message and f"'{prefix}.idx'" in message
        assert "do not match" in message and "preprocess_data.py" in message
    assert _digest(*files) == before

    missing = str(tmp_path / "nothing_here")
    with pytest.raises(DataError) as err:
        build_gpt_datasets(_data_config(missing, tmp_path / "cache"), tokenizer, [8, 2, 2])
    assert f"looked for '{missing}.bin' and '{missing}.idx'; neither exists" in str(err.value)
    forgot_suffix = str(tmp_path / "small")
    with pytest.raises(DataError, match="did you mean '.*small_text_document'"):
        check_indexed_dataset(forgot_suffix)
    with pytest.raises(DataError, match="drop the '.bin' suffix"):
        check_indexed_dataset(other + ".bin")
    with pytest.raises(DataError, match="weight/prefix pairs"):
        DataConfig(seq_length=8, data_path=f"0.5 {other} {other}")
    with pytest.raises(DataError, match="has weights, so megatron-core needs the number"):
        build_gpt_datasets(DataConfig(seq_length=8, data_path=f"1 {other} 2 {other}"),
                           tokenizer, [8, None, 2])
    with pytest.raises(DataError, match=r"hold no tokens\. .*drop it \(--split 969,0,1\)|"
                       r"hold no tokens\. .*drop it \(--split 969,30,0\)"):
        build_gpt_datasets(DataConfig(seq_length=8, data_path=other, split="969,30,1"),
                           tokenizer, [8, 2, 2])


def test_stale_index_cache_is_refused(tmp_path, paragraphs, tokenizer, tokenizer_model):
    from spannorm_megatron.config.data import DataConfig
    from spannorm_megatron.data.dataset import build_gpt_datasets
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    source = _write_jsonl(tmp_path / "in.jsonl", [{"text": p} for p in paragraphs[:200]])
    run = PreprocessConfig(input=str(source), output_prefix=str(tmp_path / "d"),
                           tokenizer_model=str(tokenizer_model), append_eod=True)
    prefix = preprocess(run, log=io.StringIO()).outputs["text"]
    config = DataConfig(seq_length=16, data_path=prefix, split="90,10,0")
    build_gpt_datasets(config, tokenizer, [16, 4, 0])  # caches under <prefix>/cache/
    build_gpt_datasets(config, tokenizer, [16, 4, 0])  # the same data: its caches are reused
    # Replaced by other data with an older mtime, as cp -p or rsync -a copy it.
    source = _write_jsonl(tmp_path / "in2.jsonl", [{"text": p} for p in paragraphs[200:260]])
    other = preprocess(dataclasses.replace(run, input=str(source),
                                           output_prefix=str(tmp_path / "e")),
                       log=io.StringIO()).outputs["text"]
    old = os.path.getmtime(prefix + ".idx") - 3600
    for ext in (".bin", ".idx"):
        shutil.copyfile(other + ext, prefix + ext)
        os.utime(prefix + ext, (old, old))
    with pytest.raises(DataError, match="was built for other data than .* holds now"):
        build_gpt_datasets(config, tokenizer, [16, 4, 0])


# --- benchmark --------------------------------------------------------------------------------


def test_benchmark_tool_writes_table_and_json(tmp_path, paragraphs, tokenizer_model, capsys):
    source = _write_jsonl(tmp_path / "bench.jsonl", [{"text": p} for p in paragraphs[:200]])
    tool = _load_tool("benchmark_data")
    out = tmp_path / "bench.json"
    argv = ["--input", str(source), "--tokenizer-model", str(tokenizer_model),
            "--workers", "1,2", "--runs", "2", "--output", str(out)]
    assert run_cli(tool.main, argv) == 0
    table = capsys.readouterr().out
    assert "tokens/s" in table and "MB/s" in table
    report = json.loads(out.read_text())
    assert [r["workers"] for r in report["results"]] == [1, 2]
    for entry in report["results"]:
        assert entry["documents"] == 200 and len(entry["runs"]) == 2
        assert entry["median_tokens_per_second"] > 0 and entry["median_mb_per_second"] > 0
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".bin", ".idx"))]


def test_preprocessing_records_its_tokenizer_and_a_different_one_is_refused(
        tmp_path, jsonl_input, tokenizer_model):
    """<prefix>.tokenizer.json beside Megatron-LM's files: the same tokenizer passes, another one
    (other files, or another vocabulary size) is refused naming both; a killed run's temporary
    files (its PID gone) are removed by the next run, a running one's are left."""
    from spannorm_megatron.errors import DataError
    from spannorm_megatron.data.provenance import check_data_tokenizer, read_sidecar
    from spannorm_megatron.data.tokenizer_args import tokenizer_config, tokenizer_sha256

    source, _ = jsonl_input
    prefix = tmp_path / "out_text_document"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = tmp_path / f"out_text_document.tmp{dead}.bin"
    killed.write_bytes(b"\0" * 4096)
    running = tmp_path / f"out_text_document.tmp{os.getppid()}.bin"  # a live process
    running.write_bytes(b"\0")
    tool = _load_tool("preprocess_data")
    assert run_cli(tool.main, ["--input", str(source), "--output-prefix", str(tmp_path / "out"),
                               "--tokenizer-type", "SentencePieceTokenizer",
                               "--tokenizer-model", str(tokenizer_model), "--workers", "1"]) == 0
    assert not killed.exists() and running.exists()
    record = read_sidecar(str(prefix))
    same = tokenizer_config(tokenizer_type="SentencePieceTokenizer",
                            tokenizer_model=str(tokenizer_model))
    assert record["tokenizer_type"] == "SentencePieceTokenizer"
    assert record["tokenizer_sha256"] == tokenizer_sha256(same)
    check_data_tokenizer(str(prefix), same, tokenizer_sha256(same), record["vocab_size"])
    null = tokenizer_config(tokenizer_type="NullTokenizer", vocab_size=record["vocab_size"])
    with pytest.raises(DataError, match=r"--data-path .*out_text_document was made with another "
                       r"tokenizer .*type: data 'SentencePieceTokenizer', given 'NullTokenizer'"):
        check_data_tokenizer(str(prefix), null, tokenizer_sha256(null), record["vocab_size"])
    with pytest.raises(DataError, match=r"vocabulary size: data \d+, given 7"):
        check_data_tokenizer(str(prefix), same, tokenizer_sha256(same), 7)
