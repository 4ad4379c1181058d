"""The MoE flags' cross-field rules, each named as Megatron-LM spells it: what Megatron-LM's
validate_args refuses, and what megatron-core would assert only inside TransformerConfig, the
router or the dispatcher (`ModelConfig.validate` calls `check_moe`)."""

from __future__ import annotations

from dataclasses import fields
from typing import List

from spannorm_megatron.config.model_values import parse_moe_layer_freq
from spannorm_megatron.errors import ConfigError


def check_moe(config) -> None:
    """Cross-field rules of the MoE flags, each named as Megatron-LM spells it; megatron-core
    would assert most of them only inside TransformerConfig or the router."""
    # As Megatron-LM's validate_args: a one-element list is its value.
    for name in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        value = getattr(config, name)
        if isinstance(value, (list, tuple)):
            setattr(config, name, value[0] if len(value) == 1 else list(value))
    types, coeffs = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    if isinstance(types, list) and not (isinstance(coeffs, list) and len(coeffs) == len(types)):
        raise ConfigError(
            f"--moe-router-load-balancing-type lists {len(types)} types ({' '.join(types)}): "
            f"give --moe-aux-loss-coeff one coefficient for each, in the same order.")
    if isinstance(coeffs, list) and not isinstance(types, list):
        raise ConfigError(
            f"--moe-aux-loss-coeff lists {len(coeffs)} coefficients but "
            f"--moe-router-load-balancing-type names one type: list as many types.")
    try:
        config.moe_layer_freq = parse_moe_layer_freq(config.moe_layer_freq)
    except ValueError as error:
        raise ConfigError(f"--moe-layer-freq (moe_layer_freq) = {error}.") from None
    freq = config.moe_layer_freq
    if isinstance(freq, list) and len(freq) != config.num_layers:
        raise ConfigError(
            f"--moe-layer-freq lists {len(freq)} layers but --num-layers is "
            f"{config.num_layers}: give one 0 (dense) or 1 (MoE) per layer, e.g. "
            f"([0]*1+[1]*{config.num_layers - 1}).")
    if not config.is_moe:
        if freq != 1:
            raise ConfigError("--moe-layer-freq applies to MoE models, and this model is "
                              "dense: set --num-experts or drop --moe-layer-freq.")
        given = _moe_execution_flags_given(config)
        if given:
            raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} "
                              f"to MoE models, and this model is dense: set --num-experts "
                              f"or drop {'it' if len(given) == 1 else 'them'}.")
        return
    # A frequency makes layer 0 MoE; only a list can leave every layer dense (and listing the
    # layers of a frequency would hold one entry for each of --num-layers, however many).
    if not isinstance(config.moe_layer_freq, int) and 1 not in config.moe_layer_freq:
        raise ConfigError(
            f"--moe-layer-freq {freq} makes no layer MoE although --num-experts is set: "
            f"mark at least one layer 1, or drop --num-experts for a dense model.")
    sigmoid = config.moe_router_score_function == "sigmoid"
    if sigmoid and config.moe_router_pre_softmax:
        raise ConfigError(
            "--moe-router-pre-softmax applies to softmax scoring, and "
            "--moe-router-score-function is sigmoid: drop one of them.")
    if (config.moe_router_topk == 1 and not sigmoid and not config.moe_router_pre_softmax
            and "sinkhorn" not in config.balancing_types):
        raise ConfigError(
            "--moe-router-topk 1 with softmax scoring needs --moe-router-pre-softmax (a "
            "softmax over one chosen expert is constant, so the router would get no "
            "gradient).")
    if config.moe_router_enable_expert_bias and not sigmoid:
        raise ConfigError(
            "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
            "(megatron-core's aux-loss-free balancing is defined for sigmoid scores).")
    if config.moe_router_bias_update_rate is not None and not config.moe_router_enable_expert_bias:
        raise ConfigError(
            "--moe-router-bias-update-rate is set but there is no expert bias to update: add "
            "--moe-router-enable-expert-bias, or drop the rate.")
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError(
            "Group-limited routing needs both --moe-router-num-groups and "
            "--moe-router-group-topk: set both, or neither.")
    if groups is not None:
        if config.num_experts % groups:
            raise ConfigError(
                f"--num-experts {config.num_experts} is not divisible by "
                f"--moe-router-num-groups {groups}: each group needs the same number of "
                f"experts; use a group count that divides the experts.")
        if group_topk > groups:
            raise ConfigError(
                f"--moe-router-group-topk {group_topk} is larger than "
                f"--moe-router-num-groups {groups}: a token cannot use more groups than "
                f"exist; lower --moe-router-group-topk.")
        if config.moe_router_topk % group_topk:
            raise ConfigError(
                f"--moe-router-topk {config.moe_router_topk} is not divisible by "
                f"--moe-router-group-topk {group_topk}: megatron-core picks topk / group_topk "
                f"experts in each chosen group.")
        if config.moe_router_topk // group_topk > config.num_experts // groups:
            raise ConfigError(
                f"--moe-router-topk {config.moe_router_topk} / --moe-router-group-topk "
                f"{group_topk} experts per group exceeds the {config.num_experts // groups} "
                f"experts of a group: raise --moe-router-group-topk or lower "
                f"--moe-router-num-groups.")
    if config.moe_expert_capacity_factor is not None and \
            "sinkhorn" in config.balancing_types:
        raise ConfigError(
            "--moe-expert-capacity-factor works with aux_loss, seq_aux_loss, "
            "global_aux_loss or none balancing, not sinkhorn: change "
            "--moe-router-load-balancing-type or drop the capacity factor.")
    if config.moe_pad_expert_input_to_capacity and config.moe_expert_capacity_factor is None:
        raise ConfigError(
            "--moe-pad-expert-input-to-capacity needs a capacity to pad to: add "
            "--moe-expert-capacity-factor X.")
    topk, factor = config.moe_router_topk, config.moe_expert_capacity_factor
    if config.moe_pad_expert_input_to_capacity and factor is not None and \
            config.moe_token_dispatcher_type == "alltoall" and topk * factor > config.num_experts:
        # capacity = ceil(tokens x topk / experts x factor) > tokens exactly when
        # topk x factor > experts; megatron-core's alltoall permute then keeps at most `tokens`
        # entries per expert and cannot reshape them to [experts, capacity].
        raise ConfigError(
            f"--moe-pad-expert-input-to-capacity pads each expert to its capacity, and "
            f"--moe-router-topk {topk} x --moe-expert-capacity-factor {factor:g} > --num-experts "
            f"{config.num_experts} makes that capacity larger than the tokens of a micro-batch, "
            f"which megatron-core's alltoall dispatcher cannot pad to (a shape error in the first "
            f"step): use a capacity factor of at most {config.num_experts / topk:g}, or "
            f"--moe-token-dispatcher-type allgather.")
    if config.moe_shared_expert_gate and config.moe_shared_expert_intermediate_size is None:
        raise ConfigError(
            "--moe-shared-expert-gate gates a shared expert, and there is none: add "
            "--moe-shared-expert-intermediate-size N.")
    # Whether this machine has DeepEP for flex is asked by model.moe_kernels (before any
    # process group, in the Trainer), so that a GPU run's config can be read anywhere.
    _check_moe_execution(config)


