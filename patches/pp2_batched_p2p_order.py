"""Pipeline size 2 + interleaved schedule: batched p2p swaps activations and gradients.

Not a CPU issue: NCCL point-to-point is tagless as well, so the same FIFO pairing applies on
GPUs. Seen on CPU/gloo as a training run whose grad norm grows every step with
``virtual_pipeline_model_parallel_size`` set and ``pipeline_model_parallel_size=2``, while
``batch_p2p_comm=False`` trains normally; gradients then match the non-interleaved schedule.

With a pipeline group of two ranks, the previous and the next stage are the same peer. The
interleaved schedule's steady state (``send_forward_backward_recv_forward_backward``) then posts
two sends and two receives to that one peer in a single ``batch_isend_irecv``.
``p2p_communication._batched_p2p_ops`` enqueues them as [send_prev, recv_prev, send_next,
recv_next] on every rank; untagged point-to-point messages between two ranks pair in enqueue
order, so the gradient a rank sends to its 'prev' lands in the peer's 'recv_prev' (activation)
buffer and the activation in its gradient buffer. Shapes are equal, so nothing errors: the model
silently trains on swapped tensors. Megatron-LM avoids it only because its CLI default,
``overlap_p2p_comm``, turns ``batch_p2p_comm`` off; megatron-core's own default is
``batch_p2p_comm=True``. The patch replaces ``_batched_p2p_ops`` so that, when prev and next are
the same peer, each rank posts the activation exchange (send_next, recv_prev) before the
gradient exchange (send_prev, recv_next), which pairs activation with activation and gradient
with gradient. The shape exchange used with ``variable_seq_lengths`` has the same ordering and
is not patched: use ``overlap_p2p_comm=True/batch_p2p_comm=False`` there.
"""

from __future__ import annotations

import torch

from .contract import Patch


def _module():
    from megatron.core.pipeline_parallel import p2p_communication

    return p2p_communication


def _posted_order(batched_p2p_ops) -> list[str]:
    """Which of the four same-peer ops ``batched_p2p_ops`` posts, in posting order.

    Runs the function with ``torch.distributed.P2POp`` and ``batch_isend_irecv`` swapped for
    recorders (both are looked up on the module at call time), so neither a process group
    nor any communication is needed; the real ones are restored before returning.
    """
    dist = torch.distributed
    tensors = {name: torch.zeros(1) for name in ("send_prev", "recv_prev", "send_next", "recv_next")}
    names = {id(t): name for name, t in tensors.items()}
    posted: list[str] = []

    def record_op(op, tensor, *args, **kwargs):
        return names[id(tensor)]

    def record_batch(ops):
        posted.extend(ops)
        return []

    real = dist.P2POp, dist.batch_isend_irecv
    dist.P2POp, dist.batch_isend_irecv = record_op, record_batch
    try:
        batched_p2p_ops(
            tensor_send_prev=tensors["send_prev"],
            tensor_recv_prev=tensors["recv_prev"],
            tensor_send_next=tensors["send_next"],
            tensor_recv_next=tensors["recv_next"],
            group=None,
            prev_pipeline_rank=1,
            next_pipeline_rank=1,
        )
    finally:
        dist.P2POp, dist.batch_isend_irecv = real
    return posted


def pairs_correctly(batched_p2p_ops) -> bool:
    """True if a same-peer exchange pairs activation->activation and gradient->gradient.

    My send_prev is received by the peer's recv_next and my send_next by its recv_prev. Both
    ranks post in the same order, so pairing is right iff my sends are ordered
    (send_prev, send_next) exactly when my receives are ordered (recv_next, recv_prev).
    """
    order = _posted_order(batched_p2p_ops)
    sends_prev_first = order.index("send_prev") < order.index("send_next")
    recvs_next_first = order.index("recv_next") < order.index("recv_prev")
    return sends_prev_first == recvs_next_first


def _paired(original):
    """``_batched_p2p_ops`` that posts a same-peer exchange in matching order."""

    def _batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next,
                         tensor_recv_next, group, prev_pipeline_rank, next_pipeline_rank):
        if prev_pipeline_rank != next_pipeline_rank:
            # Distinct peers: one op per peer and direction, nothing to mis-pair.
            return original(
                tensor_send_prev=tensor_send_prev, tensor_recv_prev=tensor_recv_prev,
                tensor_send_next=tensor_send_next, tensor_recv_next=tensor_recv_next,
                group=group, prev_pipeline_rank=prev_pipeline_rank,
                next_pipeline_rank=next_pipeline_rank)
        dist = torch.distributed
        # Activation exchange first, then gradient exchange, on every rank.
        plan = [(dist.isend, tensor_send_next), (dist.irecv, tensor_recv_prev),
                (dist.isend, tensor_send_prev), (dist.irecv, tensor_recv_next)]
        ops = [dist.P2POp(op, tensor, next_pipeline_rank, group)
               for op, tensor in plan if tensor is not None]
        return dist.batch_isend_irecv(ops) if ops else []

    return _batched_p2p_ops


def _probe(original) -> bool:
    """Does the installed _batched_p2p_ops mis-pair a same-peer exchange?"""
    fn = original(_module(), "_batched_p2p_ops")
    return callable(fn) and not pairs_correctly(fn)


PATCH = Patch(
    "pp2_batched_p2p_order",
    target=("megatron-core 0.16.x (seen on 0.16.1): p2p_communication._batched_p2p_ops; "
            "Megatron-LM issues #750, #1450"),
    why=__doc__,
    obsolete_when=(
        "is_needed() returns False: _batched_p2p_ops, called with prev == next, already posts "
        "the peer's two sends in the order the peer posts the matching receives (e.g. after "
        "NVIDIA/Megatron-LM PR #5271 or an equivalent fix is released)."
    ),
    probe=_probe,
    swaps=lambda: [(_module(), "_batched_p2p_ops", _paired(_module()._batched_p2p_ops))],
)
