"""The training loop on accelerate: deterministic batch order, checkpoints that resume exactly, named hooks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from mmpeft.core.distributed import process_state
from mmpeft.data.loader import EpochLoader
from mmpeft.train.checkpoint import read_checkpoint, write_checkpoint
from mmpeft.train.tracking import epoch_metrics, finish_tracking, start_tracking, tracker_arguments

if TYPE_CHECKING:
    from accelerate import Accelerator

    from mmpeft.backbones import Backbone
    from mmpeft.data import ImageDataset
    from mmpeft.objectives import Objective
    from mmpeft.specs import TrainSpec

logger = logging.getLogger("mmpeft")

CHECKPOINT_DIR = "checkpoints"
HOOK_NAMES = ("on_train_start", "transform_batch", "extra_loss", "on_epoch_end", "on_train_end")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Callback:
    """Plug-in points of the loop. Subclasses override any of HOOK_NAMES; a misspelt `on_*` name is an error."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = [n for n in vars(cls) if n.startswith("on_") and n not in HOOK_NAMES]
        if unknown:
            raise TypeError(f"{cls.__name__} defines unknown hook(s) {unknown}; hooks are: {', '.join(HOOK_NAMES)}")

    def on_train_start(self, trainer: Trainer) -> None: ...

    def transform_batch(self, batch: dict) -> dict:
        return batch

    def extra_loss(self, batch: dict) -> torch.Tensor | None:
        return None

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


@dataclass
class Progress:
    """Everything besides tensors needed to continue a run exactly where it stopped."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    train_seconds: float = 0.0
    best_score: float | None = None
    best_epoch: int | None = None
    stale_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    finished: bool = False
    stream_position: dict | None = None  # a streamed training split: shard, offset in it, samples this epoch


def make_accelerator(mixed_precision: str = "no", **kwargs) -> Accelerator:
    """Devices, mixed precision and the process group (from torchrun / accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and process_state().num_processes == 1:
        AcceleratorState._reset_state()  # one process, several runs (tests, notebooks, compare grids)
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), **kwargs)


def ddp_arguments(backbone: Backbone) -> dict:
    """DDP looks for parameters a step left without a gradient where the family can leave some (else every
    process waits for gradients that one of them never computes)."""
    if not backbone.leaves_parameters_unused:
        return {}
    from accelerate.utils import DistributedDataParallelKwargs

    return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)]}


def shard_fully(module: torch.nn.Module) -> set[torch.nn.Parameter]:
    """FSDP2 (torch's fully_shard): one unit per encoder/decoder layer plus the root; works on CUDA and on gloo.

    Scalars (CLIP's logit scale, SigLIP's bias) cannot be sharded: they stay whole in every process and are
    returned, so the loop averages their gradients itself.
    """
    from torch.distributed.fsdp import fully_shard

    layers = [m for m in module.modules() if type(m).__name__.endswith(("EncoderLayer", "DecoderLayer"))]
    for layer in layers:
        fully_shard(layer)
    scalars = {p for p in module.parameters() if p.dim() == 0}
    fully_shard(module, ignored_params=scalars)
    return scalars


