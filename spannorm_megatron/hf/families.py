"""Weight names and config.json of each Hugging Face model family, both directions.

Families: ``llama`` (`LlamaForCausalLM`, prenorm dense), ``mixtral`` (`MixtralForCausalLM`,
prenorm MoE), ``qwen2_moe`` (`Qwen2MoeForCausalLM`, prenorm MoE with a shared expert) and
``spannorm`` (our own `SpanNormForCausalLM`, every placement and everything the native classes
cannot express; its files are in `remote_code/`).

The naming map (megatron TP1 state-dict name -> Hugging Face name; ``L.`` = ``decoder.layers.{i}.``,
``H.`` = ``model.layers.{i}.``):

==================================================  ===============================================
megatron                                            Hugging Face
==================================================  ===============================================
embedding.word_embeddings.weight                    model.embed_tokens.weight
embedding.position_embeddings.weight                model.embed_positions.weight (spannorm only)
L.self_attention.linear_qkv.{weight,bias}           H.self_attn.{q,k,v}_proj.{weight,bias} (unpacked
                                                    per query group, see tensors.py)
L.self_attention.linear_proj.{weight,bias}          H.self_attn.o_proj.{weight,bias}
L.mlp.linear_fc1 (SwiGLU [gate; up])                H.mlp.gate_proj + H.mlp.up_proj
L.mlp.linear_fc1 (GeLU, spannorm only)              H.mlp.up_proj
L.mlp.linear_fc2                                    H.mlp.down_proj
L.mlp.router.{weight,bias}                          mixtral: H.block_sparse_moe.gate.weight;
                                                    qwen2_moe, spannorm: H.mlp.gate.{weight,bias}
L.mlp.experts.local_experts.{e}.linear_fc1          mixtral: H.block_sparse_moe.experts.{e}.w1 (gate)
                                                    + .w3 (up); others: H.mlp.experts.{e}.gate_proj +
                                                    .up_proj
L.mlp.experts.local_experts.{e}.linear_fc2          mixtral: ...experts.{e}.w2; others: .down_proj
L.mlp.shared_experts.linear_fc1 / fc2               H.mlp.shared_expert.{gate,up,down}_proj
(no megatron tensor)                                qwen2_moe: H.mlp.shared_expert_gate.weight = 0
                                                    and shared_expert.down_proj stored x2, so
                                                    sigmoid(0) * 2 * down = down exactly
L.<norm slot>.{weight,bias}                         spannorm: H.<norm slot> (same name);
                                                    native: input_layernorm -> H.input_layernorm,
                                                    pre_mlp_layernorm -> H.post_attention_layernorm
decoder.final_layernorm.{weight,bias}               model.norm.{weight,bias}
output_layer.weight                                 lm_head.weight (absent when tied)
==================================================  ===============================================

Norm gains are stored as the gain itself: with `apply_layernorm_1p` megatron stores gain - 1,
so the export adds 1 (and the import subtracts it; in float32 that is exact to one rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from spannorm_megatron.config import ModelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.rules import export_rule
from spannorm_megatron.hf.tensors import merge_swiglu, pack_qkv, split_swiglu, unpack_qkv

Tensors = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    model_type: str
    native: bool
    moe_prefix: str = "mlp"
    """Module holding router and experts in an MoE layer."""
    expert_names: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    """Names of an expert's (gate, up, down) projections."""
    shared_expert_gate: bool = False
    """Qwen2-MoE: a sigmoid gate on the shared expert (exported as zero, see module docstring)."""
    zero_qkv_bias: bool = False
    """Qwen2-MoE: q/k/v projections carry biases (exported as zero)."""


FAMILIES: Dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "LlamaForCausalLM", "llama", native=True),
        Family("mixtral", "MixtralForCausalLM", "mixtral", native=True,
               moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2_moe", native=True,
               shared_expert_gate=True, zero_qkv_bias=True),
        Family("spannorm", "SpanNormForCausalLM", "spannorm", native=False),
    )
}

ARCHITECTURES = {f.architecture: f for f in FAMILIES.values()}


