"""Megatron-LM's model and data flags of its example scripts (GPT-3 175B, Llama-3 8B, Mixtral 8x7B,
the Qwen3-30B-A3B and DeepSeek-V2-Lite modelopt configs, core_v0.16.1): --kv-channels,
--rotary-percent, --no-position-embedding, --use-rotary-position-embeddings, multi-latent
attention (--multi-latent-attention, --q-lora-rank, --kv-lora-rank, --qk-head-dim,
--qk-pos-emb-head-dim, --v-head-dim, --rotary-scaling-factor, --mscale, --mscale-all-dim,
--rope-type), --ckpt-format, --mock-data and --no-create-attention-mask-in-dataloader.

Each flag is shown to act on real megatron-core objects: models built from our specs are compared
with models built from megatron-core's own GPT layer specs and `GPTModel` arguments (same seed,
same weights, same logits), datasets with megatron-core's `GPTDatasetConfig` / `MockGPTDataset`,
FLOPs with Megatron-LM's own formula; one 2-rank torchrun run trains the DeepSeek-V2-Lite recipe
at tiny size (MLA under TP2 + SP, MoE, mock data) and its checkpoint is read back.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from _training import RECIPE, logged_losses, run_train

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.errors import ConfigError  # noqa: E402
from spannorm_megatron.placements import PLACEMENTS  # noqa: E402
from spannorm_megatron.training.arguments import parse_args  # noqa: E402

# Every command line below starts from Megatron-LM's required flags and spells out the model
# flags it relies on (the defaults are Megatron-LM's GPT-2 ones).
REQUIRED = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
            "--train-iters", "4", "--lr", "1e-3", "--tokenizer-type", "ByteLevelTokenizer"]
SEQ, BATCH, VOCAB = 16, 2, 96

# DeepSeek-V2-Lite's attention at tiny size: no query latent, a key/value latent with its norm,
# YaRN RoPE with the config's scaling (examples/post_training/modelopt/conf/deepseek-ai/).
DEEPSEEK_MLA = dict(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8,
                    qk_pos_emb_head_dim=8, v_head_dim=12, qk_layernorm=True,
                    rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707)


def tiny(placement: str = "prenorm", **fields) -> ModelConfig:
    values = dict(norm_placement=placement, num_layers=2, hidden_size=64, num_attention_heads=4,
                  ffn_hidden_size=96, vocab_size=VOCAB, max_sequence_length=SEQ,
                  transformer_impl="local", init_method_std=0.1)
    values.update(fields)
    return ModelConfig.recommended(**values)


def inputs(seed: int = 0):
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))
    return ids, torch.arange(SEQ).expand(BATCH, SEQ)


def ours(config: ModelConfig, seed: int = 1234):
    from megatron.core import tensor_parallel

    from spannorm_megatron.model import build_gpt_model, transformer_config

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return build_gpt_model(config, transformer_config(config)).eval()


def megatron_reference(config: ModelConfig, layer_spec, seed: int = 1234, **gpt_kwargs):
    """megatron-core's own GPTModel from `layer_spec` (a megatron-core GPT layer spec) and the
    same TransformerConfig, its layers drawn from the same per-layer seeds as ours
    (model/seeding.py), so that the same seed gives the same weights."""
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel

    from spannorm_megatron.model import transformer_config
    from spannorm_megatron.model.seeding import seeded_layer

    layer_spec.module = seeded_layer(layer_spec.module)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return GPTModel(config=transformer_config(config), transformer_layer_spec=layer_spec,
                    vocab_size=config.vocab_size, max_sequence_length=config.max_sequence_length,
                    share_embeddings_and_output_weights=False,
                    position_embedding_type=config.position_embedding_type,
                    rotary_base=config.rotary_base, **gpt_kwargs).eval()


def assert_same_model(model, reference):
    """Same parameters (names, shapes, values) and the same logits."""
    mine, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, param in mine.items():
        assert torch.equal(param, theirs[name]), name
    ids, positions = inputs()
    with torch.no_grad():
        logits = model(ids, positions, attention_mask=None)
        expected = reference(ids, positions, attention_mask=None)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    return logits


# ------------------------------------------------------------------------------ parsing
def _parse(*flags):
    return parse_args(REQUIRED + list(flags))


def model_config(job, vocab_size):
    return dataclasses.replace(job.model, vocab_size=vocab_size)


def test_flags_parse_into_the_config_dataclasses():
    job = _parse("--kv-channels", "24", "--rotary-percent", "0.5", "--position-embedding-type",
                 "rope", "--ckpt-format", "torch_dist", "--mock-data",
                 "--no-create-attention-mask-in-dataloader")
    config = model_config(job, vocab_size=VOCAB)
    assert (config.kv_channels, config.resolved_kv_channels, config.rotary_percent) == (24, 24, 0.5)
    assert job.checkpoint.ckpt_format == "torch_dist"
    data = job.data
    assert data.mock_data and not data.create_attention_mask_in_dataloader
    # Megatron-LM's defaults: head width hidden / heads, all of it rotated, masks made.
    config = model_config(_parse(), vocab_size=VOCAB)
    assert (config.kv_channels, config.resolved_kv_channels, config.rotary_percent) == (None, 16,
                                                                                          1.0)
    assert config.resolved_rope_type == "rope" and not config.multi_latent_attention


def test_deepseek_v2_lite_attention_flags_parse():
    """The DeepSeek-V2-Lite config's attention flags (its sizes shrunk), as Megatron-LM fills
    MLATransformerConfig from them."""
    args = _parse("--position-embedding-type", "rope", "--normalization", "RMSNorm",
                  "--kv-channels", "16", "--multi-latent-attention", "--kv-lora-rank", "16",
                  "--v-head-dim", "12", "--qk-head-dim", "8", "--qk-layernorm",
                  "--qk-pos-emb-head-dim", "8", "--rotary-percent", "1.0", "--rotary-base",
                  "10000", "--rotary-scaling-factor", "40", "--mscale", "0.707",
                  "--mscale-all-dim", "0.707", "--transformer-impl", "local")
    config = model_config(args, vocab_size=VOCAB)
    assert config == ModelConfig(**{**dataclasses.asdict(config), **DEEPSEEK_MLA})
    assert config.resolved_rope_type == "yarn"  # MLATransformerConfig's default
    assert any("--kv-channels 16 is not read by multi-latent attention" in n
               for n in args.notices)
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from spannorm_megatron.model import transformer_config

    tconfig = transformer_config(config)
    assert type(tconfig) is MLATransformerConfig
    expected = dict(q_lora_rank=None, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=8,
                    v_head_dim=12, rope_type="yarn", rotary_base=10000, rotary_percent=1.0,
                    rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707,
                    qk_layernorm=True, kv_channels=16)
    assert {k: getattr(tconfig, k) for k in expected} == expected
    # The YaRN fields without a Megatron-LM flag keep megatron-core's defaults, as there.
    defaults = {f.name: f.default for f in dataclasses.fields(MLATransformerConfig)}
    for name in ("original_max_position_embeddings", "beta_fast", "beta_slow"):
        assert getattr(tconfig, name) == defaults[name]


def test_mla_only_flags_without_mla_are_named_once():
    args = _parse("--q-lora-rank", "8", "--rotary-scaling-factor", "4")
    assert any(n.startswith("--q-lora-rank 8, --rotary-scaling-factor 4.0: read only with "
                            "--multi-latent-attention") for n in args.notices)
    assert not any("multi-latent" in n for n in _parse().notices)


def test_position_embedding_spellings_as_megatron_lm():
    # --use-rotary-position-embeddings (deprecated) sets rope, before the next rule is checked.
    job = _parse("--use-rotary-position-embeddings", "--no-position-embedding")
    assert (job.model.position_embedding_type, job.spellings.add_position_embedding) == \
        ("rope", False)
    # Mixtral 8x7B's script: rope with --no-position-embedding, accepted.
    assert _parse("--position-embedding-type", "rope",
                  "--no-position-embedding").model.position_embedding_type == "rope"
    for other in ("learned_absolute", "none"):
        with pytest.raises(ConfigError, match=r"--no-position-embedding .* --position-"
                                              r"embedding-type rope .* this run has " + other):
            _parse("--position-embedding-type", other, "--no-position-embedding")
    # A YAML key says the same as the flag.
    import yaml

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mf-{os.getpid()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"no-position-embedding": True}, f)
    try:
        with pytest.raises(ConfigError, match="--no-position-embedding"):
            _parse("--config", path)
    finally:
        os.remove(path)


@pytest.mark.parametrize("flags,message", [
    (["--rotary-percent", "1.5"], r"--rotary-percent 1.5 is above 1"),
    (["--rotary-percent", "0"], r"--rotary-percent.*must be > 0"),
    (["--rope-type", "yarn", "--position-embedding-type", "rope"],
     r"--rope-type yarn is implemented by megatron-core's multi-latent attention only"),
    (["--multi-latent-attention", "--group-query-attention", "--num-query-groups", "2"],
     r"--multi-latent-attention and --group-query-attention"),
    (["--kv-channels", "0"], r"--kv-channels.*must be >= 1"),
    (["--hidden-size", "66"], r"not divisible by num_attention_heads=4.*--kv-channels"),
])
def test_bad_combinations_are_refused_naming_the_flag(flags, message):
    from spannorm_megatron.errors import UserError

    with pytest.raises(UserError, match=message):
        _parse(*flags)


def test_mock_data_and_a_data_path_are_refused_together(tmp_path):
    from _path_kinds import make_good

    from spannorm_megatron.errors import DataError

    prefix = make_good("data_prefix", tmp_path / "data")
    with pytest.raises(DataError, match=r"--mock-data.*several given"):
        _parse("--mock-data", "--data-path", prefix)


def test_hidden_size_need_not_divide_by_heads_with_kv_channels():
    config = model_config(_parse("--hidden-size", "66", "--kv-channels", "16"), vocab_size=VOCAB)
    assert config.resolved_kv_channels == 16


def test_sequence_parallel_at_tp1_is_turned_off_as_megatron_lm_does():
    """Megatron-LM's scripts pass --sequence-parallel at TP1 (Llama-3, Mixtral, Qwen3,
    DeepSeek-V2-Lite); its validate_args turns it off there, and so does ParallelConfig (the
    flag still stores what Megatron-LM's parser stores), saying so once."""
    job = _parse("--sequence-parallel")
    assert job.flags["sequence_parallel"] and not job.parallel.sequence_parallel
    assert any(n.startswith("--sequence-parallel with --tensor-model-parallel-size 1")
               for n in job.notices)
    job = _parse("--sequence-parallel", "--tensor-model-parallel-size", "2")
    assert job.parallel.sequence_parallel
    assert not any("--sequence-parallel" in n for n in job.notices)


@pytest.mark.parametrize("fmt,reason", [
    ("torch", "legacy per-rank torch.save format"),
    ("torch_dcp", "--use-torch-fsdp2"),
    ("fsdp_dtensor", "--use-megatron-fsdp"),
])
def test_ckpt_formats_other_than_torch_dist_are_refused_by_name(fmt, reason):
    with pytest.raises(ConfigError, match=rf"--ckpt-format {fmt} is Megatron-LM's, but not "
                                          rf"available here: .*{reason}.*torch_dist"):
        _parse("--ckpt-format", fmt)
    assert _parse().checkpoint.ckpt_format == "torch_dist"  # Megatron-LM's default, what we write


# ------------------------------------------------------------------ the model against megatron-core
def test_kv_channels_and_rotary_percent_match_megatron_cores_gpt(seeded):
    """A head width of 24 on a 64-wide model (4 x 24 != 64) with half of each head rotated:
    our prenorm model is megatron-core's get_gpt_layer_local_spec GPTModel with
    TransformerConfig.kv_channels=24 and GPTModel(rotary_percent=0.5)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = tiny(kv_channels=24, rotary_percent=0.5, num_query_groups=2)
    model = ours(config)
    assert model.config.kv_channels == 24
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert tuple(qkv.shape) == ((4 + 2 * 2) * 24, 64)
    # RoPE over int(24 x 0.5) = 12 dimensions: 6 frequencies.
    assert model.rotary_pos_emb.inv_freq.numel() == 6
    reference = megatron_reference(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                                   rotary_percent=0.5)
    logits = assert_same_model(model, reference)
    # The flag acts: rotating whole heads changes the function of the same weights.
    whole = ours(dataclasses.replace(config, rotary_percent=1.0))
    whole.load_state_dict(model.state_dict())
    ids, positions = inputs()
    with torch.no_grad():
        assert (whole(ids, positions, attention_mask=None) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("variant", [
    dict(DEEPSEEK_MLA),                                              # DeepSeek-V2-Lite: YaRN
    dict(DEEPSEEK_MLA, q_lora_rank=24),                              # a query latent (V3)
    dict(DEEPSEEK_MLA, q_lora_rank=24, rope_type="rope", rotary_percent=0.5,
         qk_layernorm=False),
], ids=["v2-lite-yarn", "q-latent-yarn", "q-latent-rope-partial"])
def test_mla_prenorm_matches_megatron_cores_mla_spec(seeded, variant):
    """Same seed, same weights, same logits as megatron-core's get_gpt_layer_local_spec(
    multi_latent_attention=True). megatron-core 0.16.1 cannot build that spec as it is on a
    machine without Transformer Engine and a GPU (see spannorm_megatron/model/mla.py): its
    MLASelfAttention module is taken as our constructible subclass and its core attention as
    our MLADotProductAttention; everything else (linears, norms, layer) is megatron-core's spec."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from spannorm_megatron.model.mla import MLADotProductAttention, MLASelfAttention

    config = tiny(**variant)
    model = ours(config)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, normalization="RMSNorm",
                                    qk_layernorm=config.qk_layernorm)
    attention = spec.submodules.self_attention
    attention.module = MLASelfAttention
    attention.submodules.core_attention = MLADotProductAttention
    reference = megatron_reference(config, spec)
    assert_same_model(model, reference)
    layer = model.decoder.layers[0].self_attention
    assert isinstance(layer, MLASelfAttention)
    from megatron.core.models.common.embeddings import YarnRotaryEmbedding

    assert isinstance(layer.rotary_pos_emb, YarnRotaryEmbedding) == (
        config.resolved_rope_type == "yarn")


