"""Where a fine-tuning run's starting weights come from (`train --init-from SOURCE`), and the bundled models.

SOURCE is one of
- the name of a model bundled in the repository's `weights/` folder (each one a run folder, see `bundled_models`),
- a run folder (config.yaml + checkpoints/best.pt, else last.pt),
- a bioimage.io zip exported by this tool (read by package.reader.load_package_sampler: sha256 checked, tensors
  loaded with weights_only=True, the packaged python code never imported).
Only the network weights are taken. Noise models, normalisation, optimizer state and the data split come from the
new run: fine-tuning on other channels, another microscope or another noise level is allowed (and stated in the
run's provenance.json and the model card), but the architecture must be the source's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import ModelConfig, PresetName, load_run_config
from .errors import UserError
from .fileio import read_json, sha256_file, torch_load
from .run_folder import RunPaths

# The repository's bundled models (next to the package in a source checkout / editable install, where README's
# set-up puts them; a wheel without them simply has none).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# What a fine-tuning run changes in its preset's training settings: no KL warm-up (it exists to keep a randomly
# initialised posterior from collapsing before the decoder uses the latents; a trained one already does).
FINE_TUNE_TRAIN = {"kl_warmup_steps": 0}


@dataclass
class InitSource:
    """Starting weights for a new run. `state`: LadderVAE state dict (torch tensors); `model`: its architecture."""

    source: str  # what the user passed
    kind: str  # "bundled" | "run" | "package"
    path: Path  # the file the weights were read from
    sha256: str  # of that file
    model: ModelConfig
    patch_size: int  # training patch size: the learned top prior's size depends on it
    preset: Optional[PresetName]  # the source's preset, when it records one
    state: dict
    trained_on: dict  # what the source was trained on (data, channels, noise), as far as it says

    def provenance(self) -> dict:
        return {"source": self.source, "kind": self.kind, "file": str(self.path), "sha256": self.sha256,
                "preset": self.preset, "trained_on": self.trained_on}


def bundled_models() -> dict[str, Path]:
    """name -> run folder of every model in WEIGHTS_DIR (a folder with config.yaml and checkpoints/best.pt)."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(WEIGHTS_DIR.iterdir())
            if (p / "config.yaml").is_file() and (p / "checkpoints" / "best.pt").is_file()}


def _from_run(root: Path, source: str, kind: str) -> InitSource:
    paths = RunPaths(root)
    if not paths.is_run():
        raise UserError(f"--init-from {source}: {root} is not a run folder (no config.yaml)")
    ckpt = paths.weights("best")
    if ckpt is None:
        raise UserError(f"--init-from {source}: the run {root} has no checkpoints (checkpoints/best.pt or last.pt)")
    cfg = load_run_config(paths.config)
    ck = torch_load(ckpt)
    state = ck.get("model") if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"--init-from {source}: {ckpt} holds no model weights")
    prov = read_json(paths.provenance) if paths.provenance.is_file() else {}
    split = read_json(paths.data_split) if paths.data_split.is_file() else {}
    names = list(((prov.get("data") or {}).get("channels") or {}).keys()) or split.get("channel_names")
    trained_on = {"data": (prov.get("data") or {}).get("name") or cfg.data.path,
                  "channels": list(cfg.data.channels), "noise": cfg.data.noise.model_dump(), "channel_names": names}
    return InitSource(source, kind, ckpt, sha256_file(ckpt), cfg.model, cfg.train.patch_size, cfg.preset, state,
                      trained_on)


