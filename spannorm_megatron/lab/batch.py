"""The one fixed batch the signal-propagation probe runs on: real text or random tokens.

Why one fixed batch: the probe compares placements, depths and inits, so every model must see
exactly the same tokens; and "after N training steps" means N optimizer steps on that batch
(a memorization task that exercises the optimizer, not a language-modelling result).

Sources:

- ``corpus``: the embedded corpus (Python standard-library sources, the same text
  `examples/quickstart.sh` trains on; `spannorm_megatron.data.corpus`), its first
  `corpus_bytes` bytes concatenated in the corpus's fixed order. Tokenized with a SentencePiece
  model when one is given (`tokenizer_model`, e.g. the one the quickstart trains), otherwise as
  UTF-8 bytes (vocabulary 256, no training needed). The batch's `batch_size` windows of
  `seq_length + 1` tokens start at evenly spaced offsets over the token stream.
- ``random``: tokens drawn uniformly from `[0, vocab_size)` by a generator seeded with `seed`.

Labels are the inputs shifted by one token (next-token prediction), as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spannorm_megatron.errors import ConfigError

TOKEN_SOURCES = ("corpus", "random")
BYTE_VOCAB_SIZE = 256


@dataclass
class FixedBatch:
    tokens: torch.Tensor
    """[batch, seq] input ids."""

    labels: torch.Tensor
    """[batch, seq] next-token ids."""

    vocab_size: int
    """Size of the vocabulary the ids come from (what the model's embedding must cover)."""

    description: str
    """One line that says where the tokens came from, for reports."""

    @property
    def positions(self) -> torch.Tensor:
        batch, seq = self.tokens.shape
        return torch.arange(seq, device=self.tokens.device).expand(batch, seq)

    def to(self, device: torch.device) -> "FixedBatch":
        """The same batch on `device` (the model's: a GPU model refuses host token ids)."""
        return FixedBatch(self.tokens.to(device), self.labels.to(device), self.vocab_size,
                          self.description)


def make_batch(source: str, *, batch_size: int, seq_length: int, seed: int = 1234,
               vocab_size: Optional[int] = None, tokenizer_model: Optional[str] = None,
               corpus_bytes: int = 1_000_000) -> FixedBatch:
    """The fixed batch for `source` ('corpus' or 'random'); see the module docstring."""
    if source not in TOKEN_SOURCES:
        raise ConfigError(f"tokens={source!r} is not one of {list(TOKEN_SOURCES)}: 'corpus' uses "
                          f"the embedded corpus (real text), 'random' uniform random token ids.")
    if batch_size <= 0 or seq_length <= 0:
        raise ConfigError(f"batch_size={batch_size} and seq_length={seq_length} must be > 0.")
    if source == "random":
        vocab_size = vocab_size or BYTE_VOCAB_SIZE
        if vocab_size < 2:
            raise ConfigError(f"vocab_size={vocab_size} must be at least 2.")
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (batch_size, seq_length + 1), generator=generator)
        return FixedBatch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), vocab_size,
                          f"random tokens, uniform over {vocab_size} ids, seed {seed}")
    return _corpus_batch(batch_size, seq_length, tokenizer_model, corpus_bytes, vocab_size)


def _corpus_batch(batch_size: int, seq_length: int, tokenizer_model: Optional[str],
                  corpus_bytes: int, vocab_size: Optional[int]) -> FixedBatch:
    from spannorm_megatron.data.corpus import embedded_corpus

    text = "\n".join(embedded_corpus(max_bytes=corpus_bytes))
    if tokenizer_model:
        from spannorm_megatron.data.tokenizer import build_tokenizer

        tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model)
        ids = tokenizer.tokenize(text)
        model_vocab = tokenizer.vocab_size
        how = f"SentencePiece model {tokenizer_model}"
    else:
        ids = list(text.encode("utf-8"))
        model_vocab = BYTE_VOCAB_SIZE
        how = "UTF-8 bytes"
    if vocab_size is not None and vocab_size < model_vocab:
        raise ConfigError(f"vocab_size={vocab_size} is smaller than the {how} vocabulary "
                          f"({model_vocab}); leave it unset or raise it.")
    window = seq_length + 1
    if len(ids) < batch_size * window:
        raise ConfigError(
            f"The embedded corpus (first {corpus_bytes} bytes) has {len(ids)} tokens, fewer than "
            f"batch_size x (seq_length + 1) = {batch_size * window}: raise corpus_bytes.")
    stride = (len(ids) - window) // max(batch_size - 1, 1)
    rows = [ids[i * stride:i * stride + window] for i in range(batch_size)]
    data = torch.tensor(rows, dtype=torch.long)
    return FixedBatch(data[:, :-1].contiguous(), data[:, 1:].contiguous(),
                      vocab_size or model_vocab,
                      f"embedded corpus (stdlib sources, first {corpus_bytes} bytes) as {how}, "
                      f"{batch_size} windows at evenly spaced offsets")