def test_mla_flags_act(seeded):
    """Each MLA flag changes the model: the shapes of the projections, the YaRN scaling and
    mscale (the softmax scale and the rotary embedding)."""
    base = ours(tiny(**DEEPSEEK_MLA))
    attention = base.decoder.layers[0].self_attention
    shapes = {n: tuple(p.shape) for n, p in attention.named_parameters()}
    assert shapes == {
        "linear_q_proj.weight": (4 * (8 + 8), 64),
        "linear_kv_down_proj.weight": (16 + 8, 64),
        "linear_kv_up_proj.weight": (4 * (8 + 12), 16),
        "kv_layernorm.weight": (16,),
        "linear_proj.weight": (64, 4 * 12),
    }
    # mscale_all_dim with a scaling factor > 1: softmax scale mscale^2 / sqrt(q head width).
    import math

    mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert attention.softmax_scale == pytest.approx(mscale * mscale / math.sqrt(16))
    ids, positions = inputs()
    with torch.no_grad():
        logits = base(ids, positions, attention_mask=None)
        for change in (dict(rotary_scaling_factor=1.0), dict(mscale=1.0),
                       dict(mscale_all_dim=0.0)):
            other = ours(tiny(**{**DEEPSEEK_MLA, **change}))
            other.load_state_dict(base.state_dict())
            moved = (other(ids, positions, attention_mask=None) - logits).abs().max()
            assert moved > 1e-4, change


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_mla_is_the_attention_of_every_placement(seeded, placement):
    """The placement's norms around megatron-core's MLA; forward and backward run, every
    parameter gets a gradient."""
    from spannorm_megatron.model.mla import MLASelfAttention

    config = tiny(placement, **DEEPSEEK_MLA, q_lora_rank=24)
    model = ours(config).train()
    for layer in model.decoder.layers:
        assert isinstance(layer.self_attention, MLASelfAttention)
    plain = ours(tiny(placement))
    norms = lambda m: sorted(n for n, _ in m.named_parameters()  # noqa: E731
                             if "norm" in n and "self_attention" not in n)
    assert norms(model) == norms(plain)  # the placement's norm slots, unchanged
    ids, positions = inputs()
    model(ids, positions, attention_mask=None, labels=ids).float().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_deepnorm_scales_mla_values_like_the_value_projection(seeded):
    """DeepNet divides the value projection by (8L)^(1/4): with MLA, the value rows of the
    key/value up projection (the key rows keep the base init)."""
    shape = dict(DEEPSEEK_MLA, scale_init="none")
    deep = ours(tiny("deepnorm", **shape))
    post = ours(tiny("postnorm", **shape))  # the same draws, without DeepNet's scaling
    beta = (8 * 2) ** 0.25
    for d, p in zip(deep.decoder.layers, post.decoder.layers):
        kv_d = d.self_attention.linear_kv_up_proj.weight.view(4, 8 + 12, -1)
        kv_p = p.self_attention.linear_kv_up_proj.weight.view(4, 8 + 12, -1)
        assert torch.equal(kv_d[:, :8], kv_p[:, :8])
        torch.testing.assert_close(kv_d[:, 8:], kv_p[:, 8:] / beta)
        torch.testing.assert_close(d.self_attention.linear_proj.weight,
                                   p.self_attention.linear_proj.weight / beta)


