"""Text generation from a megatron checkpoint or a Hugging Face folder (tools/generate.py).

One sampling loop serves both: greedy, or temperature / top-k / top-p sampling from a seeded
generator. A megatron checkpoint runs as a single-process TP1/PP1 megatron model (whatever
layout saved it), recomputing the whole sequence each step (no key/value cache); an HF folder
runs through transformers with its key/value cache. Generation stops after `max_new_tokens`
or at an end id (``</s>`` or ``<EOD>``).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from spannorm_megatron.hf.errors import ConversionError


@dataclass
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ConversionError(f"--temperature {self.temperature} must be > 0 (or use --greedy).")
        if self.top_k < 0:
            raise ConversionError(f"--top-k {self.top_k} must be >= 0 (0 = off).")
        if not 0.0 < self.top_p <= 1.0:
            raise ConversionError(f"--top-p {self.top_p} must be in (0, 1].")


def sample_next(logits: torch.Tensor, sampling: Sampling,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, V]."""
    logits = logits.float()
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(step: Callable[[List[int], bool], torch.Tensor], prompt: Sequence[int],
             max_new_tokens: int, sampling: Sampling, *, stop_ids: Sequence[int] = (),
             seed: int = 1234, vocab_limit: Optional[int] = None,
             max_positions: Optional[int] = None,
             progress: Optional[Callable[[int], None]] = None) -> List[int]:
    """New token ids after `prompt`. `step(ids, first)` returns the last-position logits [V] of
    the sequence `ids` (`first` is True on the first call, for cached implementations). Never
    past the model's `max_positions`; `progress(n)` hears of every 64th new token."""
    sampling.validate()
    if not prompt:
        raise ConversionError("The prompt is empty: give some text (--prompt) or ids (--prompt-ids).")
    if max_positions is not None and len(prompt) + max_new_tokens > max_positions:
        raise ConversionError(
            f"The prompt ({len(prompt)} tokens) and --max-new-tokens {max_new_tokens} go past "
            f"the model's {max_positions} positions (max_position_embeddings): lower "
            f"--max-new-tokens to at most {max(max_positions - len(prompt), 0)}, or shorten the "
            f"prompt.")
    ids = list(prompt)
    out: List[int] = []
    generator = None
    for i in range(max_new_tokens):
        logits = step(ids, i == 0)
        if generator is None:
            generator = torch.Generator(device=logits.device).manual_seed(seed)
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[vocab_limit:] = float("-inf")  # padding rows of the embedding
        token = int(sample_next(logits[None], sampling, generator)[0])
        out.append(token)
        ids.append(token)
        if progress is not None and len(out) % 64 == 0:
            progress(len(out))
        if token in stop_ids:
            break
    return out


def megatron_stepper(model) -> Callable[[List[int], bool], torch.Tensor]:
    device = next(model.parameters()).device

    @torch.no_grad()
    def step(ids: List[int], _first: bool) -> torch.Tensor:
        tokens = torch.tensor([ids], dtype=torch.long, device=device)
        positions = torch.arange(len(ids), device=device)[None]
        logits = model(tokens, positions, attention_mask=None)
        return logits[0, -1]

    return step


def _cache_argument(model) -> str:
    """The name the model's forward takes its key/value cache under: `cache` since transformers
    5.25 (which still maps `past_key_values` onto it, with a deprecation warning), before it
    `past_key_values`. Our remote code takes both."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def hf_stepper(model) -> Callable[[List[int], bool], torch.Tensor]:
    device = next(model.parameters()).device
    state = {"past": None}
    cache_argument = _cache_argument(model)

    @torch.no_grad()
    def step(ids: List[int], first: bool) -> torch.Tensor:
        if first:
            state["past"] = None
            new = ids
        else:
            new = ids[-1:]
        tokens = torch.tensor([new], dtype=torch.long, device=device)
        mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
        out = model(input_ids=tokens, attention_mask=mask, use_cache=True,
                    **{cache_argument: state["past"]})
        state["past"] = _returned_cache(out)
        return out.logits[0, -1]

    return step


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_hf_model(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    except TypeError:  # pragma: no cover - transformers 4.x
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                     torch_dtype=dtype)
    return model.to(device).eval()


class TextTokenizer:
    """encode / decode / stop ids / vocab size over one of our tokenizers or an HF one."""

    def __init__(self, encode, decode, stop_ids, vocab_size):
        self.encode, self.decode, self.stop_ids, self.vocab_size = encode, decode, stop_ids, vocab_size

    @classmethod
    def of(cls, config) -> "TextTokenizer":
        """The training stack's tokenizer of these flags (a `TokenizerConfig`): a prompt gets
        the ids a training document starting with it had (Llama2Tokenizer: `<s>` first), and
        generation stops at the end of document (and at eos, and `<EOD>` where it exists)."""
        from spannorm_megatron.data.tokenizer import SentencePieceTokenizer, build_tokenizer

        tok = build_tokenizer(config)
        stops = {tok.eod, getattr(tok, "eos", None)}
        if isinstance(tok, SentencePieceTokenizer):
            stops.add(tok.special_token_ids["eod_piece"])  # data prepared before 2026-12
        return cls(tok.tokenize, tok.detokenize,
                   sorted(i for i in stops if i is not None and i >= 0), tok.vocab_size)

    @classmethod
    def sentencepiece(cls, model_path: str) -> "TextTokenizer":
        from spannorm_megatron.config.tokenizer import tokenizer_config
        from spannorm_megatron.hf.tokenizer import _load

        _load(model_path)  # a bad file as a ConversionError
        return cls.of(tokenizer_config(tokenizer_model=model_path))

    @classmethod
    def huggingface(cls, path: str) -> "TextTokenizer":
        from transformers import AutoTokenizer

        # The folder's config names our model class (auto_map); without this, transformers stops
        # to ask on stdin whether to run that code, as the model load already agreed to.
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        stop = {tok.eos_token_id}
        eod = tok.convert_tokens_to_ids("<EOD>")
        if isinstance(eod, int) and eod != tok.unk_token_id:
            stop.add(eod)
        # the ids the tokenizer puts before a text (Llama's <s>), as transformers users get them
        prefix = text_prefix_ids(tok, path)
        return cls(lambda text: prefix + tok.encode(text, add_special_tokens=False),
                   lambda ids: tok.decode(ids, skip_special_tokens=True),
                   sorted(i for i in stop if i is not None), len(tok))


def text_prefix_ids(tok, folder: str) -> List[int]:
    """The ids to put before a text given to the model of `folder`: what its tokenizer puts
    there (`leading_special_ids`), except for a folder exported from a HuggingFaceTokenizer run,
    whose training data had none (Megatron-LM adds no special tokens; `spannorm_export.json`
    records the run's tokenizer)."""
    import json

    try:
        with open(os.path.join(folder, "spannorm_export.json")) as f:
            kind = (json.load(f).get("tokenizer") or {}).get("tokenizer_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    return [] if kind == "HuggingFaceTokenizer" else leading_special_ids(tok)


def leading_special_ids(tok) -> List[int]:
    """The ids a transformers tokenizer puts before a text when used plainly (`tok(text)`):
    Llama's `<s>`; nothing for most byte-level BPE tokenizers and for our SentencePiece exports."""
    try:
        plain = tok.encode("1", add_special_tokens=False)
        full = tok.encode("1")
    except Exception:  # a vocabulary without "1" and without unk: it adds nothing we can see
        return []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def has_hf_tokenizer(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name))
               for name in ("tokenizer.json", "tokenizer_config.json"))
