"""spannorm_megatron.metrics: FLOPs, stability signals, MoE metrics and the TensorBoard writer.

- FLOPs: the formula equals the matmul FLOPs torch's FlopCounterMode counts on real models
  (dense and MoE, SwiGLU and GeLU, GQA, shared expert; forward and forward+backward), and
  Megatron-LM's own closed form on large configs.
- Stability signals in one process equal an independent recomputation: activation RMS from
  tests/reference.py's plain-PyTorch sublayers, per-layer gradient norms from `main_grad`,
  update ratios from weights copied before and after the step; activation recompute does not
  double count; hooks exist only on measured steps.
- One 2-rank torchrun (tests/_metrics_worker.py) measures the same step under TP2+SP, PP2,
  DP2 with the distributed optimizer and EP2: every signal equals one process's to 1e-5, the
  gradient's zero count (--log-num-zeros-in-grad) exactly, the parameter norm
  (--log-params-norm) to 1e-5; in one process both equal a count / norm of the gradients and
  weights copied out of the model.
- TensorBoard: every tag is in the event file, finite, and only the writing rank writes.
"""

import glob
import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig
from torch.utils.flop_counter import FlopCounterMode

import _metrics
import _metrics_reference
import launch
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.metrics import (
    MoEMetrics,
    memory_stats,
    StabilitySignals,
    TensorBoardWriter,
    device_peak_flops,
    flops_per_iteration,
    flops_per_token,
    forward_flops,
    mfu,
    throughput,
)
from spannorm_megatron.metrics import flops as flops_module
from spannorm_megatron.metrics import tensorboard as tb
from spannorm_megatron.model import build_gpt_model, transformer_config
from spannorm_megatron.training.setup import setup_model_and_optimizer

RTOL = 1e-5
SIGNAL_NAMES = ("output_rms", "attention_rms", "mlp_rms", "grad_norm", "update_ratio")


# ==================================================================================== FLOPs
def flops_config(moe: bool, swiglu: bool) -> ModelConfig:
    return ModelConfig.recommended(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, vocab_size=200, max_sequence_length=32, swiglu=swiglu,
        num_experts=4 if moe else None, moe_router_topk=2, moe_ffn_hidden_size=48,
        moe_shared_expert_intermediate_size=32 if moe else None,
        # No aux loss: it has no matmul, and a backward outside megatron's schedules would
        # leave megatron-core's process-global MoEAuxLossAutoScaler scale in a shape ([]) that
        # the schedules of later tests in this process cannot copy their [1]-shaped scale into.
        moe_aux_loss_coeff=0.0,
    )


@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_flops_equal_counted_matmuls(seeded, moe, swiglu):
    """The formula, with the full score matrix the local attention really multiplies, equals
    torch's count of the model's matmul FLOPs; backward is exactly 2x forward; the causal
    formula counts half of the core-attention FLOPs (Megatron-LM's convention)."""
    config = flops_config(moe, swiglu)
    model = build_gpt_model(config, transformer_config(config))
    batch, seq = 2, 32
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    positions = torch.arange(seq).expand(batch, seq)
    with FlopCounterMode(display=False) as forward_count:
        model(tokens, positions, attention_mask=None)
    with FlopCounterMode(display=False) as train_count:
        model(tokens, positions, attention_mask=None, labels=tokens).sum().backward()

    counted = forward_count.get_total_flops()
    by_op = {str(op): n for op, n in forward_count.get_flop_counts()["Global"].items()}
    core_attention = by_op.get("aten.baddbmm", 0) + by_op.get("aten.bmm", 0)
    assert core_attention > 0  # the check below would be vacuous otherwise

    full = forward_flops(config, seq, causal=False)
    assert full.total * batch * seq == pytest.approx(counted, rel=1e-9)
    assert 3 * counted == pytest.approx(train_count.get_total_flops(), rel=1e-9)
    causal = forward_flops(config, seq)
    assert causal.total * batch * seq == pytest.approx(counted - core_attention / 2, rel=1e-9)
    assert flops_per_token(config, seq) == pytest.approx(3 * causal.total, rel=1e-12)
    assert flops_per_iteration(config, seq, 8) == pytest.approx(
        flops_per_token(config, seq) * 8 * seq, rel=1e-12)