def test_mla_transformer_engine_spec_is_megatron_cores():
    """The Transformer Engine flavour (classes stand in without TE; the GPU runs them): TE's
    replicated linear for the down projections, the latent norms fused into the up
    projections, TE attention, and the input norm standalone (both projections read it)."""
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.transformer.identity_op import IdentityOp

    from spannorm_megatron.model.specs import layer_spec

    for q_lora_rank in (None, 24):
        sub = layer_spec(tiny(**DEEPSEEK_MLA, q_lora_rank=q_lora_rank),
                         transformer_engine=True).submodules
        assert sub.input_layernorm is te.TENorm and sub.pre_mlp_layernorm is IdentityOp
        mla = sub.self_attention.submodules
        assert (mla.linear_q_down_proj, mla.linear_kv_down_proj) == (te.TELinear, te.TELinear)
        assert mla.linear_q_up_proj is te.TELayerNormColumnParallelLinear
        assert mla.linear_kv_up_proj is te.TELayerNormColumnParallelLinear
        assert mla.linear_q_proj is te.TEColumnParallelLinear
        assert mla.core_attention is te.TEDotProductAttention
        assert (mla.q_layernorm, mla.kv_layernorm) == (IdentityOp, IdentityOp)
        assert sub.sharded_state_dict_keys_map == {}


