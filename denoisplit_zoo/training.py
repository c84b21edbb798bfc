"""`denoisplit-zoo train`: data -> noise models -> VSE training -> run folder.

The loop is plain PyTorch (no Lightning): Adamax, ReduceLROnPlateau and early stopping on the validation loss,
gradient-norm clipping, best + last checkpoints written atomically, exact resume (model, optimizer, scheduler, RNG,
data position, early-stopping state), one log line per validation.
"""

from __future__ import annotations

import gc
import json
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .allocator import heap_allocations
from .config import DATA_FROM_RUN, RunConfig, load_run_config
from .data import PatchDataset, PreparedData, prepare_data, validation_tiles
from .distributed import RANK_SEED_STRIDE, SINGLE, World, process_group, world_from_env
from .errors import UserError
from .fileio import (OutputSet, read_json, remove_stale_temps, torch_load, torch_save, write_json, write_text,
                     write_yaml)
from .losses import loss_terms
from .noise_model import GMMNoiseModel, fit_noise_model, load_noise_models
from .normalization import Normalization
from .pretrained import channel_order, load_init_source, reorder_output_channels, require_same_architecture
from .run_folder import RunLock, RunPaths, absolute_data_path, build_model, locate_data, record_halo
from .runtime import pick_device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _noise_model_pairs(prepared: PreparedData, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(signal, observation) raw pixel pairs of channel c from the TRAIN split.

    Synthetic noise: the clean images are the signal. Real noise: clean and noisy may sit on different intensity
    scales (W2S: every 8-bit image min-max stretched on its own), so each clean image is first mapped onto its
    noisy image by a least-squares affine fit."""
    train = prepared.train
    if train.clean is None:
        raise UserError("fitting noise models needs clean images (or repeated frames); "
                        "fit them with `denoisplit-zoo noise-model fit` and pass --noise-models")
    clean, noisy = train.clean[:, c], train.targets[:, c]
    if prepared.noise_info.get("kind") == "real":
        mapped = np.empty_like(clean)
        for i in range(len(clean)):
            a, b = np.polyfit(clean[i].ravel(), noisy[i].ravel(), 1)
            mapped[i] = a * clean[i] + b
        clean = mapped
    return clean, noisy


def fit_run_noise_models(cfg: RunConfig, prepared: PreparedData, progress: bool = True,
                         device: str | torch.device = "cpu") -> list[GMMNoiseModel]:
    nmc = cfg.noise_model
    models = []
    for c in range(2):
        signal, obs = _noise_model_pairs(prepared, c)
        models.append(fit_noise_model(signal, obs, nmc.n_gaussians, nmc.n_coeffs, nmc.min_sigma, nmc.n_iterations,
                                      nmc.batch_size, nmc.lr, seed=cfg.train.seed + c, progress=progress,
                                      device=device))
    return models


def kl_beta(tc, step: int) -> float:
    """KL weight at optimizer step `step` (0-based): kl_weight after the warm-up, linear from ~0 during it."""
    if step >= tc.kl_warmup_steps:
        return tc.kl_weight
    return tc.kl_weight * (step + 1) / (tc.kl_warmup_steps + 1)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best_val_loss: float
    stopped_because: str
    seconds: float


class _State:
    """Everything that must survive a restart, kept as plain tensors/numbers for weights_only loading."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.pos = 0  # position inside the epoch's permutation (all ranks' batches before it are drawn)
        self.best_val = float("inf")
        self.best_step = -1  # step of checkpoints/best.pt
        self.bad_validations = 0
        self.seconds = 0.0

    def to_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, pos=self.pos, best_val=self.best_val, best_step=self.best_step,
                    bad_validations=self.bad_validations, seconds=self.seconds)

    def load(self, d: dict) -> None:
        for k in self.to_dict():
            if k == "best_step" and k not in d:  # checkpoints written before best_step existed
                continue
            setattr(self, k, type(getattr(self, k))(d[k]))


