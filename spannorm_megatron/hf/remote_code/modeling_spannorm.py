# Modeling of SpanNorm-family transformers exported by spannorm_megatron
# (tools/convert_to_hf.py). Standalone: imports only torch and transformers. Loaded through
#     AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
"""SpanNormForCausalLM: the layer equations of shared/design/norm-placements.md.

For one layer with input x (the residual stream), attention branch A and MLP branch F (dense or
MoE), each branch output multiplied by `branch_scale` (Scale Init's forward mode, else 1):

    prenorm         h = x + A(N1(x));           x' = h + F(N2(h))
    postnorm        h = N1(x + A(x));           x' = N2(h + F(h))
    spannorm        h = N1(x + A(xin));         x' = N2(x + F(h)),  xin = N0(x) in layer 1 else x
    deepnorm        h = N1(a*x + A(x));         x' = N2(a*h + F(h)),  a = residual_scale
    perinorm        h = x + N1o(A(N1i(x)));     x' = h + N2o(F(N2i(h)))
    spannorm_clean  h = N1(x + A(x));           x' = x + N2(h + F(h))

Attention: grouped-query causal self-attention with RoPE (the half-split "rotate_half" layout,
as megatron-core and Llama use), or learned absolute / no position embeddings; with
`qk_layernorm`, queries and keys are normalized per head (over head_dim, the model's norm type)
before RoPE, as megatron-core's q_layernorm / k_layernorm. MLP: SwiGLU (`silu(gate) * up`) or
GeLU. MoE layers (all, or those `moe_layer_pattern` marks 1; the others have a dense MLP of
`intermediate_size`) compute megatron-core's router at inference (`topk_routing_with_score_function`
of megatron/core/transformer/moe/moe_utils.py):

    logits = x @ W_router.T (+ b)                    in moe_router_dtype (fp32/fp64) if set
    softmax:            choose the top-k logits, probs = softmax over the k chosen
    softmax, pre_softmax: scores = softmax over all experts, choose the top-k, probs = their scores
    sigmoid:            scores = sigmoid(logits), choose the top-k of scores + expert_bias (the
                        bias steers the choice only), probs = the chosen scores, divided by
                        their sum (+1e-20) when k > 1
    group-limited:      "choose the top-k" picks, per token, the group_topk best of num_groups
                        expert groups (a group scored by the sum of its top k/group_topk) and
                        the top-k within them
    probs *= moe_router_topk_scaling_factor (if set)
    out = sum over the chosen experts of probs * expert(x)
          + sigmoid(x @ shared_expert_gate.T) * shared_expert(x)   (no gate: shared_expert(x))

Every token is routed (dropless): megatron's capacity limit (moe_expert_capacity_factor) drops
tokens by comparing the tokens of a whole batch, which no per-token (or cached) forward can
reproduce; the export says so when the model had one.
Generation: `generate()` works, with a key/value cache (transformers' DynamicCache), passed as
`cache` (transformers >= 5.25, whose generate() passes it so) or `past_key_values` (before).
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from transformers.cache_utils import Cache, DynamicCache
except ImportError:  # pragma: no cover - very old transformers
    Cache = DynamicCache = None

from .configuration_spannorm import SpanNormConfig

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# transformers 5.25 renamed the key/value cache from `past_key_values` to `cache`: generate()
# passes `cache=` and the output classes declare a `cache` field. The forwards take both names;
# the output carries the cache under the field its class declares.
_OUTPUT_CACHE_FIELD = next((f.name for f in dataclasses.fields(CausalLMOutputWithPast)
                            if f.name == "cache"), "past_key_values")


# ----------------------------------------------------------------------------------------- norms
class SpanNormRMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in float32."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


class SpanNormLayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * g + b, computed in float32."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        y = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps)
        return y.to(dtype)


def _norm(config, size=None):
    size = size or config.hidden_size
    if config.normalization == "LayerNorm":
        return SpanNormLayerNorm(size, config.norm_eps)
    return SpanNormRMSNorm(size, config.norm_eps)


# ------------------------------------------------------------------------------------------ rope
def _rope(positions, dim, base, dtype):
    """cos, sin [b, 1, s, rotated dims] for integer positions [b, s] (half-split layout); `dim`
    is the rotated part of a head, int(head_dim x rotary_percent) as megatron-core takes it."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                            device=positions.device) / dim))
    angles = positions.float()[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _apply_rope(x, cos, sin):
    """Rotate the first cos.shape[-1] dimensions of every head; the rest pass unchanged."""
    rotated = cos.shape[-1]
    x, rest = x[..., :rotated], x[..., rotated:]
    return torch.cat([x * cos + _rotate_half(x) * sin, rest], dim=-1)


# ------------------------------------------------------------------------------------- attention
class SpanNormAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        bias = config.linear_bias
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        if config.qk_layernorm:  # per head, over head_dim
            self.q_norm = _norm(config, self.head_dim)
            self.k_norm = _norm(config, self.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, rope, mask, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        repeat = self.num_heads // self.num_kv_heads
        if repeat > 1:  # query head j reads key/value head j // repeat
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


# -------------------------------------------------------------------------------------------- mlp
class SpanNormMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        h, bias = config.hidden_size, config.linear_bias
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(h, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, h, bias=bias)
        self.act = F.silu if config.hidden_act == "silu" else F.gelu

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class SpanNormMoE(nn.Module):
    """megatron-core's MoE layer at inference: its router (see the module docstring), the chosen
    experts weighted by their probabilities, and the shared expert (optionally gated)."""

    def __init__(self, config):
        super().__init__()
        h, num_experts = config.hidden_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.score_function = config.moe_router_score_function
        self.pre_softmax = config.moe_router_pre_softmax
        self.num_groups = config.moe_router_num_groups
        self.group_topk = config.moe_router_group_topk
        self.scaling_factor = config.moe_router_topk_scaling_factor
        self.router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(
            config.moe_router_dtype)
        self.gate = nn.Linear(h, num_experts, bias=config.linear_bias)
        if config.moe_router_enable_expert_bias:  # float32, as megatron-core keeps it
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.experts = nn.ModuleList(
            SpanNormMLP(config, config.moe_intermediate_size) for _ in range(num_experts))
        self.shared_expert = (SpanNormMLP(config, config.shared_expert_intermediate_size)
                              if config.shared_expert_intermediate_size else None)
        self.shared_expert_gate = (nn.Linear(h, 1, bias=False)
                                   if self.shared_expert is not None and config.shared_expert_gate
                                   else None)

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs, chosen = self.route(self.router_logits(tokens))
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (chosen == e).nonzero(as_tuple=True)
            if token_idx.numel():
                y = expert(tokens[token_idx]) * probs[token_idx, slot, None]
                out.index_add_(0, token_idx, y.to(out.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(tokens))
            out = out + shared
        return out.view(shape)

    def router_logits(self, tokens):
        dtype = self.router_dtype or tokens.dtype
        bias = None if self.gate.bias is None else self.gate.bias.to(dtype)
        return F.linear(tokens.to(dtype), self.gate.weight.to(dtype), bias)

    def route(self, logits):
        """(probs, chosen experts), both [tokens, k]: megatron-core's
        topk_routing_with_score_function (dtypes included)."""
        if self.score_function == "sigmoid":
            scores = torch.sigmoid(logits.float()).to(logits.dtype)
            for_choice = scores if self.expert_bias is None else scores + self.expert_bias
            chosen = self.top_k_experts(for_choice)[1]
            probs = scores.gather(1, chosen)
            if self.top_k > 1:
                probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        elif self.pre_softmax:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
            probs, chosen = self.top_k_experts(scores)
        else:
            top_logits, chosen = self.top_k_experts(logits)
            probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        if self.scaling_factor:
            probs = probs * self.scaling_factor
        return probs, chosen

    def top_k_experts(self, scores):
        """(values, indices) of the top-k of `scores` [tokens, experts]; group-limited: only
        within the group_topk best groups, a group scored by the sum of its top k/group_topk
        (megatron-core's group_limited_topk)."""
        if not self.group_topk:
            return torch.topk(scores, k=self.top_k, dim=-1)
        tokens, num_experts = scores.shape
        groups = scores.view(tokens, self.num_groups, -1)
        group_scores = groups.topk(self.top_k // self.group_topk, dim=-1)[0].sum(dim=-1)
        best_groups = torch.topk(group_scores, k=self.group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter(1, best_groups, 1).bool()
        expert_mask = group_mask.repeat_interleave(num_experts // self.num_groups, dim=1)
        return torch.topk(scores.masked_fill(~expert_mask, float("-inf")), k=self.top_k, dim=-1)


# ---------------------------------------------------------------------------------------- layers
def _prenorm(layer, x, A, F_):
    h = x + A(layer.input_layernorm(x))
    return h + F_(layer.pre_mlp_layernorm(h))


def _postnorm(layer, x, A, F_):
    h = layer.post_attention_norm(x + A(x))
    return layer.post_mlp_norm(h + F_(h))


def _spannorm(layer, x, A, F_):
    xin = layer.embedding_norm(x) if hasattr(layer, "embedding_norm") else x
    h = layer.post_attention_norm(x + A(xin))
    return layer.post_mlp_norm(x + F_(h))


def _deepnorm(layer, x, A, F_):
    a = layer.residual_scale
    h = layer.post_attention_norm(a * x + A(x))
    return layer.post_mlp_norm(a * h + F_(h))


def _perinorm(layer, x, A, F_):
    h = x + layer.attention_output_norm(A(layer.input_layernorm(x)))
    return h + layer.mlp_output_norm(F_(layer.pre_mlp_layernorm(h)))


def _spannorm_clean(layer, x, A, F_):
    h = layer.post_attention_norm(x + A(x))
    return x + layer.post_mlp_norm(h + F_(h))


LAYER_EQUATIONS = {
    "prenorm": _prenorm,
    "postnorm": _postnorm,
    "spannorm": _spannorm,
    "deepnorm": _deepnorm,
    "perinorm": _perinorm,
    "spannorm_clean": _spannorm_clean,
}


class SpanNormDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.equation = LAYER_EQUATIONS[config.norm_placement]
        self.branch_scale = float(config.branch_scale)
        self.residual_scale = float(config.residual_scale)
        self.hidden_dropout = config.hidden_dropout
        names = list(config.layer_norm_names)
        if layer_idx == 0:
            names += list(config.first_layer_norm_names)
        for name in names:
            setattr(self, name, _norm(config))
        self.self_attn = SpanNormAttention(config, layer_idx)
        self.mlp = SpanNormMoE(config) if config.is_moe_layer(layer_idx) else SpanNormMLP(
            config, config.intermediate_size)

    def _branch(self, out):
        out = F.dropout(out, p=self.hidden_dropout, training=self.training)
        return out if self.branch_scale == 1.0 else out * self.branch_scale

    def forward(self, x, rope, mask, cache):
        def A(t):
            return self._branch(self.self_attn(t, rope, mask, cache))

        def F_(t):
            return self._branch(self.mlp(t))

        return self.equation(self, x, A, F_)


# ----------------------------------------------------------------------------------------- model
class SpanNormPreTrainedModel(PreTrainedModel):
    config_class = SpanNormConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SpanNormDecoderLayer"]
    _keep_in_fp32_modules_strict = ["expert_bias"]
    _skip_keys_device_placement = ["past_key_values", "cache"]


def _new_cache(config):
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _given_cache(cache, past_key_values, config, use_cache):
    """The key/value cache to read and extend, whichever name it came under (see
    _OUTPUT_CACHE_FIELD); a new DynamicCache when caching and none was given; None when not."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the key/value cache as `cache` or as `past_key_values`, not both")
    cache = past_key_values if cache is None else cache
    if cache is None:
        return _new_cache(config) if use_cache else None
    if not isinstance(cache, Cache):
        from_legacy = getattr(DynamicCache, "from_legacy_cache", None)  # transformers 4.x only
        if from_legacy is None:
            raise TypeError(f"the key/value cache must be a transformers Cache (DynamicCache), "
                            f"not {type(cache).__name__}")
        cache = from_legacy(cache)
    return cache


def _attention_mask(attention_mask, batch, q_len, past_len, device):
    """Boolean [b, 1, q, kv] mask, True where a query may attend: causal and not padding."""
    kv_len = past_len + q_len
    q_pos = torch.arange(past_len, kv_len, device=device)
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos[:, None]
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -kv_len:].bool()
        elif attention_mask.dim() == 4:
            extra = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            allowed = allowed & extra[..., -q_len:, -kv_len:]
        else:
            raise ValueError(f"attention_mask must be 2-D or 4-D, got {attention_mask.dim()}-D")
    # A query that may attend nothing (a left-padding position) attends everything instead: its
    # output is never used, and an all-masked row would turn into NaN.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class SpanNormModel(SpanNormPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            SpanNormDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config) if config.final_norm else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, use_cache=None,
                output_hidden_states=False, cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, q_len = x.shape[:2]
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        cache = _given_cache(cache, past_key_values, self.config, use_cache)
        past_len = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=x.device)[None]
            position_ids = position_ids.expand(batch, q_len)
        rope = None
        if self.config.position_embedding_type == "rope":
            rotated = int(self.config.head_dim * getattr(self.config, "rotary_percent", 1.0))
            rope = _rope(position_ids, rotated, self.config.rope_theta, x.dtype)
        elif self.config.position_embedding_type == "learned_absolute":
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(
                    f"position {int(position_ids.max())} is beyond max_position_embeddings="
                    f"{self.config.max_position_embeddings} of the learned position embeddings")
            x = x + self.embed_positions(position_ids)
        mask = _attention_mask(attention_mask, batch, q_len, past_len, x.device)

        hidden_states = [] if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            x = layer(x, rope, mask, cache)
        if self.norm is not None:
            x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return x, (cache if use_cache else None), hidden_states


class SpanNormForCausalLM(SpanNormPreTrainedModel, GenerationMixin):
    if _TRANSFORMERS_MAJOR >= 5:
        _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    else:  # pragma: no cover - transformers 4.x
        _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = SpanNormModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                output_hidden_states=None, return_dict=None, logits_to_keep=0, cache=None,
                **kwargs):
        hidden, cache, hidden_states = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, cache=cache, inputs_embeds=inputs_embeds,
            use_cache=use_cache if labels is None else False,
            output_hidden_states=bool(output_hidden_states))
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{_OUTPUT_CACHE_FIELD: cache},
            hidden_states=tuple(hidden_states) if hidden_states is not None else None)
        return output if return_dict is not False else output.to_tuple()
