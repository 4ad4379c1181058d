"""Training: model/optimizer setup on megatron-core's DDP and optimizers, and the GPT step."""
