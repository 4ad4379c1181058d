"""Megatron-LM core_v0.16.1's MoE and pipeline flags: each is handed to megatron-core
with its meaning and shown to do it on real models, or refused before anything starts with the
reason; and the two crashes once found in them (--num-layers-per-virtual-pipeline-stage under torchrun,
--moe-grouped-gemm without Transformer Engine).

In-process tests run real megatron-core models in a world of one; one 4-rank torchrun
(tests/_moe_pp_worker.py, in strict device mode) compares each schedule flag against the same
layout without it; one 2-rank torchrun trains through the CLI with the flags that used to crash.
"""

import dataclasses

import pytest
import torch
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

import launch
from _training import SMALL, STRICT_DEVICES, logged_losses, run_train
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError, ParallelLayoutError
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.export import choose_family
from spannorm_megatron.hf.megatron_reader import local_model_config
from spannorm_megatron.model import build_gpt_model, transformer_config
from spannorm_megatron.model.moe_kernels import check_moe_kernels
from spannorm_megatron.model.specs import transformer_engine_available
from spannorm_megatron.runtime import has_accelerator
from spannorm_megatron.training.arguments import parse_args
from spannorm_megatron.training.trainer import Trainer

SEQ = 8
MOE = ["--num-experts", "4"]
cpu_only = pytest.mark.skipif(has_accelerator(), reason="checks what a CPU machine lacks")


def parse(*flags):
    return parse_args([*SMALL, *flags])


def megatron_config(*flags):
    """megatron-core's TransformerConfig for a command line, as the Trainer builds it."""
    job = parse(*flags)
    return transformer_config(dataclasses.replace(job.model, vocab_size=512),
                              **job.parallel.transformer_kwargs())


def moe_model(**fields):
    config = ModelConfig.recommended(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=64,
        max_sequence_length=SEQ, num_experts=4, moe_ffn_hidden_size=32, transformer_impl="local",
        **fields)
    return config, build_gpt_model(config, transformer_config(config))


def routing_of(router, record: list):
    """Record each forward's routing map ([tokens, experts] bool) of `router`."""
    return router.register_forward_hook(lambda _m, _i, output: record.append(output[1].detach()))


# ---------------------------------------------------------------------------- handed over
@pytest.mark.parametrize("flags,expected", [
    ((*MOE, "--moe-token-dispatcher-type", "alltoall", "--moe-shared-expert-intermediate-size",
      "64", "--moe-shared-expert-overlap", "--moe-layer-recompute", "--moe-input-jitter-eps",
      "0.25", "--moe-router-force-load-balancing", "--moe-enable-routing-replay"),
     dict(moe_shared_expert_overlap=True, moe_layer_recompute=True, moe_input_jitter_eps=0.25,
          moe_router_force_load_balancing=True, moe_enable_routing_replay=True,
          recompute_granularity="selective", recompute_modules=["core_attn", "moe"])),
    ((*MOE, "--moe-router-topk", "1", "--moe-router-pre-softmax", "--moe-apply-probs-on-input"),
     dict(moe_apply_probs_on_input=True, moe_router_topk=1)),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2"),
     dict(overlap_p2p_comm=False, batch_p2p_comm=True, virtual_pipeline_model_parallel_size=None)),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-virtual-stages-per-pipeline-rank", "2"),
     dict(overlap_p2p_comm=True, batch_p2p_comm=False, microbatch_group_size_per_vp_stage=2,
          overlap_p2p_comm_warmup_flush=False)),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-virtual-stages-per-pipeline-rank", "2",
      "--microbatch-group-size-per-virtual-pipeline-stage", "4",
      "--overlap-p2p-communication-warmup-flush"),
     dict(overlap_p2p_comm=True, batch_p2p_comm=False, microbatch_group_size_per_vp_stage=4,
          overlap_p2p_comm_warmup_flush=True)),
    (("--num-layers", "8", "--pipeline-model-parallel-size", "4",
      "--num-virtual-stages-per-pipeline-rank", "2", "--no-overlap-p2p-communication"),
     dict(overlap_p2p_comm=False, batch_p2p_comm=True)),
    # One model chunk per stage is the plain 1F1B schedule, as Megatron-LM reads it (it once crashed:
    # this became virtual stages of size 1, and the schedule then indexed the model list).
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "2"),
     dict(virtual_pipeline_model_parallel_size=None, overlap_p2p_comm=False)),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1"),
     dict(virtual_pipeline_model_parallel_size=2, overlap_p2p_comm=True)),
    # The embedding counts as a layer: (7 + 1) / 2 stages / 2 per chunk.
    (("--num-layers", "7", "--pipeline-model-parallel-size", "2",
      "--account-for-embedding-in-pipeline-split", "--num-layers-per-virtual-pipeline-stage",
      "2"), dict(virtual_pipeline_model_parallel_size=2)),
    (("--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "1"),
     dict(virtual_pipeline_model_parallel_size=None)),
])
def test_flags_reach_megatron_core_with_their_meaning(flags, expected):
    config = megatron_config(*flags)
    assert {name: getattr(config, name) for name in expected} == expected


