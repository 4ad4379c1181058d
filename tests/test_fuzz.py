"""The fuzzer of spannorm-train's inputs (tests/fuzz_train.py) at a fixed seed, and the examples
it once found defective, kept as regression cases. Each must end accepted and trained, or
refused with one message: never a traceback. The long mode (an hour) is
`python tests/fuzz_train.py --minutes 60`."""

from __future__ import annotations

import time

import pytest

from fuzz_train import BASE, Example, Fixtures, expand, fuzz, run_example

# Examples that once ended in a traceback: the seed that found each, what was wrong (all fixed),
# and the example itself, kept whole (the words after BASE, fixtures written `{name}`, and the
# environment): the generator changes whenever a flag is declared, and a seed alone then names
# another example.
REGRESSIONS = {
    43: ("MoE with linear biases on one tensor-parallel rank: megatron-core added the expert "
         "bias in place onto an autograd function's output (patches/expert_bias_inplace.py)",
         ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type",
          "aux_loss", "--moe-token-dispatcher-type", "allgather"], {}),
    113: ("WORLD_SIZE=0 in the environment: a ZeroDivisionError while laying out batches",
          [], {"WORLD_SIZE": "0"}),
    241: ("WORLD_SIZE=x in the environment: int() raised while laying out batches",
          [], {"WORLD_SIZE": "x"}),
    254: ("--lr-warmup-init above --lr: megatron-core's scheduler asserted",
          ["--lr-warmup-init", "1000000000", "--seq-length", "48", "--max-position-embeddings",
           "96", "--position-embedding-type", "none"], {}),
    100129: ("--make-vocab-size-divisible-by 1000000000: a 128 GB embedding table met the "
             "allocator (sizes whose training state exceeds memory are now refused up front, "
             "model/memory_floor.py)", ["--make-vocab-size-divisible-by", "1000000000"], {}),
    500013: ("RANK=4 outside WORLD_SIZE=4: refused, but silently (exit 2, no message): only "
             "rank 0 printed refusals, and a rank outside the world is no other rank's",
             ["--context-parallel-size", "2"],
             {"WORLD_SIZE": "4", "RANK": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "5"}),
    500183: ("RANK=x: refused silently, as 500013", ["--attention-softmax-in-fp32"],
             {"RANK": "x"}),
    200257: ("--data-path 0.3 A 0 B: a zero blend weight passed our check (non-negative, "
             "positive sum) and met megatron-core's BlendedDataset assert (every weight > 0)",
             ["--no-mock-data", "--data-path", "0.3", "{data_prefix:good}", "0",
              "{data_prefix:other}", "--split", "100,0,0"], {}),
    102335: ("MoE padded to a capacity above the tokens (topk 2 x factor 1.25 > 2 experts) "
             "with the alltoall dispatcher: a shape error in megatron-core's permute",
             ["--num-experts", "2", "--moe-router-topk", "2", "--moe-expert-capacity-factor",
              "1.25", "--moe-pad-expert-input-to-capacity", "--moe-token-dispatcher-type",
              "alltoall"], {}),
    # Found by the data combination alone (`_data(random.Random(n), fixtures)`), n = 8, 2:
    "data-8": ("--split 0,0,100 gave training nothing and --train-iters 1 asked for a step: "
               "a TypeError in the embedding (no batch)",
               ["--no-mock-data", "--data-path", "{data_prefix:good}", "--split", "0,0,100"], {}),
    "data-2": ("--valid-data-path/--test-data-path without --train-data-path: the same",
               ["--no-mock-data", "--valid-data-path", "{data_prefix:other}",
                "--test-data-path", "{data_prefix:good}"], {}),
}
CI_SEED, CI_BUDGET_SECONDS = 1000, 40


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(str(tmp_path_factory.mktemp("fuzz")))


@pytest.mark.parametrize("seed", sorted(REGRESSIONS, key=str))
def test_a_once_defective_example_ends_as_it_should(seed, fixtures):
    why, words, env = REGRESSIONS[seed]
    example = Example(seed, [*BASE, *expand(words, fixtures)], env)
    fixtures.prepare(example.argv)
    outcome = run_example(example)
    assert outcome.defect is None, (why, words, env, outcome.output[-3000:])


@pytest.mark.slow
def test_fuzzing_at_a_fixed_seed_finds_nothing(fixtures):
    lines = []
    start = time.monotonic()
    defects, counts = fuzz(range(CI_SEED, CI_SEED + 1000), fixtures,
                           deadline=start + CI_BUDGET_SECONDS, log=lines.append)
    assert sum(counts.values()) >= 10, lines  # the budget runs a useful number of examples
    assert counts["accepted"] and counts["refused"], counts
    assert not defects, "\n".join(lines)


def test_an_environment_that_contradicts_a_flag_is_refused_naming_both(monkeypatch, capsys):
    """megatron-core asserts on NVTE_* switches that disagree with --attention-backend: here
    the run stops before anything is built, naming the variable and the flag."""
    from spannorm_megatron.train import main

    monkeypatch.setenv("NVTE_FLASH_ATTN", "1")
    assert main([*BASE, "--attention-backend", "local"]) == 2
    err = capsys.readouterr().err
    assert "NVTE_FLASH_ATTN=1 in the environment contradicts --attention-backend local" in err
    assert "Traceback" not in err



def test_a_world_of_several_ranks_without_a_rendezvous_address_is_refused(monkeypatch, capsys):
    """WORLD_SIZE=2 left in a shell, without torchrun's MASTER_ADDR/MASTER_PORT: every check
    passes (the layout tiles two ranks), and the ranks would have had nowhere to meet."""
    import torch

    from spannorm_megatron.train import main

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0")):
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    assert main([*BASE, "--global-batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 in the environment, but MASTER_ADDR and MASTER_PORT are unset" in err
    assert "Traceback" not in err and not torch.distributed.is_initialized()


@pytest.mark.parametrize("env,printed", [
    ({}, True), ({"RANK": "x"}, True), ({"RANK": "2", "WORLD_SIZE": "2"}, True),
    ({"RANK": "1", "WORLD_SIZE": "2"}, True),  # no torchrun: no rank 0 is known to print it
    ({"RANK": "2", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "fuzz"}, True),
    ({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "fuzz"}, False),
])
def test_a_refusal_is_printed_unless_rank_0_of_the_same_torchrun_job_prints_it(
        monkeypatch, capsys, env, printed):
    """A rank other than 0 of a torchrun job leaves the message to rank 0. Launch variables
    that are themselves refused (fuzzer seeds 500013, 500183) name no such rank: the process
    that has them says why."""
    from spannorm_megatron.cli import run_cli
    from spannorm_megatron.errors import ConfigError

    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def refused(argv):
        raise ConfigError("the launch cannot work")

    assert run_cli(refused, []) == 2
    err = capsys.readouterr().err
    assert err == ("error: the launch cannot work\n" if printed else ""), err
