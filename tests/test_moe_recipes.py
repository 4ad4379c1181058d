"""Megatron-LM's MoE and pipeline recipe flags: parsed as Megatron-LM writes them,
refused with the fix when they cannot work, handed to megatron-core's TransformerConfig
unchanged, and built into real models of every placement with dense and MoE layers mixed.

The parallel behaviour (EP, ETP, TP+SP, uneven PP, VPP with a layer pattern) is proven in
tests/test_parallel_parity.py; checkpoints of expert bias in tests/test_checkpoint.py.
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from _training import SMALL

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.model_values import parse_moe_layer_freq
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.model import build_gpt_model, transformer_config
from spannorm_megatron.model.memory_floor import model_parts
from spannorm_megatron.model.norms import RMSNorm
from spannorm_megatron.placements import PLACEMENTS
from spannorm_megatron.training.arguments import parse_args

SEQ = 8

# A DeepSeek-V3-like router: sigmoid scores, expert bias, group-limited top-k, scaled
# probabilities, z-loss, a gated shared expert and a capacity limit.
ROUTING = dict(
    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    moe_router_bias_update_rate=1e-2, moe_router_load_balancing_type="seq_aux_loss",
    moe_router_num_groups=2, moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5,
    moe_router_dtype="fp32", moe_z_loss_coeff=1e-3, moe_expert_capacity_factor=1.5,
    moe_pad_expert_input_to_capacity=True, moe_token_drop_policy="position",
    moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True,
)


def recipe(placement="spannorm", **overrides):
    values = dict(norm_placement=placement, num_layers=4, hidden_size=32, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=48, vocab_size=64,
                  max_sequence_length=SEQ, num_experts=4, moe_router_topk=2,
                  moe_ffn_hidden_size=24, moe_layer_freq="([0]*1+[1]*3)", qk_layernorm=True,
                  **ROUTING)
    values.update(overrides)
    return ModelConfig.recommended(**values)


@pytest.mark.parametrize("text,pattern", [
    ("([0]*1+[1]*3)", [0, 1, 1, 1]), ("[0,1,1,1]", [0, 1, 1, 1]), ("[1]*2+[0]*2", [1, 1, 0, 0]),
    ("2", [1, 0, 1, 0]), ("1", [1, 1, 1, 1]),
])
def test_moe_layer_freq_reads_megatron_lm_syntax(text, pattern):
    assert ModelConfig.recommended(num_layers=4, num_experts=4, moe_layer_freq=text).moe_layer_pattern == \
        pattern


@pytest.mark.parametrize("text", ["__import__('os').system('true')", "[0,2]", "0", "[[0]]",
                                  "([0]*-1)", "1.5", "[0]*x"])
def test_moe_layer_freq_refuses_anything_but_a_pattern(text):
    with pytest.raises(ValueError):
        parse_moe_layer_freq(text)


def test_flags_and_yaml_reach_the_model_config(tmp_path):
    config_file = tmp_path / "moe.yaml"
    config_file.write_text("num-experts: 4\nnum-layers: 4\nmoe-layer-freq: [0, 1, 1, 1]\n"
                           "moe-router-score-function: sigmoid\n"
                           "moe-router-enable-expert-bias: true\nqk-layernorm: true\n")
    config = parse_args(["--config", str(config_file), *SMALL, "--num-layers", "4",
                         "--moe-expert-capacity-factor", "1.25",
                         "--moe-router-load-balancing-type", "none"]).model
    assert config.moe_layer_pattern == [0, 1, 1, 1] and config.qk_layernorm
    assert config.moe_router_enable_expert_bias and config.moe_expert_capacity_factor == 1.25
    assert config.resolved_moe_router_bias_update_rate == 1e-3  # Megatron-LM's default


@pytest.mark.parametrize("values,expected", [
    (dict(moe_router_pre_softmax=True), "--moe-router-pre-softmax applies to softmax"),
    (dict(moe_router_score_function="softmax"), "--moe-router-enable-expert-bias needs"),
    (dict(moe_router_enable_expert_bias=False), "no expert bias to update"),
    (dict(moe_router_group_topk=3), "--moe-router-group-topk 3 is larger than"),
    (dict(moe_router_group_topk=None), "set both, or neither"),
    (dict(num_experts=6, moe_router_num_groups=4), "--num-experts 6 is not divisible by"),
    (dict(moe_router_topk=3, moe_router_group_topk=2), "is not divisible by --moe-router-group"),
    (dict(moe_layer_freq=[0, 1]), "lists 2 layers but --num-layers is 4"),
    (dict(moe_layer_freq=[0, 0, 0, 0]), "makes no layer MoE"),
    (dict(moe_expert_capacity_factor=None), "--moe-pad-expert-input-to-capacity needs"),
    (dict(moe_expert_capacity_factor=0.0), "moe_expert_capacity_factor) = 0.0 must be > 0.0"),
    (dict(moe_shared_expert_intermediate_size=None), "--moe-shared-expert-gate gates"),
    (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
          moe_router_bias_update_rate=None, moe_router_topk=1, moe_router_group_topk=None,
          moe_router_num_groups=None), "--moe-router-topk 1 with softmax scoring needs"),
])
def test_bad_moe_recipe_names_the_flag_and_the_fix(values, expected):
    with pytest.raises(ConfigError) as error:
        recipe(**values)
    assert expected in str(error.value)


@pytest.mark.parametrize("parallel,num_layers,expected", [
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1), 4, [[1], [3]]),
    (dict(pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=2,
          decoder_last_pipeline_num_layers=2), 8, [[2], [2], [2], [2]]),
    (dict(pipeline_model_parallel_size=4, decoder_first_pipeline_num_layers=30,
          decoder_last_pipeline_num_layers=30), 128, [[30], [34], [34], [30]]),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
          decoder_last_pipeline_num_layers=2), 6, [[2, 2], [1, 1]]),
    (dict(pipeline_model_parallel_size=4, account_for_embedding_in_pipeline_split=True,
          account_for_loss_in_pipeline_split=True), 126, [[31], [32], [32], [31]]),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Et|(tt|)*2tL"),
     6, [[1, 2], [2, 1]]),
])
def test_stage_split_matches_what_megatron_core_builds(parallel, num_layers, expected):
    """Our up-front arithmetic against megatron-core's own get_num_layers_to_build."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    layout = ParallelConfig(**parallel)
    counts = layout.stage_layer_counts(num_layers)
    assert counts == expected
    tconfig = transformer_config(ModelConfig.recommended(num_layers=num_layers, hidden_size=32,
                                             num_attention_heads=4),
                                 **layout.transformer_kwargs())
    vpp = layout.virtual_pipeline_model_parallel_size
    for rank, row in enumerate(counts):
        for stage, count in enumerate(row):
            if layout.pipeline_model_parallel_layout is not None:
                built = tconfig.pipeline_model_parallel_layout.layout[rank][stage].count(
                    __import__("megatron.core.transformer.enums",
                               fromlist=["LayerType"]).LayerType.decoder)
            else:
                built = get_num_layers_to_build(tconfig, vp_stage=stage if vpp else None,
                                                pp_rank=rank)
            assert built == count, (rank, stage)


