"""Hugging Face conversion test harness: tiny models of every placement, saved as real
checkpoints, and the layouts the 2-rank worker re-saves them under.

Used by tests/test_hf.py in the pytest process (a world of one) and by tests/_hf_worker.py under
`torchrun --nproc_per_node 2`.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig

VOCAB = 128
SEQ = 16

# DeepSeek-V3-style routing: sigmoid scores, an expert bias balanced by megatron-core's own update
# rule (see `build`), aux-loss free, and a gated shared expert.
DEEPSEEK = dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=0.02, moe_router_load_balancing_type="none",
                moe_shared_expert_gate=True)

# name -> (placement, ModelConfig overrides). The first seven are the parallel-layout set.
COMBOS: Dict[str, tuple] = {
    "prenorm-dense": ("prenorm", {}),
    "prenorm-moe": ("prenorm", {"num_experts": 4}),
    "postnorm-dense": ("postnorm", {}),
    "postnorm-moe": ("postnorm", {"num_experts": 4, "moe_shared_expert_intermediate_size": 48}),
    "spannorm-dense": ("spannorm", {}),
    "spannorm-moe": ("spannorm", {"num_experts": 4}),
    # Our own class: q/k norms, dense layers among MoE layers (also after them), 8 experts in 4
    # groups of which a token uses 2, top-4, scaled weights, fp32 router.
    "spannorm-moe-deepseek": ("spannorm", {
        **DEEPSEEK, "num_layers": 4, "moe_layer_freq": [0, 1, 1, 0], "qk_layernorm": True,
        "num_experts": 8, "moe_router_topk": 4, "moe_router_num_groups": 4,
        "moe_router_group_topk": 2, "moe_router_topk_scaling_factor": 2.5,
        "moe_shared_expert_intermediate_size": 48, "moe_router_dtype": "fp32"}),
}
PARALLEL_COMBOS = tuple(COMBOS)

# Single-process extras: every other export path.
EXTRA_COMBOS: Dict[str, tuple] = {
    "prenorm-moe-shared": ("prenorm", {"num_experts": 4, "moe_shared_expert_intermediate_size": 48}),
    "prenorm-layernorm-bias-gelu": ("prenorm", {
        "normalization": "LayerNorm", "add_bias_linear": True, "swiglu": False,
        "position_embedding_type": "learned_absolute", "untie_embeddings_and_output_weights": False,
        "apply_layernorm_1p": True}),
    "spannorm-forward-layernorm-moe-bias": ("spannorm", {
        "num_experts": 4, "add_bias_linear": True, "normalization": "LayerNorm",
        "scale_mode": "forward", "position_embedding_type": "none"}),
    "postnorm-final-norm-1p": ("postnorm", {"final_norm": True, "apply_layernorm_1p": True,
                                             "rotary_base": 500000}),
    "spannorm-no-n0": ("spannorm", {"first_layer_input_norm": False}),
    "deepnorm-dense": ("deepnorm", {}),
    "perinorm-moe": ("perinorm", {"num_experts": 4}),
    "spannorm_clean-dense": ("spannorm_clean", {}),
    # Qwen3-MoE: q/k norms, a dense first layer (Megatron-LM's --moe-layer-freq).
    "prenorm-moe-qk-mixed": ("prenorm", {"num_experts": 4, "qk_layernorm": True,
                                         "moe_layer_freq": [0, 1]}),
    # GLM-4-MoE: DeepSeek-V3-style routing (sigmoid, expert bias, 2 groups of which a token
    # uses 1, scaled weights), shared experts, a dense first layer, q/k norms.
    "prenorm-moe-glm": ("prenorm", {
        "num_experts": 4, "qk_layernorm": True, "moe_layer_freq": [0, 1],
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_num_groups": 2, "moe_router_group_topk": 1,
        "moe_router_topk_scaling_factor": 2.5, "moe_shared_expert_intermediate_size": 64}),
    # Our own class computing what no native class holds for these placements:
    # (a) q/k norms (RMSNorm; LayerNorm with biases),
    "spannorm-qk": ("spannorm", {"qk_layernorm": True}),
    "postnorm-moe-qk-layernorm": ("postnorm", {"num_experts": 4, "qk_layernorm": True,
                                               "normalization": "LayerNorm"}),
    # (b) dense layers among MoE layers (dense FFN 96, experts 32),
    "spannorm-moe-mixed": ("spannorm", {"num_layers": 3, "num_experts": 4,
                                        "moe_layer_freq": [1, 0, 1]}),
    "perinorm-moe-mixed-qk": ("perinorm", {"num_layers": 3, "num_experts": 4,
                                           "moe_layer_freq": [0, 1, 0], "qk_layernorm": True}),
    # (c) DeepSeek-V3-style routing: 2 groups of 4 experts, a token's group scored by its top 3
    # (which GLM-4-MoE cannot: it scores by the top 2), an MoE layer before a dense one;
    "postnorm-moe-deepseek": ("postnorm", {
        **DEEPSEEK, "moe_layer_freq": [1, 0], "qk_layernorm": True, "num_experts": 8,
        "moe_router_topk": 3, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
        "moe_router_topk_scaling_factor": 1.5, "moe_shared_expert_intermediate_size": 32}),
    # sigmoid top-1 (not renormalized) with the expert bias,
    "deepnorm-moe-sigmoid-top1": ("deepnorm", {
        "num_experts": 4, "moe_router_topk": 1, "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.05,
        "moe_router_load_balancing_type": "none"}),
    # softmax before the top-k (not renormalized), and after it, both group-limited and scaled,
    "spannorm_clean-moe-presoftmax-groups": ("spannorm_clean", {
        "num_experts": 4, "moe_router_pre_softmax": True, "moe_router_num_groups": 2,
        "moe_router_group_topk": 1, "moe_router_topk_scaling_factor": 2.0}),
    "perinorm-moe-softmax-groups": ("perinorm", {
        "num_experts": 4, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
        "moe_router_topk_scaling_factor": 0.5}),
    # and prenorm's gated shared expert, which no native class is exported with.
    "prenorm-moe-gated-shared": ("prenorm", {"num_experts": 4,
                                             "moe_shared_expert_intermediate_size": 48,
                                             "moe_shared_expert_gate": True}),
}

# Models with --qk-layernorm, mixed dense/MoE layers or routing beyond top-k + softmax that our
# own class holds: no native class computes them in these placements.
OWN_CLASS_RECIPES = ("spannorm-moe-deepseek", "spannorm-qk", "postnorm-moe-qk-layernorm",
                     "spannorm-moe-mixed", "perinorm-moe-mixed-qk", "postnorm-moe-deepseek",
                     "deepnorm-moe-sigmoid-top1", "spannorm_clean-moe-presoftmax-groups",
                     "perinorm-moe-softmax-groups", "prenorm-moe-gated-shared")

LAYOUTS: Dict[str, ParallelConfig] = {
    "tp2": ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": ParallelConfig(pipeline_model_parallel_size=2),
    "ep2": ParallelConfig(expert_model_parallel_size=2),  # MoE only (DP2 x EP2)
}
IMPORT_LAYOUTS = {"tp2": PARALLEL_COMBOS, "pp2": ("spannorm-dense", "spannorm-moe-deepseek"),
                  "ep2": ("postnorm-moe", "spannorm-moe-deepseek")}


def layout_applies(layout: str, combo: str) -> bool:
    return layout != "ep2" or "moe" in combo


def model_config(combo: str, vocab_size: int = VOCAB) -> ModelConfig:
    placement, overrides = {**COMBOS, **EXTRA_COMBOS}[combo]
    values = dict(
        norm_placement=placement, num_layers=2, hidden_size=64, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=96, vocab_size=vocab_size, max_sequence_length=64,
        init_method_std=0.1, moe_router_topk=2, moe_ffn_hidden_size=32,
        transformer_impl="local",
    )
    values.update(overrides)
    return ModelConfig.recommended(**values)


def build(config: ModelConfig, seed: int = 0):
    """A single-process model of `config` whose norms and biases are not at their trivial init
    (so a gain or bias put in the wrong place shows in the logits), and whose expert bias (the
    balancing bias that steers the choice) is not zero: trained by megatron-core's own update
    when the config sets moe_router_bias_update_rate, else random."""
    from spannorm_megatron.model import build_gpt_model, transformer_config

    model = build_gpt_model(config, transformer_config(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias") or name.endswith("gate_weight"):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))
        if config.moe_router_bias_update_rate is None:
            for name, buffer in model.named_buffers():
                if name.endswith("expert_bias"):
                    buffer.add_(0.05 * torch.randn(buffer.shape, generator=generator))
    if config.moe_router_bias_update_rate is not None:
        balance_expert_bias(model, seed=seed)
    return model.eval()


BALANCING_STEPS = 6


def balance_expert_bias(model, seed: int = 0, steps: int = BALANCING_STEPS) -> None:
    """Move the routers' expert bias as aux-loss-free training does: `steps` training-mode
    forwards (the routers count the tokens each expert got) each followed by megatron-core's
    end-of-batch update (finalize_model_grads' _update_router_expert_bias: +-rate toward the
    mean load) and counter reset."""
    from megatron.core.distributed.finalize_model_grads import (
        _update_router_expert_bias,
        reset_model_temporary_tensors,
    )

    model.train()
    for step in range(steps):
        ids = tokens(batch=4, seed=1000 * seed + step)
        with torch.enable_grad():
            megatron_logits_in_training(model, ids)
        with torch.no_grad():
            _update_router_expert_bias([model], model.config)
        reset_model_temporary_tensors(model.config, [model])
    model.eval()


def megatron_logits_in_training(model, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, attention_mask=None)


def save(model_chunks, config: ModelConfig, save_dir: str,
         parallel: Optional[ParallelConfig] = None, iteration: int = 1,
         args: Optional[dict] = None) -> str:
    """Save with the checkpoint package (run record, manifest); returns the iteration dir."""
    from spannorm_megatron.checkpoint import save_checkpoint

    return save_checkpoint(save_dir, iteration, list(model_chunks), None, None,
                           model_config=config, parallel_config=parallel or ParallelConfig(),
                           consumed_train_samples=0, no_save_rng=True, args=args)


def tokens(batch: int = 2, seq: int = SEQ, vocab: int = VOCAB, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    return model(ids, positions, attention_mask=None).float()


def state_of(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if "_extra_state" not in k}


def worker_dirs(root: str) -> Dict[str, str]:
    return {"ref": os.path.join(root, "ref"), "hf": os.path.join(root, "hf"),
            "out": os.path.join(root, "out")}
