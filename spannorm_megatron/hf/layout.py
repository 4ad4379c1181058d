"""The megatron side of a conversion: every parameter's name and shape, grouped for streaming,
and where each one lives in a megatron-core dist checkpoint.

Names are those of a single-process (TP1/PP1) `GPTModel.state_dict()`, layers numbered
globally. Groups are what a conversion holds in memory at once: ``embedding`` (word and
learned position embeddings), ``layer i`` for each layer, ``final`` (final norm, output layer).

In a dist checkpoint a parameter is a slice of a *global* tensor (whatever TP/PP/EP layout
wrote it): layer parameters share one tensor with the layer as leading axis
(``decoder.layers.self_attention.linear_qkv.weight`` of shape [L, ...]), experts one with
[L, E, ...] leading axes, and norms the spec fuses into a linear are stored under the fused
name (the local spec's `sharded_state_dict_keys_map`, e.g. prenorm's ``input_layernorm.`` ->
``self_attention.linear_qkv.layer_norm_``). Norms only the first layer has (SpanNorm's N0) are
stored without the layer axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.rules import export_rule

Shape = Tuple[int, ...]

LAYER_PREFIX = "decoder.layers."
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
EXPERT_KEY_PREFIX = "mlp.experts.experts."


@dataclass(frozen=True)
class Group:
    name: str
    """``embedding``, ``layer <i>`` or ``final``."""

    layer: Optional[int]
    """Global layer index for a layer group, else None."""

    params: Tuple[Tuple[str, Shape], ...]
    """(state-dict name, shape) of every parameter in the group."""


def _linear(prefix: str, out_features: int, in_features: int, bias: bool) -> List[Tuple[str, Shape]]:
    params = [(f"{prefix}.weight", (out_features, in_features))]
    if bias:
        params.append((f"{prefix}.bias", (out_features,)))
    return params


def _norm(prefix: str, hidden: int, layer_norm: bool) -> List[Tuple[str, Shape]]:
    params = [(f"{prefix}.weight", (hidden,))]
    if layer_norm:
        params.append((f"{prefix}.bias", (hidden,)))
    return params


def layer_params(config: ModelConfig, layer: int) -> List[Tuple[str, Shape]]:
    """(local name, shape) of one layer's parameters, e.g. ``self_attention.linear_qkv.weight``."""
    rule = export_rule(config.placement)
    h = config.hidden_size
    bias = config.add_bias_linear
    layer_norm = config.normalization == "LayerNorm"
    gated = 2 if config.swiglu else 1

    params: List[Tuple[str, Shape]] = []
    for slot, _hf in rule.layer_norms(config, layer, native=False):
        params += _norm(slot, h, layer_norm)
    if config.multi_latent_attention:
        params += _mla_params(config)
    else:
        d = config.resolved_kv_channels
        groups = config.resolved_num_query_groups
        params += _linear("self_attention.linear_qkv",
                          (config.num_attention_heads + 2 * groups) * d, h, bias)
        if config.qk_layernorm:  # per head: the norms are head_dim wide
            params += _norm("self_attention.q_layernorm", d, layer_norm)
            params += _norm("self_attention.k_layernorm", d, layer_norm)
        params += _linear("self_attention.linear_proj", h, config.num_attention_heads * d, bias)
    if not config.is_moe_layer(layer + 1):
        ffn = config.resolved_ffn_hidden_size
        params += _linear("mlp.linear_fc1", gated * ffn, h, bias)
        params += _linear("mlp.linear_fc2", h, ffn, bias)
        return params
    moe_ffn = config.resolved_moe_ffn_hidden_size
    # megatron-core's router gets a bias with add_bias_linear too.
    params += _linear("mlp.router", config.num_experts, h, bias)
    if config.moe_router_enable_expert_bias:  # a buffer, but part of what the model computes
        params.append(("mlp.router.expert_bias", (config.num_experts,)))
    for e in range(config.num_experts):
        params += _linear(f"mlp.experts.local_experts.{e}.linear_fc1", gated * moe_ffn, h, bias)
        params += _linear(f"mlp.experts.local_experts.{e}.linear_fc2", h, moe_ffn, bias)
    shared = config.moe_shared_expert_intermediate_size
    if shared:
        params += _linear("mlp.shared_experts.linear_fc1", gated * shared, h, bias)
        params += _linear("mlp.shared_experts.linear_fc2", h, shared, bias)
        if config.moe_shared_expert_gate:
            params.append(("mlp.shared_experts.gate_weight", (1, h)))
    return params


def _mla_params(config: ModelConfig) -> List[Tuple[str, Shape]]:
    """megatron-core's MLASelfAttention: only the output projection has a bias; with
    qk_layernorm the query latent (if any) and the key/value latent are normalized."""
    h, n = config.hidden_size, config.num_attention_heads
    layer_norm = config.normalization == "LayerNorm"
    q_head = config.qk_head_dim + config.qk_pos_emb_head_dim
    kv_rank = config.kv_lora_rank
    a = "self_attention."
    params: List[Tuple[str, Shape]] = []
    if config.q_lora_rank is None:
        params += _linear(a + "linear_q_proj", n * q_head, h, False)
    else:
        params += _linear(a + "linear_q_down_proj", config.q_lora_rank, h, False)
        params += _linear(a + "linear_q_up_proj", n * q_head, config.q_lora_rank, False)
        if config.qk_layernorm:
            params += _norm(a + "q_layernorm", config.q_lora_rank, layer_norm)
    params += _linear(a + "linear_kv_down_proj", kv_rank + config.qk_pos_emb_head_dim, h, False)
    params += _linear(a + "linear_kv_up_proj", n * (config.qk_head_dim + config.v_head_dim),
                      kv_rank, False)
    if config.qk_layernorm:
        params += _norm(a + "kv_layernorm", kv_rank, layer_norm)
    params += _linear(a + "linear_proj", h, n * config.v_head_dim, config.add_bias_linear)
    return params


