"""Hugging Face model families as state-dict adapters.

Families: ``llama`` (`LlamaForCausalLM`, prenorm dense), ``mixtral`` (`MixtralForCausalLM`,
prenorm MoE), ``qwen2_moe`` (`Qwen2MoeForCausalLM`, prenorm MoE with a shared expert) and
``qwen3_moe`` (`Qwen3MoeForCausalLM`, prenorm MoE with q/k norms and optional dense layers),
``glm4_moe`` (`Glm4MoeForCausalLM`, prenorm MoE with sigmoid / expert-bias / group routing),
``spannorm`` (our own `SpanNormForCausalLM`, every placement and everything the native classes
cannot express: q/k norms, dense layers among MoE layers, all of megatron-core's top-k routing,
the gated shared expert; its files are in `remote_code/`).

Each family has one mapping (`Family.mapping`): `Rule`s that pair a megatron TP1 state-dict name
pattern with the Hugging Face name(s) it becomes and the `Transform` between them, e.g.
``decoder.layers.{i}.self_attention.linear_qkv.{p}`` -> ``model.layers.{i}.self_attn.q_proj.{p}``,
``k_proj``, ``v_proj`` through `QKV` (``{i}`` a layer, ``{e}`` an expert, ``{p}`` weight or
bias). Export
(`Family.to_hf`) and import (`Family.from_hf`) are both derived from it: every megatron
parameter of a group (`layout.megatron_groups`, the one list of what the model holds) is matched
by exactly one rule, run forward on export and inverted on import. `Neutral` entries are HF
tensors megatron has no counterpart for: Qwen2-MoE's shared-expert gate and q/k/v biases are
written as 0 and must be 0 on import; the shared expert's down_proj is stored x2, so
``sigmoid(0) * 2 * down = down`` exactly.

Norm gains are stored as the gain itself: with `apply_layernorm_1p` megatron stores gain - 1,
so the export adds 1 (and the import subtracts it; in float32 that is exact to one rounding).
Norm names come from the placement's `ExportRule` (rules.py).

The family class also writes config.json (`Family.config_json`) and reads it back into a
`ModelConfig` (`Family.model_config`), refusing what the megatron model cannot express.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.layout import Group
from spannorm_megatron.hf.rules import export_rule
from spannorm_megatron.hf.tensors import merge_swiglu, pack_qkv, split_swiglu, unpack_qkv

Tensors = Dict[str, torch.Tensor]


def _heads(config: ModelConfig) -> Tuple[int, int, int]:
    return (config.num_attention_heads, config.resolved_num_query_groups,
            config.resolved_kv_channels)


# ================================================================================ the mapping
@dataclass(frozen=True)
class Transform:
    """megatron tensor -> HF tensors (`to_hf`) and back (`from_hf`), given the ModelConfig."""

    to_hf: Callable[..., Tuple[torch.Tensor, ...]]
    from_hf: Callable[..., torch.Tensor]


SAME = Transform(lambda c, t: (t,), lambda c, t: t)
GAIN = Transform(lambda c, t: (t + 1 if c.apply_layernorm_1p else t,),
                 lambda c, t: t - 1 if c.apply_layernorm_1p else t)
QKV = Transform(lambda c, t: unpack_qkv(t, *_heads(c)),
                lambda c, q, k, v: pack_qkv(q, k, v, *_heads(c)))
SWIGLU = Transform(lambda c, t: split_swiglu(t), lambda c, gate, up: merge_swiglu(gate, up))
DOUBLE = Transform(lambda c, t: (t * 2.0,), lambda c, t: t / 2.0)

_FIELDS = {"i": r"(?P<i>\d+)", "e": r"(?P<e>\d+)", "p": r"(?P<p>weight|bias)"}


@lru_cache(maxsize=None)
def _regex(pattern: str) -> "re.Pattern":
    parts = re.split(r"\{(\w)\}", pattern)
    return re.compile("".join(re.escape(s) if k % 2 == 0 else _FIELDS[s]
                              for k, s in enumerate(parts)) + r"\Z")


@dataclass(frozen=True)
class Rule:
    """One megatron tensor <-> its HF tensor(s)."""

    megatron: str
    hf: Union[str, Tuple[str, ...]]
    transform: Transform = SAME

    def hf_names(self, bound: Dict[str, str]) -> Tuple[str, ...]:
        return tuple(p.format(**bound) for p in ((self.hf,) if isinstance(self.hf, str)
                                                 else self.hf))


@dataclass(frozen=True)
class Neutral:
    """HF tensors of every layer with no megatron counterpart, neutral at zero."""

    hf: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    why: str
    """Why a non-zero value cannot be converted."""
    optional: bool = False
    """Import: a folder may leave them out."""


Entry = Union[Rule, Neutral]
L, H = "decoder.layers.{i}.", "model.layers.{i}."
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def _mlp(config: ModelConfig, mg: str, hf: str, names: Tuple[str, str, str],
         down: Transform = SAME) -> List[Rule]:
    gate, up, down_name = (f"{hf}{n}.{{p}}" for n in names)
    fc1 = Rule(mg + "linear_fc1.{p}", (gate, up), SWIGLU) if config.swiglu else \
        Rule(mg + "linear_fc1.{p}", up)
    return [fc1, Rule(mg + "linear_fc2.{p}", down_name, down)]


def _take(get: Callable[[str], Optional[torch.Tensor]], name: str) -> torch.Tensor:
    tensor = get(name)
    if tensor is None:
        raise ConversionError(f"The Hugging Face weights lack {name!r}.")
    return tensor


def _aux_loss_coeff(config) -> float:
    """HF MoE classes have one auxiliary loss: several of megatron-core's (a list of
    --moe-aux-loss-coeff) are written as their sum, what the router's total weighs."""
    coeff = config.moe_aux_loss_coeff
    return float(sum(coeff)) if isinstance(coeff, list) else coeff


