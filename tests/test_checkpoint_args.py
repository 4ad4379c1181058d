"""Checkpoints Megatron-LM resumes: the ``args`` its load_checkpoint reads, the RNG layout it asks
for, ``--use-checkpoint-args``, and the model check of a resume (Megatron-LM's
check_checkpoint_args on our side).

One 2-rank torchrun training run (MoE, EP2 x DP2, saved at iteration 2) serves the tests that
need a checkpoint of the training command. A reader written to Megatron-LM's load_checkpoint
contract (tests/_megatron_loader.py) reads it; ``--use-checkpoint-args`` and the refusals run
against it in this process (the flags, and the training command up to its checks, which come
before any process group), and one one-process run resumes it with its model taken from it.
The vocabulary-file comparisons use a checkpoint saved in this process.
"""

import argparse
import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import _megatron_loader as M
from _training import RECIPE, logged_losses, run_train, train_in_process
from spannorm_megatron.checkpoint import read_run_record
from spannorm_megatron.checkpoint.run_record import compare, saved_model_config
from spannorm_megatron.cli import run_cli
from spannorm_megatron.config.options import flag_of, options
from spannorm_megatron.data.tokenizer import build_tokenizer
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.training.arguments import SECTIONS, parse_args

TABLE = Path(__file__).parent / "data" / "megatron_lm" / "arguments_core_v0.16.1.json"

SEQ, MICRO, GLOBAL, ITERS, EVAL_ITERS = 64, 4, 8, 2, 1
# The model, every flag spelled out (RECIPE: RMSNorm, rope, SwiGLU, no biases, untied, no
# dropout; a SentencePiece tokenizer).
MODEL = [*RECIPE, "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", str(SEQ), "--max-position-embeddings", str(SEQ),
         "--num-experts", "4", "--moe-router-topk", "2"]
# Batches, schedule and implementation, the same for the run and its resumes (a resume checks
# the schedule; --use-checkpoint-args takes no implementation, as in Megatron-LM).
RUN = ["--transformer-impl", "auto", "--micro-batch-size", str(MICRO),
       "--global-batch-size", str(GLOBAL), "--lr", "1e-3",
       "--lr-warmup-iters", "1", "--lr-decay-iters", "10", "--lr-decay-style", "cosine",
       "--adam-beta2", "0.95", "--log-interval", "1", "--eval-interval", "1",
       "--eval-iters", str(EVAL_ITERS), "--split", "90,10,0", "--num-workers", "0",
       "--use-distributed-optimizer"]


@pytest.fixture(scope="module")
def saved(corpus, torchrun, tmp_path_factory):
    """(checkpoint directory, data flags) of a 2-rank EP2 run of ITERS steps, evaluated after
    each step."""
    data, tokenizer = corpus
    ckpt = str(tmp_path_factory.mktemp("mlm") / "ckpt")
    data_flags = ["--data-path", data, "--tokenizer-model", tokenizer]
    result = run_train(*data_flags, *MODEL, *RUN, "--train-iters", str(ITERS),
                       "--expert-model-parallel-size", "2", "--save", ckpt)
    assert result.returncode == 0, result.stderr[-4000:]
    return ckpt, data_flags