def test_rank_order_and_pipeline_backend_reach_initialize():
    parallel = parse("--pipeline-model-parallel-size", "2", "--use-tp-pp-dp-mapping").parallel
    assert parallel.rank_order == "tp-cp-ep-pp-dp"
    assert parse().parallel.rank_order == "tp-cp-ep-dp-pp"  # megatron-core's default


def test_flags_megatron_lm_ignores_are_announced_not_dropped_silently():
    args = parse("--moe-extended-tp", "--no-scatter-gather-tensors-in-pipeline", *MOE,
                 "--moe-pad-experts-for-cuda-graph-inference")
    notices = "\n".join(args.notices)
    for flag in ("--moe-extended-tp", "--no-scatter-gather-tensors-in-pipeline",
                 "--moe-pad-experts-for-cuda-graph-inference"):
        assert f"{flag} accepted with no effect" in notices
    assert "--expert-tensor-parallel-size" in notices  # what replaced extended TP
    replay = parse(*MOE, "--moe-enable-routing-replay").notices
    assert len(replay) == 1 and "sets no record/replay action" in replay[0]
    assert parse().notices == []


# ---------------------------------------------------------------------------- refused
@pytest.mark.parametrize("flags,expected", [
    (("--moe-use-upcycling",), "--moe-use-upcycling is not available in spannorm-train: "
     "Megatron-LM converts a dense checkpoint"),
    (("--moe-upcycling-granularity", "2"), "--moe-upcycling-granularity is not available"),
    (("--overlap-moe-expert-parallel-comm",), "fine_grained_callables.py"),
    (("--delay-wgrad-compute",), "--delay-wgrad-compute is not available"),
    (("--ep-overlap-early-attn-memory-release",), "is not available"),
    (("--defer-embedding-wgrad-compute",), "gradient accumulation fusion"),
    (("--wgrad-deferral-limit", "2"), "--wgrad-deferral-limit is not available"),
    (("--moe-input-jitter-eps", "0.1", "--moe-layer-recompute"),
     "--moe-layer-recompute, --moe-input-jitter-eps apply to MoE models, and this model is dense"),
    ((*MOE, "--moe-shared-expert-overlap"), "there is none: add --moe-shared-expert-"),
    ((*MOE, "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap"),
     "--moe-token-dispatcher-type is allgather: use alltoall"),
    ((*MOE, "--moe-use-legacy-grouped-gemm"), "add --moe-grouped-gemm"),
    ((*MOE, "--moe-enable-deepep"), "add --moe-token-dispatcher-type flex"),
    ((*MOE, "--moe-flex-dispatcher-backend", "hybridep"), "applies to --moe-token-dispatcher"),
    ((*MOE, "--moe-deepep-num-sms", "8"), "--moe-deepep-num-sms applies to the flex"),
    ((*MOE, "--moe-hybridep-num-sms", "8"), "--moe-hybridep-num-sms applies to the flex"),
    ((*MOE, "--moe-apply-probs-on-input"), "--moe-router-topk 1 only (it is 2)"),
    ((*MOE, "--moe-router-padding-for-quantization"), "not supported by the allgather"),
    ((*MOE, "--moe-token-dispatcher-type", "alltoall", "--moe-router-padding-for-fp8"),
     "and this run has no FP8: add --fp8-format"),
    ((*MOE, "--moe-layer-recompute", "--recompute-granularity", "full"),
     "--moe-layer-recompute is selective recompute"),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-virtual-stages-per-pipeline-rank", "2", "--no-overlap-p2p-communication"),
     "needs --pipeline-model-parallel-size > 2 (it is 2)"),
    (("--overlap-p2p-communication-warmup-flush",), "applies to the interleaved schedule"),
    (("--microbatch-group-size-per-virtual-pipeline-stage", "4"),
     "applies to the interleaved schedule"),
    (("--num-layers", "8", "--pipeline-model-parallel-size", "4",
      "--num-virtual-stages-per-pipeline-rank", "2", "--no-overlap-p2p-communication",
      "--overlap-p2p-communication-warmup-flush"), "drop one of them"),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-virtual-stages-per-pipeline-rank", "2",
      "--microbatch-group-size-per-virtual-pipeline-stage", "1"), "is below --pipeline-model"),
    (("--pipeline-model-parallel-size", "2", "--use-tp-pp-dp-mapping", *MOE,
      "--expert-model-parallel-size", "2"), "must equal --tensor-model-parallel-size 1"),
    # With the virtual-pipeline size too, one of them was silently dropped.
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1", "--virtual-pipeline-model-parallel-size",
      "2"), "--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank "
     "both set"),
    (("--num-layers", "4", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "1", "--decoder-first-pipeline-num-layers",
      "1"), "makes them uneven: give --num-virtual-stages-per-pipeline-rank instead"),
    (("--num-layers", "6", "--pipeline-model-parallel-size", "2",
      "--num-layers-per-virtual-pipeline-stage", "2"),
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size x "
     "--num-layers-per-virtual-pipeline-stage = 4"),
])
def test_refused_at_parse_time_naming_the_flag_and_the_fix(flags, expected):
    with pytest.raises(ConfigError) as error:
        parse(*flags)
    assert expected in str(error.value)