class Family:
    """One Hugging Face model class: its weight mapping and its config.json."""

    name: str
    architecture: str
    native = True
    """A class of transformers itself (no remote code)."""
    moe = "mlp"
    """Module holding router and experts in an MoE layer."""
    expert = LLAMA_MLP
    """Names of an expert's (gate, up, down) projections."""
    shared_down = SAME
    """Transform of the shared expert's down projection."""
    shared = "shared_expert"
    """Module name of the shared expert in an MoE layer."""
    float32 = ()
    """Endings of HF names stored in float32 whatever the export's --dtype (megatron-core keeps
    the expert bias in float32)."""

    def stored_dtype(self, hf_name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype the export writes `hf_name` in, for an export in `dtype`."""
        return torch.float32 if hf_name.endswith(self.float32) else dtype

    # ---------------------------------------------------------------------------- weights
    def mapping(self, config: ModelConfig) -> List[Entry]:
        """The family's one mapping; a rule no tensor of `config`'s model matches is unused."""
        # layer 0 has every norm slot: the others' and the first-layer-only ones
        norms = export_rule(config.norm_placement).layer_norms(config, 0, native=self.native)
        moe = f"{H}{self.moe}."
        return [
            Rule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Rule("embedding.position_embeddings.weight", "model.embed_positions.weight"),
            *(r for slot, hf in norms for r in (Rule(f"{L}{slot}.weight", f"{H}{hf}.weight", GAIN),
                                                Rule(f"{L}{slot}.bias", f"{H}{hf}.bias"))),
            Rule(L + "self_attention.linear_qkv.{p}",
                 tuple(f"{H}self_attn.{x}_proj.{{p}}" for x in "qkv"), QKV),
            Rule(L + "self_attention.linear_proj.{p}", H + "self_attn.o_proj.{p}"),
            *_mlp(config, L + "mlp.", H + "mlp.", LLAMA_MLP),
            Rule(L + "mlp.router.{p}", moe + "gate.{p}"),
            *_mlp(config, L + "mlp.experts.local_experts.{e}.", moe + "experts.{e}.", self.expert),
            *_mlp(config, L + "mlp.shared_experts.", f"{moe}{self.shared}.", LLAMA_MLP,
                  self.shared_down),
            Rule("decoder.final_layernorm.weight", "model.norm.weight", GAIN),
            Rule("decoder.final_layernorm.bias", "model.norm.bias"),
            Rule("output_layer.weight", "lm_head.weight"),
        ]

    def rules_for(self, config: ModelConfig, name: str,
                  mapping: Optional[List[Entry]] = None) -> List[Tuple[Rule, Dict[str, str]]]:
        """Every (rule, bound fields) whose megatron pattern matches `name`."""
        found = []
        for rule in mapping if mapping is not None else self.mapping(config):
            match = isinstance(rule, Rule) and _regex(rule.megatron).match(name)
            if match:
                found.append((rule, match.groupdict()))
        return found

    def _rule(self, config: ModelConfig, name: str, mapping: List[Entry]):
        found = self.rules_for(config, name, mapping)
        if len(found) != 1:
            raise ConversionError(
                f"megatron tensor {name!r} has no place in a {self.architecture}; the checkpoint "
                f"holds a model this conversion does not know." if not found else
                f"internal: {name!r} matches {len(found)} rules of the {self.name} mapping")
        return found[0]

    @staticmethod
    def _neutral(group: Group, mapping: List[Entry]):
        if group.layer is None:
            return []
        return [(n, [p.format(i=group.layer) for p in n.hf]) for n in mapping
                if isinstance(n, Neutral)]

    def to_hf(self, config: ModelConfig, group: Group, tensors: Tensors) -> Tensors:
        """The megatron tensors of `group` (full TP1 names) -> HF tensors."""
        mapping, src, out = self.mapping(config), dict(tensors), {}
        for name, _shape in group.params:
            rule, bound = self._rule(config, name, mapping)
            if name not in src:
                raise ConversionError(f"{group.name}: tensor {name!r} is missing")
            out.update(zip(rule.hf_names(bound), rule.transform.to_hf(config, src.pop(name))))
        if src:
            raise ConversionError(
                f"{group.name}: tensors {sorted(src)} have no place in the converted model; the "
                f"checkpoint holds a model this conversion does not know.")
        for neutral, names in self._neutral(group, mapping):
            out.update((n, torch.zeros(shape)) for n, shape in zip(names, neutral.shapes))
        return out

    def from_hf(self, config: ModelConfig, group: Group,
                get: Callable[[str], Optional[torch.Tensor]]) -> Tensors:
        """The megatron tensors of `group` (full TP1 names) from HF weights (`get`: name ->
        tensor, or None when absent); the inverse of `to_hf`."""
        mapping, out = self.mapping(config), {}
        for name, _shape in group.params:
            rule, bound = self._rule(config, name, mapping)
            out[name] = rule.transform.from_hf(
                config, *(_take(get, n) for n in rule.hf_names(bound)))
        for neutral, names in self._neutral(group, mapping):
            for n in names:
                tensor = get(n) if neutral.optional else _take(get, n)
                if tensor is not None and bool(tensor.abs().max() > 0):
                    raise ConversionError(f"{n} is not zero: {neutral.why}")
        return out

    def optional_hf_names(self, config: ModelConfig) -> List[str]:
        """HF tensors an importable folder may leave out (optional `Neutral`s)."""
        return [p.format(i=i) for n in self.mapping(config) if isinstance(n, Neutral)
                and n.optional for p in n.hf for i in range(config.num_layers)]

    # -------------------------------------------------------------------------- config.json
    def config_json(self, config: ModelConfig, dtype: torch.dtype,
                    special: Optional[Dict[str, Optional[int]]] = None) -> dict:
        """config.json content for `config` exported as this family."""
        heads, groups, d = _heads(config)
        special = special or {}
        rope_theta = float(config.rotary_base)
        return {
            "architectures": [self.architecture],
            "model_type": self.name,
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
            "torch_dtype": str(dtype).replace("torch.", ""),
            **self.config_fields(config),
        }

    def config_fields(self, config: ModelConfig) -> dict:
        """This family's own config.json fields (over the common ones)."""
        return {"rms_norm_eps": config.norm_epsilon}

    def model_config(self, hf: dict, where: str) -> ModelConfig:
        """The megatron ModelConfig of an HF config.json of this family, or a ConversionError
        saying what the megatron model cannot express."""
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // heads
        values = dict(
            num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
            # --kv-channels: only where the head width is not megatron's hidden / heads.
            kv_channels=None if head_dim * heads == hidden else head_dim,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf.get("intermediate_size"), vocab_size=hf["vocab_size"],
            max_sequence_length=hf.get("max_position_embeddings", 2048),
            init_method_std=hf.get("initializer_range", 0.02),
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            norm_epsilon=hf.get("rms_norm_eps", hf.get("norm_eps", 1e-6)),
            rotary_base=_int_if_whole(_rope_theta(hf, where)),
            transformer_impl="local",
        )
        problems: List[str] = []
        self.read_fields(hf, values, problems)
        if problems:
            raise ConversionError(
                f"{where}: this {self.architecture} cannot be converted to the megatron model: "
                + "; ".join(problems) + ".")
        try:
            config = ModelConfig.recommended(**{k: v for k, v in values.items() if v is not None})
        except ValueError as err:
            raise ConversionError(f"{where}: {err}") from None
        _check_consistent(config, hf, where)
        return config

    def read_fields(self, hf: dict, values: dict, problems: List[str]) -> None:
        """Fill `values` (ModelConfig fields) from this family's own fields of `hf`; append to
        `problems` what megatron cannot express."""
        values.update(norm_placement="prenorm", normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r} (the megatron SwiGLU MLP uses silu)")


class Llama(Family):
    name, architecture = "llama", "LlamaForCausalLM"

    def config_fields(self, config):
        return {**super().config_fields(config), "attention_bias": config.add_bias_linear,
                "mlp_bias": config.add_bias_linear, "pretraining_tp": 1}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        attention_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            problems.append(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} (megatron's "
                            f"add_bias_linear puts biases on all linears or none)")
        values["add_bias_linear"] = attention_bias


def _moe_ffn(config: ModelConfig) -> int:
    return config.resolved_moe_ffn_hidden_size


class Mixtral(Family):
    name, architecture = "mixtral", "MixtralForCausalLM"
    moe, expert = "block_sparse_moe", ("w1", "w3", "w2")

    def config_fields(self, config):
        return {**super().config_fields(config), "intermediate_size": _moe_ffn(config),
                "num_local_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "router_aux_loss_coef": _aux_loss_coeff(config), "router_jitter_noise": 0.0,
                "output_router_logits": False, "sliding_window": None}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        values.update(num_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["intermediate_size"])
        window = hf.get("sliding_window")
        if window is not None and window < values["max_sequence_length"]:
            problems.append(f"sliding_window={window} (sliding-window attention)")


class Qwen2Moe(Family):
    name, architecture = "qwen2_moe", "Qwen2MoeForCausalLM"
    shared_down = DOUBLE  # its sigmoid gate is exported as 0: 1/2 * 2 * down

    def mapping(self, config):
        heads, groups, d = _heads(config)
        extra = []
        if not config.add_bias_linear:
            extra.append(Neutral(
                tuple(f"{H}self_attn.{x}_proj.bias" for x in "qkv"),
                ((heads * d,), (groups * d,), (groups * d,)), optional=True,
                why="the megatron model would need attention biases only on q/k/v, which it "
                    "cannot express (add_bias_linear puts biases on every linear)."))
        if config.moe_shared_expert_intermediate_size:
            extra.append(Neutral(
                (H + "mlp.shared_expert_gate.weight",), ((1, config.hidden_size),),
                why="megatron's shared expert here has no gate; only the exported form "
                    "(gate weight 0, down_proj x2) converts back."))
        return super().mapping(config) + extra

    def config_fields(self, config):
        return {**super().config_fields(config), "num_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": _moe_ffn(config),
                "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
                "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": config.num_layers,
                "router_aux_loss_coef": _aux_loss_coeff(config), "output_router_logits": False}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
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


class Qwen3Moe(Family):
    """Qwen3-MoE: Mixtral-like experts and routing (softmax, top-k renormalized), per-head q/k
    RMSNorms, and dense layers listed in mlp_only_layers (megatron's --moe-layer-freq)."""

    name, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"

    def mapping(self, config):
        return super().mapping(config) + _QK_NORMS

    def config_fields(self, config):
        return {**super().config_fields(config), "num_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": _moe_ffn(config), "norm_topk_prob": True,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [i for i, moe in enumerate(config.moe_layer_pattern)
                                    if not moe],
                "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": config.num_layers,
                "router_aux_loss_coef": _aux_loss_coeff(config), "output_router_logits": False}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        layers = hf["num_hidden_layers"]
        step = hf.get("decoder_sparse_step", 1)
        dense = set(hf.get("mlp_only_layers") or [])
        pattern = [0 if i in dense or (i + 1) % step else 1 for i in range(layers)]
        values.update(num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                      moe_ffn_hidden_size=hf["moe_intermediate_size"], qk_layernorm=True,
                      moe_layer_freq=pattern if 0 in pattern else 1)
        if not hf.get("norm_topk_prob", False):
            problems.append("norm_topk_prob=false (megatron renormalizes the top-k probabilities)")
        if hf.get("attention_bias"):
            problems.append("attention_bias=true (megatron's add_bias_linear puts biases on "
                            "every linear)")
        if hf.get("use_sliding_window"):
            problems.append("use_sliding_window=true (sliding-window attention)")


_QK_NORMS = [
    Rule(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight", GAIN),
    Rule(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight", GAIN),
]


class Glm4Moe(Family):
    """GLM-4-MoE: DeepSeek-V3-style routing as megatron-core computes it with
    --moe-router-score-function sigmoid: sigmoid scores, the expert bias
    (e_score_correction_bias) added for the choice only, group-limited top-k scoring a group by
    its top-2 experts, weights renormalized and scaled (routed_scaling_factor); shared experts,
    the first k layers dense, optional q/k norms, full-width RoPE (partial_rotary_factor 1)."""

    name, architecture = "glm4_moe", "Glm4MoeForCausalLM"
    shared = "shared_experts"
    float32 = ("e_score_correction_bias",)  # transformers keeps it float32 too

    def mapping(self, config):
        return super().mapping(config) + _QK_NORMS + [
            Rule(L + "mlp.router.expert_bias", H + "mlp.gate.e_score_correction_bias")]

    def config_json(self, config, dtype, special=None):
        out = super().config_json(config, dtype, special)
        out["rope_parameters"] = dict(out["rope_parameters"], partial_rotary_factor=1.0)
        return out

    def config_fields(self, config):
        expert_ffn = _moe_ffn(config)
        return {**super().config_fields(config), "n_routed_experts": config.num_experts,
                "num_experts_per_tok": config.moe_router_topk,
                "moe_intermediate_size": expert_ffn,
                "n_shared_experts": config.moe_shared_expert_intermediate_size // expert_ffn,
                "n_group": config.moe_router_num_groups or 1,
                "topk_group": config.moe_router_group_topk or 1,
                "routed_scaling_factor": config.moe_router_topk_scaling_factor or 1.0,
                "norm_topk_prob": config.moe_router_topk > 1,
                "first_k_dense_replace": config.moe_layer_pattern.index(1),
                "use_qk_norm": config.qk_layernorm, "attention_bias": False,
                "partial_rotary_factor": 1.0, "num_mtp_layers": 0,
                "router_aux_loss_coef": _aux_loss_coeff(config)}

    def read_fields(self, hf, values, problems):
        super().read_fields(hf, values, problems)
        layers, dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 1)
        groups, topk = hf.get("n_group", 1), hf["num_experts_per_tok"]
        expert_ffn = hf["moe_intermediate_size"]
        values.update(
            num_experts=hf["n_routed_experts"], moe_router_topk=topk,
            moe_ffn_hidden_size=expert_ffn,
            moe_shared_expert_intermediate_size=hf.get("n_shared_experts", 1) * expert_ffn or None,
            moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
            moe_router_load_balancing_type="none",
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=hf.get("topk_group", 1) if groups > 1 else None,
            moe_router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            moe_layer_freq=[0] * dense + [1] * (layers - dense) if dense else 1,
            qk_layernorm=bool(hf.get("use_qk_norm", False)))
        rope = hf.get("rope_parameters") or {}
        if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)) != 1.0:
            problems.append("partial_rotary_factor != 1 (megatron rotates the whole head)")
        if hf.get("attention_bias"):
            problems.append("attention_bias=true (megatron's add_bias_linear puts biases on "
                            "every linear)")
        if groups > 1 and topk // hf.get("topk_group", 1) != 2:
            problems.append("num_experts_per_tok / topk_group != 2 (megatron scores a group by "
                            "its top topk/group_topk experts, GLM-4-MoE by its top 2)")
        if bool(hf.get("norm_topk_prob", True)) != (topk > 1):
            problems.append("norm_topk_prob differs from megatron's (renormalize when topk > 1)")


