"""Hugging Face conversion: megatron checkpoints -> HF folders -> megatron checkpoints.

Real models, real files. Every placement, dense and MoE, is saved as a checkpoint (single
process, and by one 2-rank torchrun under TP2, PP2 and EP2), exported, loaded by transformers and
compared with the megatron model's logits; exported folders are converted back (also under TP2
and PP2 in the same torchrun launch) and compared tensor by tensor. The prenorm exports load into
the native Llama / Mixtral / Qwen2-MoE / Qwen3-MoE / GLM-4-MoE classes without remote code and
generate the megatron model's greedy tokens; our own class computes q/k norms, mixed dense/MoE
layers and megatron-core's routing (sigmoid, trained expert bias, groups, scaling, pre-softmax,
gated shared expert) in every placement, generates the megatron model's greedy tokens too, and
each of those features is checked to be on the path (turning it off in the HF model moves the
logits). A SpanNorm export loads in a fresh virtual environment holding only torch,
transformers, safetensors and sentencepiece. Bad input fails with a clear error and
leaves nothing behind. See tests/_hf.py for the models.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest
import torch

import _hf
import launch
from _tools import tool_module
from _training import STRICT_DEVICES
from launch import ROOT

# Remote-code modules transformers copies out of exported folders go to a temp dir, not ~/.cache.
os.environ.setdefault("HF_MODULES_CACHE",
                      os.path.join(tempfile.gettempdir(), "spannorm-hf-test-modules"))

ALL_COMBOS = {**_hf.COMBOS, **_hf.EXTRA_COMBOS}
NATIVE = {"prenorm-dense": "LlamaForCausalLM", "prenorm-moe": "MixtralForCausalLM",
          "prenorm-moe-shared": "Qwen2MoeForCausalLM",
          "prenorm-moe-qk-mixed": "Qwen3MoeForCausalLM",
          "prenorm-moe-glm": "Glm4MoeForCausalLM"}
TOLERANCE = 1e-4


def _seed(seed: int) -> None:
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _quiet_export(*args, **kwargs):
    from spannorm_megatron.hf.export import export_checkpoint

    return export_checkpoint(*args, log=lambda line: None, **kwargs)


def _hf_model(path: str, native: bool):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=not native, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                              "mismatched_keys")}
    assert not problems, f"{path}: {problems}"
    return model.eval()


@torch.no_grad()
def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _run_worker(root: str) -> None:
    result = launch.torchrun(launch.TESTS / "_hf_worker.py", root, timeout=900,
                             env=STRICT_DEVICES)
    launch.check_launch(result, os.path.join(root, "out"))


@pytest.fixture(scope="module")
def work(tmp_path_factory, megatron_world, torchrun):
    """Reference models of every combo, their single-process checkpoints and exports, and the
    checkpoints / imports the 2-rank worker wrote."""
    root = str(tmp_path_factory.mktemp("hf"))
    dirs = _hf.worker_dirs(root)
    ids = _hf.tokens()
    models, logits, states, exports = {}, {}, {}, {}
    for i, combo in enumerate(ALL_COMBOS):
        config = _hf.model_config(combo)
        _seed(100 + i)
        model = _hf.build(config, seed=i)
        models[combo] = model
        logits[combo] = _hf.megatron_logits(model, ids)
        states[combo] = _hf.state_of(model)
        _hf.save([model], config, os.path.join(dirs["ref"], combo))
        exports[combo] = _quiet_export(os.path.join(dirs["ref"], combo),
                                       os.path.join(dirs["hf"], combo))
    _run_worker(root)
    return SimpleNamespace(root=root, dirs=dirs, ids=ids, models=models, logits=logits,
                           states=states, exports=exports)


# ----------------------------------------------------------------------------- layout checks
def test_rope_layout_is_half_split_in_megatron_llama_and_ours(megatron_world):
    """megatron-core's RoPE (rotary_interleaved=False) rotates like HF Llama's rotate_half and like
    our modeling file; checked numerically on random queries."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

    from spannorm_megatron.hf.remote_code import modeling_spannorm as ours

    seq, heads, dim, base = 12, 3, 16, 10000
    q = torch.randn(seq, 1, heads, dim, generator=torch.Generator().manual_seed(0))
    freqs = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=base,
                            use_cpu_initialization=True)(seq)
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               use_cpu_initialization=True)
    megatron = apply_rotary_pos_emb(q, freqs, config=config)  # [s, b, h, d]

    positions = torch.arange(seq)[None]
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads,
                                               rope_parameters={"rope_type": "default",
                                                                "rope_theta": base}))
    cos, sin = hf_rope(q, positions)
    q_bhsd = q.permute(1, 2, 0, 3)
    llama, _ = hf_apply(q_bhsd, q_bhsd, cos, sin)
    cos2, sin2 = ours._rope(positions, dim, base, torch.float32)
    mine = q_bhsd * cos2 + ours._rotate_half(q_bhsd) * sin2
    assert _max_err(llama.permute(2, 0, 1, 3), megatron) < 1e-5
    assert _max_err(mine.permute(2, 0, 1, 3), megatron) < 1e-5
    # the interleaved layout is a different function: the check can tell them apart
    interleaved = torch.stack([-q[..., 1::2], q[..., ::2]], dim=-1).reshape(q.shape)
    assert _max_err(q * freqs.cos() + interleaved * freqs.sin(), megatron) > 1e-2


