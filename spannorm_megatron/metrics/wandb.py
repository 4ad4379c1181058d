"""Weights & Biases logging (Megatron-LM's `--wandb-project`, `--wandb-exp-name`,
`--wandb-save-dir`, `--wandb-entity`).

Megatron-LM logs to W&B, from the rank that writes TensorBoard, the scalars it writes there,
under the same names and iterations (not the `... vs samples` twins, whose x axis is samples;
it logs `samples vs steps` instead), with the run's arguments as the W&B config. It does so
only beside a TensorBoard writer, so without `--tensorboard-dir` W&B gets the config alone (said
once at the start). Here the run's TensorBoard writer (`metrics.tensorboard.TensorBoardWriter`)
is mirrored the same way: every scalar it writes also goes to `wandb.log({tag: value},
step=iteration)`. Text (the config, the collapse alarm) stays in TensorBoard.

The wandb package is optional: a run that asks for W&B without it is refused before anything
starts. W&B's own settings (WANDB_MODE=offline, WANDB_API_KEY, ...) apply as usual.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.metrics.tensorboard import VS_SAMPLES, is_writer_rank

_OTHER_FLAGS = ("wandb_exp_name", "wandb_save_dir", "wandb_entity")


def check_wandb(job: JobConfig) -> None:
    """Refuse W&B flags that cannot work here, before anything starts; note ones that do
    nothing (in `job.notices`)."""
    logging = job.logging
    if not logging.wandb_project:
        given = ["--" + name.replace("_", "-") for name in _OTHER_FLAGS
                 if getattr(logging, name)]
        if given:
            job.notices.append(f"{', '.join(given)} without --wandb-project: nothing is logged "
                               f"to W&B.")
        return
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--wandb-project needs the wandb package, which is not installed "
                          "here: pip install wandb, or drop the --wandb-* flags.")
    if logging.wandb_exp_name == "":
        raise ConfigError("--wandb-exp-name is empty: name the W&B run (as Megatron-LM "
                          "requires), or leave the flag out for W&B's own name.")
    if not (logging.wandb_save_dir or job.checkpoint.save):
        raise ConfigError("--wandb-project keeps W&B's local files in --wandb-save-dir, or "
                          "<--save>/wandb: give one of them.")
    if not logging.tensorboard_dir:
        job.notices.append("--wandb-project without --tensorboard-dir: W&B gets the run's "
                           "config only (Megatron-LM logs its scalars beside TensorBoard's; "
                           "add --tensorboard-dir for them).")


class WandbLogger:
    """One W&B run, on the rank that writes TensorBoard."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def create(cls, job: JobConfig) -> Optional["WandbLogger"]:
        """The run's logger, or None (no --wandb-project, or not the writing rank). The W&B
        config is the run's flags, as Megatron-LM gives its args."""
        logging = job.logging
        if not logging.wandb_project or not is_writer_rank():
            return None
        import wandb

        save_dir = logging.wandb_save_dir or os.path.join(job.checkpoint.save, "wandb")
        os.makedirs(save_dir, exist_ok=True)
        kwargs = dict(dir=save_dir, name=logging.wandb_exp_name, project=logging.wandb_project,
                      config=dict(job.flags))
        if logging.wandb_entity:
            kwargs["entity"] = logging.wandb_entity
        return cls(wandb.init(**kwargs))

    def mirror(self, writer):
        """Make `writer` (a TensorBoardWriter) send its scalars here too; returns it."""
        if writer._writer is not None:  # none without --tensorboard-dir, as in Megatron-LM
            writer._writer = _Tee(writer._writer, self)
        return writer

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def finish(self) -> None:
        self.run.finish()


class _Tee:
    """The SummaryWriter methods TensorBoardWriter calls, sent to TensorBoard and to W&B."""

    def __init__(self, summary_writer, logger: WandbLogger):
        self.summary_writer = summary_writer
        self.logger = logger
        self._iteration = None  # of the last iteration-indexed scalar
        self._samples_logged_at = None

    def add_scalar(self, tag, value, step):
        self.summary_writer.add_scalar(tag, value, step)
        if not tag.endswith(VS_SAMPLES):
            self._iteration = step
            self.logger.add_scalar(tag, value, step)
        elif self._iteration is not None and self._samples_logged_at != self._iteration:
            # A twin's step is the consumed samples: Megatron-LM's `samples vs steps`.
            self._samples_logged_at = self._iteration
            self.logger.add_scalar("samples vs steps", step, self._iteration)

    def add_text(self, tag, text, step=0):
        self.summary_writer.add_text(tag, text, step)

    def flush(self):
        self.summary_writer.flush()

    def close(self):
        self.summary_writer.close()