def megatron_lm_flops(cfg: ModelConfig, seq: int, batch: int) -> float:
    """Megatron-LM's `num_floating_point_operations` (training.py), transcribed in its own
    form for our configs (no MLA, no MTP, every layer MoE when num_experts is set)."""
    expansion_factor = 3 * 2 * 2
    kv_channels = cfg.hidden_size // cfg.num_attention_heads
    query_projection_to_hidden_size_ratio = (
        kv_channels * cfg.num_attention_heads / cfg.hidden_size)
    gated_linear_multiplier = 3 / 2 if cfg.swiglu else 1
    ffn = cfg.resolved_ffn_hidden_size
    if cfg.is_moe:
        num_dense_layers, num_moe_layers, routed = 0, cfg.num_layers, cfg.moe_router_topk
    else:
        num_dense_layers, num_moe_layers, routed = cfg.num_layers, 0, 0
    moe_ffn = cfg.moe_ffn_hidden_size or ffn
    shared = cfg.moe_shared_expert_intermediate_size or 0
    L, h = cfg.num_layers, cfg.hidden_size
    self_attn_term = (
        expansion_factor * L * h * h
        * ((1 + cfg.resolved_num_query_groups / cfg.num_attention_heads + seq / h / 2)
           * query_projection_to_hidden_size_ratio))
    return batch * seq * (
        expansion_factor * L * h * (
            ffn * gated_linear_multiplier * (num_dense_layers / L)
            + moe_ffn * routed * gated_linear_multiplier * (num_moe_layers / L)
            + shared * gated_linear_multiplier * (num_moe_layers / L))
        + self_attn_term
        + 3 * 2 * h * cfg.vocab_size)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_flops_equal_megatron_lm_formula(moe):
    """A Llama-7B-like dense model and a MoE one: our count without the router GEMM (which
    Megatron-LM leaves out) is Megatron-LM's."""
    config = ModelConfig.recommended(
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
        ffn_hidden_size=11008, vocab_size=32000, max_sequence_length=4096,
        num_experts=64 if moe else None, moe_router_topk=6, moe_ffn_hidden_size=1408,
        moe_shared_expert_intermediate_size=2816 if moe else None,
    )
    expected = megatron_lm_flops(config, 4096, 16)
    assert flops_per_iteration(config, 4096, 16, include_router=False) == pytest.approx(
        expected, rel=1e-12)
    with_router = flops_per_iteration(config, 4096, 16)
    router = 3 * 2 * 4096 * 64 * 32 * 4096 * 16 if moe else 0
    assert with_router - expected == pytest.approx(router, rel=1e-9, abs=1)


def test_recompute_mfu_and_throughput():
    config = flops_config(moe=False, swiglu=True)
    fwd = forward_flops(config, 32)
    base = flops_per_token(config, 32)
    assert flops_per_token(config, 32, recompute="full") == pytest.approx(
        base + config.num_layers * fwd.layer)
    assert flops_per_token(config, 32, recompute="selective") == pytest.approx(
        base + config.num_layers * (fwd.attention_scores + fwd.attention_context))
    with pytest.raises(ValueError, match="recompute"):
        flops_per_token(config, 32, recompute="everything")

    assert mfu(1000.0, 6e9, 1e15) == pytest.approx(6e-3)
    assert mfu(8000.0, 6e9, 1e15, num_devices=8) == pytest.approx(6e-3)
    speed = throughput(4096, 2.0, flops_per_token=6e9, num_devices=2, peak_flops=1e15)
    assert speed.tokens_per_second == 2048
    assert speed.tflops_per_device == pytest.approx(2048 * 6e9 / 2 / 1e12)
    assert speed.mfu == pytest.approx(2048 * 6e9 / 2e15)
    assert throughput(4096, 2.0).mfu is None


