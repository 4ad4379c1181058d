"""A Hugging Face model family as a state-dict adapter: the mapping machinery and the base class.

Each family has one mapping (`Family.mapping`): `Rule`s that pair a megatron TP1 state-dict name
pattern with the Hugging Face name(s) it becomes and the `Transform` between them, e.g.
``decoder.layers.{i}.self_attention.linear_qkv.{p}`` -> ``model.layers.{i}.self_attn.q_proj.{p}``,
``k_proj``, ``v_proj`` through `QKV` (``{i}`` a layer, ``{e}`` an expert, ``{p}`` weight or
bias). Export (`Family.to_hf`) and import (`Family.from_hf`) are both derived from it: every
megatron parameter of a group (`layout.megatron_groups`, the one list of what the model holds)
is matched by exactly one rule, run forward on export and inverted on import. `Neutral` entries
are HF tensors megatron has no counterpart for (written as 0, and required to be 0 on import).

Norm gains are stored as the gain itself: with `apply_layernorm_1p` megatron stores gain - 1,
so the export adds 1 (and the import subtracts it; in float32 that is exact to one rounding).
Norm names come from the placement's `ExportRule` (rules.py).

The family class also writes config.json (`Family.config_json`) and reads it back into a
`ModelConfig` (`Family.model_config`), refusing what the megatron model cannot express. The
families themselves: `native_families.py` (transformers' own classes) and `spannorm_family.py`
(our class); `families.py` is their registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.hf.errors import ConversionError
from spannorm_megatron.hf.layout import Group
from spannorm_megatron.hf.rules import export_rule
from spannorm_megatron.hf.tensors import merge_swiglu, pack_qkv, split_swiglu, unpack_qkv

Tensors = Dict[str, torch.Tensor]

def head_sizes(config: ModelConfig) -> Tuple[int, int, int]:
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
QKV = Transform(lambda c, t: unpack_qkv(t, *head_sizes(c)),
                lambda c, q, k, v: pack_qkv(q, k, v, *head_sizes(c)))
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
        norms = export_rule(config.placement).layer_norms(config, 0, native=self.native)
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
        heads, groups, d = head_sizes(config)
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
        check_consistent(config, hf, where)
        return config

    def read_fields(self, hf: dict, values: dict, problems: List[str]) -> None:
        """Fill `values` (ModelConfig fields) from this family's own fields of `hf`; append to
        `problems` what megatron cannot express."""
        values.update(norm_placement="prenorm", normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act={act!r} (the megatron SwiGLU MLP uses silu)")




# ================================================================================ config.json
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


def check_consistent(config: ModelConfig, hf: dict, where: str) -> None:
    pairs = [("vocab_size", config.vocab_size), ("hidden_size", config.hidden_size),
             ("num_hidden_layers", config.num_layers),
             ("num_attention_heads", config.num_attention_heads)]
    bad = [f"{key}={hf.get(key)} vs {value}" for key, value in pairs
           if key in hf and hf[key] != value]
    if bad:
        raise ConversionError(f"{where}: config.json disagrees with its megatron_model_config: "
                              + ", ".join(bad))
