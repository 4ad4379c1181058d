"""The run's typed configuration: `parse_args` returns one JobConfig of checked sections, and the
package reads its sections, never the parser's namespace."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _training import SMALL

from spannorm_megatron.config.checkpoint import CheckpointConfig
from spannorm_megatron.config.data import DataConfig
from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.config.performance import PerformanceConfig
from spannorm_megatron.config.tokenizer import TokenizerConfig
from spannorm_megatron.config.training import TrainingConfig
from spannorm_megatron.errors import DataError
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.training.arguments import parse_args

PACKAGE = Path(__file__).resolve().parent.parent / "spannorm_megatron"

# Where a command line's namespace may be read: spannorm-train's parser (and
# --use-checkpoint-args, which Megatron-LM applies to the namespace before anything is checked),
# and the entry points of other programs, each reading its own flags. The tools (preprocessing,
# tokenizer training, conversions, evaluation, generation, the benchmarks) read the typed
# option objects `config.options.parse_sections` builds.
PARSER_MODULES = {
    "training/arguments.py": "spannorm-train's parser",
    "training/checkpoint_args.py": "--use-checkpoint-args, applied to the parsed namespace",
    "selfcheck.py": "spannorm-selfcheck's own flags",
    "data/corpus.py": "the embedded corpus writer's own flags",
    "lab/cli.py": "the lab's own flags",
    "lab/sweep.py": "the sweep report's own flags",
}
# A run record's "args" is a dict of the flags a run recorded: reading it is not reading a
# namespace.
DICT_READS = {"get", "items", "keys", "values"}


def _namespace_reads(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "args" and node.attr not in DICT_READS):
            yield node.lineno, f"args.{node.attr}"


def test_nothing_reads_a_namespace_outside_the_parser():
    found = [f"{path.relative_to(PACKAGE)}:{line}: {read}"
             for path in sorted(PACKAGE.rglob("*.py"))
             if path.relative_to(PACKAGE).as_posix() not in PARSER_MODULES
             for line, read in _namespace_reads(path)]
    assert found == []


def test_parse_args_returns_every_section_checked():
    job = parse_args([*SMALL, "--mock-data", "--tensor-model-parallel-size", "1",
                      "--sequence-parallel"])
    assert isinstance(job, JobConfig)
    for name, kind in (("model", ModelConfig), ("parallel", ParallelConfig),
                       ("training", TrainingConfig), ("performance", PerformanceConfig),
                       ("data", DataConfig), ("tokenizer", TokenizerConfig),
                       ("checkpoint", CheckpointConfig)):
        assert isinstance(getattr(job, name), kind), name
    # The sections hold what the checks resolved; the flags, what was given.
    assert job.parallel.sequence_parallel is False and job.flags["sequence_parallel"] is True
    assert job.data.seed == job.training.seed
    recorded = job.recorded_args()
    assert list(recorded)[-1] == "notices" and recorded["notices"] is job.notices
    assert {k: v for k, v in recorded.items() if k != "notices"} == job.flags


def test_the_model_gets_the_tokenizer_s_vocabulary_padded():
    job = parse_args([*SMALL, "--make-vocab-size-divisible-by", "128",
                      "--tensor-model-parallel-size", "2"])
    padded = job.with_vocab_size(1000)
    assert padded.model.vocab_size == 1024  # a multiple of 128 x TP 2
    assert padded.parallel is job.parallel and padded.notices is job.notices
    taken = JobConfig(**{**vars(job), "checkpoint_vocab_size": 1536})
    assert taken.with_vocab_size(1000).model.vocab_size == 1536
    with pytest.raises(ConfigError, match=r"checkpoint's vocabulary \(1536\) is smaller"):
        taken.with_vocab_size(2000)


def test_a_command_line_without_data_parses_and_the_trainer_refuses_it():
    from spannorm_megatron.training.trainer import Trainer

    job = parse_args(SMALL)
    assert job.data is None
    with pytest.raises(DataError, match="Give the data as one of: .*none given"):
        Trainer(job)


def test_the_config_package_loads_no_training_model_or_runtime_module():
    code = ("import sys, spannorm_megatron.config.job;"
            "print(sorted(m for m in sys.modules if m.startswith(('megatron', "
            "'spannorm_megatron.training', 'spannorm_megatron.model', "
            "'spannorm_megatron.runtime'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
