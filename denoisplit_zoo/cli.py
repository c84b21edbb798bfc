"""`denoisplit-zoo` command line: a thin layer over the Python API (each command calls one function).

Errors a user can fix (UserError, a missing file, a bad value) print one line and exit 2; nothing half-written
stays behind because every writer in the package is atomic.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a denoiSplit model into a run folder")
    p.add_argument("--data", help="npz (clean/noisy N,C,Y,X), a folder of per-channel TIFFs, or 'a.tif,b.tif'")
    p.add_argument("--channels", nargs=2, type=int, metavar=("I", "J"), help="the two structures (default 0 1)")
    p.add_argument("--preset", choices=["paper", "small", "tiny"], default=None, help="default: small")
    p.add_argument("--loss", choices=["denoisplit", "usplit"], default=None)
    p.add_argument("--gaussian", type=float, help="synthetic Gaussian noise, x std(mean of the two clean channels)")
    p.add_argument("--poisson", type=float, help="synthetic Poisson factor F (x <- Poisson(x/F)*F; 0 = off)")
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--config", help="YAML with overrides (same keys as the run's config.yaml)")
    p.add_argument("--noise-models", nargs=2, metavar=("NM_A", "NM_B"),
                   help="pre-fitted noise models (npz) instead of fitting them from the training pairs")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from checkpoints/last.pt")
    p.add_argument("--out", required=True, help="run folder")
    p.set_defaults(func=_cmd_train)


def _cmd_train(a) -> int:
    from .config import build_run_config
    from .fileio import read_yaml
    from .training import train

    over: dict = {}
    if a.config:
        over = read_yaml(a.config) or {}
        if not isinstance(over, dict):
            from .errors import UserError

            raise UserError(f"{a.config}: expected a mapping")
    preset = a.preset or over.pop("preset", "small")
    tr, dt, nz = over.setdefault("train", {}), over.setdefault("data", {}), None
    nz = dt.setdefault("noise", {})
    for key, val in [("loss", a.loss), ("max_minutes", a.max_minutes), ("max_steps", a.max_steps),
                     ("seed", a.seed), ("device", a.device)]:
        if val is not None:
            tr[key] = val
    if a.data:
        dt["path"] = a.data
    if a.channels:
        dt["channels"] = tuple(a.channels)
    if a.gaussian is not None:
        nz["gaussian"] = a.gaussian
    if a.poisson is not None:
        nz["poisson"] = a.poisson
    if a.resume and "path" not in dt:
        dt["path"] = "<from run>"
    if "path" not in dt:
        from .errors import UserError

        raise UserError("--data is required (or data.path in --config)")
    cfg = build_run_config(preset, over)
    res = train(cfg, a.out, resume=a.resume, noise_model_files=a.noise_models)
    print(f"trained {res.step} steps in {res.seconds / 60:.1f} min ({res.stopped_because}); "
          f"best val_loss {res.best_val_loss:.4f}; run folder: {res.run_dir}")
    return 0


def _add_noise_model(sub) -> None:
    p = sub.add_parser("noise-model", help="GMM noise models")
    nsub = p.add_subparsers(dest="nm_cmd", required=True)
    f = nsub.add_parser("fit", help="fit p(noisy | clean) from paired images or repeated noisy frames")
    f.add_argument("--clean", help="clean image/stack (TIFF or .npy); omit to use the average of the --noisy frames")
    f.add_argument("--noisy", required=True, help="noisy image/stack (TIFF or .npy), same shape as --clean")
    f.add_argument("--iterations", type=int, default=2000)
    f.add_argument("--batch-size", type=int, default=250_000)
    f.add_argument("--min-sigma", type=float, default=0.125, help="lower clamp on component variances (raw units^2)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output .npz")
    f.set_defaults(func=_cmd_noise_model_fit)


def _read_image(path: str):
    import numpy as np

    from .errors import UserError

    p = Path(path)
    if not p.is_file():
        raise UserError(f"missing file: {p}")
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            import tifffile

            arr = tifffile.imread(p)
    except Exception as e:
        raise UserError(f"{p}: cannot read image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise UserError(f"{p}: contains NaN or inf")
    return arr


def _cmd_noise_model_fit(a) -> int:
    from .errors import UserError
    from .noise_model import fit_noise_model, pairs_from_frames

    noisy = _read_image(a.noisy)
    if a.clean:
        clean = _read_image(a.clean)
        if clean.shape != noisy.shape:
            raise UserError(f"--clean {clean.shape} and --noisy {noisy.shape} differ in shape")
        signal, obs = clean, noisy
    else:
        signal, obs = pairs_from_frames(noisy)
    if not a.out.endswith(".npz"):
        raise UserError("--out must end in .npz")
    nm = fit_noise_model(signal, obs, min_sigma=a.min_sigma, n_iterations=a.iterations, batch_size=a.batch_size,
                         seed=a.seed)
    nm.save(a.out)
    print(f"noise model written: {a.out} (signal range {float(nm.min_signal):.4g} .. {float(nm.max_signal):.4g})")
    return 0


# Each later stage registers its command here (calibrate, evaluate, predict, export, upload, quickstart).
_COMMANDS = [_add_noise_model, _add_train]


def _register_optional(sub) -> None:
    """Commands whose modules are added stage by stage."""
    import importlib

    for mod_name in ("cli_predict", "cli_export", "cli_quickstart"):
        try:
            mod = importlib.import_module(f".{mod_name}", __package__)
        except ModuleNotFoundError as e:
            if e.name and e.name.endswith(mod_name):
                continue
            raise
        mod.register(sub)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="denoisplit-zoo",
        description="denoiSplit: split a noisy superimposed fluorescence image into two clean structures, "
                    "with calibrated uncertainty; export as a bioimage.io package.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in _COMMANDS:
        add(sub)
    _register_optional(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"denoisplit-zoo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("denoisplit-zoo: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, ...: the writer already removed its temp file
        print(f"denoisplit-zoo: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
