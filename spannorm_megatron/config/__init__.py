"""The run's configuration: one module a section, every field a `spannorm-train` flag declared
once with `option()` (`options`), named, defaulted and meant as in Megatron-LM.

    model        ModelConfig: what model to build (placement, shapes, attention, MoE, init)
    model_values the values ModelConfig's flags take, and the parsers of the composite ones
    parallel     ParallelConfig: the layout over ranks and the pipeline schedule
    training     TrainingConfig: batch, optimizer, learning-rate schedule, run length
    performance  PerformanceConfig: precision, fusions, recompute, overlap
    data         DataConfig: --data-path, --split and the loader
    tokenizer    TokenizerConfig: --tokenizer-type and its files
    logging      LoggingConfig, MetricsLoggingConfig: what the run reports
    checkpoint   CheckpointConfig: saving and resuming
    hooks        RunHooksConfig: profiler, garbage collection, memory release
    spellings    MegatronSpellings: Megatron-LM's alternative spellings of other flags
    unavailable  Unavailable: Megatron-LM flags refused here, or without effect
    job          JobConfig: every section of one run, as `spannorm-train`'s parser returns it

Importing a section is cheap: no megatron-core, model or runtime module loads with it.
"""