def test_qkv_and_swiglu_layouts_match_the_reference():
    from spannorm_megatron.hf.tensors import merge_swiglu, pack_qkv, split_swiglu, unpack_qkv

    heads, groups, d, hidden = 8, 2, 4, 16
    qkv = torch.randn((heads + 2 * groups) * d, hidden)
    q, k, v = unpack_qkv(qkv, heads, groups, d)
    # tests/reference.py reads the packing as [q_1..q_P, k, v] per group
    grouped = qkv.view(groups, heads // groups + 2, d, hidden)
    assert torch.equal(q.view(groups, heads // groups, d, hidden), grouped[:, :-2])
    assert torch.equal(k.view(groups, d, hidden), grouped[:, -2])
    assert torch.equal(v.view(groups, d, hidden), grouped[:, -1])
    assert torch.equal(pack_qkv(q, k, v, heads, groups, d), qkv)
    fc1 = torch.randn(10, hidden)
    gate, up = split_swiglu(fc1)
    assert torch.equal(gate, fc1[:5]) and torch.equal(up, fc1[5:])
    assert torch.equal(merge_swiglu(gate, up), fc1)


def test_layout_names_shapes_and_checkpoint_keys_match_the_model(work):
    """The conversion's own list of megatron tensors is exactly the model's state dict."""
    from spannorm_megatron.hf.layout import CheckpointLayout

    for combo, model in work.models.items():
        planned = dict(CheckpointLayout(_hf.model_config(combo)).all_params())
        actual = {k: tuple(v.shape) for k, v in work.states[combo].items()}
        assert planned == actual, combo


def test_every_registered_placement_with_a_rule_is_consistent():
    from spannorm_megatron.hf.rules import REMOTE_CODE_PLACEMENTS, export_rule
    from spannorm_megatron.placements import PLACEMENTS

    for name in REMOTE_CODE_PLACEMENTS:
        assert name in PLACEMENTS
        export_rule(PLACEMENTS[name])


# ------------------------------------------------------------------------------ export parity
@pytest.mark.parametrize("combo", list(ALL_COMBOS))
def test_export_logits_match_megatron(work, combo):
    result = work.exports[combo]
    native = combo in NATIVE
    assert result.architecture == (NATIVE[combo] if native else "SpanNormForCausalLM")
    model = _hf_model(os.path.join(work.dirs["hf"], combo), native=native)
    assert type(model).__name__ == result.architecture
    assert _max_err(_hf_logits(model, work.ids), work.logits[combo]) <= TOLERANCE


@pytest.mark.parametrize("layout", list(_hf.LAYOUTS))
def test_checkpoints_saved_by_two_ranks_export_identically(work, layout, tmp_path):
    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    for combo in _hf.PARALLEL_COMBOS:
        if not _hf.layout_applies(layout, combo):
            continue
        ckpt = os.path.join(work.dirs["out"], layout, combo)
        with open(os.path.join(ckpt, "iter_0000001", "run.json")) as f:
            saved_layout = json.load(f)["layout"]
        assert saved_layout["world_size"] == 2
        config, state = load_megatron_state(ckpt)
        assert set(state) == set(work.states[combo])
        for name, tensor in state.items():
            assert torch.equal(tensor, work.states[combo][name]), (layout, combo, name)
        out = str(tmp_path / f"{layout}-{combo}")
        result = _quiet_export(ckpt, out)
        model = _hf_model(out, native=combo in NATIVE)
        err = _max_err(_hf_logits(model, work.ids), work.logits[combo])
        assert err <= TOLERANCE, (layout, combo, err)
        assert result.architecture == NATIVE.get(combo, "SpanNormForCausalLM")


def test_reader_agrees_with_megatron_cores_own_load(work):
    """Our slice reader and megatron-core's dist_checkpointing.load give the same TP1 weights
    for a checkpoint written by two ranks under TP2 (and under PP2)."""
    from megatron.core import dist_checkpointing

    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    for layout in ("tp2", "pp2"):
        combo = "spannorm-moe"
        path = os.path.join(work.dirs["out"], layout, combo, "iter_0000001")
        _seed(0)
        fresh = _hf.build(_hf.model_config(combo))
        loaded = dist_checkpointing.load({"model": fresh.sharded_state_dict()}, path)
        fresh.load_state_dict(loaded["model"])
        _config, state = load_megatron_state(path)
        for name, tensor in _hf.state_of(fresh).items():
            assert torch.equal(state[name], tensor), (layout, name)


# ------------------------------------------------------------------------------ round trips
def _assert_same_state(state, reference, exact=True):
    assert set(state) == set(reference)
    for name, tensor in state.items():
        if exact:
            assert torch.equal(tensor, reference[name]), name
        else:  # apply_layernorm_1p: (g - 1) + 1 - 1 rounds once in float32
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=2e-7)


@pytest.mark.parametrize("combo", list(ALL_COMBOS))
def test_round_trip_megatron_hf_megatron_is_identical(work, combo, tmp_path):
    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    out = str(tmp_path / "back")
    convert_hf_to_megatron(os.path.join(work.dirs["hf"], combo), out, log=lambda line: None)
    config, state = load_megatron_state(out)
    original = _hf.model_config(combo)
    assert config.norm_placement == original.norm_placement
    exact = not original.apply_layernorm_1p
    _assert_same_state(state, work.states[combo], exact=exact)


def test_round_trip_through_two_rank_imports_is_identical(work):
    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    for layout, combos in _hf.IMPORT_LAYOUTS.items():
        for combo in combos:
            path = os.path.join(work.dirs["out"], f"import-{layout}", combo)
            with open(os.path.join(path, "iter_0000000", "run.json")) as f:
                record = json.load(f)
            assert record["layout"]["world_size"] == 2
            assert record["contents"] == {"optimizer": False, "opt_param_scheduler": False,
                                          "rng": False}
            _config, state = load_megatron_state(path)
            _assert_same_state(state, work.states[combo])


def test_imported_checkpoint_loads_into_training_setup(work, tmp_path):
    """The checkpoint package loads an imported checkpoint into a model with an optimizer
    (fine-tune start), as training would."""
    from megatron.core.optimizer import OptimizerConfig

    from spannorm_megatron.checkpoint import load_checkpoint
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.training.setup import setup_model_and_optimizer

    combo = "spannorm-moe"
    config = _hf.model_config(combo)
    chunks, optimizer = setup_model_and_optimizer(config, ParallelConfig(),
                                                  OptimizerConfig(optimizer="adam", lr=1e-3))
    info = load_checkpoint(os.path.join(work.dirs["out"], "import-tp2", combo), chunks, optimizer,
                           None, model_config=config, parallel_config=ParallelConfig(),
                           finetune=True)
    assert info["iteration"] == 0
    state = {k: v for k, v in chunks[0].module.state_dict().items() if "_extra_state" not in k}
    _assert_same_state(state, work.states[combo])


# -------------------------------------------------------------------------------- generation
def _greedy_matches_megatron(model, work, combo):
    from spannorm_megatron.hf import generation

    prompt = work.ids[0, :6].tolist()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    hf_tokens = out[0, len(prompt):].tolist()
    megatron_tokens = generation.generate(
        generation.megatron_stepper(work.models[combo]), prompt, 20,
        generation.Sampling(greedy=True))
    assert len(hf_tokens) == 20
    assert hf_tokens == megatron_tokens


@pytest.mark.parametrize("combo", list(NATIVE))
def test_native_export_generates_megatrons_greedy_tokens(work, combo):
    from transformers import AutoModelForCausalLM

    path = os.path.join(work.dirs["hf"], combo)
    with open(os.path.join(path, "config.json")) as f:
        assert "auto_map" not in json.load(f)
    assert not [n for n in os.listdir(path) if n.endswith(".py")]
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # no trust_remote_code
    _greedy_matches_megatron(model, work, combo)


@pytest.mark.parametrize("combo", _hf.OWN_CLASS_RECIPES)
def test_own_class_with_moe_recipes_generates_megatrons_greedy_tokens(work, combo):
    """q/k norms, mixed layers and megatron-core's routing, through the KV cache: each new
    token is routed alone, as megatron (recomputing the whole sequence) routes it."""
    model = _hf_model(os.path.join(work.dirs["hf"], combo), native=False)
    _greedy_matches_megatron(model, work, combo)


def _moe_modules(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


def _no_qk_norms(model):
    for layer in model.model.layers:
        assert layer.self_attn.q_norm is not None
        layer.self_attn.q_norm = layer.self_attn.k_norm = None


def _unbiased(model):
    for moe in _moe_modules(model):
        assert moe.expert_bias.abs().max() > 0  # megatron's balancing moved it
        moe.expert_bias.zero_()


def _set_all(name, value):
    def change(model):
        for moe in _moe_modules(model):
            assert getattr(moe, name) not in (None, False)
            setattr(moe, name, value)
    return change


FEATURES = {
    "q/k norms": _no_qk_norms,
    "expert bias": _unbiased,
    "shared-expert gate": _set_all("shared_expert_gate", None),
    "group limit": _set_all("group_topk", None),
    "scaling factor": _set_all("scaling_factor", None),
    "pre-softmax": _set_all("pre_softmax", False),
}


@pytest.mark.parametrize("combo,feature", [
    ("spannorm-moe-deepseek", "q/k norms"), ("spannorm-moe-deepseek", "expert bias"),
    ("spannorm-moe-deepseek", "shared-expert gate"), ("spannorm-moe-deepseek", "group limit"),
    ("spannorm-moe-deepseek", "scaling factor"), ("postnorm-moe-deepseek", "expert bias"),
    ("postnorm-moe-deepseek", "group limit"), ("postnorm-moe-qk-layernorm", "q/k norms"),
    ("perinorm-moe-mixed-qk", "q/k norms"), ("deepnorm-moe-sigmoid-top1", "expert bias"),
    ("spannorm_clean-moe-presoftmax-groups", "pre-softmax"),
    ("spannorm_clean-moe-presoftmax-groups", "group limit"),
    ("perinorm-moe-softmax-groups", "group limit"),
    ("prenorm-moe-gated-shared", "shared-expert gate"),
])
def test_each_recipe_feature_is_on_the_exported_models_path(work, combo, feature):
    """The agreement above is not luck: without the feature the exported model is off by far
    more than the tolerance (so an exported bias, gate or norm that were ignored would show)."""
    model = _hf_model(os.path.join(work.dirs["hf"], combo), native=False)
    assert _max_err(_hf_logits(model, work.ids), work.logits[combo]) <= TOLERANCE
    with torch.no_grad():
        FEATURES[feature](model)
    assert _max_err(_hf_logits(model, work.ids), work.logits[combo]) > 10 * TOLERANCE


def test_spannorm_class_batched_generation_with_left_padding(work):
    """Our class generates a left-padded batch like each sequence alone (KV cache, mask and
    positions agree)."""
    model = _hf_model(os.path.join(work.dirs["hf"], "spannorm-moe"), native=False)
    a, b = work.ids[0, :7].tolist(), work.ids[1, :3].tolist()

    def greedy(ids, mask=None):
        with torch.no_grad():
            out = model.generate(torch.tensor(ids), attention_mask=mask, max_new_tokens=8,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, len(ids[0]):].tolist()

    alone = greedy([a]) + greedy([b])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    assert greedy([a, [0] * 4 + b], mask) == alone


def _load_tool(name):
    """The package module behind tools/NAME.py (its `main` is the console script's)."""
    return tool_module(name)


def _run_tool(name, *argv):
    """(exit status, stdout, stderr) of a tool's main run in this process."""
    tool = _load_tool(name)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        from spannorm_megatron.hf.cli import run_cli

        status = run_cli(tool.main, list(argv))
    return status, out.getvalue(), err.getvalue()


def test_generate_tool_same_tokens_from_checkpoint_and_hf_folder(work):
    combo = "spannorm-dense"
    prompt = ",".join(map(str, work.ids[0, :5].tolist()))
    results = {}
    for source in (os.path.join(work.dirs["ref"], combo), os.path.join(work.dirs["hf"], combo)):
        status, out, err = _run_tool("generate", "--load", source, "--prompt-ids", prompt,
                                     "--greedy", "--max-new-tokens", "12", "--json",
                                     "--device", "cpu")
        assert status == 0, err
        results[source] = json.loads(out.strip().splitlines()[-1])
    a, b = results.values()
    assert {a["source"], b["source"]} == {"megatron", "huggingface"}
    assert a["output_ids"] == b["output_ids"] and len(a["output_ids"]) == 12
    # sampling is seeded: the same seed gives the same tokens
    status, out1, _ = _run_tool("generate", "--load", os.path.join(work.dirs["hf"], combo),
                                "--prompt-ids", prompt, "--top-k", "20", "--top-p", "0.9",
                                "--temperature", "0.8", "--seed", "3", "--json")
    status, out2, _ = _run_tool("generate", "--load", os.path.join(work.dirs["hf"], combo),
                                "--prompt-ids", prompt, "--top-k", "20", "--top-p", "0.9",
                                "--temperature", "0.8", "--seed", "3", "--json")
    assert status == 0 and out1 == out2
    # past the model's positions, or sampling settings that are not numbers it can use
    hf = os.path.join(work.dirs["hf"], combo)
    for argv, words in ((("--max-new-tokens", "100000"), "go past the model's"),
                        (("--temperature", "inf"), "--temperature"),
                        (("--temperature", "0"), "--temperature"),
                        (("--top-k", "-1"), "--top-k"), (("--top-p", "0"), "--top-p")):
        status, _out, err = _run_tool("generate", "--load", hf, "--prompt-ids", prompt, *argv)
        assert status == 2 and words in err and "Traceback" not in err, (argv, err)


# ------------------------------------------------------------------ files, tokenizer, shards
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    from spannorm_megatron.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_sentencepiece,
    )

    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    train_sentencepiece(TokenizerTrainingConfig(
        model_prefix=prefix, embedded_corpus=True, embedded_corpus_max_bytes=100_000,
        vocab_size=400, character_coverage=0.9995, num_threads=2), log=io.StringIO())
    return prefix + ".model"


@pytest.fixture(scope="module")
def tokenized_export(tmp_path_factory, sp_model, megatron_world):
    """A spannorm model with the tokenizer's vocabulary (400, padded to 512), exported with the
    tokenizer as bfloat16 into several shards."""
    root = tmp_path_factory.mktemp("tokexport")
    config = _hf.model_config("spannorm-dense", vocab_size=512)
    _seed(5)
    model = _hf.build(config, seed=5)
    ckpt = str(root / "ckpt")
    _hf.save([model], config, ckpt, args={"tokenizer_model": sp_model})
    out = str(root / "spannorm-tok")
    result = _quiet_export(ckpt, out, dtype="bfloat16", max_shard_size="60KB")
    return SimpleNamespace(model=model, config=config, ckpt=ckpt, out=out, result=result)


def test_export_folder_files_tokenizer_and_shards(tokenized_export, sp_model):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from spannorm_megatron.data.tokenizer import SentencePieceTokenizer

    out = tokenized_export.out
    names = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "tokenizer.model", "model.safetensors.index.json", "configuration_spannorm.py",
            "modeling_spannorm.py"} <= names
    assert not any(".tmp-" in n for n in os.listdir(os.path.dirname(out)))
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(name in names for name in shards)
    for shard in shards:
        with safe_open(os.path.join(out, shard), "pt") as f:
            for key in f.keys():
                assert f.get_tensor(key).dtype == torch.bfloat16
                assert index["weight_map"][key] == shard
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    ours = SentencePieceTokenizer(sp_model)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_spannorm.SpanNormForCausalLM"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert config["norm_placement"] == "spannorm" and config["scale_init"] == "sqrt_depth"
    assert config["megatron_model_config"]["num_layers"] == 2
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == [ours.eos, ours.special_token_ids["eod_piece"]]

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok.convert_tokens_to_ids("<EOD>") == ours.special_token_ids["eod_piece"]
    for text in ("def f(x):\n    return x ** 2\n", "  leading and trailing  ", "数字 123 €"):
        assert tok.encode(text, add_special_tokens=False) == ours.tokenize(text)
        assert tok.decode(ours.tokenize(text)) == ours.detokenize(ours.tokenize(text))
    assert tokenized_export.result.num_parameters == sum(
        p.numel() for p in tokenized_export.model.parameters())


def test_the_tokenizer_goes_through_hf_megatron_hf_unchanged(tokenized_export, tmp_path):
    """The import copies the folder's tokenizer beside the checkpoint and records it; the
    export of that checkpoint writes the same files back, byte for byte."""
    from transformers import AutoTokenizer

    from spannorm_megatron.config.tokenizer_files import hf_tokenizer_files
    from spannorm_megatron.hf.importer import convert_hf_to_megatron

    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    convert_hf_to_megatron(tokenized_export.out, ckpt, log=lambda line: None)
    with open(os.path.join(ckpt, "iter_0000000", "run.json")) as f:
        assert json.load(f)["args"]["hf_tokenizer_folder"] == os.path.join(ckpt, "tokenizer")
    from spannorm_megatron.hf.export import export_checkpoint

    lines = []
    export_checkpoint(ckpt, back, log=lines.append)
    assert (f"[convert_to_hf] tokenizer: --tokenizer-type HuggingFaceTokenizer "
            f"--tokenizer-model {ckpt}/tokenizer") in lines, lines
    assert not any("WARNING" in line for line in lines), lines
    names = hf_tokenizer_files(tokenized_export.out)
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(names)
    assert hf_tokenizer_files(back) == names
    for name in names:
        with open(os.path.join(tokenized_export.out, name), "rb") as a, \
                open(os.path.join(back, name), "rb") as b:
            assert a.read() == b.read(), name
    original, returned = AutoTokenizer.from_pretrained(tokenized_export.out), \
        AutoTokenizer.from_pretrained(back)
    for text in ("def f(x):\n    return x ** 2\n", "数字 123 €"):
        assert returned.encode(text) == original.encode(text)


def test_bfloat16_export_is_close(tokenized_export):
    ids = _hf.tokens(vocab=400)
    model = _hf_model(tokenized_export.out, native=False)
    assert model.dtype == torch.bfloat16
    reference = _hf.megatron_logits(tokenized_export.model, ids)
    err = _max_err(_hf_logits(model, ids), reference)
    assert err < 0.1 * reference.abs().max().item()


@pytest.mark.parametrize("combo,bias", [("spannorm-moe-deepseek", "mlp.expert_bias"),
                                        ("prenorm-moe-glm", "mlp.gate.e_score_correction_bias")])
def test_bfloat16_export_keeps_the_expert_bias_in_float32(work, combo, bias, tmp_path):
    """megatron-core keeps the expert bias in float32 whatever the model's dtype (its values are
    sums of small steps that bfloat16 would round): so do the export and the loaded model."""
    from safetensors import safe_open

    out = str(tmp_path / combo)
    _quiet_export(os.path.join(work.dirs["ref"], combo), out, dtype="bfloat16")
    name = f"model.layers.1.{bias}"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.get_tensor(name).dtype == torch.float32
        assert f.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor(name), work.states[combo][
            "decoder.layers.1.mlp.router.expert_bias"])
    model = _hf_model(out, native=combo in NATIVE)
    assert model.dtype == torch.bfloat16
    assert model.get_parameter_or_buffer(name).dtype == torch.float32
    reference = work.logits[combo]
    assert _max_err(_hf_logits(model, work.ids), reference) < 0.1 * reference.abs().max().item()


