"""The catalogue of bad inputs: every entry point given something wrong answers with one
`error: ...` paragraph that names the problem (and the fix), exit status 2, no traceback, and
leaves the files it was given as they were.

Entries run in this process (each command's `main` through the shared `run_cli`), so the whole
catalogue costs seconds. Checkpoint and multi-rank cases live in test_checkpoint.py,
test_training.py and test_reliability.py; the layout arithmetic in test_config.py.
"""

import hashlib
import json
import os

import numpy
import pytest
import torch
from safetensors.numpy import save_file

from _tools import tool_main
from _training import SMALL, prepare_corpus
from spannorm_megatron.cli import run_cli
from spannorm_megatron.model.specs import transformer_engine_available


def tool(name: str):
    return tool_main(name)


def train_main(argv):
    from spannorm_megatron.train import pretrain

    pretrain(argv)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    prepare_corpus(root, max_bytes=300_000, name="data")
    (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (root / "nokey.jsonl").write_text('{"body": "no text key"}\n')
    (root / "not_a_model.model").write_text("this is not a sentencepiece model")
    (root / "bad.yaml").write_text("num-layers: [1, 2\n")
    (root / "unknown.yaml").write_text("num-layrs: 4\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "help.yaml").write_text("help: true\n")
    (root / "hf_unsupported").mkdir()
    (root / "hf_unsupported" / "config.json").write_text(json.dumps(
        {"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    save_file({"bert.embeddings.word_embeddings.weight": numpy.zeros((8, 4), numpy.float32)},
              str(root / "hf_unsupported" / "model.safetensors"))
    # A save directory as far as its layout goes (its pointer names an iteration directory).
    (root / "pointer_only" / "iter_0000002").mkdir(parents=True)
    (root / "pointer_only" / "latest_checkpointed_iteration.txt").write_text("2\n")
    # An index that does not match its data file: the .bin cut short.
    for suffix in (".bin", ".idx"):
        (root / f"short{suffix}").write_bytes((root / f"data_text_document{suffix}").read_bytes())
    with open(root / "short.bin", "r+b") as f:
        f.truncate(os.path.getsize(root / "short.bin") // 2)
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("existing output")
    return root


def T(files, *flags):
    """spannorm-train flags around a valid base."""
    return [*SMALL, "--data-path", str(files / "data_text_document"),
            "--tokenizer-model", str(files / "tok.model"), "--train-iters", "2",
            "--lr-warmup-iters", "0",
            "--split", "90,10,0", *flags]


def TS(files, *flags):
    """T, counted in samples: 32 (4 steps of SMALL's global batch 8)."""
    argv = T(files)
    while "--train-iters" in argv:
        i = argv.index("--train-iters")
        del argv[i:i + 2]
    return [*argv, "--train-samples", "32", *flags]


CATALOGUE = [
    # (id, command, argv builder, expected text in the message)
    ("unknown-placement", "train", lambda f: T(f, "--norm-placement", "sandwich"),
     "'sandwich' is not one of ['deepnorm', 'perinorm'"),
    ("heads-vs-groups", "train", lambda f: T(f, "--num-attention-heads", "8",
                                             "--group-query-attention",
                                             "--num-query-groups", "3"), "num_query_groups"),
    ("topk-above-experts", "train", lambda f: T(f, "--num-experts", "2", "--moe-router-topk",
                                                "3"), "moe_router_topk=3"),
    ("scale-init-zero", "train", lambda f: T(f, "--scale-init", "0"), "--scale-init: '0' must be positive"),
    ("scale-init-word", "train", lambda f: T(f, "--scale-init", "sqrt"), "'sqrt' is not understood"),
    ("hidden-vs-heads", "train", lambda f: T(f, "--hidden-size", "102"), "hidden_size=102"),
    ("dropout-one", "train", lambda f: T(f, "--hidden-dropout", "1.0"), "--hidden-dropout: '1.0' must be < 1.0"),
    ("forward-scale-prenorm", "train", lambda f: T(f, "--norm-placement", "prenorm",
                                                   "--scale-mode", "forward"), "scale_mode"),
    ("tp-world", "train", lambda f: T(f, "--tensor-model-parallel-size", "2"),
     "world size 1 is not divisible"),
    # Counts the machine cannot hold: refused before the first fork or allocation.
    ("workers-beyond-cpus", "train", lambda f: T(f, "--num-workers", "1000000000"),
     "--num-workers 1000000000 x 1 rank(s) on this machine would start 1,000,000,000"),
    ("model-beyond-memory", "train", lambda f: T(f, "--make-vocab-size-divisible-by",
                                                 "1000000000"),
     "this model cannot be trained here"),
    # Tiny layers whose weights fit anywhere, but not a million layers' objects.
    ("layers-beyond-host", "train", lambda f: T(f, "--num-layers", "1000000", "--hidden-size",
                                                "8", "--num-attention-heads", "2",
                                                "--ffn-hidden-size", "8"),
     "--num-layers 1000000 cannot be built here"),
    ("moe-layers-beyond-memory", "train", lambda f: T(f, "--num-layers", "1000000000",
                                                      "--num-experts", "2",
                                                      "--moe-layer-freq", "3"),
     "333333334 MoE layers x --num-experts 2"),
    ("samples-beyond-memory", "train", lambda f: T(f, "--eval-iters", "1000000000",
                                                   "--eval-interval", "1"),
     "for evaluation from --eval-iters 1000000000, --eval-interval 1"),
    ("layers-vs-pp", "train", lambda f: T(f, "--num-layers", "3",
                                          "--pipeline-model-parallel-size", "1",
                                          "--num-layers-per-virtual-pipeline-stage", "2"),
     "--num-layers 3 is not divisible"),
    ("experts-vs-ep", "train", lambda f: T(f, "--num-experts", "3",
                                           "--expert-model-parallel-size", "2"),
     "num_experts=3 is not divisible by expert_model_parallel_size=2"),
    ("dense-with-ep", "train", lambda f: T(f, "--expert-model-parallel-size", "1",
                                           "--expert-tensor-parallel-size", "2"),
     "this model is dense"),
    # MoE and pipeline recipes: each named with its fix before any process group.
    ("capacity-factor-zero", "train", lambda f: T(f, "--num-experts", "4",
                                                  "--moe-expert-capacity-factor", "0"),
     "--moe-expert-capacity-factor: '0' must be > 0.0"),
    ("group-topk-above-groups", "train", lambda f: T(f, "--num-experts", "4",
                                                     "--moe-router-num-groups", "2",
                                                     "--moe-router-group-topk", "3"),
     "--moe-router-group-topk 3 is larger than --moe-router-num-groups 2"),
    ("experts-vs-groups", "train", lambda f: T(f, "--num-experts", "6",
                                               "--moe-router-num-groups", "4",
                                               "--moe-router-group-topk", "2"),
     "--num-experts 6 is not divisible by --moe-router-num-groups 4"),
    ("sigmoid-pre-softmax", "train", lambda f: T(f, "--num-experts", "4",
                                                 "--moe-router-score-function", "sigmoid",
                                                 "--moe-router-pre-softmax"),
     "--moe-router-pre-softmax applies to softmax scoring"),
    ("bias-rate-without-bias", "train", lambda f: T(f, "--num-experts", "4",
                                                    "--moe-router-bias-update-rate", "0.01"),
     "add --moe-router-enable-expert-bias"),
    ("layer-freq-length", "train", lambda f: T(f, "--num-experts", "4", "--num-layers", "4",
                                               "--moe-layer-freq", "([0]*1+[1]*2)"),
     "--moe-layer-freq lists 3 layers but --num-layers is 4"),
    ("uneven-stages-sum", "train", lambda f: T(f, "--pipeline-model-parallel-size", "2",
                                               "--num-layers", "4",
                                               "--decoder-first-pipeline-num-layers", "1",
                                               "--decoder-last-pipeline-num-layers", "2"),
     "must add up to --num-layers"),
    ("uneven-stages-empty", "train", lambda f: T(f, "--pipeline-model-parallel-size", "3",
                                                 "--num-layers", "4",
                                                 "--decoder-first-pipeline-num-layers", "2",
                                                 "--decoder-last-pipeline-num-layers", "2"),
     "leaves 0 layers for 1 other stage(s)"),
    ("layout-without-pipeline", "train", lambda f: T(f, "--pipeline-model-parallel-layout",
                                                     "Et|tL"),
     "has 2 stages and --pipeline-model-parallel-size is 1"),
    ("global-batch", "train", lambda f: T(f, "--global-batch-size", "6",
                                          "--micro-batch-size", "4"),
     "--global-batch-size 6 is not divisible"),
    # Rollback policies (training/rollback.py): each refused naming its flag.
    ("rollback-without-save", "train", lambda f: T(f, "--on-collapse", "rollback"),
     "--on-collapse rollback needs --save"),
    ("rollback-lr-factor-above-one", "train", lambda f: T(f, "--rollback-lr-factor", "1.5"),
     "--rollback-lr-factor 1.5 is above 1"),
    ("rollback-skip-beyond-the-run", "train",
     lambda f: T(f, "--on-loss-spike", "rollback", "--save", str(f / "rollback_save"),
                 "--rollback-skip-batches", "3"),
     "--rollback-skip-batches 3 is more than what is left of the run: 2 iterations"),
    ("max-rollbacks-zero", "train", lambda f: T(f, "--on-collapse", "rollback",
                                                "--max-rollbacks", "0"),
     "--max-rollbacks 0 with --on-collapse rollback"),
    ("snapshot-interval-negative", "train",
     lambda f: T(f, "--on-collapse", "rollback", "--rollback-snapshot-interval", "-1"),
     "--rollback-snapshot-interval: '-1' must be >= 0"),
    ("snapshot-interval-without-policy", "train",
     lambda f: T(f, "--rollback-snapshot-interval", "5"),
     "--rollback-snapshot-interval 5 without a rollback policy"),
    ("lr-inf", "train", lambda f: T(f, "--lr", "inf"), "--lr: 'inf' must be a finite number"),
    ("lr-zero", "train", lambda f: T(f, "--lr", "0"), "--lr: '0' must be > 0.0"),
    ("min-lr-above-lr", "train", lambda f: T(f, "--min-lr", "0.1", "--lr", "0.01"),
     "--min-lr 0.1 is above --lr 0.01"),
    ("wsd-without-final-decay", "train", lambda f: T(f, "--lr-decay-style", "WSD"),
     "needs --lr-wsd-decay-iters N"),
    ("save-is-a-file", "train", lambda f: T(f, "--save", str(f / "bad.yaml")),
     "is a file, not a directory"),
    ("tensorboard-under-a-file", "train",
     lambda f: T(f, "--tensorboard-dir", str(f / "bad.yaml" / "tb")), "cannot be created"),
    ("both-scheduler-overrides", "train",
     lambda f: T(f, "--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"),
     "contradict each other"),
    ("warmup-vs-decay", "train", lambda f: T(f, "--lr-warmup-iters", "5"),
     "--lr-warmup-iters 5 must be smaller"),
    ("gqa-without-groups", "train", lambda f: T(f, "--group-query-attention"),
     "--num-query-groups"),
    ("te-layers-without-te", "train", lambda f: T(f, "--transformer-impl", "transformer_engine"),
     "need Transformer Engine on a GPU"),
    ("nccl-without-gpu", "train", lambda f: T(f, "--distributed-backend", "nccl"),
     "--distributed-backend nccl needs GPUs"),
    ("fp8-without-bf16", "train", lambda f: T(f, "--fp8-format", "hybrid"),
     "--fp8-format needs --bf16"),
    *([] if transformer_engine_available() else [
        ("fp8-without-gpu", "train", lambda f: T(f, "--bf16", "--fp8-format", "e4m3"),
         "need Transformer Engine on a GPU")]),
    ("tp-overlap-without-sp", "train", lambda f: T(f, "--tp-comm-overlap", "--bf16"),
     "--tp-comm-overlap needs --tensor-model-parallel-size > 1"),
    ("tp-overlap-without-bf16", "train", lambda f: T(f, "--tp-comm-overlap"),
     "--tp-comm-overlap needs --bf16"),
    ("first-last-bf16-delayed", "train", lambda f: T(f, "--bf16", "--fp8-format", "hybrid",
                                                     "--first-last-layers-bf16"),
     "--first-last-layers-bf16 does not work with --fp8-recipe delayed"),
    ("param-gather-without-grad-overlap", "train", lambda f: T(f, "--overlap-param-gather"),
     "--overlap-param-gather needs --overlap-grad-reduce"),
    ("param-gather-without-distopt", "train", lambda f: T(f, "--overlap-grad-reduce",
                                                          "--overlap-param-gather"),
     "needs --use-distributed-optimizer"),
    ("fp8-param-gather-without-fp8", "train", lambda f: T(f, "--fp8-param-gather"),
     "only applies to FP8 runs"),
    ("fp8-param-gather-deepnorm", "train",
     lambda f: T(f, "--bf16", "--fp8-format", "hybrid", "--fp8-param-gather",
                 "--use-distributed-optimizer", "--norm-placement", "deepnorm"),
     "--fp8-param-gather keeps weights in FP8 from their construction, and --norm-placement "
     "deepnorm scales"),
    ("fp8-param-gather-moe", "train",
     lambda f: T(f, "--bf16", "--fp8-format", "hybrid", "--fp8-param-gather",
                 "--use-distributed-optimizer", "--num-experts", "4"),
     "MoE models (--num-experts) redraw each expert's weights"),
    ("recompute-method-without-full", "train", lambda f: T(f, "--recompute-granularity",
                                                           "selective", "--recompute-method",
                                                           "block"),
     "--recompute-method applies to --recompute-granularity full"),
    ("missing-data", "train", lambda f: T(f, "--data-path", str(f / "nothing")),
     str("nothing")),
    ("no-data-flag", "train", lambda f: [*SMALL, "--tokenizer-model", str(f / "tok.model")],
     "Give the data as one of: --data-path"),
    ("no-tokenizer-flag", "train", lambda f: [*SMALL, "--data-path",
                                              str(f / "data_text_document")],
     "--tokenizer-model is required"),
    ("no-required-flags", "train", lambda f: ["--data-path", str(f / "data_text_document")],
     "the following flags are required (as in Megatron-LM): --num-layers"),
    ("megatron-lm-flag-we-lack", "train", lambda f: T(f, "--use-torch-fsdp2"),
     "--use-torch-fsdp2 is a Megatron-LM flag that spannorm-train does not take: FSDP"),
    ("rampup-by-iterations", "train", lambda f: T(f, "--rampup-batch-size", "4", "4", "64"),
     "--rampup-batch-size cannot be used with --train-iters"),
    ("rampup-uneven", "train", lambda f: TS(f, "--rampup-batch-size", "3", "2", "64"),
     "--rampup-batch-size 3 2 64: it must climb from its start 3 to --global-batch-size 8"),
    ("samples-and-iterations", "train", lambda f: T(f, "--train-samples", "64"),
     "exactly one of them"),
    ("samples-under-one-batch", "train", lambda f: TS(f, "--train-samples", "4"),
     "--train-samples 4 is less than one global batch"),
    ("missing-tokenizer", "train", lambda f: T(f, "--tokenizer-model", str(f / "none.model")),
     "none.model"),
    ("not-a-tokenizer", "train", lambda f: T(f, "--tokenizer-model",
                                             str(f / "not_a_model.model")), "not_a_model.model"),
    ("tokenizer-type", "train", lambda f: T(f, "--tokenizer-type", "GPT2BPETokenizer"),
     "GPT2BPETokenizer"),
    ("gpt2-without-merge-file", "train",
     lambda f: [*SMALL, "--data-path", str(f / "data_text_document"), "--tokenizer-type",
                "GPT2BPETokenizer", "--vocab-file", str(f / "bad.jsonl")],
     "--merge-file is required with --tokenizer-type GPT2BPETokenizer"),
    ("flag-of-another-tokenizer-type", "train", lambda f: T(f, "--vocab-size", "512"),
     "--tokenizer-type SentencePieceTokenizer takes --tokenizer-model, not --vocab-size (512)"),
    ("hf-tokenizer-not-local", "train",
     lambda f: [*SMALL, "--data-path", str(f / "data_text_document"), "--tokenizer-type",
                "HuggingFaceTokenizer", "--tokenizer-model", "meta-llama/Llama-2-7b-hf"],
     "nothing is downloaded from the Hugging Face hub"),
    ("preprocess-null-without-vocab-size", "preprocess_data",
     lambda f: ["--input", str(f / "data.jsonl"), "--output-prefix", str(f / "out" / "x"),
                "--tokenizer-type", "NullTokenizer"],
     "--vocab-size is required with --tokenizer-type NullTokenizer"),
    ("preprocess-null-text-that-is-not-ids", "preprocess_data",
     lambda f: ["--input", str(f / "data.jsonl"), "--output-prefix", str(f / "out" / "x"),
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"],
     "Line 1 of"),
    ("idx-bin-mismatch", "train", lambda f: T(f, "--data-path", str(f / "short")), "short.bin"),
    ("bad-split", "train", lambda f: T(f, "--split", "a,b"), "--split"),
    ("split-without-training", "train", lambda f: T(f, "--split", "0,100,0"),
     "--split 0,100,0 leaves no data for training"),
    ("lab-from-json-not-json", "signal_propagation",
     lambda f: ["--from-json", str(f / "not_a_model.model"), "--out", str(f / "out" / "lab")],
     "--from-json"),
    ("config-missing", "train", lambda f: T(f, "--config", str(f / "none.yaml")), "none.yaml"),
    ("config-invalid-yaml", "train", lambda f: T(f, "--config", str(f / "bad.yaml")),
     "not valid YAML"),
    ("config-unknown-key", "train", lambda f: T(f, "--config", str(f / "unknown.yaml")),
     "num-layrs"),
    ("config-help-key", "train", lambda f: T(f, "--config", str(f / "help.yaml")),
     "unknown key 'help'"),
    ("config-not-mapping", "train", lambda f: T(f, "--config", str(f / "list.yaml")),
     "must be a mapping"),
    ("load-missing", "train", lambda f: T(f, "--load", str(f / "no_checkpoints")),
     "no_checkpoints"),
    ("load-holds-nothing", "train", lambda f: T(f, "--load", str(f / "out")),
     "holds no checkpoint"),
    ("load-an-hf-folder", "train", lambda f: T(f, "--load", str(f / "hf_unsupported")),
     "is a Hugging Face model folder (config.json), not a megatron checkpoint"),
    ("load-an-iteration-of-a-run", "train",
     lambda f: T(f, "--load", str(f / "pointer_only" / "iter_0000002")),
     "is an iteration inside the checkpoint directory"),
    ("preprocess-missing-input", "preprocess_data",
     lambda f: ["--input", str(f / "none.jsonl"), "--output-prefix", str(f / "out" / "x"),
                "--tokenizer-model", str(f / "tok.model")], "none.jsonl"),
    ("preprocess-bad-json-line", "preprocess_data",
     lambda f: ["--input", str(f / "bad.jsonl"), "--output-prefix", str(f / "out" / "x"),
                "--tokenizer-model", str(f / "tok.model")], "Line 2 of"),
    ("preprocess-missing-key", "preprocess_data",
     lambda f: ["--input", str(f / "nokey.jsonl"), "--output-prefix", str(f / "out" / "x"),
                "--tokenizer-model", str(f / "tok.model")], "text"),
    ("preprocess-bad-tokenizer", "preprocess_data",
     lambda f: ["--input", str(f / "data.jsonl"), "--output-prefix", str(f / "out" / "x"),
                "--tokenizer-model", str(f / "not_a_model.model")], "not_a_model.model"),
    ("tokenizer-missing-input", "train_tokenizer",
     lambda f: ["--input", str(f / "none.txt"), "--model-prefix", str(f / "out" / "t")],
     "none.txt"),
    ("hf-export-missing-checkpoint", "convert_to_hf",
     lambda f: ["--load", str(f / "no_checkpoints"), "--save", str(f / "out" / "hf")],
     "no_checkpoints"),
    ("hf-import-unsupported-architecture", "convert_from_hf",
     lambda f: ["--load", str(f / "hf_unsupported"), "--save", str(f / "out" / "ck")],
     "BertForMaskedLM"),
    ("hf-export-into-existing-folder", "convert_to_hf",
     lambda f: ["--load", str(f / "pointer_only"), "--save", str(f / "out")], "keep.txt"),
]


def _snapshot(root):
    digest = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if "cache" in path:  # megatron-core's dataset index caches may appear
                continue
            with open(path, "rb") as f:
                digest[path] = hashlib.sha256(f.read()).hexdigest()
    return digest


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 30
    assert len({entry[0] for entry in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize("name,command,argv,expected", CATALOGUE, ids=[e[0] for e in CATALOGUE])
def test_bad_input_gets_one_clear_error_and_changes_nothing(files, capsys, monkeypatch, name,
                                                            command, argv, expected):
    main = train_main if command == "train" else tool(command)
    from spannorm_megatron.training import trainer

    initializations = []  # a refusal comes before any process group: nothing to tear down
    real_initialize = trainer.initialize
    monkeypatch.setattr(trainer, "initialize",
                        lambda *a, **k: initializations.append(a) or real_initialize(*a, **k))
    before = _snapshot(files)
    status = run_cli(main, argv(files))
    captured = capsys.readouterr()
    assert status == 2, (name, captured.err[-2000:])
    # One message: an `error:` line, possibly followed by its indented list of problems.
    assert captured.err.count("error: ") == 1, captured.err[-2000:]
    message = captured.err[captured.err.index("error: "):]
    assert expected in message, message
    assert "Traceback" not in captured.err
    assert not initializations, "refused only after the process groups were started"
    after = _snapshot(files)
    assert {p: d for p, d in after.items() if p in before} == before, "a given file changed"


UNDER_TORCHRUN = ["unknown-placement", "missing-data"]  # a flag, and a check in the trainer


@pytest.mark.parametrize("name", UNDER_TORCHRUN)
def test_under_torchrun_rank_0_reports_once_and_torchrun_names_it_as_the_root_cause(
        files, name, torchrun):
    """torchrun exits 1 whenever a rank fails; the ranks exit 2 and its summary shows our
    message (from the elastic error file) where it would show a traceback. Rank 0 prints it
    (every rank would repeat it) unless another rank refused first and torchrun stopped rank 0
    before it could: a refusal at parse time takes a fraction of a second, so under load that
    race is real, and the summary is then where the message is read."""
    entry = next(e for e in CATALOGUE if e[0] == name)
    _, command, argv, expected = entry
    assert command == "train"
    before = _snapshot(files)
    result = torchrun("-m", "spannorm_megatron.train", *argv(files), timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    printed = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(printed) <= 1, result.stderr[-3000:]
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    message = [line for line in root_cause.splitlines() if "traceback : error: " in line]
    assert len(message) == 1 and expected in message[0], result.stderr[-3000:]
    assert printed in ([], [message[0].split("traceback : ", 1)[1]])
    # The rank that refused first exits 2; torchrun may stop the other before it does.
    assert "exitcode  : 2 " in result.stderr
    assert {p: d for p, d in _snapshot(files).items() if p in before} == before


def test_a_write_the_storage_refuses_ends_any_command_with_status_1_and_one_message(
        files, capsys):
    """Not bad input and not a bug: a file size limit (as a full disk or a quota) refuses
    preprocess_data's output in mid-write. The command ends with one message and status 1, as
    a refused checkpoint save does, and leaves no half-written output."""
    import resource

    argv = ["--input", str(files / "data.jsonl"), "--output-prefix", str(files / "limited"),
            "--tokenizer-model", str(files / "tok.model"), "--workers", "1"]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        status = run_cli(tool("preprocess_data"), argv)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    err = capsys.readouterr().err
    assert status == 1, err[-2000:]
    assert err.count("error: ") == 1 and "File too large" in err and "Traceback" not in err
    assert not [p for p in os.listdir(files) if p.startswith("limited")]


def test_a_stray_rank_variable_without_a_job_does_not_silence_the_message(files, capsys,
                                                                         monkeypatch):
    """RANK=1 left in a shell, without torchrun: the refusal is still printed (rank 0 prints for
    a multi-rank job only because every rank would repeat it)."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status = run_cli(train_main, T(files, "--norm-placement", "sandwich"))
    err = capsys.readouterr().err
    assert status == 2 and err.count("error: ") == 1, err[-2000:]


@pytest.mark.parametrize("allocate", [
    lambda: torch.nn.Linear(2 ** 30, 2 ** 30),  # torch's CPU allocator: 2**62 bytes
    lambda: bytearray(2 ** 62),                 # Python's own MemoryError
], ids=["torch", "python"])
def test_an_allocation_the_machine_refuses_ends_with_one_message_and_status_1(allocate, capsys):
    """Sizes the memory floor counts are refused before anything is built (the catalogue's
    "model-beyond-memory"); what it cannot foresee (activations, the parts it leaves out) still
    meets the allocator, which refuses a size beyond any address space at once. Any command then
    ends with one out-of-memory message and status 1, not chained tracebacks."""
    status = run_cli(lambda argv: allocate(), [])
    err = capsys.readouterr().err
    assert status == 1, err[-2000:]
    assert err.count("error: out of memory") == 1 and "Traceback" not in err, err[-2000:]
