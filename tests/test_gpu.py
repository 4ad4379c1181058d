"""The GPU path: Transformer Engine layers against the local ones, and FP8 training.

These run where Transformer Engine and a GPU are present (docs/gpu.md brings Transformer Engine
onto a machine without network) and are skipped elsewhere, CI included.
"""

from dataclasses import replace

import pytest
import torch

from _training import logged_losses, run_train
from spannorm_megatron.config import ModelConfig
from spannorm_megatron.model import PLACEMENTS, build_gpt_model, transformer_config
from spannorm_megatron.model.specs import transformer_engine_available

pytestmark = pytest.mark.skipif(not transformer_engine_available(),
                                reason="needs Transformer Engine and a GPU (docs/gpu.md)")

BF16 = dict(bf16=True, params_dtype=torch.bfloat16)
RELATIVE_RMS_TOLERANCE = 2e-2  # bf16 rounding through 4 layers, different kernels


def _without_extra_state(sharded):
    """The local flavour has no Transformer Engine extra state (FP8 metadata) to load."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return {key: value for key, value in sharded.items()
            if not (isinstance(value, ShardedObject) and "_extra_state" in key)}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_transformer_engine_layers_match_the_local_layers(seeded, tmp_path, placement, moe):
    """The same weights (moved through a dist checkpoint, whose keys both flavours share) give
    the same logits in bf16 from Transformer Engine's fused modules and from the local ones."""
    from megatron.core import dist_checkpointing

    local_config = ModelConfig(norm_placement=placement, num_layers=4, hidden_size=256,
                               num_attention_heads=8, vocab_size=512, max_sequence_length=128,
                               transformer_impl="local", num_experts=4 if moe else None)
    te_config = replace(local_config, transformer_impl="transformer_engine")
    local = build_gpt_model(local_config, transformer_config(local_config, **BF16)).eval()
    dist_checkpointing.save(local.sharded_state_dict(), str(tmp_path))
    fused = build_gpt_model(te_config, transformer_config(te_config, **BF16)).eval()
    loaded = dist_checkpointing.load(_without_extra_state(fused.sharded_state_dict()),
                                     str(tmp_path))
    missing, unexpected = fused.load_state_dict(loaded, strict=False)
    assert not unexpected and all("_extra_state" in key for key in missing), missing

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 128), generator=generator).cuda()
    positions = torch.arange(128, device="cuda").expand(2, -1)
    with torch.no_grad():
        expected = local(tokens, positions, None).float()
        actual = fused(tokens, positions, None).float()
    error = (actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert error < RELATIVE_RMS_TOLERANCE, float(error)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
@pytest.mark.parametrize("placement", ["prenorm", "spannorm"])
def test_fp8_training_lowers_the_loss(corpus, placement, recipe):
    data, tokenizer = corpus
    result = run_train(
        "--data-path", data, "--tokenizer-model", tokenizer, "--norm-placement", placement,
        "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8",
        "--seq-length", "128", "--micro-batch-size", "8", "--train-iters", "60",
        "--lr", "1e-3", "--lr-warmup-iters", "5", "--log-interval", "10",
        "--eval-interval", "1000", "--eval-iters", "1", "--split", "90,10,0",
        "--transformer-impl", "transformer_engine", "--bf16", "--fp8-format", "hybrid",
        "--fp8-recipe", recipe, nproc=1)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = logged_losses(result.stdout)
    assert sorted(losses) == [10, 20, 30, 40, 50, 60]
    assert losses[60] < losses[10] - 0.5, losses
