"""Megatron-LM's own example scripts run here: the flag sets of its GPT-3 175B, Llama-3 8B and
Mixtral 8x7B training scripts and of its Qwen3-30B-A3B and DeepSeek-V2-Lite model configurations
(examples/post_training/modelopt/conf) at core_v0.16.1.

The command lines are written here, not copied: every flag of each script appears with the
script's value, except sizes (scaled down to a CPU, the --split weights to this test's few
hundred documents), paths (this test's files), and
- the flags that need what a CPU lacks (FP8, Transformer Engine's grouped GEMM and attention
  backends, CUDA's profiler, Weights & Biases without its package): each is checked to be refused
  by name, before anything starts (`CPU_REFUSALS`), and dropped from the run;
- where Megatron-LM core_v0.16.1 itself refuses the script as written, as it does the GPT-3
  script (--rampup-batch-size with --train-iters: `assert args.rampup_batch_size is None` in
  validate_args; no --tokenizer-type, which its build_tokenizer requires): we refuse it the same
  way, and run the script in the form Megatron-LM accepts (--train-samples, the tokenizer type
  its --vocab-file/--merge-file mean).
Each then trains a few steps in this process (`pretrain`, one rank, CPU) and must log finite
losses; those with --save leave a checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import os
from contextlib import redirect_stdout

import pytest

from _tokenizer_files import corpus_texts, make_tokenizer_files, run_tool, tokenizer_flags
from spannorm_megatron.errors import UserError
from spannorm_megatron.train import main as train_main
from spannorm_megatron.train import pretrain


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tokenizer files of each type and the embedded corpus preprocessed with each."""
    root = tmp_path_factory.mktemp("megatron_lm_scripts")
    files = make_tokenizer_files(root)
    # Documents of 120 characters, so that the scripts' splits (949,50,1: one in a thousand
    # documents for testing) leave every split some.
    text = "".join(corpus_texts(files["jsonl"]))
    documents = root / "documents.jsonl"
    with open(documents, "w", encoding="utf-8") as f:
        for start in range(0, len(text), 120):
            f.write(json.dumps({"text": text[start:start + 120]}) + "\n")
    prefixes = {}
    for kind in ("GPT2BPETokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer"):
        status, _, err = run_tool("preprocess_data", "--input", documents,
                                  "--output-prefix", root / kind, "--tokenizer-type", kind,
                                  *tokenizer_flags(kind, files), "--append-eod", "--workers", "1")
        assert status == 0, err
        prefixes[kind] = str(root / f"{kind}_text_document")
    return dict(files, prefixes=prefixes, root=root)


def gpt3_175b(d, out):
    model = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "64", "--max-position-embeddings", "64",
             "--attention-backend", "auto"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "4",
                "--rampup-batch-size", "2", "2", "8", "--train-samples", "40",
                "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16",
                "--lr", "6.0e-5", "--lr-decay-style", "cosine", "--min-lr", "6.0e-6",
                "--lr-warmup-fraction", ".001", "--lr-decay-samples", "36"]
    parallel = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1"]
    data = ["--data-path", d["prefixes"]["GPT2BPETokenizer"], "--vocab-file", d["vocab"],
            "--merge-file", d["merges"], "--split", "949,50,1",
            "--tokenizer-type", "GPT2BPETokenizer"]
    logging = ["--log-interval", "1", "--save-interval", "5", "--eval-interval", "5",
               "--save", str(out / "ckpt"), "--load", str(out / "ckpt"), "--eval-iters", "1",
               "--tensorboard-dir", str(out / "tb")]
    return [*model, *training, *parallel, *data, *logging, "--transformer-impl", "local"]


