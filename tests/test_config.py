"""The registry and ModelConfig validation: bad input fails early with a message naming the fix."""

import subprocess
import sys

import pytest

from spannorm_megatron.config import ConfigError, ModelConfig
from spannorm_megatron.model import PLACEMENTS, get_placement


def test_registry_rejects_unknown_placement_listing_known_ones():
    with pytest.raises(ConfigError) as error:
        get_placement("sandwich")
    message = str(error.value)
    assert "'sandwich'" in message
    for name in PLACEMENTS:
        assert name in message


def test_registry_final_norm_rule_follows_contract():
    assert {name: p.final_norm for name, p in PLACEMENTS.items()} == {
        "prenorm": True, "postnorm": False, "spannorm": False,
    }
    assert get_placement("spannorm").default_scale_init == "sqrt_depth"
    assert get_placement("prenorm").default_scale_init == "megatron"


@pytest.mark.parametrize(
    "values,field,fix",
    [
        (dict(norm_placement="nope"), "norm_placement", "choose one of"),
        (dict(num_attention_heads=8, hidden_size=64, num_query_groups=3), "num_query_groups",
         "[1, 2, 4, 8]"),
        (dict(num_experts=4, moe_router_topk=5), "moe_router_topk", "lower moe_router_topk"),
        (dict(scale_init=0), "scale_init", "must be positive"),
        (dict(scale_init=-1.5), "scale_init", "must be positive"),
        (dict(scale_init="sqrt"), "scale_init", "sqrt_depth"),
        (dict(hidden_size=100, num_attention_heads=3), "hidden_size", "multiple of the head count"),
        (dict(normalization="BatchNorm"), "normalization", "RMSNorm"),
        (dict(norm_placement="prenorm", scale_mode="forward"), "scale_mode", "scale_mode='init'"),
        (dict(num_layers=0), "num_layers", "positive integer"),
    ],
)
def test_bad_config_names_field_and_fix(values, field, fix):
    with pytest.raises(ConfigError) as error:
        ModelConfig(**values)
    assert field in str(error.value)
    assert fix in str(error.value)


def test_bad_config_fails_before_any_process_group_work():
    """A fresh interpreter: the error comes from the config alone, with no distributed setup."""
    code = (
        "import torch.distributed as dist\n"
        "from spannorm_megatron.config import ModelConfig, ConfigError\n"
        "try:\n"
        "    ModelConfig(num_experts=2, moe_router_topk=3)\n"
        "except ConfigError as e:\n"
        "    assert not dist.is_initialized()\n"
        "    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: moe_router_topk=3 is larger than num_experts=2" in result.stdout


def test_numeric_scale_init_accepted_and_round_trips():
    config = ModelConfig(scale_init="0.5")
    assert config.scale_init == 0.5
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="Unknown ModelConfig field"):
        ModelConfig.from_dict({"hiden_size": 3})
