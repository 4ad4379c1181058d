"""tools/evaluate.py: loss, perplexity and bits per byte of a checkpoint or an HF folder.

A tiny SpanNorm model is trained a few steps by `spannorm-train` (tests/_training.py) and
exported by tools/convert_to_hf.py; the tool must give the same numbers for both, the same under
a two-rank tensor-parallel layout, and the numbers an independent computation gives.
"""

from __future__ import annotations

import inspect
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch

import launch
from _tools import tool_module
from _training import SMALL, STRICT_DEVICES, prepare_corpus, train_in_process
from launch import ROOT

SEQ = 64


def _tool(name):
    """The package module behind tools/NAME.py (its `main` is the console script's)."""
    return tool_module(name)


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, slow):
    """A 2-layer spannorm model trained 15 steps (checkpoint + HF export) and a held-out text:
    a stdlib module's source (not in the training slice) with some multi-byte characters."""
    root = tmp_path_factory.mktemp("evaluate")
    prefix, tok = prepare_corpus(root, max_bytes=200_000)
    ckpt = root / "ckpt"
    result = train_in_process(*SMALL, "--data-path", prefix, "--tokenizer-model", tok,
                              "--lr", "5e-3", "--train-iters", "15", "--save", str(ckpt))
    assert result.returncode == 0, result.stderr[-3000:]
    status, _out, err = _run_tool("convert_to_hf", "--load", ckpt, "--save", root / "hf")
    assert status == 0, err
    text = root / "heldout.txt"
    source = open(inspect.__file__, encoding="utf-8").read()[:8_000]
    text.write_text("naïve café — 数字 ≤ 3 €\n" + source, encoding="utf-8")
    return root, ckpt, root / "hf", text, tok


def _evaluate(*argv):
    status, out, err = _run_tool("evaluate", *argv)
    assert status == 0, err
    return out, err


@pytest.fixture(scope="module")
def evaluated(trained):
    """The tool's JSON for the checkpoint (one process) and for its HF export, and its stderr."""
    root, ckpt, hf, text, _tok = trained
    results = {}
    for name, load in (("megatron", ckpt), ("hf", hf)):
        _out, err = _evaluate("--load", load, "--input", text, "--json", root / f"{name}.json",
                              "--micro-batch-size", "4")
        results[name] = json.loads((root / f"{name}.json").read_text())
        results[f"{name} stderr"] = err
    return results


def test_checkpoint_and_hf_export_agree_with_an_independent_computation(trained, evaluated):
    root, ckpt, hf, text, tok = trained
    meg, hfr = evaluated["megatron"], evaluated["hf"]
    # progress lines after each group of batches (8 batches of 4 windows)
    assert evaluated["megatron stderr"].count("[evaluate]") > 1
    assert evaluated["megatron stderr"].strip().endswith("done")
    assert meg["source"] == "megatron" and hfr["source"] == "huggingface"
    assert abs(meg["loss"] - hfr["loss"]) <= 0.005 * meg["loss"]
    assert abs(meg["bits_per_byte"] - hfr["bits_per_byte"]) <= 0.005 * meg["bits_per_byte"]
    assert (meg["tokens"], meg["bytes"]) == (hfr["tokens"], hfr["bytes"])

    # Independently: SentencePiece ids of the whole text, windows of SEQ, every token after a
    # window's first scored by the HF model; bytes from the pieces' own text.
    import sentencepiece
    from transformers import AutoModelForCausalLM

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok))
    data = text.read_text(encoding="utf-8")
    pieces = sp.encode(data, return_type="proto").pieces  # with each piece's byte span
    ids = [piece.id for piece in pieces]
    model = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    starts = range(0, len(ids), SEQ)
    windows = [ids[start:start + SEQ] for start in starts]
    full = torch.tensor([w for w in windows if len(w) == SEQ])
    with torch.no_grad():
        logits = model(input_ids=full).logits[:, :-1].float()
        nll = float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), full[:, 1:].reshape(-1), reduction="sum"))
        if 2 <= len(windows[-1]) < SEQ:
            rest = torch.tensor([windows[-1]])
            nll += float(torch.nn.functional.cross_entropy(
                model(input_ids=rest).logits[0, :-1].float(), rest[0, 1:], reduction="sum"))
    scored = sum(len(w) - 1 for w in windows if len(w) >= 2)
    first_bytes = sum(pieces[start].end - pieces[start].begin for start in starts)
    assert meg["tokens"] == scored and meg["windows"] == math.ceil(len(ids) / SEQ)
    assert abs(meg["loss"] - nll / scored) <= 1e-4 * meg["loss"]
    # (a byte-fallback piece's span is the whole character or nothing, ours one byte)
    assert abs(meg["bytes"] - (len(data.encode("utf-8")) - first_bytes)) <= 4
    assert meg["bits_per_byte"] == pytest.approx(nll / math.log(2) / meg["bytes"], rel=1e-4)
    assert meg["perplexity"] == pytest.approx(math.exp(meg["loss"]), rel=1e-9)
    assert meg["loss"] < math.log(512) - 0.3  # the trained model, not a uniform guess