def llama3_8b(d, out):
    model = ["--use-mcore-models", "--num-layers", "2", "--hidden-size", "64",
             "--ffn-hidden-size", "224", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--kv-channels", "32", "--seq-length", "64",
             "--max-position-embeddings", "64", "--position-embedding-type", "rope",
             "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--swiglu", "--init-method-std", "0.0134",
             "--apply-layernorm-1p", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear", "--transformer-impl", "local"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "16",
                "--lr-decay-samples", "12", "--lr-warmup-samples", "4", "--lr", "0.00015",
                "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr",
                "4.5e-5", "--lr-decay-style", "cosine", "--clip-grad", "1.0",
                "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
                "--bf16", "--grad-reduce-in-bf16", "--cross-entropy-loss-fusion",
                "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level", "1",
                "--exit-duration-in-mins", "235"]
    parallel = ["--tensor-model-parallel-size", "1", "--context-parallel-size", "1",
                "--pipeline-model-parallel-size", "1", "--sequence-parallel",
                "--use-distributed-optimizer", "--overlap-grad-reduce",
                "--overlap-param-gather"]
    data = ["--data-path", d["prefixes"]["HuggingFaceTokenizer"],
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", d["hf"],
            "--data-cache-path", str(out / "cache"), "--no-create-attention-mask-in-dataloader",
            "--no-mmap-bin-files", "--num-workers", "1", "--split", "99,1,0"]
    logging = ["--log-interval", "1", "--eval-iters", "1", "--eval-interval", "2",
               "--save-interval", "4", "--log-throughput", "--use-pytorch-profiler", "--profile",
               "--profile-step-start", "2", "--profile-step-end", "3", "--ckpt-format",
               "torch_dist", "--distributed-timeout-minutes", "60", "--save", str(out / "ckpt"),
               "--load", str(out / "ckpt"), "--tensorboard-dir", str(out / "tb")]
    return [*model, *training, *parallel, *data, *logging]


def llama3_8b_mock_data(d, out):
    """The script's other data branch: no data path, megatron-core's mock data and the
    NullTokenizer."""
    argv = llama3_8b(d, out)
    start = argv.index("--data-path")
    end = argv.index("--data-cache-path")
    argv[start:end] = ["--mock-data", "--tokenizer-type", "NullTokenizer",
                       "--vocab-size", "1000"]
    return argv


def mixtral_8x7b(d, out):
    model = ["--use-mcore-models", "--disable-bias-linear", "--seq-length", "64",
             "--max-position-embeddings", "64", "--num-layers", "2", "--hidden-size", "64",
             "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--init-method-std", "0.01",
             "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
             "--position-embedding-type", "rope", "--swiglu",
             "--untie-embeddings-and-output-weights", "--group-query-attention",
             "--num-query-groups", "2", "--no-masked-softmax-fusion", "--no-position-embedding",
             "--rotary-base", "1000000", "--transformer-impl", "local"]
    moe = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type",
           "aux_loss", "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type",
           "alltoall"]
    data = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", d["sp_model"],
            "--data-path", d["prefixes"]["Llama2Tokenizer"], "--split", "98,1,1"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4",
                "--train-iters", "4", "--lr-decay-iters", "4", "--lr-decay-style", "cosine",
                "--min-lr", "1.0e-5", "--weight-decay", "0.1", "--lr-warmup-iters", "1",
                "--clip-grad", "1.0", "--bf16"]
    parallel = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
                "--expert-model-parallel-size", "1", "--use-distributed-optimizer",
                "--sequence-parallel", "--overlap-grad-reduce", "--overlap-param-gather"]
    logging = ["--log-interval", "1", "--save-interval", "4", "--eval-interval", "4",
               "--eval-iters", "1", "--save", str(out / "ckpt"), "--load", str(out / "ckpt"),
               "--no-load-optim", "--no-load-rng", "--tensorboard-dir", str(out / "tb")]
    return [*model, *moe, *data, *training, *parallel, *logging]


def _modelopt_run(d):
    """The modelopt configurations hold a model only; the run's own flags come from the script
    that sources them."""
    return ["--tokenizer-model", d["hf"], "--data-path", d["prefixes"]["HuggingFaceTokenizer"],
            "--split", "98,2,0", "--lr", "1e-4", "--train-iters", "3",
            "--global-batch-size", "2", "--log-interval", "1", "--eval-iters", "1",
            "--transformer-impl", "local"]


def qwen3_30b_a3b(d, out):
    model = ["--save-interval", "100000", "--micro-batch-size", "1", "--bf16",
             "--no-masked-softmax-fusion", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
             "--no-rope-fusion", "--normalization", "RMSNorm", "--swiglu", "--num-layers", "2",
             "--hidden-size", "64", "--ffn-hidden-size", "192", "--num-attention-heads", "4",
             "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "32",
             "--qk-layernorm", "--seq-length", "64", "--max-position-embeddings", "128",
             "--make-vocab-size-divisible-by", "1187", "--rotary-base", "1000000",
             "--rotary-percent", "1.0", "--no-bias-swiglu-fusion", "--num-experts", "8",
             "--moe-ffn-hidden-size", "32", "--moe-router-topk", "4", "--moe-router-dtype",
             "fp32", "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff",
             "1e-3", "--moe-token-dispatcher-type", "alltoall", "--sequence-parallel",
             "--tokenizer-type", "HuggingFaceTokenizer", "--use-mcore-models"]
    return [*model, *_modelopt_run(d)]


