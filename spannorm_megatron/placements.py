"""The norm-placement registry: everything the stack knows about a placement, in one entry.

Config validation, the model specs (`model/specs.py`), Scale Init and the Hugging Face export
(`hf/rules.py`) read it; the standalone remote-code files (`hf/remote_code/`), which cannot
import this package, hold a copy that `tests/test_placements.py` keeps in agreement. It imports
no torch, so configs and tools can consult it without loading megatron-core.

Adding a placement is `register(Placement(...))`, naming the `TransformerLayer` (sub)class that
computes it (in `model/layers.py` when megatron-core's own layer cannot express it). An entry
that lacks a piece is refused when it is registered, naming what is missing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional

from spannorm_megatron.errors import ConfigError

FUSIONS = ("none", "qkv", "fc1")
"""Where a norm's output goes, and so which Transformer Engine linear may absorb it: `none`
(a residual path or several consumers read it), `qkv` (only the attention's QKV projection),
`fc1` (only a dense MLP's fc1; an MoE router reads it too, so MoE keeps it standalone)."""

MEGATRON_LAYER = "megatron.core.transformer.transformer_layer:TransformerLayer"


class ScaleInitRule(NamedTuple):
    std: str
    """The output projections' std, in words (sigma: --init-method-std, L: the layers)."""
    factor: Callable[[int], float]
    """c of c x sigma, for a model of L layers."""


# Scale Init's named rules, the one list of their names: --scale-init takes them (or a number
# c), a placement's default is one of them, and --help says what each does.
SCALE_INIT_RULES: Mapping[str, ScaleInitRule] = MappingProxyType({
    "sqrt_depth": ScaleInitRule("sigma/sqrt(L)", lambda num_layers: 1.0 / math.sqrt(num_layers)),
    "megatron": ScaleInitRule("sigma/sqrt(2L)",
                              lambda num_layers: 1.0 / math.sqrt(2.0 * num_layers)),
    "none": ScaleInitRule("sigma", lambda num_layers: 1.0),
})
SCALE_INIT_NAMES = tuple(SCALE_INIT_RULES)


def no_residual_scale(num_layers: int) -> float:
    return 1.0


def deepnorm_residual_scale(num_layers: int) -> float:
    """DeepNet's a = (2L)^(1/4) multiplying the residual stream (decoder-only form)."""
    return (2.0 * num_layers) ** 0.25


@dataclass(frozen=True)
class Placement:
    name: str
    """Registry key, the value of `--norm-placement`."""

    equations: str
    """The layer's computation as written in the contract (shared/design/norm-placements.md)."""

    layer: str
    """`module:Class` of the TransformerLayer (sub)class that computes it."""

    norms: Mapping[str, str]
    """Norm slot (a field of the layer's submodules, also its name in our HF class) -> fusion
    (one of FUSIONS)."""

    final_norm: bool
    """Whether the contract puts a norm before the output layer."""

    default_scale_init: str = "megatron"
    """Output-projection init when `--scale-init` is not given."""

    layer_params: tuple = ()
    """`ModelConfig` fields passed to the layer constructor."""

    first_layer_norms: tuple = ()
    """Slots of `norms` only the model's first layer has."""

    first_layer_norms_flag: Optional[str] = None
    """`ModelConfig` bool field that switches the first-layer norms on (None: always there)."""

    native_norms: Optional[Mapping[str, str]] = None
    """Slot -> Llama-family name when a native transformers class computes this placement;
    None: only our own HF class can."""

    residual_scale: Callable[[int], float] = no_residual_scale
    """The factor a(L) multiplying the residual stream (1 but for DeepNorm)."""

    scales_built_weights: bool = False
    """The layer multiplies linear weights in place after megatron-core built them (DeepNorm's
    beta): that cannot act on FP8 parameters (--fp8-param-gather refuses it)."""

    def __post_init__(self) -> None:
        missing = [name for name in ("name", "equations", "layer", "norms")
                   if not getattr(self, name)]
        if missing:
            raise ConfigError(f"Placement {self.name!r} lacks {', '.join(missing)}: every "
                              f"placement names its equations, layer class and norm slots.")
        problems = []
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.layer):
            problems.append(f"layer={self.layer!r} is not 'module:Class'")
        bad = {slot: f for slot, f in self.norms.items() if f not in FUSIONS}
        if bad:
            problems.append(f"norm fusions {bad} are not among {list(FUSIONS)}")
        if not set(self.first_layer_norms) <= set(self.norms):
            problems.append(f"first_layer_norms {list(self.first_layer_norms)} are not all "
                            f"slots of norms")
        if self.native_norms is not None and set(self.native_norms) != set(self.layer_norms):
            problems.append(f"native_norms names {sorted(self.native_norms)}, the layers have "
                            f"{sorted(self.layer_norms)}")
        if self.default_scale_init not in SCALE_INIT_NAMES:
            problems.append(f"default_scale_init={self.default_scale_init!r} is not among "
                            f"{list(SCALE_INIT_NAMES)}")
        if problems:
            raise ConfigError(f"Placement {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def layer_norms(self) -> List[str]:
        """The slots every layer has."""
        return [slot for slot in self.norms if slot not in self.first_layer_norms]

    @property
    def supports_forward_scaling(self) -> bool:
        # Forward-mode branch scaling lives in our placement layers, not megatron-core's layer.
        return self.layer != MEGATRON_LAYER

    def norms_of_layer(self, layer: int, first_layer_norms_on: bool = True) -> List[str]:
        """The slots layer `layer` (0-based, whole model) has."""
        first = list(self.first_layer_norms) if layer == 0 and first_layer_norms_on else []
        return self.layer_norms + first


_LAYERS = "spannorm_megatron.model.layers:"
_REGISTRY: Dict[str, Placement] = {}
PLACEMENTS: Mapping[str, Placement] = MappingProxyType(_REGISTRY)
"""Read-only view of the registry: name -> Placement."""


def register(placement: Placement) -> Placement:
    """Add `placement` (a name already taken is refused)."""
    if placement.name in _REGISTRY:
        raise ConfigError(f"A placement named {placement.name!r} is registered already.")
    _REGISTRY[placement.name] = placement
    return placement


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def placement_names() -> List[str]:
    return sorted(_REGISTRY)


def scale_init_help() -> str:
    """--scale-init's help: each named rule, and each registered placement's default."""
    rules = ", ".join(f"{name} {rule.std}" for name, rule in SCALE_INIT_RULES.items())
    by_default: Dict[str, List[str]] = {}
    for name, placement in PLACEMENTS.items():
        by_default.setdefault(placement.default_scale_init, []).append(name)
    defaults = "; ".join(f"{rule} for {', '.join(names)}" for rule, names in by_default.items())
    return (f"Output-projection scaling (attention output projection and MLP fc2, every "
            f"expert's too): {rules}, or a positive number c for c x sigma. Unset: the "
            f"placement's default ({defaults}).")


def get_placement(name: str) -> Placement:
    """The registry entry for `name`; an unknown name is a ConfigError listing the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"norm_placement={name!r} is not a known placement: choose one of "
            f"{placement_names()} (see shared/design/norm-placements.md)."
        ) from None


for _placement in (
    Placement(
        name="prenorm",
        equations="h = x + A(N1(x)); x' = h + F(N2(h))",
        layer=MEGATRON_LAYER,
        norms={"input_layernorm": "qkv", "pre_mlp_layernorm": "fc1"},
        final_norm=True,
        native_norms={"input_layernorm": "input_layernorm",
                      "pre_mlp_layernorm": "post_attention_layernorm"},
    ),
    Placement(
        name="postnorm",
        equations="h = N1(x + A(x)); x' = N2(h + F(h))",
        layer=_LAYERS + "PostNormLayer",
        norms={"post_attention_norm": "none", "post_mlp_norm": "none"},
        final_norm=False,
    ),
    Placement(
        name="spannorm",
        equations="h = N1(x + A(xin)); x' = N2(x + F(h)); xin = N0(x) in layer 1, else x",
        layer=_LAYERS + "SpanNormLayer",
        # N1's output h feeds only the MLP, so Transformer Engine fuses N1 into fc1.
        norms={"post_attention_norm": "fc1", "post_mlp_norm": "none", "embedding_norm": "none"},
        final_norm=False,
        default_scale_init="sqrt_depth",
        layer_params=("first_layer_input_norm",),
        first_layer_norms=("embedding_norm",),
        first_layer_norms_flag="first_layer_input_norm",
    ),
    Placement(
        name="deepnorm",
        equations="h = N1(a*x + A(x)); x' = N2(a*h + F(h)); a = (2L)^(1/4)",
        layer=_LAYERS + "DeepNormLayer",
        norms={"post_attention_norm": "none", "post_mlp_norm": "none"},
        final_norm=False,
        # DeepNet's own init: base sigma everywhere, then v, proj, fc1, fc2 / (8L)^(1/4).
        default_scale_init="none",
        residual_scale=deepnorm_residual_scale,
        scales_built_weights=True,
    ),
    Placement(
        name="perinorm",
        equations="h = x + N1o(A(N1i(x))); x' = h + N2o(F(N2i(h)))",
        layer=_LAYERS + "PeriNormLayer",
        norms={"input_layernorm": "qkv", "attention_output_norm": "none",
               "pre_mlp_layernorm": "fc1", "mlp_output_norm": "none"},
        final_norm=True,
    ),
    Placement(
        name="spannorm_clean",
        equations="h = N1(x + A(x)); x' = x + N2(h + F(h)); N2 gain initialized to 1/sqrt(L)",
        layer=_LAYERS + "SpanNormCleanLayer",
        norms={"post_attention_norm": "none", "post_mlp_norm": "none"},
        final_norm=True,
    ),
):
    register(_placement)