def test_megatron_lm_finds_position_layout_and_every_argument_it_reads(saved, megatron_world):
    ckpt, data_flags = saved
    view = M.read(ckpt)
    args = view.args
    assert view.iteration == ITERS and view.checkpoint_version >= 3.0
    assert M.missing_arguments(args) == []
    # The position: every step consumed a global batch, every evaluation EVAL_ITERS of them.
    assert args.consumed_train_samples == ITERS * GLOBAL
    assert args.consumed_valid_samples == ITERS * EVAL_ITERS * GLOBAL
    assert args.skipped_train_samples == 0
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.expert_model_parallel_size, args.virtual_pipeline_model_parallel_size,
            args.world_size, args.data_parallel_size) == (1, 1, 2, None, 2, 2)
    assert (args.no_save_rng, args.no_save_optim, args.ckpt_format) == (False, False,
                                                                        "torch_dist")
    # The model as this stack built it (its run record), under Megatron-LM's names and
    # resolved as Megatron-LM's validate_args resolves them.
    built = saved_model_config(read_run_record(ckpt), ckpt)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 64, 4)
    assert args.ffn_hidden_size == built.resolved_ffn_hidden_size
    assert args.kv_channels == 64 // 4 and args.group_query_attention is False
    assert args.seq_length == SEQ and args.max_position_embeddings == built.max_sequence_length
    assert args.padded_vocab_size == built.vocab_size
    assert (args.normalization, args.position_embedding_type, args.swiglu, args.add_bias_linear,
            args.untie_embeddings_and_output_weights) == ("RMSNorm", "rope", True, False, True)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == \
        (4, 2, built.resolved_ffn_hidden_size)
    assert args.add_position_embedding is True  # Megatron-LM's default, rope or not
    assert not hasattr(args, "disable_bias_linear")  # Megatron-LM would invert add_bias_linear
    assert (args.micro_batch_size, args.global_batch_size) == (MICRO, GLOBAL)
    assert args.tokenizer_model == data_flags[3]

    # Every flag shared with Megatron-LM is there under the dest Megatron-LM's parser uses.
    table = json.loads(TABLE.read_text())
    dests = {o: a["dest"] for a in table["actions"] for o in a["option_strings"]}
    shared = {flag for _, owner in SECTIONS for f in options(owner)
              for flag in (flag_of(f), *f.metadata["aliases"]) if flag in dests}
    assert len(shared) > 100
    assert sorted(f"{flag} ({dests[flag]})" for flag in shared
                  if not hasattr(args, dests[flag])) == []

    # check_checkpoint_args: a Megatron-LM run of the same model passes, another one does not.
    run = argparse.Namespace(num_layers=2, hidden_size=64, num_attention_heads=4,
                             add_position_embedding=True, vocab_file=None)
    assert M.check_args(args, run) == []
    assert M.check_args(args, argparse.Namespace(**{**vars(run), "hidden_size": 128})) == \
        ["hidden_size"]
    # load_args_from_checkpoint: a Megatron-LM command line without the model gets ours.
    bare = argparse.Namespace(num_layers=None, hidden_size=None, num_attention_heads=None,
                              ffn_hidden_size=None, seq_length=None, kv_channels=None,
                              max_position_embeddings=None, normalization="LayerNorm",
                              swiglu=False, add_bias_linear=True, num_experts=None,
                              tensor_model_parallel_size=1, expert_model_parallel_size=1)
    taken = M.take_args(args, bare)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "seq_length", "kv_channels", "max_position_embeddings", "normalization",
                 "swiglu", "add_bias_linear", "num_experts"):
        assert getattr(taken, name) == getattr(args, name), name
    assert taken.expert_model_parallel_size == 1  # only with --use-mp-args-from-checkpoint-args


def test_megatron_lm_loads_every_ranks_rng_state(saved, megatron_world):
    """Under EP Megatron-LM asks for the (pp, tp, dp) shard of each rank and loads entry 0 into
    the host generators, the CUDA generator and the tracker streams."""
    from megatron.core.tensor_parallel import random as mcore_random

    view = M.read(saved[0])
    entries = M.read_rng(view, view.args.expert_model_parallel_size)
    assert sorted(entries) == [(0, 0, 0), (0, 0, 1)]
    streams = {mcore_random.get_data_parallel_rng_tracker_name(), "model-parallel-rng",
               mcore_random.get_expert_parallel_rng_tracker_name()}
    mine = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        for offset, entry in entries.items():
            assert M.rng_entry_problems(entry) == [], offset
            assert set(entry["rng_tracker_states"]) >= streams  # tracker.fork(name) needs them
            random.setstate(entry["random_rng_state"])
            np.random.set_state(entry["np_rng_state"])
            torch.set_rng_state(entry["torch_rng_state"])
            assert torch.equal(torch.get_rng_state(), entry["torch_rng_state"])
    finally:
        random.setstate(mine[0])
        np.random.set_state(mine[1])
        torch.set_rng_state(mine[2])
    # Why per rank: the two DP ranks are two expert ranks with their own expert stream.
    expert = mcore_random.get_expert_parallel_rng_tracker_name()
    assert not torch.equal(entries[(0, 0, 0)]["rng_tracker_states"][expert],
                           entries[(0, 0, 1)]["rng_tracker_states"][expert])


