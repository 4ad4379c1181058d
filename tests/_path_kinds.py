"""Paths of every declared kind (spannorm_megatron/config/paths.py), good and bad, made with the
project's own writers and the libraries it reads them with: shared by the path-kind tests and
the Megatron-LM flag-table test (whose example values must exist to be stored)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Tuple

TEXT = "".join(f"line {i} of a small corpus: the quick brown fox jumps over {i} dogs\n"
               for i in range(200))


def _input_file(path: Path) -> None:
    path.write_text(TEXT)


def _input_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text(TEXT)


def _data_prefix(path: Path) -> None:
    import numpy

    from spannorm_megatron.data.indexed import AtomicIndexedDatasetWriter

    writer = AtomicIndexedDatasetWriter({"text": str(path)}, numpy.int32)
    writer.add_document("text", [1, 2, 3, 4], [4])
    writer.add_document("text", [5, 6], [2])
    writer.commit()


def _checkpoint(path: Path) -> None:
    path.mkdir()
    (path / "latest_checkpointed_iteration.txt").write_text("2\n")
    (path / "iter_0000002").mkdir()


def _hf_folder(path: Path) -> None:
    import numpy
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"weight": numpy.zeros((4, 4), numpy.float32)}, str(path / "model.safetensors"))


@functools.lru_cache(maxsize=1)
def _sentencepiece_model() -> bytes:
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.splitlines()), model_writer=model, vocab_size=40,
        model_type="bpe", minloglevel=2)
    return model.getvalue()


def _tokenizer_model(path: Path) -> None:
    path.write_bytes(_sentencepiece_model())


GOOD: Dict[str, Callable[[Path], None]] = {
    "input_file": _input_file,
    "input_folder": _input_folder,
    "data_prefix": _data_prefix,
    "checkpoint": _checkpoint,
    "resume_checkpoint": _checkpoint,
    "hf_folder": _hf_folder,
    "checkpoint_or_hf_folder": _checkpoint,
    "tokenizer_model": _tokenizer_model,
    "output_file": lambda path: None,    # not there yet: the run writes it
    "output_folder": lambda path: None,
}
"""kind -> writes a path of that kind at the path given."""


def make_good(kind: str, path: Path) -> str:
    GOOD[kind](path)
    return str(path)


# ---------------------------------------------------------------------------- bad ones
def _missing(path: Path) -> None:
    pass


def _empty_file(path: Path) -> None:
    path.write_bytes(b"")


def _empty_folder(path: Path) -> None:
    path.mkdir()


def _folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text(TEXT)


def _file(path: Path) -> None:
    path.write_text(TEXT)


def _under_a_file(path: Path) -> str:
    path.write_text(TEXT)
    return str(path / "inside")


def _empty_prefix(path: Path) -> None:
    for ext in (".bin", ".idx"):
        Path(str(path) + ext).write_bytes(b"")


def _truncated_prefix(path: Path) -> None:
    _data_prefix(path)
    data = Path(str(path) + ".bin")
    data.write_bytes(data.read_bytes()[:-3])


def _prefix_folder(path: Path) -> None:
    path.mkdir()


def _unreadable_tracker(path: Path) -> None:
    _checkpoint(path)
    (path / "latest_checkpointed_iteration.txt").write_text("2 iterations\n")


def _truncated_weights(path: Path) -> None:
    _hf_folder(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def _truncated_config(path: Path) -> None:
    _hf_folder(path)
    config = path / "config.json"
    config.write_text(config.read_text()[:-3])


def _truncated_tokenizer(path: Path) -> None:
    _tokenizer_model(path)
    path.write_bytes(path.read_bytes()[:50])


def _symlink_loop(path: Path) -> None:
    os.symlink(path.name, path)


def _dangling_link(path: Path) -> None:
    os.symlink(path.name + ".gone", path)


def _named_pipe(path: Path) -> None:
    os.mkfifo(path)


def _looping_prefix(path: Path) -> None:
    for ext in (".bin", ".idx"):
        os.symlink(path.name + ext, str(path) + ext)


_FILE = [("missing", _missing), ("empty", _empty_file), ("folder", _folder),
         ("symlink loop", _symlink_loop)]
_CHECKPOINT = [("file", _file), ("unreadable tracker", _unreadable_tracker)]

BAD: Dict[str, List[Tuple[str, Callable[[Path], object]]]] = {
    "input_file": [*_FILE, ("named pipe", _named_pipe), ("dangling link", _dangling_link)],
    "input_folder": [("missing", _missing), ("empty", _empty_folder), ("file", _file)],
    "data_prefix": [("missing", _missing), ("empty", _empty_prefix), ("folder", _prefix_folder),
                    ("truncated", _truncated_prefix), ("looping links", _looping_prefix)],
    "checkpoint": [("missing", _missing), ("empty", _empty_folder), *_CHECKPOINT],
    "resume_checkpoint": [*_CHECKPOINT, ("symlink loop", _symlink_loop)],  # missing is fine
    "hf_folder": [("missing", _missing), ("empty", _empty_folder), ("file", _file),
                  ("truncated weights", _truncated_weights),
                  ("truncated config", _truncated_config)],
    "checkpoint_or_hf_folder": [("missing", _missing), ("empty", _empty_folder),
                                *_CHECKPOINT, ("truncated weights", _truncated_weights)],
    "tokenizer_model": [*_FILE, ("truncated", _truncated_tokenizer)],
    "output_file": [("folder", _folder), ("under a file", _under_a_file),
                    ("symlink loop", _symlink_loop)],
    "output_folder": [("file", _file), ("under a file", _under_a_file),
                      ("symlink loop", _symlink_loop), ("dangling link", _dangling_link)],
}
"""kind -> (name, maker) of paths that are not of it: a maker writes at the path given (and
returns another path to use instead, where the bad one lies below it)."""


def make_bad(maker, path: Path) -> str:
    other = maker(path)
    return os.fspath(other if other is not None else path)
