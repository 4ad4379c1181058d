"""megatron-core's own checks, run where ours run: before any process group exists.

`Trainer.setup` hands megatron-core a `TransformerConfig`, an `OptimizerConfig`, a
`DistributedDataParallelConfig`, a `GPTDatasetConfig` and a micro-batch calculator, each of which
checks its fields when built (asserts and ValueErrors in their constructors). Left there, a
refusal comes after the process groups exist, as a traceback, in megatron-core's field names.
`check_with_megatron_core` builds the same objects, from the same functions, in the checking
process, and turns a refusal into a ConfigError naming our flags: the megatron-core fields the
message (or the failing assert's source line) names, mapped to the flags declared to set them
(`options.megatron_flags`).

Megatron-LM's own fix-ups (sequence parallelism off at TP1, with a notice) happen in the config
sections, as its validate_args makes them before it builds these.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import re
import traceback
from typing import Dict, Iterator, List

from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.config.options import megatron_flags
from spannorm_megatron.errors import ConfigError, UserError


def check_with_megatron_core(job: JobConfig, batches, tokenizer) -> None:
    """Build what `Trainer.setup` builds from `job` (the batch layout `batches`, the data's
    `tokenizer`), without process groups; ConfigError naming our flags where megatron-core
    refuses. A UserError of our own (a check in the functions shared with setup) passes as is."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.num_microbatches_calculator import (
        ConstantNumMicroBatchesCalculator,
        RampupBatchsizeNumMicroBatchesCalculator,
    )

    from spannorm_megatron.data.dataset import gpt_dataset_config
    from spannorm_megatron.model import transformer_config
    from spannorm_megatron.model.fusions import runnable_fusions
    from spannorm_megatron.training.schedule import optimizer_config

    model, parallel, performance = job.model, job.parallel, job.performance
    flags = megatron_flags(_sections(job))
    with refusals_named(flags, "TransformerConfig"):
        transformer_config(model, **parallel.transformer_kwargs(),
                           **performance.transformer_kwargs(),
                           **runnable_fusions(model, performance),
                           calculate_per_token_loss=job.training.calculate_per_token_loss)
    with refusals_named(flags, "OptimizerConfig"):
        dataclasses.replace(optimizer_config(job.training, job.metrics),
                            **performance.optimizer_kwargs(),
                            use_distributed_optimizer=parallel.use_distributed_optimizer)
    with refusals_named(flags, "DistributedDataParallelConfig"):
        DistributedDataParallelConfig(**performance.ddp_kwargs(parallel))
    if job.data is not None:
        with refusals_named(flags, "GPTDatasetConfig"):
            gpt_dataset_config(job.data, tokenizer, cache_path=None)  # no cache is read here
    with refusals_named(flags, "micro-batch calculator"):
        sizes = (batches.global_batch_size, batches.micro_batch_size, batches.data_parallel_size)
        if batches.rampup is None:
            ConstantNumMicroBatchesCalculator(*sizes, decrease_batch_size_if_needed=False,
                                              rank=-1)
        else:
            start, increment, samples = batches.rampup
            RampupBatchsizeNumMicroBatchesCalculator(
                *sizes, decrease_batch_size_if_needed=False, rank=-1,
                start_global_batch_size=start, batch_size_increment=increment,
                ramup_samples=samples).update(0, consistency_check=True)


def _sections(job: JobConfig) -> List[type]:
    return [type(section) for section in (
        job.model, job.parallel, job.training, job.performance, job.data, job.tokenizer,
        job.logging, job.metrics, job.checkpoint, job.hooks, job.spellings, job.unavailable)
        if section is not None]


@contextlib.contextmanager
def refusals_named(flags: Dict[str, List[str]], what: str) -> Iterator[None]:
    """A refusal raised inside megatron-core (an AssertionError, or a ValueError/TypeError of its
    own code) becomes a ConfigError that names the flags behind the fields it names."""
    try:
        yield
    except UserError:
        raise
    except (AssertionError, ValueError, TypeError) as error:
        frames = traceback.extract_tb(error.__traceback__)
        inside = [frame for frame in frames if "/megatron/core/" in frame.filename]
        if not inside:
            raise  # ours: a bug, with its traceback
        frame = inside[-1]
        text = str(error).strip() or f"assert {frame.line}"
        # The fields the message names, and those of the condition just above the raise.
        source = " ".join(linecache.getline(frame.filename, number)
                          for number in range(max(1, frame.lineno - 3), frame.lineno + 1))
        named = _flags_named(flags, f"{text} {source}")
        raise ConfigError(
            f"megatron-core refuses the {what} these flags make: {text.rstrip('.')}"
            + (f" (set by {', '.join(named)})" if named else "")
            + ". Change the flags so that it holds.") from None


def _flags_named(flags: Dict[str, List[str]], text: str) -> List[str]:
    """Our flags for the megatron-core fields `text` names (as `global_batch_size`, or in words,
    "global batch size"), in order of appearance."""
    lowered = text.lower()
    hits = []
    for field, field_flags in flags.items():
        starts = [match.start() for form in {field, field.replace("_", " ")}
                  for match in [re.search(rf"\b{re.escape(form)}\b", lowered)] if match]
        if starts:
            hits.append((min(starts), field_flags))
    found: List[str] = []
    for _, field_flags in sorted(hits, key=lambda hit: hit[0]):
        found += [flag for flag in field_flags if flag not in found]
    return found