def _heads(config: ModelConfig) -> Tuple[int, int, int]:
    return (config.num_attention_heads, config.resolved_num_query_groups,
            config.hidden_size // config.num_attention_heads)


class _Source:
    """Tensors of one group, handed out once each, so leftovers can be reported."""

    def __init__(self, tensors: Tensors, where: str):
        self.tensors = dict(tensors)
        self.where = where

    def take(self, name: str) -> torch.Tensor:
        try:
            return self.tensors.pop(name)
        except KeyError:
            raise ConversionError(f"{self.where}: tensor {name!r} is missing") from None

    def maybe(self, name: str) -> Optional[torch.Tensor]:
        return self.tensors.pop(name, None)

    def finish(self) -> None:
        if self.tensors:
            raise ConversionError(
                f"{self.where}: tensors {sorted(self.tensors)} have no place in the converted "
                f"model; the checkpoint holds a model this conversion does not know.")


# ============================================================================ megatron -> HF
def _gain_to_hf(weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return weight + 1 if config.apply_layernorm_1p else weight


def _mlp_to_hf(out: Tensors, hf: str, src: _Source, mg: str, swiglu: bool,
               names: Tuple[str, str, str], down_scale: float = 1.0) -> None:
    gate_name, up_name, down_name = names
    for suffix in ("weight", "bias"):
        fc1 = src.take(f"{mg}linear_fc1.{suffix}") if suffix == "weight" else \
            src.maybe(f"{mg}linear_fc1.{suffix}")
        if fc1 is not None:
            if swiglu:
                gate, up = split_swiglu(fc1)
                out[f"{hf}{gate_name}.{suffix}"] = gate
                out[f"{hf}{up_name}.{suffix}"] = up
            else:
                out[f"{hf}{up_name}.{suffix}"] = fc1
        fc2 = src.take(f"{mg}linear_fc2.{suffix}") if suffix == "weight" else \
            src.maybe(f"{mg}linear_fc2.{suffix}")
        if fc2 is not None:
            out[f"{hf}{down_name}.{suffix}"] = fc2 * down_scale if down_scale != 1.0 else fc2


def embedding_to_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    src = _Source(tensors, "embedding")
    out = {"model.embed_tokens.weight": src.take("embedding.word_embeddings.weight")}
    pos = src.maybe("embedding.position_embeddings.weight")
    if pos is not None:
        out["model.embed_positions.weight"] = pos
    src.finish()
    return out


def final_to_hf(config: ModelConfig, tensors: Tensors) -> Tensors:
    src = _Source(tensors, "final norm / output layer")
    out = {}
    weight = src.maybe("decoder.final_layernorm.weight")
    if weight is not None:
        out["model.norm.weight"] = _gain_to_hf(weight, config)
    bias = src.maybe("decoder.final_layernorm.bias")
    if bias is not None:
        out["model.norm.bias"] = bias
    head = src.maybe("output_layer.weight")
    if head is not None:
        out["lm_head.weight"] = head
    src.finish()
    return out


def layer_to_hf(family: Family, config: ModelConfig, layer: int, tensors: Tensors) -> Tensors:
    """One layer's megatron tensors (local names, e.g. ``mlp.linear_fc1.weight``) -> HF tensors."""
    rule = export_rule(config.norm_placement)
    heads, groups, d = _heads(config)
    src = _Source(tensors, f"layer {layer}")
    p = f"model.layers.{layer}."
    out: Tensors = {}
    for slot, hf in rule.layer_norms(config, layer, native=family.native):
        out[f"{p}{hf}.weight"] = _gain_to_hf(src.take(f"{slot}.weight"), config)
        bias = src.maybe(f"{slot}.bias")
        if bias is not None:
            out[f"{p}{hf}.bias"] = bias

    q, k, v = unpack_qkv(src.take("self_attention.linear_qkv.weight"), heads, groups, d)
    out.update({f"{p}self_attn.q_proj.weight": q, f"{p}self_attn.k_proj.weight": k,
                f"{p}self_attn.v_proj.weight": v})
    qkv_bias = src.maybe("self_attention.linear_qkv.bias")
    if qkv_bias is not None:
        q, k, v = unpack_qkv(qkv_bias, heads, groups, d)
    elif family.zero_qkv_bias:
        q, k, v = (torch.zeros(t.shape[0], dtype=t.dtype, device=t.device) for t in (q, k, v))
    if qkv_bias is not None or family.zero_qkv_bias:
        out.update({f"{p}self_attn.q_proj.bias": q, f"{p}self_attn.k_proj.bias": k,
                    f"{p}self_attn.v_proj.bias": v})
    out[f"{p}self_attn.o_proj.weight"] = src.take("self_attention.linear_proj.weight")
    proj_bias = src.maybe("self_attention.linear_proj.bias")
    if proj_bias is not None:
        out[f"{p}self_attn.o_proj.bias"] = proj_bias

    if not config.is_moe:
        _mlp_to_hf(out, f"{p}mlp.", src, "mlp.", config.swiglu,
                   ("gate_proj", "up_proj", "down_proj"))
    else:
        moe = f"{p}{family.moe_prefix}."
        out[f"{moe}gate.weight"] = src.take("mlp.router.weight")
        router_bias = src.maybe("mlp.router.bias")
        if router_bias is not None:
            out[f"{moe}gate.bias"] = router_bias
        for e in range(config.num_experts):
            _mlp_to_hf(out, f"{moe}experts.{e}.", src, f"mlp.experts.local_experts.{e}.",
                       config.swiglu, family.expert_names)
        if config.moe_shared_expert_intermediate_size:
            _mlp_to_hf(out, f"{moe}shared_expert.", src, "mlp.shared_experts.", config.swiglu,
                       ("gate_proj", "up_proj", "down_proj"),
                       down_scale=2.0 if family.shared_expert_gate else 1.0)
            if family.shared_expert_gate:
                like = out[f"{moe}gate.weight"]
                out[f"{moe}shared_expert_gate.weight"] = torch.zeros(
                    1, config.hidden_size, dtype=like.dtype, device=like.device)
    src.finish()
    return out


# ============================================================================ HF -> megatron
class HFSource:
    """Named tensors of an HF folder, each handed out at most once (leftovers are reported)."""

    def __init__(self, getter: Callable[[str], Optional[torch.Tensor]], names: Iterable[str]):
        self._get = getter
        self.remaining = set(names)

    def maybe(self, name: str) -> Optional[torch.Tensor]:
        tensor = self._get(name)
        self.remaining.discard(name)
        return tensor

    def take(self, name: str) -> torch.Tensor:
        tensor = self.maybe(name)
        if tensor is None:
            raise ConversionError(f"The Hugging Face weights lack {name!r}.")
        return tensor


def _gain_from_hf(weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    return weight - 1 if config.apply_layernorm_1p else weight


def _mlp_from_hf(out: Tensors, mg: str, src: HFSource, hf: str, swiglu: bool, bias: bool,
                 names: Tuple[str, str, str], down_scale: float = 1.0) -> None:
    gate_name, up_name, down_name = names
    for suffix in ("weight", "bias") if bias else ("weight",):
        if swiglu:
            out[f"{mg}linear_fc1.{suffix}"] = merge_swiglu(src.take(f"{hf}{gate_name}.{suffix}"),
                                                           src.take(f"{hf}{up_name}.{suffix}"))
        else:
            out[f"{mg}linear_fc1.{suffix}"] = src.take(f"{hf}{up_name}.{suffix}")
        down = src.take(f"{hf}{down_name}.{suffix}")
        out[f"{mg}linear_fc2.{suffix}"] = down / down_scale if down_scale != 1.0 else down


def _require_zero(tensor: Optional[torch.Tensor], name: str, why: str) -> None:
    if tensor is not None and bool(tensor.abs().max() > 0):
        raise ConversionError(f"{name} is not zero: {why}")


def embedding_from_hf(config: ModelConfig, src: HFSource) -> Tensors:
    out = {"embedding.word_embeddings.weight": src.take("model.embed_tokens.weight")}
    if config.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = src.take("model.embed_positions.weight")
    return out


def final_from_hf(config: ModelConfig, src: HFSource) -> Tensors:
    from spannorm_megatron.model.specs import final_norm_enabled

    out = {}
    if final_norm_enabled(config):
        out["decoder.final_layernorm.weight"] = _gain_from_hf(src.take("model.norm.weight"), config)
        if config.normalization == "LayerNorm":
            out["decoder.final_layernorm.bias"] = src.take("model.norm.bias")
    if config.untie_embeddings_and_output_weights:
        head = src.maybe("lm_head.weight")
        if head is None:
            raise ConversionError(
                "The Hugging Face weights lack 'lm_head.weight' but tie_word_embeddings is false.")
        out["output_layer.weight"] = head
    else:
        src.maybe("lm_head.weight")  # a tied copy, if the folder stores one
    return out


def layer_from_hf(family: Family, config: ModelConfig, layer: int, src: HFSource) -> Tensors:
    """HF tensors of one layer -> megatron local names (inverse of `layer_to_hf`)."""
    rule = export_rule(config.norm_placement)
    heads, groups, d = _heads(config)
    bias = config.add_bias_linear
    layer_norm = config.normalization == "LayerNorm"
    p = f"model.layers.{layer}."
    out: Tensors = {}
    for slot, hf in rule.layer_norms(config, layer, native=family.native):
        out[f"{slot}.weight"] = _gain_from_hf(src.take(f"{p}{hf}.weight"), config)
        if layer_norm:
            out[f"{slot}.bias"] = src.take(f"{p}{hf}.bias")

    names = [f"{p}self_attn.{x}_proj" for x in "qkv"]
    out["self_attention.linear_qkv.weight"] = pack_qkv(
        *(src.take(f"{n}.weight") for n in names), heads, groups, d)
    if bias:
        out["self_attention.linear_qkv.bias"] = pack_qkv(
            *(src.take(f"{n}.bias") for n in names), heads, groups, d)
    else:
        for n in names:
            _require_zero(src.maybe(f"{n}.bias"), f"{n}.bias",
                          "the megatron model would need attention biases only on q/k/v, which "
                          "it cannot express (add_bias_linear puts biases on every linear).")
    out["self_attention.linear_proj.weight"] = src.take(f"{p}self_attn.o_proj.weight")
    if bias:
        out["self_attention.linear_proj.bias"] = src.take(f"{p}self_attn.o_proj.bias")

    if not config.is_moe:
        _mlp_from_hf(out, "mlp.", src, f"{p}mlp.", config.swiglu, bias,
                     ("gate_proj", "up_proj", "down_proj"))
        return out
    moe = f"{p}{family.moe_prefix}."
    out["mlp.router.weight"] = src.take(f"{moe}gate.weight")
    if bias:
        out["mlp.router.bias"] = src.take(f"{moe}gate.bias")
    for e in range(config.num_experts):
        _mlp_from_hf(out, f"mlp.experts.local_experts.{e}.", src, f"{moe}experts.{e}.",
                     config.swiglu, bias, family.expert_names)
    if config.moe_shared_expert_intermediate_size:
        if family.shared_expert_gate:
            _require_zero(src.take(f"{moe}shared_expert_gate.weight"),
                          f"{moe}shared_expert_gate.weight",
                          "megatron's shared expert here has no gate; only the exported form "
                          "(gate weight 0, down_proj x2) converts back.")
        _mlp_from_hf(out, "mlp.shared_experts.", src, f"{moe}shared_expert.", config.swiglu, bias,
                     ("gate_proj", "up_proj", "down_proj"),
                     down_scale=2.0 if family.shared_expert_gate else 1.0)
    return out


# ============================================================================ config.json
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def hf_config(family: Family, config: ModelConfig, dtype: torch.dtype,
              special: Optional[Dict[str, Optional[int]]] = None) -> dict:
    """config.json content for `config` exported as `family`."""
    from spannorm_megatron.model.scale_init import forward_branch_scale, resolved_scale_init
    from spannorm_megatron.model.specs import final_norm_enabled

    heads, groups, d = _heads(config)
    special = special or {}
    rope_theta = float(config.rotary_base)
    common = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.resolved_ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": d,
        "hidden_act": "silu" if config.swiglu else "gelu",
        "max_position_embeddings": config.max_sequence_length,
        "initializer_range": config.init_method_std,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": special.get("bos"),
        "eos_token_id": special.get("eos"),
        "pad_token_id": special.get("pad"),
        "torch_dtype": _dtype_name(dtype),
    }
    moe_ffn = config.moe_ffn_hidden_size or config.resolved_ffn_hidden_size
    if family.name == "llama":
        return {**common, "rms_norm_eps": config.norm_epsilon,
                "attention_bias": config.add_bias_linear, "mlp_bias": config.add_bias_linear,
                "pretraining_tp": 1}
    if family.name == "mixtral":
        return {**common, "rms_norm_eps": config.norm_epsilon, "intermediate_size": moe_ffn,
                "num_local_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "router_aux_loss_coef": config.moe_aux_loss_coeff, "router_jitter_noise": 0.0,
                "output_router_logits": False, "sliding_window": None}
    if family.name == "qwen2_moe":
        return {**common, "rms_norm_eps": config.norm_epsilon,
                "num_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": moe_ffn,
                "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": config.num_layers,
                "router_aux_loss_coef": config.moe_aux_loss_coeff, "output_router_logits": False}
    rule = export_rule(config.norm_placement)
    scale_init = resolved_scale_init(config)
    ours = {
        **common,
        "auto_map": {
            "AutoConfig": "configuration_spannorm.SpanNormConfig",
            "AutoModel": "modeling_spannorm.SpanNormModel",
            "AutoModelForCausalLM": "modeling_spannorm.SpanNormForCausalLM",
        },
        "norm_placement": config.norm_placement,
        "normalization": config.normalization,
        "norm_eps": config.norm_epsilon,
        "layer_norm_names": list(rule.norms.values()),
        "first_layer_norm_names": [hf for slot, hf in rule.layer_norms(config, 0, native=False)
                                   if slot in rule.first_layer_norms],
        "first_layer_input_norm": config.first_layer_input_norm,
        "final_norm": final_norm_enabled(config),
        "gated_mlp": config.swiglu,
        "linear_bias": config.add_bias_linear,
        "position_embedding_type": config.position_embedding_type,
        "scale_init": scale_init,
        "scale_mode": config.scale_mode,
        "branch_scale": forward_branch_scale(config),
        "residual_scale": 1.0,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.moe_router_topk if config.is_moe else None,
        "moe_intermediate_size": moe_ffn if config.is_moe else None,
        "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
        "hidden_dropout": config.hidden_dropout,
        "attention_dropout": config.attention_dropout,
        "megatron_model_config": config.to_dict(),
    }
    if rule.config_extras is not None:
        ours.update(rule.config_extras(config))
    return ours


def _rope_theta(hf: dict, where: str) -> float:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConversionError(
            f"{where}: rope_type={rope_type!r} (RoPE scaling) cannot be expressed by the megatron "
            f"model (plain RoPE only).")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _int_if_whole(value: float):
    return int(value) if float(value).is_integer() else value


def family_of(hf: dict, where: str) -> Family:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    for family in FAMILIES.values():
        if hf.get("model_type") == family.model_type:
            return family
    raise ConversionError(
        f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; this tool "
        f"converts {sorted(ARCHITECTURES)} (model_type {sorted(f.model_type for f in FAMILIES.values())}).")


def model_config_from_hf(hf: dict, where: str) -> Tuple[Family, ModelConfig]:
    """(family, the megatron ModelConfig) of an HF config.json, or a ConversionError saying what
    the megatron model cannot express."""
    family = family_of(hf, where)
    if family.name == "spannorm" and hf.get("megatron_model_config"):
        values = dict(hf["megatron_model_config"])
        from dataclasses import fields
        known = {f.name for f in fields(ModelConfig)}
        try:
            config = ModelConfig.from_dict({k: v for k, v in values.items() if k in known})
        except ValueError as err:
            raise ConversionError(f"{where}: megatron_model_config is not valid here: {err}") \
                from None
        _check_consistent(config, hf, where)
        return family, config

    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ConversionError(
            f"{where}: head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
            f"the megatron model needs head_dim = hidden_size / heads.")
    act = hf.get("hidden_act", "silu")
    values = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf.get("intermediate_size"), vocab_size=hf["vocab_size"],
        max_sequence_length=hf.get("max_position_embeddings", 2048),
        init_method_std=hf.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        norm_epsilon=hf.get("rms_norm_eps", hf.get("norm_eps", 1e-6)),
        rotary_base=_int_if_whole(_rope_theta(hf, where)),
        transformer_impl="local",
    )
    problems = []
    if family.name == "spannorm":
        values.update(
            norm_placement=hf.get("norm_placement", "spannorm"),
            normalization=hf.get("normalization", "RMSNorm"),
            swiglu=hf.get("gated_mlp", True),
            add_bias_linear=hf.get("linear_bias", False),
            position_embedding_type=hf.get("position_embedding_type", "rope"),
            first_layer_input_norm=hf.get("first_layer_input_norm", True),
            final_norm=hf.get("final_norm"),
        )
        if hf.get("num_experts"):
            values.update(num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                          moe_ffn_hidden_size=hf.get("moe_intermediate_size"),
                          moe_shared_expert_intermediate_size=hf.get(
                              "shared_expert_intermediate_size"))
        if float(hf.get("branch_scale", 1.0)) != 1.0:
            problems.append("branch_scale != 1 without megatron_model_config (the Scale Init "
                            "settings that produce it are unknown)")
    else:
        values.update(norm_placement="prenorm", normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope")
        if act != "silu":
            problems.append(f"hidden_act={act!r} (the megatron SwiGLU MLP uses silu)")
    if family.name == "llama":
        attention_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (megatron's "
                            f"add_bias_linear puts biases on all linears or none)")
        values["add_bias_linear"] = attention_bias
    if family.name == "mixtral":
        values.update(num_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["intermediate_size"])
        window = hf.get("sliding_window")
        if window is not None and window < values["max_sequence_length"]:
            problems.append(f"sliding_window={window} (sliding-window attention)")
    if family.name == "qwen2_moe":
        values.update(num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["moe_intermediate_size"],
                      moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size")
                      or None)
        if not hf.get("norm_topk_prob", False):
            problems.append("norm_topk_prob=false (megatron renormalizes the top-k probabilities)")
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            problems.append("dense layers between MoE layers (decoder_sparse_step / mlp_only_layers)")
        if hf.get("use_sliding_window"):
            problems.append("use_sliding_window=true (sliding-window attention)")
    if problems:
        raise ConversionError(
            f"{where}: this {family.architecture} cannot be converted to the megatron model: "
            + "; ".join(problems) + ".")
    try:
        config = ModelConfig(**{k: v for k, v in values.items() if v is not None})
    except ValueError as err:
        raise ConversionError(f"{where}: {err}") from None
    _check_consistent(config, hf, where)
    return family, config


def _check_consistent(config: ModelConfig, hf: dict, where: str) -> None:
    pairs = [("vocab_size", config.vocab_size), ("hidden_size", config.hidden_size),
             ("num_hidden_layers", config.num_layers),
             ("num_attention_heads", config.num_attention_heads)]
    bad = [f"{key}={hf.get(key)} vs {value}" for key, value in pairs
           if key in hf and hf[key] != value]
    if bad:
        raise ConversionError(f"{where}: config.json disagrees with its megatron_model_config: "
                              + ", ".join(bad))


def convert_group_to_hf(family: Family, config: ModelConfig, group: str, layer: Optional[int],
                        tensors: Tensors) -> Tensors:
    """megatron tensors of one group (full state-dict names) -> HF tensors."""
    from spannorm_megatron.hf.layout import split_layer_name

    if layer is not None:
        local = {split_layer_name(name)[1]: tensor for name, tensor in tensors.items()}
        return layer_to_hf(family, config, layer, local)
    if group == "embedding":
        return embedding_to_hf(config, tensors)
    return final_to_hf(config, tensors)