@cpu_only
@pytest.mark.parametrize("flags,expected", [
    # Once: four chained tracebacks from inside module construction before.
    ((*MOE, "--moe-grouped-gemm"), "--moe-grouped-gemm needs Transformer Engine's grouped "
     "linears"),
    ((*MOE, "--moe-grouped-gemm", "--moe-use-legacy-grouped-gemm"),
     "--moe-use-legacy-grouped-gemm asks for megatron-core's legacy GroupedMLP"),
    ((*MOE, "--moe-permute-fusion"), "--moe-permute-fusion needs Transformer Engine >= 2.1"),
    ((*MOE, "--moe-router-fusion"), "--moe-router-fusion needs Transformer Engine >= 2.7"),
    ((*MOE, "--moe-latent-size", "16"), "--moe-latent-size builds its two projections"),
    (("--pipeline-model-parallel-comm-backend", "nccl"), "backend nccl needs GPUs"),
    (("--pipeline-model-parallel-comm-backend", "ucc"), "a PyTorch built with UCC"),
    (("--use-ring-exchange-p2p",), "torch.distributed.ring_exchange"),
])
def test_refused_by_the_trainer_before_any_process_group(corpus, flags, expected):
    data, tokenizer = corpus
    before = torch.distributed.is_initialized()
    with pytest.raises(ConfigError) as error:
        Trainer(parse("--data-path", data, "--tokenizer-model", tokenizer, *flags))
    assert expected in str(error.value)
    assert torch.distributed.is_initialized() == before


@cpu_only
@pytest.mark.parametrize("backend,package", [("deepep", "deep_ep.Buffer"),
                                             ("hybridep", "deep_ep.HybridEPBuffer")])
def test_flex_dispatcher_needs_its_deep_ep_backend(corpus, backend, package):
    flags = (*MOE, "--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend",
             backend)
    # describable anywhere (a GPU run's)
    config = dataclasses.replace(parse(*flags).model, vocab_size=512)
    with pytest.raises(ConfigError, match=f"backend needs {package}"):
        check_moe_kernels(config)
    data, tokenizer = corpus
    with pytest.raises(ParallelLayoutError, match="flex needs tensor_model_parallel_size x "
                                                  "expert_model_parallel_size > 1"):
        Trainer(parse("--data-path", data, "--tokenizer-model", tokenizer, *flags))


@cpu_only
def test_grouped_gemm_without_transformer_engine_is_one_clear_error_from_python(seeded):
    config = ModelConfig.recommended(num_layers=2, hidden_size=32, num_attention_heads=4,
                                     vocab_size=64, num_experts=4, moe_grouped_gemm=True,
                                     transformer_impl="local")
    with pytest.raises(ConfigError, match="Drop --moe-grouped-gemm: the experts then run one "
                                          "after another"):
        build_gpt_model(config, transformer_config(config))


