"""The L2 norm of all parameters (`--log-params-norm`), as Megatron-LM's `calc_params_l2_norm`.

Why here: Megatron-LM computes it in `megatron/training/utils.py`, which is not part of
megatron-core's package; the pieces it is made of are (`param_is_not_tensor_parallel_duplicate`,
`param_is_not_shared`, the multi-tensor L2 norm that megatron-core's gradient clipping uses:
Transformer Engine's or Apex's kernel where installed, else megatron-core's own), so this
module puts them together the same way, with the same groups:

- every parameter counts once: tensor-parallel duplicates (norm gains, biases of row-parallel
  layers) only on TP rank 0; `shared` parameters (the last stage's copy of tied embeddings)
  not at all;
- with bf16, the fp32 main parameters the optimizer keeps (`param.main_param`); under the
  distributed optimizer those are shards (`main_param_sharded`), summed over the data-parallel
  group (with context parallelism); without bf16, the parameters themselves;
- dense parameters summed over the model-parallel group (TP x PP), expert parameters
  (`allreduce=False`) over the expert-tensor-model-pipeline group (ETP x EP x PP).

Every rank calls it (collectives) and gets the same value. One difference from Megatron-LM:
with `--overlap-param-gather` the distributed optimizer leaves the updated weights ungathered
until the next forward pass, and Megatron-LM then reads the weights of the step before on
fp32 runs; `runtime.gather_updated_parameters` is called first here, so the norm is
always that of the weights a checkpoint of this iteration holds.
"""

from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.optimizer.clip_grads import l2_norm_impl, multi_tensor_applier
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared

from spannorm_megatron.runtime import current_device, gather_updated_parameters


def _norm_squared(tensors: List[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=current_device())
    overflow = torch.zeros(1, dtype=torch.int, device=current_device())
    norm, _ = multi_tensor_applier(l2_norm_impl, overflow, [tensors], False)
    norm = norm.to(device=current_device(), dtype=torch.float32).reshape(1)
    return norm * norm


def params_l2_norm(model_chunks, bf16: bool = False) -> float:
    """Collective: the L2 norm of the whole model's parameters (see the module doc)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    gather_updated_parameters(chunks)
    dense, experts, sharded = [], [], []
    for chunk in chunks:
        for param in chunk.parameters():
            if not param_is_not_tensor_parallel_duplicate(param):
                continue
            is_expert = not getattr(param, "allreduce", True)
            if not is_expert and not param_is_not_shared(param):
                continue
            into = experts if is_expert else dense
            if not bf16:
                into.append(param.data)
            elif hasattr(param, "main_param"):
                if getattr(param, "main_param_sharded", False):
                    if param.main_param is not None:
                        sharded.append(param.main_param)
                else:
                    into.append(param.main_param)
            else:
                into.append(param.data.float())

    norm_2 = _norm_squared(dense)
    sharded_2 = _norm_squared(sharded)
    torch.distributed.all_reduce(
        sharded_2, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    norm_2 += sharded_2
    experts_2 = _norm_squared(experts)
    dense_group = parallel_state.get_model_parallel_group()
    expert_group = parallel_state.get_expert_tensor_model_pipeline_parallel_group()
    if (torch.distributed.get_process_group_ranks(dense_group)
            == torch.distributed.get_process_group_ranks(expert_group)):
        norm_2 += experts_2
        torch.distributed.all_reduce(norm_2, group=dense_group)
    else:
        torch.distributed.all_reduce(norm_2, group=dense_group)
        torch.distributed.all_reduce(experts_2, group=expert_group)
        norm_2 += experts_2
    return norm_2.item() ** 0.5
