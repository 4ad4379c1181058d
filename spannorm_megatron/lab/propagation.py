"""Signal propagation through deep models: per-layer forward and backward signals, at
initialization and after some optimizer steps on a fixed batch.

Why: SpanNorm's theory is that Scale Init keeps the residual stream and the gradients bounded at
any depth, where PostNorm's gradients shrink geometrically and PreNorm's stream grows. These
are per-layer quantities; a sweep over placements x depths x output-projection inits shows
directly where each placement's signals stay bounded and where they do not.

Per layer l = 1..L (global layer number), measured in one forward + backward of the mean
next-token loss on the fixed batch (`spannorm_megatron.lab.batch`):

    output_rms       RMS of the layer's output x_l (the residual stream after the layer)
    attention_rms    RMS of the attention branch output A(.) (what the layer adds or normalizes)
    mlp_rms          RMS of the MLP branch output F(.)
    input_grad_norm  L2 norm of dLoss/dx_{l-1}: the gradient reaching the layer's input (the
                     embedding output for l = 1), over all tokens of the batch
    param_grad_norm  L2 norm of the gradients of all the layer's parameters
    cosine_prev      mean over tokens of cos(x_l, x_{l-1}): how much the layer changes each
                     token's representation (1 = the layer does nothing; depth is wasted)
    token_cosine     mean cosine between different tokens of the same sequence in x_l
                     (1 = every token looks the same: rank collapse)

The RMS and parameter-gradient signals follow the definitions of
`spannorm_megatron.metrics.stability` (what a training run writes to TensorBoard): RMS over all
tokens of the batch, branch outputs with the linear bias and any `scale_mode='forward'` branch
scale applied. (They are measured by hooks here because `StabilitySignals` does not accept a
plain, un-wrapped GPTModel yet.)

Training (optional): `measure_at` lists the optimizer-step counts at which to measure
(0 = initialization). Between them the model trains on the same fixed batch with AdamW
(betas 0.9/0.95, eps 1e-8, no weight decay), a constant learning rate and global-norm gradient
clipping. The forward/backward of step s+1 is the measurement "after s steps" (same weights), so
measuring costs nothing extra.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.lab.batch import FixedBatch
from spannorm_megatron.runtime import current_device

LAYER_SIGNALS = ("output_rms", "attention_rms", "mlp_rms", "input_grad_norm",
                 "param_grad_norm", "cosine_prev", "token_cosine")
"""Per-layer signals, in the column order of the CSV."""

ScaleInit = Union[str, float]


@dataclass
class ProbeSettings:
    """What every probed model shares (only placement, depth and scale_init vary)."""

    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    """None: 4 x hidden_size (the ModelConfig default)."""
    init_method_std: Optional[float] = None
    """Base init std sigma; None: 1/sqrt(hidden_size)."""
    normalization: str = "RMSNorm"
    seed: int = 1234
    """Model init seed; every model is built right after re-seeding with it."""
    measure_at: Sequence[int] = (0,)
    """Optimizer-step counts at which to measure; 0 is initialization."""
    lr: float = 1e-3
    clip_grad: float = 1.0
    """Global gradient-norm clipping during training (0 disables)."""

    @property
    def resolved_init_std(self) -> float:
        if self.init_method_std is not None:
            return self.init_method_std
        return 1.0 / math.sqrt(self.hidden_size)


@dataclass
class ProbeResult:
    """The per-layer signals of one model at one step count."""

    placement: str
    depth: int
    scale_init: str
    """As requested (`megatron`, `sqrt_depth`, `none`, a number, or `default`)."""
    resolved_scale_init: str
    """What the model used (the placement's default when `scale_init` is `default`)."""
    output_projection_std: float
    step: int
    loss: float
    layers: Dict[str, List[float]]
    """signal -> values for layers 1..L (index 0 is layer 1)."""

    def value(self, signal: str, layer: int) -> float:
        """`signal` at 1-based `layer`."""
        return self.layers[signal][layer - 1]


@dataclass
class TrainingTrace:
    """Loss and global gradient norm (before clipping) of every step on the fixed batch."""

    placement: str
    depth: int
    scale_init: str
    losses: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    seconds: float = 0.0


def model_config(placement: str, depth: int, scale_init: ScaleInit, settings: ProbeSettings,
                 vocab_size: int, seq_length: int) -> ModelConfig:
    """The ModelConfig of one probed model (validates the values: ConfigError if bad)."""
    return ModelConfig.recommended(
        norm_placement=placement,
        num_layers=depth,
        hidden_size=settings.hidden_size,
        num_attention_heads=settings.num_attention_heads,
        ffn_hidden_size=settings.ffn_hidden_size,
        normalization=settings.normalization,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        init_method_std=settings.resolved_init_std,
        scale_init=None if scale_init == "default" else scale_init,
        transformer_impl="local",
    )


def check_grid(placements: Sequence[str], depths: Sequence[int],
               scale_inits: Sequence[ScaleInit], settings: ProbeSettings) -> None:
    """Raise ConfigError for any value of the grid that cannot work, before any model is built."""
    from spannorm_megatron.placements import get_placement

    if not placements or not depths or not scale_inits:
        raise ConfigError("Give at least one placement, one depth and one scale_init.")
    for placement in placements:
        get_placement(placement)
    for depth in depths:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            raise ConfigError(f"depth {depth!r} must be an integer >= 2 (the summary compares "
                              f"layer 2 with the last layer).")
    steps = list(settings.measure_at)
    if not steps or any(not isinstance(s, int) or s < 0 for s in steps):
        raise ConfigError(f"measure_at={steps} must be step counts >= 0 (0 = initialization).")
    if not settings.lr > 0:
        raise ConfigError(f"lr={settings.lr} must be > 0.")
    if settings.init_method_std is not None and not settings.init_method_std > 0:
        raise ConfigError(f"init_method_std={settings.init_method_std} must be > 0.")
    for placement in placements:
        for scale_init in scale_inits:
            # ModelConfig validates the placement/scale_init/shape combination.
            model_config(placement, depths[0], scale_init, settings, 256, 8)


def build_probe_model(config: ModelConfig, seed: int):
    """A single-process GPTModel built right after re-seeding (process groups must exist:
    `spannorm_megatron.process.initialize`)."""
    from spannorm_megatron.model import build_gpt_model, transformer_config
    from spannorm_megatron.runtime import set_seed

    set_seed(seed)
    return build_gpt_model(config, transformer_config(config))


class _LayerProbe:
    """Forward hooks (and gradient hooks on the layer inputs) for one measured step."""

    def __init__(self, model):
        self.layers = list(model.decoder.layers)
        self.handles = []
        self.reset()

    def reset(self) -> None:
        n = len(self.layers)
        self.output_rms = [math.nan] * n
        self.attention_rms = [math.nan] * n
        self.mlp_rms = [math.nan] * n
        self.input_grad = [math.nan] * n
        self.cosine_prev = [math.nan] * n
        self.token_cosine = [math.nan] * n
        self._inputs: List[Optional[torch.Tensor]] = [None] * n

    def enable(self) -> None:
        for index, layer in enumerate(self.layers):
            scale = float(getattr(layer, "branch_scale", 1.0))
            self.handles.append(layer.register_forward_pre_hook(self._pre_hook(index),
                                                                with_kwargs=True))
            self.handles.append(layer.register_forward_hook(self._post_hook(index)))
            self.handles.append(layer.self_attention.register_forward_hook(
                self._branch_hook(self.attention_rms, index, scale)))
            self.handles.append(layer.mlp.register_forward_hook(
                self._branch_hook(self.mlp_rms, index, scale)))

    def param_grad_norms(self) -> List[float]:
        """L2 norm of each layer's parameter gradients (after backward)."""
        norms = []
        for layer in self.layers:
            grads = [p.grad.detach() for p in layer.parameters() if p.grad is not None]
            norms.append(_global_norm(grads) if grads else math.nan)
        return norms

    @staticmethod
    def _branch_hook(store: List[float], index: int, scale: float):
        def hook(_module, _inputs, output):
            value, bias = (output[0], output[1]) if isinstance(output, (tuple, list)) else (
                output, None)
            value = value.detach().float()
            if bias is not None:
                value = value + bias.detach().float()
            store[index] = _rms(value) * scale
        return hook

    def disable(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._inputs = [None] * len(self.layers)

    def _pre_hook(self, index: int):
        def hook(_module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self._inputs[index] = hidden.detach()
            if hidden.requires_grad:
                def store(grad, index=index):
                    self.input_grad[index] = torch.linalg.vector_norm(
                        grad.detach(), dtype=torch.float64).item()
                hidden.register_hook(store)
        return hook

    def _post_hook(self, index: int):
        def hook(_module, _inputs, output):
            out = (output[0] if isinstance(output, (tuple, list)) else output).detach().float()
            previous = self._inputs[index].float()
            self.output_rms[index] = _rms(out)
            # [seq, batch, hidden]: cosine per token, then the mean.
            self.cosine_prev[index] = F.cosine_similarity(out, previous, dim=-1).mean().item()
            self.token_cosine[index] = mean_token_cosine(out)
        return hook


def _rms(tensor: torch.Tensor) -> float:
    return torch.linalg.vector_norm(tensor, dtype=torch.float64).item() / math.sqrt(
        max(tensor.numel(), 1))


def _global_norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(torch.linalg.vector_norm(t, dtype=torch.float64).item() ** 2
                         for t in tensors))


def mean_token_cosine(hidden: torch.Tensor) -> float:
    """Mean cosine similarity between distinct token positions of the same sequence.

    `hidden` is [seq, batch, hidden]. With unit vectors u_i, sum_{i != j} cos = |sum u|^2 - n.
    """
    seq = hidden.shape[0]
    if seq < 2:
        return math.nan
    units = F.normalize(hidden.double(), dim=-1)
    total = units.sum(dim=0).pow(2).sum(dim=-1)  # [batch]
    return ((total - seq) / (seq * (seq - 1))).mean().item()


def _loss(model, batch: FixedBatch) -> torch.Tensor:
    per_token = model(batch.tokens, batch.positions, attention_mask=None, labels=batch.labels)
    return per_token.float().mean()


def probe(model, batch: FixedBatch, *, train_steps: Iterable[int] = (0,), lr: float = 1e-3,
          clip_grad: float = 1.0, on_step: Optional[Callable[[int, float], None]] = None):
    """Measure `model` after each step count in `train_steps`, training in between.

    Returns (signals, trace): signals maps step -> (loss, {signal: [per-layer values]}), trace is
    (losses, grad_norms) of every forward/backward (index s = after s optimizer steps).
    """
    steps = sorted(set(int(s) for s in train_steps))
    last = steps[-1]
    hooks = _LayerProbe(model)
    optimizer = None
    if last > 0:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                      weight_decay=0.0)
    model.train()
    measured = {}
    losses, grad_norms = [], []
    for step in range(last + 1):
        measuring = step in steps
        model.zero_grad(set_to_none=True)
        if measuring:
            hooks.reset()
            hooks.enable()
        try:
            loss = _loss(model, batch)
            loss.backward()
        finally:
            if measuring:
                hooks.disable()
        loss_value = loss.item()
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = _global_norm([p.grad.detach() for p in params]) if params else math.nan
        losses.append(loss_value)
        grad_norms.append(grad_norm)
        if measuring:
            per_layer = {
                "output_rms": list(hooks.output_rms),
                "attention_rms": list(hooks.attention_rms),
                "mlp_rms": list(hooks.mlp_rms),
                "input_grad_norm": list(hooks.input_grad),
                "param_grad_norm": hooks.param_grad_norms(),
                "cosine_prev": list(hooks.cosine_prev),
                "token_cosine": list(hooks.token_cosine),
            }
            measured[step] = (loss_value, per_layer)
        if on_step is not None:
            on_step(step, loss_value)
        if step == last:
            break
        if clip_grad and clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return measured, (losses, grad_norms)


@dataclass
class PropagationRun:
    """Everything one sweep measured, with the settings that produced it."""

    settings: ProbeSettings
    batch_description: str
    seq_length: int
    batch_size: int
    vocab_size: int
    placements: List[str]
    depths: List[int]
    scale_inits: List[str]
    results: List[ProbeResult] = field(default_factory=list)
    traces: List[TrainingTrace] = field(default_factory=list)
    seconds: float = 0.0

    def meta(self) -> dict:
        settings = asdict(self.settings)
        settings["measure_at"] = sorted(set(settings["measure_at"]))
        settings["init_method_std"] = self.settings.resolved_init_std
        return {
            "settings": settings,
            "tokens": self.batch_description,
            "seq_length": self.seq_length,
            "batch_size": self.batch_size,
            "vocab_size": self.vocab_size,
            "placements": self.placements,
            "depths": self.depths,
            "scale_inits": self.scale_inits,
            "seconds": round(self.seconds, 1),
            "versions": _versions(),
        }


def _versions() -> dict:
    import platform

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        versions["megatron-core"] = version("megatron-core")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    return versions


def run_propagation(placements: Sequence[str], depths: Sequence[int],
                    scale_inits: Sequence[ScaleInit], settings: ProbeSettings,
                    batch: FixedBatch, log: Optional[Callable[[str], None]] = print
                    ) -> PropagationRun:
    """Probe every (placement, depth, scale_init) combination; process groups must exist."""
    from spannorm_megatron.model.scale_init import output_projection_std, resolved_scale_init

    check_grid(placements, depths, scale_inits, settings)
    batch = batch.to(current_device())
    seq_length = batch.tokens.shape[1]
    run = PropagationRun(settings=settings, batch_description=batch.description,
                         seq_length=seq_length, batch_size=batch.tokens.shape[0],
                         vocab_size=batch.vocab_size, placements=list(placements),
                         depths=list(depths), scale_inits=[str(s) for s in scale_inits])
    combos = [(p, d, s) for s in scale_inits for d in depths for p in placements]
    started = time.perf_counter()
    for number, (placement, depth, scale_init) in enumerate(combos, 1):
        t0 = time.perf_counter()
        config = model_config(placement, depth, scale_init, settings, batch.vocab_size, seq_length)
        model = build_probe_model(config, settings.seed)
        measured, (losses, grad_norms) = probe(
            model, batch, train_steps=settings.measure_at, lr=settings.lr,
            clip_grad=settings.clip_grad)
        for step, (loss, per_layer) in sorted(measured.items()):
            run.results.append(ProbeResult(
                placement=placement, depth=depth, scale_init=str(scale_init),
                resolved_scale_init=str(resolved_scale_init(config)),
                output_projection_std=output_projection_std(config), step=step, loss=loss,
                layers=per_layer))
        seconds = time.perf_counter() - t0
        if len(losses) > 1:
            run.traces.append(TrainingTrace(placement, depth, str(scale_init), losses,
                                            grad_norms, seconds))
        del model
        if log is not None:
            first = run.results[-len(measured)]
            last_result = run.results[-1]
            ratio = grad_ratio(first)
            text = (f"[{number:3d}/{len(combos)}] {placement:>14s} L={depth:<4d} "
                    f"scale_init={str(scale_init):<10s} loss {first.loss:.3f}")
            if last_result.step > 0:
                text += f" -> {last_result.loss:.3f} after {last_result.step} steps"
            text += (f" | grad(layer 2 in)/grad(layer {depth} in) {ratio:.3g}"
                     f" at step {first.step}")
            log(f"{text} | {seconds:.1f}s")
    run.seconds = time.perf_counter() - started
    return run


def grad_ratio(result: ProbeResult, early: int = 2) -> float:
    """|dLoss/d input of layer `early`| / |dLoss/d input of the last layer|."""
    grads = result.layers["input_grad_norm"]
    last = grads[-1]
    if not (math.isfinite(last) and last > 0):
        return math.nan
    return grads[min(early, len(grads)) - 1] / last
