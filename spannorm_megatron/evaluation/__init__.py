"""Held-out evaluation of a trained model on any text file (`spannorm-evaluate`, `cli`).

Loss, perplexity and bits per byte for a megatron checkpoint (one process, or any TP/PP layout
under torchrun) or a Hugging Face folder. Bits per byte divides the summed loss by the UTF-8
size of the text whose tokens were scored, so it compares models with different tokenizers.

Modules: `text` (the file, its blocks, the tokenizer view, windows), `models` (loading the
model and tokenizer with the conversion tools' code), `scoring` (batches, the two scorers, the
totals), `cli` (the command line).
"""

# Loaded on first use, so that `spannorm-evaluate --help` answers without importing torch.
_EXPORTS = {"Result": "scoring", "score_text": "scoring", "EvalTokenizer": "text",
            "EvaluationError": "text"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
