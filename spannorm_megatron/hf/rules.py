"""Export rules: how each normalization placement becomes a Hugging Face model.

One `ExportRule` per placement says which megatron norm slots the layers have, what they are
called in the exported model, and whether a native `transformers` class (Llama family) can
compute the placement. Everything else about a layer (attention, MLP, MoE, embeddings) is the
same for all placements and is handled in `spannorm_megatron.hf.families`.

Adding a placement to the export is adding one entry to `EXPORT_RULES`, provided the
standalone modeling file (`remote_code/modeling_spannorm.py`) computes its equation; it already
computes every placement of the contract (shared/design/norm-placements.md): prenorm, postnorm,
spannorm, deepnorm, perinorm and spannorm_clean. A placement without a rule is refused with a
`ConversionError` before anything is read or written.

Norm names in the exported model:

* our own class (`SpanNormForCausalLM`): every norm keeps its megatron slot name
  (`input_layernorm`, `pre_mlp_layernorm`, `post_attention_norm`, `post_mlp_norm`,
  `embedding_norm`), under `model.layers.{i}.`;
* native Llama/Mixtral/Qwen2-MoE (prenorm only): `input_layernorm` and
  `post_attention_layernorm` (Llama's name for the norm in front of the MLP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

from spannorm_megatron.config import ModelConfig
from spannorm_megatron.hf.errors import ConversionError


@dataclass(frozen=True)
class ExportRule:
    placement: str
    """`ModelConfig.norm_placement` this rule exports."""

    norms: Mapping[str, str]
    """megatron norm slot present in every layer -> its module name in our own HF class: the
    name the modeling file's equation reads (PLACEMENT_NORMS in
    remote_code/configuration_spannorm.py)."""

    first_layer_norms: Mapping[str, str] = field(default_factory=dict)
    """Norm slots only the model's first layer has (saved without the layer axis) -> HF name."""

    first_layer_norms_flag: Optional[str] = None
    """`ModelConfig` bool field that switches the first-layer norms on (None: always there)."""

    native_norms: Optional[Mapping[str, str]] = None
    """megatron slot -> Llama-family name when a native class computes this placement;
    None: only our own class can."""

    config_extras: Optional[Callable[[ModelConfig], dict]] = None
    """Extra fields of our HF config this placement needs (e.g. deepnorm's residual scale)."""

    def all_slots(self) -> List[str]:
        return list(self.norms) + list(self.first_layer_norms)

    def layer_norms(self, config: ModelConfig, layer: int, native: bool) -> List[Tuple[str, str]]:
        """(megatron slot, HF name) of the norms layer `layer` (0-based, global) has."""
        names = self.native_norms if native else self.norms
        pairs = [(slot, names[slot]) for slot in self.norms]
        if layer == 0 and self.first_layer_norms and (
            self.first_layer_norms_flag is None or getattr(config, self.first_layer_norms_flag)
        ):
            pairs += list(self.first_layer_norms.items())
        return pairs


EXPORT_RULES: Dict[str, ExportRule] = {
    rule.placement: rule
    for rule in (
        ExportRule(
            placement="prenorm",
            norms={"input_layernorm": "input_layernorm", "pre_mlp_layernorm": "pre_mlp_layernorm"},
            native_norms={"input_layernorm": "input_layernorm",
                          "pre_mlp_layernorm": "post_attention_layernorm"},
        ),
        ExportRule(
            placement="postnorm",
            norms={"post_attention_norm": "post_attention_norm", "post_mlp_norm": "post_mlp_norm"},
        ),
        ExportRule(
            placement="spannorm",
            norms={"post_attention_norm": "post_attention_norm", "post_mlp_norm": "post_mlp_norm"},
            first_layer_norms={"embedding_norm": "embedding_norm"},
            first_layer_norms_flag="first_layer_input_norm",
        ),
        ExportRule(
            placement="deepnorm",
            norms={"post_attention_norm": "post_attention_norm", "post_mlp_norm": "post_mlp_norm"},
            config_extras=lambda config: {"residual_scale": (2.0 * config.num_layers) ** 0.25},
        ),
        ExportRule(
            placement="perinorm",
            norms={"input_layernorm": "input_layernorm",
                   "attention_output_norm": "attention_output_norm",
                   "pre_mlp_layernorm": "pre_mlp_layernorm",
                   "mlp_output_norm": "mlp_output_norm"},
        ),
        ExportRule(
            placement="spannorm_clean",
            norms={"post_attention_norm": "post_attention_norm", "post_mlp_norm": "post_mlp_norm"},
        ),
    )
}


def export_rule(placement: str) -> ExportRule:
    """The rule for `placement`, or a ConversionError naming the placements that have one."""
    rule = EXPORT_RULES.get(placement)
    if rule is None:
        raise ConversionError(
            f"norm_placement={placement!r} has no Hugging Face export rule: the placements that "
            f"can be exported are {sorted(EXPORT_RULES)}. Add an ExportRule for it to "
            f"spannorm_megatron/hf/rules.py (its norm slots and their exported names)."
        )
    from spannorm_megatron.model.placements import PLACEMENTS

    registered = PLACEMENTS.get(placement)
    if registered is not None and set(registered.norms) != set(rule.all_slots()):
        raise ConversionError(
            f"The export rule of {placement!r} lists the norm slots {sorted(rule.all_slots())} "
            f"but the placement registry has {sorted(registered.norms)}: update its ExportRule in "
            f"spannorm_megatron/hf/rules.py."
        )
    return rule


def router_problems(config: ModelConfig) -> List[str]:
    """Why an MoE model's routing cannot be exported (both our class and the native ones compute
    megatron's default: top-k over the router logits, softmax over the k selected)."""
    if not config.is_moe:
        return []
    if config.moe_router_load_balancing_type == "sinkhorn":
        return ["moe_router_load_balancing_type='sinkhorn' routes differently at inference "
                "(only top-k + softmax routing is exported)"]
    return []


def native_problems(config: ModelConfig) -> List[str]:
    """Why no native transformers class (Llama, Mixtral, Qwen2-MoE) can hold `config`; [] if one can."""
    from spannorm_megatron.model.scale_init import forward_branch_scale
    from spannorm_megatron.model.specs import final_norm_enabled

    rule = export_rule(config.norm_placement)
    problems = []
    if rule.native_norms is None:
        problems.append(f"norm_placement={config.norm_placement!r} (Llama-family classes are "
                        f"pre-norm)")
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r} (Llama uses RMSNorm)")
    if not config.swiglu:
        problems.append("swiglu=False (Llama's MLP is gated SiLU)")
    if config.position_embedding_type != "rope":
        problems.append(f"position_embedding_type={config.position_embedding_type!r} "
                        f"(Llama uses RoPE)")
    if not final_norm_enabled(config):
        problems.append("final_norm=False (Llama always has a final norm)")
    if forward_branch_scale(config) != 1.0:
        problems.append("scale_mode='forward' (Llama has no branch multiplier)")
    if config.is_moe and config.add_bias_linear:
        problems.append("add_bias_linear=True with MoE (Mixtral/Qwen2-MoE experts have no biases)")
    return problems


def native_family(config: ModelConfig) -> str:
    """Which native family would hold `config` (assuming `native_problems` is empty)."""
    if not config.is_moe:
        return "llama"
    return "qwen2_moe" if config.moe_shared_expert_intermediate_size else "mixtral"