def deepseek_v2_lite(d, out):
    model = ["--save-interval", "100000", "--micro-batch-size", "1", "--bf16",
             "--no-masked-softmax-fusion", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
             "--no-rope-fusion", "--normalization", "RMSNorm", "--norm-epsilon", "1e-6",
             "--swiglu", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "160",
             "--num-attention-heads", "4", "--kv-channels", "16", "--multi-latent-attention",
             "--kv-lora-rank", "32", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
             "--v-head-dim", "16", "--qk-layernorm", "--rotary-scaling-factor", "40",
             "--mscale", "0.707", "--mscale-all-dim", "0.707", "--seq-length", "64",
             "--max-position-embeddings", "64", "--make-vocab-size-divisible-by", "3200",
             "--rotary-base", "10000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--attention-softmax-in-fp32", "--num-experts", "8",
             "--moe-layer-freq", "([0]+[1]*1)", "--moe-ffn-hidden-size", "32",
             "--moe-shared-expert-intermediate-size", "64", "--moe-router-topk", "2",
             "--moe-router-topk-scaling-factor", "1.0", "--moe-router-pre-softmax",
             "--moe-router-score-function", "softmax", "--moe-router-load-balancing-type",
             "seq_aux_loss", "--moe-aux-loss-coeff", "1e-3", "--moe-token-dispatcher-type",
             "alltoall", "--moe-token-drop-policy", "probs", "--sequence-parallel",
             "--tokenizer-type", "HuggingFaceTokenizer", "--use-mcore-models"]
    return [*model, *_modelopt_run(d)]


SCRIPTS = {"gpt3_175b": gpt3_175b, "llama3_8b": llama3_8b,
           "llama3_8b_mock_data": llama3_8b_mock_data, "mixtral_8x7b": mixtral_8x7b,
           "qwen3_30b_a3b": qwen3_30b_a3b, "deepseek_v2_lite": deepseek_v2_lite}

# The scripts' flags that need what this CPU lacks: (script, flags added to its command line,
# words the refusal must contain).
CPU_REFUSALS = [
    ("llama3_8b", ["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
                   "--fp8-amax-compute-algo", "max", "--fp8-param-gather"], "--fp8-format"),
    ("llama3_8b", ["--attention-backend", "fused"], "--attention-backend fused"),
    ("llama3_8b", ["--no-use-pytorch-profiler"], "--profile"),
    ("mixtral_8x7b", ["--moe-grouped-gemm"], "--moe-grouped-gemm"),
    ("deepseek_v2_lite", ["--moe-grouped-gemm"], "--moe-grouped-gemm"),
    ("mixtral_8x7b", ["--wandb-project", "Mixtral", "--wandb-exp-name", "Mixtral_8x7B"],
     "--wandb-project"),
]


def _train(argv):
    out = io.StringIO()
    with redirect_stdout(out):
        history = pretrain(argv)
    return history, out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_megatron_lm_script_trains(data, name, tmp_path):
    argv = SCRIPTS[name](data, tmp_path)
    history, log = _train(argv)
    losses = history["train_loss"]
    assert losses and all(math.isfinite(x) for x in losses), log[-3000:]
    if "--save" in argv:
        assert os.path.isfile(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt")
    if "--use-mcore-models" in argv:
        assert "--use-mcore-models" in log  # accepted as a no-op, and said so once
        assert log.count("--use-mcore-models") == 1


def test_gpt3_script_as_written_is_refused_as_megatron_lm_refuses_it(data, tmp_path, capsys):
    argv = gpt3_175b(data, tmp_path)
    i = argv.index("--train-samples")
    argv[i:i + 2] = ["--train-iters", "10"]
    j = argv.index("--lr-decay-samples")
    argv[j:j + 2] = ["--lr-decay-iters", "8"]
    assert train_main(argv) == 2
    assert "--rampup-batch-size cannot be used with --train-iters" in capsys.readouterr().err
    k = argv.index("--tokenizer-type")
    del argv[k:k + 2]
    with pytest.raises(UserError, match="--tokenizer-type"):
        from spannorm_megatron.training.arguments import parse_args
        parse_args(argv)


@pytest.mark.parametrize("name,extra,words", CPU_REFUSALS,
                         ids=[f"{n}:{e[0]}" for n, e, _ in CPU_REFUSALS])
def test_what_a_cpu_lacks_is_refused_by_name_before_anything_starts(data, tmp_path, capsys,
                                                                     name, extra, words):
    argv = [*SCRIPTS[name](data, tmp_path), *extra]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "ckpt").exists()
