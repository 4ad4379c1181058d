"""One run's configuration: every section of `spannorm-train`'s flags, built and checked once by
its parser (`training.arguments.parse_args`), with what the parser derived from them.

The Trainer, the data builders and the metrics read these sections; the flags themselves, under
Megatron-LM's names and as the parser resolved them, are kept in `flags` only to be recorded
(the checkpoint's run record, TensorBoard's config, the W&B config), as Megatron-LM records its
`args`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from spannorm_megatron.config.checkpoint import CheckpointConfig
from spannorm_megatron.config.data import DataConfig
from spannorm_megatron.config.hooks import RunHooksConfig
from spannorm_megatron.config.logging import LoggingConfig, MetricsLoggingConfig
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.config.performance import PerformanceConfig
from spannorm_megatron.config.rollback import RollbackConfig
from spannorm_megatron.config.spellings import MegatronSpellings
from spannorm_megatron.config.tokenizer import TokenizerConfig
from spannorm_megatron.config.training import TrainingConfig
from spannorm_megatron.config.unavailable import Unavailable
from spannorm_megatron.errors import ConfigError


@dataclass
class JobConfig:
    """Every section of one run. `model.vocab_size` is the tokenizer's padded vocabulary only
    after `with_vocab_size` (the Trainer's, once the tokenizer is loaded); the parser checks the
    model with a stand-in."""

    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    performance: PerformanceConfig
    data: Optional[DataConfig]
    """None when the command line names no data (the Trainer refuses to run without)."""
    tokenizer: TokenizerConfig
    logging: LoggingConfig
    metrics: MetricsLoggingConfig
    checkpoint: CheckpointConfig
    hooks: RunHooksConfig
    spellings: MegatronSpellings
    unavailable: Unavailable
    rollback: RollbackConfig = field(default_factory=RollbackConfig)
    """What the collapse alarm and a loss spike do (default: warn / log, as without it)."""
    flags: Dict[str, Any] = field(default_factory=dict)
    """Every flag under its dest (Megatron-LM's names), as parsed and resolved: what the run
    records as its arguments. Read the sections, not this."""
    notices: List[str] = field(default_factory=list)
    """What the run says once at its start about the flags it was given."""
    checkpoint_vocab_size: Optional[int] = None
    """The padded vocabulary `--use-checkpoint-args` took from the checkpoint, if it did."""

    def padded_vocab_size(self, vocab_size: int) -> int:
        """Megatron-LM's padding of the tokenizer's `vocab_size`: a multiple of
        --make-vocab-size-divisible-by x the TP size; or, as its build_tokenizer keeps it, the
        size --use-checkpoint-args took from the checkpoint."""
        taken = self.checkpoint_vocab_size
        if taken is not None:
            if taken < vocab_size:
                raise ConfigError(
                    f"--use-checkpoint-args: the checkpoint's vocabulary ({taken}) is smaller "
                    f"than the tokenizer's ({vocab_size}): pass the tokenizer the checkpoint was "
                    f"trained with.")
            return taken
        multiple = (self.spellings.make_vocab_size_divisible_by
                    * self.parallel.tensor_model_parallel_size)
        return -(-vocab_size // multiple) * multiple

    def with_vocab_size(self, vocab_size: int) -> "JobConfig":
        """This job with the model's vocabulary set from the tokenizer's `vocab_size`, padded."""
        model = dataclasses.replace(self.model, vocab_size=self.padded_vocab_size(vocab_size))
        return dataclasses.replace(self, model=model)

    def recorded_args(self) -> Dict[str, Any]:
        """The run's arguments as records keep them: every flag, and the notices."""
        return dict(self.flags, notices=self.notices)