def test_text_generation_with_tokenizer(tokenized_export):
    status, out, err = _run_tool("generate", "--load", tokenized_export.ckpt, "--prompt",
                                 "def main(", "--greedy", "--max-new-tokens", "5")
    assert status == 0, err
    assert out.strip().splitlines()[-1].startswith("def main(")


# ---------------------------------------------------------------------- fresh environment
FRESH_SCRIPT = r"""
import json, sys, torch
for banned in ("spannorm_megatron", "megatron"):
    try:
        __import__(banned)
        raise SystemExit(f"{banned} is importable in the fresh environment")
    except ImportError:
        pass
from transformers import AutoModelForCausalLM, AutoTokenizer
import transformers
folder, ids_path, out_path, text = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits.float()
    generated = model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 4:].tolist()
ids = AutoTokenizer.from_pretrained(folder).encode(text, add_special_tokens=False) if text else None
torch.save({"logits": logits, "generated": generated, "ids": ids,
            "transformers": transformers.__version__, "class": type(model).__name__}, out_path)
"""


FRESH_PACKAGES = ("transformers", "safetensors", "sentencepiece")


def _fresh_venv():
    """A cached venv with only torch, transformers, safetensors, sentencepiece (and their
    dependencies), installed by pip from the registry its own configuration names (pip.conf,
    PIP_INDEX_URL, PIP_FIND_LINKS, ...); None with the reason if pip cannot install them."""
    key = hashlib.sha256(f"{sys.version}|{torch.__version__}".encode()).hexdigest()[:10]
    venv = os.environ.get("SPANNORM_HF_FRESH_VENV") or os.path.join(
        tempfile.gettempdir(), f"spannorm-hf-fresh-venv-{key}")
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".complete")
    if os.path.isfile(marker):
        return python, None
    shutil.rmtree(venv, ignore_errors=True)
    made = subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True, text=True)
    if made.returncode:
        return None, f"python -m venv failed: {made.stderr[-500:]}"
    wanted = [f"torch=={str(torch.__version__).split('+')[0]}", *FRESH_PACKAGES]
    # --no-compile: byte-compiling every module of torch and transformers at install costs
    # about 30 s of CPU; the script below compiles only what it imports, once.
    installed = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check",
                                "-q", "--no-compile", *wanted], capture_output=True, text=True,
                               timeout=900)
    if installed.returncode:
        shutil.rmtree(venv, ignore_errors=True)
        missing = [line.strip() for line in installed.stderr.splitlines()
                   if "No matching distribution found for" in line]
        return None, (f"pip could not install {', '.join(wanted)} from its configured "
                      f"registry: {'; '.join(missing) or installed.stderr.strip()[-500:]}")
    open(marker, "w").close()
    return python, None


