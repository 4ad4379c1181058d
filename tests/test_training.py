"""The training stack end to end: data prepared by our tools, `spannorm-train` under torchrun.

One small corpus (a slice of the embedded default corpus) is prepared once per module.
"""

import io
import os
import subprocess
import sys

import pytest

from spannorm_megatron.data.corpus import write_embedded_corpus
from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess
from spannorm_megatron.data.tokenizer_training import TokenizerTrainingConfig, train_sentencepiece
from spannorm_megatron.model.partition import check_model_fits_layout
from spannorm_megatron.training.arguments import model_config, parallel_config, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_CONFIGS = sorted(os.listdir(os.path.join(ROOT, "examples", "configs")))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data prefix, tokenizer model) for a 1 MB slice of the embedded corpus."""
    root = tmp_path_factory.mktemp("corpus")
    documents = root / "stdlib.jsonl"
    write_embedded_corpus(documents, max_bytes=1_000_000)
    train_sentencepiece(TokenizerTrainingConfig(model_prefix=str(root / "tok"),
                                                inputs=[str(documents)], vocab_size=512),
                        log=io.StringIO())
    preprocess(PreprocessConfig(input=str(documents), output_prefix=str(root / "stdlib"),
                                tokenizer_model=str(root / "tok.model"), append_eod=True),
               log=io.StringIO())
    return str(root / "stdlib_text_document"), str(root / "tok.model")


def run_train(*flags, nproc=2, timeout=600):
    """`spannorm-train` under torchrun, or as one plain process for nproc=1 (so that what the
    tests read on stderr is ours, not the launcher's report of a failed child)."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                      f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "spannorm_megatron.train", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def logged_losses(stdout: str) -> dict:
    """iteration -> lm loss, from Megatron-LM style log lines."""
    losses = {}
    for line in stdout.splitlines():
        if "| lm loss:" in line and " iteration " in line:
            iteration = int(line.split(" iteration ")[1].split("/")[0])
            losses[iteration] = float(line.split("| lm loss: ")[1].split(" |")[0])
    return losses


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_example_configs_describe_valid_models_and_layouts(name):
    args = parse_args(["--config", os.path.join(ROOT, "examples", "configs", name)])
    check_model_fits_layout(model_config(args, vocab_size=32768), parallel_config(args))


def test_main_job_configuration_trains_on_two_ranks(corpus, tmp_path):
    data, tokenizer = corpus
    result = run_train(
        "--config", os.path.join(ROOT, "examples", "configs", "quickstart.yaml"),
        "--data-path", data, "--tokenizer-model", tokenizer,
        "--train-iters", "60", "--log-interval", "10", "--eval-interval", "30",
        "--eval-iters", "2", "--split", "90,10,0", "--tensor-model-parallel-size", "2", "--sequence-parallel",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    losses = logged_losses(result.stdout)
    assert sorted(losses) == [10, 20, 30, 40, 50, 60]
    assert losses[60] < losses[10] - 0.5, losses
    assert "validation loss at iteration 60" in result.stdout


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
        (["--global-batch-size", "6", "--micro-batch-size", "4"],
         "--global-batch-size 6 is not divisible by --micro-batch-size 4"),
        (["--tokenizer-model", "/nonexistent/tok.model"], "/nonexistent/tok.model"),
    ],
)
def test_bad_input_is_refused_before_training(corpus, flags, expected):
    data, tokenizer = corpus
    base = {"--data-path": data, "--tokenizer-model": tokenizer}
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    argv = [item for pair in base.items() for item in pair] + ["--train-iters", "2"]
    result = run_train(*argv, nproc=1, timeout=300)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "iteration" not in result.stdout