def _moe_execution_flags_given(config) -> List[str]:
    """The MoE-only flags of this model that differ from their defaults (Megatron-LM
    ignores them on a dense model; here they are named)."""
    defaults = {f.name: f.default for f in fields(config)}
    names = ("moe_grouped_gemm", "moe_use_legacy_grouped_gemm", "moe_shared_expert_overlap",
             "moe_layer_recompute", "moe_permute_fusion", "moe_router_fusion",
             "moe_flex_dispatcher_backend", "moe_enable_deepep", "moe_deepep_num_sms",
             "moe_hybridep_num_sms", "moe_router_padding_for_quantization",
             "moe_router_padding_for_fp8", "moe_input_jitter_eps",
             "moe_router_force_load_balancing", "moe_apply_probs_on_input",
             "moe_latent_size", "moe_enable_routing_replay")
    return ["--" + name.replace("_", "-") for name in names
            if getattr(config, name) != defaults[name]]


def _check_moe_execution(config) -> None:
    """What megatron-core would assert (or silently ignore) about the MoE execution flags,
    said before anything starts. Whether this machine has the kernels they need is
    `spannorm_megatron.model.moe_kernels`'s question."""
    flex = config.moe_token_dispatcher_type == "flex"
    backend = "deepep" if config.moe_enable_deepep else config.moe_flex_dispatcher_backend
    rules = [
        (config.moe_use_legacy_grouped_gemm and not config.moe_grouped_gemm,
         "--moe-use-legacy-grouped-gemm chooses the grouped GEMM's implementation: add "
         "--moe-grouped-gemm, or drop it"),
        (config.moe_shared_expert_overlap and config.moe_shared_expert_intermediate_size is None,
         "--moe-shared-expert-overlap overlaps a shared expert, and there is none: add "
         "--moe-shared-expert-intermediate-size N, or drop it"),
        (config.moe_shared_expert_overlap and config.moe_token_dispatcher_type != "alltoall",
         f"--moe-shared-expert-overlap overlaps the shared expert with the alltoall "
         f"dispatcher's communication (megatron-core), and --moe-token-dispatcher-type is "
         f"{config.moe_token_dispatcher_type}: use alltoall, or drop it"),
        (config.moe_shared_expert_overlap and config.moe_latent_size is not None,
         "--moe-shared-expert-overlap does not work with --moe-latent-size (megatron-core): "
         "drop one of them"),
        (config.moe_enable_deepep and not flex,
         "--moe-enable-deepep is the flex dispatcher's DeepEP backend: add "
         "--moe-token-dispatcher-type flex, or drop it"),
        (config.moe_enable_deepep and config.moe_flex_dispatcher_backend == "hybridep",
         "--moe-enable-deepep asks for the deepep backend and --moe-flex-dispatcher-backend "
         "for hybridep: give one of them"),
        (config.moe_flex_dispatcher_backend != "deepep" and not flex,
         f"--moe-flex-dispatcher-backend {config.moe_flex_dispatcher_backend} applies to "
         f"--moe-token-dispatcher-type flex: add it, or drop the backend"),
        (config.moe_deepep_num_sms != 20 and not (flex and backend == "deepep"),
         "--moe-deepep-num-sms applies to the flex dispatcher's deepep backend "
         "(--moe-token-dispatcher-type flex): add it, or drop the flag"),
        (config.moe_hybridep_num_sms != 16 and not (flex and backend == "hybridep"),
         "--moe-hybridep-num-sms applies to the flex dispatcher's hybridep backend "
         "(--moe-token-dispatcher-type flex --moe-flex-dispatcher-backend hybridep): add "
         "them, or drop the flag"),
        ((config.moe_router_padding_for_quantization or config.moe_router_padding_for_fp8)
         and config.moe_token_dispatcher_type == "allgather",
         "--moe-router-padding-for-quantization (or -fp8) is not supported by the allgather "
         "dispatcher (megatron-core): use --moe-token-dispatcher-type alltoall or flex"),
        (config.moe_apply_probs_on_input and config.moe_router_topk != 1,
         f"--moe-apply-probs-on-input scales each token by its one routing probability "
         f"before the expert, which megatron-core defines for --moe-router-topk 1 only "
         f"(it is {config.moe_router_topk})"),
        (config.moe_latent_size is not None and config.moe_use_legacy_grouped_gemm,
         "--moe-latent-size does not work with --moe-use-legacy-grouped-gemm (Megatron-LM): "
         "drop one of them"),
    ]
    for broken, message in rules:
        if broken:
            raise ConfigError(message + ".")