def test_mla_local_checkpoint_keys_are_the_fused_names_and_round_trip(seeded, tmp_path):
    from megatron.core import dist_checkpointing

    config = tiny("spannorm", **DEEPSEEK_MLA, q_lora_rank=24)
    saved = ours(config)
    keys = {t.key for t in saved.sharded_state_dict().values()}
    assert {"decoder.layers.self_attention.linear_q_up_proj.layer_norm_weight",
            "decoder.layers.self_attention.linear_kv_up_proj.layer_norm_weight"} <= keys
    assert not any("q_layernorm" in k or "kv_layernorm" in k for k in keys)
    dist_checkpointing.save(saved.sharded_state_dict(), str(tmp_path))
    fresh = ours(config, seed=99)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), str(tmp_path)))
    for name, param in fresh.named_parameters():
        assert torch.equal(param, dict(saved.named_parameters())[name]), name


def test_mla_tensor_parallel_sizes_are_checked():
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.errors import ParallelLayoutError
    from spannorm_megatron.model.partition import check_model_fits_layout

    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    check_model_fits_layout(tiny(**DEEPSEEK_MLA, q_lora_rank=24), tp2)
    with pytest.raises(ParallelLayoutError, match=r"kv_lora_rank \+ qk_pos_emb_head_dim=25"):
        check_model_fits_layout(tiny(**{**DEEPSEEK_MLA, "kv_lora_rank": 17}), tp2)
    with pytest.raises(ParallelLayoutError, match=r"q_lora_rank=25"):
        check_model_fits_layout(tiny(**DEEPSEEK_MLA, q_lora_rank=25), tp2)


