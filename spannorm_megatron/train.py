"""`spannorm-train` / `python -m spannorm_megatron.train`: pretrain a GPT model with megatron-core.

    torchrun --nproc_per_node 2 -m spannorm_megatron.train --config examples/configs/tiny.yaml \
        --data-path data/corpus_text_document --tokenizer-model data/tokenizer.model \
        --save runs/tiny --tensorboard-dir runs/tiny/tb

Order of work (`training.trainer.Trainer`): every flag, data path and layout is checked before
any process group exists; then process groups, model, optimizer, scheduler, checkpoint, data;
then the loop (train step, log line, TensorBoard, evaluation, checkpoint) and a final evaluation
and checkpoint. Whatever happens, the process groups and signal handlers are torn down.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from spannorm_megatron.cli import run_cli
from spannorm_megatron.orphans import die_with_launcher


def pretrain(argv: Optional[List[str]] = None, trainer_class=None) -> dict:
    """Train as `spannorm-train argv` would; returns the loss history."""
    from spannorm_megatron.training.arguments import parse_args

    job = parse_args(argv)  # --help and a mistyped flag are answered here, without torch
    from spannorm_megatron.training.trainer import Trainer

    with (trainer_class or Trainer)(job) as trainer:
        trainer.setup()
        return trainer.train()


def main(argv: Optional[List[str]] = None, trainer_class=None) -> int:
    # Before the imports (seconds): a rank whose torchrun agent is killed meanwhile goes too.
    die_with_launcher()

    def train(argv) -> int:
        # Non-finite training, a refused save, past --max-rollbacks: RunFailure, status 1.
        pretrain(argv, trainer_class)
        return 0

    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
