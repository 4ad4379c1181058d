"""Rank program for tests/test_runtime.py, launched by torchrun.

Usage: torchrun --standalone --nproc_per_node N tests/_runtime_worker.py OUT_DIR SCENARIO...

Each scenario initialises a parallel layout through ``spannorm_megatron.process.initialize``,
builds megatron-core's own ``GPTModel`` (local spec), wraps it in megatron's
DistributedDataParallel, trains a few steps with the training loop's ``train_step`` (megatron-core's
``get_forward_backward_func()`` and a megatron optimizer), and records what the test needs to judge it: losses, grad norms, which
parameters changed, parameter fingerprints (to compare ranks that must agree), RNG draws.
The test, not this script, decides pass/fail from ``OUT_DIR/rank<r>.json`` (tests/launch.py's
protocol). Starting torchrun costs ~10 s of imports on a 2-core machine, so one launch runs many
scenarios.
"""

from __future__ import annotations

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import re
import sys
import zlib
from functools import partial

import torch

from launch import reporting, write_result
from spannorm_megatron import process, runtime
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.training.loop import train_step

VOCAB = 128
SEQ = 16
MICRO_BATCH = 2
HIDDEN = 64
STEPS = 4

# name -> (initialize kwargs, model/optimizer options)
SCENARIOS = {
    # 2 ranks
    # bf16 goes through Float16Module and Float16OptimizerWithFloat16Params.
    "tp2_bf16": (dict(tensor_model_parallel_size=2), dict(bf16=True)),
    "tp2_sp": (dict(tensor_model_parallel_size=2), dict(sequence_parallel=True)),
    # pp2 and pp2_vpp2 start from the same weights (canonical_init) and data, so the
    # interleaved schedule must reproduce the 1F1B losses.
    "pp2": (
        dict(pipeline_model_parallel_size=2),
        dict(microbatches=4, layers=4, tied=True, canonical_init=True),
    ),
    "pp2_vpp2": (
        dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        dict(microbatches=4, layers=4, tied=True, canonical_init=True),
    ),
    "ep2_moe": (dict(expert_model_parallel_size=2), dict(moe=True)),
    "dp2_distopt": (dict(), dict(distributed_optimizer=True)),
    # 4 ranks
    "tp2_pp2_sp_distopt": (
        dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
        dict(microbatches=4, distributed_optimizer=True, sequence_parallel=True, tied=True,
             bf16=True),
    ),
    "tp2_ep2_sp_moe_distopt": (
        dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
             expert_tensor_parallel_size=1),
        dict(moe=True, distributed_optimizer=True, sequence_parallel=True),
    ),
}


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """LayerNorm usable with sequence parallelism.

    megatron-core's local-spec norm (WrappedTorchNorm) refuses sequence_parallel. Marking the
    parameters ``sequence_parallel`` makes ``finalize_model_grads`` all-reduce their grads
    over the tensor-parallel group, which is what megatron's fused norms do.
    """

    def __init__(self, config, hidden_size, eps=1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        for param in self.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)


def _layer_spec(config, moe: bool, num_layers_here: int):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
    )

    layer = get_gpt_layer_local_spec(num_experts=4 if moe else None)
    if not config.sequence_parallel:
        return layer
    layer.submodules.input_layernorm = SequenceParallelLayerNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelLayerNorm
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer] * num_layers_here, layer_norm=SequenceParallelLayerNorm
        ),
    )


def _build(opts, layout):
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    from megatron.core.transformer.module import Float16Module

    moe = opts.get("moe", False)
    dtype = torch.bfloat16 if opts.get("bf16") else torch.float32
    layers = opts.get("layers", 2)
    vpp = layout.virtual_pipeline_model_parallel_size
    config = TransformerConfig(
        num_layers=layers,
        hidden_size=HIDDEN,
        num_attention_heads=4,
        ffn_hidden_size=2 * HIDDEN,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        sequence_parallel=opts.get("sequence_parallel", False),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        add_bias_linear=not moe,
        num_moe_experts=4 if moe else None,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=1e-2 if moe else 0.0,
        **runtime.megatron_device_kwargs(),
    )
    pp = layout.pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=_layer_spec(config, moe, layers // (pp * (vpp or 1))),
            vocab_size=VOCAB,
            max_sequence_length=SEQ,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=opts.get("tied", False),
            position_embedding_type="rope",
            vp_stage=stage,
        )
        if opts.get("canonical_init"):
            _canonical_init(model)
        if config.bf16:
            model = Float16Module(config, model)  # as Megatron-LM wraps half-precision models
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=opts.get("distributed_optimizer", False)
        )
        chunks.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=model,
                disable_bucketing=vp_stage > 0,
            )
        )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=3e-3,
            weight_decay=0.0,
            clip_grad=1.0,
            use_distributed_optimizer=opts.get("distributed_optimizer", False),
            params_dtype=dtype,
            bf16=config.bf16,
        ),
        chunks,
    )
    # What Megatron-LM's training loop wires in: grad sync, tied-embedding and
    # sequence-parallel norm reductions run here at the end of forward_backward_func.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks]
    if len(chunks) == 1:
        config.no_sync_func = config.no_sync_func[0]
    return config, chunks, optimizer