def test_device_peak_flops(monkeypatch):
    monkeypatch.delenv(flops_module.PEAK_TFLOPS_ENV, raising=False)
    table = {
        "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
        "NVIDIA H200": 989.4, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
    }
    for name, tflops in table.items():
        assert device_peak_flops(torch.bfloat16, name) == pytest.approx(tflops * 1e12), name
        assert device_peak_flops("fp16", name) == pytest.approx(tflops * 1e12), name
    assert device_peak_flops("fp8", "NVIDIA H100 80GB HBM3") == pytest.approx(1978.9e12)
    assert device_peak_flops("fp8", "NVIDIA H200") == pytest.approx(1978.9e12)
    assert device_peak_flops("tf32", "NVIDIA A100-SXM4-40GB") == pytest.approx(156e12)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert device_peak_flops(torch.float32, "NVIDIA H100 PCIe") == pytest.approx(51.2e12)
        torch.backends.cuda.matmul.allow_tf32 = True
        assert device_peak_flops(torch.float32, "NVIDIA H100 PCIe") == pytest.approx(378e12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    with pytest.raises(ValueError, match="fp8"):
        device_peak_flops("fp8", "NVIDIA A100-SXM4-80GB")
    assert device_peak_flops("bf16", "Some Future GPU") is None
    with pytest.raises(ValueError, match="dtype"):
        device_peak_flops("int4", "NVIDIA H200")

    cpu = device_peak_flops(torch.float32)  # this machine has no GPU: the CPU estimate
    assert cpu > 1e9 and math.isfinite(cpu)
    monkeypatch.setenv(flops_module.PEAK_TFLOPS_ENV, "123.5")
    assert device_peak_flops() == pytest.approx(123.5e12)
    assert device_peak_flops("fp8", "NVIDIA A100-SXM4-80GB") == pytest.approx(123.5e12)
    monkeypatch.setenv(flops_module.PEAK_TFLOPS_ENV, "fast")
    with pytest.raises(ValueError, match=flops_module.PEAK_TFLOPS_ENV):
        device_peak_flops()


# ======================================================================= stability signals
@dataclass
class ReferenceRun:
    config: ModelConfig
    chunks: list
    batches: list
    before: dict
    after: dict
    grads: dict
    """main_grad before the optimizer step (which clips it in place)."""
    record: dict


@pytest.fixture(scope="module")
def reference_runs(megatron_world, tmp_path_factory, slow):
    """Each model in one process: one unmeasured step, then one measured step."""
    root = tmp_path_factory.mktemp("metrics")
    runs = {}
    for combo, (placement, moe, overrides) in _metrics.COMBOS.items():
        torch.manual_seed(7)
        config = _metrics.model_config(placement, moe, **overrides)
        chunks, optimizer = _metrics.setup(config, ParallelConfig())
        init_dir = str(root / "ref" / combo / "init")
        _metrics.save_initial(chunks, init_dir)
        _metrics.load_initial(chunks, optimizer, init_dir)
        batches = _metrics.micro_batches(_metrics.global_batch())
        first = _metrics.measured_step(chunks, optimizer, batches, measure=False)
        assert not first["hooks_were_on"] and not first["hooks_left"]
        named = list(chunks[0].module.named_parameters())
        before = {n: p.detach().clone() for n, p in named}
        grads = {}
        record = _metrics.measured_step(
            chunks, optimizer, batches,
            before_optimizer_step=lambda: grads.update(
                {n: p.main_grad.detach().clone() for n, p in named}))
        after = {n: p.detach().clone() for n, p in named}
        runs[combo] = ReferenceRun(config, chunks, batches, before, after, grads, record)
    return root, runs


def layer_of(name: str):
    if not name.startswith("decoder.layers."):
        return None
    return int(name.split(".")[2]) + 1


@pytest.mark.parametrize("combo", list(_metrics.COMBOS))
def test_signals_equal_independent_computation(reference_runs, combo):
    _, runs = reference_runs
    run = runs[combo]
    signals, L = run.record["signals"], run.config.num_layers
    assert sorted(signals) == sorted(SIGNAL_NAMES)
    assert all(sorted(per_layer) == list(range(1, L + 1)) for per_layer in signals.values())

    # Activation RMS: plain-PyTorch recomputation from the weights the forward pass used.
    ref = _metrics_reference.signals(run.config, run.before, run.batches)
    for signal, key in (("output_rms", "output"), ("attention_rms", "attention"),
                        ("mlp_rms", "mlp")):
        expected = _metrics_reference.rms(ref, key)
        for layer in range(1, L + 1):
            assert signals[signal][layer] == pytest.approx(expected[layer], rel=RTOL), (
                signal, layer)

    # Gradient norm per layer: the main_grad buffers the optimizer reads.
    layer_sq = {layer: 0.0 for layer in range(1, L + 1)}
    other_sq = 0.0
    for name, grad in run.grads.items():
        sq = float(grad.double().square().sum())
        if layer_of(name) is None:
            other_sq += sq
        else:
            layer_sq[layer_of(name)] += sq
    for layer in range(1, L + 1):
        assert signals["grad_norm"][layer] == pytest.approx(math.sqrt(layer_sq[layer]), rel=RTOL)
    # ... and with the non-layer parameters they make up megatron-core's global grad norm.
    total = math.sqrt(sum(g * g for g in signals["grad_norm"].values()) + other_sq)
    assert total == pytest.approx(run.record["grad_norm"], rel=RTOL)

    # The parts outside the layers: the embedding's, and the output layer's own weight (none
    # when tied: its gradient is the embedding's).
    parts = run.record["parts"]
    for part, prefix in (("embedding", "embedding."), ("output_layer", "output_layer.")):
        names = [n for n in run.grads if n.startswith(prefix)]
        assert bool(names) == (part == "embedding" or run.config.untie_embeddings_and_output_weights)
        grad = math.sqrt(sum(float(run.grads[n].double().square().sum()) for n in names))
        assert parts[part]["grad_norm"] == pytest.approx(grad, rel=RTOL, abs=1e-12), part
        if names:
            delta = sum(float((run.after[n].double() - run.before[n].double()).square().sum())
                        for n in names)
            weight = sum(float(run.before[n].double().square().sum()) for n in names)
            assert parts[part]["update_ratio"] == pytest.approx(math.sqrt(delta / weight),
                                                                rel=RTOL)

    # Update ratio per layer from the weights before and after the step.
    for layer in range(1, L + 1):
        names = [n for n in run.before if layer_of(n) == layer]
        delta = sum(float((run.after[n].double() - run.before[n].double()).square().sum())
                    for n in names)
        weight = sum(float(run.before[n].double().square().sum()) for n in names)
        assert signals["update_ratio"][layer] == pytest.approx(
            math.sqrt(delta / weight), rel=RTOL)
        assert 0 < signals["update_ratio"][layer] < 1

    moe = run.record["moe"]
    if not run.config.is_moe:
        assert moe == {}
        return
    for layer in range(1, L + 1):
        counts = ref["expert_counts"][layer - 1]
        assert moe["expert_load"][layer] == pytest.approx([c / sum(counts) for c in counts],
                                                          abs=1e-12)
        assert moe["load_balancing_loss_per_layer"][layer] == pytest.approx(
            ref["aux_loss"][layer - 1], rel=RTOL)
    assert moe["load_balancing_loss"] == pytest.approx(sum(ref["aux_loss"]) / L, rel=RTOL)


@pytest.mark.parametrize("combo", list(_metrics.COMBOS))
def test_num_zeros_and_params_norm_equal_independent_computation(reference_runs, combo):
    """--log-num-zeros-in-grad is megatron-core's count of the zero gradient entries and
    --log-params-norm the norm of the weights after the step: both recomputed here from the
    gradients and weights copied out of the model. The tiny batch leaves most vocabulary rows
    of the embedding without a token, so the count is far from 0."""
    _, runs = reference_runs
    run = runs[combo]
    zeros = sum(int((grad == 0).sum()) for grad in run.grads.values())
    assert run.record["num_zeros"] == zeros
    if run.config.untie_embeddings_and_output_weights:
        assert zeros >= run.config.hidden_size * 10
    norm = math.sqrt(sum(float(w.double().square().sum()) for w in run.after.values()))
    assert run.record["params_norm"] == pytest.approx(norm, rel=1e-6)


def test_params_norm_reads_the_fp32_main_weights_under_bf16(megatron_world):
    """With --bf16 the norm is that of the optimizer's fp32 main weights (`main_param`), as
    Megatron-LM's calc_params_l2_norm, not of the bf16 copies the model computes with."""
    from spannorm_megatron.metrics.params_norm import params_l2_norm
    from spannorm_megatron.config.performance import PerformanceConfig

    torch.manual_seed(7)
    chunks, optimizer = setup_model_and_optimizer(
        _metrics.model_config("spannorm", False), ParallelConfig(),
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0),
        PerformanceConfig(bf16=True))
    _metrics.measured_step(chunks, optimizer, _metrics.micro_batches(_metrics.global_batch()),
                           measure=False)
    params = list(chunks[0].parameters())
    assert all(p.dtype == torch.bfloat16 and p.main_param.dtype == torch.float32
               for p in params)
    main = math.sqrt(sum(float(p.main_param.double().square().sum()) for p in params))
    model = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
    assert params_l2_norm(chunks, bf16=True) == pytest.approx(main, rel=1e-6)
    assert abs(main - model) > 1e-6 * main  # the two differ: the check above can tell


