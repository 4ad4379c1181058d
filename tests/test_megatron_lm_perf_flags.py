"""Megatron-LM's precision, fusion and performance flags act as they do there.

Each flag is implemented, accepted as a no-op where it selects what this stack always does
(said once, in the job's notices), or refused before anything starts where this machine lacks what
it needs. The in-process tests check the flags' path into megatron-core's own configs and the
refusals; one two-rank launch trains in fp16 with dynamic loss scaling (the logged scale
replayed through megatron-core's DynamicGradScaler, and saved in the checkpoint), profiles with
torch.profiler, logs Megatron-LM's throughput field and a decoupled learning rate; one plain
process resumes it and reports what it finds inside the Trainer (process-group timeout, manual
garbage collection, the restored loss scaler, the TransformerConfig of the built model).
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import importlib.util
import json
import re

import pytest
import torch

import launch
from _training import SMALL, run_train
from spannorm_megatron.training.arguments import parse_args

# The runs start from SMALL, which spells out the model flags they rely on (RMSNorm, rope,
# SwiGLU, no biases, untied embeddings, no dropout, transformer-impl auto).
WANDB = importlib.util.find_spec("wandb") is not None


def _args(corpus, *flags):
    data, tokenizer = corpus
    return [*SMALL, "--data-path", data, "--tokenizer-model", tokenizer, *flags]


# ---------------------------------------------------------------------------- configs
def test_precision_flags_reach_megatron_core(corpus):
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.enums import AttnBackend

    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.model import transformer_config
    from spannorm_megatron.model.fusions import runnable_fusions

    args = parse_args(_args(corpus, "--fp16", "--loss-scale", "256", "--hysteresis", "3",
                            "--attention-softmax-in-fp32", "--attention-backend", "local"))
    performance = args.performance
    model = dataclasses.replace(args.model, vocab_size=512)
    tconfig = transformer_config(model, **performance.transformer_kwargs(),
                                 **runnable_fusions(model, performance))
    assert (tconfig.fp16, tconfig.bf16, tconfig.params_dtype) == (True, False, torch.float16)
    assert tconfig.attention_softmax_in_fp32 is True
    assert tconfig.attention_backend == AttnBackend.local
    optimizer = OptimizerConfig(lr=1e-3, **performance.optimizer_kwargs())
    assert (optimizer.fp16, optimizer.loss_scale, optimizer.hysteresis) == (True, 256.0, 3)
    assert performance.dynamic_loss_scaling is False  # a constant scale

    # Megatron-LM's softmax default is the input's precision (megatron-core's own is fp32).
    plain = parse_args(_args(corpus, "--bf16")).performance
    assert transformer_config(model, **plain.transformer_kwargs(),
                              **runnable_fusions(model, plain)) \
        .attention_softmax_in_fp32 is False

    # Gradient buffers: Megatron-LM's rule between --bf16, --grad-reduce-in-bf16 and
    # --accumulate-allreduce-grads-in-fp32.
    def reduces_in_fp32(*flags):
        perf = parse_args(_args(corpus, *flags)).performance
        return DistributedDataParallelConfig(**perf.ddp_kwargs(ParallelConfig())) \
            .grad_reduce_in_fp32

    assert reduces_in_fp32("--bf16") is True
    assert reduces_in_fp32("--bf16", "--grad-reduce-in-bf16") is False
    assert reduces_in_fp32("--fp16") is False
    assert reduces_in_fp32("--fp16", "--accumulate-allreduce-grads-in-fp32") is True


def test_fusions_are_allowed_by_default_and_used_where_their_kernel_runs(corpus, monkeypatch):
    """Megatron-LM's fusion switches default to on; a `--no-*-fusion` flag forbids one. Here (no
    GPU) none can run; on a GPU (as a GPU node answers) the jit-compiled ones do, unless
    forbidden, while masked softmax, gradient accumulation and RoPE still need their CUDA
    extensions or Transformer Engine."""
    from spannorm_megatron.model import fusions, transformer_config
    from spannorm_megatron.model.specs import transformer_engine_available

    def resolved(*flags):
        args = parse_args(_args(corpus, *flags))
        model = dataclasses.replace(args.model, vocab_size=512)
        tconfig = transformer_config(model, **args.performance.transformer_kwargs(),
                                     **fusions.runnable_fusions(model, args.performance))
        return {field: getattr(tconfig, field) for field in fusions.FUSION_FIELDS}

    defaults = parse_args(_args(corpus)).performance
    assert all(getattr(defaults, name) for name in (
        "masked_softmax_fusion", "bias_gelu_fusion", "bias_swiglu_fusion", "bias_dropout_fusion",
        "apply_rope_fusion", "gradient_accumulation_fusion"))
    assert defaults.cross_entropy_loss_fusion is False
    assert not any(resolved("--cross-entropy-loss-fusion").values())  # CPU: nothing runs

    monkeypatch.setattr(fusions, "has_accelerator", lambda: True)
    gpu = resolved()
    assert gpu["bias_activation_fusion"] and gpu["bias_dropout_fusion"]
    assert gpu["masked_softmax_fusion"] is fusions._importable(
        "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")
    assert gpu["gradient_accumulation_fusion"] is fusions._importable(
        "fused_weight_gradient_mlp_cuda")
    assert gpu["apply_rope_fusion"] is transformer_engine_available()
    assert gpu["cross_entropy_loss_fusion"] is False  # off unless asked for
    assert resolved("--no-bias-dropout-fusion")["bias_dropout_fusion"] is False
    # The model is SwiGLU: the SwiGLU switch decides, the GeLU one does not.
    assert resolved("--no-bias-swiglu-fusion")["bias_activation_fusion"] is False
    assert resolved("--no-bias-gelu-fusion")["bias_activation_fusion"] is True
    assert resolved("--cross-entropy-loss-fusion")["cross_entropy_loss_fusion"] is True
    assert resolved("--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te")[
        "cross_entropy_loss_fusion"] is transformer_engine_available()
    for flag, field in (("--no-masked-softmax-fusion", "masked_softmax_fusion"),
                        ("--no-rope-fusion", "apply_rope_fusion"),
                        ("--no-gradient-accumulation-fusion", "gradient_accumulation_fusion")):
        assert resolved(flag)[field] is False


NOTICES = [
    (["--use-mcore-models"], "--use-mcore-models: megatron-core models are the only kind"),
    (["--initial-loss-scale", "1024", "--hysteresis", "4"],
     "--initial-loss-scale, --hysteresis: dynamic loss scaling only; this run has none (no "
     "--fp16)"),
    (["--fp16", "--loss-scale", "128", "--min-loss-scale", "2"],
     "--min-loss-scale: dynamic loss scaling only; this run has none (--loss-scale sets"),
    (["--attention-softmax-in-fp32"], "--attention-softmax-in-fp32: an fp32 run"),
    (["--accumulate-allreduce-grads-in-fp32"], "--accumulate-allreduce-grads-in-fp32: an fp32"),
    (["--manual-gc-interval", "5"], "act only with --manual-gc"),
    (["--use-pytorch-profiler"], "--use-pytorch-profiler without --profile: nothing is profiled"),
    (["--empty-unused-memory-level", "2"], "--empty-unused-memory-level 2: no CUDA caching "
     "allocator on CPU"),
]


@pytest.mark.parametrize("flags,notice", NOTICES, ids=[n[0][0] for n in NOTICES])
def test_flags_that_change_nothing_here_say_so_once(corpus, flags, notice):
    notices = parse_args(_args(corpus, *flags)).notices
    assert sum(notice in line for line in notices) == 1, notices
    assert not any(notice in line for line in parse_args(_args(corpus)).notices)


def test_wandb_flags_without_a_project_change_nothing_and_say_so(corpus):
    from spannorm_megatron.metrics.wandb import check_wandb

    args = parse_args(_args(corpus, "--wandb-exp-name", "e", "--wandb-entity", "team"))
    check_wandb(args)
    assert args.notices[-1] == ("--wandb-exp-name, --wandb-entity without --wandb-project: "
                                "nothing is logged to W&B.")


REFUSALS = [
    (["--fp16", "--bf16"], "--fp16 and --bf16 contradict each other"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 applies to --bf16 runs"),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"],
     "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 contradict"),
    (["--loss-scale", "64"], "--loss-scale scales the loss for megatron-core's mixed-precision"),
    (["--attention-backend", "flash"], "--attention-backend flash picks one of Transformer "
     "Engine's attention kernels"),
    (["--attention-backend", "fused", "--transformer-impl", "local"],
     "--attention-backend fused picks one of Transformer Engine's attention kernels, and this "
     "run uses megatron-core's local layers"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2 splits every sequence over 2 "
     "ranks, which only Transformer Engine's attention can compute"),
    (["--profile"], "--profile without --use-pytorch-profiler drives CUDA's profiler API"),
    (["--profile", "--use-pytorch-profiler"], "writes its trace into --tensorboard-dir"),
    (["--profile", "--use-pytorch-profiler", "--tensorboard-dir", "{tmp}/tb", "--profile-ranks",
      "0", "3"], "--profile-ranks [3]: this run has ranks 0 to 0 only"),
    (["--profile", "--profile-step-start", "4", "--profile-step-end", "4"],
     "--profile-step-end 4 must be after --profile-step-start 4"),
    (["--decoupled-min-lr", "1e-4"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--decoupled-lr", "1e-4", "--min-lr", "5e-4"], "give a --decoupled-min-lr at most "
     "--decoupled-lr"),
    (["--empty-unused-memory-level", "3"], "--empty-unused-memory-level: '3' is not one of "
     "[0, 1, 2]"),
    (["--manual-gc-interval", "-1"], "must be >= 0"),
]
if not WANDB:
    REFUSALS.append((["--wandb-project", "p", "--wandb-exp-name", "e"],
                     "--wandb-project needs the wandb package"))
if torch.cuda.is_available():  # refusals of CPU machines only
    REFUSALS = [r for r in REFUSALS if "profiler API" not in r[1] and "Transformer Engine" not
                in r[1]]


@pytest.mark.parametrize("flags,message", REFUSALS, ids=[" ".join(r[0])[:40] for r in REFUSALS])
def test_what_cannot_act_here_is_refused_before_anything_starts(corpus, tmp_path, capsys,
                                                                monkeypatch, flags, message):
    from spannorm_megatron.train import main as train_main

    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    if "--context-parallel-size" in flags:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as launched on 2 ranks: the layout tiles
    assert train_main(_args(corpus, "--train-iters", "3", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------- hooks
@pytest.mark.slow
def test_manual_gc_collects_where_megatron_lm_does(tmp_path):
    """--manual-gc: the automatic collector is off from the start; full collections at the
    start, every --manual-gc-interval steps and before evaluations, the youngest generation
    after them; the process gets its collector back at the end."""
    from spannorm_megatron.training.hooks import RunHooks
    from spannorm_megatron.config.hooks import RunHooksConfig

    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    assert gc.isenabled()
    hooks = RunHooks(RunHooksConfig(manual_gc=True, manual_gc_interval=3), None)
    gc.callbacks.append(count)
    try:
        hooks.start()
        assert not gc.isenabled() and collections == [2]
        for iteration in range(1, 8):
            hooks.before_step(iteration - 1)
            hooks.after_step(iteration)
        assert collections == [2, 2, 2]  # after steps 3 and 6
        hooks.before_evaluation()
        hooks.after_evaluation()
        assert collections == [2, 2, 2, 2, 0]
        hooks.close()
        assert gc.isenabled()
        quiet = RunHooks(RunHooksConfig(manual_gc=True, manual_gc_eval=False), None)
        quiet.start()
        quiet.before_evaluation()
        quiet.after_evaluation()
        quiet.close()
        assert collections == [2, 2, 2, 2, 0, 2]
    finally:
        gc.callbacks.remove(count)
        gc.enable()


# ---------------------------------------------------------------------------- runs
RESUME_PROBE = """
import gc, json, sys, torch
from megatron.core import parallel_state as ps
from spannorm_megatron.checkpoint.state import inner_optimizers
from spannorm_megatron.training.arguments import parse_args
from spannorm_megatron.training.trainer import Trainer

