"""`denoisplit-zoo export`: a trained run -> a bioimage.io model zip whose weights sample the posterior inside the
graph, written only after bioimageio.core's test passes for all three weight formats (offline).

The stage orchestrates the package wing (denoisplit_zoo/package/): `layout` (the contract), `writer` (the module,
its weight formats and the test tensors), `recipe` (the release recipe), `context` + `card` + `description` (the
model card, cover and rdf), `zoo` (saving, the self-test, upload) and `reader` (reading a zip back, for `predict`).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .calibration import MIN_SCALE
from .errors import UserError
from .fileio import atomic_path
from .package.context import PackageContext
from .package.description import build_model_descr
from .package.layout import (ARCHITECTURE_FILE, MODEL_SOURCE, ONNX_FILE, PACKAGE_SAMPLES, PACKAGE_SEED, STATE_DICT_FILE,
                             INPUT_STEP, TEST_INPUT_FILE, TEST_OUTPUT_FILE, TORCHSCRIPT_FILE, min_input_size)
from .package.recipe import Recipe, load_recipe
from .package.writer import (architecture_kwargs, check_onnx, export_sampler, make_test_input,
                             package_halo, predict_raw, save_onnx, save_state_dict, save_torchscript,
                             tensor_bytes_per_pixel)
from .package.zoo import save_package
from .package.zoo import self_test as run_self_test
from .run_folder import load_run


@dataclass
class ExportResult:
    path: Path
    seconds: float  # wall time of the whole export incl. the self-test
    size_bytes: int
    halo: int  # pixels, output halo declared in the package
    min_size: int  # pixels, smallest valid y/x input size
    step: int  # pixels, valid sizes are min_size + n * step (1: every size from min_size up)
    n_samples: int
    seed: int
    sample_latents: bool  # False: posterior means (deterministic, std 0)
    test_summary: str = ""  # bioimageio.core's test summary (plain text)
    onnx: dict = field(default_factory=dict)


def export_package(run_dir, out, recipe: Optional[str] = None, n_samples: Optional[int] = None,
                   seed: Optional[int] = None, sample_latents: bool = True, self_test: bool = True,
                   report_dir: Optional[str] = None, allow_collapsed: bool = False) -> ExportResult:
    """Run folder -> bioimage.io model zip at `out`, written atomically and only after bioimageio.core's test
    passes for all three weight formats (offline). `n_samples`/`seed` override the recipe (defaults 16 / 42).
    sample_latents=False exports posterior means (deterministic, std 0; for halo checks). A channel whose calibration
    scale sits at the clip floor (its std channel would be ~0) is refused unless allow_collapsed. Returns what was
    written. An impossible `out` (a folder, below a file) is refused before any work."""
    t0 = time.monotonic()
    out = Path(out)
    if out.suffix != ".zip":
        raise UserError(f"--out must end in .zip, got {out}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name the zip file to write")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise UserError(f"--out {out}: {next(p for p in out.parents if p.exists() and not p.is_dir())} is a file, "
                        "not a folder")
    rec = load_recipe(recipe) if recipe else None
    if run_dir is None:
        if rec is None or rec.run is None:
            raise UserError("name a run folder (or a recipe with `run:`)")
        run_dir = rec.run
    run = load_run(run_dir)
    collapsed = [n for n, v in zip(run.channel_names, run.calibration_scale) if v <= MIN_SCALE * (1 + 1e-6)]
    if collapsed and not allow_collapsed:
        raise UserError(f"{run_dir}: the calibration scale of {', '.join(collapsed)} is at its clip floor "
                        f"({MIN_SCALE:g}), so its uncertainty channel would be ~0; re-run `denoisplit-zoo calibrate` "
                        "(it now falls back to the posterior std when the estimate is unreliable) or pass "
                        "--allow-collapsed-calibration")
    rec = rec or Recipe()
    k = n_samples if n_samples is not None else (rec.n_samples or PACKAGE_SAMPLES)
    s = seed if seed is not None else (rec.seed if rec.seed is not None else PACKAGE_SEED)
    sampler = export_sampler(run, k, s, sample_latents)
    step = INPUT_STEP
    halo = package_halo(run)
    size = min_input_size(halo)

    with tempfile.TemporaryDirectory(prefix="denoisplit-export-") as tmp:
        work = Path(tmp) / "package"
        work.mkdir()
        raw_in, input_source = make_test_input(run, size)
        raw_out = predict_raw(sampler, raw_in, run.norm)
        np.save(work / TEST_INPUT_FILE, raw_in)
        np.save(work / TEST_OUTPUT_FILE, raw_out)
        save_state_dict(sampler, work / STATE_DICT_FILE)
        save_torchscript(sampler, work / TORCHSCRIPT_FILE)
        save_onnx(sampler, work / ONNX_FILE, torch.zeros(1, 1, size, size))
        facts = check_onnx(work / ONNX_FILE)
        # shipped verbatim: the pytorch_state_dict architecture source (imports only torch)
        shutil.copyfile(MODEL_SOURCE, work / ARCHITECTURE_FILE)

        ctx = PackageContext(run=run, recipe=rec, workdir=work, kwargs=architecture_kwargs(run, k, s, sample_latents),
                             halo=halo, min_size=size, step=step, test_input=raw_in, test_output=raw_out,
                             test_input_source=input_source, report_dir=report_dir or rec.evaluation,
                             onnx=facts, tensor_bytes_per_px=tensor_bytes_per_pixel(sampler))
        descr = build_model_descr(ctx)
        staged = Path(tmp) / "model.zip"
        save_package(descr, staged)
        summary = run_self_test(staged) if self_test else ""
        with atomic_path(out) as tmp_out:  # the tested zip, moved into place whole or not at all
            shutil.copyfile(staged, tmp_out)
    return ExportResult(out, time.monotonic() - t0, out.stat().st_size, halo, size, step, k, s, sample_latents,
                        summary, facts)