def make_optimizer(spec: TrainSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw_8bit":
        if not torch.cuda.is_available():
            raise ValueError("train.optimizer: adamw_8bit (bitsandbytes) needs a CUDA GPU; use adamw on this machine")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def enable_gradient_checkpointing(backbone: Backbone) -> None:
    """Both towers (or the whole generative model); non-reentrant, so peft's frozen inputs need no grad hack."""
    model = backbone.base_model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it to false")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s share of a global batch: contiguous, nearly equal parts."""
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return batch[start:start + base + (rank < extra)]


class LossModule(torch.nn.Module):
    """The objective's loss as a module forward, so DDP/FSDP wrappers see (and synchronise) every step."""

    def __init__(self, backbone: torch.nn.Module, objective: Objective):
        super().__init__()
        self.backbone = backbone
        self.objective = objective

    def forward(self, batch: dict) -> torch.Tensor:
        return self.objective.loss(batch)


class Trainer:
    def __init__(self, backbone: Backbone, objective: Objective, train_set: ImageDataset, spec: TrainSpec, seed: int,
                 run_dir: Path, evaluate_val: Callable[[], dict] | None = None, callbacks: tuple[Callback, ...] = (),
                 tracker_config: dict | None = None, keep_tracking_open: bool = False):
        self.backbone, self.objective, self.train_set, self.spec, self.seed = backbone, objective, train_set, spec, seed
        self.run_dir, self.evaluate_val, self.callbacks = Path(run_dir), evaluate_val, callbacks
        self.accelerator = make_accelerator(spec.mixed_precision, **tracker_arguments(spec, self.run_dir),
                                            **ddp_arguments(backbone))
        self.tracking, self.keep_tracking_open = bool(spec.log_with), keep_tracking_open  # open: the caller ends it
        start_tracking(self.accelerator, spec, self.run_dir, tracker_config)  # a no-op without train.log_with
        backbone.to(self.accelerator.device)
        if spec.gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        if not any(p.requires_grad for p in backbone.parameters()):
            raise ValueError("the method left no trainable parameters; use method: zero_shot to only evaluate")
        self.fsdp = spec.strategy == "fsdp" and self.accelerator.num_processes > 1
        loss_module = LossModule(backbone, objective)
        self.unsharded_trainable: list[torch.nn.Parameter] = []
        if self.fsdp:
            self.unsharded_trainable = [p for p in shard_fully(loss_module) if p.requires_grad]
            self.loss_module = loss_module
        else:
            self.loss_module = self.accelerator.prepare_model(loss_module)
        self.params = [p for p in self.loss_module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(spec, self.params)
        self.world = self.accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(self.epoch_batches(0)) / spec.grad_accum_steps)
        total = self.steps_per_epoch * spec.epochs
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, round(spec.warmup_ratio * total), total)
        self.loader = EpochLoader(train_set, backbone, seed, spec.num_workers)  # data/loader.py: cache, workers
        self.progress = Progress()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.final_state: dict[str, torch.Tensor] | None = None  # FSDP: the trained state, whole
        if self.world > 1:
            logger.info("%d processes x batch %d per process = global batch %d", self.world, spec.batch_size,
                        self.world * spec.batch_size)
            torch.manual_seed(seed * 1009 + self.accelerator.process_index)  # distinct dropout per process

    # --- batches ------------------------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Global batches of an epoch; the order depends on (seed, epoch) only, so a resumed run sees the same ones.

        With several processes each global batch holds `batch_size` examples per process; a last batch too small
        to give every process an example is dropped (DDP needs every process to take part in every step).
        """
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_set), generator=generator).tolist()
        world = self.accelerator.num_processes
        size = self.spec.batch_size * world
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        return [b for b in batches if len(b) >= world]

    def local_part(self, batch: list[int]) -> list[int]:
        return shard(batch, self.accelerator.process_index, self.world)

    # --- the loop -----------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> Progress:
        if resume:
            self.load_checkpoint()
        for callback in self.callbacks:
            callback.on_train_start(self)
        spec, progress = self.spec, self.progress
        self.backbone.train()
        while progress.epoch < spec.epochs and not progress.finished:
            self.run_epoch(progress.epoch)
            if progress.finished:
                break
        progress.finished = True
        self.loader.close()
        if self.fsdp:  # sharded weights stay sharded: the caller rebuilds a whole model from this state
            self.final_state = self.best_state if self.best_state is not None else self.snapshot()
        elif self.best_state is not None:
            self.restore(self.best_state)
        for callback in self.callbacks:
            callback.on_train_end(self)
        if self.tracking and not self.keep_tracking_open:
            finish_tracking(self.accelerator, progress.global_step)
        return progress

    def run_epoch(self, epoch: int) -> None:
        spec, progress = self.spec, self.progress
        self.train_set.set_epoch(epoch)
        batches = self.epoch_batches(epoch)
        start = progress.batch_in_epoch
        tic = time.perf_counter()  # from before the loader: the first epoch's image caching is training time too
        loader = self.loader.epoch(epoch, [self.local_part(b) for b in batches[start:]])
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{spec.epochs}", initial=start, total=len(batches), disable=None)
        for index, batch in enumerate(bar, start=start):
            for callback in self.callbacks:
                batch = callback.transform_batch(batch)
            with self.accelerator.autocast():
                loss = self.loss_module(batch)
                for callback in self.callbacks:
                    extra = callback.extra_loss(batch)
                    if extra is not None:
                        loss = loss + extra
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, batch {index + 1}; {self.last_checkpoint_note()}."
                    f" Try a lower train.lr (now {spec.lr}) or train.mixed_precision: no")
            self.accelerator.backward(loss / spec.grad_accum_steps)
            progress.samples_seen += len(batches[index])
            if (index + 1) % spec.grad_accum_steps == 0 or index + 1 == len(batches):
                self.optimizer_step()
                progress.batch_in_epoch = index + 1
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if self.tracking:
                    self.accelerator.log({"train/loss": loss.item(), "train/lr": self.scheduler.get_last_lr()[0]},
                                         step=progress.global_step)
                if spec.checkpoint_every_steps and progress.global_step % spec.checkpoint_every_steps == 0:
                    progress.train_seconds += time.perf_counter() - tic
                    tic = time.perf_counter()
                    self.save_checkpoint()
        progress.train_seconds += time.perf_counter() - tic
        self.end_epoch(epoch)

    def optimizer_step(self) -> None:
        for param in self.unsharded_trainable:  # FSDP leaves scalars whole: average their gradients here
            if param.grad is not None:
                torch.distributed.all_reduce(param.grad)
                param.grad /= self.world
        if self.spec.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1

    def end_epoch(self, epoch: int) -> None:
        progress, spec = self.progress, self.spec
        metrics = {"epoch": epoch + 1, "step": progress.global_step}
        if self.evaluate_val is not None:
            if self.fsdp:  # evaluation calls the towers directly, not the root's forward: gather the root's own
                self.loss_module.unshard()
            metrics.update({f"val_{k}": v for k, v in self.evaluate_val().items()})
            if self.fsdp:
                self.loss_module.reshard()
            self.backbone.train()
            score = metrics[f"val_{spec.select_metric}"]
            score = -score if spec.select_metric == "loss" else score
            if progress.best_score is None or score > progress.best_score:
                progress.best_score, progress.best_epoch, progress.stale_epochs = score, epoch + 1, 0
                self.best_state = self.snapshot()
            else:
                progress.stale_epochs += 1
        progress.history.append(metrics)
        logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
        if self.tracking:
            self.accelerator.log(epoch_metrics(metrics), step=progress.global_step)
        for callback in self.callbacks:
            callback.on_epoch_end(self, metrics)
        progress.epoch, progress.batch_in_epoch = epoch + 1, 0
        patience = spec.early_stopping_patience
        if patience is not None and progress.stale_epochs >= patience:
            logger.info("early stopping: val %s did not improve for %d epochs", spec.select_metric, patience)
            progress.finished = True
        self.save_checkpoint()

    # --- state --------------------------------------------------------------------------------------------------
    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Full tensors of the trainable state (under FSDP a collective: every process must call it)."""
        return {n: _full(p).detach().to("cpu", copy=True).contiguous() for n, p in self.named_trainable().items()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, param in self.named_trainable().items():
            value = state[name].to(param.device, param.dtype)
            if isinstance(param, DTensor):
                value = distribute_tensor(value, param.device_mesh, param.placements)
            param.data.copy_(value)

    def optimizer_state(self) -> dict:
        if not self.fsdp:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.loss_module, self.optimizer, options=options)

    def load_optimizer_state(self, state: dict) -> None:
        if not self.fsdp:
            self.optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.loss_module, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR / "last"

    def save_checkpoint(self) -> None:
        """Written beside, then swapped in: an interrupted save leaves the previous checkpoint intact."""
        self.progress.stream_position = self.loader.position()  # None unless the training split is streamed
        trainable, optimizer = self.snapshot(), self.optimizer_state()  # collectives under FSDP: every process
        if self.accelerator.is_main_process:
            self._write_checkpoint(trainable, optimizer)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, trainable: dict[str, torch.Tensor], optimizer: dict) -> None:
        write_checkpoint(self.checkpoint_dir, trainable, self.best_state, {
            "optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state()},
            asdict(self.progress))

    def load_checkpoint(self) -> bool:
        directory = self.checkpoint_dir
        if not (directory / "progress.json").is_file():
            logger.info("no checkpoint in %s: starting from the beginning", directory)
            return False
        trainable, self.best_state, extra, progress = read_checkpoint(directory)  # CheckpointError names the file
        self.restore(trainable)
        self.load_optimizer_state(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["rng"])
        self.progress = Progress(**progress)
        self.loader.resume_at(self.progress.stream_position)  # a stream checks it skips to the recorded sample
        logger.info("resumed at epoch %d, batch %d (step %d)", self.progress.epoch + 1,
                    self.progress.batch_in_epoch, self.progress.global_step)
        return True

    def last_checkpoint_note(self) -> str:
        if (self.checkpoint_dir / "progress.json").is_file():
            return f"the last good checkpoint is kept in {self.checkpoint_dir}"
        return "no checkpoint had been written yet"


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


