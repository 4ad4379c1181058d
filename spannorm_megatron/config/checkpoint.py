"""Where checkpoints go and what a resume restores (Megatron-LM's checkpoint flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spannorm_megatron.config.options import check, option
from spannorm_megatron.errors import ConfigError

CKPT_FORMATS = ("torch", "torch_dist", "torch_dcp", "fsdp_dtensor")
# Megatron-LM's formats other than torch_dist, and why they are not written here.
UNSUPPORTED_CKPT_FORMATS = {
    "torch": "it is the legacy per-rank torch.save format, tied to the TP/PP layout that "
             "wrote it; this stack saves, resumes under other layouts and converts megatron-core "
             "distributed checkpoints only (tools/convert_to_hf.py turns one into a "
             "single-process model)",
    "torch_dcp": "Megatron-LM writes it only with PyTorch FSDP2 (--use-torch-fsdp2, asserted "
                 "there), which this stack does not run",
    "fsdp_dtensor": "Megatron-LM writes it only with Megatron FSDP (--use-megatron-fsdp, "
                    "asserted there), which this stack does not run",
}



@dataclass
class CheckpointConfig:
    """Where checkpoints go and what a resume restores."""

    save: Optional[str] = option(None, "Write checkpoints here (iter_XXXXXXX/ directories).",
                                 path="output_folder")
    ckpt_format: str = option(
        "torch_dist", "Checkpoint format: torch_dist, megatron-core's distributed checkpoint "
        "(Megatron-LM's default), is what this stack writes and reads; Megatron-LM's others are "
        "refused with the reason.", choices=CKPT_FORMATS)
    load: Optional[str] = option(None, "Resume from the latest checkpoint here, if any.",
                                 path="resume_checkpoint")
    save_interval: Optional[int] = option(None, "Iterations between checkpoints (and one at "
                                          "the end).", at_least=1)
    no_load_optim: bool = option(False, "Resume the weights only, with a fresh optimizer.")
    no_load_rng: bool = option(False, "Do not restore the random-number generators.")
    load_fallback: bool = option(
        False, "If the latest checkpoint is damaged, load the newest earlier complete one "
        "instead of stopping with an error.")
    use_checkpoint_args: bool = option(
        False, "Take the model's flags from the --load checkpoint (Megatron-LM's flag): its "
        "sizes where the command line leaves them unset, its structure, norm, position "
        "embeddings, dropout and MoE settings over the command line; the tokenizer and the "
        "parallel layout as the next two flags say.")
    use_tokenizer_model_from_checkpoint_args: bool = option(
        True, "Off: --use-checkpoint-args keeps the command line's --tokenizer-type and "
        "--tokenizer-model (on, Megatron-LM's default, it takes the checkpoint's).",
        flag="--no-use-tokenizer-model-from-checkpoint-args", negative=True,
        aliases=("--disable-use-tokenizer-model-from-checkpoint-args",))
    use_mp_args_from_checkpoint_args: bool = option(
        False, "With --use-checkpoint-args, take the tensor, pipeline (and virtual), and expert "
        "parallel sizes from the checkpoint too (Megatron-LM's flag).")

    def __post_init__(self) -> None:
        check(self)
        why = UNSUPPORTED_CKPT_FORMATS.get(self.ckpt_format)
        if why:
            raise ConfigError(
                f"--ckpt-format {self.ckpt_format} is Megatron-LM's, but not available here: "
                f"{why}. Use --ckpt-format torch_dist (the default).")
