"""The run folder contract (docs/contracts.md) and loading a trained run for the later stages.

RUN_DIR/
  config.yaml          full resolved RunConfig
  noise_models/        ch0.npz, ch1.npz (GMM, raw units)
  normalization.json   input mean/std, per-channel target mean/std (raw units)
  data_split.json      which images (or regions) went to train/val/test, noise protocol settings
  checkpoints/         best.pt, last.pt (weights_only=True loadable)
  log.jsonl            one JSON object per validation
  calibration.json     after `calibrate`
  .in_use.json         while a command writes the folder: who (pid, command, since); see RunLock
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import DEFAULT_SEED, RunConfig, load_run_config
from .data import prepare_data
from .errors import UserError
from .fileio import read_json, sha256_file, torch_load, write_json

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked (RunLock is then a no-op)
    fcntl = None
from .model import LadderVAE, SplitSampler
from .normalization import Normalization
from .sampling import measure_halo



class RunLock:
    """`with RunLock(run_dir, "train"):` - an exclusive lock on a run folder for every command that writes it (train,
    calibrate), so two of them cannot interleave log.jsonl or checkpoints. The second gets one UserError line naming
    the holder (from RUN_DIR/.in_use.json). The lock is flock on the folder itself, not on a lock file: the kernel
    drops it when the holder dies (even SIGKILL), and nothing has to be cleaned up in a folder a failed fresh run
    removes. (filelock needs a lock file inside or beside the folder, which is why it is not used here.)"""

    HOLDER = ".in_use.json"

    def __init__(self, root: str | os.PathLike, command: str):
        self.root, self.command, self.fd = Path(root), command, None

    def __enter__(self) -> "RunLock":
        if fcntl is None:
            return self
        self.fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"{self.root} is in use by {self._holder()}; wait for it to finish (or stop it)") from None
        with contextlib.suppress(OSError):  # who holds it, for the message above; best effort
            write_json(self.root / self.HOLDER, {"pid": os.getpid(), "command": self.command,
                                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                 "argv": sys.argv[1:]})
        return self

    def _holder(self) -> str:
        try:
            h = read_json(self.root / self.HOLDER)
            return f"another denoisplit-zoo `{h.get('command')}` (pid {h.get('pid')}, since {h.get('since')})"
        except Exception:  # noqa: BLE001  (missing or half-written: the lock itself is the evidence)
            return "another denoisplit-zoo process"

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            (self.root / self.HOLDER).unlink(missing_ok=True)
        os.close(self.fd)  # releases the flock
        self.fd = None


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def noise_models(self) -> Path:
        return self.root / "noise_models"

    @property
    def normalization(self) -> Path:
        return self.root / "normalization.json"

    @property
    def data_split(self) -> Path:
        return self.root / "data_split.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def halo(self) -> Path:
        """The halo measured on checkpoints/best.pt when training ended (with that file's sha256)."""
        return self.root / "halo.json"

    @property
    def provenance(self) -> Path:
        """Where the run's starting weights came from (fine-tuning) and, for bundled models, what they were trained
        on and how they score."""
        return self.root / "provenance.json"

    def weights(self, checkpoint: str = "best") -> Optional[Path]:
        """The checkpoint to load: `checkpoint` ("best" or "last"), else last.pt; None when neither exists yet."""
        first = self.best if checkpoint == "best" else self.last
        return next((p for p in (first, self.last) if p.is_file()), None)

    def is_run(self) -> bool:
        return self.config.is_file()


def build_model(cfg: RunConfig) -> LadderVAE:
    m = cfg.model
    return LadderVAE(m.n_levels, m.z_dim, m.n_filters, m.dropout, m.out_channels, cfg.train.patch_size)


@dataclass
class Run:
    """A trained run, ready for sampling: model in eval mode (posterior sampling, BN running stats)."""

    paths: RunPaths
    config: RunConfig
    model: LadderVAE
    norm: Normalization
    noise_models: list = field(default_factory=list)
    channel_names: list[str] = field(default_factory=lambda: ["A", "B"])
    calibration: Optional[dict] = None
    data_split: Optional[dict] = None
    checkpoint: Optional[Path] = None  # the file `model`'s weights came from

    @functools.cached_property
    def halo(self) -> int:
        """The weights' measured effective receptive-field radius (sampling.measure_halo, input px): the halo tiles
        need. It grows with training, so it belongs to a checkpoint: read from RUN_DIR/halo.json when that was
        measured on this very file (sha256), else measured now (~seconds). Measured once per Run either way."""
        if self.checkpoint is not None and self.paths.halo.is_file():
            rec = read_json(self.paths.halo)
            if isinstance(rec, dict) and rec.get("sha256") == sha256_file(self.checkpoint) \
                    and isinstance(rec.get("halo"), int):
                return rec["halo"]
        return measure_halo(self.model)

    @property
    def calibration_scale(self) -> list[float]:
        """Per-channel std scale (1.0 before `calibrate`)."""
        if not self.calibration:
            return [1.0, 1.0]
        try:
            scales = [float(self.calibration["channels"][n]["scale"]) for n in self.channel_names]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{self.paths.calibration}: no numeric scale for channels {self.channel_names}; run "
                            "`denoisplit-zoo calibrate` again") from None
        if not all(math.isfinite(v) and v > 0 for v in scales):  # a negative scale would make negative stds
            raise UserError(f"{self.paths.calibration}: std scales must be finite and > 0, got {scales}; run "
                            "`denoisplit-zoo calibrate` again")
        return scales

    def sampler(self, n_samples: int, seed: int = DEFAULT_SEED, sample_latents: bool = True) -> SplitSampler:
        """The in-graph sampler (the same module the exported package runs) with this run's weights,
        normalisation, calibration and noise models as buffers. Eval mode."""
        m = self.config.model
        s = SplitSampler(m.n_levels, m.z_dim, m.n_filters, m.dropout, m.out_channels, self.config.train.patch_size,
                         n_samples=n_samples, seed=seed, sample_latents=sample_latents,
                         n_gaussians=self.config.noise_model.n_gaussians,
                         n_coeffs=self.config.noise_model.n_coeffs)
        s.vae.load_state_dict(self.model.state_dict())
        s.calibration_scale.copy_(torch.tensor(self.calibration_scale))
        s.input_mean.fill_(self.norm.input_mean)
        s.input_std.fill_(self.norm.input_std)
        s.target_mean.copy_(torch.tensor(self.norm.target_mean))
        s.target_std.copy_(torch.tensor(self.norm.target_std))
        for c, nm in enumerate(self.noise_models):
            s.nm_weight[c].copy_(nm.weight.detach())
            s.nm_min_signal[c] = float(nm.min_signal)
            s.nm_max_signal[c] = float(nm.max_signal)
            s.nm_min_sigma[c] = nm.min_sigma
        return s.eval()