def _canonical_name(model, name: str) -> str:
    """Parameter name with the *global* layer number, the same under any pipeline split."""
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match is None:
        return name
    return f"layer{model.decoder.layers[int(match.group(1))].layer_number}.{match.group(2)}"


def _canonical_init(model) -> None:
    """Weights that depend only on the canonical name, so that two pipeline layouts of the
    same (tensor-parallel size 1) model start identical."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            cname = _canonical_name(model, name)
            if cname == "output_layer.weight" and model.share_embeddings_and_output_weights:
                cname = "embedding.word_embeddings.weight"  # tied: same start on both stages
            gen = torch.Generator().manual_seed(zlib.crc32(cname.encode()))
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            if "layernorm.weight" in cname:
                param.add_(1.0)


def _batches(num_microbatches: int):
    """Fixed token batches, different per data-parallel rank, equal across TP/PP/EP ranks."""
    from megatron.core import parallel_state

    gen = torch.Generator().manual_seed(7 + parallel_state.get_data_parallel_rank())
    out = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=gen)
        out.append(
            {
                "tokens": tokens[:, :-1].contiguous(),
                "labels": tokens[:, 1:].contiguous(),
                "position_ids": torch.arange(SEQ).expand(MICRO_BATCH, SEQ).contiguous(),
            }
        )
    return out


_LOCAL_REPORTS = []
"""This rank's [loss sum, tokens] of each micro-batch of the current step."""


def _loss_func(loss_mask, output_tensor):
    """megatron-core's 3-tuple form (token sum, token count, what to report), which the
    schedule turns into the micro-batch mean. train_step logs the report reduced over data
    parallelism; the report is also kept here, so that the tests can tell the data-parallel
    ranks' own losses apart (`local_losses`)."""
    loss_sum = (output_tensor.float() * loss_mask).sum()
    count = loss_mask.sum()
    report = torch.stack([loss_sum.detach(), count])
    _LOCAL_REPORTS.append(report)
    return loss_sum, count.to(torch.int), {"lm loss": report}


def _local_loss():
    """This rank's token-weighted loss of the step just taken (None off the last stage)."""
    if not _LOCAL_REPORTS:
        return None
    total = torch.stack(_LOCAL_REPORTS).double().sum(dim=0)
    _LOCAL_REPORTS.clear()
    return (total[0] / total[1]).item()


def _forward_step(data_iterator, model):
    from megatron.core.utils import get_attr_wrapped_model

    # The training step gives a rank's model chunks one iterator: only the chunk with the
    # embedding or the loss draws from it.
    if not (get_attr_wrapped_model(model, "pre_process")
            or get_attr_wrapped_model(model, "post_process")):
        return model(None, None, None), partial(_loss_func, None)
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, torch.ones_like(batch["labels"], dtype=torch.float))


def _fingerprint(tensor: torch.Tensor) -> list[float]:
    t = tensor.detach().double().flatten()
    weights = torch.arange(1, t.numel() + 1, dtype=torch.float64)
    return [t.sum().item(), (t * t).sum().item(), (t * weights).sum().item()]


def _gpt(chunk):
    """The GPTModel inside DDP (and Float16Module)."""
    from megatron.core.models.gpt import GPTModel

    model = chunk.module
    while not isinstance(model, GPTModel):
        model = model.module
    return model


def _params(chunks):
    out = {}
    for chunk in chunks:
        model = _gpt(chunk)
        for name, p in model.named_parameters():
            out[_canonical_name(model, name)] = p
    return out


