"""How the model is laid out over ranks: tensor, pipeline (and virtual), expert, context and
data parallelism, and the pipeline schedule's flags (Megatron-LM's parallel flags). Pure
arithmetic: no process group is needed to check a layout against a model's layer count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.config.options import check, megatron_kwargs, option
from spannorm_megatron.errors import ConfigError

PIPELINE_COMM_BACKENDS = ("nccl", "ucc")


@dataclass
class ParallelConfig:
    """How the model is laid out over ranks (Megatron-LM's parallel flags)."""

    tensor_model_parallel_size: int = option(
        1, "Ranks that split every weight matrix (attention heads, MLP width, vocabulary).",
        at_least=1, megatron=True)
    pipeline_model_parallel_size: int = option(
        1, "Pipeline stages; each holds num_layers / (stages x virtual stages) layers per chunk.",
        at_least=1, megatron=True)
    virtual_pipeline_model_parallel_size: Optional[int] = option(
        None, "Model chunks per pipeline stage for the interleaved 1F1B schedule; unset: plain "
        "1F1B.", at_least=1, flag="--num-virtual-stages-per-pipeline-rank",
        aliases=("--virtual-pipeline-model-parallel-size",), megatron=True)
    expert_model_parallel_size: int = option(
        1, "Ranks that split the experts of every MoE layer (all-to-all token dispatch).",
        at_least=1, megatron=True)
    expert_tensor_parallel_size: Optional[int] = option(
        None, "Ranks that split each expert's weights; unset: --tensor-model-parallel-size.",
        at_least=1, megatron=True)
    sequence_parallel: bool = option(
        False, "Shard activations outside attention/MLP along the sequence over the "
        "tensor-parallel ranks (required for MoE with tensor parallelism); off at "
        "--tensor-model-parallel-size 1, as Megatron-LM turns it off there.", megatron=True)
    context_parallel_size: int = option(
        1, "Ranks that split every sequence (Transformer Engine's attention exchanges keys and "
        "values between them); needs the Transformer Engine layers.", at_least=1, megatron=True)
    use_distributed_optimizer: bool = option(
        False, "Shard optimizer state (and the fp32 main weights) over the data-parallel ranks.")
    decoder_first_pipeline_num_layers: Optional[int] = option(
        None, "Transformer layers on the first pipeline stage (uneven stages); the other stages "
        "share the rest evenly. Unset: an even share.", at_least=1,
        megatron="num_layers_in_first_pipeline_stage")
    decoder_last_pipeline_num_layers: Optional[int] = option(
        None, "Transformer layers on the last pipeline stage (uneven stages); unset: an even "
        "share.", at_least=1, megatron="num_layers_in_last_pipeline_stage")
    account_for_embedding_in_pipeline_split: bool = option(
        False, "Count the embedding as one layer when splitting layers over pipeline stages, so "
        "the first stage holds one transformer layer less.", megatron=True)
    account_for_loss_in_pipeline_split: bool = option(
        False, "Count the output layer and loss as one layer when splitting over pipeline "
        "stages, so the last stage holds one transformer layer less.", megatron=True)
    pipeline_model_parallel_layout: Optional[str] = option(
        None, "Explicit layer placement, megatron-core's syntax: stages separated by |, E the "
        "embedding, t a transformer layer, L the loss, (..)*n repeats; e.g. 'Ettt|(tt|)*2tL' "
        "for 4 stages. More stages than --pipeline-model-parallel-size make virtual stages.",
        megatron=True)
    overlap_p2p_comm: bool = option(
        True, "Interleaved schedule: overlap the pipeline's sends and receives with compute "
        "(Megatron-LM's default). --no-overlap-p2p-communication batches them instead, which "
        "needs --pipeline-model-parallel-size > 2 with virtual stages. Without virtual stages "
        "there is no overlap either way.", flag="--no-overlap-p2p-communication", negative=True,
        megatron=True)
    overlap_p2p_comm_warmup_flush: bool = option(
        False, "Interleaved schedule: overlap communication in the warm-up and flush phases too "
        "(needs virtual stages and the p2p overlap).",
        flag="--overlap-p2p-communication-warmup-flush", megatron=True)
    microbatch_group_size_per_vp_stage: Optional[int] = option(
        None, "Interleaved schedule: micro-batches each model chunk runs in a row before the "
        "next chunk's turn, at least --pipeline-model-parallel-size and at most the micro-batches "
        "of a step; unset: --pipeline-model-parallel-size (depth-first).",
        flag="--microbatch-group-size-per-virtual-pipeline-stage", at_least=1, megatron=True)
    use_tp_pp_dp_mapping: bool = option(
        False, "Number the ranks tensor, then pipeline, then data parallel (megatron-core's "
        "order 'tp-cp-ep-pp-dp') instead of data before pipeline, e.g. to keep a pipeline "
        "within a node; expert layouts must then keep the data-parallel size (expert tensor x "
        "expert parallel = tensor parallel size).")
    pipeline_model_parallel_comm_backend: Optional[str] = option(
        None, "Backend of the pipeline's point-to-point groups: nccl or ucc (GPUs; ucc needs "
        "a PyTorch built with UCC); unset: the default backend (nccl on GPUs, gloo on CPU).",
        choices=PIPELINE_COMM_BACKENDS, megatron=True)
    use_ring_exchange_p2p: bool = option(
        False, "Exchange pipeline activations with torch.distributed.ring_exchange (a custom "
        "PyTorch build) instead of batch_isend_irecv.", megatron=True)

    def __post_init__(self) -> None:
        check(self)
        if self.tensor_model_parallel_size == 1:
            # Megatron-LM's validate_args (its scripts pass --sequence-parallel whatever the TP
            # size; megatron-core would refuse it); parse_args says so once.
            self.sequence_parallel = False
        if self.virtual_pipeline_model_parallel_size == 1:
            # As Megatron-LM: one model chunk per stage is the plain 1F1B schedule.
            self.virtual_pipeline_model_parallel_size = None
        self._validate_pipeline_split()
        self._validate_schedule()

    @property
    def resolved_expert_tensor_parallel_size(self) -> int:
        """Ranks that split each expert: --expert-tensor-parallel-size, or the TP size."""
        etp = self.expert_tensor_parallel_size
        return self.tensor_model_parallel_size if etp is None else etp

    @property
    def uneven_stages(self) -> bool:
        return (self.decoder_first_pipeline_num_layers is not None
                or self.decoder_last_pipeline_num_layers is not None)

    def _validate_pipeline_split(self) -> None:
        """The rules that do not need the model; check_model_fits_layout has the rest."""
        pp = self.pipeline_model_parallel_size
        accounts = (self.account_for_embedding_in_pipeline_split
                    or self.account_for_loss_in_pipeline_split)
        named = [flag for flag, used in (
            ("--decoder-first-pipeline-num-layers", self.decoder_first_pipeline_num_layers),
            ("--decoder-last-pipeline-num-layers", self.decoder_last_pipeline_num_layers),
            ("--account-for-embedding-in-pipeline-split",
             self.account_for_embedding_in_pipeline_split),
            ("--account-for-loss-in-pipeline-split", self.account_for_loss_in_pipeline_split),
        ) if used]
        if self.pipeline_model_parallel_layout is not None:
            if named:
                raise ConfigError(
                    f"--pipeline-model-parallel-layout places every layer itself and cannot be "
                    f"combined with {', '.join(named)}: drop one of them.")
            self.virtual_pipeline_model_parallel_size = _layout_virtual_stages(
                self.pipeline_model_parallel_layout, pp,
                self.virtual_pipeline_model_parallel_size)
            return
        if named and pp == 1:
            raise ConfigError(
                f"{', '.join(named)} split layers over pipeline stages, and "
                f"--pipeline-model-parallel-size is 1: raise it, or drop them.")
        if self.uneven_stages and accounts:
            raise ConfigError(
                "--decoder-first/last-pipeline-num-layers and --account-for-embedding/loss-in-"
                "pipeline-split are two ways of unevening the stages and cannot be combined "
                "(megatron-core): use one of them.")

    @property
    def interleaved(self) -> bool:
        return self.virtual_pipeline_model_parallel_size is not None

    def _validate_schedule(self) -> None:
        """The pipeline schedule's flags, as Megatron-LM and megatron-core check them (the
        micro-batch count is checked by `check_microbatches` once it is known)."""
        pp, etp = self.pipeline_model_parallel_size, self.resolved_expert_tensor_parallel_size
        rules = [
            (self.interleaved and not self.overlap_p2p_comm and pp <= 2,
             f"--no-overlap-p2p-communication with virtual stages needs "
             f"--pipeline-model-parallel-size > 2 (it is {pp}): with two stages the batched "
             f"sends and receives go to one peer in one batch (Megatron-LM refuses it). Drop "
             f"the flag, or use more stages"),
            (self.overlap_p2p_comm_warmup_flush and not self.interleaved,
             "--overlap-p2p-communication-warmup-flush applies to the interleaved schedule: "
             "give --num-virtual-stages-per-pipeline-rank N, or drop it"),
            (self.overlap_p2p_comm_warmup_flush and not self.overlap_p2p_comm,
             "--overlap-p2p-communication-warmup-flush extends the p2p overlap, which "
             "--no-overlap-p2p-communication turns off: drop one of them"),
            (self.microbatch_group_size_per_vp_stage is not None and not self.interleaved,
             "--microbatch-group-size-per-virtual-pipeline-stage applies to the interleaved "
             "schedule: give --num-virtual-stages-per-pipeline-rank N, or drop it"),
            (self.interleaved and (self.microbatch_group_size_per_vp_stage or pp) < pp,
             f"--microbatch-group-size-per-virtual-pipeline-stage "
             f"{self.microbatch_group_size_per_vp_stage} is below --pipeline-model-parallel-"
             f"size {pp}: a group must fill the pipeline (megatron-core)"),
            (self.use_tp_pp_dp_mapping and pp > 1
             and etp * self.expert_model_parallel_size != self.tensor_model_parallel_size,
             f"--use-tp-pp-dp-mapping with pipeline stages needs the expert layers' data-parallel "
             f"size to equal the dense layers' (megatron-core): --expert-tensor-parallel-size x "
             f"--expert-model-parallel-size = {etp} x "
             f"{self.expert_model_parallel_size} must equal --tensor-model-parallel-size "
             f"{self.tensor_model_parallel_size}; drop the mapping flag or change the sizes"),
        ]
        for broken, message in rules:
            if broken:
                raise ConfigError(message + ".")

    def check_microbatches(self, num_microbatches: int) -> None:
        """The interleaved schedule's rules on the micro-batches of a step (megatron-core raises
        them in the first step): at least one group of them, and a last group that is whole or
        still fills the pipeline."""
        if not self.interleaved:
            return
        pp = self.pipeline_model_parallel_size
        group = self.microbatch_group_size_per_vp_stage or pp
        flag = ("--microbatch-group-size-per-virtual-pipeline-stage"
                if self.microbatch_group_size_per_vp_stage else "--pipeline-model-parallel-size")
        if group > num_microbatches:
            raise ConfigError(
                f"The interleaved schedule runs micro-batches in groups of {group} ({flag}), "
                f"and a step has {num_microbatches} per rank (--global-batch-size / "
                f"(--micro-batch-size x data-parallel size)): raise --global-batch-size, or "
                f"lower {flag}.")
        rest = num_microbatches % group
        if 0 < rest < pp:
            raise ConfigError(
                f"The interleaved schedule's last group of micro-batches would hold {rest} "
                f"({num_microbatches} per step in groups of {group}, {flag}): it must be whole "
                f"or at least --pipeline-model-parallel-size {pp} (megatron-core). Make the "
                f"micro-batches a multiple of {group}, or change the group size.")

    @property
    def rank_order(self) -> str:
        """megatron-core's `initialize_model_parallel(order=...)`, as Megatron-LM picks it."""
        return "tp-cp-ep-pp-dp" if self.use_tp_pp_dp_mapping else "tp-cp-ep-dp-pp"

    @property
    def resolved_overlap_p2p_comm(self) -> bool:
        """Megatron-LM overlaps p2p communication only in the interleaved schedule."""
        return self.overlap_p2p_comm and self.interleaved

    def transformer_kwargs(self) -> dict:
        """The `TransformerConfig` fields these sizes set: the fields declared `megatron=`, and
        the batching of the pipeline's sends and receives, which Megatron-LM does wherever it
        does not overlap them."""
        return dict(megatron_kwargs(self), batch_p2p_comm=not self.resolved_overlap_p2p_comm)

    def stage_layer_counts(self, num_layers: int) -> List[List[int]]:
        """Transformer layers of each [pipeline rank][virtual stage], as megatron-core's
        get_num_layers_to_build splits them; ConfigError when they cannot add up or leave a
        stage without layers. Pure arithmetic, no process group."""
        pp, vpp = self.pipeline_model_parallel_size, self.virtual_pipeline_model_parallel_size or 1
        if self.pipeline_model_parallel_layout is not None:
            return _layout_counts(self.pipeline_model_parallel_layout, pp, num_layers)
        stages = pp * vpp
        if self.uneven_stages:
            first, last = self.decoder_first_pipeline_num_layers, self.decoder_last_pipeline_num_layers
            given = [n for n in (first, last) if n is not None]
            middle_layers, middle_ranks = num_layers - sum(given), pp - len(given)
            for flag, n in (("--decoder-first-pipeline-num-layers", first),
                            ("--decoder-last-pipeline-num-layers", last)):
                if n is not None and n % vpp:
                    raise ConfigError(
                        f"{flag} {n} is not divisible by --num-virtual-stages-per-pipeline-rank "
                        f"{vpp}: each of the stage's model chunks needs the same number of "
                        f"layers.")
            if middle_ranks == 0 and middle_layers != 0:
                raise ConfigError(
                    f"The uneven stages hold {sum(given)} layers but --num-layers is "
                    f"{num_layers}: with --pipeline-model-parallel-size {pp} the first and last "
                    f"stage must add up to --num-layers.")
            if middle_ranks and (middle_layers <= 0 or middle_layers % (middle_ranks * vpp)):
                raise ConfigError(
                    f"--num-layers {num_layers} minus the uneven stages' {sum(given)} leaves "
                    f"{middle_layers} layers for {middle_ranks} other stage(s)"
                    + (f" x {vpp} virtual stages" if vpp > 1 else "") + ": each needs the "
                    "same number, at least one. Adjust --decoder-first/last-pipeline-num-"
                    "layers.")
            share = middle_layers // middle_ranks if middle_ranks else 0
            per_rank = [share] * pp
            if first is not None:
                per_rank[0] = first
            if last is not None:
                per_rank[-1] = last
            return [[n // vpp] * vpp for n in per_rank]
        extra = int(self.account_for_embedding_in_pipeline_split) + int(
            self.account_for_loss_in_pipeline_split)
        total = num_layers + extra
        if total % stages:
            size = ("pipeline_model_parallel_size" if vpp == 1 else
                    "pipeline_model_parallel_size x virtual_pipeline_model_parallel_size")
            counted = (f" (+{extra} for the embedding/loss counted as layers = {total})"
                       if extra else "")
            raise ConfigError(
                f"num_layers={num_layers}{counted} is not divisible by {size}={stages}: every "
                f"(virtual) pipeline stage must hold the same number of layers; or give "
                f"--decoder-first/last-pipeline-num-layers for uneven stages.")
        counts = [[total // stages] * vpp for _ in range(pp)]
        if self.account_for_embedding_in_pipeline_split:
            counts[0][0] -= 1
        if self.account_for_loss_in_pipeline_split:
            counts[-1][-1] -= 1
        if any(n < 1 for row in counts for n in row):
            raise ConfigError(
                f"--account-for-embedding/loss-in-pipeline-split with --num-layers {num_layers} "
                f"over {stages} (virtual) stages leaves a stage with no transformer layer: use "
                f"fewer stages or more layers.")
        return counts


def _layout_stages(layout: str) -> list:
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    try:
        return PipelineParallelLayerLayout.parse_str_to_list(layout)
    except (AssertionError, ValueError) as error:
        raise ConfigError(f"--pipeline-model-parallel-layout {layout!r} is not understood "
                          f"({error}): use E, t, L, | and (..)*n.") from None


def _layout_virtual_stages(layout: str, pp: int, vpp: Optional[int]) -> Optional[int]:
    stages = len(_layout_stages(layout))
    if pp == 1 and stages > 1:
        raise ConfigError(
            f"--pipeline-model-parallel-layout {layout!r} has {stages} stages and "
            f"--pipeline-model-parallel-size is 1: stages are pipeline ranks (or, with "
            f"interleaving, model chunks of them). Give --pipeline-model-parallel-size {stages} "
            f"(or a divisor of it above 1), or drop the layout.")
    if stages % pp:
        raise ConfigError(
            f"--pipeline-model-parallel-layout has {stages} stages, not a multiple of "
            f"--pipeline-model-parallel-size {pp}: give pp x (virtual stages) stages.")
    derived_vpp = stages // pp if stages > pp else None
    if vpp is not None and vpp != (derived_vpp or 1):
        raise ConfigError(
            f"--num-virtual-stages-per-pipeline-rank {vpp} disagrees with "
            f"--pipeline-model-parallel-layout ({stages} stages over {pp} ranks): drop it, the "
            f"layout sets it.")
    return derived_vpp


def _layout_counts(layout: str, pp: int, num_layers: int) -> List[List[int]]:
    from megatron.core.transformer.enums import LayerType

    stages = _layout_stages(layout)
    flat = [kind for stage in stages for kind in stage]
    decoders = flat.count(LayerType.decoder)
    problem = None
    if flat[:1] != [LayerType.embedding] or flat.count(LayerType.embedding) != 1:
        problem = "it must start with the embedding E, once"
    elif flat[-1:] != [LayerType.loss] or flat.count(LayerType.loss) != 1:
        problem = "it must end with the loss L, once"
    elif LayerType.mtp in flat:
        problem = "multi-token prediction layers (m) are not supported here"
    elif decoders != num_layers:
        problem = f"it places {decoders} transformer layers (t) and --num-layers is {num_layers}"
    elif any(LayerType.decoder not in stage for stage in stages):
        problem = "a stage holds no transformer layer (t)"
    if problem:
        raise ConfigError(f"--pipeline-model-parallel-layout {layout!r}: {problem}.")
    vpp = len(stages) // pp
    # Stage s of the flat list is virtual stage s // pp of pipeline rank s % pp.
    return [[stages[v * pp + r].count(LayerType.decoder) for v in range(vpp)]
            for r in range(pp)]
