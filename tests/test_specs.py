"""Spec structure: which norms are fused under Transformer Engine, and checkpoint keys that let
the local and Transformer Engine flavours load each other's checkpoints.

Transformer Engine is not installed on CPU machines; its megatron-core classes are then
placeholders, distinct objects that the specs must still pick correctly (the GPU tests run the
same specs for real).
"""

import pytest
import torch
from megatron.core.extensions import transformer_engine as te
from megatron.core.transformer.identity_op import IdentityOp

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.model import build_gpt_model, layer_spec, transformer_config
from spannorm_megatron.model.norms import Norm
from spannorm_megatron.model.specs import transformer_engine_available
from spannorm_megatron.placements import PLACEMENTS

# Per placement: norm slot -> fused away in the TE dense spec?
FUSED_IN_TE_DENSE = {
    "prenorm": {"input_layernorm": True, "pre_mlp_layernorm": True},
    "postnorm": {"post_attention_norm": False, "post_mlp_norm": False},
    "spannorm": {"embedding_norm": False, "post_attention_norm": True, "post_mlp_norm": False},
    "deepnorm": {"post_attention_norm": False, "post_mlp_norm": False},
    "perinorm": {"input_layernorm": True, "attention_output_norm": False,
                 "pre_mlp_layernorm": True, "mlp_output_norm": False},
    "spannorm_clean": {"post_attention_norm": False, "post_mlp_norm": False},
}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", sorted(FUSED_IN_TE_DENSE))
def test_transformer_engine_spec_fuses_only_single_consumer_norms(placement, moe):
    assert set(FUSED_IN_TE_DENSE) == set(PLACEMENTS)  # a new placement must be listed here
    config = ModelConfig.recommended(norm_placement=placement, num_experts=4 if moe else None,
                         moe_grouped_gemm=moe)
    sub = layer_spec(config, transformer_engine=True).submodules
    fused_qkv = fused_fc1 = False
    for slot, fused in FUSED_IN_TE_DENSE[placement].items():
        # The MoE router reads the pre-MLP norm's output too, so no fc1 fusion with experts.
        into_fc1 = slot in ("pre_mlp_layernorm", "post_attention_norm")
        fused = fused and not (moe and into_fc1)
        assert getattr(sub, slot) is (IdentityOp if fused else te.TENorm), slot
        fused_qkv |= fused and not into_fc1
        fused_fc1 |= fused and into_fc1
    linear_qkv = sub.self_attention.submodules.linear_qkv
    assert linear_qkv is (te.TELayerNormColumnParallelLinear if fused_qkv
                          else te.TEColumnParallelLinear)
    if not moe:
        assert sub.mlp.submodules.linear_fc1 is (te.TELayerNormColumnParallelLinear if fused_fc1
                                                 else te.TEColumnParallelLinear)
    assert sub.sharded_state_dict_keys_map == {}


@pytest.mark.parametrize(
    "placement,expected_keys",
    [
        ("prenorm", {"self_attention.linear_qkv.layer_norm_weight",
                     "mlp.linear_fc1.layer_norm_weight"}),
        ("spannorm", {"embedding_norm.weight", "mlp.linear_fc1.layer_norm_weight",
                      "post_mlp_norm.weight"}),
        ("postnorm", {"post_attention_norm.weight", "post_mlp_norm.weight"}),
    ],
)
def test_local_checkpoint_keys_match_transformer_engine_names(seeded, placement, expected_keys):
    config = ModelConfig.recommended(norm_placement=placement, num_layers=2, hidden_size=32,
                         num_attention_heads=4, vocab_size=16, max_sequence_length=8,
                         transformer_impl="local")
    sub = layer_spec(config, transformer_engine=False).submodules
    for slot in FUSED_IN_TE_DENSE[placement]:
        assert getattr(sub, slot) is Norm
    model = build_gpt_model(config, transformer_config(config))
    # The key a tensor is saved under in a dist checkpoint (not the state-dict key).
    saved = [t.key for t in model.sharded_state_dict().values()]
    keys = {k.split("decoder.layers.")[1] for k in saved if "decoder.layers." in k and "norm" in k}
    assert keys == expected_keys


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", sorted(FUSED_IN_TE_DENSE))
def test_dist_checkpoint_round_trip(seeded, tmp_path, placement, moe):
    """megatron-core dist checkpointing saves every parameter (SpanNorm's first-layer-only N0
    included, which cannot be stacked with the other layers) and loads it into a fresh model."""
    from megatron.core import dist_checkpointing

    config = ModelConfig.recommended(norm_placement=placement, num_layers=3, hidden_size=32,
                         num_attention_heads=4, vocab_size=16, max_sequence_length=8,
                         num_experts=4 if moe else None, transformer_impl="local")
    saved = build_gpt_model(config, transformer_config(config))
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    fresh = build_gpt_model(config, transformer_config(config))  # different random weights
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    saved_params = dict(saved.named_parameters())
    assert saved_params.keys() == dict(fresh.named_parameters()).keys()
    for name, param in fresh.named_parameters():
        assert torch.equal(param, saved_params[name]), name


def _saved_keys(model) -> set:
    return {t.key for t in model.sharded_state_dict().values()}