def test_microbatch_groups_are_checked_against_the_step():
    parallel = ParallelConfig(pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2,
                              microbatch_group_size_per_vp_stage=3)
    parallel.check_microbatches(6)
    with pytest.raises(ConfigError, match="groups of 3"):
        parallel.check_microbatches(2)
    with pytest.raises(ConfigError, match="last group of micro-batches would hold 1"):
        parallel.check_microbatches(4)
    ParallelConfig(pipeline_model_parallel_size=2).check_microbatches(1)  # not interleaved


def test_exports_refuse_what_no_exported_model_computes():
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                num_experts=4)
    for fields, expected in ((dict(moe_router_force_load_balancing=True), "random logits"),
                             (dict(moe_router_topk=1, moe_router_pre_softmax=True,
                                   moe_apply_probs_on_input=True), "scales the experts' input"),
                             (dict(moe_latent_size=16), "latent projections")):
        with pytest.raises(ConversionError, match=expected):
            choose_family(ModelConfig.recommended(**base, **fields), "auto")
    _, notes = choose_family(ModelConfig.recommended(**base, moe_input_jitter_eps=0.1), "auto")
    assert any("without megatron's input jitter" in note for note in notes)


def test_single_process_readers_drop_gpu_only_kernels():
    config = ModelConfig.recommended(num_layers=2, hidden_size=32, num_attention_heads=4,
                                     vocab_size=64, num_experts=4, moe_permute_fusion=True,
                                     moe_router_fusion=True, moe_token_dispatcher_type="flex",
                                     moe_flex_dispatcher_backend="hybridep")
    local = local_model_config(config)
    assert (local.moe_permute_fusion, local.moe_router_fusion, local.moe_token_dispatcher_type,
            local.moe_flex_dispatcher_backend) == (False, False, "alltoall", "deepep")


# ---------------------------------------------------------------------------- what they do
def test_input_jitter_scales_the_router_input_within_eps(seeded):
    _, model = moe_model(moe_input_jitter_eps=0.1)
    router = model.decoder.layers[0].mlp.router
    seen = {}
    gating = router.gating

    def observed_gating(x):
        seen["gating"] = x.detach()
        return gating(x)

    router.gating = observed_gating
    router.register_forward_pre_hook(lambda _m, args: seen.update(input=args[0].detach()))
    x = torch.randn(SEQ, 2, 32)
    router(x)
    ratio = seen["gating"] / seen["input"]
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert (ratio - 1).abs().max() > 0.05  # not the identity
    first = seen["gating"]
    router(x)
    assert not torch.equal(seen["gating"], first)  # fresh noise every forward

    _, plain = moe_model()
    plain_router = plain.decoder.layers[0].mlp.router
    plain_gating = plain_router.gating
    plain_router.gating = lambda v: (seen.update(plain=v.detach()), plain_gating(v))[1]
    plain_router(x)
    assert torch.equal(seen["plain"], x)


def test_forced_load_balancing_routes_by_random_logits(seeded):
    tokens = torch.randn(64, 2, 32).abs() + 1.0  # positive: the weights below decide routing

    def routed_counts(**fields):
        _, model = moe_model(**fields)
        mlp = model.decoder.layers[0].mlp
        with torch.no_grad():  # experts 0 and 1 win every token by a wide margin
            mlp.router.weight.copy_(torch.tensor([10.0, 10.0, -10.0, -10.0])[:, None]
                                    .expand(4, 32))
        maps = []
        routing_of(mlp.router, maps)
        output, _ = mlp(tokens)
        output.sum().backward()
        return maps[0].sum(dim=0).tolist(), mlp.router.weight.grad

    counts, _ = routed_counts()
    assert counts == [128, 128, 0, 0]
    counts, grad = routed_counts(moe_router_force_load_balancing=True)
    assert sum(counts) == 128 * 2 and counts[2] > 0 and counts[3] > 0
    assert grad is not None and grad.abs().sum() > 0  # straight-through to the router weights


