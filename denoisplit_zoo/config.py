"""Typed, validated configuration with named presets.

Every config is a pydantic model that refuses unknown keys, so a typo in a YAML file is an error, not a silently
ignored setting. `RunConfig` is what a run folder's `config.yaml` holds (the full resolved config).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError

# Sampling defaults shared by calibrate, evaluate, predict and export (model.py repeats 50 / 42 as SplitSampler's
# own defaults because it ships verbatim inside packages and may import nothing of ours).
DEFAULT_SAMPLES = 50  # posterior samples K per pixel: the paper's evaluation (mmse_count 50)
# data.path of a `train --resume` without --data: the run's own config.yaml says where its data is.
DATA_FROM_RUN = "<from run>"
DEFAULT_SEED = 42  # seed of the counter-based latent noise at inference
DEFAULT_TILE = 512  # px, tile edge of whole-image prediction (before the halo)
# Calibration without clean data: Hutchinson probes of the network's input gain d, each with a sampler of
# GAIN_SAMPLES posterior samples. One probe: on W2S x4 and the BPAE quickstart, 4 probes moved the estimate by
# < 0.3 % (d is small for denoiSplit models; its probe noise is averaged by the 9 x 9 box) for 1.8-1.9x the time
# (docs/calibration.md). `calibrate --probes N` averages more where the gain is large.
GAIN_PROBES = 1
GAIN_SAMPLES = 10

# GMM noise-model defaults (the paper's / PPN2V's), raw intensity units; noise_model.py and the CLI use these.
NM_GAUSSIANS = 6
NM_COEFFS = 4  # polynomial degree + 1 (cubic)
NM_MIN_SIGMA = 0.125  # despite the name (kept from PPN2V's files): the lower clamp on each component's VARIANCE, raw^2
NM_ITERATIONS = 2000
NM_BATCH = 250_000
NM_LR = 0.1

LossKind = Literal["denoisplit", "usplit"]
PresetName = Literal["paper", "small", "tiny"]


class _Strict(BaseModel):
    # unknown keys, inf and nan are errors: a typo or a `.inf` in a YAML file must not become a silent setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """The VSE (LadderVAE) architecture. `paper` = the denoiSplit network (3,002,882 parameters)."""

    n_levels: int = Field(4, ge=1, le=6, description="hierarchy levels; each halves the resolution")
    z_dim: int = Field(128, ge=1, description="channels of every latent map")
    n_filters: int = Field(64, ge=1, description="width of every conv block")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout2d probability in every residual block")
    # 2 = normalised clean estimates (noise-model likelihood); 4 = means + log-variances (uSplit's Gaussian head)
    out_channels: Literal[2, 4] = 2

    @property
    def multiple(self) -> int:
        """Spatial sizes the network accepts without padding (2**n_levels)."""
        return 2**self.n_levels


class NoiseModelConfig(_Strict):
    """GMM noise model p(noisy | signal), raw intensity units (paper / PPN2V defaults)."""

    n_gaussians: int = Field(NM_GAUSSIANS, ge=1)
    n_coeffs: int = Field(NM_COEFFS, ge=2, description="polynomial degree + 1 (4 = cubic)")
    min_sigma: float = Field(NM_MIN_SIGMA, gt=0, description="lower clamp on each component's VARIANCE (raw units^2)")
    n_iterations: int = Field(NM_ITERATIONS, ge=1)
    batch_size: int = Field(NM_BATCH, ge=16)
    lr: float = Field(NM_LR, gt=0)


class NoiseConfig(_Strict):
    """The paper's synthetic noise protocol (applied once, fixed seed)."""

    gaussian: float = Field(0.0, ge=0, description="Gaussian std as a multiple of std(mean of the two clean channels)")
    poisson: float = Field(0.0, ge=0, description="Poisson factor F: x <- Poisson(x/F)*F; 0 = off")
    seed: int = 0


class DataConfig(_Strict):
    path: str
    channels: tuple[int, int] = (0, 1)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    split_seed: int = 0
    noise: NoiseConfig = NoiseConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.channels[0] == self.channels[1]:
            raise ValueError("the two channels must differ")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) < 0:
            raise ValueError("split fractions must be >= 0 and sum to 1")
        return self