@pytest.mark.parametrize("parallel,expected", [
    (dict(decoder_first_pipeline_num_layers=2), "--pipeline-model-parallel-size is 1"),
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=2,
          account_for_loss_in_pipeline_split=True), "cannot be combined"),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|ttL",
          decoder_first_pipeline_num_layers=2), "drop one of them"),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|tt|L"),
     "not a multiple of --pipeline-model-parallel-size 2"),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Etx|ttL"),
     "is not understood"),
])
def test_bad_pipeline_split_is_refused_when_declared(parallel, expected):
    with pytest.raises(ConfigError) as error:
        ParallelConfig(**parallel)
    assert expected in str(error.value)


@pytest.mark.parametrize("parallel,num_layers,expected", [
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=1,
          decoder_last_pipeline_num_layers=2), 4, "must add up to --num-layers"),
    (dict(pipeline_model_parallel_size=3, decoder_first_pipeline_num_layers=2,
          decoder_last_pipeline_num_layers=2), 4, "leaves 0 layers for 1 other stage(s)"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
          decoder_first_pipeline_num_layers=3), 7, "is not divisible by --num-virtual-stages-per-pipeline-rank"),
    (dict(pipeline_model_parallel_size=4, account_for_embedding_in_pipeline_split=True),
     4, "num_layers=4 (+1 for the embedding/loss"),
    (dict(pipeline_model_parallel_size=4, account_for_embedding_in_pipeline_split=True,
          account_for_loss_in_pipeline_split=True), 2, "leaves a stage with no transformer"),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Ett|tL"), 4,
     "places 3 transformer layers (t) and --num-layers is 4"),
    (dict(pipeline_model_parallel_size=2, pipeline_model_parallel_layout="Etttt|L"), 4,
     "a stage holds no transformer layer"),
])
def test_split_that_does_not_add_up_is_refused(parallel, num_layers, expected):
    with pytest.raises(ConfigError) as error:
        ParallelConfig(**parallel).stage_layer_counts(num_layers)
    assert expected in str(error.value)


