"""The GPU path: training on one GPU with the local layers, Transformer Engine layers against
the local ones, and FP8 training.

The first group needs a GPU only; the Transformer Engine group needs TE as well. Both are
skipped without them, CI included. `SPANNORM_EXPECT_TE=1` (set by tools/gpu/check.sh's TE
stage) turns a missing or broken Transformer Engine into a failure instead of a skip, so a
failed TE install cannot pass as "skipped".
"""

import os
from dataclasses import replace

import pytest
import torch

from _training import RECIPE, logged_losses, run_train
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.model import build_gpt_model, transformer_config
from spannorm_megatron.model.specs import transformer_engine_available
from spannorm_megatron.placements import PLACEMENTS
from spannorm_megatron.runtime import has_accelerator

pytestmark = pytest.mark.skipif(not has_accelerator(), reason="needs a GPU (docs/gpu.md)")
EXPECT_TE = os.environ.get("SPANNORM_EXPECT_TE") == "1"
needs_te = pytest.mark.skipif(not (transformer_engine_available() or EXPECT_TE),
                              reason="needs Transformer Engine (docs/gpu.md)")

BF16 = dict(bf16=True, params_dtype=torch.bfloat16)
RELATIVE_RMS_TOLERANCE = 2e-2  # bf16 rounding through 4 layers, different kernels