def test_spannorm_export_runs_in_a_fresh_environment(work, tokenized_export, tmp_path):
    python, reason = _fresh_venv()
    if python is None:
        pytest.skip(f"fresh virtual environment unavailable: {reason}")
    combo = "spannorm-moe-deepseek"  # q/k norms, mixed layers, biased group routing, gate
    folder = str(tmp_path / "spannorm-moe-export")
    shutil.copytree(os.path.join(work.dirs["hf"], combo), folder)
    ids_path, out_path = str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    torch.save(work.ids, ids_path)
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    for target, text in ((folder, ""), (tokenized_export.out, "def f(x):\n    return 1  # é")):
        run = subprocess.run([python, str(script), target, ids_path, out_path, text],
                             capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                             env=env)
        assert run.returncode == 0, run.stderr[-4000:]
        result = torch.load(out_path)
        assert result["class"] == "SpanNormForCausalLM"
        if target == folder:
            assert _max_err(result["logits"], work.logits[combo]) <= TOLERANCE
            from spannorm_megatron.hf import generation

            expected = generation.generate(generation.megatron_stepper(work.models[combo]),
                                           work.ids[0, :4].tolist(), 8,
                                           generation.Sampling(greedy=True))
            assert result["generated"] == expected
        else:
            from spannorm_megatron.data.tokenizer import SentencePieceTokenizer

            sp = SentencePieceTokenizer(os.path.join(tokenized_export.out, "tokenizer.model"))
            assert result["ids"] == sp.tokenize(text)