class TrainConfig(_Strict):
    loss: LossKind = "denoisplit"
    patch_size: int = Field(128, ge=8)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_patience: int = Field(30, ge=1, description="ReduceLROnPlateau patience, in validations")
    lr_factor: float = Field(0.5, gt=0, lt=1)
    early_stop_patience: int = Field(200, ge=1, description="validations without improvement before stopping")
    grad_clip: float = Field(0.5, gt=0, description="gradient-norm clip (the reference's effective GPU setting)")
    kl_weight: float = Field(1.0, ge=0)
    # Deviation from the paper (which trains with beta = 1 from the first step; its code has the same linear
    # annealing, switched off): beta rises linearly from 0 to kl_weight over the first kl_warmup_steps steps. At
    # high noise (W2S Gaussian x4) the posterior otherwise collapses onto the prior within ~50 steps (KL at the
    # free-bits floor, validation NLL flat for the whole run) before the decoder has learned to use the latents.
    # The LR schedule and early stopping count only validations on the full objective, and the first of those
    # replaces any best checkpoint from the warm-up, so a run longer than its warm-up keeps a model trained on the
    # paper's loss. docs/quality.md.
    kl_warmup_steps: int = Field(0, ge=0, description="steps over which the KL weight rises linearly from 0")
    free_bits: float = Field(1.0, ge=0, description="nats per sample per level (denoiSplit); uSplit uses 0")
    # The KL weighting by itself: None = the loss's own. loss "usplit" + kl_formulation "denoisplit" is the paper's
    # "Altered uSplit" ablation (Gaussian likelihood, KL per image pixel): a Gaussian-likelihood baseline that
    # does not pass the input noise through, so the noise-model likelihood's own contribution can be measured.
    kl_formulation: Optional[LossKind] = None
    # Fine-tuning: start from these network weights (pretrained.load_init_source: a bundled model's name, a run
    # folder or an exported zip) instead of random ones; the architecture must be the source's.
    init_from: Optional[str] = None
    # Which output channel of the source starts each of this run's two structures: (0, 1) keeps the source's order,
    # (1, 0) swaps it (a model trained on mitochondria/actin fine-tuned on actin/mitochondria). None = (0, 1).
    init_channels: Optional[tuple[Literal[0, 1], Literal[0, 1]]] = None
    val_every: int = Field(200, ge=1, description="optimizer steps between validations/checkpoints")
    max_steps: Optional[int] = Field(None, ge=1)
    max_minutes: Optional[float] = Field(None, gt=0)
    max_epochs: int = Field(400, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16/fp16 autocast on CUDA (the likelihood always stays fp32)")


class RunConfig(_Strict):
    """Everything a run needs; written to RUN_DIR/config.yaml."""

    preset: PresetName = "small"
    model: ModelConfig
    noise_model: NoiseModelConfig = NoiseModelConfig()
    train: TrainConfig
    data: DataConfig

    @model_validator(mode="after")
    def _check(self):
        want = 4 if self.train.loss == "usplit" else 2
        if self.model.out_channels != want:
            raise ValueError(f"loss {self.train.loss!r} needs model.out_channels={want}")
        if self.train.patch_size % self.model.multiple:
            raise ValueError(f"patch_size must be a multiple of {self.model.multiple} (2**n_levels)")
        ic = self.train.init_channels
        if ic is not None and (sorted(ic) != [0, 1] or not self.train.init_from):
            raise ValueError("train.init_channels must be (0, 1) or (1, 0), and needs train.init_from")
        return self


# Named presets: model + training defaults. `paper` is exactly the denoiSplit configuration (GPU); `small` is the
# CPU demo; `tiny` trains in seconds and exists for tests.
PRESETS: dict[str, dict] = {
    "paper": dict(
        model=dict(n_levels=4, z_dim=128, n_filters=64, dropout=0.1),
        train=dict(patch_size=128, batch_size=32, val_every=200),
    ),
    "small": dict(
        model=dict(n_levels=4, z_dim=32, n_filters=32, dropout=0.1),
        train=dict(patch_size=64, batch_size=16, val_every=100, lr_patience=10, early_stop_patience=50,
                   kl_warmup_steps=200),
        # CPU budget: 1000 x 50k pairs instead of PPN2V's 2000 x 250k (fits agree within a few % on
        # Poisson+Gaussian data; see tests/test_noise_model.py)
        noise_model=dict(n_iterations=1000, batch_size=50_000),
    ),
    "tiny": dict(
        model=dict(n_levels=3, z_dim=4, n_filters=8, dropout=0.0),
        train=dict(patch_size=32, batch_size=4, val_every=10, lr_patience=5, early_stop_patience=20,
                   kl_warmup_steps=100),
        noise_model=dict(n_iterations=200, batch_size=20_000),
    ),
}


def _deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_run_config(preset: str = "small", overrides: Optional[dict] = None) -> RunConfig:
    """Preset defaults, then `overrides` (a nested dict, e.g. from --config FILE.yaml and CLI flags) on top."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    raw = _deep_update(copy.deepcopy({"preset": preset, **PRESETS[preset]}), overrides or {})
    loss = raw.get("train", {}).get("loss", "denoisplit")
    raw.setdefault("model", {}).setdefault("out_channels", 4 if loss == "usplit" else 2)
    if loss == "usplit":
        raw["train"].setdefault("free_bits", 0.0)
    return validate_config(raw)


def _known_keys(loc: tuple) -> list[str]:
    """The keys allowed where an unknown key `loc` sits (for "did you mean ...?")."""
    model = RunConfig
    for part in loc[:-1]:
        field_info = model.model_fields.get(str(part))
        ann = getattr(field_info, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """raw nested dict -> RunConfig; the first problem becomes a one-line UserError naming the key (with the
    closest known key for a typo)."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            import difflib

            known = _known_keys(tuple(err["loc"]))
            close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                   f" (known: {', '.join(known)})" if known else "")
        raise UserError(f"{source}: {where}: {msg}") from None


# Keys that run folders written by earlier versions hold but that no longer exist (they never did anything):
# dropped when such a run is loaded, still refused in a user's --config.
_RETIRED_KEYS = {"train": ("num_workers",)}


def load_run_config(path: str | Path) -> RunConfig:
    """A run folder's config.yaml (written by `train`)."""
    from .fileio import read_yaml

    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping")
    for section, keys in _RETIRED_KEYS.items():
        if isinstance(raw.get(section), dict):
            for key in keys:
                raw[section].pop(key, None)
    return validate_config(raw, source=str(path))