found = {"collections": [], "gc_in_steps": []}
with Trainer(parse_args(sys.argv[1:])) as trainer:
    trainer.setup()
    found["timeouts_s"] = [g._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                           for g in (torch.distributed.distributed_c10d._get_default_group(),
                                     ps.get_data_parallel_group(),
                                     ps.get_tensor_model_parallel_group())]
    (inner,) = inner_optimizers(trainer.optimizer)
    found["optimizer"] = type(inner).__name__
    found["scaler"] = {k: float(v) for k, v in inner.grad_scaler.state_dict().items()}
    found["param_dtypes"] = sorted({str(p.dtype) for p in trainer.model[0].parameters()})
    found["main_dtypes"] = sorted({str(p.dtype) for g in inner.fp32_from_float16_groups
                                   for p in g})
    config = trainer.model[0].config
    found["config"] = {k: str(getattr(config, k)) for k in (
        "fp16", "attention_softmax_in_fp32", "attention_backend", "bias_dropout_fusion",
        "masked_softmax_fusion", "apply_rope_fusion")}
    core = trainer.model[0].module.decoder.layers[0].self_attention.core_attention
    found["softmax_in_fp32"] = core.scale_mask_softmax.softmax_in_fp32
    gc.callbacks.append(lambda phase, info: phase == "start"
                        and found["collections"].append(info["generation"]))
    step = trainer.train_step
    def train_step():
        found["gc_in_steps"].append(gc.isenabled())
        return step()
    trainer.train_step = train_step
    trainer.train()
