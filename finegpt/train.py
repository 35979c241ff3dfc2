"""Training: `Trainer` runs optimizer steps; `train()` is the whole run `finegpt train` drives.

`Trainer(cfg).train_step()` is one optimizer step (grad-accum micro-steps, clipping, AdamW, the lr
schedule) and prints nothing, so benchmarks can time it. `train(cfg)` adds data preparation, eval,
checkpoints, resume, progress, metrics.jsonl, the loss curve and a sample.

Multi-GPU: launched by torchrun, each process trains on its own rank's share of the batches (DDP, or
FSDP2 with --fsdp). `grad_accum` is the global number of micro-batches per step, split over the
processes, so a run's tokens per step and results do not depend on how many GPUs run it.
"""

import gc
import json
import math
import os
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import click
import torch
import torch.distributed as dist

from finegpt import checkpoint
from finegpt.console import human_bytes, human_count
from finegpt.device import bf16_supported, device_name, gpu_peak_flops
from finegpt.errors import FinegptError
from finegpt.model import GPT, GPTConfig, flops_per_token
from finegpt.presets import PRESETS, Preset, estimate_peak_memory, get_preset

METRICS_NAME = "metrics.jsonl"
CURVE_NAME = "loss_curve.png"
DEFAULT_DATA_ROOT = Path("data")
SAMPLE_PROMPT = "The"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Fields a resumed run may change: they steer the run, not the training it does. Any other
# difference between a checkpoint's config and the resuming one is refused (the run would not continue,
# it would become another run).
RESUMABLE_CHANGES = frozenset(
    {"max_iters", "max_time", "eval_interval", "eval_tokens", "log_interval", "compile", "fused", "device",
     "resume", "wandb", "out", "data"}
)  # fmt: skip


