"""`denoisplit-zoo train`: data -> noise models -> VSE training -> run folder.

The loop is plain PyTorch (no Lightning): Adamax, ReduceLROnPlateau and early stopping on the validation loss,
gradient-norm clipping, best + last checkpoints written atomically, exact resume (model, optimizer, scheduler, RNG,
data position, early-stopping state), one log line per validation.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .allocator import heap_allocations
from .config import RunConfig
from .data import PatchDataset, PreparedData, prepare_data, validation_tiles
from .errors import UserError
from .fileio import OutputSet, remove_stale_temps, torch_load, torch_save, write_json, write_yaml
from .losses import loss_terms
from .noise_model import GMMNoiseModel, fit_noise_model, load_noise_models
from .pretrained import architecture_mismatch, load_init_source
from .run_folder import RunPaths, build_model
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
        self.pos = 0  # position inside the epoch's permutation
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


def train(cfg: RunConfig, out: str | Path, resume: bool = False, noise_model_files: Optional[list[str]] = None,
          progress: bool = True) -> TrainResult:
    """Train a run into `out` (docs/contracts.md run folder). With resume=True, `cfg` is replaced by the run's config
    except for the stopping limits (max_steps / max_minutes), which the caller may extend.

    Crash safety: every file is written atomically (temp file + fsync + rename) and checkpoints/last.pt holds
    everything the schedule depends on (weights, optimizer, LR scheduler, torch RNG, step / epoch / position in the
    epoch's permutation, early-stopping state), so a process killed at any moment (even SIGKILL) resumes with
    resume=True exactly where last.pt was written (at most `val_every` steps are lost) and continues as if it had
    never stopped. A fresh run that fails before its first checkpoint leaves nothing behind (its folder is removed);
    one killed before its first checkpoint restarts from step 0 on resume."""
    out = Path(out)
    paths = _prepare_run_dir(out, resume)
    if resume:
        return _train(cfg, paths, resume, noise_model_files, progress, None)
    with OutputSet(out) as outputs:
        if not os.access(out, os.W_OK):
            raise UserError(f"{out} is not writable")
        return _train(cfg, paths, resume, noise_model_files, progress, outputs)


def _train(cfg: RunConfig, paths: RunPaths, resume: bool, noise_model_files: Optional[list[str]], progress: bool,
           outputs: Optional[OutputSet]) -> TrainResult:
    out = paths.root
    restart = resume and not paths.last.is_file()  # killed before the first checkpoint: start again at step 0
    if resume:
        from .config import load_run_config

        saved = load_run_config(paths.config)
        limits = {"max_steps": cfg.train.max_steps, "max_minutes": cfg.train.max_minutes}
        cfg = saved.model_copy(update={"train": saved.train.model_copy(update=limits)})
    else:
        write_yaml(paths.config, json.loads(cfg.model_dump_json()))  # first: from now on `out` is a run folder
    tc = cfg.train
    device = pick_device(tc.device)
    seed_everything(tc.seed)

    prepared = prepare_data(cfg.data, tc.patch_size, None if resume and not restart else out)
    if not resume or restart:
        write_json(paths.normalization, prepared.norm.to_dict())
    norm = prepared.norm

    # Noise models: the denoiSplit likelihood needs them; every run keeps them because calibration without clean
    # data (calibrate --without-clean) subtracts the observation-noise variance they predict.
    noise_models: Optional[list[GMMNoiseModel]] = None
    if all((paths.noise_models / f"ch{c}.npz").is_file() for c in range(2)):
        noise_models = load_noise_models(paths.noise_models)
    elif noise_model_files:
        if len(noise_model_files) != 2:
            raise UserError("--noise-models needs exactly two files (one per channel)")
        noise_models = [GMMNoiseModel.load(f) for f in noise_model_files]
    elif prepared.train.clean is not None:
        noise_models = fit_run_noise_models(cfg, prepared, progress, device)
    elif tc.loss == "denoisplit":
        raise UserError("the denoisplit loss needs noise models: the data has no clean images, so fit them with "
                        "`denoisplit-zoo noise-model fit` and pass --noise-models")
    if noise_models is not None:
        for c, nm in enumerate(noise_models):
            if not (paths.noise_models / f"ch{c}.npz").is_file():
                nm.save(paths.noise_models / f"ch{c}.npz")
            nm.to(device)
    loss_noise_models = noise_models if tc.loss == "denoisplit" else None

    # NHWC convolutions on the CPU: with heap_allocations below, 1.18x (tiny) / 1.13x (small) / 1.51x (paper)
    # training steps on this project's 2-core CPU (benchmarks/README.md, bench_training.py); identical arithmetic
    # (fixed-noise loss equal). Not measured on CUDA: left contiguous there.
    fmt = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    model = build_model(cfg)
    if tc.init_from and (not resume or restart):
        _init_weights(model, cfg, tc.init_from, paths.provenance)
    model = model.to(device, memory_format=fmt)
    opt = torch.optim.Adamax(model.parameters(), lr=tc.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=tc.lr_factor,
                                                       patience=tc.lr_patience, min_lr=1e-12)
    state = _State()
    if restart:
        _truncate_log(paths.log, 0)
    elif resume:
        ck = torch_load(paths.last)
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            state.load(ck["state"])
            torch.set_rng_state(ck["rng_cpu"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise UserError(f"{paths.last} does not fit this run's config.yaml ({type(e).__name__}: {first})") from None
        if device.type == "cuda" and "rng_cuda" in ck:
            torch.cuda.set_rng_state(ck["rng_cuda"])
        _truncate_log(paths.log, state.step)

    dataset = PatchDataset(prepared.train, norm, tc.patch_size, seed=tc.seed)
    val_x, val_y = validation_tiles(prepared.val, norm, tc.patch_size, max_tiles=64)
    t_mean = torch.tensor(norm.target_mean, device=device)
    t_std = torch.tensor(norm.target_std, device=device)
    latent_shapes = model.latent_shapes(tc.patch_size, tc.patch_size)
    use_amp = tc.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

    def objective(x, y, training: bool):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            pred, kls = model(x, compute_kl=True)
        return loss_terms(tc.loss, pred.float(), [k.float() for k in kls], y, latent_shapes=latent_shapes,
                          noise_models=loss_noise_models, target_mean=t_mean, target_std=t_std,
                          kl_weight=kl_beta(tc, state.step), free_bits=tc.free_bits,
                          kl_formulation=tc.kl_formulation)

    def validate() -> tuple[float, float]:
        """Validation loss = reconstruction NLL on fixed tiles (reference: no KL; its MC noise would make the
        early-stopping signal noisy). Eval mode: BN running stats, no dropout."""
        model.eval()
        rec, kl, n = 0.0, 0.0, 0
        g = torch.get_rng_state()
        torch.manual_seed(tc.seed + 12345)  # same latent draws at every validation
        with torch.no_grad():
            for i in range(0, len(val_x), tc.batch_size):
                x = val_x[i: i + tc.batch_size].to(device, memory_format=fmt)
                y = val_y[i: i + tc.batch_size].to(device)
                terms = objective(x, y, False)
                rec += float(terms.reconstruction) * len(x)
                kl += float(terms.kl) * len(x)
                n += len(x)
        torch.set_rng_state(g)
        model.train()
        return rec / n, kl / n

    def checkpoint(path: Path) -> None:
        ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
              "state": state.to_dict(), "rng_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            ck["rng_cuda"] = torch.cuda.get_rng_state()
        torch_save(path, ck)
        if outputs is not None and path == paths.last:
            outputs.commit()  # a resumable run from here on: keep the folder even if training fails later

    train_acc = {"loss": 0.0, "rec": 0.0, "kl": 0.0, "n": 0}

    def validation_round() -> bool:
        """Validate, step the LR schedule, checkpoint, log. Returns True when early stopping triggers."""
        val_rec, val_kl = validate()
        if not np.isfinite(val_rec):  # nothing to learn from and nothing worth a checkpoint: stop with a clear error
            kept = f"; {paths.last} keeps the last finite state" if paths.last.is_file() else ""
            raise UserError(f"training diverged: the validation loss is {val_rec} at step {state.step} (data range "
                            f"{float(prepared.train.targets.min()):.4g} .. {float(prepared.train.targets.max()):.4g} "
                            f"raw units){kept}")
        warming = state.step < tc.kl_warmup_steps  # not yet the paper's objective: no decisions on it
        if not warming:
            sched.step(val_rec)
        state.seconds = time.monotonic() - t_start
        n = max(train_acc["n"], 1)
        entry = {"step": state.step, "epoch": state.epoch, "train_loss": train_acc["loss"] / n,
                 "train_reconstruction": train_acc["rec"] / n, "train_kl": train_acc["kl"] / n,
                 "val_loss": val_rec, "val_kl": val_kl, "lr": opt.param_groups[0]["lr"],
                 "seconds": round(state.seconds, 2), "kl_beta": kl_beta(tc, state.step - 1)}
        train_acc.update(loss=0.0, rec=0.0, kl=0.0, n=0)
        # A best found during the warm-up (weaker KL) gives way to the first validation on the full objective, so
        # a run that outlives its warm-up keeps a model trained on the paper's loss; a shorter one keeps its best.
        superseded = not warming and 0 <= state.best_step < tc.kl_warmup_steps
        improved = superseded or val_rec < state.best_val - 1e-6
        if improved:
            state.best_val, state.best_step, state.bad_validations = val_rec, state.step, 0
        elif not warming:
            state.bad_validations += 1
        entry["best"] = improved  # the log's last "best" entry is checkpoints/best.pt
        # Order matters for a kill at any moment: log line, best.pt, then last.pt. A resume starts from last.pt and
        # drops log lines after its step, and replays the same steps (exact resume), so it rewrites both the same.
        _append_log(paths.log, entry)
        if improved:
            checkpoint(paths.best)
        checkpoint(paths.last)
        bar.write(f"step {state.step:6d}  train {entry['train_loss']:.4f}  val {val_rec:.4f}"
                  f"{'  *best' if improved else ''}{'  (KL warm-up)' if warming else ''}")
        return state.bad_validations >= tc.early_stop_patience

    steps_per_epoch = max(1, len(dataset) // tc.batch_size)
    max_steps = tc.max_steps if tc.max_steps is not None else tc.max_epochs * steps_per_epoch
    deadline = time.monotonic() + tc.max_minutes * 60 if tc.max_minutes else None
    t_start = time.monotonic() - state.seconds
    stopped = "max_steps"
    if state.bad_validations >= tc.early_stop_patience:  # resuming a run that had already stopped early
        stopped, max_steps = "early_stopping", state.step
    model.train()
    bar = tqdm(total=max_steps, initial=state.step, desc="train", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    try:
        with heap_allocations(device.type == "cpu"):  # reuse freed activations (allocator.py)
            while state.step < max_steps:
                if deadline is not None and time.monotonic() >= deadline:
                    stopped = "max_minutes"
                    break
                dataset.set_epoch(state.epoch)
                g = torch.Generator().manual_seed(tc.seed * 100003 + state.epoch)
                perm = torch.randperm(len(dataset), generator=g)
                idx = perm[state.pos: state.pos + tc.batch_size].tolist()
                batch = [dataset[i] for i in idx]
                x = torch.stack([b[0] for b in batch]).to(device, memory_format=fmt)
                y = torch.stack([b[1] for b in batch]).to(device)
                terms = objective(x, y, True)
                opt.zero_grad(set_to_none=True)
                if torch.isfinite(terms.total):
                    terms.total.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                    # one NaN/inf gradient (e.g. an overflowing likelihood) must not poison the weights: skip the step
                    if torch.isfinite(grad_norm):
                        opt.step()
                state.step += 1
                state.pos += tc.batch_size
                if state.pos + tc.batch_size > len(dataset):
                    state.epoch, state.pos = state.epoch + 1, 0
                train_acc["loss"] += float(terms.total.detach())
                train_acc["rec"] += float(terms.reconstruction)
                train_acc["kl"] += float(terms.kl)
                train_acc["n"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(terms.total.detach()):.3f}", rec=f"{float(terms.reconstruction):.3f}",
                                kl=f"{float(terms.kl):.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")

                if state.step % tc.val_every == 0 or state.step >= max_steps:
                    if validation_round():
                        stopped = "early_stopping"
                        break
            if stopped == "max_minutes" and state.step % tc.val_every != 0:
                validation_round()  # stopped by the clock between validations: nothing trained is lost
    finally:
        bar.close()  # before any error message: a bar printed after it would bury it
    state.seconds = time.monotonic() - t_start
    return TrainResult(out, state.step, state.best_val, stopped, state.seconds)


def _append_log(log: Path, entry: dict) -> None:
    """One JSON line, written with a single write and fsynced (a kill cannot interleave two entries)."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _init_weights(model, cfg: RunConfig, source: str, provenance: Path) -> None:
    """Fine-tuning: copy the network weights of `source` (pretrained.load_init_source) into `model` and record where
    they came from (with the weights file's sha256) in the run's provenance.json. Only weights: the optimizer, the
    noise models and the normalisation are the new run's."""
    src = load_init_source(source)
    mismatch = architecture_mismatch(cfg.model, cfg.train.patch_size, src)
    if mismatch:
        raise UserError(f"--init-from {source}: architecture differs ({mismatch}); drop --preset / model overrides "
                        "to take the source's")
    try:
        model.load_state_dict(src.state, strict=True)
    except RuntimeError as e:
        raise UserError(f"--init-from {source}: the weights do not fit the architecture "
                        f"({str(e).strip().splitlines()[0]})") from None
    write_json(provenance, {"init_from": src.provenance()})


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
    from .fileio import write_text

    write_text(log, "".join(ln + "\n" for ln in keep))
