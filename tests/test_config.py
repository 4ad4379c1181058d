"""The registry and ModelConfig validation: bad input fails early with a message naming the fix."""

import os
import subprocess
import sys

import pytest
import torch

from launch import ROOT
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.placements import PLACEMENTS, get_placement
from spannorm_megatron.training.arguments import parse_args


def test_registry_rejects_unknown_placement_listing_known_ones():
    with pytest.raises(ConfigError) as error:
        get_placement("sandwich")
    message = str(error.value)
    assert "'sandwich'" in message
    for name in PLACEMENTS:
        assert name in message


def test_registry_final_norm_rule_follows_contract():
    assert {name: p.final_norm for name, p in PLACEMENTS.items()} == {
        "prenorm": True, "postnorm": False, "spannorm": False, "deepnorm": False,
        "perinorm": True, "spannorm_clean": True,
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
        (dict(num_layers=0), "num_layers", "must be >= 1"),
        (dict(num_experts=4, add_bias_linear=True, moe_shared_expert_intermediate_size=64),
         "add_bias_linear", "drop one of them"),
    ],
)
def test_bad_config_names_field_and_fix(values, field, fix):
    with pytest.raises(ConfigError) as error:
        ModelConfig.recommended(**values)
    assert field in str(error.value)
    assert fix in str(error.value)


@pytest.mark.slow
def test_bad_config_fails_before_any_process_group_work():
    """A fresh interpreter: the error comes from the config alone, with no distributed setup."""
    code = (
        "import torch.distributed as dist\n"
        "from spannorm_megatron.config.model import ModelConfig\n"
        "from spannorm_megatron.errors import ConfigError\n"
        "try:\n"
        "    ModelConfig.recommended(num_experts=2, moe_router_topk=3)\n"
        "except ConfigError as e:\n"
        "    assert not dist.is_initialized()\n"
        "    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "refused: moe_router_topk=3 is larger than num_experts=2" in result.stdout


def test_numeric_scale_init_accepted_and_round_trips():
    config = ModelConfig.recommended(scale_init="0.5")
    assert config.scale_init == 0.5
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="Unknown ModelConfig field"):
        ModelConfig.from_dict({"hiden_size": 3})


from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ParallelLayoutError  # noqa: E402
from spannorm_megatron.model.partition import check_model_fits_layout  # noqa: E402


@pytest.mark.parametrize(
    "model,parallel,expected",
    [
        (dict(num_layers=6), dict(pipeline_model_parallel_size=4),
         "num_layers=6 is not divisible by pipeline_model_parallel_size=4"),
        (dict(num_layers=8), dict(pipeline_model_parallel_size=2,
                                  virtual_pipeline_model_parallel_size=3),
         "num_layers=8 is not divisible by pipeline_model_parallel_size x "
         "virtual_pipeline_model_parallel_size=6"),
        (dict(num_attention_heads=4, hidden_size=64), dict(tensor_model_parallel_size=8),
         "num_attention_heads=4 is not divisible by tensor_model_parallel_size=8"),
        (dict(num_attention_heads=8, hidden_size=64, num_query_groups=2),
         dict(tensor_model_parallel_size=4),
         "num_query_groups=2 is not divisible by tensor_model_parallel_size=4"),
        (dict(vocab_size=50), dict(tensor_model_parallel_size=4),
         "vocab_size=50 is not divisible by tensor_model_parallel_size=4"),
        (dict(num_experts=6), dict(expert_model_parallel_size=4),
         "num_experts=6 is not divisible by expert_model_parallel_size=4"),
        (dict(num_experts=4), dict(tensor_model_parallel_size=2),
         "needs sequence parallelism"),
        (dict(), dict(expert_model_parallel_size=2), "this model is dense"),
    ],
)
def test_model_that_does_not_fit_layout_is_refused(model, parallel, expected):
    with pytest.raises(ParallelLayoutError) as error:
        check_model_fits_layout(ModelConfig.recommended(**model), ParallelConfig(**parallel))
    assert expected in str(error.value)


def test_layouts_that_fit_pass():
    check_model_fits_layout(
        ModelConfig.recommended(num_layers=8, num_attention_heads=8, hidden_size=64, num_query_groups=2,
                    vocab_size=128, num_experts=4),
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                       virtual_pipeline_model_parallel_size=2, expert_model_parallel_size=4,
                       sequence_parallel=True),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--num-experts", "4", "--tensor-model-parallel-size", "2"], "--sequence-parallel"),
        (["--tensor-model-parallel-size", "2"], "world size 1 is not divisible by"),
    ],
)
def test_cli_refuses_bad_layout_before_building(flags, expected):
    """A one-paragraph error and exit code 2, no traceback, no process group or model."""
    result = subprocess.run([sys.executable, "-m", "spannorm_megatron.selfcheck", *flags],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert "step 1" not in result.stdout


def test_performance_choices_become_megatron_core_config_fields():
    from megatron.core.distributed import DistributedDataParallelConfig

    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.model import transformer_config
    from spannorm_megatron.config.performance import PerformanceConfig

    performance = PerformanceConfig(
        bf16=True, fp8_format="hybrid", fp8_recipe="tensorwise", fp8_amax_history_len=16,
        fp8_amax_compute_algo="max", recompute_granularity="full", overlap_grad_reduce=True,
        overlap_param_gather=True, ddp_bucket_size=1000)
    parallel = ParallelConfig(use_distributed_optimizer=True)
    performance.check_layout(parallel)
    tconfig = transformer_config(ModelConfig.recommended(num_layers=4), **performance.transformer_kwargs())
    assert (tconfig.bf16, tconfig.params_dtype) == (True, torch.bfloat16)
    assert (tconfig.fp8, tconfig.fp8_recipe) == ("hybrid", "tensorwise")
    assert (tconfig.fp8_amax_history_len, tconfig.fp8_amax_compute_algo) == (16, "max")
    assert (tconfig.recompute_granularity, tconfig.recompute_method,
            tconfig.recompute_num_layers) == ("full", "uniform", 1)
    ddp = DistributedDataParallelConfig(**performance.ddp_kwargs(parallel))
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.grad_reduce_in_fp32
    assert ddp.use_distributed_optimizer and ddp.bucket_size == 1000

    plain = transformer_config(ModelConfig.recommended(num_layers=4),
                               **PerformanceConfig().transformer_kwargs())
    assert (plain.bf16, plain.fp8, plain.recompute_granularity) == (False, None, None)


def test_num_query_groups_takes_effect_only_with_group_query_attention():
    """Megatron-LM reads --num-query-groups only under --group-query-attention; so do we."""
    from _training import SMALL

    from spannorm_megatron.training.arguments import parse_args

    base = [*SMALL, "--num-attention-heads", "8", "--hidden-size", "64", "--num-query-groups",
            "2"]
    ignored = parse_args(base).model
    assert ignored.num_query_groups is None and ignored.resolved_num_query_groups == 8
    grouped = parse_args(base + ["--group-query-attention"]).model
    assert grouped.resolved_num_query_groups == 2


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "examples", "configs"))
                                        if n.endswith(".yaml")))
def test_every_example_config_parses_into_a_model_config(name):
    # The recipes are documentation users copy: each must pass the same parse-time checks as a
    # command line (declared keys, ranges, cross-field checks) and describe a buildable model.
    job = parse_args(["--config", os.path.join(ROOT, "examples", "configs", name)])
    config = job.with_vocab_size(32000).model
    assert config.num_layers == job.flags["num_layers"] >= 1