class TrainingDiverged(FinegptError, FloatingPointError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    # The model and the optimisation, as in a Preset (config_from_preset fills them).
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int  # micro-batch, sequences per forward on each process
    grad_accum: int  # micro-batches per optimizer step, over all processes
    lr: float
    min_lr: float
    warmup_iters: int
    max_iters: int
    max_time: float | None  # seconds of training before the run stops (eval, checkpoint) early; None: no limit
    weight_decay: float
    beta2: float
    dropout: float
    eval_interval: int
    eval_tokens: int
    log_interval: int
    preset: str = "custom"
    vocab_size: int = GPTConfig.vocab_size
    bias: bool = True
    beta1: float = 0.9
    grad_clip: float = 1.0
    # The run.
    data: str | None = None  # shard directory; None: train() prepares FineWeb, or the builtin corpus offline
    out: str = "out"
    fused: bool | None = None  # None: fused kernels on CUDA, eager PyTorch elsewhere
    compile: bool | None = None  # None: torch.compile on CUDA only
    dtype: str = "auto"  # auto: bf16 (fp16 + grad scaler where bf16 is unsupported) on GPU, fp32 on CPU
    seed: int = 1337
    device: str = "auto"
    resume: bool = False
    wandb: bool = False
    fsdp: bool = False

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size


def config_from_preset(preset: Preset | str, **overrides) -> TrainConfig:
    """A TrainConfig from a preset (or tier name), with overrides; an override of None keeps the
    preset's value."""
    if not isinstance(preset, Preset):
        preset = get_preset(preset)
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"not TrainConfig fields: {sorted(unknown)}")
    base = {f.name: getattr(preset, f.name) for f in fields(Preset) if f.name in names}
    base["preset"] = preset.name
    base.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**base)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    if cfg.n_embd % cfg.n_head:
        raise FinegptError(f"--n-embd {cfg.n_embd} must be a multiple of --n-head {cfg.n_head}")
    for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters",
                 "eval_interval", "log_interval"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise FinegptError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0 < cfg.min_lr <= cfg.lr:
        raise FinegptError(f"need 0 < --min-lr <= --lr, got --min-lr {cfg.min_lr} --lr {cfg.lr}")
    if cfg.device != "auto":
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise FinegptError(f"--device {cfg.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FinegptError(f"--device {cfg.device}: this machine has no CUDA GPU (use --device cpu)")
    if cfg.dtype not in ("auto", *DTYPES):
        raise FinegptError(f"--dtype {cfg.dtype!r}: choose auto, {', '.join(DTYPES)}")


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_iters (nanoGPT's schedule)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def shard_files(data: str | Path, split: str) -> list[str]:
    return sorted(str(p) for p in Path(data).glob(f"*_{split}_*.bin"))


def _distributed_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


class Trainer:
    """Model, optimizer and data of one training process; `train_step()` is one optimizer step.

    `loader` replaces the shards in cfg.data with any iterable of (x, y) batches for this process
    (tests, synthetic benchmarks). Prints nothing.
    """

    def __init__(self, cfg: TrainConfig, loader=None):
        validate(cfg)
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = _distributed_env()
        self.distributed = self.world_size > 1
        self.device = self._resolve_device(cfg.device)
        if self.distributed and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        if cfg.grad_accum % self.world_size:
            raise FinegptError(
                f"--grad-accum {cfg.grad_accum} must be a multiple of the number of processes ({self.world_size})"
            )
        self.micro_steps = cfg.grad_accum // self.world_size
        self.tokens_per_step = cfg.tokens_per_step

        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "float32" if self.device.type != "cuda" else ("bfloat16" if bf16_supported(self.device) else "float16")
        self.dtype = dtype
        self.autocast = (
            nullcontext()
            if dtype == "float32"
            else torch.autocast(device_type=self.device.type, dtype=DTYPES[dtype])
        )
        # fp16's narrow range needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == "float16")

        fused = self.device.type == "cuda" if cfg.fused is None else cfg.fused
        self.model_config = GPTConfig(
            block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
            n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias, fused=fused,
        )  # fmt: skip
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.raw_model = GPT(self.model_config).to(self.device)
        if cfg.fsdp:
            if not self.distributed:
                raise FinegptError("--fsdp shards the model over processes: launch with torchrun --nproc-per-node N")
            from torch.distributed.fsdp import fully_shard

            for block in self.raw_model.transformer.h:
                fully_shard(block)
            fully_shard(self.raw_model)
        self.optimizer = self._make_optimizer()
        model = self.raw_model
        if cfg.compile if cfg.compile is not None else self.device.type == "cuda":
            model = torch.compile(model)
        if self.distributed and not cfg.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        torch.manual_seed(cfg.seed + self.rank)  # dropout differs across processes, as their data does

        if loader is None:
            if cfg.data is None:
                raise FinegptError("TrainConfig.data is not set: pass --data DIR with token shards")
            files = shard_files(cfg.data, "train")
            if not files:
                raise FinegptError(f"no training shards (*_train_*.bin) in {cfg.data}: run `finegpt prepare` first")
            from finegpt.data import TokenLoader

            loader = TokenLoader(
                files, cfg.batch_size, cfg.block_size, seed=cfg.seed, rank=self.rank,
                world_size=self.world_size, shuffle=True, device=str(self.device),
            )  # fmt: skip
        self.loader = loader
        self._batches = self._cycle()
        self._val = None
        self.iter_num = 0

    def _resolve_device(self, name: str) -> torch.device:
        if name == "auto":
            return torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)  # validate() checked it
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank)
        return device

    def _make_optimizer(self):
        # Weight decay on matrices and embeddings only: not on biases and LayerNorm gains (nanoGPT).
        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = self.device.type == "cuda" and not self.cfg.fsdp
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), fused=fused)

    def _cycle(self):
        while True:  # a loader that ends an epoch starts the next
            yield from self.loader

    def _sync_context(self, final: bool):
        """Gradients are all-reduced only on the final micro-step of a step (nanoGPT's pattern)."""
        if not self.distributed:
            return nullcontext()
        if self.cfg.fsdp:
            self.raw_model.set_requires_gradient_sync(final)
            return nullcontext()
        return nullcontext() if final else self.model.no_sync()

    def train_step(self) -> float:
        """One optimizer step; returns the mean loss over its micro-batches (and processes)."""
        lr = lr_at(self.iter_num, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for micro in range(self.micro_steps):
            x, y = next(self._batches)
            with self._sync_context(final=micro == self.micro_steps - 1):
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss / self.micro_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= self.world_size
        value = total.item()
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"loss is {value} at iteration {self.iter_num + 1}")
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter_num += 1
        return value

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss on the first eval_tokens tokens of the validation shard, read in order: the same
        batches at every eval. None when cfg.data has no validation shard big enough for one batch."""
        if self._val is None:
            files = shard_files(self.cfg.data, "val") if self.cfg.data else []
            if not files:
                return None
            from finegpt.data import TokenLoader

            self._val = TokenLoader(files[:1], self.cfg.batch_size, self.cfg.block_size, shuffle=False, device=str(self.device))
        batches = min(self.cfg.eval_tokens // (self.cfg.batch_size * self.cfg.block_size), len(self._val))
        if batches == 0:
            return None
        self.raw_model.eval()
        total = torch.zeros((), device=self.device)
        # Every process evaluates the same batches (FSDP's forward needs all of them anyway).
        for _, (x, y) in zip(range(batches), self._val):  # iter() restarts the pass at its first batch
            with self.autocast:
                _, loss = self.raw_model(x, y)
            total += loss.float()
        self.raw_model.train()
        return (total / batches).item()

    # Checkpoints -----------------------------------------------------------------------------------

    def _gather(self, obj):
        """obj from every process, as a list by rank (what each process needs to resume)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def state_dict(self) -> dict:
        """Everything needed to continue exactly. Collective under torchrun: call on every process."""
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model_sd, optim_sd = get_state_dict(
                self.raw_model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        else:
            model_sd, optim_sd = self.raw_model.state_dict(), self.optimizer.state_dict()
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scaler": self.scaler.state_dict(),
            "loader": self._gather(loader_state),
            "rng": self._gather(checkpoint.rng_state()),
            "config": asdict(self.cfg),
            "model_config": asdict(self.model_config),
            "iter_num": self.iter_num,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.world_size:
            raise FinegptError(
                f"the checkpoint was written by {state['world_size']} processes and this run has "
                f"{self.world_size}: resume with the same number of processes"
            )
        if self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(
                self.raw_model, self.optimizer, model_state_dict=state["model"],
                optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True),
            )  # fmt: skip
        else:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if state["loader"][self.rank] is not None:
            self.loader.load_state_dict(state["loader"][self.rank])
            self._batches = self._cycle()
        checkpoint.set_rng_state(state["rng"][self.rank])
        self.iter_num = state["iter_num"]

    def close(self) -> None:
        """Release the loader and, under torchrun, leave the process group cleanly (FACTS §11: a bare
        destroy_process_group() sometimes aborted at exit)."""
        for loader in (self.loader, self._val):
            if hasattr(loader, "close"):
                loader.close()
        if self.distributed and dist.is_initialized():
            dist.barrier()
            del self.model, self.raw_model, self.optimizer
            gc.collect()
            dist.destroy_process_group()


