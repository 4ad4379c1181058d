"""`spannorm-generate` (tools/generate.py): generate text from a megatron checkpoint or a Hugging
Face folder.

Examples:
    spannorm-generate --load runs/exp/checkpoints --prompt "def main(" --greedy \\
        --max-new-tokens 64 --tokenizer-model tokenizers/stdlib.model
    spannorm-generate --load hf/exp --prompt "import os" --temperature 0.8 --top-p 0.95

--load is a megatron save / iteration / dist-checkpoint directory (run single-process as a
TP1/PP1 model, whatever layout saved it; no key/value cache) or a Hugging Face folder (anything
with a config.json, loaded with transformers, trust_remote_code=True, with a key/value cache).
The tokenizer is the one the tokenizer flags name (Megatron-LM's: --tokenizer-type with
--tokenizer-model, --vocab-file and --merge-file, or --vocab-size), else the folder's own
tokenizer files, else the run's recorded tokenizer; the prompt gets the ids a training document
starting with it had (Llama2Tokenizer: <s> first). --prompt-ids feeds token ids directly
instead. Runs on the GPU when there is one (--device). Generation stops at the end of document
(</s>, <EOD>, <|endoftext|>, the eos token) unless --ignore-eos.
Bad input exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.data.tokenizer_args import TokenizerOverrides, add_tokenizer_override_flags
from spannorm_megatron.hf.cli import DEVICES, DTYPE_NAMES, hide_gpu_for_cpu_runs, run_cli
from spannorm_megatron.config.options import SEED, add_arguments, option, parse_sections


@dataclass
class PromptOptions:
    """The prompt: one of the two is required."""

    prompt: Optional[str] = option(None, "Prompt text.")
    prompt_ids: Optional[str] = option(None, "Prompt as comma-separated token ids.")


@dataclass
class GenerateOptions:
    """The command line of `spannorm-generate` (besides the prompt and the tokenizer flags)."""

    load: str = option(doc="Megatron checkpoint or Hugging Face folder.", required=True,
                       path="checkpoint_or_hf_folder")
    max_new_tokens: int = option(32, "Tokens to generate at most (the prompt and these within "
                                 "the model's positions).", at_least=1)
    temperature: float = option(1.0, "Sampling temperature.", above=0.0)
    top_k: int = option(0, "Sample among the k likeliest tokens; 0: off.", at_least=0)
    top_p: float = option(1.0, "Sample within this probability mass (0, 1]; 1.0: off.",
                          above=0.0)
    greedy: bool = option(False, "Argmax decoding.")
    seed: int = option(1234, "Sampling seed.", **SEED)
    model_config: Optional[str] = option(
        None, "A JSON file of ModelConfig fields, for a megatron checkpoint without a run "
        "record.", metavar="CONFIG.json",
        path="input_file")
    device: str = option("auto", "auto: the GPU when there is one.", choices=DEVICES)
    dtype: Optional[str] = option(None, "Default: float32 on CPU, bfloat16 on GPU.",
                                  choices=DTYPE_NAMES)
    ignore_eos: bool = option(False, "Do not stop at </s> / <EOD>.")
    json: bool = option(False, "Print one JSON object (ids and text) instead of the text.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, GenerateOptions)
    add_arguments(parser.add_mutually_exclusive_group(required=True), PromptOptions)
    add_tokenizer_override_flags(
        parser, "tokenizer (Megatron-LM's flags; default: the HF folder's own, else the run's, "
        "completed from its record when only a file is given)")
    return parser


def generate(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and generate; bad input raises a UserError."""
    options, prompt_flags, tokenizer_flags = parse_sections(
        build_parser(), [GenerateOptions, PromptOptions, TokenizerOverrides], argv)
    import torch

    from spannorm_megatron.hf import generation as gen
    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.export import parse_dtype

    sampling = gen.Sampling(greedy=options.greedy, temperature=options.temperature,
                            top_k=options.top_k, top_p=options.top_p)
    sampling.validate()
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no GPU is available here; use --device cpu.")
    device = "cuda" if options.device == "cuda" or (options.device == "auto"
                                                    and torch.cuda.is_available()) else "cpu"
    dtype = parse_dtype(options.dtype or ("bfloat16" if device == "cuda" else "float32"))

    from spannorm_megatron.data.tokenizer_args import check_recorded_tokenizer, recorded_tokenizer

    hf = gen.is_hf_folder(options.load)
    given = tokenizer_flags.given()
    tokenizer, why = None, "the folder has no tokenizer files"
    if hf and any(value is not None for value in given.values()):
        tokenizer = gen.TextTokenizer.of(recorded_tokenizer(None, **given)[0])
    elif hf and gen.has_hf_tokenizer(options.load):
        tokenizer = gen.TextTokenizer.huggingface(options.load)

    if hf:
        model = gen.load_hf_model(options.load, dtype, device)
        step = gen.hf_stepper(model)
        vocab = model.config.vocab_size
        positions = getattr(model.config, "max_position_embeddings", None)
    else:
        from spannorm_megatron.hf.megatron_reader import MegatronCheckpoint, load_megatron_model
        from spannorm_megatron.process import initialize

        ckpt = MegatronCheckpoint(options.load, options.model_config)  # checks before any set-up
        # the flags given, completed from the run record (a moved model file keeps its type)
        args = (ckpt.run_record or {}).get("args")
        config, why = recorded_tokenizer(args, **given)
        check_recorded_tokenizer(args, config, "sampling")
        tokenizer = gen.TextTokenizer.of(config) if config is not None else None
        initialize(seed=options.seed)
        _config, model = load_megatron_model(ckpt, dtype=dtype)
        step = gen.megatron_stepper(model)
        vocab = _config.vocab_size
        positions = _config.max_sequence_length

    if prompt_flags.prompt_ids is not None:
        try:
            prompt = [int(x) for x in prompt_flags.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConversionError(f"--prompt-ids {prompt_flags.prompt_ids!r} must be "
                                  f"comma-separated integers.") from None
    else:
        if tokenizer is None:
            raise ConversionError(f"No tokenizer for --prompt ({why}): pass the tokenizer flags "
                                  f"(--tokenizer-type with --tokenizer-model, --vocab-file and "
                                  f"--merge-file, or --vocab-size), or --prompt-ids.")
        prompt = tokenizer.encode(prompt_flags.prompt)
    bad = [i for i in prompt if not 0 <= i < vocab]
    if bad:
        raise ConversionError(f"Prompt ids {bad[:5]} are outside the model's vocabulary "
                              f"(0..{vocab - 1}).")
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ConversionError(f"The tokenizer has {tokenizer.vocab_size} ids but the model only "
                              f"{vocab}: they do not belong together.")
    stop = [] if options.ignore_eos or tokenizer is None else tokenizer.stop_ids
    out = gen.generate(step, prompt, options.max_new_tokens, sampling, stop_ids=stop,
                       seed=options.seed,
                       vocab_limit=tokenizer.vocab_size if tokenizer is not None else None,
                       max_positions=positions, progress=lambda n: print(
                           f"[generate] {n}/{options.max_new_tokens} tokens", file=sys.stderr,
                           flush=True))
    text = tokenizer.decode(out) if tokenizer is not None else None
    if options.json:
        print(json.dumps({"source": "huggingface" if hf else "megatron", "prompt_ids": prompt,
                          "output_ids": out, "text": text}))
    elif tokenizer is None:
        print(" ".join(map(str, out)))
    else:
        shown = tokenizer.decode(prompt) if prompt_flags.prompt is None else prompt_flags.prompt
        print(shown + text)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    if argv is None:  # a command line, not a caller in this process: its GPUs are its own
        hide_gpu_for_cpu_runs(sys.argv[1:])
    return run_cli(generate, argv)


if __name__ == "__main__":
    sys.exit(main())
