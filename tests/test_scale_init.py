"""Scale Init: output-projection stds as the contract says, and what they do to gradients."""

import math

import pytest
import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.model import build_gpt_model, transformer_config

SIGMA = 0.05


def output_projections(model) -> dict:
    """Every residual-branch output projection, grouped by kind."""
    groups = {"attention": [], "mlp": [], "expert": [], "shared_expert": []}
    for name, param in model.named_parameters():
        if name.endswith("self_attention.linear_proj.weight"):
            groups["attention"].append(param)
        elif ".experts.local_experts." in name and name.endswith("linear_fc2.weight"):
            groups["expert"].append(param)
        elif ".shared_experts." in name and name.endswith("linear_fc2.weight"):
            groups["shared_expert"].append(param)
        elif name.endswith("mlp.linear_fc2.weight"):
            groups["mlp"].append(param)
    return {k: v for k, v in groups.items() if v}


@pytest.mark.parametrize(
    "placement,scale_init,scale_mode,expected_factor,expected_branch_scale",
    [
        ("spannorm", None, "init", lambda L: 1 / math.sqrt(L), 1.0),       # contract default
        ("spannorm", "megatron", "init", lambda L: 1 / math.sqrt(2 * L), 1.0),
        ("spannorm", "none", "init", lambda L: 1.0, 1.0),
        ("spannorm", 0.25, "init", lambda L: 0.25, 1.0),
        ("spannorm", None, "forward", lambda L: 1.0, "sqrt_depth"),
        ("prenorm", None, "init", lambda L: 1 / math.sqrt(2 * L), 1.0),    # megatron default kept
        ("prenorm", "sqrt_depth", "init", lambda L: 1 / math.sqrt(L), 1.0),
        ("postnorm", None, "init", lambda L: 1 / math.sqrt(2 * L), 1.0),
        ("postnorm", "none", "forward", lambda L: 1.0, 1.0),
    ],
)
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_output_projection_std(seeded, placement, scale_init, scale_mode, expected_factor,
                               expected_branch_scale, moe):
    num_layers = 6
    config = ModelConfig.recommended(
        norm_placement=placement, num_layers=num_layers, hidden_size=128, num_attention_heads=4,
        ffn_hidden_size=256, vocab_size=32, max_sequence_length=8, init_method_std=SIGMA,
        scale_init=scale_init, scale_mode=scale_mode,
        num_experts=4 if moe else None, moe_ffn_hidden_size=128,
        moe_shared_expert_intermediate_size=128 if moe else None,
    )
    model = build_gpt_model(config, transformer_config(config))
    expected_std = SIGMA * expected_factor(num_layers)
    kinds = output_projections(model)
    assert set(kinds) == ({"attention", "expert", "shared_expert"} if moe else {"attention", "mlp"})
    for kind, weights in kinds.items():
        values = torch.cat([w.detach().flatten() for w in weights])
        # The std of n normal draws has relative standard error 1/sqrt(2n); allow 5 of them.
        tolerance = 5 / math.sqrt(2 * values.numel())
        assert values.std().item() == pytest.approx(expected_std, rel=tolerance), kind

    # Other weight matrices keep the base sigma.
    qkv = torch.cat([l.self_attention.linear_qkv.weight.detach().flatten()
                     for l in model.decoder.layers])
    assert qkv.std().item() == pytest.approx(SIGMA, rel=5 / math.sqrt(2 * qkv.numel()))

    if expected_branch_scale == "sqrt_depth":
        expected_branch_scale = 1 / math.sqrt(num_layers)
    for layer in model.decoder.layers:
        assert getattr(layer, "branch_scale", 1.0) == pytest.approx(expected_branch_scale)


def gradient_norms_at_layer_inputs(config: ModelConfig) -> list:
    """Norm of dLoss/d(input of layer i), for every layer, after one LM-loss backward."""
    model = build_gpt_model(config, transformer_config(config))
    norms = [None] * config.num_layers

    def capture(index):
        def pre_hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            hidden.register_hook(lambda g: norms.__setitem__(index, g.norm().item()))
        return pre_hook

    for i, layer in enumerate(model.decoder.layers):
        layer.register_forward_pre_hook(capture(i), with_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 32), generator=generator)
    positions = torch.arange(32).expand(4, 32)
    loss = model(tokens, positions, attention_mask=None, labels=tokens)
    loss.mean().backward()
    return norms