def _prepare_run_dir(out: Path, resume: bool) -> RunPaths:
    """Check `out` (nothing is created here). resume: a run folder (config.yaml), normally with checkpoints/last.pt;
    without one (killed before its first checkpoint) the run restarts from step 0 with its saved config. Fresh
    run: `out` must not exist, or be an empty folder."""
    paths = RunPaths(out)
    if resume:
        if not paths.is_run():
            raise UserError(f"--resume: {out} is not a run folder (no config.yaml)")
        for folder in (paths.root, paths.checkpoints, paths.noise_models):  # temp files of a killed writer
            remove_stale_temps(folder)
        return paths
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a folder")
        if paths.is_run():
            raise UserError(f"{out} already holds a run; use --resume to continue it or choose another --out")
        if any(out.iterdir()):
            raise UserError(f"{out} exists, is not empty and is not a run folder")
    return paths


NoiseModels = Sequence[GMMNoiseModel | str | Path]


def train(cfg: RunConfig, out: str | Path, resume: bool = False, noise_models: Optional[NoiseModels] = None,
          progress: bool = True, world: Optional[World] = None) -> TrainResult:
    """Train a run into `out` (docs/contracts.md run folder). With resume=True, `cfg` is replaced by the run's config
    except for the stopping limits (max_steps / max_minutes), which the caller may extend. `noise_models`: two
    pre-fitted GMMs (GMMNoiseModel objects or .npz paths) instead of fitting them from the training pairs.

    Crash safety: every file is written atomically (temp file + fsync + rename) and checkpoints/last.pt holds
    everything the schedule depends on (weights, optimizer, LR scheduler, torch RNG, step / epoch / position in the
    epoch's permutation, early-stopping state), so a process killed at any moment (even SIGKILL) resumes with
    resume=True exactly where last.pt was written (at most `val_every` steps are lost) and continues as if it had
    never stopped. A fresh run that fails before its first checkpoint leaves nothing behind (its folder is removed);
    one killed before its first checkpoint restarts from step 0 on resume.

    Several processes (`world`, default: what torchrun's environment says; docs/distributed.md): every rank trains
    on its own patches and DistributedDataParallel averages the gradients; rank 0 alone checks and writes the run
    folder, the others read it once rank 0 has set it up. World size 1 is the single-process path, bit for bit."""
    out = Path(out)
    world = world or world_from_env()
    if not world.main:  # rank 0 checks, creates and locks the folder; this rank reads it after rank 0's setup
        return _train(cfg, RunPaths(out), resume, noise_models, False, world)
    paths = _prepare_run_dir(out, resume)
    if resume:
        with RunLock(out, "train --resume"):
            return _train(cfg, paths, resume, noise_models, progress, world)
    with OutputSet(out) as outputs:
        if not os.access(out, os.W_OK):
            raise UserError(f"{out} is not writable")
        try:
            with RunLock(out, "train"):
                return _train(cfg, paths, resume, noise_models, progress, world)
        finally:
            # A resumable run from its first last.pt on: keep the folder even if training fails later. Decided
            # here by the file itself, not by a commit inside the loop: a signal between last.pt's rename and such a
            # commit removed a resumable run (seen: tests/test_distributed.py's SIGTERM, sent the moment last.pt
            # appears).
            if paths.last.is_file():
                outputs.commit()


def _run_config(cfg: RunConfig, paths: RunPaths, resume: bool) -> RunConfig:
    """The config a (re)started run trains with: a fresh run writes `cfg` (from then on the folder is a run folder);
    a resumed one takes its saved config, with only the caller's stopping limits."""
    if not resume:  # the data path stored absolute (--resume, calibrate and evaluate work from any folder); this
        # process reads it as typed, so its messages name the file the way the user did
        absolute = cfg.data.model_copy(update={"path": absolute_data_path(cfg.data.path)})
        stored = cfg.model_copy(update={"data": absolute})
        write_yaml(paths.config, json.loads(stored.model_dump_json()))
        return cfg
    saved = load_run_config(paths.config)
    limits = {"max_steps": cfg.train.max_steps, "max_minutes": cfg.train.max_minutes}
    # --data on resume is honoured (the data moved), and `_check_resumed_data` proves it is the same data
    path = cfg.data.path if cfg.data.path != DATA_FROM_RUN else locate_data(saved.data.path, paths.root)
    return saved.model_copy(update={"train": saved.train.model_copy(update=limits),
                                    "data": saved.data.model_copy(update={"path": path})})


