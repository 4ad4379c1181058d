"""megatron-core's own checks run before any process group exists (training/preflight.py): what
`Trainer.setup` builds from megatron-core (TransformerConfig, OptimizerConfig, the DDP config,
GPTDatasetConfig, the micro-batch calculator) is built in the checking process first, and a
refusal is our error (exit status 2), naming the flags behind the fields it names."""

from __future__ import annotations

import dataclasses

import pytest

from spannorm_megatron.errors import ConfigError
from spannorm_megatron.process import initialize as trainer_initialize
from spannorm_megatron.train import main as train_main
from spannorm_megatron.training.arguments import parse_args
from spannorm_megatron.training.preflight import check_with_megatron_core, refusals_named
from spannorm_megatron.training.schedule import batch_layout

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2",
        "--lr", "1e-3", "--train-iters", "10", "--tokenizer-type", "ByteLevelTokenizer",
        "--mock-data", "--transformer-impl", "local"]


def _checked(*flags, world_size=1):
    from spannorm_megatron.data.tokenizer import build_tokenizer

    job = parse_args([*BASE, *flags])
    tokenizer = build_tokenizer(job.tokenizer)
    job = job.with_vocab_size(tokenizer.vocab_size)
    batches = batch_layout(job.training, job.parallel, world_size)
    check_with_megatron_core(job, batches, tokenizer)
    return job, batches, tokenizer


def test_what_megatron_core_accepts_passes():
    _checked("--num-experts", "4", "--moe-router-topk", "2", "--global-batch-size", "8")


def test_a_transformer_config_refusal_ends_the_run_before_any_process_group(
        monkeypatch, capsys):
    """MoE experts with linear biases (Megatron-LM's default) and expert-TP > 1: none of our
    checks knew it; megatron-core's TransformerConfig asserts it, once set up."""
    from spannorm_megatron.training import trainer

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    initialized = []  # the Trainer's one way to process groups, recorded and passed through
    monkeypatch.setattr(trainer, "initialize",
                        lambda *a, **k: initialized.append(1) or trainer_initialize(*a, **k))
    assert train_main([*BASE, "--num-experts", "4", "--tensor-model-parallel-size", "2",
                       "--sequence-parallel"]) == 2
    err = capsys.readouterr().err
    assert "megatron-core refuses the TransformerConfig" in err and "Traceback" not in err, err
    assert "--disable-bias-linear" in err and "--expert-tensor-parallel-size" in err, err
    assert initialized == []
    # The same model without the biases is what megatron-core accepts.
    _checked("--num-experts", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--disable-bias-linear", world_size=2)


def test_a_micro_batch_calculator_refusal_names_the_batch_flags():
    """Our batch arithmetic refuses these sizes first; a layout it did not make still meets
    megatron-core's calculator, named in our flags."""
    job, batches, tokenizer = _checked()
    uneven = dataclasses.replace(batches, global_batch_size=3)
    with pytest.raises(ConfigError, match=r"micro-batch calculator.*global batch size.*"
                                          r"set by --global-batch-size, --micro-batch-size"):
        check_with_megatron_core(job, uneven, tokenizer)


def test_a_dataset_config_refusal_is_ours():
    job, batches, _ = _checked()
    with pytest.raises(ConfigError, match="megatron-core refuses the GPTDatasetConfig"):
        check_with_megatron_core(job, batches, None)  # GPTDatasetConfig asserts a tokenizer


def test_our_own_defects_keep_their_traceback():
    with pytest.raises(AssertionError):
        with refusals_named({}, "nothing"):
            assert False, "a bug of ours, not megatron-core's refusal"