found["gc_after"] = gc.isenabled()
print("PROBE " + json.dumps(found))
"""


def _log_lines(stdout: str) -> dict:
    """iteration -> the fields of its log line."""
    lines = {}
    for line in stdout.splitlines():
        match = re.search(r" iteration\s+(\d+)/", line)
        if match and "| lm loss:" in line:
            fields = dict(part.strip().rsplit(": ", 1) for part in line.split("|")[1:-1])
            lines[int(match.group(1))] = fields
    return lines


def _replay_loss_scale(lines: dict, start: dict, window: int, hysteresis: int) -> dict:
    """The scales megatron-core's DynamicGradScaler gives after each logged step, fed with the
    overflows the log shows (a step whose skip count went up)."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    from spannorm_megatron.process import enable_cpu_runtime

    enable_cpu_runtime()  # the scaler keeps its state on the device megatron-core assumes
    scaler = DynamicGradScaler(initial_scale=start["scale"], min_scale=1.0, growth_factor=2.0,
                               backoff_factor=0.5, growth_interval=window, hysteresis=hysteresis)
    if "growth_tracker" in start:
        scaler.load_state_dict({"scale": torch.tensor([start["scale"]]),
                                "growth_tracker": int(start["growth_tracker"]),
                                "hysteresis_tracker": int(start["hysteresis_tracker"])})
    scales, skipped = {}, start.get("skipped", 0)
    for iteration in sorted(lines):
        now = int(lines[iteration]["number of skipped iterations"])
        scaler.update(torch.tensor(float(now > skipped)))
        skipped = now
        scales[iteration] = float(scaler.scale)
    return scales