def _p2p_pairing() -> dict:
    """Exchange an "activation" (send_next) and a "gradient" (send_prev) with the one peer of a
    2-rank pipeline group, through megatron's batched p2p helper, unpatched and patched."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import p2p_communication

    patch = process.load_patches().pp2_batched_p2p_order.PATCH
    group = parallel_state.get_pipeline_model_parallel_group()
    peer = torch.distributed.get_global_rank(group, 1 - group.rank())
    me = torch.distributed.get_rank()
    out = {"peer": peer}
    unpatched = (patch.original(p2p_communication, "_batched_p2p_ops") if patch.is_applied()
                 else None)
    for label, fn in (("unpatched", unpatched), ("patched", p2p_communication._batched_p2p_ops)):
        if fn is None:
            out[label] = None
            continue
        recv_prev, recv_next = torch.full((3,), -1.0), torch.full((3,), -1.0)
        reqs = fn(
            tensor_send_prev=torch.full((3,), 100.0 + me),  # gradient to the previous stage
            tensor_recv_prev=recv_prev,
            tensor_send_next=torch.full((3,), 200.0 + me),  # activation to the next stage
            tensor_recv_next=recv_next,
            group=group,
            prev_pipeline_rank=peer,
            next_pipeline_rank=peer,
        )
        for req in reqs:
            req.wait()
        out[label] = {"recv_prev": recv_prev[0].item(), "recv_next": recv_next[0].item()}
    return out


def _rng_draws() -> dict:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        model_parallel = torch.rand(4).tolist()
    with tracker.fork(tensor_parallel.random.get_expert_parallel_rng_tracker_name()):
        expert = torch.rand(4).tolist()
    default = torch.rand(4).tolist()
    return {"default": default, "model_parallel": model_parallel, "expert": expert}


def run_scenario(name: str) -> dict:
    from megatron.core import parallel_state

    init_kwargs, opts = SCENARIOS[name]
    layout = process.initialize(ParallelConfig(**init_kwargs), seed=1234, timeout_minutes=3)
    rng = _rng_draws()
    runtime.set_seed(1234)  # undo the draws: build from the same state as a fresh start
    config, chunks, optimizer = _build(opts, layout)
    params = _params(chunks)
    before = {k: p.detach().clone() for k, p in params.items()}

    num_microbatches = opts.get("microbatches", 2)
    batches = _batches(num_microbatches)
    losses, local_losses, grad_norms = [], [], []
    for _ in range(STEPS):
        result = train_step(chunks, optimizer, None, iter(batches), num_microbatches, SEQ,
                            MICRO_BATCH, num_microbatches * MICRO_BATCH,
                            forward_step_func=_forward_step)
        assert not result.skipped, "optimizer.step() reported an unsuccessful update"
        grad_norms.append(float(result.grad_norm))
        losses.append(result.loss)  # the last pipeline stage's, on every stage
        local_losses.append(_local_loss())

    changed = [k for k, p in params.items() if not torch.equal(p.detach(), before[k])]
    result = {
        "ranks": {
            "tp": parallel_state.get_tensor_model_parallel_rank(),
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "dp": parallel_state.get_data_parallel_rank(),
            "ep": parallel_state.get_expert_model_parallel_rank(),
        },
        "layout": layout.__dict__,
        "losses": losses or None,
        "local_losses": local_losses,
        "grad_norms": grad_norms,
        "num_params": len(params),
        "changed": changed,
        "params": {
            k: {
                "fingerprint": _fingerprint(p),
                "tp_split": bool(getattr(p, "tensor_model_parallel", False)),
                "expert": not getattr(p, "allreduce", True),
            }
            for k, p in params.items()
        },
        "rng": rng,
        "patches": [p.name for p in process.load_patches().UPSTREAM if p.is_applied()],
    }
    if layout.pipeline_model_parallel_size == 2 and layout.world_size == 2:
        result["p2p_pairing"] = _p2p_pairing()
    return result


def main() -> None:
    out_dir, names = sys.argv[1], sys.argv[2:]
    results: dict = {}
    with reporting(out_dir):
        for name in names:
            results[name] = run_scenario(name)
        results["_cpu_runtime"] = process.is_cpu_runtime_enabled()
    write_result(out_dir, results)
    runtime.destroy()


if __name__ == "__main__":
    main()
