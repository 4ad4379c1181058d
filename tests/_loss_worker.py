"""Rank program of tests/test_training.py's loss-weighting test, launched by torchrun on 2 ranks.

    torchrun --standalone --nproc_per_node 2 tests/_loss_worker.py OUT_DIR

Data parallel 2, two micro-batches per rank, loss masks of four different sizes. For Megatron-LM's
default and for --calculate-per-token-loss, one training step through the training loop's
`train_step`, and an independent plain-PyTorch computation on a second copy of the same model
over all four micro-batches (both ranks' data): the token-weighted mean loss, the mean of the
micro-batch means, and the gradients of each. The step's micro-batch reports are recorded too,
to evaluate the formula the logged loss had while each micro-batch's report was all-reduced on
its own (before one reduction per step). Writes OUT_DIR/rank<r>.json (tests/launch.py).
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import sys

import torch
from megatron.core import parallel_state
from megatron.core.optimizer import OptimizerConfig

from launch import rank, reporting, write_result
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.model import build_model, transformer_config
from spannorm_megatron.process import initialize
from spannorm_megatron.runtime import current_device, destroy, set_seed
from spannorm_megatron.training.gpt_step import forward_step
from spannorm_megatron.training.loop import train_step
from spannorm_megatron.training.setup import setup_model_and_optimizer

SEQ, MICRO, VOCAB = 16, 2, 64
KEPT = [16, 3, 9, 1]  # loss-mask tokens kept per sample row, one entry per micro-batch


def micro_batches():
    """All four micro-batches of the step (rank r trains on 2r and 2r+1)."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (len(KEPT), MICRO, SEQ + 1), generator=generator)
    batches = []
    for index, kept in enumerate(KEPT):
        mask = torch.zeros(MICRO, SEQ)
        mask[:, :kept] = 1.0
        batches.append({
            "tokens": tokens[index, :, :-1].to(current_device()),
            "labels": tokens[index, :, 1:].to(current_device()),
            "loss_mask": mask.to(current_device()),
            "position_ids": torch.arange(SEQ, device=current_device()).expand(MICRO, SEQ),
        })
    return batches


def independent(model, batches):
    """Token-weighted and micro-batch-mean losses with their gradients (name -> tensor)."""

    def sums_and_counts():
        # A fresh forward per loss: the vocab-parallel cross entropy works in place on logits.
        for batch in batches:
            per_token = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                              labels=batch["labels"]).float()
            yield (per_token * batch["loss_mask"]).sum(), batch["loss_mask"].sum()

    def token_weighted():
        sums, counts = zip(*sums_and_counts())
        return sum(sums) / sum(counts)

    def microbatch_mean():
        return sum(s / c for s, c in sums_and_counts()) / len(batches)

    results = {}
    for name, loss_fn in (("token_weighted", token_weighted),
                          ("microbatch_mean", microbatch_mean)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        results[name] = (loss.item(), {n: p.grad.detach().clone()
                                       for n, p in model.named_parameters()})
    return results


def per_microbatch_reduction(reports, dtype) -> float:
    """The logged loss as it was computed while loss_func all-reduced each micro-batch's
    [loss sum, tokens] over data parallel ranks: reduced one by one, then summed."""
    reduced = []
    for report in reports:
        report = report.to(dtype).clone()
        torch.distributed.all_reduce(
            report, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        reduced.append(report)
    total = torch.stack(reduced).sum(dim=0)
    return (total[0] / total[1].clamp(min=1)).item()


def main(out_dir: str) -> None:
    initialize(seed=1234)
    config = ModelConfig.recommended(norm_placement="spannorm", num_layers=2, hidden_size=32,
                         num_attention_heads=2, vocab_size=VOCAB, max_sequence_length=SEQ)
    batches = micro_batches()
    record = {}
    for per_token in (False, True):
        set_seed(1234)
        (reference,) = build_model(config, transformer_config(config))
        expected = independent(reference, batches)
        set_seed(1234)
        model, optimizer = setup_model_and_optimizer(
            config, ParallelConfig(),
            OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1e9, weight_decay=0.0),
            calculate_per_token_loss=per_token)
        mine = iter(batches[2 * rank():2 * rank() + 2])
        reports = []

        def recording_step(data_iterator, chunk):
            output, loss = forward_step(data_iterator, chunk)

            def recorded(output_tensor):
                outcome = loss(output_tensor)
                reports.append(outcome[2]["lm loss"].detach().clone())
                return outcome
            return output, recorded

        result = train_step(model, optimizer, None, mine, num_microbatches=2, seq_length=SEQ,
                            micro_batch_size=MICRO, global_batch_size=2 * MICRO * 2,
                            forward_step_func=recording_step)
        grads = {n.removeprefix("module."): p.main_grad for n, p in model[0].named_parameters()}
        record["per_token" if per_token else "default"] = {
            "logged_loss": result.loss,
            "microbatch_reports": len(reports),
            "per_microbatch_reduction_fp32": per_microbatch_reduction(reports, torch.float32),
            "per_microbatch_reduction_fp64": per_microbatch_reduction(reports, torch.float64),
            **{name: loss for name, (loss, _) in expected.items()},
            "grad_error": {
                name: max(((grads[n] - g).norm() / g.norm().clamp(min=1e-30)).item()
                          for n, g in wanted.items())
                for name, (_, wanted) in expected.items()},
        }
    write_result(out_dir, record)
    destroy()


if __name__ == "__main__":
    with reporting(sys.argv[1]):
        main(sys.argv[1])