@pytest.mark.parametrize("scale_init,bounded", [("sqrt_depth", True), ("none", False)])
def test_spannorm_gradient_reaching_layer_2(seeded, scale_init, bounded):
    """64 layers, hidden 64, sigma = 1/sqrt(hidden): with Scale Init the gradient reaching layer 2
    stays within 10x of the last layer's; without it, it does not (by orders of magnitude)."""
    hidden = 64
    config = ModelConfig.recommended(
        norm_placement="spannorm", num_layers=64, hidden_size=hidden, num_attention_heads=4,
        ffn_hidden_size=4 * hidden, vocab_size=128, max_sequence_length=32,
        init_method_std=1 / math.sqrt(hidden), scale_init=scale_init,
    )
    norms = gradient_norms_at_layer_inputs(config)
    ratio = norms[1] / norms[-1]
    spread = max(ratio, 1 / ratio)
    print(f"scale_init={scale_init}: |grad in layer 2| / |grad in layer 64| = {ratio:.3g}")
    if bounded:
        assert spread < 10
    else:
        assert spread > 1e3


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_deepnorm_init_divides_v_proj_fc1_fc2_by_beta(seeded, moe):
    num_layers, heads, groups, hidden = 6, 4, 2, 128
    config = ModelConfig.recommended(
        norm_placement="deepnorm", num_layers=num_layers, hidden_size=hidden,
        num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=256, vocab_size=32,
        max_sequence_length=8, init_method_std=SIGMA, num_experts=4 if moe else None,
        moe_ffn_hidden_size=128,
    )
    model = build_gpt_model(config, transformer_config(config))
    beta = (8 * num_layers) ** 0.25
    head_dim, per_group = hidden // heads, heads // groups + 2
    rows = {"q": [], "k": [], "v": [], "proj": [], "fc": []}
    for layer in model.decoder.layers:
        assert layer.residual_scale == pytest.approx((2 * num_layers) ** 0.25)
        qkv = layer.self_attention.linear_qkv.weight.detach().view(groups, per_group, head_dim, -1)
        rows["q"].append(qkv[:, :-2].flatten())
        rows["k"].append(qkv[:, -2].flatten())
        rows["v"].append(qkv[:, -1].flatten())
        rows["proj"].append(layer.self_attention.linear_proj.weight.detach().flatten())
        rows["fc"] += [p.detach().flatten() for n, p in layer.mlp.named_parameters()
                       if "linear_fc" in n]
    for kind, expected in (("q", SIGMA), ("k", SIGMA), ("v", SIGMA / beta),
                           ("proj", SIGMA / beta), ("fc", SIGMA / beta)):
        values = torch.cat(rows[kind])
        assert values.std().item() == pytest.approx(
            expected, rel=5 / math.sqrt(2 * values.numel())), kind


def test_spannorm_clean_initializes_n2_gain_to_inverse_sqrt_depth(seeded):
    config = ModelConfig.recommended(norm_placement="spannorm_clean", num_layers=9, hidden_size=32,
                         num_attention_heads=4, vocab_size=32, max_sequence_length=8)
    model = build_gpt_model(config, transformer_config(config))
    for layer in model.decoder.layers:
        assert torch.all(layer.post_mlp_norm.weight == 1 / 3)
        assert torch.all(layer.post_attention_norm.weight == 1)


def test_the_scale_init_help_comes_from_the_registry():
    """One list of names: the flag's values, each placement's default and the help agree."""
    from spannorm_megatron.config.model_values import parse_scale_init
    from spannorm_megatron.placements import PLACEMENTS, SCALE_INIT_RULES
    from spannorm_megatron.training.arguments import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "scale_init"]
    for name, rule in SCALE_INIT_RULES.items():
        assert f"{name} {rule.std}" in action.help
        assert parse_scale_init(name) == name
    for name, placement in PLACEMENTS.items():
        assert placement.default_scale_init in SCALE_INIT_RULES
        listed = action.help.split(f"{placement.default_scale_init} for ", 1)[1].split(";")[0]
        assert name in listed.rstrip(").").split(", "), name
    assert "none for deepnorm" in action.help  # DeepNorm's own default, not megatron's