def test_two_rank_tensor_parallel_matches_one_process(trained, evaluated, tmp_path, torchrun):
    _root, ckpt, _hf, text, _tok = trained
    result = torchrun(ROOT / "tools" / "evaluate.py", "--load", ckpt, "--input", text,
                      "--tensor-model-parallel-size", "2", "--json", tmp_path / "tp2.json",
                      timeout=300, env=STRICT_DEVICES)
    assert result.returncode == 0, result.stderr[-3000:]
    one = evaluated["megatron"]
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    assert (tp2["tokens"], tp2["bytes"]) == (one["tokens"], one["bytes"])
    assert tp2["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_max_bytes_evaluates_a_prefix_cut_at_a_line(trained, tmp_path):
    _root, ckpt, _hf, text, _tok = trained
    prefix = tmp_path / "prefix.txt"
    data = text.read_bytes()
    cut = data[:5000].rfind(b"\n") + 1
    prefix.write_bytes(data[:cut])
    results = []
    for argv in (("--input", text, "--max-bytes", 5000), ("--input", prefix)):
        _evaluate("--load", ckpt, *argv, "--json", tmp_path / "r.json")
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0] == {**results[1], "input": results[0]["input"],
                          "seconds": results[0]["seconds"]}


@pytest.mark.slow
def test_bad_input_is_one_clear_error(trained, tmp_path):
    _root, ckpt, hf, text, _tok = trained
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("ok line\ncafé\n".encode("latin-1"))
    cases = [
        (("--load", ckpt, "--input", empty), "is empty"),
        (("--load", ckpt, "--input", tmp_path / "nowhere.txt"), "does not exist"),
        (("--load", tmp_path / "no_checkpoint", "--input", text), "does not exist"),
        (("--input", text), "the following arguments are required: --load"),
        (("--load", ckpt, "--input", text, "--seq-length", "1"), "must be >= 2"),
        (("--load", ckpt, "--input", text, "--seq-length", "65"),
         "--seq-length 65 is longer than the model's 64 positions (its max_position_embeddings"),
        (("--load", hf, "--input", text, "--seq-length", "65"),
         "--seq-length 65 is longer than the model's 64 positions (its max_position_embeddings"),
        (("--load", ckpt, "--input", text, "--tensor-model-parallel-size", "2"),
         "launch with torchrun --nproc_per_node 2"),
        # another tokenizer than the run's, even of the same vocabulary size
        (("--load", ckpt, "--input", text, "--tokenizer-type", "NullTokenizer",
          "--vocab-size", "512"), "The checkpoint was trained with another tokenizer "
         "(--tokenizer-type: checkpoint SentencePieceTokenizer, this run NullTokenizer"),
    ]
    for argv, message in cases:
        status, _out, err = _run_tool("evaluate", *argv)
        assert status == 2 and message in err, (argv, err)
    # the export and sampling of the same checkpoint refuse that tokenizer too
    other = ("--tokenizer-type", "NullTokenizer", "--vocab-size", "512")
    for tool, argv in (("convert_to_hf", ("--load", ckpt, "--save", tmp_path / "hf", *other)),
                       ("generate", ("--load", ckpt, "--prompt", "x", *other))):
        status, _out, err = _run_tool(tool, *argv)
        assert status == 2 and "The checkpoint was trained with another tokenizer" in err, err
    assert not (tmp_path / "hf").exists()
    # the real command line: no traceback, the offending byte named
    result = launch.python(ROOT / "tools" / "evaluate.py", "--load", ckpt, "--input", latin,
                           timeout=120)
    assert result.returncode == 2
    assert "not UTF-8" in result.stderr and "byte 11" in result.stderr
    assert "Traceback" not in result.stderr


def test_blocks_and_windows_cover_every_byte(tmp_path):
    """Blocks end at lines or whole characters; windows score all tokens but their first, and
    the bytes of the scored tokens plus those of the windows' first tokens are the text's."""
    from spannorm_megatron.evaluation.text import EvalTokenizer, read_blocks, windows

    text = ("ab€\n" * 40) + "€" * 30 + "\nlast line without newline é"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    blocks = list(read_blocks(str(path), block_bytes=16))
    assert "".join(blocks) == text and len(blocks) > 10
    assert all(b.endswith("\n") for b in blocks[:15])  # lines of 6 bytes: cut after one
    assert any(set(b) == {"€"} for b in blocks)         # no newline: cut between characters
    limited = "".join(read_blocks(str(path), block_bytes=16, max_bytes=50))
    assert limited == "ab€\n" * 8  # 48 bytes: the last line end within 50

    tokenizer = EvalTokenizer.byte_level()
    out = [w for w, _read in windows(read_blocks(str(path), block_bytes=16), tokenizer, 10)]
    total = len(text.encode("utf-8"))
    assert sum(w.scored_tokens for w in out) == total - len(out)
    assert sum(w.scored_bytes for w in out) == total - len(out)
    assert all(len(w.ids) == 10 for w in out[:-1]) and 2 <= len(out[-1].ids) <= 10
