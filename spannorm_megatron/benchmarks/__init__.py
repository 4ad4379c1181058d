"""The benchmarks: what a change costs in speed and memory, measured the same way every time.

One module a command (each with `main`, installed as a console script):
`training` (`spannorm-benchmark`: every norm placement's training step against PreNorm's),
`moe` (`spannorm-benchmark-moe`: expert-parallel MoE variants against the dense model),
`conversion` (`spannorm-benchmark-conversion`: the Hugging Face conversion's time and memory),
`data` (`spannorm-benchmark-data`: preprocessing throughput).
"""