def test_every_flag_reaches_megatron_core_transformer_config():
    config = recipe()
    tconfig = transformer_config(config)
    for name, value in ROUTING.items():
        if name != "moe_router_bias_update_rate":
            assert getattr(tconfig, name) == value, name
    assert tconfig.moe_router_bias_update_rate == 1e-2
    assert tconfig.moe_layer_freq == [0, 1, 1, 1] and tconfig.qk_layernorm


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_mixed_dense_and_moe_layers_with_qk_norm_build_and_train_in_every_placement(
        seeded, placement):
    config = recipe(placement)
    model = build_gpt_model(config, transformer_config(config))
    layers = model.decoder.layers
    assert [isinstance(layer.mlp, MoELayer) for layer in layers] == [False, True, True, True]
    # The memory check's parameter count is a floor of the real one, and a close one (it leaves
    # out the norms, and the router, whose share is large only in a model this small).
    counted = sum(part.parameters for part in model_parts(config, ParallelConfig()))
    held = sum(parameter.numel() for parameter in model.parameters())
    assert 0.9 * held <= counted <= held, (counted, held)
    for layer in layers:
        attention = layer.self_attention
        assert isinstance(attention.q_layernorm, RMSNorm)
        assert attention.q_layernorm.weight.shape == (config.hidden_size //
                                                      config.num_attention_heads,)
    tokens = torch.randint(0, config.vocab_size, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)

    def logits():
        return model(tokens, positions, None)

    def loss():
        return model(tokens, positions, None, labels=tokens).mean()

    loss().backward()
    before = logits().detach()
    # The q/k norms are on the computation path: their gains get gradients, and changing one
    # changes the output.
    q_norm = layers[1].self_attention.q_layernorm
    assert q_norm.weight.grad is not None and q_norm.weight.grad.abs().sum() > 0
    with torch.no_grad():
        q_norm.weight.mul_(3.0)
        # At init the attention branch is small next to the residual, hence atol 0.
        assert not torch.allclose(logits(), before, rtol=0, atol=0)
    # The routers carry megatron-core's expert bias and counted what they routed in the two
    # forwards with gradients: padded to capacity, every expert takes exactly its capacity,
    # 1.5 x (2 x SEQ tokens x topk 2) / 4 experts = 12.
    for layer in layers[1:]:
        router = layer.mlp.router
        assert router.expert_bias is not None
        assert router.local_tokens_per_expert.tolist() == [2 * 12.0] * 4