def test_fp16_run_scales_the_loss_profiles_and_resumes(corpus, tmp_path, torchrun):
    data, tokenizer = corpus
    save, tb = tmp_path / "ckpt", tmp_path / "tb"
    fp16 = ["--fp16", "--initial-loss-scale", "65536", "--loss-scale-window", "3",
            "--hysteresis", "1", "--decoupled-lr", "2e-3", "--attention-softmax-in-fp32",
            "--attention-backend", "local", "--no-bias-dropout-fusion"]
    first = run_train(
        *_args(corpus, *fp16, "--train-iters", "8", "--save", str(save), "--tensorboard-dir",
               str(tb), "--profile", "--use-pytorch-profiler", "--profile-step-start", "2",
               "--profile-step-end", "4", "--log-throughput", "--use-mcore-models"))
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    lines = _log_lines(first.stdout)
    assert sorted(lines) == list(range(1, 9))
    assert all("throughput per GPU (TFLOP/s/GPU)" in fields for fields in lines.values())
    assert first.stdout.count("> --use-mcore-models: megatron-core models are the only kind") == 1
    logged = {i: float(fields["loss scale"]) for i, fields in lines.items()}
    assert logged == _replay_loss_scale(lines, {"scale": 65536.0}, window=3, hysteresis=1)
    assert logged[3] == 131072.0  # three clean steps doubled it
    losses = [float(f["lm loss"]) for f in lines.values()]
    assert all(l == l for l in losses) and losses[-1] < losses[0] - 0.05, losses

    # The checkpoint holds the scaler's state and the decoupled embedding/output group.
    common = torch.load(save / "iter_0000008" / "common.pt", weights_only=False)["optimizer"]
    assert float(common["grad_scaler"]["scale"]) == logged[8]
    groups = common["optimizer"]["param_groups"]
    decoupled = [g for g in groups if g["max_lr"] == 2e-3]
    assert decoupled and all(g["is_decoupled_lr"] for g in decoupled)
    assert all(g["lr"] == pytest.approx(2 * groups[0]["lr"]) for g in decoupled)
    assert groups[0]["max_lr"] == 1e-3

    # torch.profiler's trace of steps 2 and 3 (Megatron-LM's window), from rank 0 only.
    (trace,) = glob.glob(str(tb / "*.pt.trace.json"))
    names = {event.get("name") for event in json.load(open(trace))["traceEvents"]}
    assert {n for n in names if str(n).startswith("ProfilerStep#")} == \
        {"ProfilerStep#2", "ProfilerStep#3"}
    assert "aten::mm" in names or "aten::addmm" in names

    # One process resumes (the checkpoint reshards from DP2) and reports from inside.
    probe = launch.python(
        "-c", RESUME_PROBE, *_args(
            corpus, *fp16, "--train-iters", "12", "--load", str(save),
            "--override-opt-param-scheduler", "--eval-interval", "2", "--eval-iters", "1",
            "--distributed-timeout-minutes", "7", "--manual-gc", "--manual-gc-interval", "2"),
        timeout=600)
    assert probe.returncode == 0, probe.stdout[-2000:] + probe.stderr[-3000:]
    found = json.loads(probe.stdout.split("PROBE ", 1)[1])
    assert found["timeouts_s"] == [420.0, 420.0, 420.0]
    assert found["optimizer"] == "Float16OptimizerWithFloat16Params"
    assert found["param_dtypes"] == ["torch.float16"] and found["main_dtypes"] == ["torch.float32"]
    assert found["scaler"] == {k: float(v) for k, v in common["grad_scaler"].items()}
    assert found["config"] == {"fp16": "True", "attention_softmax_in_fp32": "True",
                               "attention_backend": "AttnBackend.local",
                               "bias_dropout_fusion": "False", "masked_softmax_fusion": "False",
                               "apply_rope_fusion": "False"}
    assert found["softmax_in_fp32"] is True
    resumed = _log_lines(probe.stdout)
    assert sorted(resumed) == [9, 10, 11, 12]
    assert {i: float(f["loss scale"]) for i, f in resumed.items()} == _replay_loss_scale(
        resumed, found["scaler"], window=3, hysteresis=1)
    # --manual-gc: the collector is off in every step; full collections at the start, after
    # steps 10 and 12 and before the evaluations at 10 and 12, the youngest after those.
    assert found["gc_in_steps"] == [False] * 4 and found["gc_after"] is True
    assert found["collections"] == [2, 2, 2, 0, 2, 2, 0], found["collections"]


@pytest.mark.slow
@pytest.mark.skipif(not WANDB, reason="the wandb package is not installed (its refusal is "
                    "tested instead)")
def test_wandb_gets_what_tensorboard_gets(corpus, tmp_path):
    """W&B offline: the run's records hold Megatron-LM's scalar names and the run's config."""
    result = run_train(*_args(corpus, "--train-iters", "3", "--wandb-project", "perf-flags",
                              "--wandb-exp-name", "fp32-run", "--wandb-save-dir",
                              str(tmp_path / "wandb"), "--tensorboard-dir", str(tmp_path / "tb")),
                       nproc=1, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    (records,) = glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    content = open(records, "rb").read()
    for name in (b"lm loss", b"learning-rate", b"loss-scale", b"grad-norm", b"batch-size",
                 b"lm loss validation", b"samples vs steps", b"perf-flags", b"fp32-run",
                 b"num_layers"):
        assert name in content, name
    assert b" vs samples" not in content  # TensorBoard's twins, on another x axis
