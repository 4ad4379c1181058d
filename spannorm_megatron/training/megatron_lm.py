"""Megatron-LM's flags that `spannorm-train` does not take: refused by name, with the reason.

A Megatron-LM user's script that passes one of them must stop before anything starts and say
which flag and why, never train on without it. The names are those of Megatron-LM
core_v0.16.1's own parser (`megatron_lm_flags.txt` beside this module;
tests/test_megatron_lm_flags.py keeps that list equal to the committed table of its arguments).
The reason is the one of the flag's family (`FAMILIES`), or, for a flag of a family we do
train, that it is not implemented here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import FrozenSet, List, Optional

NAMES_FILE = Path(__file__).with_name("megatron_lm_flags.txt")

# (prefixes, what the flags belong to and why this stack does not take them)
FAMILIES = (
    (("--rl-", "--grpo-", "--langrl-", "--no-rl-", "--perform-rl-step", "--refit-method"),
     "reinforcement learning (Megatron-RL) is not part of this pre-training stack"),
    (("--inference-", "--flash-decode", "--enable-chunked-prefill", "--disable-chunked-prefill",
      "--decode-only-cuda-graphs", "--mlp-chunks-for-prefill", "--use-legacy-static-engine",
      "--nccl-all-reduce-for-prefill", "--no-inference-", "--max-tokens-to-oom"),
     "Megatron-LM's inference engine is not part of this stack (tools/generate.py samples "
     "from the Hugging Face export)"),
    (("--dino-", "--img-", "--vision-", "--swin-", "--patch-dim", "--num-channels",
      "--num-classes", "--classes-fraction", "--data-per-class-fraction", "--mask-factor",
      "--mask-prob", "--mask-type", "--iter-per-epoch", "--no-data-sharding"),
     "vision models are not part of this GPT stack"),
    (("--bert-", "--biencoder-", "--ict-", "--retriever-", "--titles-data-path",
      "--evidence-data-path", "--block-data-path", "--indexer-", "--query-in-block-prob",
      "--use-one-sent-docs", "--embedding-path", "--output-bert-embeddings", "--short-seq-prob",
      "--vocab-extra-ids"),
     "BERT, T5 and retrieval models are not part of this GPT stack"),
    (("--mamba-", "--hybrid-", "--is-hybrid-model", "--disable-mamba-mem-eff-path",
      "--linear-attention-freq", "--linear-conv-kernel-dim", "--linear-key-head-dim",
      "--linear-num-key-heads", "--linear-num-value-heads", "--linear-value-head-dim",
      "--experimental-attention-variant", "--dsa-"),
     "Mamba, hybrid and experimental attention models are not built by this stack's specs"),
    (("--one-logger", "--no-one-logger", "--app-tag-run-", "--config-logger-dir"),
     "NVIDIA's internal one-logger telemetry is not available"),
    (("--inprocess-", "--enable-ft-package", "--calc-ft-timeouts", "--ft-num-warmup-iters",
      "--straggler-", "--log-straggler", "--disable-straggler-on-startup",
      "--run-workload-inspector-server", "--adlr-autoresume"),
     "NVIDIA's resiliency packages (in-process restart, fault tolerance, straggler detection) "
     "are not integrated; this stack resumes from its checkpoints (see README 'Resuming')"),
    (("--muon-", "--sgd-momentum", "--optimizer-cpu-offload", "--optimizer-offload-fraction",
      "--overlap-cpu-optimizer-d2h-h2d", "--use-torch-optimizer-for-cpu-offload",
      "--use-precision-aware-optimizer", "--main-grads-dtype", "--main-params-dtype",
      "--exp-avg-dtype", "--exp-avg-sq-dtype"),
     "this stack trains with megatron-core's Adam(W) in fp32 master weights only"),
    (("--use-megatron-fsdp", "--use-torch-fsdp2", "--torch-fsdp2-", "--data-parallel-sharding-",
      "--outer-dp-sharding-strategy", "--fsdp-", "--enable-full-sharding-in-hsdp",
      "--num-distributed-optimizer-instances", "--init-model-with-meta-device",
      "--disable-strict-fsdp-dtensor-load", "--no-strict-fsdp-dtensor-load"),
     "FSDP is not supported: shard optimizer state with --use-distributed-optimizer"),
    (("--fp4-", "--kitchen-", "--use-kitchen-attention", "--te-precision-config-file",
      "--fp8-quantizer-factory", "--num-layers-at-start-in-bf16", "--num-layers-at-end-in-bf16",
      "--keep-fp8-transpose-cache", "--reuse-grad-buf-for-mxfp8-param-ag", "--fp8-interval",
      "--no-fp8-wgrad", "--disable-fp8-wgrad"),
     "only Transformer Engine's FP8 recipes of --fp8-format/--fp8-recipe are supported"),
    (("--cuda-graph-", "--enable-cuda-graph", "--external-cuda-graph",
      "--moe-pad-experts-for-cuda-graph-inference"),
     "CUDA graphs are not supported by this stack's layers"),
    (("--fim-",), "fill-in-the-middle data is not supported by this stack's datasets"),
    (("--sft", "--finetune", "--pretrained-checkpoint", "--spec", "--yaml-cfg",
      "--heterogeneous-layers-config-", "--use-legacy-models", "--legacy-tokenizer"),
     "this stack pre-trains GPT models from its own layer specs (--norm-placement) and its own "
     "YAML (--config)"),
    (("--ckpt-convert-", "--non-persistent-", "--use-persistent-ckpt-worker",
      "--dist-ckpt-save-pre-mcore-014", "--ckpt-step", "--auto-detect-ckpt-format",
      "--use-dist-ckpt", "--async-save", "--save-retain-interval", "--persistent-save-interval",
      "--ckpt-assume-constant-structure", "--dist-ckpt-format", "--dist-ckpt-strictness",
      "--dist-ckpt-optim-fully-reshardable", "--distrib-optim-fully-reshardable-mem-efficient"),
     "this stack writes megatron-core torch_dist checkpoints its own way (atomic, every rank; "
     "see README 'Checkpoints')"),
)

DEFAULT_REASON = ("it is not implemented in spannorm-train; the README's 'Coming from "
                  "Megatron-LM' section lists what is")


@lru_cache(maxsize=None)
def megatron_lm_flags() -> FrozenSet[str]:
    lines = NAMES_FILE.read_text().splitlines()
    return frozenset(line for line in lines if line.startswith("--"))


def reason(flag: str) -> Optional[str]:
    """Why `flag` (as typed: `--x` or `--x=value`), a Megatron-LM flag this parser lacks, is
    refused; None when Megatron-LM has no such flag."""
    name = flag.split("=", 1)[0]
    if name not in megatron_lm_flags() or name == "--help":  # argparse's, in every parser:
        return None  # only a --config key gets here, and it is an unknown key
    return next((why for prefixes, why in FAMILIES if name.startswith(prefixes)),
                DEFAULT_REASON)


def refusal(flags: List[str]) -> Optional[str]:
    """The message refusing those of `flags` that are Megatron-LM's; None if none is."""
    refused = [(flag.split("=", 1)[0], why) for flag in flags if (why := reason(flag))]
    if not refused:
        return None
    if len(refused) == 1:
        return (f"{refused[0][0]} is a Megatron-LM flag that spannorm-train does not take: "
                f"{refused[0][1]}.")
    return (f"{len(refused)} Megatron-LM flags that spannorm-train does not take:\n"
            + "\n".join(f"  {flag}: {why}" for flag, why in refused))