def _refuse_lost_history(paths: RunPaths) -> None:
    """A resume that would restart from step 0 (no last.pt) is refused once the run has a history: restarting would
    overwrite it. A run killed before its first last.pt holds at most one logged validation (and maybe best.pt: the
    order is log line, best.pt, last.pt), so two or more mean last.pt was lost, not never written."""
    logged = [ln for ln in paths.log.read_text(errors="replace").splitlines() if ln.strip()] \
        if paths.log.is_file() else []
    if len(logged) >= 2:
        raise UserError(f"{paths.last} is missing but the run has trained ({len(logged)} validations logged"
                        f"{', best.pt kept' if paths.best.is_file() else ''}): resuming would restart from step 0 "
                        "and overwrite that history; restore last.pt, or start a new run with another --out")


def _check_resumed_data(paths: RunPaths, prepared: PreparedData) -> None:
    """A resumed run must train on the data its folder describes: the split, noise protocol and channels rebuilt
    from config.yaml (perhaps edited since) and --data equal data_split.json, and the normalisation equals
    normalization.json. One UserError line naming what differs."""
    saved = read_json(paths.data_split) if paths.data_split.is_file() else None
    if saved is not None:
        now = json.loads(json.dumps(prepared.split))
        # what the run recorded (files of earlier versions have fewer keys); the path may be spelled differently
        for key in sorted(set(saved) - {"source"}):
            if saved.get(key) != now.get(key):
                raise UserError(f"{paths.root}: the data config.yaml describes now differs from the run's "
                                f"data_split.json ({key}: {str(now.get(key))[:60]} vs {str(saved.get(key))[:60]}); "
                                "config.yaml was edited or --data is other data: start a new run")
    norm = json.loads(json.dumps(prepared.norm.to_dict()))  # tuples as lists, as the file holds them
    if paths.normalization.is_file() and read_json(paths.normalization) != norm:
        raise UserError(f"{paths.root}: the data's normalisation differs from normalization.json (other data than "
                        "the run started with): start a new run")


def acquire_noise_models(cfg: RunConfig, prepared: PreparedData, paths: RunPaths, given: Optional[NoiseModels],
                         progress: bool, device: torch.device) -> Optional[list[GMMNoiseModel]]:
    """The run's two noise models, in this order: the ones already in the run folder (resume), the `given` ones, a
    fit on the training pairs; saved into the run folder and moved to `device`. None for a uSplit run on data
    without clean images. Every run keeps them where it can: calibration without clean data subtracts the
    observation-noise variance they predict."""
    if all((paths.noise_models / f"ch{c}.npz").is_file() for c in range(2)):
        models = load_noise_models(paths.noise_models)
    elif given:
        if len(given) != 2:
            raise UserError("--noise-models needs exactly two files (one per channel)")
        models = [nm if isinstance(nm, GMMNoiseModel) else GMMNoiseModel.load(nm) for nm in given]
    elif prepared.train.clean is not None:
        models = fit_run_noise_models(cfg, prepared, progress, device)
    elif cfg.train.loss == "denoisplit":
        raise UserError("the denoisplit loss needs noise models: the data has no clean images, so fit them with "
                        "`denoisplit-zoo noise-model fit` and pass --noise-models")
    else:
        return None
    for c, nm in enumerate(models):
        if not (paths.noise_models / f"ch{c}.npz").is_file():
            nm.save(paths.noise_models / f"ch{c}.npz")
        nm.to(device)
    return models


