"""The placement registry is the one source of what a placement is: adding one is one
`register(Placement(...))`, an incomplete entry is refused, and the remote-code copy that HF
folders carry agrees with it."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from spannorm_megatron import placements
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.hf.rules import REMOTE_CODE_PLACEMENTS
from spannorm_megatron.placements import MEGATRON_LAYER, PLACEMENTS, Placement, register


def test_the_registry_imports_without_torch():
    code = ("import sys, spannorm_megatron.placements, spannorm_megatron.config.model;"
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('torch', 'megatron')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("change,missing", [
    (dict(layer=""), "lacks layer"),
    (dict(norms={}), "lacks norms"),
    (dict(layer="SpanNormLayer"), "is not 'module:Class'"),
    (dict(norms={"input_layernorm": "kqv"}), "are not among"),
    (dict(first_layer_norms=("embedding_norm",)), "are not all slots"),
    (dict(native_norms={"input_layernorm": "input_layernorm"}), "native_norms names"),
    (dict(default_scale_init="sqrt"), "default_scale_init='sqrt'"),
])
def test_a_placement_with_missing_pieces_is_refused(change, missing):
    with pytest.raises(ConfigError, match=missing):
        dataclasses.replace(PLACEMENTS["prenorm"], name="broken", **change)


def test_a_name_is_registered_once():
    with pytest.raises(ConfigError, match="registered already"):
        register(PLACEMENTS["prenorm"])


@pytest.fixture
def toy():
    """A placement added through the public API only: pre-norm under another name."""
    register(Placement(
        name="toy_prenorm", equations="h = x + A(N1(x)); x' = h + F(N2(h))",
        layer=MEGATRON_LAYER, norms={"input_layernorm": "qkv", "pre_mlp_layernorm": "fc1"},
        final_norm=True,
        native_norms={"input_layernorm": "input_layernorm",
                      "pre_mlp_layernorm": "post_attention_layernorm"}))
    yield "toy_prenorm"
    placements.unregister("toy_prenorm")


def test_a_toy_placement_is_one_entry_config_model_and_export(toy, seeded):
    from spannorm_megatron.hf.export import choose_family
    from spannorm_megatron.model import build_gpt_model, transformer_config
    from spannorm_megatron.training.arguments import parse_args

    from _training import SMALL

    assert parse_args([*SMALL, "--norm-placement", toy]).model.norm_placement == toy
    shapes = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64,
                  max_sequence_length=16, transformer_impl="local")
    tokens = torch.randint(0, 64, (2, 8))
    positions = torch.arange(8).expand(2, 8)
    logits = {}
    for name in (toy, "prenorm"):
        config = ModelConfig.recommended(norm_placement=name, **shapes)
        torch.manual_seed(7)
        from megatron.core import tensor_parallel
        tensor_parallel.model_parallel_cuda_manual_seed(7)
        model = build_gpt_model(config, transformer_config(config)).eval()
        with torch.no_grad():
            logits[name] = model(tokens, positions, None)
    torch.testing.assert_close(logits[toy], logits["prenorm"], rtol=0, atol=0)
    family, _ = choose_family(ModelConfig.recommended(norm_placement=toy, **shapes), "auto")
    assert family.name == "llama"


def test_the_remote_code_copy_agrees_with_the_registry():
    from spannorm_megatron.hf.remote_code import configuration_spannorm, modeling_spannorm

    assert set(modeling_spannorm.LAYER_EQUATIONS) == set(REMOTE_CODE_PLACEMENTS)
    assert set(configuration_spannorm.PLACEMENT_NORMS) == set(REMOTE_CODE_PLACEMENTS)
    for name in REMOTE_CODE_PLACEMENTS:
        placement = PLACEMENTS[name]
        every, first, final = configuration_spannorm.PLACEMENT_NORMS[name]
        assert (set(every), set(first), final) == (
            set(placement.layer_norms), set(placement.first_layer_norms), placement.final_norm)
        for layers in (8, 128):
            hf = configuration_spannorm.SpanNormConfig(norm_placement=name,
                                                       num_hidden_layers=layers)
            assert hf.residual_scale == pytest.approx(placement.residual_scale(layers), rel=1e-12)
