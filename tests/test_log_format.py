"""The training log's lines (spannorm_megatron/training/log_format.py): the text is
Megatron-LM's, byte for byte, and the parser beside the formatter reads every field back."""

import math
from datetime import datetime

import pytest

from spannorm_megatron.training.log_format import (
    log_line,
    parse_lines,
    parse_train_line,
    parse_validation_line,
    validation_line,
)
from spannorm_megatron.training.loop import StepResult

NOW = datetime(2026, 1, 2, 3, 4, 5)


def test_the_line_is_megatron_lms_byte_for_byte():
    step = StepResult(loss=6.282, grad_norm=0.9012, skipped=False, learning_rate=1e-3)
    assert log_line(10, 300, 80, 0.1205, step, 8, 4000.4, 0.0123, 0, now=NOW) == (
        " [2026-01-02 03:04:05] iteration       10/     300 | consumed samples:           80 | "
        "elapsed time per iteration (ms): 120.5 | learning rate: 1.000000E-03 | "
        "global batch size:     8 | lm loss: 6.282000E+00 | loss scale: 1.0 | grad norm: 0.901 | "
        "number of skipped iterations:   0 | tokens/s: 4000 | MFU: 1.23% |")
    assert validation_line(100, 4.1) == (
        "-" * 100 + "\n validation loss at iteration 100 | lm loss value: 4.100000E+00 | "
        "lm loss PPL: 6.034029E+01 | \n" + "-" * 100)


def test_every_field_round_trips():
    step = StepResult(loss=3.14159, grad_norm=12.3456, skipped=False, learning_rate=9e-9)
    line = log_line(1234, 5000, 98765, 0.98765, step, 64, 123456.7, 0.4567, 7,
                    learning_rate=2.5e-4, tflops=87.65, num_zeros=42.0, params_norm=321.987,
                    loss_scale=65536.0, now=NOW)
    parsed = parse_train_line(line)
    assert (parsed.iteration, parsed.train_iters, parsed.time) == (1234, 5000, NOW)
    assert parsed.consumed_samples == 98765 and parsed.global_batch_size == 64
    assert parsed.step_ms == pytest.approx(987.6, abs=0.05)
    assert parsed.tflops == pytest.approx(87.65, abs=0.051)      # printed to 0.1
    assert parsed.learning_rate == 2.5e-4                        # the one given, not the step's
    assert parsed.lm_loss == pytest.approx(3.14159, rel=1e-6)
    assert parsed.loss_scale == 65536.0
    assert parsed.grad_norm == pytest.approx(12.346, abs=5e-4)
    assert parsed.num_zeros == 42.0 and parsed.params_norm == pytest.approx(321.987)
    assert parsed.skipped == 7
    assert parsed.tokens_per_second == 123457
    assert parsed.mfu == pytest.approx(0.4567, abs=5e-5)         # printed as 45.67%


def test_fields_not_printed_or_not_on_this_rank_are_none():
    step = StepResult(loss=None, grad_norm=None, skipped=True, learning_rate=1e-3)
    parsed = parse_train_line(log_line(3, 10, 24, 0.5, step, 8, 100.0, None, 1, now=NOW))
    assert parsed.lm_loss is None and parsed.grad_norm is None  # printed "n/a"
    assert None is parsed.tflops is parsed.num_zeros is parsed.params_norm is parsed.mfu
    assert parsed.skipped == 1 and parsed.learning_rate == 1e-3


def test_a_log_reads_back_in_order_with_other_lines_ignored():
    good = StepResult(loss=5.0, grad_norm=1.0, skipped=False, learning_rate=1e-3)
    bad = StepResult(loss=math.nan, grad_norm=math.inf, skipped=False, learning_rate=1e-3)
    text = "\n".join([
        "> building the model ...", "a warning | with: pipes",
        log_line(1, 2, 8, 0.1, good, 8, 10.0, None, 0, now=NOW),
        " loss spike at iteration 1: lm loss 5.0000 > 1.5 x running median 3.0000",
        "[rank1]:" + log_line(2, 2, 16, 0.1, bad, 8, 10.0, None, 0, now=NOW),
        validation_line(2, 4.5)])
    train, valid = parse_lines(text)
    assert [line.iteration for line in train] == [1, 2]
    assert train[0].lm_loss == 5.0 and math.isnan(train[1].lm_loss)
    assert math.isinf(train[1].grad_norm)
    assert [(v.iteration, v.lm_loss) for v in valid] == [(2, 4.5)]
    assert valid[0].ppl == pytest.approx(math.exp(4.5), rel=1e-6)
    nan = parse_validation_line(" validation loss at iteration 7 | lm loss value: NAN |")
    assert nan.iteration == 7 and math.isnan(nan.lm_loss) and nan.ppl is None


def test_a_loss_that_is_not_a_number_has_no_perplexity():
    """min(20, NaN) is 20 in Python: the capped perplexity once printed 4.85E+08 for a NaN."""
    assert "lm loss value: NAN | lm loss PPL: NAN |" in validation_line(3, math.nan)
    assert "lm loss PPL: 4.851652E+08" in validation_line(3, math.inf)  # capped, as before