# ------------------------------------------------------------------------------------ data
def _datasets(tokenizer, **fields):
    from spannorm_megatron.config.data import DataConfig
    from spannorm_megatron.data.dataset import build_gpt_datasets

    config = DataConfig(seq_length=SEQ, mock_data=True, **fields)
    return config, build_gpt_datasets(config, tokenizer, [8, 4, 4])


@pytest.mark.slow
def test_mock_data_is_megatron_cores_mock_dataset(seeded):
    """--mock-data: megatron-core's MockGPTDataset from the tokenizer's vocabulary and end of
    document token, no files; the same samples as megatron-core builds from its own config."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    from spannorm_megatron.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("ByteLevelTokenizer", None)
    config, (train, valid, test) = _datasets(tokenizer)
    assert all(isinstance(d, MockGPTDataset) for d in (train, valid, test))
    direct = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [8, 4, 4], lambda: True,
        GPTDatasetConfig(random_seed=config.seed, sequence_length=SEQ, blend=None,
                         blend_per_split=None, split=None, path_to_cache=None,
                         tokenizer=tokenizer, reset_position_ids=False,
                         reset_attention_mask=False, eod_mask_loss=False,
                         create_attention_mask=True)).build()
    for ours_split, theirs in zip((train, valid, test), direct):
        assert len(ours_split) == len(theirs)  # megatron-core draws a whole mock epoch
        for i in range(16):
            a, b = ours_split[i], theirs[i]
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)
    # The mock documents: counting ids, each ended by the end-of-document token.
    tokens = train[0]["tokens"].tolist()
    assert tokenizer.eod in tokens or all(b - a == 1 for a, b in zip(tokens, tokens[1:]))


@pytest.mark.slow
def test_attention_mask_in_dataloader_reaches_the_model_with_the_same_numbers(seeded):
    """Megatron-LM's default: every sample carries its causal mask, forward_step hands it to the
    model; --no-create-attention-mask-in-dataloader drops it and the attention makes the same
    mask itself: the same loss, bit for bit."""
    from spannorm_megatron.data.loader import build_data_loader, iterate_batches
    from spannorm_megatron.data.tokenizer import build_tokenizer
    from spannorm_megatron.training.gpt_step import forward_step

    tokenizer = build_tokenizer("ByteLevelTokenizer", None)
    _, (with_mask, _, _) = _datasets(tokenizer)
    _, (without, _, _) = _datasets(tokenizer, create_attention_mask_in_dataloader=False)
    masked = next(iterate_batches(build_data_loader(with_mask, 0, BATCH)))
    plain = next(iterate_batches(build_data_loader(without, 0, BATCH)))
    assert "attention_mask" not in plain
    assert torch.equal(masked["attention_mask"],
                       ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril().expand(BATCH, 1, SEQ, SEQ))
    assert all(torch.equal(masked[k], plain[k]) for k in plain)

    model = ours(tiny(vocab_size=tokenizer.vocab_size))
    seen = []
    hook = model.decoder.layers[0].self_attention.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    losses = []
    for batch in (masked, plain):
        output, loss_func = forward_step(iter([batch]), model)
        losses.append(output)
    hook.remove()
    assert seen[0] is not None and torch.equal(seen[0], masked["attention_mask"])
    assert seen[1] is None
    assert torch.equal(losses[0], losses[1])
    # A mask that is not causal would change the numbers: the model does read it.
    other = dict(masked, attention_mask=torch.zeros_like(masked["attention_mask"]))
    assert not torch.equal(forward_step(iter([other]), model)[0], losses[0])


# ------------------------------------------------------------------------------- FLOPs
def megatron_lm_attention_flops(cfg: ModelConfig, seq: int) -> float:
    """Megatron-LM core_v0.16.1's `num_floating_point_operations` self-attention term of one
    layer and one token (training: 3 x 2 x the GEMMs), transcribed in its own form."""
    expansion = 3 * 2
    h, n = cfg.hidden_size, cfg.num_attention_heads
    if cfg.multi_latent_attention:
        if cfg.q_lora_rank is None:
            q_term = h * n * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim)
        else:
            q_term = cfg.q_lora_rank * (h + n * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim) + 1)
        return expansion * (
            q_term
            + cfg.kv_lora_rank * (h + n * (cfg.qk_head_dim + cfg.v_head_dim) + 1)
            + h * cfg.qk_pos_emb_head_dim
            + (n * cfg.v_head_dim) * h
            + seq * (n * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim)) / 2
            + seq * n * cfg.v_head_dim / 2)
    query = cfg.resolved_kv_channels * n
    key = value = cfg.resolved_kv_channels * cfg.resolved_num_query_groups
    return expansion * (h * (query + key + value) + query * seq / 2 * 2 + query * h)


@pytest.mark.parametrize("fields", [
    dict(kv_channels=128, num_query_groups=4),                       # Qwen3-30B-A3B's heads
    dict(DEEPSEEK_MLA, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
         v_head_dim=128),                                            # DeepSeek-V2-Lite
    dict(DEEPSEEK_MLA, q_lora_rank=1536, kv_lora_rank=512, qk_head_dim=128,
         qk_pos_emb_head_dim=64, v_head_dim=128),                    # DeepSeek-V3
], ids=["kv-channels", "mla", "mla-q-latent"])
def test_attention_flops_are_megatron_lms(fields):
    """Our FLOPs count is Megatron-LM's for these attentions (less MLA's latent-norm terms,
    which it counts and we leave out with every other norm)."""
    from spannorm_megatron.metrics.flops import forward_flops

    config = tiny(hidden_size=2048, num_attention_heads=32, **fields)
    seq = 4096
    fwd = forward_flops(config, seq)
    norms = 3 * 2 * ((config.q_lora_rank or 0) + config.kv_lora_rank) \
        if config.multi_latent_attention else 0
    assert 3 * fwd.attention == pytest.approx(megatron_lm_attention_flops(config, seq) - norms,
                                              rel=1e-12)


# ------------------------------------------------------------------- run record and HF reader
def test_records_written_before_the_new_fields_still_load_as_the_same_model():
    """A run record's model_config without the new fields (written before them) is the same
    architecture as today's default: the defaults reproduce the old model."""
    from spannorm_megatron.checkpoint import run_record

    new = {"kv_channels", "rotary_percent", "rope_type", "multi_latent_attention", "q_lora_rank",
           "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
           "rotary_scaling_factor", "mscale", "mscale_all_dim"}
    current = tiny()
    old_record = {"model_config": {k: v for k, v in run_record.jsonable(current.to_dict()).items()
                                   if k not in new}}
    assert new <= set(current.to_dict())
    saved = run_record.saved_model_config(old_record, "an old run.json")
    assert run_record.compare(saved, current) == ([], [])
    # kv_channels = hidden / heads is the old model too (only logged as another spelling).
    arch, _ = run_record.compare(saved, dataclasses.replace(current, kv_channels=16))
    assert arch == []
    for change, field in ((dict(kv_channels=24), "kv_channels"),
                          (dict(rotary_percent=0.5), "rotary_percent"),
                          (DEEPSEEK_MLA, "multi_latent_attention")):
        arch, _ = run_record.compare(saved, tiny(**change))
        assert field in [name for name, _, _ in arch], change


