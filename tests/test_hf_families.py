"""The Hugging Face families as state-dict adapters, in memory (no checkpoint files, no torchrun).

For every family and every test model it can hold: each parameter of the real megatron model is
matched by exactly one rule of the family's mapping, export followed by import gives the state
dict back, every exported tensor is read by the import, and the exported names and shapes are
exactly those transformers (or our remote-code class) saves for the config.json the family
writes, which reads back into the same megatron model. tests/test_hf.py covers the same paths
through real files, logits and parallel layouts.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _hf  # noqa: E402

ALL_COMBOS = {**_hf.COMBOS, **_hf.EXTRA_COMBOS}
NATIVE = {"prenorm-dense": "llama", "prenorm-moe": "mixtral", "prenorm-moe-shared": "qwen2_moe",
          "prenorm-moe-qk-mixed": "qwen3_moe", "prenorm-moe-glm": "glm4_moe"}
# Our class holds every model; the native ones hold the prenorm models `--format auto` gives them.
OURS = list(ALL_COMBOS)
PAIRS = [(combo, "spannorm") for combo in OURS] + list(NATIVE.items())


def _groups(config):
    from spannorm_megatron.hf.layout import megatron_groups

    return megatron_groups(config)


def _export(family, config, state):
    hf = {}
    for group in _groups(config):
        out = family.to_hf(config, group, {name: state[name] for name, _shape in group.params})
        assert not set(out) & set(hf), group.name
        hf.update(out)
    return hf


@pytest.mark.parametrize("combo,name", PAIRS)
def test_export_then_import_is_the_identity_on_a_real_model(megatron_world, combo, name):
    from spannorm_megatron.hf.export import choose_family
    from spannorm_megatron.hf.families import FAMILIES
    from spannorm_megatron.hf.family import GAIN, Neutral

    config = _hf.model_config(combo)
    family = FAMILIES[name]
    if family.native:
        assert choose_family(config, "auto")[0] is family
    state = _hf.state_of(_hf.build(config, seed=len(combo)))
    assert sorted(n for g in _groups(config) for n, _shape in g.params) == sorted(state)

    mapping = family.mapping(config)
    rules = {}
    for param in state:
        matches = family.rules_for(config, param, mapping)
        assert len(matches) == 1, (param, [rule.megatron for rule, _bound in matches])
        rules[param] = matches[0]
    hf = _export(family, config, state)
    # no two megatron tensors (nor an HF-only tensor) write the same HF name
    neutral = sum(len(n.hf) for n in mapping if isinstance(n, Neutral)) * config.num_layers
    assert len(hf) == sum(len(rule.hf_names(bound)) for rule, bound in rules.values()) + neutral

    read = set()

    def get(hf_name):
        read.add(hf_name)
        return hf.get(hf_name)

    back = {}
    for group in _groups(config):
        back.update(family.from_hf(config, group, get))
    assert read == set(hf)
    assert set(back) == set(state)
    for param, tensor in state.items():
        if config.apply_layernorm_1p and rules[param][0].transform is GAIN:
            # stored gain - 1 -> gain -> gain - 1 rounds once in float32
            torch.testing.assert_close(back[param], tensor, rtol=0, atol=2e-7)
        else:
            assert torch.equal(back[param], tensor), param


def _saved_by_transformers(family, config_json, directory):
    """{name: shape} of the weights transformers writes for a fresh model of `config_json`."""
    import transformers
    from safetensors import safe_open

    if family.native:
        model = getattr(transformers, family.architecture)(
            transformers.AutoConfig.for_model(**config_json))
    else:
        from spannorm_megatron.hf.remote_code.configuration_spannorm import SpanNormConfig
        from spannorm_megatron.hf.remote_code.modeling_spannorm import SpanNormForCausalLM

        model = SpanNormForCausalLM(SpanNormConfig.from_dict(config_json))
    model.save_pretrained(directory)
    shapes = {}
    for file in sorted(os.listdir(directory)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(directory, file), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


@pytest.mark.parametrize("combo,name", PAIRS)
def test_config_json_builds_the_class_that_saves_the_exported_names(megatron_world, combo, name,
                                                                    tmp_path):
    from spannorm_megatron.hf.families import FAMILIES, model_config_from_hf

    config = _hf.model_config(combo)
    family = FAMILIES[name]
    config_json = json.loads(json.dumps(family.config_json(config, torch.float32)))
    meta = {n: torch.empty(shape, device="meta") for g in _groups(config) for n, shape in g.params}
    exported = {n: tuple(t.shape) for n, t in _export(family, config, meta).items()}
    assert exported == _saved_by_transformers(family, config_json, str(tmp_path))

    read_family, read_config = model_config_from_hf(config_json, "config.json")
    assert read_family is family
    assert [g.params for g in _groups(read_config)] == [g.params for g in _groups(config)]
    if not family.native:  # our config.json carries the exact ModelConfig
        assert read_config.to_dict() == config.to_dict()


@pytest.mark.parametrize("combo", _hf.OWN_CLASS_RECIPES)
def test_our_config_json_alone_reads_back_into_the_same_model(megatron_world, combo):
    """Without megatron_model_config (a folder edited or written by hand), our config.json's own
    fields still give the megatron model the export came from: q/k norms, which layers are
    MoE, every routing setting and the shared-expert gate."""
    from spannorm_megatron.hf.families import FAMILIES, model_config_from_hf

    config = _hf.model_config(combo)
    config_json = json.loads(json.dumps(FAMILIES["spannorm"].config_json(config, torch.float32)))
    del config_json["megatron_model_config"]
    _family, read = model_config_from_hf(config_json, "config.json")
    assert [g.params for g in _groups(read)] == [g.params for g in _groups(config)]
    routing = ("qk_layernorm", "moe_layer_pattern", "moe_router_topk", "moe_router_score_function",
               "moe_router_pre_softmax", "moe_router_num_groups", "moe_router_group_topk",
               "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
               "moe_router_dtype", "moe_shared_expert_gate", "norm_placement")
    assert {k: getattr(read, k) for k in routing} == {k: getattr(config, k) for k in routing}


def test_qwen2_moe_neutral_tensors_must_be_zero(megatron_world):
    """Qwen2-MoE's shared-expert gate and q/k/v biases have no megatron counterpart: exported as
    zero, refused on import unless zero; the biases may be left out, the gate may not."""
    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.families import FAMILIES

    config = _hf.model_config("prenorm-moe-shared")
    family = FAMILIES["qwen2_moe"]
    state = _hf.state_of(_hf.build(config))
    hf = _export(family, config, state)
    layer = _groups(config)[1]
    gate = "model.layers.0.mlp.shared_expert_gate.weight"
    assert not hf[gate].any() and not hf["model.layers.0.self_attn.k_proj.bias"].any()

    no_bias = {k: v for k, v in hf.items() if not k.endswith("_proj.bias")}
    back = family.from_hf(config, layer, no_bias.get)
    assert all(torch.equal(t, state[n]) for n, t in back.items())
    with pytest.raises(ConversionError, match="lack.*shared_expert_gate"):
        family.from_hf(config, layer, {k: v for k, v in hf.items() if k != gate}.get)
    for name in (gate, "model.layers.0.self_attn.q_proj.bias"):
        changed = dict(hf, **{name: hf[name] + 0.5})
        with pytest.raises(ConversionError, match=f"{name} is not zero"):
            family.from_hf(config, layer, changed.get)


@pytest.mark.parametrize("combo,name", [*NATIVE.items(), ("spannorm-dense", "spannorm")])
def test_megatron_tensors_outside_the_mapping_are_refused(megatron_world, combo, name):
    from dataclasses import replace

    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.families import FAMILIES

    config = _hf.model_config(combo)
    family = FAMILIES[name]
    layer = _groups(config)[1]
    tensors = {n: torch.zeros(shape) for n, shape in layer.params}
    stray = {"decoder.layers.0.mlp.linear_fc3.weight": torch.zeros(4, 4)}
    widened = replace(layer, params=layer.params + ((*stray, (4, 4)),))
    with pytest.raises(ConversionError, match="linear_fc3.*has no place"):
        family.to_hf(config, widened, {**tensors, **stray})
    with pytest.raises(ConversionError, match=r"\['decoder.layers.0.mlp.linear_fc3.weight'\] have no"):
        family.to_hf(config, layer, {**tensors, **stray})


def test_router_settings_are_stated_once_and_agree_with_the_remote_configuration():
    """Our class's routing keys: one table (ROUTER_DEFAULTS) that the export writes and the import
    reads, whose dense values are the standalone remote configuration's defaults."""
    import inspect

    from spannorm_megatron.config.model import ModelConfig
    from spannorm_megatron.hf.remote_code.configuration_spannorm import SpanNormConfig
    from spannorm_megatron.hf.spannorm_family import ROUTER_DEFAULTS, SpanNorm

    remote = inspect.signature(SpanNormConfig.__init__).parameters
    assert {key: remote[key].default for key in ROUTER_DEFAULTS} == ROUTER_DEFAULTS
    moe = ModelConfig.recommended(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, num_experts=8,
        moe_router_topk=2, moe_router_score_function="sigmoid", moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
        moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none",
        moe_router_dtype="fp32")
    written = SpanNorm().config_fields(moe)
    assert {key: written[key] for key in ROUTER_DEFAULTS} == {
        key: getattr(moe, key) for key in ROUTER_DEFAULTS}
    dense = SpanNorm().config_fields(ModelConfig.recommended(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128))
    assert {key: dense[key] for key in ROUTER_DEFAULTS} == ROUTER_DEFAULTS
    values, problems = {}, []
    SpanNorm().read_fields({**written, "num_experts_per_tok": 2}, values, problems)
    assert {key: values[key] for key in ROUTER_DEFAULTS} == {
        key: getattr(moe, key) for key in ROUTER_DEFAULTS} and problems == []