# ------------------------------------------------------------------------------- bad input
def _no_debris(save: str) -> None:
    assert not os.path.exists(save)
    parent = os.path.dirname(save)
    if os.path.isdir(parent):
        assert not [n for n in os.listdir(parent) if ".tmp-" in n], os.listdir(parent)


def test_missing_shard_is_refused_and_nothing_is_written(work, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError

    # a checkpoint-package checkpoint: its manifest names the missing file
    broken = str(tmp_path / "broken")
    shutil.copytree(os.path.join(work.dirs["ref"], "spannorm-dense"), broken)
    iter_dir = os.path.join(broken, "iter_0000001")
    victim = sorted(n for n in os.listdir(iter_dir) if n.endswith(".distcp"))[0]
    os.remove(os.path.join(iter_dir, victim))
    save = str(tmp_path / "exports" / "out")
    with pytest.raises(ConversionError, match=victim):
        _quiet_export(broken, save)
    _no_debris(save)
    # a bare dist checkpoint (no manifest): the DCP metadata names the missing file
    bare = str(tmp_path / "bare")
    shutil.copytree(iter_dir, bare)
    for name in ("manifest.json", "run.json"):
        os.remove(os.path.join(bare, name))
    config = str(tmp_path / "config.json")
    with open(config, "w") as f:
        json.dump(_hf.model_config("spannorm-dense").to_dict(), f)
    with pytest.raises(ConversionError, match=f"missing shard file.*{victim}"):
        _quiet_export(bare, save, model_config=config)
    _no_debris(save)
    with pytest.raises(ConversionError, match="missing shard file"):  # config from common.pt
        _quiet_export(bare, save)
    _no_debris(save)


def test_plain_dist_checkpoint_needs_and_accepts_model_config(work, tmp_path):
    """A checkpoint written by dist_checkpointing.save alone (no run record): refused without
    --model-config, converted with it."""
    from megatron.core import dist_checkpointing

    from spannorm_megatron.hf.errors import ConversionError

    combo = "postnorm-moe"
    plain = tmp_path / "plain"
    plain.mkdir()
    dist_checkpointing.save({"model": work.models[combo].sharded_state_dict()}, str(plain))
    save = str(tmp_path / "exports" / "out")
    with pytest.raises(ConversionError, match="no run record.*--model-config"):
        _quiet_export(str(plain), save)
    _no_debris(save)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_config": _hf.model_config(combo).to_dict()}))
    status, _out, err = _run_tool("convert_to_hf", "--load", str(plain), "--save", save,
                                  "--model-config", str(config))
    assert status == 0, err
    model = _hf_model(save, native=False)
    assert _max_err(_hf_logits(model, work.ids), work.logits[combo]) <= TOLERANCE


def test_cli_reports_bad_input_without_traceback(work, tmp_path):
    """The real command line: exit status 2, the message, no traceback, nothing written."""
    save = str(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_to_hf.py"),
         "--load", str(tmp_path / "nowhere"), "--save", save],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr
    assert not os.path.exists(save)


@pytest.fixture
def fancynorm():
    """A registered placement that neither our own class nor a native one computes."""
    from spannorm_megatron import placements

    placements.register(dataclasses.replace(placements.get_placement("postnorm"),
                                            name="fancynorm"))
    yield
    placements.unregister("fancynorm")


def test_model_config_that_changes_the_trained_model_is_refused(work, tmp_path):
    """--model-config may not contradict the run record where that changes the function the
    checkpoint computes (here the router); it may where it does not (the dispatcher)."""
    combo = "postnorm-moe"
    load = os.path.join(work.dirs["ref"], combo)
    recorded = _hf.model_config(combo).to_dict()
    other_router = tmp_path / "topk1.json"
    other_router.write_text(json.dumps(dict(recorded, moe_router_topk=1,
                                            moe_router_pre_softmax=True)))
    save = str(tmp_path / "exports" / "out")
    status, _out, err = _run_tool("convert_to_hf", "--load", load, "--save", save,
                                  "--model-config", str(other_router))
    assert status == 2 and "Traceback" not in err
    assert "moe_router_topk: checkpoint 2, --model-config 1" in err
    assert "moe_router_pre_softmax: checkpoint False, --model-config True" in err
    assert not os.path.exists(save)
    other_dispatcher = tmp_path / "allgather.json"
    other_dispatcher.write_text(json.dumps(dict(recorded, moe_token_dispatcher_type="allgather")))
    status, _out, err = _run_tool("convert_to_hf", "--load", load, "--save", save,
                                  "--model-config", str(other_dispatcher))
    assert status == 0, err
    model = _hf_model(save, native=False)
    assert _max_err(_hf_logits(model, work.ids), work.logits[combo]) <= TOLERANCE


def test_placement_without_export_rule_is_refused(work, tmp_path, fancynorm):
    from megatron.core import dist_checkpointing

    plain = tmp_path / "plain"  # no run record: the given config is the only description
    plain.mkdir()
    dist_checkpointing.save({"model": work.models["postnorm-dense"].sharded_state_dict()},
                            str(plain))
    config = dict(_hf.model_config("postnorm-dense").to_dict(), norm_placement="fancynorm")
    config_path = str(tmp_path / "fancy.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    save = str(tmp_path / "exports" / "fancy")
    status, _out, err = _run_tool("convert_to_hf", "--load", str(plain),
                                  "--save", save, "--model-config", config_path)
    assert status == 2 and "Traceback" not in err
    assert "fancynorm" in err and "no Hugging Face export rule" in err
    assert not os.path.exists(save)


def test_native_format_refuses_what_llama_cannot_express(work, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError

    save = str(tmp_path / "out")
    with pytest.raises(ConversionError, match="LayerNorm.*Llama uses RMSNorm"):
        _quiet_export(os.path.join(work.dirs["ref"], "prenorm-layernorm-bias-gelu"), save,
                      fmt="native")
    with pytest.raises(ConversionError, match="pre-norm"):
        _quiet_export(os.path.join(work.dirs["ref"], "spannorm-dense"), save, fmt="native")
    _no_debris(save)


def test_moe_recipes_without_an_exact_hf_class_are_refused_naming_the_setting(work, tmp_path):
    """--format native where no native family holds the model (q/k norms with the rest of the
    model no native family has, DeepSeek-style routing GLM-4-MoE cannot hold, a gated shared
    expert), and sinkhorn routing in any format: one error naming the setting, nothing written.
    The same models but sinkhorn's export as our own class under --format auto."""
    import re

    from spannorm_megatron.hf.errors import ConversionError

    sinkhorn = dict(num_experts=4, moe_router_load_balancing_type="sinkhorn",
                    moe_aux_loss_coeff=0.0)
    cases = [
        (dict(num_experts=4, qk_layernorm=True, moe_shared_expert_intermediate_size=48),
         "native", "qk_layernorm=True with a shared expert"),
        (dict(qk_layernorm=True), "native", "qk_layernorm=True on a dense model"),
        (dict(num_experts=4, moe_router_score_function="sigmoid",
              moe_router_enable_expert_bias=True), "native",
         "no shared expert, or one whose width is not a multiple of moe_ffn_hidden_size"),
        (dict(num_experts=4, moe_shared_expert_intermediate_size=32,
              moe_shared_expert_gate=True), "native", "moe_shared_expert_gate=True"),
        (dict(num_experts=4, moe_layer_freq=[0, 1], moe_router_pre_softmax=True), "native",
         "moe_router_pre_softmax=True"),
        (sinkhorn, "auto", "moe_router_load_balancing_type='sinkhorn'"),
        (dict(sinkhorn, norm_placement="spannorm"), "spannorm",
         "moe_router_load_balancing_type='sinkhorn'"),
    ]
    for i, (overrides, fmt, expected) in enumerate(cases):
        config = dataclasses.replace(_hf.model_config("prenorm-dense"), **overrides)
        _seed(300 + i)
        source = str(tmp_path / f"ckpt{i}")
        _hf.save([_hf.build(config)], config, source)
        save = str(tmp_path / f"out{i}")
        with pytest.raises(ConversionError, match=re.escape(expected)):
            _quiet_export(source, save, fmt=fmt)
        _no_debris(save)
        if fmt == "native":
            result = _quiet_export(source, save)
            assert result.architecture == "SpanNormForCausalLM"
            assert any(expected in note for note in result.notes), result.notes


def test_capacity_factor_exports_dropless_and_says_so(work, tmp_path):
    """megatron-core drops tokens over capacity in eval forwards too, by comparing the tokens
    of the whole batch; the export routes every token (documented, and noted when exporting):
    exact where megatron dropped nothing, not where it dropped."""
    from spannorm_megatron.hf.megatron_reader import build_single_process_model

    combo = "spannorm-moe-deepseek"
    for factor, drops in ((4.0, False), (0.25, True)):
        config = dataclasses.replace(_hf.model_config(combo), moe_expert_capacity_factor=factor)
        model = build_single_process_model(config)
        model.load_state_dict(work.models[combo].state_dict())
        source = str(tmp_path / f"ckpt{factor}")
        _hf.save([model], config, source)
        result = _quiet_export(source, str(tmp_path / f"out{factor}"))
        assert any("routes every token (no capacity limit)" in n for n in result.notes)
        exported = _hf_model(str(tmp_path / f"out{factor}"), native=False)
        err = _max_err(_hf_logits(exported, work.ids), _hf.megatron_logits(model, work.ids))
        assert (err > 10 * TOLERANCE) if drops else (err <= TOLERANCE), (factor, err)


def test_unsupported_hf_architecture_is_refused(work, tmp_path):
    folder = str(tmp_path / "gpt2")
    shutil.copytree(os.path.join(work.dirs["hf"], "prenorm-dense"), folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save = str(tmp_path / "ckpt")
    status, _out, err = _run_tool("convert_from_hf", "--load", folder, "--save", save)
    assert status == 2 and "Traceback" not in err
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    assert not os.path.exists(save)


def test_a_layout_in_one_process_is_told_the_torchrun_command(work, tmp_path):
    """README: one process converts TP1/PP1; TP2 files need two ranks, and the tool says how."""
    folder = os.path.join(work.dirs["hf"], "prenorm-dense")
    save = str(tmp_path / "ckpt")
    status, _out, err = _run_tool("convert_from_hf", "--load", folder, "--save", save,
                                  "--tensor-model-parallel-size", "2", "--dtype", "bfloat16")
    assert status == 2 and "Traceback" not in err
    assert (f"Run: torchrun --standalone --nproc_per_node 2 tools/convert_from_hf.py --load "
            f"{folder} --save {save} --tensor-model-parallel-size 2 --dtype bfloat16. Or "
            f"convert in one process without the layout flags") in err
    assert not os.path.exists(save)


def test_hf_features_megatron_cannot_express_are_refused(work, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.importer import HFCheckpoint

    folder = str(tmp_path / "scaled")
    shutil.copytree(os.path.join(work.dirs["hf"], "prenorm-dense"), folder)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match="RoPE scaling"):
        HFCheckpoint(folder)
    # weights that do not match config.json
    folder2 = str(tmp_path / "lying")
    shutil.copytree(os.path.join(work.dirs["hf"], "prenorm-dense"), folder2)
    with open(os.path.join(folder2, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 3
    with open(os.path.join(folder2, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ConversionError, match=r"contradicts spannorm_export\.json "
                       r"\(num_hidden_layers: config\.json 3, record 2\)"):
        HFCheckpoint(folder2)
    os.remove(os.path.join(folder2, "spannorm_export.json"))  # a folder with no record beside
    with pytest.raises(ConversionError, match="lacks .*model.layers.2"):
        HFCheckpoint(folder2)


def test_tokenizer_vocab_must_fit_the_model(work, sp_model, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError

    save = str(tmp_path / "out")
    # tokenizer 400 ids, model 128 rows
    with pytest.raises(ConversionError, match="400 ids but the model's vocabulary is 128"):
        _quiet_export(os.path.join(work.dirs["ref"], "spannorm-dense"), save,
                      tokenizer_model=sp_model)
    _no_debris(save)
    # tokenizer 400 ids, model padded far beyond what training pads
    config = _hf.model_config("spannorm-dense", vocab_size=2048)
    _seed(9)
    ckpt = str(tmp_path / "wide")
    _hf.save([_hf.build(config)], config, ckpt)
    with pytest.raises(ConversionError, match="exceeds the tokenizer's"):
        _quiet_export(ckpt, save, tokenizer_model=sp_model)
    _no_debris(save)


def test_existing_destination_is_not_overwritten_without_flag(work, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError

    save = tmp_path / "taken"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    source = os.path.join(work.dirs["ref"], "prenorm-dense")
    for overwrite in (False, True):  # not written by the converter: never replaced
        with pytest.raises(ConversionError, match=r"not empty \(keep\.txt\).*no "
                           r"spannorm_export\.json.*--overwrite or not"):
            _quiet_export(source, str(save), overwrite=overwrite)
    assert (save / "keep.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    _quiet_export(source, str(earlier))
    with pytest.raises(ConversionError, match="holds an earlier conversion; pass --overwrite"):
        _quiet_export(source, str(earlier))
    (earlier / "config.json").write_text("{}")
    _quiet_export(source, str(earlier), overwrite=True)  # an earlier export: replaced whole
    assert json.loads((earlier / "config.json").read_text())["architectures"]
    (earlier / "notes.md").write_text("mine")  # ... but never with what it did not write
    with pytest.raises(ConversionError, match=r"also notes\.md, which the converter did not "
                       r"write"):
        _quiet_export(source, str(earlier), overwrite=True)
    assert (earlier / "notes.md").read_text() == "mine"


def test_training_checkpoint_with_optimizer_state_exports(work, tmp_path):
    """A checkpoint as training writes it (distributed optimizer state, scheduler, run record
    with the training arguments) exports its model alone."""
    from megatron.core.optimizer import OptimizerConfig

    from spannorm_megatron.checkpoint import save_checkpoint
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.training.setup import setup_model_and_optimizer

    combo = "prenorm-moe"
    config = _hf.model_config(combo)
    chunks, optimizer = setup_model_and_optimizer(
        config, ParallelConfig(use_distributed_optimizer=True),
        OptimizerConfig(optimizer="adam", lr=1e-3))
    chunks[0].module.load_state_dict(work.models[combo].state_dict())
    save_checkpoint(str(tmp_path / "train"), 7, chunks, optimizer, None, model_config=config,
                    parallel_config=ParallelConfig(use_distributed_optimizer=True),
                    consumed_train_samples=56, args={"make_vocab_size_divisible_by": 128})
    out = str(tmp_path / "prenorm-moe-train")
    _quiet_export(str(tmp_path / "train"), out)
    with open(os.path.join(out, "spannorm_export.json")) as f:
        assert json.load(f)["iteration"] == 7
    model = _hf_model(out, native=True)
    assert _max_err(_hf_logits(model, work.ids), work.logits[combo]) <= TOLERANCE


@pytest.mark.parametrize("family", ["llama", "mixtral", "qwen2_moe"])
def test_folders_saved_by_transformers_convert_to_matching_megatron_models(
        megatron_world, family, tmp_path):
    """Native folders written by transformers itself (not by our export) convert into megatron
    models with the same logits."""
    import transformers

    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.hf.megatron_reader import load_megatron_model

    shapes = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=50000.0,
                  rms_norm_eps=1e-5, initializer_range=0.1)
    torch.manual_seed(11)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            intermediate_size=96, tie_word_embeddings=True, **shapes))
    elif family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **shapes))
    else:
        model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **shapes))
        with torch.no_grad():  # the parts megatron's model does not have must be neutral
            for name, param in model.named_parameters():
                if name.endswith(("shared_expert_gate.weight", "_proj.bias")):
                    param.zero_()
                if name.endswith("shared_expert.down_proj.weight"):
                    param.mul_(2.0)  # sigmoid(0) = 1/2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    model.eval().save_pretrained(str(tmp_path / "hf"))
    convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "ckpt"), log=lambda line: None)
    _config, megatron = load_megatron_model(str(tmp_path / "ckpt"))
    ids = _hf.tokens(vocab=96)
    assert _max_err(_hf.megatron_logits(megatron, ids), _hf_logits(model, ids)) <= TOLERANCE


@pytest.mark.parametrize("placement", ["deepnorm", "perinorm", "spannorm_clean"])
def test_modeling_file_runs_the_contracts_other_placements(placement):
    """Placements the registry does not have yet: the modeling file already computes them, so
    exporting one needs only its ExportRule. Checked against the contract's equation written out
    with the model's own modules."""
    from spannorm_megatron.hf.remote_code.configuration_spannorm import SpanNormConfig
    from spannorm_megatron.hf.remote_code.modeling_spannorm import SpanNormForCausalLM

    torch.manual_seed(0)
    config = SpanNormConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            norm_placement=placement, max_position_embeddings=32)
    model = SpanNormForCausalLM(config).eval()
    layer = model.model.layers[0]
    x = torch.randn(1, 5, 32)
    positions = torch.arange(5)[None]
    from spannorm_megatron.hf.remote_code import modeling_spannorm as m

    rope = m._rope(positions, config.head_dim, config.rope_theta, x.dtype)
    mask = m._attention_mask(None, 1, 5, 0, x.device)
    with torch.no_grad():
        A = lambda t: layer.self_attn(t, rope, mask, None)  # noqa: E731
        F_ = layer.mlp
        if placement == "deepnorm":
            a = (2 * 2) ** 0.25
            h = layer.post_attention_norm(a * x + A(x))
            expected = layer.post_mlp_norm(a * h + F_(h))
        elif placement == "perinorm":
            h = x + layer.attention_output_norm(A(layer.input_layernorm(x)))
            expected = h + layer.mlp_output_norm(F_(layer.pre_mlp_layernorm(h)))
        else:
            h = layer.post_attention_norm(x + A(x))
            expected = x + layer.post_mlp_norm(h + F_(h))
        assert torch.allclose(layer(x, rope, mask, None), expected)
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 7)
    assert (model.model.norm is not None) == (placement != "deepnorm")