@pytest.mark.parametrize("on_input", [False, True])
def test_apply_probs_on_input_scales_what_the_expert_reads(seeded, on_input):
    _, model = moe_model(moe_router_topk=1, moe_router_pre_softmax=True,
                         moe_apply_probs_on_input=on_input)
    mlp = model.decoder.layers[0].mlp
    probs_seen = []
    mlp.router.register_forward_hook(lambda _m, _i, out: probs_seen.append(out))
    x = torch.randn(SEQ, 2, 32)
    with torch.no_grad():
        output, _ = mlp(x)
        probs, routing_map = probs_seen[0]
        tokens = x.reshape(-1, 32)
        expected = {True: torch.zeros_like(tokens), False: torch.zeros_like(tokens)}
        for e, expert in enumerate(mlp.experts.local_experts):
            rows = routing_map[:, e].nonzero().squeeze(1)
            p = probs[rows, e]
            expected[False][rows] = expert(tokens[rows], p)[0]  # p x expert(x)
            expected[True][rows] = expert(tokens[rows] * p[:, None], torch.ones_like(p))[0]
    assert not torch.allclose(expected[True], expected[False], atol=1e-4)
    torch.testing.assert_close(output.reshape(-1, 32), expected[on_input], rtol=1e-5, atol=1e-6)