def test_hooks_only_while_measuring(reference_runs):
    _, runs = reference_runs
    run = runs["spannorm-moe"]
    assert run.record["hooks_were_on"] and not run.record["hooks_left"]

    def hook_count():
        return sum(len(m._forward_hooks) for chunk in run.chunks for m in chunk.modules())

    baseline = hook_count()
    signals, moe = StabilitySignals(run.chunks), MoEMetrics(run.chunks)
    assert hook_count() == baseline and not signals.enabled
    signals.start_step()
    moe.start_step()
    layers = run.config.num_layers
    assert hook_count() == baseline + 3 * layers + layers  # layer, attention, mlp; router
    moe.start_step(measure=False)
    signals.disable()
    assert hook_count() == baseline


def test_activation_recompute_counts_each_token_once(megatron_world, tmp_path):
    """Full recompute re-runs every layer's forward inside the backward pass; the hooks must
    skip it: same signals as without recompute, from the same weights."""
    config = _metrics.model_config("spannorm", False)
    batches = _metrics.micro_batches(_metrics.global_batch())
    torch.manual_seed(7)
    results = []
    for overrides in ({}, dict(recompute_granularity="full", recompute_method="uniform",
                               recompute_num_layers=1)):
        chunks, optimizer = setup_model_and_optimizer(
            config, ParallelConfig(), OptimizerConfig(optimizer="adam", lr=_metrics.LR,
                                                      clip_grad=1.0), **overrides)
        if not results:
            _metrics.save_initial(chunks, str(tmp_path / "init"))
        _metrics.load_initial(chunks, optimizer, str(tmp_path / "init"))
        results.append(_metrics.measured_step(chunks, optimizer, batches))
    plain, recomputed = results
    for signal in SIGNAL_NAMES:
        for layer, value in plain["signals"][signal].items():
            assert recomputed["signals"][signal][layer] == pytest.approx(value, rel=RTOL), (
                signal, layer)