def _snapshot(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
            for d, _, files in os.walk(root) for f in files}


def test_conversion_never_writes_into_its_input_or_a_training_checkpoint(work, tmp_path):
    """--overwrite replaces an earlier output only: a --save that is, holds or lies inside the
    --load input, that lies inside or is a training checkpoint directory, or that holds anything
    the converter did not write (at any depth), is refused in both directions, files intact."""
    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.importer import convert_hf_to_megatron

    ckpt = tmp_path / "ckpt"
    shutil.copytree(os.path.join(work.dirs["ref"], "prenorm-dense"), ckpt)
    folder = tmp_path / "hf"
    shutil.copytree(os.path.join(work.dirs["hf"], "prenorm-dense"), folder)
    before = {path: _snapshot(path) for path in (ckpt, folder)}
    other = tmp_path / "other_run"  # another run's checkpoint, its notes and an HF folder
    shutil.copytree(ckpt, other / "ckpt")
    (other / "notes.md").write_text("mine")
    shutil.copytree(folder, other / "hf")
    before[other] = _snapshot(other)
    inside = "holds or lies inside the --load input"
    refusals = [
        (lambda: _quiet_export(str(ckpt), str(ckpt), overwrite=True), inside),
        (lambda: _quiet_export(str(ckpt / "iter_0000001"), str(ckpt), overwrite=True), inside),
        (lambda: convert_hf_to_megatron(str(folder), str(folder), overwrite=True,
                                        log=lambda line: None), inside),
        (lambda: convert_hf_to_megatron(str(folder), str(ckpt), overwrite=True,
                                        log=lambda line: None), "training checkpoint directory"),
        (lambda: _quiet_export(str(ckpt), str(ckpt.parent), overwrite=True), inside),
        # the training iteration itself, of this run and of another one
        (lambda: _quiet_export(str(ckpt), str(ckpt / "iter_0000001"), overwrite=True), inside),
        (lambda: _quiet_export(str(ckpt), str(other / "ckpt" / "iter_0000001"),
                               overwrite=True), "lies inside the training checkpoint directory"),
        (lambda: _quiet_export(str(ckpt), str(other / "ckpt" / "hf"), overwrite=True),
         "lies inside the training checkpoint directory"),
        # a parent folder holding a checkpoint, notes and an HF folder
        (lambda: _quiet_export(str(ckpt), str(other), overwrite=True),
         r"not empty \(ckpt/, hf/, notes\.md\).*--overwrite or not"),
        (lambda: convert_hf_to_megatron(str(folder), str(other), overwrite=True,
                                        log=lambda line: None), "--overwrite or not"),
    ]
    for convert, message in refusals:
        with pytest.raises(ConversionError, match=message):
            convert()
        assert {path: _snapshot(path) for path in before} == before


