"""The values `ModelConfig`'s flags take: their choices, the recipe this project recommends, and
the parsers of the flags whose text is more than a number or a name (--scale-init,
--moe-layer-freq)."""

from __future__ import annotations

import ast
import math
from typing import List, Union

from spannorm_megatron.placements import SCALE_INIT_NAMES

NORMALIZATIONS = ("LayerNorm", "RMSNorm")
# Megatron-LM's choices; mrope and relative are refused by `validate` with the reason.
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "mrope", "relative", "none")
UNSUPPORTED_POSITION_EMBEDDINGS = {
    "mrope": "multimodal rotary embeddings need a vision model's position ids, and this stack "
             "trains text-only GPT models",
    "relative": "T5-style relative attention bias needs Transformer Engine's attention bias, "
                "which megatron-core's GPT spec does not wire",
}
# The model this project recommends (Llama-style), as fields. Megatron-LM's defaults, and so
# ours, describe GPT-2 (LayerNorm, learned positions, GeLU, biases, tied embeddings, dropout
# 0.1); example configs and tests spell these out so that one command line builds the same
# model in both stacks (`recipe_flags` gives them as flags).
# `transformer_impl="auto"` runs the same recipe on GPUs (Transformer Engine) and CPUs.
MODERN_RECIPE = dict(normalization="RMSNorm", position_embedding_type="rope", swiglu=True,
                     add_bias_linear=False, untie_embeddings_and_output_weights=True,
                     hidden_dropout=0.0, attention_dropout=0.0, transformer_impl="auto")
SCALE_MODES = ("init", "forward")
# Megatron-LM's choices (inference_optimized is refused: its specs are for inference only),
# and ours: auto, Transformer Engine where it imports and a GPU is present, local elsewhere.
TRANSFORMER_IMPLS = ("local", "transformer_engine", "inference_optimized", "auto")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")
TOKEN_DISPATCHERS = ("alltoall", "allgather", "flex")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_DTYPES = ("fp32", "fp64")
TOKEN_DROP_POLICIES = ("probs", "position")
ROPE_TYPES = ("rope", "yarn")
FLEX_BACKENDS = ("deepep", "hybridep")
DEFAULT_BIAS_UPDATE_RATE = 1e-3  # Megatron-LM's default of --moe-router-bias-update-rate


def parse_scale_init(value: Union[str, float, None]) -> Union[str, float, None]:
    """A --scale-init value: one of SCALE_INIT_NAMES, a positive number (c x sigma), or None."""
    if value is None or (isinstance(value, str) and value in SCALE_INIT_NAMES):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not understood: use one of {list(SCALE_INIT_NAMES)} "
                             f"or a positive number") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (
            math.isfinite(number) and number > 0):
        raise ValueError(f"{value!r} must be positive: use one of {list(SCALE_INIT_NAMES)} or a "
                         f"number c > 0 (output projections get std c x sigma)")
    return float(number)


def parse_moe_layer_freq(value: Union[str, int, List[int]]) -> Union[int, List[int]]:
    """A --moe-layer-freq value: an integer N (an MoE layer every N layers, from the first), or a
    list with one 0 (dense) or 1 (MoE) per layer, written as a list (`[0,1,1,1]`) or in
    Megatron-LM's list arithmetic (`([0]*1+[1]*3)`).

    Megatron-LM evaluates the text as Python; here only list literals of 0/1, `*` by an integer
    and `+` are understood, so a config file cannot run code."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a layer frequency")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value!r} must be >= 1 (1: every layer is MoE) or a list of 0/1")
        return value
    if isinstance(value, (list, tuple)):
        return [_pattern_entry(v) for v in value]
    text = str(value).strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ValueError(f"{text!r} is not understood: give an integer N (an MoE layer every N "
                         f"layers) or a list of 0/1 per layer such as [0,1,1,1] or "
                         f"([0]*1+[1]*3)") from None
    result = _evaluate_pattern(tree, text)
    if isinstance(result, int) and result < 1:
        raise ValueError(f"{text!r} must be >= 1 (1: every layer is MoE) or a list of 0/1")
    return result


def _pattern_entry(value) -> int:
    if isinstance(value, bool) or value not in (0, 1):
        raise ValueError(f"{value!r} is not 0 (dense layer) or 1 (MoE layer)")
    return int(value)


def _evaluate_pattern(node, text: str):
    def fail():
        raise ValueError(f"{text!r} is not understood: give an integer N or a list of 0/1 per "
                         f"layer such as [0,1,1,1] or ([0]*1+[1]*3)")

    if isinstance(node, ast.Constant) and isinstance(node.value, int) \
            and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.List):
        values = [_evaluate_pattern(e, text) for e in node.elts]
        if any(isinstance(v, list) for v in values):
            fail()
        return [_pattern_entry(v) for v in values]
    if isinstance(node, ast.BinOp):
        left, right = _evaluate_pattern(node.left, text), _evaluate_pattern(node.right, text)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult):
            if isinstance(left, list) and isinstance(right, int) and right >= 0:
                return left * right
            if isinstance(right, list) and isinstance(left, int) and left >= 0:
                return right * left
    fail()
