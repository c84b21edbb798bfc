"""CLI commands of the sampling stage: `calibrate`, `evaluate`, `predict` (registered in cli._COMMANDS).

`predict` runs a run folder or an exported package zip through the same SplitSampler, so both give identical numbers
for the same K and seed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from .cli_args import add_threads, latent_seed, positive_int
from .config import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_TILE, GAIN_PROBES
from .errors import UserError
from .ome_zarr import Writer, ZarrInput, is_zarr, open_input, zarr_stem


def _common(p, samples_default, samples_help: str) -> None:
    p.add_argument("--samples", type=positive_int, default=samples_default, metavar="K", help=samples_help)
    p.add_argument("--seed", type=latent_seed, default=None,
                   help="seed of the counter-based latent noise (default 42)")
    p.add_argument("--tile", type=positive_int, default=DEFAULT_TILE,
                   help="tile size in pixels (rounded to a multiple of 2**n_levels; plus a halo each side)")
    p.add_argument("--chunk", type=positive_int, default=None,
                   help="posterior samples per top-down batch (default: sized to ~1.5 GB of activations)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_threads(p)


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit the per-channel uncertainty scale on the validation images")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--without-clean", action="store_true",
                   help="use only the noisy validation targets and the noise models (no clean images needed)")
    p.add_argument("--data", help="the training data, if not at the path in the run's config.yaml")
    p.add_argument("--bins", type=positive_int, default=30, help="equal-count bins of the reliability diagram")
    p.add_argument("--max-images", type=positive_int, default=None, help="use only the first N validation images")
    p.add_argument("--probes", type=positive_int, default=GAIN_PROBES,
                   help=f"--without-clean: Hutchinson probes of the network's input gain (default {GAIN_PROBES})")
    _common(p, DEFAULT_SAMPLES, f"posterior samples per pixel (default {DEFAULT_SAMPLES}, as in the paper)")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("evaluate", help="metrics, figures and a report on the test split or given data")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--data", help="evaluation data (npz / TIFF folder / 'a.tif,b.tif'); default: the run's test split")
    p.add_argument("--channels", nargs=2, type=int, metavar=("I", "J"), help="channels of --data (default: the run's)")
    p.add_argument("--max-images", type=positive_int, default=None, help="evaluate only the first N images")
    p.add_argument("--bins", type=positive_int, default=30, help="equal-count bins of the reliability diagram")
    p.add_argument("--out", required=True, metavar="REPORT_DIR")
    _common(p, DEFAULT_SAMPLES, f"posterior samples per pixel (default {DEFAULT_SAMPLES}, as in the paper)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="split images (MMSE A, B and calibrated uncertainty) with a run or a package")
    p.add_argument("model", metavar="RUN_DIR_OR_ZIP")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="superimposed images: TIFF or .npy, (Y, X) or (N, Y, X); a zarr / OME-Zarr image (*.zarr) "
                        "is predicted block by block (never whole in memory) into OME-Zarr outputs")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument("--blockwise", action="store_true",
                   help="read TIFF inputs block by block (tifffile's zarr view: images larger than memory) and write "
                        "OME-Zarr outputs, as for zarr inputs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files left by an earlier predict (an input file is never overwritten)")
    _common(p, None, f"posterior samples per pixel (default: {DEFAULT_SAMPLES} for a run folder, the package's K "
                     "for a zip)")
    p.set_defaults(func=_cmd_predict)


def _cmd_calibrate(a) -> int:
    from .calibration import calibrate_run

    res = calibrate_run(a.run, without_clean=a.without_clean, n_samples=a.samples,
                        seed=DEFAULT_SEED if a.seed is None else a.seed, bins=a.bins, data=a.data, tile=a.tile,
                        max_images=a.max_images, chunk=a.chunk, progress=not a.no_progress, device=a.device,
                        probes=a.probes)
    for name, c in res["channels"].items():
        lo, hi = c["interval"]
        print(f"{name}: scale {c['scale']:.4g}, 95 % interval of the estimate {_f(lo, 3)} .. {_f(hi, 3)} "
              f"({c['method']}; RMSE vs RMV: slope {_f(c['slope'])}, offset {_f(c['offset'])}, R² {_f(c['r2'])}; "
              f"{c['n_pixels']} pixels)")
    for name, c in res["channels"].items():
        if not c["reliable"]:
            why = "; ".join(c.get("unreliable_because") or []) or (
                f"noise / error {_f(c['noise_to_error'])}, a 2 % noise-model error moves it by "
                f"{_f(100 * (c['sensitivity_2pct'] or 0), 0)} %")  # calibration.json written before the reasons
            print(f"warning: {name}: calibration unreliable (estimate {c['optimal_scale']:.3g}, interval "
                  f"{_f(c['interval'][0], 3)} .. {_f(c['interval'][1], 3)}: {why}): "
                  f"shipping scale {c['scale']:.3g} ({c['method']})")
    for name, c in res.get("clean_check", {}).items():
        print(f"{name}: the clean references would give scale {c['scale']:.4g} (shipped / clean = "
              f"{c['noisy_over_clean']:.3f}, noisy-target estimate / clean = {c['estimate_over_clean']:.3f}, maximum "
              f"likelihood / clean = {_f(c['mle_over_clean'], 3)}; slope {_f(c['slope'])}, shipped scale's slope "
              f"{_f(c['shipped_slope_vs_clean'])}); not used")
    if res.get("note"):
        print(f"note: {res['note']}")
    print(f"calibration ({res['mode']} reference, K={res['n_samples']}) written: {Path(a.run) / 'calibration.json'}")
    return 0


def _cmd_evaluate(a) -> int:
    from .evaluation import evaluate_run

    if a.channels and not a.data:
        raise UserError("--channels needs --data")
    m = evaluate_run(a.run, a.out, data=a.data, channels=a.channels, n_samples=a.samples,
                     seed=DEFAULT_SEED if a.seed is None else a.seed, max_images=a.max_images, tile=a.tile, bins=a.bins,
                     chunk=a.chunk, progress=not a.no_progress, device=a.device)
    print(f"RI-PSNR {_f(m['ri_psnr_mean'])} dB, MS-SSIM {_f(m['ms_ssim_mean'], 4)}, MicroSSIM "
          f"{_f(m['micro_ssim_mean'], 4)} (mean of {', '.join(m['ri_psnr'])}; {m['n_images']} images vs "
          f"{m['reference']} references); report: {Path(a.out) / 'report.md'}")
    fl = m["floors"]
    for n in m["ri_psnr"]:
        no_split = f", no split {_f(fl['no_split'][n])} dB" if fl["no_split"] else ""
        gain = f" -> split gain {_f(m['split_gain'][n])} dB" if m["split_gain"][n] is not None else ""
        print(f"  {n}: {_f(m['ri_psnr'][n])} dB vs floors naive {_f(fl['naive'][n])} dB{no_split}{gain}: "
              f"{m['split_status'][n]}")
    return 0


def _cmd_predict(a) -> int:
    written = predict_files(a.model, a.inputs, a.out, n_samples=a.samples, seed=a.seed, tile=a.tile, chunk=a.chunk,
                            progress=not a.no_progress, device=a.device, overwrite=a.overwrite,
                            blockwise=a.blockwise)
    print(f"wrote {len(written)} files to {a.out}")
    return 0


# An input whose intensities lie this many training-input stds from the training mean is not the kind of image the
# network saw: its outputs (a constant 3e38 image: all-zero uncertainty) look valid and mean nothing. A saturated
# uint16 image on a model trained on 8-bit data is ~10^3 stds out: still predicted, with this warning. Beyond
# REFUSE_STDS the normalised input is so large that float32 convolutions lose every digit of the image: refused.
OUT_OF_RANGE_STDS = 100.0
REFUSE_STDS = 1e6


def out_of_range(arr, norm) -> str | None:
    """A warning (one line) when raw `arr` (an array, or a zarr input: its range read block by block) lies far
    outside the training input's range (OUT_OF_RANGE_STDS), a UserError beyond REFUSE_STDS, else None. Raw units
    in, unit-free z-scores compared."""
    lo, hi = arr.value_range() if isinstance(arr, ZarrInput) else (float(arr.min()), float(arr.max()))
    z = max(abs(lo - norm.input_mean), abs(hi - norm.input_mean)) / norm.input_std
    if z <= OUT_OF_RANGE_STDS:
        return None
    if z > REFUSE_STDS:
        raise UserError(f"intensities {lo:.4g} .. {hi:.4g} are {z:.3g} training stds from the training mean "
                        f"{norm.input_mean:.4g}: no prediction of such an image means anything (rescale it to the "
                        "training data's range)")
    return (f"intensities {lo:.4g} .. {hi:.4g} are up to {z:.3g} training stds from the training mean "
            f"{norm.input_mean:.4g} (std {norm.input_std:.4g}): not the kind of image the model saw, so its "
            "splits and uncertainties are not meaningful (rescale the image to the training data's range)")


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------- predict

def load_sampler(model: str, n_samples: int | None, seed: int | None):
    """RUN_DIR or package zip -> (SplitSampler, channel names, Normalization, halo in px). Defaults: a run folder
    samples K = 50 with seed 42; a package uses its own K and seed. The halo: the run's (run_folder.Run.halo), or
    the one the package declares."""
    p = Path(model)
    if p.is_dir():
        from .run_folder import load_run

        run = load_run(p)
        k = DEFAULT_SAMPLES if n_samples is None else n_samples
        return run.sampler(k, DEFAULT_SEED if seed is None else seed), list(run.channel_names), run.norm, run.halo
    if p.suffix.lower() == ".zip":
        from .package.reader import load_package_sampler  # torch: not for `--help`
        sampler, names, norm, meta = load_package_sampler(p, n_samples, seed)
        halo = meta.get("halo")
        if not isinstance(halo, int) or halo < 0:  # an older package that declared none: measure it
            from .sampling import measure_halo

            halo = measure_halo(sampler.vae)
        return sampler, list(names), norm, halo
    if not p.exists():
        raise UserError(f"missing model: {p} (give a run folder or an exported model.zip)")
    raise UserError(f"{p}: not a run folder or a .zip package")


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "channel"


def _write_tiff(path: Path, arr: np.ndarray, meta: dict) -> None:
    import tifffile

    from .fileio import atomic_open

    with atomic_open(path) as f:
        tifffile.imwrite(f, np.ascontiguousarray(arr, dtype=np.float32), metadata=meta)


def _read_input(path: str, blockwise: bool = False):
    """A TIFF / .npy input read into memory, or a zarr / OME-Zarr input (and with `blockwise` a TIFF) opened lazily,
    to be predicted block by block."""
    if is_zarr(path) or (blockwise and Path(path).suffix.lower() in (".tif", ".tiff")):
        return open_input(path)
    from .data import read_image  # imports torch: kept out of `--help`

    arr = read_image(path)
    if arr.ndim not in (2, 3) or min(arr.shape) < 1:
        raise UserError(f"{path}: shape {arr.shape}; expected one superimposed image (Y, X) or a stack (N, Y, X)")
    return arr


def predict_files(model: str, inputs: list[str], out_dir, n_samples: int | None = None, seed: int | None = None,
                  tile: int = DEFAULT_TILE, chunk: int | None = None, progress: bool = True,
                  device: str = "auto", overwrite: bool = False, blockwise: bool = False) -> list[Path]:
    """Predict every input (raw superimposed image, (Y, X) or (N, Y, X)) and write, per input stem,
    `<stem>_<A>.tif`, `<stem>_<B>.tif` (MMSE, raw units) and `<stem>_uncertainty.tif` (calibrated std of A and B,
    raw units, channel axis before Y, X), float32, with JSON metadata (model, K, seed, units, ...). A zarr /
    OME-Zarr input (`*.zarr`; with `blockwise`, a TIFF too) is predicted block by block, never held in memory, into
    OME-Zarr images of the same names (`<stem>_<A>.ome.zarr`, ...; ome_zarr.py). All inputs are read (lazy ones:
    opened and range-checked) and checked, and OUT_DIR created, before any prediction; every file is written
    atomically, and the outputs are all-or-nothing: if anything fails (a full disk, Ctrl-C), the files this call
    wrote and the folders it created are removed again."""
    from .fileio import OutputSet

    stems = [zarr_stem(i) if is_zarr(i) else Path(i).stem for i in inputs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise UserError(f"two inputs share the name {dup[0]!r}; their outputs would overwrite each other")
    arrays = [_read_input(i, blockwise) for i in inputs]  # fail on a bad input before spending time on the others
    with OutputSet(out_dir):  # creates OUT_DIR now: an impossible output folder fails before any work
        return _predict_files(model, inputs, arrays, stems, Path(out_dir), n_samples, seed, tile, chunk, progress,
                              device, overwrite)


def _output_paths(out: Path, stems: list[str], names: list[str], inputs: list[str], arrays: list,
                  overwrite: bool) -> dict:
    """{stem: ([mean path per channel], uncertainty path)}, refused (one line) before any work when a path is an
    input, is planned twice, or exists and `overwrite` is off: an input or an unrelated file is never lost. TIFF
    outputs for in-memory inputs, OME-Zarr for zarr inputs."""
    ext = {stem: ".ome.zarr" if isinstance(a, ZarrInput) else ".tif" for stem, a in zip(stems, arrays)}
    plan = {stem: ([out / f"{stem}_{_safe_name(n)}{ext[stem]}" for n in names], out / f"{stem}_uncertainty{ext[stem]}")
            for stem in stems}
    flat = [p for means, unc in plan.values() for p in (*means, unc)]
    ins = {Path(i).resolve() for i in inputs}
    for p in flat:
        if p.resolve() in ins:
            raise UserError(f"the output {p} would overwrite the input of the same name; choose another --out")
        if flat.count(p) > 1:
            raise UserError(f"two outputs would be written to {p} (channel names {names}); choose other names")
        if p.exists() and not overwrite:
            raise UserError(f"{p} exists; refusing to overwrite it (--overwrite replaces earlier outputs)")
    return plan


def _predict_files(model, inputs, arrays, stems, out: Path, n_samples, seed, tile, chunk, progress, device,
                   overwrite: bool):
    from tqdm.auto import tqdm

    from .runtime import pick_device  # imports torch: kept out of `--help`
    from .sampling import predict_stack

    sampler, names, norm, halo = load_sampler(model, n_samples, seed)
    plan = _output_paths(out, stems, names, inputs, arrays, overwrite)
    sampler = sampler.to(pick_device(device))
    written: list[Path] = []
    base = {"model": str(Path(model).resolve()), "n_samples": int(sampler.n_samples), "seed": int(sampler.seed),
            "units": "raw", "tile": int(tile), "halo": int(halo),
            "calibration_scale": [float(v) for v in sampler.calibration_scale]}
    for src, arr in zip(inputs, arrays):
        try:
            warning = out_of_range(arr, norm)
        except UserError as e:
            raise UserError(f"{src}: {e}") from None
        if warning:
            print(f"warning: {src}: {warning}", file=sys.stderr)
    jobs = list(zip(inputs, stems, arrays))
    for src, stem, arr in tqdm(jobs, desc="inputs", disable=not progress or len(inputs) < 2):
        if isinstance(arr, ZarrInput):
            written += _predict_zarr(sampler, arr, norm, names, plan[stem], dict(base, input=str(src)), tile, halo,
                                     chunk, progress)
            continue
        res = predict_stack(sampler, arr, norm, tile, halo, chunk, progress)
        mean, std = res["mean"], res["std"]  # (N, 2, Y, X)
        stack = arr.ndim == 3
        meta = dict(base, input=str(src))
        mean_paths, path = plan[stem]
        for c, name in enumerate(names):
            _write_tiff(mean_paths[c], mean[:, c] if stack else mean[0, c],
                        dict(meta, channel=name, quantity="MMSE estimate", axes="NYX" if stack else "YX"))
            written.append(mean_paths[c])
        _write_tiff(path, std if stack else std[0],
                    dict(meta, channels=list(names), quantity="calibrated posterior std",
                         axes="NCYX" if stack else "CYX"))
        written.append(path)
    return written


def _predict_zarr(sampler, inp: ZarrInput, norm, names: list[str], paths, meta: dict, tile: int, halo: int,
                  chunk, progress: bool) -> list[Path]:
    """One zarr input, plane by plane and tile by tile (sampling.predict_blocks), into the OME-Zarr outputs `paths`
    ([mean per channel], uncertainty), each renamed into place once complete. Memory: one tile and its samples."""
    from .sampling import predict_blocks, tile_core

    mean_paths, unc_path = paths
    stack = inp.stack_axis is not None
    lead = [{"n": "t"}.get(inp.stack_axis, inp.stack_axis)] if stack else []  # a plain array's stack: OME's "t"
    n, (h, w) = len(inp.planes), inp.planes[0].shape
    lead_shape = (n,) if stack else ()
    m = sampler.vae.multiple
    core = tile_core(tile, m)  # one output chunk per tile's kept centre, each written once
    targets = {**{f"mean{c}": p for c, p in enumerate(mean_paths)}, "std": unc_path}
    shapes = {**{f"mean{c}": (*lead_shape, h, w) for c in range(2)}, "std": (*lead_shape, 2, h, w)}
    axes = {**{f"mean{c}": [*lead, "y", "x"] for c in range(2)}, "std": [*lead, "c", "y", "x"]}
    attrs = {**{f"mean{c}": dict(meta, channel=names[c], quantity="MMSE estimate") for c in range(2)},
             "std": dict(meta, channels=list(names), quantity="calibrated posterior std")}
    with Writer(targets, shapes, axes, (core, core), attrs) as out:
        for i, plane in enumerate(inp.planes):
            at = (i,) if stack else ()

            def put(where, mu, sd, _samples, at=at):
                for c in range(2):
                    out.put(f"mean{c}", (*at, *where), mu[c])
                out.put("std", (*at, slice(None), *where), sd)

            predict_blocks(sampler, plane, norm, put, tile, halo, chunk, progress,
                           desc=f"{Path(inp.path).name} {i + 1}/{n}" if stack else Path(inp.path).name)
    return [*mean_paths, unc_path]