class SpanNorm(Family):
    """Our own class: every norm keeps its megatron slot name, config.json carries the exact
    ModelConfig (``megatron_model_config``). Beyond the common mapping: q/k norms
    (``self_attn.q_norm`` / ``k_norm``, with their LayerNorm biases), the expert bias (a float32
    buffer ``mlp.expert_bias``) and the shared-expert gate (``mlp.shared_expert_gate.weight``)."""

    name, architecture = "spannorm", "SpanNormForCausalLM"
    native = False
    float32 = ("mlp.expert_bias",)

    def mapping(self, config):
        return super().mapping(config) + [
            *(Rule(f"{L}self_attention.{x}_layernorm.{p}", f"{H}self_attn.{x}_norm.{p}",
                   GAIN if p == "weight" else SAME) for x in "qk" for p in ("weight", "bias")),
            Rule(L + "mlp.router.expert_bias", H + "mlp.expert_bias"),
            Rule(L + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),
        ]

    def config_fields(self, config):
        from spannorm_megatron.model.scale_init import forward_branch_scale, resolved_scale_init
        from spannorm_megatron.model.specs import final_norm_enabled

        rule = export_rule(config.norm_placement)
        moe = config.is_moe
        ours = {
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
            "rotary_percent": config.rotary_percent,
            "qk_layernorm": config.qk_layernorm,
            "scale_init": resolved_scale_init(config),
            "scale_mode": config.scale_mode,
            "branch_scale": forward_branch_scale(config),
            "residual_scale": 1.0,
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.moe_router_topk if moe else None,
            "moe_intermediate_size": _moe_ffn(config) if moe else None,
            "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
            "shared_expert_gate": moe and config.moe_shared_expert_gate,
            "moe_layer_pattern": list(config.moe_layer_pattern) if moe else None,
            "moe_router_score_function": config.moe_router_score_function,
            "moe_router_pre_softmax": moe and config.moe_router_pre_softmax,
            "moe_router_num_groups": config.moe_router_num_groups if moe else None,
            "moe_router_group_topk": config.moe_router_group_topk if moe else None,
            "moe_router_topk_scaling_factor": config.moe_router_topk_scaling_factor
            if moe else None,
            "moe_router_enable_expert_bias": moe and config.moe_router_enable_expert_bias,
            "moe_router_dtype": config.moe_router_dtype if moe else None,
            "hidden_dropout": config.hidden_dropout,
            "attention_dropout": config.attention_dropout,
            "megatron_model_config": config.to_dict(),
        }
        if rule.config_extras is not None:
            ours.update(rule.config_extras(config))
        return ours

    def model_config(self, hf, where):
        if not hf.get("megatron_model_config"):
            return super().model_config(hf, where)
        known = {f.name for f in fields(ModelConfig)}
        try:
            config = ModelConfig.from_dict({k: v for k, v in hf["megatron_model_config"].items()
                                            if k in known})
        except ValueError as err:
            raise ConversionError(f"{where}: megatron_model_config is not valid here: {err}") \
                from None
        _check_consistent(config, hf, where)
        return config

    def read_fields(self, hf, values, problems):
        values.update(
            norm_placement=hf.get("norm_placement", "spannorm"),
            normalization=hf.get("normalization", "RMSNorm"),
            swiglu=hf.get("gated_mlp", True),
            add_bias_linear=hf.get("linear_bias", False),
            position_embedding_type=hf.get("position_embedding_type", "rope"),
            rotary_percent=float(hf.get("rotary_percent", 1.0)),
            first_layer_input_norm=hf.get("first_layer_input_norm", True),
            final_norm=hf.get("final_norm"),
            qk_layernorm=bool(hf.get("qk_layernorm", False)),
        )
        if hf.get("num_experts"):
            pattern = hf.get("moe_layer_pattern")
            values.update(
                num_experts=hf["num_experts"], moe_router_topk=hf["num_experts_per_tok"],
                moe_ffn_hidden_size=hf.get("moe_intermediate_size"),
                moe_shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size"),
                moe_shared_expert_gate=bool(hf.get("shared_expert_gate", False)),
                moe_layer_freq=list(pattern) if pattern and 0 in pattern else 1,
                **{key: hf[key] for key in (
                    "moe_router_score_function", "moe_router_pre_softmax",
                    "moe_router_num_groups", "moe_router_group_topk",
                    "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
                    "moe_router_dtype") if hf.get(key) is not None})
            if values.get("moe_router_enable_expert_bias"):
                # aux-loss-free balancing, as the GLM-4-MoE import assumes (the folder does not
                # record the training's balancing)
                values["moe_router_load_balancing_type"] = "none"
        if float(hf.get("branch_scale", 1.0)) != 1.0:
            problems.append("branch_scale != 1 without megatron_model_config (the Scale Init "
                            "settings that produce it are unknown)")