def test_use_checkpoint_args_takes_the_model_from_the_checkpoint(saved, tmp_path, capsys):
    ckpt, data_flags = saved
    # Megatron-LM's rule: structure over the command line, sizes where it left them unset.
    job = parse_args([*data_flags, *RUN, "--train-iters", "3", "--load", ckpt,
                      "--use-checkpoint-args", "--normalization", "LayerNorm",
                      "--num-experts", "8", "--hidden-dropout", "0.1",
                      "--position-embedding-type", "learned_absolute"])
    assert "--use-checkpoint-args: from" in capsys.readouterr().out
    record = read_run_record(ckpt)
    saved_config = saved_model_config(record, ckpt)
    model = job.model
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, job.data.seq_length,
            model.max_sequence_length, job.tokenizer.tokenizer_type,
            job.checkpoint_vocab_size) == \
        (2, 64, 4, SEQ, SEQ, "SentencePieceTokenizer", saved_config.vocab_size)
    assert (model.normalization, model.num_experts, model.hidden_dropout,
            model.position_embedding_type, model.swiglu, model.add_bias_linear) == \
        ("RMSNorm", 4, 0.0, "rope", True, False)
    # the layout stays the command line's...
    assert job.parallel.expert_model_parallel_size == 1
    tokens = build_tokenizer(job.tokenizer.tokenizer_type,
                             job.tokenizer.tokenizer_model).vocab_size
    assert compare(saved_config, job.with_vocab_size(tokens).model)[0] == []
    with_layout = parse_args([*data_flags, *RUN, "--train-iters", "3", "--load", ckpt,
                              "--use-checkpoint-args", "--use-mp-args-from-checkpoint-args"])
    # ... unless it is asked for
    assert with_layout.parallel.expert_model_parallel_size == 2
    # The tokenizer is taken unless Megatron-LM's switch turns that off.
    own_tokenizer = ["--data-path", data_flags[1], "--tokenizer-type", "ByteLevelTokenizer",
                     *RUN, "--train-iters", "3", "--load", ckpt, "--use-checkpoint-args"]
    assert parse_args(own_tokenizer).tokenizer.tokenizer_type == "SentencePieceTokenizer"
    kept = parse_args([*own_tokenizer, "--no-use-tokenizer-model-from-checkpoint-args"]).tokenizer
    assert (kept.tokenizer_type, kept.tokenizer_model) == ("ByteLevelTokenizer", None)

    # And a run built from it resumes: one process, no model flag given.
    resumed = train_in_process(*data_flags, *RUN, "--load", ckpt, "--use-checkpoint-args",
                               "--train-iters", str(ITERS + 1), "--eval-iters", "0")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "successfully loaded checkpoint" in resumed.stdout
    assert sorted(logged_losses(resumed.stdout)) == [ITERS + 1]


def test_use_checkpoint_args_takes_every_field_the_model_check_compares():
    """The two agree by construction: what a resume must match, --use-checkpoint-args takes."""
    from spannorm_megatron.checkpoint.run_record import _architecture
    from spannorm_megatron.config.model import ModelConfig
    from spannorm_megatron.training import checkpoint_args as C

    # Every conditional entry of the comparison present: learned positions, SpanNorm, forward
    # scaling, q/k norms, MoE.
    config = ModelConfig(norm_placement="spannorm", num_layers=2, hidden_size=64,
                         num_attention_heads=4, position_embedding_type="learned_absolute",
                         scale_mode="forward", qk_layernorm=True, num_experts=4,
                         max_sequence_length=64, vocab_size=512)
    taken = set(C.SIZES + C.STRUCTURE) | {"padded_vocab_size"}
    through = {"moe_layer_pattern": "moe_layer_freq", "vocab_size": "padded_vocab_size"}
    assert sorted(k for k in _architecture(config) if through.get(k, k) not in taken) == []