@pytest.mark.parametrize("fields", [dict(kv_channels=24, num_query_groups=2),
                                    dict(DEEPSEEK_MLA, q_lora_rank=24),
                                    dict(DEEPSEEK_MLA, normalization="LayerNorm",
                                         add_bias_linear=True)],
                         ids=["kv-channels", "mla-q-latent", "mla-layernorm-bias"])
def test_hf_reader_layout_is_the_models_state_dict(seeded, fields):
    """The names and shapes the HF reader expects (hf/layout.py) are the model's, and every
    checkpoint key it reads is one the model saves."""
    from spannorm_megatron.hf.layout import CheckpointLayout

    config = tiny("spannorm", **fields)
    model = ours(config)
    layout = CheckpointLayout(config)
    expected = dict(layout.all_params())
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items() if "_extra_state" not in k}
    assert expected == actual
    saved = [t for t in model.sharded_state_dict().values() if "_extra_state" not in t.key]
    keys = layout.expected_keys()
    assert set(keys) == {t.key for t in saved}
    for t in saved:  # SwiGLU's fc1 is saved through a factory (two halves) without one shape
        if hasattr(t, "global_shape"):
            assert keys[t.key] == t.global_shape, t.key


def _export(tmp_path, config, seed=0, **kwargs):
    import _hf

    from spannorm_megatron.hf.export import export_checkpoint

    model = _hf.build(config, seed=seed)
    ckpt = _hf.save([model], config, str(tmp_path / "ckpt"))
    result = export_checkpoint(ckpt, str(tmp_path / "hf"), log=lambda line: None, **kwargs)
    return model, result