def _from_package(path: Path, source: str) -> InitSource:
    from .package.reader import load_package_sampler  # torch and the model: only when a zip is named

    sampler, names, _, meta = load_package_sampler(path)
    arch = meta["architecture"]
    try:
        model = ModelConfig(**{k: arch[k] for k in ModelConfig.model_fields})
        int(arch["patch_size"])
    except (KeyError, ValueError, TypeError) as e:
        raise UserError(f"--init-from {source}: the package's architecture is not this tool's "
                        f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    training = meta.get("training") or {}
    trained_on = {"data": training.get("data_source"), "channels": training.get("channels"),
                  "noise": training.get("noise_protocol"), "channel_names": names}
    preset = training.get("preset") if training.get("preset") in ("paper", "small", "tiny") else None
    return InitSource(source, "package", path, sha256_file(path), model, int(arch["patch_size"]), preset,
                      sampler.vae.state_dict(), trained_on)


def load_init_source(source: str) -> InitSource:
    """Resolve SOURCE (module docstring); one-line UserError naming the problem and the choices otherwise."""
    bundled = bundled_models()
    if source in bundled:
        return _from_run(bundled[source], source, "bundled")
    path = Path(source)
    if path.is_dir():
        return _from_run(path, source, "run")
    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise UserError(f"--init-from {source}: expected a run folder, a .zip package exported by "
                            f"denoisplit-zoo, or a bundled model ({', '.join(bundled) or 'none bundled'})")
        return _from_package(path, source)
    raise UserError(f"--init-from {source}: no such run folder, package or bundled model (bundled: "
                    f"{', '.join(bundled) or 'none'})")


def architecture_mismatch(model: ModelConfig, patch_size: int, source: InitSource) -> Optional[str]:
    """The first architecture key where (model, patch_size) differs from the source's, as
    'key: config VALUE vs source VALUE'; None when they agree."""
    for key in ModelConfig.model_fields:
        mine, theirs = getattr(model, key), getattr(source.model, key)
        if mine != theirs:
            return f"model.{key}: config {mine!r} vs source {theirs!r}"
    if patch_size != source.patch_size:
        return f"train.patch_size: config {patch_size} vs source {source.patch_size}"
    return None


def require_same_architecture(model: ModelConfig, patch_size: int, source: InitSource) -> None:
    """One-line UserError naming the first key where the run's architecture differs from the source's."""
    mismatch = architecture_mismatch(model, patch_size, source)
    if mismatch:
        raise UserError(f"--init-from {source.source}: architecture differs ({mismatch}); drop --preset / model "
                        "overrides to take the source's")


def fine_tune_overrides(src: InitSource, take_architecture: bool = True) -> dict:
    """Config overrides (build_run_config's `overrides` shape) for a run that starts from `src`: its architecture and
    patch size (unless the caller chose them: then `architecture_mismatch` checks they agree), FINE_TUNE_TRAIN, and
    train.init_from. Merge them under the caller's own train keys (setdefault), which win."""
    train = {**FINE_TUNE_TRAIN, "init_from": src.source}
    if not take_architecture:
        return {"train": train}
    return {"model": src.model.model_dump(), "train": {"patch_size": src.patch_size, **train}}


def reorder_output_channels(state: dict, order: tuple[int, int]) -> dict:
    """A LadderVAE state dict whose two structures come out in `order` (order[c] = the source channel that becomes
    channel c). Only the output head knows which structure is which: its rows are [A, B] (denoiSplit) or
    [mean A, mean B, log-variance A, log-variance B] (uSplit), so permuting them swaps the structures exactly."""
    if tuple(order) == (0, 1):
        return state
    out = dict(state)
    for key in ("head.weight", "head.bias"):
        rows = state[key].shape[0]
        perm = [g * 2 + order[c] for g in range(rows // 2) for c in range(2)]
        out[key] = state[key][perm].clone()
    return out


def channel_order(source_names, names) -> Optional[tuple[int, int]]:
    """(0, 1), (1, 0) or None (cannot tell): how a source trained on structures `source_names` maps onto a run on
    `names`, by name (case-insensitive; one name a prefix of the other counts, so "mito" matches "mitochondria")."""
    if not source_names or len(source_names) != 2 or len(names) != 2:
        return None

    def same(a: str, b: str) -> bool:
        a, b = a.lower(), b.lower()
        return a.startswith(b) or b.startswith(a)

    for order in ((0, 1), (1, 0)):
        if all(same(names[c], source_names[order[c]]) for c in range(2)) and not all(
                same(names[c], source_names[1 - order[c]]) for c in range(2)):
            return order
    return None


def describe_bundled() -> list[dict]:
    """One row per bundled model for `denoisplit-zoo models`: name, preset, loss, data, channel names, noise, test
    RI-PSNR per channel and split gain over the floors (report/metrics.json, when the model ships one)."""
    rows = []
    for name, root in bundled_models().items():
        cfg = load_run_config(root / "config.yaml")
        paths = RunPaths(root)
        prov = read_json(paths.provenance) if paths.provenance.is_file() else {}
        metrics_path = root / "report" / "metrics.json"
        metrics = read_json(metrics_path) if metrics_path.is_file() else {}
        data = prov.get("data") or {}
        noise = cfg.data.noise
        rows.append({
            "name": name, "preset": cfg.preset, "loss": cfg.train.loss,
            "data": (data.get("name") or cfg.data.path).split(";")[0].split(",")[0],
            "channels": list((data.get("channels") or {}).keys()) or list(cfg.data.channels),
            "noise": "real" if not (noise.gaussian or noise.poisson)
            else f"Gaussian x{noise.gaussian:g} + Poisson x{noise.poisson:g}",
            "ri_psnr": metrics.get("ri_psnr"), "split_gain": metrics.get("split_gain"),
            "split_status": metrics.get("split_status"),
            "steps": (prov.get("training") or {}).get("steps")})
    return rows
