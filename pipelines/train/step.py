"""What one training step is: the network, optimiser and learning-rate schedule a config describes,
and the step itself (loss → backward → clip → Adam → EMA).

Shared by the Ray Train worker loop and the plain single-process loop of
benchmarks/train.py, so the benchmark measures Ray's overhead and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cdm_core.ddm import ddm_loss, sample_ddm_timesteps
from cdm_core.ema import EMA
from cdm_core.networks import MLPClassifier, MLPDenoiser, UNetClassifier, UNetDenoiser, unet_preset
from cdm_core.objective import cdm_loss, dequantize, draw_noise, drop_labels, log_prior, sample_timesteps
from cdm_core.schedules import Schedule, get_schedule
from pipelines.train import collectives
from pipelines.train.config import OptimSection, TrainConfig


def build_network(config: TrainConfig, channels: int, image_size: int | None = None) -> nn.Module:
    """The CDM classifier or DDM denoiser of `model.preset` with the config's overrides (raises ValueError).

    `build_network(config, *data_shape[:2])`: a U-Net for (C, H, W) data (H = W = image_size); for (D,)
    vectors (image_size None, `channels` = D) the MLP of the `mlp` preset, the only one for vectors.
    Downsampling, GroupNorm eps and the fewest channels per GroupNorm group are the preset's (the official
    code's) and no config field; the network's spec, which every checkpoint stores, records them.
    """
    m = config.model
    if (image_size is None) != (m.preset == "mlp"):
        if image_size is None:
            raise ValueError(
                f"preset {m.preset!r} is a U-Net for (C, H, W) data; (D,) vectors take model.preset = 'mlp'"
            )
        raise ValueError("preset 'mlp' is for (D,) vectors; (C, H, W) data takes a U-Net preset (tiny, mnist, …)")
    if image_size is None:
        num_labels = config.data.num_labels if m.conditional else None
        sizes = {"hidden": m.mlp_hidden or 256, "depth": m.mlp_depth or 4}
        mlp = MLPClassifier if m.kind == "cdm" else MLPDenoiser
        return mlp(channels, config.schedule.T, num_labels=num_labels, **sizes)
    unet = unet_preset(m.preset, channels, image_size, config.data.num_labels if m.conditional else None)
    unet = dataclasses.replace(unet, **m.unet_overrides())  # re-runs UNetConfig's checks
    cls = UNetClassifier if m.kind == "cdm" else UNetDenoiser
    return cls(unet, config.schedule.T)


def build_schedule(config: TrainConfig) -> Schedule:
    return get_schedule(config.schedule.name, config.schedule.T, **config.schedule.params)


def build_prior(config: TrainConfig) -> torch.Tensor | None:
    """The class prior as float64, checked (positive mass at 0 and T+1, sums to 1); None = uniform."""
    if config.loss.prior is None:
        return None
    return log_prior(torch.tensor(config.loss.prior, dtype=torch.float64), config.schedule.T + 2).exp()


def lr_factor(optim: OptimSection, step: int) -> float:
    """Multiplier of optim.lr for optimiser step number `step` (1-based): linear warm-up, then step decay.

    As the official code's `min((k + 1) / 5000, 1) * 0.1 ** (k // 200000)` for its 0-based step k = step − 1:
    the first step takes lr/warmup_steps, and steps decay_every+1 … 2·decay_every the first decayed lr.
    """
    warm = min(1.0, step / optim.warmup_steps) if optim.warmup_steps > 0 else 1.0
    decay = optim.decay_factor ** ((step - 1) // optim.decay_every) if optim.decay_every > 0 else 1.0
    return warm * decay


def build_optimizer(
    model: nn.Module, optim: OptimSection
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    cls = torch.optim.AdamW if optim.weight_decay > 0 else torch.optim.Adam
    opt = cls(model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    # LambdaLR calls the factor with the number of scheduler steps taken so far (0 before
    # the first optimiser step), so +1 gives the 1-based number of the step about to run.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda done: lr_factor(optim, done + 1))
    return opt, sched


@dataclass
class StepResult:
    loss: torch.Tensor  # detached scalars on the model's device
    ce: torch.Tensor
    mse: torch.Tensor
    grad_norm: float  # the same on every worker under DDP (gradients are all-reduced)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.grad_norm)


class TrainStep:
    """One optimiser step of a CDM (Algorithm 1) or DDM on a batch; skips the update if gradients are not finite.

    The non-finite check uses the gradient norm: under DDP it is identical on every
    worker, so all workers take the same decision without an extra collective.

    With `train.compile` the objective runs through `torch.compile`, a CDM's input gradient
    through `torch.func.grad` (`cdm_loss(input_grad="func")`): `torch.autograd.grad(create_graph=True)`,
    the eager form, is a double backward that compilation refuses. The random draws (label dropout,
    t, ε, and the dequantization noise with `data.dequantize`) stay outside the compiled function, from
    the same generator in the same order, so a compiled step sees the eager step's t and ε; dropout
    inside the network draws from torch's default generator in both (the compiled kernels draw it
    differently, so with dropout > 0 the masks, not their distribution, differ from eager). DDP cannot wrap a network called inside
    `torch.func.grad` (its forward hooks do not run there), so a compiled step is given the bare
    network and averages the gradients over the workers itself (`collectives.average_gradients`),
    after starting from rank 0's weights as DDP would. `compile_backend` is torch.compile's backend
    (Inductor, the one that makes kernels; the tests also trace through "aot_eager", which runs the
    same captured forward and backward graphs with eager kernels, without minutes of C++ compilation).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        ema: EMA,
        optimizer,
        scheduler,
        schedule: Schedule,
        prior: torch.Tensor | None,
        device: torch.device,
        generator: torch.Generator,
        compile_backend: str = "inductor",
    ):
        self.config = config
        self.model = model  # possibly DDP-wrapped
        self.ema = ema
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.schedule = schedule.to(device=device, dtype=torch.float32)
        self.prior = prior
        self.device = device
        self.generator = generator  # on `device`: t, noise and label dropout
        self.autocast = config.train.precision == "bf16"
        self.null_label = config.data.num_labels if config.model.conditional else None
        self.poison_loss = False  # set by fault injection (tests): turns the next loss into NaN
        self.compiled = None
        self.average_gradients = False
        if config.train.compile:
            if isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError("a compiled step takes the bare network: it averages the gradients itself")
            objective = functools.partial(self.objective, input_grad="func")
            self.compiled = torch.compile(objective, backend=compile_backend)
            self.average_gradients = collectives.world_size() > 1
            collectives.broadcast_parameters(model)

    def draw(
        self, x: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The step's random inputs from its generator, in this order: labels after dropout (None if
        unconditional), noise levels t, noise ε."""
        y = None
        if self.null_label is not None:
            y = drop_labels(labels, self.config.model.label_dropout, self.null_label, generator=self.generator)
        if self.config.model.kind == "cdm":
            t = sample_timesteps(
                x.shape[0], self.schedule.num_classes, self.prior, generator=self.generator, device=x.device
            )
        else:
            t = sample_ddm_timesteps(x.shape[0], self.schedule, generator=self.generator, device=x.device)
        return y, t, draw_noise(x, self.generator)

    def dequantized(self, x: torch.Tensor) -> torch.Tensor:
        """x + u·2/255, u ~ U[0, 1) from the step's generator (`data.dequantize`; drawn after t and ε, so a run
        without it draws the same t and ε, and its state is in the checkpoints' RNG streams); else x itself."""
        return dequantize(x, self.generator) if self.config.data.dequantize else x

    def objective(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None,
        t: torch.Tensor,
        noise: torch.Tensor,
        input_grad: str = "autograd",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, ce, mse) of the training objective for given draws (a DDM's ce is 0)."""
        cfg = self.config
        if cfg.model.kind == "cdm":
            logits_fn = model if y is None else (lambda z: model(z, y))
            parts = cdm_loss(
                logits_fn,
                x,
                self.schedule,
                w_ce=cfg.loss.w_ce,
                w_mse=cfg.loss.w_mse,
                t=t,
                noise=noise,
                input_grad=input_grad,
            )
            return parts.total, parts.ce, parts.mse
        eps_model = model if y is None else (lambda z, t_: model(z, t_, y))
        mse = ddm_loss(eps_model, x, self.schedule, t=t, noise=noise)
        return mse, torch.zeros_like(mse), mse

    def loss(
        self, x: torch.Tensor, labels: torch.Tensor | None, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, ce, mse) of the training objective on a batch, for `model` (default: the one being
        trained, compiled if `train.compile`; any other, e.g. a probe, runs eagerly)."""
        y, t, noise = self.draw(x, labels)
        x = self.dequantized(x)
        model, objective = self._model_and_objective(model)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return objective(model, x, y, t, noise)

    def _model_and_objective(self, model: nn.Module | None) -> tuple[nn.Module, Callable]:
        """The model trained and its (compiled, with `train.compile`) objective; any other model runs eagerly."""
        if model is None:
            return self.model, self.compiled if self.compiled is not None else self.objective
        return model, self.objective

    def accumulate(
        self, x: torch.Tensor, labels: torch.Tensor | None, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add the gradient of the batch's loss to the parameters' `.grad`, in `train.grad_accum` micro-batches;
        returns the batch's (total, ce, mse), detached.

        The whole batch's draws come first, from the generator in the order one batch takes them, and each
        micro-batch's mean loss is weighted 1/k: the gradient is the one batch's, to float32 rounding. Under
        DDP only the last micro-batch's backward all-reduces (`no_sync` before it). `model` as in `loss`.
        """
        model, objective = self._model_and_objective(model)
        k = self.config.train.grad_accum
        y, t, noise = self.draw(x, labels)
        x = self.dequantized(x)
        size = x.shape[0] // k
        sums = torch.zeros(3, device=x.device)
        for i in range(k):
            part = slice(i * size, (i + 1) * size)
            last = i == k - 1
            quiet = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last else None
            with quiet or contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    loss, ce, mse = objective(model, x[part], None if y is None else y[part], t[part], noise[part])
                if self.poison_loss and model is self.model:
                    loss = loss * float("nan")
                (loss / k).backward()
            sums += torch.stack([loss.detach(), ce.detach(), mse.detach()]).float()
        if model is self.model:
            self.poison_loss = False
        total, ce, mse = (sums / k).unbind()
        return total, ce, mse

    def backward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Gradients of the step's loss in the parameters' `.grad` (averaged over the workers);
        returns (total, ce, mse)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, ce, mse = self.accumulate(x, labels)
        if self.average_gradients:
            collectives.average_gradients(list(self.model.parameters()))
        return loss, ce, mse

    def finite_from(
        self, weights: dict[str, torch.Tensor], probe: nn.Module, x: torch.Tensor, labels: torch.Tensor | None
    ) -> bool:
        """Whether a step from these weights (a checkpoint's) has a finite loss and gradient on this batch.

        `probe` is a spare copy of the network (not the DDP-wrapped one: no collectives here).
        """
        probe.load_state_dict(weights)
        probe.zero_grad(set_to_none=True)
        loss, _, _ = self.accumulate(x, labels, probe)  # in micro-batches: the step's memory, not the batch's
        norm = torch.nn.utils.clip_grad_norm_(probe.parameters(), float("inf"))
        return math.isfinite(float(loss)) and math.isfinite(float(norm))

    def __call__(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> StepResult:
        loss, ce, mse = self.backward(x, labels)
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        result = StepResult(loss.detach(), ce.detach(), mse.detach(), float(norm))
        if result.finite:
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(self.model)
        return result


def fresh_train_step(
    config: TrainConfig,
    channels: int,
    image_size: int,
    device: torch.device | None = None,
    seed: int = 0,
    compile_backend: str = "inductor",
) -> TrainStep:
    """A TrainStep on a new network (initialised from `seed`), with its optimiser, EMA, schedule and prior:
    the step outside Ray Train, for benchmarks and tests."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    model = build_network(config, channels, image_size).to(device)
    optimizer, scheduler = build_optimizer(model, config.optim)
    return TrainStep(
        config,
        model,
        EMA(model, config.ema.decay, config.ema.start_step),
        optimizer,
        scheduler,
        build_schedule(config),
        build_prior(config),
        device,
        torch.Generator(device=device).manual_seed(seed),
        compile_backend,
    )