@pytest.mark.parametrize("fields,architecture", [
    (dict(norm_placement="prenorm", kv_channels=24, num_query_groups=2), "LlamaForCausalLM"),
    # Qwen3-30B-A3B's shape of attention: wider heads than hidden / heads, q/k norms, MoE.
    (dict(norm_placement="prenorm", kv_channels=24, num_query_groups=2, qk_layernorm=True,
          num_experts=4, moe_ffn_hidden_size=32), "Qwen3MoeForCausalLM"),
    (dict(norm_placement="spannorm", kv_channels=24), "SpanNormForCausalLM"),
    (dict(norm_placement="prenorm", kv_channels=24, rotary_percent=0.5), "SpanNormForCausalLM"),
], ids=["llama-kv-channels", "qwen3-moe-kv-channels", "own-kv-channels",
        "own-rotary-percent"])
def test_hf_export_of_head_width_and_partial_rope(seeded, tmp_path, fields, architecture):
    """--kv-channels exports as head_dim (native or our class); --rotary-percent < 1 to our own
    class, which rotates the same dimensions as megatron-core: logits within 1e-4."""
    from transformers import AutoModelForCausalLM

    import _hf

    config = tiny(**fields)
    model, result = _export(tmp_path, config)
    assert result.architecture == architecture
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=architecture == "SpanNormForCausalLM").eval()
    assert hf.config.head_dim == 24
    ids, _ = inputs()
    with torch.no_grad():
        err = (hf(input_ids=ids, use_cache=False).logits.float()
               - _hf.megatron_logits(model, ids)).abs().max()
    assert err <= 1e-4
    if fields.get("rotary_percent"):
        assert "rotary_percent=0.5" in " ".join(result.notes)
    # And back: the HF folder imports as the same megatron model, tensor for tensor.
    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.hf.megatron_reader import load_megatron_state

    convert_hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "back"), log=lambda line: None)
    back, state = load_megatron_state(str(tmp_path / "back"))
    assert (back.resolved_kv_channels, back.rotary_percent) == (24, config.rotary_percent)
    original = _hf.state_of(model)
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name


def test_hf_export_refuses_mla_naming_it(seeded, tmp_path):
    from spannorm_megatron.hf.errors import ConversionError

    with pytest.raises(ConversionError, match=r"cannot be exported: multi_latent_attention=True "
                                              r"\(multi-latent attention"):
        _export(tmp_path, tiny(**DEEPSEEK_MLA))
    assert not (tmp_path / "hf").exists()


def test_native_export_names_partial_rope():
    from spannorm_megatron.hf.rules import native_problems

    assert any(p.startswith("rotary_percent=0.5") for p in native_problems(
        tiny(rotary_percent=0.5)))
    assert not native_problems(tiny(kv_channels=24))


# ------------------------------------------------------------------------- a training run
DEEPSEEK_V2_LITE_TINY = [
    # examples/post_training/modelopt/conf/deepseek-ai/DeepSeek-V2-Lite.sh, sizes shrunk; the
    # flags it shares with the project's recipe are given by RECIPE.
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu",
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96",
    "--num-attention-heads", "4", "--kv-channels", "16", "--multi-latent-attention",
    "--kv-lora-rank", "16", "--v-head-dim", "16", "--qk-head-dim", "16", "--qk-layernorm",
    "--qk-pos-emb-head-dim", "8", "--num-experts", "4", "--moe-layer-freq", "([0]+[1]*1)",
    "--moe-ffn-hidden-size", "32", "--moe-router-score-function", "softmax",
    "--moe-router-topk", "2", "--moe-router-topk-scaling-factor", "1.0",
    "--moe-router-pre-softmax", "--moe-shared-expert-intermediate-size", "64",
    "--moe-aux-loss-coeff", "1e-3", "--moe-token-dispatcher-type", "alltoall",
    "--moe-token-drop-policy", "probs", "--moe-router-load-balancing-type", "seq_aux_loss",
    "--seq-length", "32", "--max-position-embeddings", "32", "--rotary-percent", "1.0",
    "--rotary-base", "10000", "--rotary-scaling-factor", "40", "--mscale", "0.707",
    "--mscale-all-dim", "0.707", "--sequence-parallel",
]


