#!/usr/bin/env python
"""Where the gradient is lost in a deep normalized-stream model, measured on its checkpoints
(the part of the collapse mechanism the logged signals cannot show).

The grid's runs log layers 1, 2, L/2 and L only. This script loads saved checkpoints of a run
(`spannorm-train --save DIR --save-interval N`), runs one batch of the run's data forward and
backward, and measures at every layer l of a placement with an N2 after the block
(spannorm, postnorm, spannorm_clean):

    n2_in_rms    RMS of N2's input (x + F(h) in SpanNorm)
    n1_in_rms, g_n1_in, g_n1_out   the same for N1 (on the stream's path in PostNorm only)
    n2_gain      RMS of N2's gain
    branch_rms, branch_stream_cos   (SpanNorm) RMS of F(h) = N2's input minus the stream x, and
                 its cosine with x per token (averaged): how the branch lifts N2's input RMS
    g_out        ||dL/dx_l||, the gradient reaching the layer's output
    g_n2_in      ||dL/d(N2 input)||: after N2's backward (ratio g_n2_in / g_out: N2's factor)
    g_in         ||dL/dx_{l-1}||: after the whole block (ratio g_in / g_n2_in: the sum's and the
                 branches' factor)
    param_grad   gradient norm of the layer's parameters

and reports per checkpoint (layers 2..L): the total drop log10(g_out(layer 1) / g_out(layer L)),
how much of it N2's backward accounts for (sum of log10 of its factors), what dividing by N2's
input RMS alone would give (sum of log10(n2_gain / n2_in_rms)), and the rest of the block's
share, with the medians of the per-layer quantities.

    python examples/depth_sweep/probe_collapse.py --load RUN/checkpoints \\
        --data-path PREFIX [--iterations 10 20 30] [--json OUT.json]
        [--table docs/stability/mechanism/probes.jsonl.gz --name RUN]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from statistics import median

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def batch(prefix: str, batch_size: int, seq_length: int, skip_tokens: int):
    """`batch_size` x (seq_length + 1) consecutive tokens of the indexed dataset, from the
    `skip_tokens`-th token on (the same batch for every checkpoint)."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(prefix)
    need, ids, doc = skip_tokens + batch_size * (seq_length + 1), [], 0
    while len(ids) < need and doc < len(data):
        ids.extend(numpy.asarray(data[doc]).tolist())
        doc += 1
    ids = torch.tensor(ids[skip_tokens:need]).view(batch_size, seq_length + 1)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def probe(model, tokens, labels) -> dict:
    import torch

    layers = list(model.decoder.layers)
    store = {k: [None] * len(layers) for k in ("n2_in_rms", "g_out", "g_n2_in", "g_in",
                                                 "branch_rms", "branch_stream_cos",
                                                 "n1_in_rms", "g_n1_in", "g_n1_out")}
    inputs = {}
    spannorm = type(layers[0]).__name__ == "SpanNormLayer"
    handles = []

    def rms(t):
        return float(t.detach().float().pow(2).mean().sqrt())

    for index, layer in enumerate(layers):
        def grad_store(key, i):
            def hook(grad):
                store[key][i] = float(grad.detach().float().norm())
            return hook

        def on_input(module, args, kwargs, i=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden.register_hook(grad_store("g_in", i))
            inputs[i] = hidden.detach()

        def on_output(module, args, output, i=index):
            output[0].register_hook(grad_store("g_out", i))

        def on_n2(module, args, i=index):
            store["n2_in_rms"][i] = rms(args[0])
            args[0].register_hook(grad_store("g_n2_in", i))
            if spannorm:  # N2 reads x + F(h): the branch is what N2 reads minus the stream
                x = inputs.pop(i).float()
                branch = args[0].detach().float() - x
                store["branch_rms"][i] = rms(branch)
                store["branch_stream_cos"][i] = float(torch.nn.functional.cosine_similarity(
                    branch, x, dim=-1).mean())

        def on_n1_in(module, args, i=index):
            store["n1_in_rms"][i] = rms(args[0])
            args[0].register_hook(grad_store("g_n1_in", i))

        def on_n1_out(module, args, output, i=index):
            output.register_hook(grad_store("g_n1_out", i))

        handles += [layer.post_attention_norm.register_forward_pre_hook(on_n1_in),
                    layer.post_attention_norm.register_forward_hook(on_n1_out)]
        handles += [layer.register_forward_pre_hook(on_input, with_kwargs=True),
                    layer.register_forward_hook(on_output),
                    layer.post_mlp_norm.register_forward_pre_hook(on_n2)]
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    model.zero_grad(set_to_none=True)
    loss = model(tokens, positions, attention_mask=None, labels=labels).float().mean()
    loss.backward()
    for handle in handles:
        handle.remove()
    store["param_grad"] = [math.sqrt(sum(float(p.grad.float().pow(2).sum())
                                         for p in layer.parameters() if p.grad is not None))
                           for layer in layers]
    store["n2_gain"] = [rms(layer.post_mlp_norm.weight) for layer in layers]
    store["n1_gain"] = [rms(layer.post_attention_norm.weight) for layer in layers]
    store["loss"] = float(loss)
    return store


def summarize(store: dict) -> dict:
    # Layers 2..L: layer 1's N2 reads the raw embedding (RMS ~ init std), so its backward
    # multiplies the gradient by ~1/std on the way to the embedding, not to a layer.
    n = len(store["g_out"])
    log_n2 = [math.log10(store["g_n2_in"][i] / store["g_out"][i]) for i in range(1, n)]
    log_rest = [math.log10(store["g_in"][i] / store["g_n2_in"][i]) for i in range(1, n)]
    quarter = len(log_rest) // 4
    # PostNorm's stream also passes N1 (h = N1(x + A(x)) feeds the sum N2 reads); SpanNorm's
    # N1 output only feeds the MLP branch, off the stream's path.
    n1_on_path = store["branch_rms"][1] is None
    n1 = {}
    if n1_on_path and all(v is not None for v in store["g_n1_in"][1:]):
        n1 = {"n1_backward_log10": sum(math.log10(store["g_n1_in"][i] / store["g_n1_out"][i])
                                       for i in range(1, n)),
              "n1_predicted_log10": sum(math.log10(store["n1_gain"][i] / store["n1_in_rms"][i])
                                        for i in range(1, n)),
              "median_n1_in_rms": median(store["n1_in_rms"][1:])}
    return {**n1,
        "loss": store["loss"],
        "total_drop_log10": math.log10(store["g_out"][0] / store["g_out"][-1]),
        "n2_backward_log10": sum(log_n2),
        # what N2's backward would give if each one only divided by its input's RMS (times
        # its gain): the check that the loss is that division, compounded over the layers
        "n2_predicted_log10": sum(math.log10(store["n2_gain"][i] / store["n2_in_rms"][i])
                                  for i in range(1, n)),
        "rest_of_block_log10": sum(log_rest),
        "rest_of_block_log10_by_quarter": [sum(log_rest[q * quarter:(q + 1) * quarter])
                                           for q in range(4)],
        "median_n2_factor": 10 ** median(log_n2),
        "median_block_factor": 10 ** median(log_rest),
        "median_n2_in_rms": median(store["n2_in_rms"][1:]),
        "max_n2_in_rms": max(store["n2_in_rms"][1:]),
        "median_n2_gain": median(store["n2_gain"]),
        "median_branch_rms": _median(store["branch_rms"][1:]),
        "median_branch_stream_cos": _median(store["branch_stream_cos"][1:]),
        "param_grad_ratio_2_L": store["param_grad"][1] / store["param_grad"][-1],
        "g_out_layer_2": store["g_out"][1], "g_out_layer_L": store["g_out"][-1],
    }


def _rounded(value):
    """4 significant digits: what the tables use, at a fraction of the file size."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _median(values):
    values = [v for v in values if v is not None]
    return median(values) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="a run's --save directory")
    p.add_argument("--data-path", required=True, help="the run's indexed dataset prefix")
    p.add_argument("--iterations", type=int, nargs="*", default=None,
                   help="checkpoints to probe (default: all complete ones)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--skip-tokens", type=int, default=100_000,
                   help="where in the dataset the probe batch starts")
    p.add_argument("--json", default=None, help="write every layer's numbers here")
    p.add_argument("--table", default=None, metavar="PROBES.jsonl.gz",
                   help="add every layer's numbers as one row (named --name) to this compressed "
                        "table, replacing the row of that name (docs/stability/mechanism/"
                        "probes.jsonl.gz)")
    p.add_argument("--name", default=None,
                   help="the row's name in --table (default: the name of --load's parent, the "
                        "run directory)")
    args = p.parse_args()
    sys.path.insert(0, ROOT)
    from spannorm_megatron.checkpoint import complete_iterations
    from spannorm_megatron.checkpoint.naming import iteration_dir
    from spannorm_megatron.hf.megatron_reader import load_megatron_model
    from spannorm_megatron.runtime import destroy
    from spannorm_megatron.process import initialize

    initialize(seed=1234)
    results = {}
    for it in args.iterations or complete_iterations(args.load):
        config, model = load_megatron_model(iteration_dir(args.load, it))
        seq = config.max_sequence_length
        tokens, labels = batch(args.data_path, args.batch_size, seq, args.skip_tokens)
        store = probe(model, tokens, labels)
        summary = summarize(store)
        results[it] = {"summary": summary, "layers": store}
        print(f"iteration {it:4d}: loss {summary['loss']:.3f} | layer-2/L param grad "
              f"{summary['param_grad_ratio_2_L']:.1e} | gradient L -> 1: 10^"
              f"{summary['total_drop_log10']:+.1f} = N2 backward 10^"
              f"{summary['n2_backward_log10']:+.1f} (gain / input RMS predicts 10^"
              f"{summary['n2_predicted_log10']:+.1f}) x rest of block 10^"
              f"{summary['rest_of_block_log10']:+.1f} (by quarter, bottom first: "
              + ", ".join(f"{x:+.1f}" for x in summary["rest_of_block_log10_by_quarter"])
              + f") | median N2 input RMS {summary['median_n2_in_rms']:.3f}, gain "
              f"{summary['median_n2_gain']:.3f}"
              + (f" | median branch RMS {summary['median_branch_rms']:.3f}, cos(branch, "
                 f"stream) {summary['median_branch_stream_cos']:+.2f}"
                 if summary["median_branch_rms"] is not None else "")
              + (f" | N1 (on the stream's path) backward 10^{summary['n1_backward_log10']:+.1f}"
                 f" (predicts 10^{summary['n1_predicted_log10']:+.1f}), median input RMS "
                 f"{summary['median_n1_in_rms']:.3f}" if "n1_backward_log10" in summary else ""),
              flush=True)
    destroy()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_rounded(results), f)
    if args.table:
        name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.load)))
        add_to_table(args.table, name, _rounded(results))
    return 0


def add_to_table(path: str, name: str, results: dict) -> None:
    """`results` as the row `name` of the compressed table at `path` (one row per probed run,
    {"name": ..., "iterations": {iteration: {"summary": ..., "layers": ...}}}), replacing an
    earlier row of that name; the other rows keep their order."""
    from spannorm_megatron.lab.grid.results import read_results, write_table

    rows = [r for r in read_results(path) if r.get("name") != name]
    write_table(path, rows + [{"name": name, "iterations": results}])


if __name__ == "__main__":
    sys.exit(main())
