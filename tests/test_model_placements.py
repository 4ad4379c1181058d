"""Each placement's megatron-core layer and model compute the contract's equations.

Compared against tests/reference.py, an independent plain-PyTorch computation, with the same
weights: forward outputs, gradients of the layer input and gradients of every parameter, fp32.
"""

import pytest
import torch
from megatron.core.transformer.spec_utils import build_module

import reference
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.model import build_gpt_model, layer_spec, transformer_config
from spannorm_megatron.placements import PLACEMENTS

SEQ, BATCH = 6, 3
TOL = dict(rtol=1e-5, atol=1e-5)


def small_config(placement, moe=False, normalization="RMSNorm", **overrides):
    values = dict(
        norm_placement=placement, num_layers=4, hidden_size=32, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=48, normalization=normalization, vocab_size=50,
        max_sequence_length=SEQ,
    )
    if moe:
        # Aux loss off: its gradient is megatron-core's router business, not the placement's.
        values.update(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24,
                      moe_shared_expert_intermediate_size=16, moe_aux_loss_coeff=0.0)
    values.update(overrides)
    return ModelConfig.recommended(**values)


def shapes_of(config: ModelConfig) -> reference.Shapes:
    return reference.Shapes(
        hidden=config.hidden_size, heads=config.num_attention_heads,
        groups=config.resolved_num_query_groups, normalization=config.normalization,
        eps=config.norm_epsilon, swiglu=config.swiglu, topk=config.moe_router_topk,
    )


def randomize_norms(module: torch.nn.Module) -> None:
    """Gains of 1 and biases of 0 would hide a norm applied in the wrong place."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("weight") else 0.0))


def reference_params(module: torch.nn.Module) -> dict:
    return {n: p.detach().clone().requires_grad_(True) for n, p in module.named_parameters()}


def assert_grads_match(module: torch.nn.Module, ref_params: dict) -> None:
    for name, param in module.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:  # e.g. an expert no token was routed to
            assert param.grad is None or torch.count_nonzero(param.grad) == 0, name
            continue
        # Relative to the tensor's norm: a norm of a small branch output (Peri-LN) amplifies
        # fp32 rounding in single elements without changing the gradient.
        error = ((param.grad - ref_grad).norm() / ref_grad.norm().clamp(min=1e-12)).item()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_layer_matches_contract(seeded, placement, normalization, moe):
    config = small_config(placement, moe=moe, normalization=normalization)
    tconfig = transformer_config(config)
    shapes = shapes_of(config)
    angles = reference.rope_frequencies(SEQ, shapes.head_dim)
    for layer_number in (1, 2):  # SpanNorm's first layer owns N0, the others do not
        layer = build_module(layer_spec(config, transformer_engine=False), config=tconfig,
                             layer_number=layer_number)
        randomize_norms(layer)
        params = reference_params(layer)

        x = torch.randn(SEQ, BATCH, config.hidden_size, requires_grad=True)
        out, _ = layer(x, attention_mask=None, rotary_pos_emb=angles[:, None, None, :])
        x_ref = x.detach().clone().requires_grad_(True)
        ref = reference.layer(placement, x_ref, params, shapes, angles,
                              num_experts=config.num_experts, first_layer=layer_number == 1,
                              num_layers=config.num_layers)
        torch.testing.assert_close(out, ref, **TOL)

        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        ref.backward(grad_out)
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
        assert_grads_match(layer, params)


@pytest.mark.parametrize(
    "placement,overrides,has_final_norm",
    [
        ("prenorm", {}, True),
        ("postnorm", {}, False),
        ("spannorm", {}, False),
        ("spannorm", {"final_norm": True}, True),
        ("spannorm", {"first_layer_input_norm": False}, False),
        ("deepnorm", {}, False),
        ("perinorm", {}, True),
        ("spannorm_clean", {}, True),
    ],
)
def test_model_matches_contract(seeded, placement, overrides, has_final_norm):
    """The whole GPTModel: embedding, layers (SpanNorm's N0 in layer 1 only), final-norm rule,
    output layer."""
    config = small_config(placement, num_layers=3, **overrides)
    model = build_gpt_model(config, transformer_config(config))
    assert (model.decoder.final_layernorm is not None) == has_final_norm
    n0_layers = [i for i, l in enumerate(model.decoder.layers)
                 if any("embedding_norm" in n for n, _ in l.named_parameters())]
    expect_n0 = placement == "spannorm" and config.first_layer_input_norm
    assert n0_layers == ([0] if expect_n0 else [])

    randomize_norms(model)
    params = reference_params(model)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(tokens, positions, attention_mask=None)  # [b, s, vocab]

    shapes = shapes_of(config)
    angles = reference.rope_frequencies(SEQ, shapes.head_dim)
    x = params["embedding.word_embeddings.weight"][tokens].transpose(0, 1)
    for i in range(config.num_layers):
        prefix = f"decoder.layers.{i}."
        layer_params = {n[len(prefix):]: p for n, p in params.items() if n.startswith(prefix)}
        x = reference.layer(placement, x, layer_params, shapes, angles,
                            first_layer=(i == 0 and config.first_layer_input_norm),
                            num_layers=config.num_layers)
    if has_final_norm:
        x = reference.norm(x, params, "decoder.final_layernorm", shapes)
    ref_logits = (x @ params["output_layer.weight"].T).transpose(0, 1)
    torch.testing.assert_close(logits, ref_logits, **TOL)

    logits.square().mean().backward()
    ref_logits.square().mean().backward()
    assert_grads_match(model, params)