@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine and a GPU")
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", sorted(FUSED_IN_TE_DENSE))
def test_transformer_engine_model_saves_the_local_keys_plus_extra_state(seeded, placement, moe):
    """The TE flavour saves every local key (fused norms under the same names) and adds only
    `_extra_state`, which loading treats as optional: checkpoints move between the flavours."""
    shape = dict(norm_placement=placement, num_layers=2, hidden_size=32, num_attention_heads=4,
                 vocab_size=16, max_sequence_length=8, num_experts=4 if moe else None)
    local = ModelConfig.recommended(**shape, transformer_impl="local")
    te_config = ModelConfig.recommended(**shape, transformer_impl="transformer_engine")
    local_keys = _saved_keys(build_gpt_model(local, transformer_config(local)))
    te_keys = _saved_keys(build_gpt_model(te_config, transformer_config(te_config)))
    assert {k for k in te_keys if not k.endswith("_extra_state")} == local_keys


def test_gpu_fusions_follow_megatron_lm(monkeypatch):
    """Fused kernels only on GPUs: bias-dropout-add and the activation (SwiGLU with or without
    bias, GELU only with one), RoPE only with Transformer Engine (not installed here), masked
    softmax and gradient accumulation only with their CUDA extensions (not installed here)."""
    from spannorm_megatron.model import fusions

    swiglu = ModelConfig.recommended(swiglu=True)
    gelu = ModelConfig.recommended(swiglu=False, add_bias_linear=False)
    off = dict(bias_dropout_fusion=False, bias_activation_fusion=False, apply_rope_fusion=False,
               masked_softmax_fusion=False, gradient_accumulation_fusion=False,
               cross_entropy_loss_fusion=False, cross_entropy_fusion_impl="native")
    assert fusions.runnable_fusions(swiglu) == off
    monkeypatch.setattr(fusions, "has_accelerator", lambda: True)  # what a GPU node answers
    assert fusions.runnable_fusions(swiglu) == dict(
        off, bias_dropout_fusion=True, bias_activation_fusion=True,
        apply_rope_fusion=transformer_engine_available())
    assert fusions.runnable_fusions(gelu)["bias_activation_fusion"] is False
    assert transformer_config(swiglu).bias_activation_fusion is True


@pytest.mark.parametrize("apex", [False, True], ids=["without-apex", "with-apex"])
def test_gradient_accumulation_and_masked_softmax_fusions_where_megatron_lm_has_them(
        monkeypatch, apex):
    """Megatron-LM turns both on by default. On a GPU-flavoured build (what a GPU node with
    Transformer Engine answers) they reach megatron-core's config: masked softmax with the TE
    layers (TE's attention fuses it; the local attention needs its CUDA extension), gradient
    accumulation in the config where Apex's kernel is there for megatron-core's own linears,
    else in the TE layers alone (`te_layers_fuse_weight_gradients`). Each `--no-...` flag turns
    its fusion off, and on CPU both are off."""
    from spannorm_megatron.config.performance import PerformanceConfig
    from spannorm_megatron.model import fusions, specs

    def resolved(performance, **fields):
        model = ModelConfig.recommended(swiglu=True, **fields)
        tconfig = transformer_config(model, **performance.transformer_kwargs(),
                                     **fusions.runnable_fusions(model, performance))
        return (tconfig.masked_softmax_fusion, tconfig.gradient_accumulation_fusion,
                fusions.te_layers_fuse_weight_gradients(model, performance))

    # Megatron-LM's defaults: both allowed (RoPE's fusion off: megatron-core checks for TE's
    # kernel when the config is made, and TE is only pretended here).
    run = PerformanceConfig(bf16=True, apply_rope_fusion=False)
    forbidden = PerformanceConfig(bf16=True, apply_rope_fusion=False, masked_softmax_fusion=False,
                                  gradient_accumulation_fusion=False)
    importable = fusions._importable
    monkeypatch.setattr(fusions, "_importable", lambda *names: (
        apex if names == (fusions.GRADIENT_ACCUMULATION_EXTENSION,) else importable(*names)))
    assert resolved(run) == (False, False, False)  # CPU: no fused kernel runs
    assert resolved(run, transformer_impl="local") == (False, False, False)

    monkeypatch.setattr(fusions, "has_accelerator", lambda: True)
    monkeypatch.setattr(specs, "transformer_engine_available", lambda: True)
    assert resolved(run, transformer_impl="transformer_engine") == (True, apex, not apex)
    assert resolved(run, transformer_impl="auto") == (True, apex, not apex)
    assert resolved(forbidden, transformer_impl="transformer_engine") == (False, False, False)
    # The local layers: the local attention's softmax needs its extension (absent here), and
    # without Apex no linear fuses.
    assert resolved(run, transformer_impl="local") == (
        importable(*fusions.MASKED_SOFTMAX_EXTENSIONS), apex, False)
    # A model built outside a run has no main gradients to accumulate into.
    model = ModelConfig.recommended(transformer_impl="transformer_engine")
    assert fusions.runnable_fusions(model)["gradient_accumulation_fusion"] is False
    assert fusions.te_layers_fuse_weight_gradients(model) is False
