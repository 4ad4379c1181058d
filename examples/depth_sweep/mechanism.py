#!/usr/bin/env python
"""Signals around the moment of collapse, for the grid's collapsing and training runs
(why deep SpanNorm runs collapse): layer-2/L gradient ratio, update ratios, branch RMS and N2's input RMS
(estimated from its logged parts), before / at / after the collapse. See
spannorm_megatron/lab/mechanism.py for the definitions.

    python examples/depth_sweep/mechanism.py [--results runs/grid/results.jsonl]
        [--out DIR] [--into docs/stability/mechanism.md] [--threshold X] [--min-depth 128]

Prints the table (medians per placement and outcome); writes mechanism.md and mechanism.json
(every run's signals at the three moments) into --out, and rewrites the tables inside --into's
document in place.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from spannorm_megatron.lab import mechanism

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=os.path.join(ROOT, "runs", "grid", "results.jsonl"),
                   help="a grid's results.jsonl (also an export: docs/stability/grid/)")
    p.add_argument("--out", default=None, help="write mechanism.md / mechanism.json here")
    p.add_argument("--into", default=None, metavar="DOC.md",
                   help="rewrite the tables inside this Markdown document, in place (the "
                        "stability docs: docs/stability/mechanism.md)")
    p.add_argument("--threshold", type=float, default=None,
                   help="a run collapses when its layer-2/L gradient ratio falls below this "
                        "(default: the collapse alarm's, spannorm-train's --collapse-grad-ratio)")
    p.add_argument("--min-depth", type=int, default=128, help="runs this deep or deeper")
    args = p.parse_args()
    if not os.path.isfile(args.results):
        print(f"error: {args.results} does not exist", file=sys.stderr)
        sys.exit(2)
    runs = mechanism.analyse(mechanism.load_rows(args.results), args.threshold, args.min_depth)
    print(mechanism.table(runs))
    threshold = mechanism.collapse_threshold() if args.threshold is None else args.threshold
    if args.out:
        for path in mechanism.write_report(runs, args.out, threshold):
            print(f"wrote {path}")
    if args.into:
        print(f"wrote {mechanism.update_document(args.into, runs, threshold)}")