def megatron_groups(config: ModelConfig) -> List[Group]:
    """Every parameter of the TP1/PP1 model, grouped: embedding, each layer, final."""
    from spannorm_megatron.model.specs import final_norm_enabled

    h = config.hidden_size
    embedding = [("embedding.word_embeddings.weight", (config.vocab_size, h))]
    if config.position_embedding_type == "learned_absolute":
        embedding.append(("embedding.position_embeddings.weight", (config.max_sequence_length, h)))
    groups = [Group("embedding", None, tuple(embedding))]
    for i in range(config.num_layers):
        groups.append(Group(f"layer {i}", i, tuple(
            (f"{LAYER_PREFIX}{i}.{name}", shape) for name, shape in layer_params(config, i))))
    final: List[Tuple[str, Shape]] = []
    if final_norm_enabled(config):
        final += _norm("decoder.final_layernorm", h, config.normalization == "LayerNorm")
    if config.untie_embeddings_and_output_weights:
        final.append(("output_layer.weight", (config.vocab_size, h)))
    groups.append(Group("final", None, tuple(final)))
    return groups


def split_layer_name(name: str) -> Tuple[Optional[int], str]:
    """``decoder.layers.3.mlp.x`` -> (3, ``mlp.x``); any other name -> (None, name)."""
    if name.startswith(LAYER_PREFIX):
        index, local = name[len(LAYER_PREFIX):].split(".", 1)
        return int(index), local
    return None, name


@dataclass(frozen=True)
class Location:
    """Where one state-dict tensor lives in a dist checkpoint."""

    key: str
    """Sharded-tensor key (the global tensor's name)."""

    index: Tuple[int, ...]
    """Positions along the leading axes the model does not see (layer, then expert)."""

    stacked_shape: Tuple[int, ...]
    """Sizes of those leading axes, e.g. (L,) or (L, E)."""


class CheckpointLayout:
    """Maps TP1/PP1 state-dict names to dist-checkpoint locations and back, for one config."""

    def __init__(self, config: ModelConfig):
        from spannorm_megatron.model.specs import layer_spec

        self.config = config
        # A norm fused into fc1 is saved under fc1's key in dense layers only (the router reads
        # an MoE layer's norm too), so the map depends on the layer's kind.
        self.keys_maps: Dict[bool, Dict[str, str]] = {
            moe: dict(layer_spec(config, transformer_engine=False, moe=moe)
                      .submodules.sharded_state_dict_keys_map or {})
            for moe in ({False, True} if config.is_moe else {False})}
        rule = export_rule(config.placement)
        self.first_layer_slots = set(rule.first_layer_norms)
        self.groups = megatron_groups(config)
        # megatron-core saves dense and MoE layers mixed (--moe-layer-freq) one layer at a time,
        # under keys carrying the layer number, instead of one tensor stacked over the layers.
        self.per_layer_keys = len(set(config.moe_layer_pattern)) > 1

    def _map_local(self, local: str, layer: int) -> str:
        keys_map = self.keys_maps[self.config.is_moe and self.config.is_moe_layer(layer + 1)]
        for old, new in keys_map.items():
            if local.startswith(old):
                return new + local[len(old):]
        return local

    def location(self, name: str) -> Location:
        layer, local = split_layer_name(name)
        if layer is None:
            return Location(name, (), ())
        L = self.config.num_layers
        prefix = f"{LAYER_PREFIX}{layer}." if self.per_layer_keys else LAYER_PREFIX
        if local.split(".", 1)[0] in self.first_layer_slots:
            return Location(prefix + self._map_local(local, layer), (), ())
        match = _EXPERT_RE.match(local)
        if match:
            expert, rest = int(match.group(1)), match.group(2)
            if self.per_layer_keys:
                return Location(prefix + EXPERT_KEY_PREFIX + rest, (expert,),
                                (self.config.num_experts,))
            return Location(prefix + EXPERT_KEY_PREFIX + rest, (layer, expert),
                            (L, self.config.num_experts))
        if self.per_layer_keys:
            return Location(prefix + self._map_local(local, layer), (), ())
        return Location(prefix + self._map_local(local, layer), (layer,), (L,))

    def all_params(self) -> List[Tuple[str, Shape]]:
        return [p for group in self.groups for p in group.params]

    def expected_keys(self) -> Dict[str, Tuple[int, ...]]:
        """Global shape of every checkpoint tensor this model consists of."""
        keys: Dict[str, Tuple[int, ...]] = {}
        for name, shape in self.all_params():
            loc = self.location(name)
            keys[loc.key] = tuple(loc.stacked_shape) + tuple(shape)
        return keys

    def inverse(self) -> Dict[Tuple[str, Tuple[int, ...]], str]:
        """(key, leading-axis index) -> state-dict name."""
        return {(loc.key, loc.index): name
                for name, _shape in self.all_params() for loc in [self.location(name)]}


MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def is_model_tensor_key(key: str) -> bool:
    """True for checkpoint keys of model weights (not optimizer state, RNG, extra state)."""
    return key.startswith(MODEL_KEY_PREFIXES) and "_extra_state" not in key