# ============================================================== 2 ranks: layouts vs 1 process
@pytest.fixture(scope="module")
def layouts(reference_runs, torchrun):
    root, _ = reference_runs
    out_dir = root / "out"
    result = torchrun(launch.TESTS / "_metrics_worker.py", root / "ref", out_dir)
    launch.check_launch(result, out_dir)
    return out_dir


CASES = [(layout, combo) for layout, (_, combos) in _metrics.LAYOUTS.items() for combo in combos]


def expected_writer(layout: ParallelConfig, rank: int) -> bool:
    """Rank order is tp-cp-ep-dp-pp: the last stage's TP rank 0 and DP rank 0."""
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    dp = 2 // (tp * pp)
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    return tp_rank == 0 and dp_rank == 0 and pp_rank == pp - 1


@pytest.mark.parametrize("layout,combo", CASES, ids=[f"{l}-{c}" for l, c in CASES])
def test_layout_signals_equal_single_process(reference_runs, layouts, layout, combo):
    _, runs = reference_runs
    ref = runs[combo].record
    records = launch.rank_results(layouts / layout / combo, 2)
    for rank, record in enumerate(records):
        assert sorted(record["signals"]) == sorted(SIGNAL_NAMES)
        for signal in SIGNAL_NAMES:  # every rank has every layer, whatever it holds
            expected = ref["signals"][signal]
            actual = record["signals"][signal]
            assert sorted(actual) == [str(l) for l in sorted(expected)]
            for layer, value in expected.items():
                assert actual[str(layer)] == pytest.approx(value, rel=RTOL), (
                    f"rank {rank} {signal} layer {layer}: {actual[str(layer)]} vs {value}")
        assert record["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RTOL)
        # Counted on each rank's (sharded, TP-split, stage) gradients, then summed: exact.
        assert record["num_zeros"] == ref["num_zeros"], rank
        assert record["params_norm"] == pytest.approx(ref["params_norm"], rel=RTOL), rank
        for part, values in ref["parts"].items():
            for signal, value in values.items():
                assert record["parts"][part][signal] == pytest.approx(value, rel=RTOL, abs=1e-12), (
                    f"rank {rank} {part} {signal}")
        if ref["moe"]:
            for layer, load in ref["moe"]["expert_load"].items():
                assert record["moe"]["expert_load"][str(layer)] == pytest.approx(load, abs=1e-12)
            for layer, loss in ref["moe"]["load_balancing_loss_per_layer"].items():
                assert record["moe"]["load_balancing_loss_per_layer"][str(layer)] == (
                    pytest.approx(loss, rel=RTOL))
        assert not record["hooks_left"]

    # One rank writes (the last stage's first TP/DP rank); the event file has its loss.
    parallel = _metrics.LAYOUTS[layout][0]
    assert [r["writer_enabled"] for r in records] == [
        expected_writer(parallel, rank) for rank in range(2)]
    events = glob.glob(str(layouts / layout / combo / "tb" / "events.out.tfevents.*"))
    assert len(events) == 1, events
    scalars = read_scalars(events[0])
    assert scalars[tb.TAG_LM_LOSS] == pytest.approx(ref["loss"], rel=RTOL)
    assert "stability/layer_004/update_ratio" in scalars
    assert scalars[tb.TAG_NUM_ZEROS] == ref["num_zeros"]
    assert scalars[tb.TAG_PARAMS_NORM] == pytest.approx(ref["params_norm"], rel=RTOL)
    assert scalars["stability/embedding/grad_norm"] == pytest.approx(
        ref["parts"]["embedding"]["grad_norm"], rel=RTOL)


# ============================================================================== TensorBoard
def read_events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def read_scalars(path) -> dict:
    accumulator = read_events(path)
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_writes_every_tag(reference_runs, tmp_path):
    _, runs = reference_runs
    run = runs["spannorm-moe"]
    record, L, E = run.record, run.config.num_layers, run.config.num_experts
    log_dir = str(tmp_path / "tb")
    writer = TensorBoardWriter(log_dir)
    assert writer.enabled  # one process: it is the writing rank
    config_text = json.dumps(run.config.to_dict(), indent=2)
    writer.write_config(run.config.to_dict())
    fpt = flops_per_token(run.config, _metrics.SEQ)
    for iteration in (1, 2):
        samples = iteration * _metrics.GLOBAL_BATCH
        writer.log_training(
            iteration, samples, lm_loss=record["loss"], learning_rate=_metrics.LR,
            batch_size=_metrics.GLOBAL_BATCH, loss_scale=1.0, world_size=1,
            grad_norm=record["grad_norm"], num_zeros=record["num_zeros"],
            params_norm=record["params_norm"], memory=memory_stats())
        writer.log_timers(iteration, iteration_time=0.5, throughput_tflops=1.5)
        writer.log_speed(iteration, tokens_per_step=_metrics.GLOBAL_BATCH * _metrics.SEQ,
                         iteration_time=0.5, flops_per_token=fpt, num_devices=1,
                         peak_flops=device_peak_flops(torch.float32))
        writer.log_moe(iteration, record["moe"])
        writer.log_stability(iteration, record["signals"])
    writer.log_validation(2, 4.5, 16, ppl=True)
    writer.close()

    events = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = read_events(events[0])
    scalars = {tag: [e.value for e in accumulator.Scalars(tag)]
               for tag in accumulator.Tags()["scalars"]}
    steps = {tag: [e.step for e in accumulator.Scalars(tag)]
             for tag in accumulator.Tags()["scalars"]}
    twinned = ["learning-rate", "batch-size", "lm loss", "loss-scale", "world-size",
               "grad-norm", "num-zeros", "params-norm"]
    expected = twinned + [tag + " vs samples" for tag in twinned] + [
        "lm loss validation", "lm loss validation vs samples", "lm loss validation ppl",
        "lm loss validation ppl vs samples", "iteration-time", "throughput",
        "throughput/tokens-per-sec", "throughput/tflops", "throughput/mfu",
        "mem-allocated-bytes", "mem-max-allocated-bytes",
        "load_balancing_loss", "moe/expert_load/max_over_mean",
    ]
    expected += [f"moe/load_balancing_loss_layer_{i}" for i in range(L)]
    expected += [f"moe/expert_load/layer_{n:03d}/expert_{e:03d}"
                 for n in range(1, L + 1) for e in range(E)]
    expected += [f"moe/expert_load/layer_{n:03d}/max_over_mean" for n in range(1, L + 1)]
    expected += [f"stability/layer_{n:03d}/{s}" for n in range(1, L + 1) for s in SIGNAL_NAMES]
    expected += [f"stability/max/{s}" for s in SIGNAL_NAMES]
    missing = sorted(set(expected) - set(scalars))
    assert not missing, missing
    for tag in expected:
        assert all(math.isfinite(v) for v in scalars[tag]), tag
    for tag in twinned:  # the twin: the same values against consumed samples
        assert steps[tag] == [1, 2] and scalars[tag + " vs samples"] == scalars[tag], tag
        assert steps[tag + " vs samples"] == [_metrics.GLOBAL_BATCH, 2 * _metrics.GLOBAL_BATCH]
    assert steps["lm loss validation vs samples"] == [16]
    assert scalars["lm loss"] == pytest.approx([record["loss"]] * 2)
    assert scalars["lm loss validation ppl"] == pytest.approx([math.exp(4.5)])
    assert scalars["throughput/tokens-per-sec"][0] == pytest.approx(
        _metrics.GLOBAL_BATCH * _metrics.SEQ / 0.5)
    assert scalars["stability/max/grad_norm"][0] == pytest.approx(
        max(record["signals"]["grad_norm"].values()), rel=1e-6)
    assert 0 < scalars["throughput/mfu"][0] < 1
    assert scalars["mem-max-allocated-bytes"][0] >= scalars["mem-allocated-bytes"][0] > 0

    text_tags = accumulator.Tags()["tensors"]
    assert f"{tb.TAG_CONFIG}/text_summary" in text_tags
    text = accumulator.Tensors(f"{tb.TAG_CONFIG}/text_summary")[0].tensor_proto.string_val[0]
    lines = text.decode().splitlines()
    assert all(line.startswith("    ") for line in lines)  # a markdown code block
    assert json.loads("\n".join(lines)) == json.loads(config_text)


MEGATRON_TWINNED = ("learning-rate", "batch-size", "lm loss", "loss-scale", "world-size",
                    "grad-norm", "num-zeros", "params-norm")
GATED_CASES = {
    # name: (MetricsLoggingConfig fields, --log-interval, {tag: iterations written})
    "defaults": ({}, 2, {
        "learning-rate": [1, 2], "batch-size": [1, 2], "lm loss": [1, 2], "loss-scale": [1, 2],
        "grad-norm": [1, 2], "load_balancing_loss": [1, 2], "lm loss validation": [2],
        "throughput/tokens-per-sec": [2], "stability/layer_001/grad_norm": [2]}),
    "every flag": (dict(log_params_norm=True, log_num_zeros_in_grad=True, log_throughput=True,
                        log_timers_to_tensorboard=True, log_validation_ppl_to_tensorboard=True,
                        log_memory_to_tensorboard=True, log_world_size_to_tensorboard=True,
                        moe_per_layer_logging=True), 1, {
        "learning-rate": [1, 2], "batch-size": [1, 2], "lm loss": [1, 2], "loss-scale": [1, 2],
        "world-size": [1, 2], "grad-norm": [1, 2], "num-zeros": [1, 2], "params-norm": [1, 2],
        "mem-allocated-bytes": [1, 2], "mem-max-allocated-bytes": [1, 2],
        # not on the first iteration of a launch, as Megatron-LM
        "iteration-time": [2], "throughput": [2],
        "load_balancing_loss": [1, 2],
        **{f"moe/load_balancing_loss_layer_{i}": [1, 2] for i in range(4)},
        "lm loss validation": [2], "lm loss validation ppl": [2],
        "throughput/tokens-per-sec": [1, 2], "stability/layer_001/grad_norm": [1, 2]}),
    "interval 2, no loss scale": (dict(tensorboard_log_interval=2,
                                       log_loss_scale_to_tensorboard=False), 2, {
        "learning-rate": [2], "batch-size": [2], "lm loss": [2], "grad-norm": [2],
        "load_balancing_loss": [1, 2], "lm loss validation": [2],
        "throughput/tokens-per-sec": [2], "stability/layer_001/grad_norm": [2]}),
}


@pytest.mark.slow
def test_each_megatron_lm_tag_is_written_under_its_flag_on_its_schedule(megatron_world,
                                                                        tmp_path):
    """RunMonitor on a real MoE model and optimizer, two training steps: with Megatron-LM's
    defaults, with every logging flag, and with --tensorboard-log-interval 2
    --no-log-loss-scale-to-tensorboard. Exactly the expected tags (twins included), at exactly
    the expected iterations; nothing else of Megatron-LM's."""
    from spannorm_megatron.config.logging import MetricsLoggingConfig
    from spannorm_megatron.training.loop import train_step
    from spannorm_megatron.training.monitor import RunMonitor

    torch.manual_seed(7)
    config = _metrics.model_config("spannorm", True)
    chunks, optimizer = _metrics.setup(config, ParallelConfig())
    batches = _metrics.micro_batches(_metrics.global_batch())
    megatron_tags = set(MEGATRON_TWINNED) | {f"{t} vs samples" for t in MEGATRON_TWINNED} | {
        "iteration-time", "throughput", "mem-allocated-bytes", "mem-max-allocated-bytes",
        "mem-reserved-bytes", "mem-allocated-count", "lm loss validation ppl",
        "lm loss validation ppl vs samples", "skipped-train-samples"} | {
        f"moe/load_balancing_loss_layer_{i}" for i in range(config.num_layers)}
    for name, (fields, log_interval, expected) in GATED_CASES.items():
        log_dir = tmp_path / name.replace(" ", "_").replace(",", "")
        monitor = RunMonitor(chunks, config, seq_length=_metrics.SEQ,
                             global_batch_size=_metrics.GLOBAL_BATCH,
                             num_microbatches=len(batches), log_interval=log_interval,
                             tensorboard_dir=str(log_dir), dtype=torch.float32,
                             metrics=MetricsLoggingConfig(**fields))
        for iteration in (1, 2):
            monitor.begin_step(iteration)
            result = train_step(chunks, optimizer, None, iter(batches),
                                num_microbatches=len(batches), seq_length=_metrics.SEQ,
                                micro_batch_size=_metrics.MICRO_BATCH,
                                global_batch_size=_metrics.GLOBAL_BATCH, monitor=monitor)
            log_line = iteration % log_interval == 0
            monitor.end_step(iteration, result,
                             consumed_samples=iteration * _metrics.GLOBAL_BATCH,
                             learning_rate=_metrics.LR, loss_scale=1.0,
                             seconds_per_step=0.5 if log_line else None)
        monitor.log_validation(2, 4.0, 2 * _metrics.GLOBAL_BATCH)
        monitor.close()
        accumulator = read_events(str(log_dir))
        steps = {tag: [e.step for e in accumulator.Scalars(tag)]
                 for tag in accumulator.Tags()["scalars"]}
        twins = {f"{tag} vs samples": [i * _metrics.GLOBAL_BATCH for i in its]
                 for tag, its in expected.items()
                 if tag in MEGATRON_TWINNED or tag.startswith("lm loss validation")}
        for tag, its in {**expected, **twins}.items():
            assert steps.get(tag) == its, (name, tag, steps.get(tag))
        unexpected = (set(steps) & megatron_tags) - set(expected) - set(twins)
        assert not unexpected, (name, sorted(unexpected))


def test_writer_is_a_no_op_without_dir_or_off_rank(tmp_path):
    for writer in (TensorBoardWriter(None), TensorBoardWriter(str(tmp_path), writer_rank=False)):
        assert not writer.enabled
        writer.write_config("x")
        writer.log_training(1, 1, lm_loss=1.0, learning_rate=1.0, batch_size=1)
        writer.log_timers(1, iteration_time=1.0, throughput_tflops=1.0)
        writer.log_speed(1, tokens_per_step=1, iteration_time=1.0)
        writer.log_validation(1, 1.0, 1, ppl=True)
        writer.log_stability(1, {"grad_norm": {1: 1.0}})
        writer.log_moe(1, {"load_balancing_loss": 1.0})
        writer.close()
    assert os.listdir(tmp_path) == []


# ============================================================================== MoE recipes
def test_recipe_moe_metrics_per_moe_layer_and_their_tags(megatron_world, tmp_path):
    """Dense first layer, capacity 1.0 (tokens dropped), expert bias, z-loss: per MoE layer the
    expert load, dropped fraction, bias and z-loss, checked against megatron-core's own
    bookkeeping (the router's token counter, its expert_bias buffer, its z-loss formula on
    the router logits), then written to TensorBoard."""
    torch.manual_seed(7)
    config = _metrics.model_config("spannorm", True)
    config = ModelConfig.recommended(**{**config.to_dict(), "moe_layer_freq": [0, 1, 1, 1],
                            "moe_router_score_function": "sigmoid",
                            "moe_router_enable_expert_bias": True,
                            "moe_router_bias_update_rate": 1e-2,
                            "moe_expert_capacity_factor": 1.0, "moe_z_loss_coeff": 1e-3})
    chunks, optimizer = _metrics.setup(config, ParallelConfig())
    batches = _metrics.micro_batches(_metrics.global_batch())
    routers = {layer.layer_number: layer.mlp.router
               for layer in chunks[0].module.decoder.layers if hasattr(layer.mlp, "router")}
    assert sorted(routers) == [2, 3, 4]
    logits = {n: [] for n in routers}
    handles = [router.register_forward_hook(
        lambda module, inputs, output, n=n: logits[n].append(
            module.gating(inputs[0]).detach().reshape(-1, config.num_experts)))
        for n, router in routers.items()]
    # What the experts were actually handed after dropping (megatron-core's dispatcher output).
    received = {n: torch.zeros(config.num_experts) for n in routers}
    layers = {layer.layer_number: layer for layer in chunks[0].module.decoder.layers}

    def count(n):
        def hook(_module, inputs):
            received[n].add_(inputs[1].float())  # (hidden, tokens_per_expert, probs)
        return hook

    handles += [layers[n].mlp.experts.register_forward_pre_hook(count(n)) for n in routers]
    record = _metrics.measured_step(chunks, optimizer, batches)
    for handle in handles:
        handle.remove()
    moe = record["moe"]
    # Losses, bias, load and dropped tokens of every layer reach the host in one read.
    assert record["moe_host_reads"] == ["tolist"]

    tokens = len(batches) * _metrics.MICRO_BATCH * _metrics.SEQ
    assert sorted(moe["expert_load"]) == [2, 3, 4]
    # megatron-core's tracker has every layer; the dense one holds 0 (Megatron-LM logs it so).
    assert sorted(moe["z_loss_per_layer"]) == [1, 2, 3, 4] and moe["z_loss_per_layer"][1] == 0
    for n, router in routers.items():
        # megatron-core zeroes its counter after updating the bias; the bias moved by
        # +-rate per expert, the sign of (mean count - count).
        bias = router.expert_bias.tolist()
        assert moe["expert_bias"][n] == bias and all(round(abs(b), 6) in (0.0, 0.01) for b in bias)
        kept = received[n].tolist()
        assert moe["expert_load"][n] == pytest.approx([k / sum(kept) for k in kept], abs=1e-12)
        mean = sum(kept) / len(kept)
        assert bias == pytest.approx([1e-2 * (mean > k) - 1e-2 * (mean < k) for k in kept])
        assert moe["dropped_token_fraction_per_layer"][n] == pytest.approx(
            1 - sum(kept) / (tokens * config.moe_router_topk), abs=1e-12)
        # z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE), per micro-batch.
        z = [torch.logsumexp(x.float(), dim=-1).square().mean().item() for x in logits[n]]
        assert moe["z_loss_per_layer"][n] == pytest.approx(sum(z) / len(z), rel=1e-5)
    assert 0 < moe["dropped_token_fraction"] < 1  # capacity 1.0 drops some at init

    writer = TensorBoardWriter(str(tmp_path))
    writer.log_moe(1, moe)
    writer.close()
    scalars = read_scalars(glob.glob(str(tmp_path / "events.out.tfevents.*"))[0])
    assert scalars["moe/dropped_token_fraction"] == pytest.approx(moe["dropped_token_fraction"])
    assert scalars["z_loss"] == pytest.approx(moe["z_loss"])
    for n in (2, 3, 4):
        assert f"moe/z_loss_layer_{n - 1}" in scalars
        assert f"moe/dropped_token_fraction/layer_{n:03d}" in scalars
        for e in range(config.num_experts):
            assert scalars[f"moe/expert_bias/layer_{n:03d}/expert_{e:03d}"] == pytest.approx(
                moe["expert_bias"][n][e])
    assert scalars["moe/z_loss_layer_0"] == 0  # the dense layer: 0, as Megatron-LM logs it