class Trainer:
    """One run's model, optimizer, LR schedule and resumable state on one device, and what can be done with them:
    `step` (one optimizer step on a batch), `validate`, `checkpoint` / `restore`. `train` drives it over the data;
    benchmarks/bench_training.py times the same `step`.

    Batches: x (B, 1, P, P) normalised input, y (B, 2, P, P) RAW noisy targets (the likelihood works in raw units).
    `memory_format` / `amp_dtype` override the device's defaults (benchmarks compare them).

    On several processes (`world`, after `distribute()`): each rank draws its own batch_size patches per step,
    DistributedDataParallel averages the gradients (effective batch world.size x batch_size, same learning rate),
    and every decision (skip a non-finite step, the validation loss behind LR schedule and early stopping) is the
    same on every rank, so the ranks' weights stay identical. `model` is always the plain network (checkpoints,
    validation); `net` is what the training forward goes through."""

    def __init__(self, cfg: RunConfig, norm: Normalization, noise_models: Optional[list[GMMNoiseModel]],
                 device: torch.device, memory_format: Optional[torch.memory_format] = None,
                 amp_dtype: Optional[torch.dtype] = None, world: World = SINGLE):
        tc = self.tc = cfg.train
        self.device, self.world = device, world
        # NHWC convolutions on the CPU: with heap_allocations, 1.18x (tiny) / 1.13x (small) / 1.51x (paper) training
        # steps on this project's 2-core CPU (benchmarks/README.md, bench_training.py); identical arithmetic
        # (fixed-noise loss equal). Not measured on CUDA: left contiguous there.
        self.fmt = memory_format or (torch.channels_last if device.type == "cpu" else torch.contiguous_format)
        use_amp = tc.amp and device.type == "cuda"
        default_amp = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16) \
            if use_amp else None
        self.amp_dtype = amp_dtype or default_amp
        self.model = self.net = build_model(cfg)
        self.opt = torch.optim.Adamax(self.model.parameters(), lr=tc.lr)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, mode="min", factor=tc.lr_factor,
                                                                patience=tc.lr_patience, min_lr=1e-12)
        self.state = _State()
        self.noise_models = noise_models if tc.loss == "denoisplit" else None
        self.t_mean = torch.tensor(norm.target_mean, device=device)
        self.t_std = torch.tensor(norm.target_std, device=device)
        self.latent_shapes = self.model.latent_shapes(tc.patch_size, tc.patch_size)
        self.running = {"loss": 0.0, "rec": 0.0, "kl": 0.0, "n": 0}  # training-loss means since the last validation

    def to_device(self) -> "Trainer":
        """Move the model (after any weights were loaded into it on the CPU) to the device, in its memory format."""
        self.model.to(self.device, memory_format=self.fmt)
        return self

    def distribute(self) -> "Trainer":
        """Wrap the network in DistributedDataParallel (after to_device and any restore; its constructor copies rank
        0's weights and buffers to every rank). No SyncBatchNorm: it has no CPU (gloo) implementation, and each rank's
        batch-norm statistics come from the preset's full per-step batch, as in the single-process path; rank 0's
        running statistics are copied to the others at every forward (DDP's broadcast_buffers) and before each
        validation. A no-op at world size 1."""
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # channels_last gives the 1x1 kernels strides their gradients do not share; DDP warns that copying
            # them into its buckets may be slower, which is all it means (the values are the same)
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        return self

    def undistribute(self) -> "Trainer":
        """Drop the DistributedDataParallel wrapper (the network itself stays); call it before leaving the process
        group. A DDP reducer that outlives its group aborts the process at exit ("terminate called without an
        active exception": measured in 5 of 25 runs of tests/ddp_steps.py, 0 of 30 once the wrapper went first)."""
        if self.net is not self.model:
            self.net = self.model
            gc.collect()  # the wrapper and its reducer go now, while the group still exists
        return self

    def objective(self, x: torch.Tensor, y: torch.Tensor, net: Optional[torch.nn.Module] = None):
        """losses.LossTerms of a batch at the current step's KL weight, through `net` (default: the training
        forward, `self.net`)."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            pred, kls = (net or self.net)(x, compute_kl=True)
        tc = self.tc
        return loss_terms(tc.loss, pred.float(), [k.float() for k in kls], y, latent_shapes=self.latent_shapes,
                          noise_models=self.noise_models, target_mean=self.t_mean, target_std=self.t_std,
                          kl_weight=kl_beta(tc, self.state.step), free_bits=tc.free_bits,
                          kl_formulation=tc.kl_formulation)

    def batch(self, dataset: PatchDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of the epoch's fixed permutation (a function of seed, epoch and position: exact resume).
        Rank r of N takes the r-th of the next N batches of the same permutation: different patches on every rank,
        and each rank's draw reproducible."""
        st, bs, n = self.state, self.tc.batch_size, self.world.size
        dataset.set_epoch(st.epoch)
        g = torch.Generator().manual_seed(self.tc.seed * 100003 + st.epoch)
        start = st.pos + self.world.rank * bs
        idx = torch.randperm(len(dataset), generator=g)[start: start + bs].tolist()
        items = [dataset[i] for i in idx]
        st.pos += bs * n
        if st.pos + bs * n > len(dataset):
            st.epoch, st.pos = st.epoch + 1, 0
        x = torch.stack([b[0] for b in items]).to(self.device, memory_format=self.fmt)
        return x, torch.stack([b[1] for b in items]).to(self.device)

    def step(self, x: torch.Tensor, y: torch.Tensor):
        """One optimizer step (clipped gradient norm); a non-finite loss or gradient skips the update so one
        overflowing batch cannot poison the weights. Returns the batch's LossTerms."""
        terms = self.objective(x, y)
        self.opt.zero_grad(set_to_none=True)
        # every rank skips if any rank's loss is not finite: DDP's backward is a collective all must join
        if not self.world.any(not bool(torch.isfinite(terms.total)), self.device):
            terms.total.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            if torch.isfinite(grad_norm):
                self.opt.step()
        self.state.step += 1
        r = self.running
        r["loss"] += float(terms.total.detach())
        r["rec"] += float(terms.reconstruction)
        r["kl"] += float(terms.kl)
        r["n"] += 1
        return terms

    def validate(self, val_x: torch.Tensor, val_y: torch.Tensor) -> tuple[float, float]:
        """(reconstruction NLL, KL) per tile on fixed validation tiles, with the same latent draws every time. The
        early-stopping signal is the NLL alone, as in the paper's code (the KL's Monte-Carlo noise would make it
        noisy). Eval mode: batch-norm running statistics, no dropout."""
        self.world.broadcast_buffers(self.model)  # every rank validates rank 0's model
        self.model.eval()
        rec, kl, n = 0.0, 0.0, 0
        g = torch.get_rng_state()
        torch.manual_seed(self.tc.seed + 12345)
        bs = self.tc.batch_size
        with torch.no_grad():
            for i in range(0, len(val_x), bs):
                x = val_x[i: i + bs].to(self.device, memory_format=self.fmt)
                terms = self.objective(x, val_y[i: i + bs].to(self.device), net=self.model)
                rec += float(terms.reconstruction) * len(x)
                kl += float(terms.kl) * len(x)
                n += len(x)
        torch.set_rng_state(g)
        self.model.train()
        # rank 0's numbers everywhere: ranks on other hardware could differ in the last bit, and LR schedule and
        # early stopping must decide alike
        rec, kl = self.world.from_main([rec / n, kl / n], self.device)
        return rec, kl

    def take_running_means(self) -> dict:
        """The training-loss means since the last call (for the log), and a reset."""
        r, n = self.running, max(self.running["n"], 1)
        loss, rec, kl = self.world.mean([r["loss"] / n, r["rec"] / n, r["kl"] / n], self.device)  # over ranks
        out = {"train_loss": loss, "train_reconstruction": rec, "train_kl": kl}
        r.update(loss=0.0, rec=0.0, kl=0.0, n=0)
        return out

    def checkpoint(self, path: Path) -> None:
        """Write the resumable state (rank 0 writes; every rank must call it: the ranks' RNG states are gathered)."""
        rng = self.world.gather_tensor(torch.get_rng_state())
        ck = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "state": self.state.to_dict(), "rng_cpu": rng[0],
              "world_size": self.world.size}
        if self.world.distributed:
            ck["rng_cpu_ranks"] = rng
        if self.device.type == "cuda":
            rng_cuda = self.world.gather_tensor(torch.cuda.get_rng_state())
            ck["rng_cuda"] = rng_cuda[0]
            if self.world.distributed:
                ck["rng_cuda_ranks"] = rng_cuda
        if self.world.main:
            torch_save(path, ck)

    def restore(self, path: Path) -> None:
        """Continue from a checkpoint written by `checkpoint`: weights, optimizer, schedule, state and RNG. A run
        resumes only with the number of processes it was started with (the batches each step drew depend on it)."""
        ck = torch_load(path)
        size = ck.get("world_size", 1) if isinstance(ck, dict) else 1
        if size != self.world.size:
            raise UserError(f"{path} was written by a training of {size} process{'es' if size > 1 else ''}; resume "
                            f"it with the same number (denoisplit-zoo train --nproc {size}, or torchrun "
                            f"--nproc-per-node {size}), not {self.world.size}")
        r = self.world.rank
        try:
            self.model.load_state_dict(ck["model"])
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            self.state.load(ck["state"])
            torch.set_rng_state(ck["rng_cpu_ranks"][r] if self.world.distributed else ck["rng_cpu"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"{path} does not fit this run's config.yaml ({type(e).__name__}: {first})") from None
        if self.device.type == "cuda" and "rng_cuda" in ck:
            torch.cuda.set_rng_state(ck["rng_cuda_ranks"][r] if self.world.distributed else ck["rng_cuda"])


def _train(cfg: RunConfig, paths: RunPaths, resume: bool, given_noise_models: Optional[NoiseModels],
           progress: bool, world: World = SINGLE) -> TrainResult:
    restart = resume and not paths.last.is_file()  # killed before the first checkpoint: start again at step 0
    with process_group(world, pick_device(cfg.train.device)) as device:
        if world.main:  # checks and writes the run folder: config, split, normalisation, noise models
            cfg = _run_config(cfg, paths, resume)
            seed_everything(cfg.train.seed)
            if restart:
                _refuse_lost_history(paths)
            prepared = prepare_data(cfg.data, cfg.train.patch_size, None if resume and not restart else paths.root)
            if resume and not restart:
                _check_resumed_data(paths, prepared)
            if not resume or restart:
                write_json(paths.normalization, prepared.norm.to_dict())
            noise_models = acquire_noise_models(cfg, prepared, paths, given_noise_models, progress, device)
        world.barrier()  # (a rank 0 that failed above is gone, and torchrun stops the others)
        if not world.main:  # rank 0's folder is complete: read it (the noise models too), write nothing
            cfg = _run_config(cfg, paths, resume=True)
            seed_everything(cfg.train.seed)
            prepared = prepare_data(cfg.data, cfg.train.patch_size, None)
            noise_models = acquire_noise_models(cfg, prepared, paths, None, False, device)
        tc = cfg.train

        trainer = Trainer(cfg, prepared.norm, noise_models, device, world=world)
        if tc.init_from and (not resume or restart):
            _init_weights(trainer.model, cfg, tc.init_from, prepared.channel_names,
                          paths.provenance if world.main else None)
        trainer.to_device()
        if restart or not resume:
            if world.rank > 0:  # other latent draws and dropout masks than rank 0's (rank 0: the seed's own)
                torch.manual_seed(tc.seed + RANK_SEED_STRIDE * world.rank)
            if restart and world.main:
                _truncate_log(paths.log, 0)
        else:
            trainer.restore(paths.last)
            if world.main:
                _truncate_log(paths.log, trainer.state.step)
        trainer.distribute()
        try:
            result = _Loop(trainer, prepared, paths, progress and world.main).run()
        finally:
            trainer.undistribute()
    if paths.best.is_file() and world.main:
        record_halo(paths.root)  # measured once here; calibrate / evaluate / predict / export read it
    return result


class _Loop:
    """train()'s loop over a Trainer: stopping rules (steps, minutes, early stopping), validation rounds with the
    LR schedule, the log and the checkpoints, the progress bar."""

    def __init__(self, trainer: Trainer, prepared: PreparedData, paths: RunPaths, progress: bool):
        self.t, self.paths, self.prepared = trainer, paths, prepared
        tc = self.tc = trainer.tc
        self.dataset = PatchDataset(prepared.train, prepared.norm, tc.patch_size, seed=tc.seed)
        self.val_x, self.val_y = validation_tiles(prepared.val, prepared.norm, tc.patch_size, max_tiles=64)
        steps_per_epoch = max(1, len(self.dataset) // (tc.batch_size * trainer.world.size))  # all ranks' batches
        self.max_steps = tc.max_steps if tc.max_steps is not None else tc.max_epochs * steps_per_epoch
        self.deadline = time.monotonic() + tc.max_minutes * 60 if tc.max_minutes else None
        self.t_start = time.monotonic() - trainer.state.seconds
        self.progress = progress
        self.bar = None

    def run(self) -> TrainResult:
        t, st, tc = self.t, self.t.state, self.tc
        stopped = "max_steps"
        world = t.world
        if st.bad_validations >= tc.early_stop_patience:  # resuming a run that had already stopped early
            stopped, self.max_steps = "early_stopping", st.step
        t.model.train()
        self.bar = tqdm(total=self.max_steps, initial=st.step, desc="train", disable=not self.progress,
                        dynamic_ncols=True, mininterval=1.0)
        try:
            with heap_allocations(t.device.type == "cpu"):  # reuse freed activations (allocator.py)
                while st.step < self.max_steps:
                    if self.deadline is not None and world.any(time.monotonic() >= self.deadline, t.device):
                        stopped = "max_minutes"
                        break
                    terms = t.step(*t.batch(self.dataset))
                    self.bar.update(1)
                    self.bar.set_postfix(loss=f"{float(terms.total.detach()):.3f}",
                                         rec=f"{float(terms.reconstruction):.3f}", kl=f"{float(terms.kl):.3f}",
                                         lr=f"{t.opt.param_groups[0]['lr']:.1e}")
                    if st.step % tc.val_every == 0 or st.step >= self.max_steps:
                        if self.validation_round():
                            stopped = "early_stopping"
                            break
                if stopped == "max_minutes" and st.step % tc.val_every != 0:
                    self.validation_round()  # stopped by the clock between validations: nothing trained is lost
        finally:
            self.bar.close()  # before any error message: a bar printed after it would bury it
        if st.step == 0:  # e.g. --max-minutes spent before the first batch: no checkpoint, nothing to use
            raise UserError(f"training stopped before its first step ({stopped}: the budget ran out while the data "
                            "and noise models were prepared); nothing was trained, give it more time or steps")
        st.seconds = time.monotonic() - self.t_start
        return TrainResult(self.paths.root, st.step, st.best_val, stopped, st.seconds)

    def validation_round(self) -> bool:
        """Validate, step the LR schedule, log, checkpoint. Returns True when early stopping triggers."""
        t, st, tc, paths = self.t, self.t.state, self.tc, self.paths
        val_rec, val_kl = t.validate(self.val_x, self.val_y)
        if not np.isfinite(val_rec):  # nothing to learn from and nothing worth a checkpoint: stop with a clear error
            kept = f"; {paths.last} keeps the last finite state" if paths.last.is_file() else ""
            targets = self.prepared.train.targets
            raise UserError(f"training diverged: the validation loss is {val_rec} at step {st.step} (data range "
                            f"{float(targets.min()):.4g} .. {float(targets.max()):.4g} raw units){kept}")
        warming = st.step < tc.kl_warmup_steps  # not yet the paper's objective: no decisions on it
        if not warming:
            t.sched.step(val_rec)
        st.seconds = time.monotonic() - self.t_start
        entry = {"step": st.step, "epoch": st.epoch, **t.take_running_means(), "val_loss": val_rec,
                 "val_kl": val_kl, "lr": t.opt.param_groups[0]["lr"], "seconds": round(st.seconds, 2),
                 "kl_beta": kl_beta(tc, st.step - 1)}
        # A best found during the warm-up (weaker KL) gives way to the first validation on the full objective, so
        # a run that outlives its warm-up keeps a model trained on the paper's loss; a shorter one keeps its best.
        superseded = not warming and 0 <= st.best_step < tc.kl_warmup_steps
        improved = superseded or val_rec < st.best_val - 1e-6
        if improved:
            st.best_val, st.best_step, st.bad_validations = val_rec, st.step, 0
        elif not warming:
            st.bad_validations += 1
        entry["best"] = improved  # the log's last "best" entry is checkpoints/best.pt
        # Order matters for a kill at any moment: log line, best.pt, then last.pt. A resume starts from last.pt and
        # drops log lines after its step, and replays the same steps (exact resume), so it rewrites both the same.
        if t.world.main:
            _append_log(paths.log, entry)
        if improved:
            t.checkpoint(paths.best)
        t.checkpoint(paths.last)  # (every rank calls it: it gathers their RNG states; rank 0 writes)
        if t.world.main:
            self.bar.write(f"step {st.step:6d}  train {entry['train_loss']:.4f}  val {val_rec:.4f}"
                           f"{'  *best' if improved else ''}{'  (KL warm-up)' if warming else ''}")
        return st.bad_validations >= tc.early_stop_patience


def _append_log(log: Path, entry: dict) -> None:
    """One JSON line, written with a single write and fsynced (a kill cannot interleave two entries)."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _init_weights(model, cfg: RunConfig, source: str, names: Sequence[str], provenance: Optional[Path]) -> None:
    """Fine-tuning: copy the network weights of `source` (pretrained.load_init_source) into `model` and record where
    they came from (with the weights file's sha256) in the run's provenance.json (None: not written, a rank > 0).
    Only weights: the optimizer, the noise models and the normalisation are the new run's.

    Which source structure starts which of this run's two (`names`, the data's channel names): train.init_channels
    when given, else matched by name (a W2S mitochondria/actin model fine-tuned on actin/mito data starts swapped),
    else the source's order. A mismatch here would make the fine-tuning unlearn both structures first."""
    src = load_init_source(source)
    require_same_architecture(cfg.model, cfg.train.patch_size, src)
    by_name = channel_order(src.trained_on.get("channel_names"), names)
    given = cfg.train.init_channels
    order = tuple(given or by_name or (0, 1))
    how = ("given (train.init_channels)" if given else "by channel name" if by_name
           else "source order (names do not tell)")
    try:
        model.load_state_dict(reorder_output_channels(src.state, order), strict=True)
    except RuntimeError as e:
        raise UserError(f"--init-from {source}: the weights do not fit the architecture "
                        f"({str(e).strip().splitlines()[0]})") from None
    if provenance is not None:
        write_json(provenance, {"init_from": {**src.provenance(), "channel_order": list(order),
                                              "channel_order_from": how, "channel_names": list(names)}})


def _truncate_log(log: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be produced again), and a last line
    cut short by a crash (unparsable)."""
    if not log.is_file():
        return
    keep = []
    for ln in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(ln)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and entry["step"] <= step:
            keep.append(ln)
    write_text(log, "".join(ln + "\n" for ln in keep))
