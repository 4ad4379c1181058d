"""What a finished run left behind, read for its row: the output projections' RMS in its saved
checkpoints and the per-layer stability signals it logged to TensorBoard."""

from __future__ import annotations

import os
import re


def projection_rms(checkpoint_dir: str) -> dict:
    """RMS of the output projections (attention linear_proj, MLP linear_fc2) in every saved
    iteration under `checkpoint_dir`: mean, min and max over layers, and layer 1's and layer L's."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    names = {"attn": "decoder.layers.self_attention.linear_proj.weight",
             "fc2": "decoder.layers.mlp.linear_fc2.weight"}
    out = {"iterations": []}
    for entry in sorted(os.listdir(checkpoint_dir)):
        match = re.fullmatch(r"iter_(\d+)", entry)
        if not match:
            continue
        path = os.path.join(checkpoint_dir, entry)
        meta = FileSystemReader(path).read_metadata().state_dict_metadata
        # Host memory on purpose: an offline read of saved weights, no collective, no model.
        state = {key: torch.empty(meta[key].size, dtype=meta[key].properties.dtype)
                 for key in names.values() if key in meta}
        if len(state) != len(names):
            continue
        dcp.load(state, checkpoint_id=path,
                 planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
        out["iterations"].append(int(match.group(1)))
        for short, key in names.items():
            weight = state[key].float()
            per_layer = weight.pow(2).mean(dim=tuple(range(1, weight.dim()))).sqrt().tolist()
            for stat, value in (("mean", sum(per_layer) / len(per_layer)),
                                ("min", min(per_layer)), ("max", max(per_layer)),
                                ("first", per_layer[0]), ("last", per_layer[-1])):
                out.setdefault(f"{short}_{stat}", []).append(value)
    return out


SIGNAL_LAYERS = ("1", "2", "mid", "L")


def read_signals(tb_dir: str, depth: int) -> dict:
    """The per-layer stability signals spannorm-train logged to TensorBoard
    (`stability/layer_NNN/{output_rms,attention_rms,mlp_rms,grad_norm,update_ratio}`, every
    logging step) for layers 1, 2, L/2 and L, plus the maxima over layers, the embedding's and
    output layer's grad_norm / update_ratio and the global `grad-norm` (as total/grad_norm):
    {"iterations": [...], "<layer>/<signal>": [...]} (empty without the tags). What the
    mechanism needs around a collapse, kept in the results table so it outlives runs/."""
    if not os.path.isdir(tb_dir) or depth < 1:
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    layers = {"1": 1, "2": min(2, depth), "mid": max(1, depth // 2), "L": depth}
    series = {}
    for label, layer in layers.items():
        prefix = f"stability/layer_{layer:03d}/"
        for tag in sorted(t for t in tags if t.startswith(prefix)):
            series[f"{label}/{tag[len(prefix):]}"] = {
                int(e.step): float(e.value) for e in acc.Scalars(tag)}
    for tag in sorted(t for t in tags if t.startswith("stability/max/")):
        series[f"max/{tag[len('stability/max/'):]}"] = {
            int(e.step): float(e.value) for e in acc.Scalars(tag)}
    # The parts outside the layers, and the global norm they are a share of (runs from
    # 2026-12-07 on).
    for part in ("embedding", "output_layer"):
        for tag in sorted(t for t in tags if t.startswith(f"stability/{part}/")):
            series[f"{part}/{tag.rsplit('/', 1)[1]}"] = {
                int(e.step): float(e.value) for e in acc.Scalars(tag)}
    if not series:
        return {}
    steps = sorted(set().union(*(set(v) for v in series.values())))
    if "grad-norm" in tags:
        # Written every --tensorboard-log-interval (default: every iteration); kept at the
        # logging steps of the signals it is compared with.
        series["total/grad_norm"] = {int(e.step): float(e.value)
                                     for e in acc.Scalars("grad-norm") if int(e.step) in steps}
    out = {"iterations": steps}
    for key, values in series.items():
        out[key] = [values.get(i) for i in steps]
    return out



def signals_or_error(tb_dir: str, depth: int) -> dict:
    try:
        return read_signals(tb_dir, depth)
    except Exception as err:  # the row is still worth writing
        return {"error": f"{type(err).__name__}: {err}"}