def test_moe_layer_recompute_recomputes_the_layer_and_changes_no_gradient(seeded):
    _, plain = moe_model()
    _, recomputed = moe_model(moe_layer_recompute=True)
    recomputed.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    calls = {}
    grads = {}
    for name, model in (("plain", plain), ("recomputed", recomputed)):
        calls[name] = 0
        for layer in model.decoder.layers:
            layer.mlp.experts.register_forward_hook(
                lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        model(tokens, positions, None, labels=tokens).sum().backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    assert calls == {"plain": 2, "recomputed": 4}  # each MoE layer ran again in backward
    for name, grad in grads["plain"].items():
        assert torch.equal(grad, grads["recomputed"][name]), name


def test_routing_replay_records_and_replays_the_top_k_choices(seeded):
    _, model = moe_model(moe_enable_routing_replay=True)
    # Only this model's routers are megatron-core's replay instances (build_model clears the
    # process-wide list; build_gpt_model alone does not, so use its routers explicitly).
    routers = [layer.mlp.router for layer in model.decoder.layers]
    RouterReplay.global_router_replay_instances[:] = [r.router_replay for r in routers]
    tokens = torch.randint(0, 64, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    maps = []
    for router in routers:
        routing_of(router, maps)
    try:
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        model(tokens, positions, None)
        recorded = RouterReplay.get_recorded_data()
        with torch.no_grad():
            for router in routers:
                router.weight.copy_(torch.randn_like(router.weight) * 5)
        RouterReplay.set_global_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        RouterReplay.set_replay_data(recorded)
        model(tokens, positions, None)
        RouterReplay.clear_global_router_replay_action()
        model(tokens, positions, None)
    finally:
        RouterReplay.clear_global_router_replay_action()
        RouterReplay.clear_global_indices()
        RouterReplay.clear_global_router_replay_instances()
    recorded_maps, replayed_maps, new_maps = maps[0:2], maps[2:4], maps[4:6]
    assert all(torch.equal(a, b) for a, b in zip(recorded_maps, replayed_maps))
    assert not all(torch.equal(a, b) for a, b in zip(recorded_maps, new_maps))


# ---------------------------------------------------------------------------- multi-rank
@pytest.fixture(scope="module")
def schedule_records(torchrun, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_pp")
    result = torchrun(launch.TESTS / "_moe_pp_worker.py", out, nproc=4, timeout=900,
                      env=STRICT_DEVICES)
    launch.check_launch(result, out)
    return lambda case: launch.rank_results(out / case, 4)


def assert_same_training(a, b, rtol):
    for x, y in zip(a, b):
        assert x["losses"] == pytest.approx(y["losses"], rel=rtol)
        assert x["grad_norms"] == pytest.approx(y["grad_norms"], rel=rtol)


def test_batched_p2p_trains_as_the_overlapped_one(schedule_records):
    overlapped, batched = schedule_records("pp4_vpp2"), schedule_records("pp4_vpp2_batched_p2p")
    assert {(r["overlap_p2p_comm"], r["batch_p2p_comm"]) for r in overlapped} == {(True, False)}
    assert {(r["overlap_p2p_comm"], r["batch_p2p_comm"]) for r in batched} == {(False, True)}
    assert_same_training(batched, overlapped, rtol=1e-6)


def test_microbatch_groups_reorder_the_chunks_and_change_no_number(schedule_records):
    default = schedule_records("tp2_pp2_vpp2")
    grouped = schedule_records("tp2_pp2_vpp2_group4_flush")
    # 4 micro-batches per step through 2 model chunks: in groups of 2 (the stage count), or
    # all 4 through chunk 0 before chunk 1.
    assert {tuple(r["forward_order"]) for r in default} == {(0, 0, 1, 1, 0, 0, 1, 1)}
    assert {tuple(r["forward_order"]) for r in grouped} == {(0, 0, 0, 0, 1, 1, 1, 1)}
    assert all(r["overlap_p2p_comm_warmup_flush"] for r in grouped)
    assert_same_training(grouped, default, rtol=1e-5)


def test_tp_pp_dp_mapping_puts_the_pipeline_in_neighbouring_ranks(schedule_records):
    default, mapped = schedule_records("pp2_dp2"), schedule_records("pp2_dp2_tp_pp_dp")
    assert [r["pipeline_ranks"] for r in default] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["pipeline_ranks"] for r in mapped] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert_same_training(mapped, default, rtol=1e-5)


def test_shared_expert_overlap_under_tp_sp_ep(schedule_records):
    plain = schedule_records("tp2_sp_ep2_moe")
    overlapped = schedule_records("tp2_sp_ep2_moe_shared_overlap")
    assert all(r["shared_expert_overlap"] and all(r["shared_expert_overlap"])
               for r in overlapped)
    assert not any(any(r["shared_expert_overlap"]) for r in plain)
    # The shared expert's gradient reaches the layer input in another order (megatron-core).
    assert_same_training(overlapped, plain, rtol=1e-5)


def test_cli_trains_with_one_chunk_per_stage_and_moe_flags(corpus, torchrun):
    """A crash once: --num-layers-per-virtual-pipeline-stage giving one chunk per stage
    under torchrun ended in "'DistributedDataParallel' object is not subscriptable"."""
    data, tokenizer = corpus
    result = run_train(
        *SMALL, "--data-path", data, "--tokenizer-model", tokenizer, "--train-iters", "3",
        "--num-layers", "4", "--pipeline-model-parallel-size", "2",
        "--num-layers-per-virtual-pipeline-stage", "2", *MOE, "--moe-token-dispatcher-type",
        "alltoall", "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap",
        "--moe-layer-recompute", "--moe-input-jitter-eps", "0.01", "--moe-extended-tp",
        nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = logged_losses(result.stdout)
    assert sorted(losses) == [1, 2, 3] and all(0 < loss < 10 for loss in losses.values())
    assert "--moe-extended-tp accepted with no effect" in result.stdout


# ---------------------------------------------------------------------------- GPUs
needs_te = pytest.mark.skipif(not transformer_engine_available(),
                              reason="needs Transformer Engine on a GPU (docs/gpu.md)")


@needs_te
def test_permute_and_router_fusion_compute_what_pytorch_computes(seeded):
    """Transformer Engine's fused permutation and routing against PyTorch's, same weights,
    grouped GEMM experts; every token goes to every expert (bf16 noise cannot flip a choice)."""
    from dataclasses import replace

    base = ModelConfig.recommended(
        num_layers=2, hidden_size=256, num_attention_heads=8, vocab_size=512,
        max_sequence_length=128, num_experts=4, moe_router_topk=4, moe_grouped_gemm=True,
        moe_token_dispatcher_type="alltoall", transformer_impl="transformer_engine")
    bf16 = dict(bf16=True, params_dtype=torch.bfloat16)
    plain = build_gpt_model(base, transformer_config(base, **bf16)).eval()
    fused_config = replace(base, moe_permute_fusion=True, moe_router_fusion=True)
    fused = build_gpt_model(fused_config, transformer_config(fused_config, **bf16)).eval()
    fused.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 512, (2, 128), device="cuda")
    positions = torch.arange(128, device="cuda").expand(2, -1)
    with torch.no_grad():
        expected = plain(tokens, positions, None).float()
        actual = fused(tokens, positions, None).float()
    error = (actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert error < 2e-2, float(error)