FAMILIES: Dict[str, Family] = {f.name: f for f in (Llama(), Mixtral(), Qwen2Moe(), Qwen3Moe(),
                                                    Glm4Moe(), SpanNorm())}
ARCHITECTURES = {f.architecture: f for f in FAMILIES.values()}


# ================================================================================ config.json
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


def _check_consistent(config: ModelConfig, hf: dict, where: str) -> None:
    pairs = [("vocab_size", config.vocab_size), ("hidden_size", config.hidden_size),
             ("num_hidden_layers", config.num_layers),
             ("num_attention_heads", config.num_attention_heads)]
    bad = [f"{key}={hf.get(key)} vs {value}" for key, value in pairs
           if key in hf and hf[key] != value]
    if bad:
        raise ConversionError(f"{where}: config.json disagrees with its megatron_model_config: "
                              + ", ".join(bad))


def family_of(hf: dict, where: str) -> Family:
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if hf.get("model_type") in FAMILIES:
        return FAMILIES[hf["model_type"]]
    raise ConversionError(
        f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; this tool "
        f"converts {sorted(ARCHITECTURES)} (model_type {sorted(FAMILIES)}).")


def model_config_from_hf(hf: dict, where: str) -> Tuple[Family, ModelConfig]:
    """(family, the megatron ModelConfig) of an HF config.json."""
    family = family_of(hf, where)
    return family, family.model_config(hf, where)