def check_resumable(cfg: TrainConfig, saved: dict, path: Path) -> None:
    """Refuse to resume a checkpoint written with a different configuration."""
    current = asdict(cfg)
    diffs = [
        f"{name}: checkpoint {saved.get(name)!r}, now {current[name]!r}"
        for name in current
        if name not in RESUMABLE_CHANGES and saved.get(name) != current[name]
    ]
    if diffs:
        raise FinegptError(
            f"{path} was written with a different configuration ({'; '.join(diffs)}): "
            "resume with the same settings, or start a new run with another --out"
        )


# The full run ------------------------------------------------------------------------------------


def prepare_default_data(cfg: TrainConfig, echo=click.echo) -> Path:
    """Shards to train on when --data is not given: FineWeb (as many tokens as the run needs) when the
    Hub is reachable, else the builtin corpus. A directory prepared before is reused."""
    from finegpt.corpus import HubUnreachableError
    from finegpt.prepare import MANIFEST, prepare_shards

    fineweb = DEFAULT_DATA_ROOT / "fineweb"
    manifest = fineweb / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
        echo(f"No --data given: using the FineWeb shards prepared before in {fineweb}")
        return fineweb
    # prepare holds out at most a tenth of max_tokens for validation, so this leaves the run its tokens.
    needed = cfg.max_iters * cfg.tokens_per_step
    try:
        echo(f"No --data given: preparing {human_count(needed)} tokens of FineWeb in {fineweb}")
        prepare_shards("fineweb", fineweb, max_tokens=needed + needed // 9)
        return fineweb
    except HubUnreachableError:
        builtin = DEFAULT_DATA_ROOT / "builtin"
        echo(f"The Hugging Face Hub is unreachable: training on the builtin corpus instead (Python's own "
             f"documentation, ~0.5M tokens) in {builtin}")  # fmt: skip
        prepare_shards("builtin", builtin)
        return builtin


class _StopRequest:
    """Ctrl-C asks the run to stop after the current step; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Metrics:
    """metrics.jsonl: one JSON object per logged step or eval. A resumed run appends, first dropping
    rows past the checkpoint it resumes from, so the file stays one consistent history."""

    def __init__(self, path: Path, resume_iter: int | None):
        self.path = path
        if resume_iter is not None and path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["iter"] <= resume_iter))
        elif path.exists():
            path.unlink()
        self._file = open(path, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self):
        self._file.close()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def oom_advice(cfg: TrainConfig) -> str:
    """What to try after CUDA ran out of memory: half the micro-batch (same tokens per step), or the
    next smaller tier."""
    hints = []
    if cfg.batch_size > 1:
        hints.append(f"--batch-size {cfg.batch_size // 2} --grad-accum {cfg.grad_accum * 2} (same tokens per step)")
    tiers = [p.name for p in sorted(PRESETS.values(), key=lambda p: -(p.vram_gb or 0)) if p.vram_gb]
    if cfg.preset in tiers and cfg.preset != tiers[-1]:
        hints.append(f"the next smaller tier, --vram {tiers[tiers.index(cfg.preset) + 1]}")
    if not cfg.fused:
        hints.append("the fused path (--fused), which never holds the B·T·V logits")
    advice = "; or ".join(hints) if hints else "a shorter --block-size or a smaller model"
    return (
        f"CUDA ran out of memory at micro-batch {cfg.batch_size} × block {cfg.block_size} "
        f"(tier {cfg.preset}). Try {advice}. Resume from the last checkpoint with --resume."
    )


def train(cfg: TrainConfig, echo=click.echo) -> dict:
    """The full run: data, training with eval and checkpoints, the loss curve and a sample.

    Returns a summary (iterations done, last train and val loss, checkpoint path, whether Ctrl-C
    stopped it). Raises FinegptError for the user's mistakes, a diverged loss and out-of-memory.
    """
    validate(cfg)
    out = Path(cfg.out)
    ckpt_path = out / checkpoint.CKPT_NAME
    state = None
    if cfg.resume:
        state = checkpoint.load(checkpoint.find_checkpoint(out))
        check_resumable(cfg, state["config"], ckpt_path)
    elif ckpt_path.exists():
        raise FinegptError(f"{ckpt_path} already exists: pass --resume to continue that run, or choose another --out")

    rank, _, world = _distributed_env()
    master = rank == 0
    if not master:
        echo = lambda *a, **k: None  # noqa: E731 - one voice on the terminal
    wandb = _import_wandb() if cfg.wandb and master else None  # before any work: a missing package fails fast
    if cfg.data is None:
        if world > 1:
            raise FinegptError("under torchrun pass --data DIR (prepare shards first with `finegpt prepare`)")
        cfg = replace(cfg, data=str(prepare_default_data(cfg, echo)))
    elif not shard_files(cfg.data, "train"):
        raise FinegptError(f"--data {cfg.data}: no training shards (*_train_*.bin) there; run `finegpt prepare` first")

    try:
        trainer = Trainer(cfg)
    except torch.cuda.OutOfMemoryError:  # the model and optimizer alone do not fit
        raise FinegptError(oom_advice(cfg)) from None
    stop = _StopRequest()
    metrics = None
    run = None
    try:
        if state is not None:
            trainer.load_state_dict(state)
            del state
        start_iter = trainer.iter_num
        resumed = cfg.resume
        out.mkdir(parents=True, exist_ok=True)
        if master:
            metrics = _Metrics(out / METRICS_NAME, start_iter if resumed else None)
            if wandb:
                run = wandb.init(project="finegpt", name=out.name, config=asdict(cfg), resume="allow")
        _print_header(trainer, echo, resumed)

        peak = gpu_peak_flops(device_name(trainer.device)) if trainer.device.type == "cuda" else None
        fpt = flops_per_token(trainer.model_config)
        last_loss, val_loss, interrupted = None, None, False
        t_log, it_log, step_time = time.perf_counter(), trainer.iter_num, None

        def save():
            payload = trainer.state_dict()
            if master:
                checkpoint.save_atomic(payload, ckpt_path)

        t_start = time.perf_counter()
        while True:
            it = trainer.iter_num
            out_of_time = cfg.max_time is not None and time.perf_counter() - t_start >= cfg.max_time
            done = it >= cfg.max_iters or out_of_time
            if (it % cfg.eval_interval == 0 or done) and not (resumed and it == start_iter):
                val_loss = trainer.evaluate()
                if val_loss is not None and master:
                    metrics.write({"iter": it, "val_loss": val_loss})
                    if run:
                        run.log({"val_loss": val_loss}, step=it)
                saved = ""
                if it > start_iter:
                    save()
                    saved = f", checkpoint {ckpt_path}"
                echo(f"iter {it}: val loss {_fmt(val_loss)}{saved}")
            if done:
                if out_of_time and it < cfg.max_iters:
                    echo(f"Time budget of {cfg.max_time:g} s reached at iter {it}: continue with "
                         f"finegpt train --resume --out {out} --max-time <seconds>")  # fmt: skip
                break
            if _agree(stop.requested, trainer):
                save()
                interrupted = True
                echo(f"\nInterrupted at iter {it}: checkpoint {ckpt_path}. Continue with: "
                     f"finegpt train --resume --out {out}")  # fmt: skip
                break
            try:
                last_loss = trainer.train_step()
            except TrainingDiverged as err:
                kept = f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists() else "no checkpoint was written yet"
                raise TrainingDiverged(f"{err}: training stopped; {kept}. Lower --lr or raise --warmup-iters.") from None
            if trainer.iter_num % cfg.log_interval == 0 or trainer.iter_num == cfg.max_iters:
                now = time.perf_counter()
                steps = trainer.iter_num - it_log
                dt = (now - t_log) / steps
                step_time = dt if step_time is None else 0.7 * step_time + 0.3 * dt
                tokens_per_s = trainer.tokens_per_step / dt
                mfu = fpt * tokens_per_s / (peak * trainer.world_size) if peak else None
                mem = _peak_memory(trainer.device)
                row = {
                    "iter": trainer.iter_num, "loss": last_loss, "lr": lr_at(trainer.iter_num - 1, cfg),
                    "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_bytes": mem,
                    "tokens": trainer.iter_num * trainer.tokens_per_step,
                }  # fmt: skip
                if master:
                    metrics.write(row)
                    if run:
                        run.log(row, step=trainer.iter_num)
                remaining = step_time * (cfg.max_iters - trainer.iter_num)
                if cfg.max_time is not None:
                    remaining = min(remaining, max(0.0, cfg.max_time - (time.perf_counter() - t_start)))
                eta = _duration(remaining)
                echo(
                    f"iter {trainer.iter_num:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {last_loss:.4f} | "
                    f"lr {row['lr']:.2e} | {human_count(tokens_per_s)} tok/s | "
                    f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | mem {human_bytes(mem)} | ETA {eta}"
                )
                t_log, it_log = time.perf_counter(), trainer.iter_num
    except torch.cuda.OutOfMemoryError:
        raise FinegptError(oom_advice(cfg)) from None
    finally:
        stop.restore()
        if metrics:
            metrics.close()
        if run:
            run.finish()
        device = trainer.device
        trainer.close()

    if master:
        from finegpt.sample import generate_text, load_model

        curve = plot_loss_curve(out / METRICS_NAME, out / CURVE_NAME, title=f"finegpt, tier {cfg.preset}")
        echo(f"Loss curve: {curve}")
        if not interrupted and ckpt_path.exists():
            # From the checkpoint just written: it shows the file works (and needs no FSDP gathering).
            model = load_model(ckpt_path, device)
            echo(f"Sample (prompt {SAMPLE_PROMPT!r}, temperature 0.8, top-k 200):")
            echo(generate_text(model, SAMPLE_PROMPT, max_new_tokens=100, temperature=0.8, top_k=200, seed=cfg.seed))
    return {
        "iter": trainer.iter_num, "loss": last_loss, "val_loss": val_loss,
        "checkpoint": str(ckpt_path), "interrupted": interrupted,
    }  # fmt: skip


def _agree(flag: bool, trainer: Trainer) -> bool:
    """Under torchrun, every process stops at the same step if any of them got Ctrl-C."""
    if not trainer.distributed:
        return flag
    t = torch.tensor([int(flag)], device=trainer.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise FinegptError("--wandb needs the wandb package: pip install 'finegpt[wandb]'") from None
    return wandb


def _print_header(trainer: Trainer, echo, resumed: bool) -> None:
    cfg, mc = trainer.cfg, trainer.model_config
    path = "fused" if mc.fused else "eager"
    params = human_count(trainer.raw_model.num_params()) if not cfg.fsdp else "sharded"
    echo(
        f"{'Resuming' if resumed else 'Training'} tier {cfg.preset} on {device_name(trainer.device)}"
        f"{f' × {trainer.world_size}' if trainer.distributed else ''}: {mc.n_layer}/{mc.n_head}/{mc.n_embd} "
        f"({params} params), micro-batch {cfg.batch_size} × grad-accum {cfg.grad_accum} × block {cfg.block_size} "
        f"= {human_count(cfg.tokens_per_step)} tokens/step, {path}, {trainer.dtype}, data {cfg.data}"
    )
    if trainer.device.type == "cuda":
        estimate = estimate_peak_memory(mc, cfg.batch_size, cfg.block_size, fused=mc.fused)
        echo(f"Estimated peak memory {human_bytes(estimate)} (finegpt.presets.estimate_peak_memory; `finegpt presets` explains it)")
    elif getattr(PRESETS.get(cfg.preset), "vram_gb", None) is not None:
        echo(f"Note: tier {cfg.preset} is sized for a {cfg.preset} GB GPU; on the CPU each step of "
             f"{human_count(cfg.tokens_per_step)} tokens takes minutes or more. `--vram cpu` is the CPU tier.")


def plot_loss_curve(metrics_path: Path, png_path: Path, title: str) -> Path:
    """Train and validation loss against iteration, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iter"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    if val_rows:
        ax.plot([r["iter"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


# The command -------------------------------------------------------------------------------------

_POS_INT = click.IntRange(min=1)
_POS_FLOAT = click.FloatRange(min=0, min_open=True)


@click.command("train")
@click.option("--vram", default="auto", show_default=True,
              type=click.Choice(["80", "48", "24", "16", "12", "cpu", "auto"], case_sensitive=False),
              help="GPU memory tier (GB) whose preset to train; auto: the detected GPU, cpu without one.")
@click.option("--data", type=click.Path(file_okay=False), help="Directory of token shards; default: prepare FineWeb (builtin corpus offline).")
@click.option("--out", default="out", show_default=True, type=click.Path(dir_okay=True, file_okay=False),
              help="Where checkpoints, metrics.jsonl and the loss curve go.")
@click.option("--n-layer", type=_POS_INT)
@click.option("--n-head", type=_POS_INT)
@click.option("--n-embd", type=_POS_INT)
@click.option("--block-size", type=_POS_INT, help="Context length (tokens).")
@click.option("--batch-size", type=_POS_INT, help="Micro-batch: sequences per forward pass on each GPU.")
@click.option("--grad-accum", type=_POS_INT, help="Micro-batches per optimizer step, over all GPUs.")
@click.option("--lr", type=_POS_FLOAT, help="Peak learning rate.")
@click.option("--min-lr", type=_POS_FLOAT, help="Learning rate at the end of the cosine decay.")
@click.option("--warmup-iters", type=click.IntRange(min=0))
@click.option("--max-iters", type=_POS_INT, help="Optimizer steps in the run.")
@click.option("--max-time", type=_POS_FLOAT, help="Stop (with eval and checkpoint) after this many seconds of training.")
@click.option("--weight-decay", type=click.FloatRange(min=0))
@click.option("--beta2", type=click.FloatRange(0, 1, max_open=True))
@click.option("--grad-clip", type=click.FloatRange(min=0), help="Clip the gradient norm to this (0: no clipping). [default: 1.0]")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True))
@click.option("--eval-interval", type=_POS_INT, help="Steps between evaluations (each writes a checkpoint).")
@click.option("--eval-tokens", type=_POS_INT, help="Validation tokens per evaluation (the start of the val shard).")
@click.option("--log-interval", type=_POS_INT, help="Steps between progress lines.")
@click.option("--fused/--eager", default=None, help="Fused Triton kernels or plain PyTorch. [default: fused on CUDA]")
@click.option("--compile/--no-compile", default=None, help="torch.compile the model. [default: on CUDA]")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPUs that have it, else fp16 with a grad scaler; fp32 on CPU.")
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is in --out.")
@click.option("--fsdp", is_flag=True, help="Under torchrun: shard the model with FSDP2 instead of DDP.")
@click.option("--wandb", is_flag=True, help="Also log to Weights & Biases (needs `pip install wandb`).")
@click.pass_context
def train_command(ctx, vram, **options):
    """Train a GPT with the preset that fits your card.

    With no arguments: the tier of the detected GPU (the tiny `cpu` tier without one) on FineWeb, or
    on the builtin corpus when the Hugging Face Hub is unreachable. Options without a default take
    the --vram preset's value (`finegpt presets` lists them). Under torchrun, trains on all
    processes (DDP; FSDP2 with --fsdp).
    """
    given = {
        name: value
        for name, value in options.items()
        if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)
    }
    if options["resume"]:
        # Continue with the checkpoint's configuration; flags given now may change only what
        # RESUMABLE_CHANGES allows (train() refuses the rest with a message naming them).
        saved = TrainConfig(**checkpoint.load(checkpoint.find_checkpoint(options["out"]))["config"])
        given |= {"resume": True, "out": options["out"]}
        if ctx.get_parameter_source("vram") == click.core.ParameterSource.DEFAULT:
            cfg = replace(saved, **given)
        else:
            cfg = config_from_preset(vram, **given)
    else:
        cfg = config_from_preset(vram, **given)
    validate(cfg)
    try:
        train(cfg)
    except KeyboardInterrupt:  # Ctrl-C before training began (while preparing data): no traceback
        raise click.Abort() from None