def load_run(path, checkpoint: str = "best") -> Run:
    """Load RUN_DIR (config, weights, normalisation, noise models, calibration if present)."""
    from .noise_model import load_noise_models

    paths = RunPaths(Path(path))
    if not paths.root.is_dir():
        raise UserError(f"run folder not found: {paths.root}")
    if not paths.is_run():
        raise UserError(f"{paths.root} is not a run folder (no config.yaml)")
    cfg = load_run_config(paths.config)
    ckpt_path = paths.weights(checkpoint)
    if ckpt_path is None:
        raise UserError(f"{paths.root} has no checkpoint yet (checkpoints/best.pt or last.pt)")
    ckpt = torch_load(ckpt_path)
    model = build_model(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{ckpt_path}: weights do not match config.yaml ({str(e).splitlines()[0]})") from None
    model.eval()
    norm = Normalization.from_dict(read_json(paths.normalization))
    nms = load_noise_models(paths.noise_models) if (paths.noise_models / "ch0.npz").is_file() else []
    split = read_json(paths.data_split) if paths.data_split.is_file() else None
    names = list(split.get("channel_names", ["A", "B"])) if split else ["A", "B"]
    calib = read_json(paths.calibration) if paths.calibration.is_file() else None
    return Run(paths, cfg, model, norm, nms, names, calib, split, ckpt_path)


def record_halo(root: Path) -> int:
    """Measure the halo of RUN_DIR/checkpoints/best.pt once (train() calls this when it ends) and keep it in
    RUN_DIR/halo.json with the checkpoint's sha256, so the later stages read it instead of measuring again."""
    run = load_run(root)
    halo = measure_halo(run.model)
    write_json(run.paths.halo, {"halo": int(halo), "checkpoint": run.checkpoint.name,
                                "sha256": sha256_file(run.checkpoint)})
    return int(halo)


def resolve_data_path(run, data: Optional[str]) -> str:
    """The data set to rebuild splits from: `data` if given, else the run's config path (`locate_data`)."""
    return data if data else locate_data(run.config.data.path, run.paths.root)


def absolute_data_path(path: str) -> str:
    """data.path with every part (a file, a folder, or 'a.tif,b.tif') made absolute: what a new run's config.yaml
    stores, so a later --resume, calibrate or evaluate from another folder finds the same data."""
    return ",".join(str(Path(p.strip()).resolve()) for p in str(path).split(","))


def locate_data(path: str, root: Path) -> str:
    """A run's data.path as written, or relative to the run folder or its parent (runs written before paths were
    stored absolute: relative to where `train` ran). One UserError line when none exists."""
    parts = [Path(s.strip()) for s in str(path).split(",")]  # one file or folder, or a pair 'a.tif,b.tif'
    for base in (None, root, root.parent):
        cand = [p if base is None or p.is_absolute() else base / p for p in parts]
        if all(c.exists() for c in cand):
            return ",".join(map(str, cand))
    raise UserError(f"the run's training data is not at {path}; pass --data PATH (the same file the run was trained "
                    "on)")


def prepare_run_split(run, split: str, data: Optional[str] = None):
    """Rebuild the run's data (deterministic: same file, split seed and noise seed) and return (SplitData, noise kind).
    Checks that the rebuilt split matches the run's data_split.json."""
    cfg = run.config.data.model_copy(update={"path": resolve_data_path(run, data)})
    prepared = prepare_data(cfg, run.config.train.patch_size, None)
    if run.data_split and run.data_split.get("mode") == "images" and split in run.data_split:
        if list(run.data_split[split]) != list(prepared.split.get(split, [])):
            raise UserError(f"the data at {cfg.path} does not split like the run's data_split.json ({split} images "
                            f"{prepared.split.get(split)} vs {run.data_split[split]}); is it the training data?")
    return getattr(prepared, split), prepared.noise_info.get("kind", "synthetic")
