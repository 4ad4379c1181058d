"""`--tokenizer-type ByteLevelTokenizer`: UTF-8 bytes as ids (megatron-core's byte-level library,
<EOD> = 256), through tools/preprocess_data.py and spannorm-train; data written with another
tokenizer is refused before training with one clear error."""


import numpy
import pytest

import launch
from _training import SMALL
from launch import ROOT

from spannorm_megatron.errors import TokenizerError
from spannorm_megatron.data.tokenizer import (
    ByteLevelTokenizer,
    build_tokenizer,
    check_data_fits_vocab,
)

TEXT = ("Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich. " * 20 + "\n\n") * 12


def _tool(name, *args):
    return launch.python(ROOT / "tools" / f"{name}.py", *args, timeout=120, cwd=ROOT)


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("ByteLevelTokenizer", None)
    assert isinstance(tok, ByteLevelTokenizer)
    assert tok.vocab_size == 257 and tok.eod == 256
    ids = tok.tokenize("über <EOD>\n")
    assert ids == list("über <EOD>\n".encode("utf-8")) and max(ids) < 256
    assert tok.detokenize(ids + [tok.eod]) == "über <EOD>\n"
    assert tok.unique_identifiers["class"].endswith("ByteLevelTokenizer")


def test_byte_tokenizer_argument_errors(tmp_path):
    with pytest.raises(TokenizerError, match="takes no --tokenizer-model"):
        build_tokenizer("ByteLevelTokenizer", str(tmp_path / "x.model"))
    with pytest.raises(TokenizerError, match="--tokenizer-model is required"):
        build_tokenizer("SentencePieceTokenizer", None)
    with pytest.raises(TokenizerError, match="--vocab-file and --merge-file are required"):
        build_tokenizer("GPT2BPETokenizer", None)


@pytest.mark.slow
def test_preprocess_bytes_and_vocabulary_mismatch(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    proc = _tool("preprocess_data", "--input", text, "--output-prefix", tmp_path / "bytes",
                 "--tokenizer-type", "ByteLevelTokenizer", "--append-eod", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    prefix = str(tmp_path / "bytes_text_document")
    ids = numpy.fromfile(prefix + ".bin", dtype=numpy.uint16)
    assert len(ids) == len(TEXT.replace("\n\n", "").encode("utf-8")) + 12
    assert ids.max() == 256 and (ids == 256).sum() == 12
    check_data_fits_vocab([prefix], 257)

    # SentencePiece data (ids up to 299) read with the byte tokenizer: refused.
    proc = _tool("train_tokenizer", "--input", text, "--model-prefix", tmp_path / "sp",
                 "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    proc = _tool("preprocess_data", "--input", text, "--output-prefix", tmp_path / "sp",
                 "--tokenizer-model", tmp_path / "sp.model", "--append-eod", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    sp_prefix = str(tmp_path / "sp_text_document")
    with pytest.raises(TokenizerError, match="preprocessed with another tokenizer"):
        check_data_fits_vocab([sp_prefix], 257)

    proc = launch.python(
        "-m", "spannorm_megatron.train", *SMALL, "--num-layers", "2",
        "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16",
        "--train-iters", "2", "--lr-warmup-iters", "0", "--data-path", sp_prefix,
        "--tokenizer-type", "ByteLevelTokenizer",
        "--split", "75,25,0", "--transformer-impl", "local", timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # the data's record of its tokenizer refuses it first (the ids' range would next)
    assert "error: " in proc.stderr and "was made with another tokenizer" in proc.stderr
    assert "type: data 'SentencePieceTokenizer', given 'ByteLevelTokenizer'" in proc.stderr
    assert "Traceback" not in proc.stderr and "iteration" not in proc.stdout