def test_vocab_file_tokenizers_also_compare_max_positions_and_padding(megatron_world, tmp_path):
    """Megatron-LM's check compares --max-position-embeddings and --make-vocab-size-divisible-by
    only when the tokenizer has a --vocab-file; so does ours where they do not change the
    weights (rope positions here)."""
    import _checkpoint as H
    from spannorm_megatron.checkpoint import save_checkpoint
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.config.tokenizer import TokenizerConfig
    from spannorm_megatron.runtime import set_seed
    from spannorm_megatron.training.checkpoint_args import check_model_matches

    config = H.model_config(position_embedding_type="rope")
    set_seed(1234)
    chunks, _, _ = H.build(config, ParallelConfig())
    save_checkpoint(str(tmp_path), 1, chunks, None, None, model_config=config,
                    parallel_config=ParallelConfig(), consumed_train_samples=0,
                    args={"make_vocab_size_divisible_by": 128, "vocab_file": "vocab.json"})
    longer = H.model_config(position_embedding_type="rope",
                            max_sequence_length=2 * config.max_sequence_length)
    run = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                      "--seq-length", "64", "--max-position-embeddings", "64",
                      "--micro-batch-size", "1", "--lr", "1e-3", "--train-iters", "1",
                      "--tokenizer-type", "ByteLevelTokenizer", "--load", str(tmp_path),
                      "--make-vocab-size-divisible-by", "64"])
    run = dataclasses.replace(run, model=longer)
    check_model_matches(run)  # rope's maximum positions hold no weights
    files = tmp_path / "gpt2"
    files.mkdir()
    (files / "vocab.json").write_text("{}")
    (files / "merges.txt").write_text("#version: 0.2\n")  # no merges; not an empty file
    run.tokenizer = TokenizerConfig(tokenizer_type="GPT2BPETokenizer",
                                    vocab_file=str(files / "vocab.json"),
                                    merge_file=str(files / "merges.txt"))
    with pytest.raises(ConfigError) as refused:
        check_model_matches(run)
    message = str(refused.value)
    assert (f"--max-position-embeddings (max_sequence_length): checkpoint "
            f"{config.max_sequence_length}, this run {longer.max_sequence_length}") in message
    assert "--make-vocab-size-divisible-by: checkpoint 128, this run 64" in message


def _train_main(argv):
    from spannorm_megatron.train import pretrain

    pretrain(argv)


@pytest.mark.parametrize("flag,value", [("--num-layers", "4"), ("--hidden-size", "128"),
                                        ("--num-attention-heads", "8")])
def test_resume_of_another_model_is_refused_before_it_starts(saved, capsys, flag, value):
    """Megatron-LM's check_checkpoint_args compares these three on every resume; ours refuses
    before any process group exists, naming the flag, both values and the fix, and leaves the
    checkpoint as it was."""
    ckpt, data_flags = saved
    before = sorted(os.listdir(ckpt))
    given = [*data_flags, *MODEL, *RUN, "--train-iters", "4", "--load", ckpt]
    assert run_cli(_train_main, given + [flag, value]) == 2
    error = capsys.readouterr().err
    assert f"{flag} (" in error and f"this run {value}" in error
    assert "--use-checkpoint-args to take the model's flags" in error
    # With --use-checkpoint-args a size given on the command line still wins, as in
    # Megatron-LM, and is refused the same way.
    assert run_cli(_train_main, given + ["--use-checkpoint-args", flag, value]) == 2
    error = capsys.readouterr().err
    assert f"{flag} (" in error and "keeps the sizes given on the command line" in error
    assert sorted(os.listdir(ckpt)) == before


def test_use_checkpoint_args_needs_load():
    with pytest.raises(ConfigError, match="--use-checkpoint-args .* no --load"):
        parse_args(["--use-checkpoint-args"])