def test_deepseek_v2_lite_recipe_trains_on_two_ranks_and_its_checkpoint_reads(megatron_world,
                                                                                tmp_path,
                                                                                torchrun):
    """One 2-rank run: MLA (YaRN, latent norms) in MoE layers under TP2 + sequence parallelism
    on megatron-core's mock data, with the Llama-3 script's data and checkpoint flags. The loss
    falls; the TP2 checkpoint is read back into one process by the HF reader (the layout of
    its MLA tensors) and gives the run's own validation loss; its export is refused by name."""
    save = tmp_path / "ckpt"
    flags = [*RECIPE, *DEEPSEEK_V2_LITE_TINY, "--tokenizer-type", "ByteLevelTokenizer",
             "--tensor-model-parallel-size", "2", "--mock-data",
             "--no-create-attention-mask-in-dataloader", "--ckpt-format", "torch_dist",
             "--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "30",
             "--lr", "3e-3", "--lr-warmup-iters", "2", "--log-interval", "1",
             "--eval-interval", "1000", "--eval-iters", "2", "--save", str(save)]
    result = run_train(*flags, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--kv-channels 16 is not read by multi-latent attention" in result.stdout
    losses = logged_losses(result.stdout)
    assert len(losses) == 30
    first, last = sum(losses[i] for i in (1, 2, 3)) / 3, sum(losses[i] for i in (28, 29, 30)) / 3
    assert last < first - 1.0, losses

    from spannorm_megatron.checkpoint import read_run_record
    from spannorm_megatron.hf.megatron_reader import load_megatron_model

    record = read_run_record(str(save / "iter_0000030"))
    assert record["model_config"]["multi_latent_attention"] is True
    assert record["layout"]["tensor_model_parallel_size"] == 2
    config, model = load_megatron_model(str(save))
    assert config.multi_latent_attention and config.kv_lora_rank == 16
    # The run's final validation: its 2 batches of 4 mock samples, through the one-process model.
    from spannorm_megatron.config.data import DataConfig
    from spannorm_megatron.data.dataset import build_gpt_datasets, num_samples_for
    from spannorm_megatron.data.loader import build_data_loader, iterate_batches
    from spannorm_megatron.data.tokenizer import build_tokenizer

    data = DataConfig(seq_length=32, mock_data=True, create_attention_mask_in_dataloader=False)
    _, valid, _ = build_gpt_datasets(data, build_tokenizer("ByteLevelTokenizer"),
                                     num_samples_for(30, 4, 1000, 2))
    total = count = 0.0
    model.eval()
    with torch.no_grad():
        for _, batch in zip(range(2), iterate_batches(build_data_loader(valid, 0, 4))):
            per_token = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                              labels=batch["labels"])
            total += float((per_token * batch["loss_mask"]).sum())
            count += float(batch["loss_mask"].sum())
    line = next(l for l in result.stdout.splitlines() if "validation loss at iteration 30" in l)
    logged = float(line.split("lm loss value: ")[1].split()[0])
    assert total / count == pytest.approx(logged, rel=1e-4)
    from spannorm_megatron.hf.errors import ConversionError
    from spannorm_megatron.hf.export import export_checkpoint

    with pytest.raises(ConversionError, match="multi_latent_attention=True"):
        export_checkpoint(str(save), str(tmp_path / "hf"), log=lambda line: None)


# ------------------------------------------------------- Transformer Engine (GPU machines only)
def _needs_te():
    from spannorm_megatron.model.specs import transformer_engine_available

    expect = os.environ.get("SPANNORM_EXPECT_TE") == "1"
    return pytest.mark.skipif(not (transformer_engine_available() or expect),
                              reason="needs Transformer Engine and a GPU (docs/gpu.md)")


@_needs_te()
@pytest.mark.parametrize("q_lora_rank", [None, 64], ids=["v2-lite", "q-latent"])
@pytest.mark.parametrize("placement", ["prenorm", "spannorm"])
def test_transformer_engine_mla_matches_the_local_mla(seeded, tmp_path, placement, q_lora_rank):
    """The same weights, moved through a dist checkpoint (the local latent norms are saved under
    the fused names), give the same bf16 logits from Transformer Engine's MLA modules (fused
    latent norms, replicated down projections, TE attention) and from the local ones."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from spannorm_megatron.model import build_gpt_model, transformer_config

    bf16 = dict(bf16=True, params_dtype=torch.bfloat16)
    local_config = tiny(placement, **{**DEEPSEEK_MLA, "kv_lora_rank": 64, "qk_head_dim": 32,
                                      "qk_pos_emb_head_dim": 16, "v_head_dim": 32},
                        q_lora_rank=q_lora_rank, hidden_size=256, num_attention_heads=8,
                        vocab_size=512, max_sequence_length=128)
    te_config = dataclasses.replace(local_config, transformer_impl="transformer_engine")
    local = build_gpt_model(local_config, transformer_config(local_config, **bf16)).eval()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    fused = build_gpt_model(te_config, transformer_config(te_config, **bf16)).eval()
    wanted = {k: v for k, v in fused.sharded_state_dict().items()
              if not (isinstance(v, ShardedObject) and "_extra_state" in k)}
    missing, unexpected = fused.load_state_dict(dist_checkpointing.load(wanted, str(tmp_path)),
                                                strict=False)
    assert not unexpected and all("_extra_state" in key for key in missing), missing
    tokens = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(0)).cuda()
    positions = torch.arange(128, device="cuda").expand(2, -1)
    with torch.no_grad():
        expected = local(tokens, positions, None).float()
        actual = fused(tokens, positions, None).float()
    error = (actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert error < 2e-2, float(error)