def test_non_finite_weights_are_refused_naming_the_tensor(megatron_world, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError

    config = _hf.model_config("spannorm-dense")
    model = _hf.build(config)
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")
    ckpt = str(tmp_path / "diverged")
    _hf.save([model], config, ckpt)
    save = str(tmp_path / "exports" / "out")
    with pytest.raises(ConversionError, match=r"decoder\.layers\.1\.mlp\.linear_fc2\.weight holds "
                       r"1 non-finite value"):
        _quiet_export(ckpt, save)
    _no_debris(save)
    _quiet_export(ckpt, save, allow_non_finite=True)  # asked for: the diverged run, as it is
    assert os.path.isfile(os.path.join(save, "config.json"))


def test_a_killed_conversions_staging_folder_is_removed_by_the_next_one(work, tmp_path):
    """A conversion killed mid-write leaves its staging folder (named for its host and PID);
    the next conversion to the same --save removes it, and puts back an output whose
    replacement never arrived. A live process's folder is left alone."""
    from spannorm_megatron.hf.destination import side_path

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    save = tmp_path / "out"
    staged = side_path(str(save), ".tmp-").replace(f"-{os.getpid()}-", f"-{dead}-")
    os.makedirs(staged)
    (Path(staged) / "model.safetensors").write_bytes(b"\0" * 1024)
    live = side_path(str(save), ".tmp-")  # this process: still running
    os.makedirs(live)
    source = os.path.join(work.dirs["ref"], "prenorm-dense")
    _quiet_export(source, str(save))
    assert not os.path.exists(staged) and os.path.isdir(live)
    os.rmdir(live)
    # killed between moving the earlier output aside and moving the new one in
    replaced = side_path(str(save), ".old-").replace(f"-{os.getpid()}-", f"-{dead}-")
    os.rename(save, replaced)
    _quiet_export(source, str(tmp_path / "elsewhere"))
    assert not save.exists()
    with pytest.raises(Exception):
        _quiet_export(source, str(save))  # the earlier output is back: --overwrite needed
    assert (save / "config.json").exists() and not os.path.exists(replaced)


def test_a_refused_write_is_reported_without_a_traceback_and_leaves_nothing(work, tmp_path):
    """Under a file-size limit (ulimit -f) the export stops with its reason and the fix."""
    import resource

    from spannorm_megatron.hf.errors import ConversionError

    save = str(tmp_path / "limited")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(ConversionError, match=r"--save .*limited: the export could not be "
                           r"written \(File too large.*ulimit -f.*--max-shard-size"):
            _quiet_export(os.path.join(work.dirs["ref"], "spannorm-dense"), save)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _no_debris(save)


@pytest.mark.parametrize("field, value", [("rope_theta", 20000.0), ("norm_eps", 1e-3),
                                          ("num_key_value_heads", 1)])
def test_an_edited_config_json_is_refused_naming_the_field(work, tmp_path, field, value):
    """config.json is what transformers computes: an import never builds another model from
    the records beside it. An edit that contradicts them is refused, naming the field."""
    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.importer import convert_hf_to_megatron

    folder = tmp_path / "hf"
    shutil.copytree(os.path.join(work.dirs["hf"], "spannorm-dense"), folder)
    config = json.loads((folder / "config.json").read_text())
    assert field in config and config[field] != value
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConversionError, match=rf"config\.json contradicts .*{field}: config\.json "
                       rf"{value!r}, record"):
        convert_hf_to_megatron(str(folder), str(tmp_path / "ckpt"), log=lambda line: None)
    assert not (tmp_path / "ckpt").exists()


def test_non_finite_hf_weights_are_refused_on_import(work, tmp_path):
    from safetensors.torch import load_file, save_file

    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.importer import convert_hf_to_megatron

    folder = tmp_path / "hf"
    shutil.copytree(os.path.join(work.dirs["hf"], "prenorm-dense"), folder)
    weights = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name][0, :2] = float("inf")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=rf"{name} holds 2 non-finite value.*"
                       r"--allow-non-finite"):
        convert_hf_to_megatron(str(folder), str(tmp_path / "ckpt"), log=lambda line: None)
    assert not (tmp_path / "ckpt").exists()
    convert_hf_to_megatron(str(folder), str(tmp_path / "ckpt"), allow_non_finite=True,
                           log=lambda line: None)  # asked for: converted as it is
    assert (tmp_path / "ckpt" / "spannorm_import.json").exists()