def _without_extra_state(sharded):
    """The local flavour has no Transformer Engine extra state (FP8 metadata) to load."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {key: value for key, value in sharded.items()
            if not (isinstance(value, ShardedObject) and "_extra_state" in key)}


@pytest.mark.slow
def test_local_bf16_training_evaluates_saves_and_resumes(corpus, tmp_path):
    """The loop on one GPU without Transformer Engine: bf16 local layers, a skipped non-finite
    step, evaluation mid-run and at the end, a checkpoint, and a resume from it."""
    data, tokenizer = corpus
    flags = [*RECIPE, "--data-path", data, "--tokenizer-model", tokenizer,
             "--norm-placement", "spannorm", "--max-position-embeddings", "128",
             "--ffn-hidden-size", "1024", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
             "--seq-length", "128", "--micro-batch-size", "8", "--global-batch-size", "16",
             "--lr", "1e-3", "--lr-warmup-iters", "5", "--log-interval", "10",
             "--eval-interval", "25", "--eval-iters", "2", "--split", "90,10,0",
             "--transformer-impl", "local", "--bf16", "--save", str(tmp_path / "ckpt"),
             "--save-interval", "30", "--tensorboard-dir", str(tmp_path / "tb"),
             "--lr-decay-iters", "70"]  # the resume extends the run under the same schedule
    first = run_train(*flags, "--train-iters", "60", nproc=1, nan_at="3")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "iteration 3: non-finite gradients" in first.stdout
    assert "validation loss at iteration 25" in first.stdout
    losses = logged_losses(first.stdout)
    assert losses[60] < losses[10] - 0.5, losses
    resumed = run_train(*flags, "--train-iters", "70", "--load", str(tmp_path / "ckpt"),
                        nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "successfully loaded checkpoint" in resumed.stdout
    assert sorted(logged_losses(resumed.stdout)) == [70]


def test_cuda_states_of_a_cpu_save_are_the_gpus_own_and_load_like_megatron_lm(seeded):
    """A CPU save writes CUDA generator states made from seeds under Megatron-LM's RNG keys
    (checkpoint/rng.py): they must be what the GPU's generator holds after that seed, and go
    through the calls Megatron-LM's load_checkpoint makes (set_rng_state, the tracker's fork)."""
    from megatron.core import tensor_parallel

    from spannorm_megatron.checkpoint import rng

    torch.cuda.manual_seed(4321)
    assert torch.equal(torch.cuda.get_rng_state(), rng.cuda_generator_state(4321))
    torch.cuda.manual_seed(77)
    expected = torch.rand(8, device="cuda")
    torch.cuda.set_rng_state(rng.cuda_generator_state(77))
    assert torch.equal(torch.rand(8, device="cuda"), expected)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    own = tracker.get_states()
    try:
        tracker.set_states({name: rng.cuda_generator_state(77) for name in own})
        with tracker.fork():
            drawn = torch.rand(8, device="cuda")
    finally:
        tracker.set_states(own)
    assert torch.equal(drawn, expected)


def test_transformer_engine_imports_when_expected():
    """The TE stage of the GPU check sets SPANNORM_EXPECT_TE=1: TE must import and see the GPU."""
    if not EXPECT_TE:
        pytest.skip("SPANNORM_EXPECT_TE is not set")
    import transformer_engine.pytorch  # noqa: F401  (fails loudly on a broken build)

    assert transformer_engine_available()


@needs_te
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_transformer_engine_layers_match_the_local_layers(seeded, tmp_path, placement, moe):
    """The same weights (moved through a dist checkpoint, whose keys both flavours share) give
    the same logits in bf16 from Transformer Engine's fused modules and from the local ones.
    MoE layers route every token to every expert: with top-k < experts, bf16 noise in the
    router's logits could flip a choice and compare different experts."""
    from megatron.core import dist_checkpointing

    local_config = ModelConfig.recommended(norm_placement=placement, num_layers=4, hidden_size=256,
                               num_attention_heads=8, vocab_size=512, max_sequence_length=128,
                               transformer_impl="local", num_experts=4 if moe else None,
                               moe_router_topk=4 if moe else 2)
    te_config = replace(local_config, transformer_impl="transformer_engine")
    local = build_gpt_model(local_config, transformer_config(local_config, **BF16)).eval()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    fused = build_gpt_model(te_config, transformer_config(te_config, **BF16)).eval()
    loaded = dist_checkpointing.load(_without_extra_state(fused.sharded_state_dict()),
                                     str(tmp_path))
    missing, unexpected = fused.load_state_dict(loaded, strict=False)
    assert not unexpected and all("_extra_state" in key for key in missing), missing

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 128), generator=generator).cuda()
    positions = torch.arange(128, device="cuda").expand(2, -1)
    with torch.no_grad():
        expected = local(tokens, positions, None).float()
        actual = fused(tokens, positions, None).float()
    error = (actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert error < RELATIVE_RMS_TOLERANCE, float(error)


@pytest.mark.slow
@needs_te
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("placement", ["prenorm", "spannorm"])
def test_fp8_training_lowers_the_loss(corpus, placement, recipe):
    data, tokenizer = corpus
    result = run_train(
        *RECIPE, "--data-path", data, "--tokenizer-model", tokenizer, "--norm-placement",
        placement, "--max-position-embeddings", "128", "--ffn-hidden-size", "1024",
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
        "--seq-length", "128", "--micro-batch-size", "8", "--train-iters", "60",
        "--lr", "1e-3", "--lr-warmup-iters", "5", "--log-interval", "10",
        "--eval-interval", "1000", "--eval-iters", "1", "--split", "90,10,0",
        "--transformer-impl", "transformer_engine", "--bf16", "--fp8-format", "hybrid",
        "--fp8-recipe", recipe, nproc=1)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = logged_losses(result.stdout)
    assert sorted(losses) == [10, 20, 30, 40, 50, 60]
    assert losses[60] < losses[10] - 0.5, losses
    assert "validation loss at iteration 60" in result.stdout  # the final evaluation, in FP8


@needs_te
def test_transformer_engine_layers_accumulate_weight_gradients_in_main_grad(seeded):
    """Megatron-LM's gradient-accumulation fusion on the TE layers (TE's
    fuse_wgrad_accumulation), whether or not Apex's kernel is there for megatron-core's output
    layer: every TE module accumulates into DDP's fp32 main_grad, and two steps of two
    micro-batches give the losses of the same model with --no-gradient-accumulation-fusion."""
    from megatron.core.optimizer import OptimizerConfig

    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.config.performance import PerformanceConfig
    from spannorm_megatron.model import fusions
    from spannorm_megatron.runtime import set_seed
    from spannorm_megatron.training.loop import train_step
    from spannorm_megatron.training.setup import setup_model_and_optimizer

    config = ModelConfig.recommended(norm_placement="spannorm", num_layers=2, hidden_size=256,
                                     num_attention_heads=8, vocab_size=512,
                                     max_sequence_length=128,
                                     transformer_impl="transformer_engine")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 2, 129), generator=generator).cuda()
    batches = [{"tokens": t[:, :-1], "labels": t[:, 1:],
                "loss_mask": torch.ones(2, 128, device="cuda"),
                "position_ids": torch.arange(128, device="cuda").expand(2, -1)} for t in tokens]
    losses = {}
    for fused in (True, False):
        set_seed(1234)
        performance = PerformanceConfig(bf16=True, gradient_accumulation_fusion=fused)
        model, optimizer = setup_model_and_optimizer(
            config, ParallelConfig(), OptimizerConfig(optimizer="adam", lr=1e-3), performance)
        te_modules = [m for m in model[0].modules() if fusions._is_te_module(m)
                      and hasattr(m, "fuse_wgrad_accumulation")]
        assert te_modules and all(m.fuse_wgrad_accumulation is fused for m in te_modules)
        assert model[0].config.gradient_accumulation_fusion is (
            fused and fusions._importable(fusions.GRADIENT_ACCUMULATION_EXTENSION))
        losses[fused] = [train_step(model, optimizer, None, iter(batches), 2, 128, 2, 4).loss
                         for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-2), losses


def test_a_logging_step_adds_bounded_device_memory(megatron_world):
    """The stability signals keep their weight snapshot in host memory and compare it in
    slices: a logging step's device peak exceeds a plain step's by far less than a copy of the
    weights (a whole clone on the GPU would add their size)."""
    from spannorm_megatron.benchmarks import training as benchmark
    from spannorm_megatron.benchmarks.step_memory import measure_step_memory

    options = benchmark.parse_options(["--preset", "125m", "--precisions", "bf16",
                                       "--transformer-impl", "local", "--seq-length", "256"])
    bench = benchmark.bench_for("spannorm", "bf16", options)
    try:
        bench.step()
        samples = measure_step_memory(bench, rounds=2)
        weights = sum(p.numel() * p.element_size() for p in bench.model[0].parameters())
    finally:
        bench.close()
    added = max(samples["log"]) - max(samples["plain"])
    assert added < weights / 4, (samples, weights)
