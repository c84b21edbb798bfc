"""The rdf: a bioimage.io v0.5 model description built with bioimageio.spec's own classes (so the spec validates it as
it is built), with config.denoisplit holding what our reader needs (architecture, normalisation, calibration, noise
models, training). Writes the README, cover, sample tensors and attachments into the package folder first.

Contract (docs/contracts.md, package/layout.py): one input `input` (b, c=1, y, x; ParameterizedSize(min =
2*halo + 1, step = 1): every size from the minimum up), one output `prediction` (b, c=4: <A>_mean, <B>_mean,
<A>_std, <B>_std; SpaceOutputAxisWithHalo).
Single input AND single output so ilastik accepts it; processing only with ops deepImageJ implements
(fixed_zero_mean_unit_variance, scale_linear). No remote URLs and no `github_user` in the rdf: validation would go
online and the self-test must run offline. bioimageio.spec is the optional `bmz` extra: imported inside
`build_model_descr` (heavy, and a missing install is a UserError there, not an ImportError at import time).
"""

from __future__ import annotations

import shutil

from pydantic import ValidationError

from ..errors import UserError
from . import layout as L
from .card import make_cover, render_model_card, report_inputs
from .context import (PackageContext, latent_noise, rdf_defaults, renamed_calibration, template_values,
                      training_summary)
from .recipe import safe_name
from .zoo import require_bioimageio

# ops deepImageJ (JDLL) maps to Java classes; anything else ("custom", softmax, ...) fails there
DEEPIMAGEJ_OPS = {"binarize", "clip", "ensure_dtype", "fixed_zero_mean_unit_variance", "scale_linear", "scale_range",
                  "sigmoid", "zero_mean_unit_variance"}


def denoisplit_config(ctx: PackageContext) -> dict:
    """config.denoisplit: everything load_package_sampler and a reader need, in plain JSON types."""
    import torch

    run = ctx.run
    return {
        "architecture": dict(ctx.kwargs),
        "architecture_callable": "SplitSampler",
        "n_samples": ctx.kwargs["n_samples"],
        "seed": ctx.kwargs["seed"],
        "noise": latent_noise(ctx),
        "normalization": run.norm.to_dict(),
        "channel_names": ctx.channel_names,
        "output_channels": [f"{c}_{k}" for k in ("mean", "std") for c in ctx.channel_names],
        "units": "model input/output normalised; package input/output raw intensity (pre/post-processing)",
        "calibration": {"scale": [float(v) for v in run.calibration_scale], **(renamed_calibration(ctx) or {})},
        "noise_models": [nm.to_dict() for nm in run.noise_models],
        "training": training_summary(run),
        "halo": ctx.halo,
        "min_size": ctx.min_size,
        "step": ctx.step,
        # the weights declare pytorch_version = layout.VERIFIED_TORCH (the oldest verified); this is the exporter's
        "exported_with_torch": torch.__version__,
        "tensor_bytes_per_pixel": None if ctx.tensor_bytes_per_px is None else round(ctx.tensor_bytes_per_px, 1),
        "test_input": ctx.test_input_source,
    }


def _metadata(ctx: PackageContext) -> dict:
    """name, description, authors, license, tags, cite: template defaults, then the recipe."""
    d = rdf_defaults(template_values(ctx))
    r = ctx.recipe
    meta = {"name": safe_name(r.name or d["name"]), "description": r.description or d["description"],
            "authors": [a.model_dump(exclude_none=True) for a in r.authors] or d["authors"],
            "license": r.license or d["license"], "tags": list(dict.fromkeys([*d["tags"], *r.tags])),
            "cite": d["cite"] + [c.model_dump(exclude_none=True) for c in r.citations]}
    if len(meta["name"]) < 5:
        raise UserError(f"package name {meta['name']!r} is too short (5..128 letters, digits, _+- ())")
    return meta


def build_model_descr(ctx: PackageContext):
    """Write README.md, cover.png (+ attachments) into ctx.workdir and return the validated v0_5 ModelDescr."""
    require_bioimageio()
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr, Author, AxisId, BatchAxis, BioimageioConfig, ChannelAxis, CiteEntry, Config,
        FileDescr, FixedZeroMeanUnitVarianceDescr, FixedZeroMeanUnitVarianceKwargs, InputTensorDescr,
        IntervalOrRatioDataDescr, LinkedDataset, ModelDescr, OnnxWeightsDescr, OutputTensorDescr,
        ParameterizedSize, PytorchStateDictWeightsDescr, ScaleLinearAlongAxisKwargs, ScaleLinearDescr,
        SizeReference, SpaceInputAxis, SpaceOutputAxisWithHalo, TensorId, TorchscriptWeightsDescr, Version,
        WeightsDescr)


    w = ctx.workdir
    meta = _metadata(ctx)
    if len(set(ctx.channel_names)) != 2:
        raise UserError(f"the two structures need different names, got {ctx.channel_names}")
    metrics, fig_src = report_inputs(ctx)
    attachments = []
    figure = None
    if fig_src is not None:
        figure = "calibration.png"
        shutil.copyfile(fig_src, w / figure)
        attachments.append(FileDescr(source=w / figure))
    (w / "training_config.yaml").write_text(ctx.run.paths.config.read_text())
    attachments.append(FileDescr(source=w / "training_config.yaml"))
    a, b = ctx.channel_names
    make_cover(ctx.test_input, ctx.test_output, [a, b], w / L.COVER_FILE)
    # sample tensors (FAIR: an imageio-readable example for humans) = the test tensors as TIFF, batch dropped
    import tifffile

    tifffile.imwrite(w / L.SAMPLE_INPUT_FILE, ctx.test_input[0, 0])
    tifffile.imwrite(w / "sample_output.tif", ctx.test_output[0])
    (w / "README.md").write_text(render_model_card(ctx, meta, figure, metrics), encoding="utf-8")

    norm = ctx.run.norm
    gain, offset = L.postprocessing_gain_offset(norm)
    torch_version = Version(L.VERIFIED_TORCH)
    yx = [AxisId("y"), AxisId("x")]
    inp = InputTensorDescr(
        id=TensorId(L.INPUT_NAME),
        description=f"one noisy image of {a} + {b} imaged together, raw intensity",
        axes=[BatchAxis(), ChannelAxis(channel_names=["mixed"]),
              *[SpaceInputAxis(id=ax, size=ParameterizedSize(min=ctx.min_size, step=ctx.step)) for ax in yx]],
        test_tensor=FileDescr(source=w / L.TEST_INPUT_FILE), sample_tensor=FileDescr(source=w / L.SAMPLE_INPUT_FILE),
        data=IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[FixedZeroMeanUnitVarianceDescr(kwargs=FixedZeroMeanUnitVarianceKwargs(
            mean=float(norm.input_mean), std=float(norm.input_std)))])
    out = OutputTensorDescr(
        id=TensorId(L.OUTPUT_NAME),
        description=f"MMSE estimates of {a} and {b} and their {template_values(ctx)['std_kind']} posterior std "
                    f"({ctx.kwargs['n_samples']} samples), raw intensity",
        axes=[BatchAxis(), ChannelAxis(channel_names=[f"{a}_mean", f"{b}_mean", f"{a}_std", f"{b}_std"]),
              *[SpaceOutputAxisWithHalo(id=ax, halo=ctx.halo,
                                        size=SizeReference(tensor_id=TensorId(L.INPUT_NAME), axis_id=ax))
                for ax in yx]],
        test_tensor=FileDescr(source=w / L.TEST_OUTPUT_FILE),
        sample_tensor=FileDescr(source=w / "sample_output.tif"),
        data=IntervalOrRatioDataDescr(type="float32"),
        postprocessing=[ScaleLinearDescr(kwargs=ScaleLinearAlongAxisKwargs(
            axis=AxisId("channel"), gain=gain, offset=offset))])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=w / L.STATE_DICT_FILE, pytorch_version=torch_version,
            architecture=ArchitectureFromFileDescr(source=w / L.ARCHITECTURE_FILE, callable="SplitSampler",
                                                   kwargs=dict(ctx.kwargs))),
        torchscript=TorchscriptWeightsDescr(source=w / L.TORCHSCRIPT_FILE, parent="pytorch_state_dict",
                                            pytorch_version=torch_version),
        onnx=OnnxWeightsDescr(source=w / L.ONNX_FILE, opset_version=L.ONNX_OPSET, parent="pytorch_state_dict"))
    extra: dict = {}
    td = ctx.recipe.training_data
    if td and td.zoo_id:
        extra["training_data"] = LinkedDataset(id=td.zoo_id)
    if ctx.recipe.version:
        extra["version"] = ctx.recipe.version
    if ctx.recipe.git_repo:
        extra["git_repo"] = ctx.recipe.git_repo
    try:
        descr = ModelDescr(
            name=meta["name"], description=meta["description"],
            authors=[Author(**a) for a in meta["authors"]],
            cite=[CiteEntry(**c) for c in meta["cite"]], license=meta["license"], tags=meta["tags"],
            documentation=FileDescr(source=w / "README.md"), covers=[FileDescr(source=w / L.COVER_FILE)],
            attachments=attachments, inputs=[inp], outputs=[out], weights=weights,
            config=Config(bioimageio=BioimageioConfig(architecture_type="LadderVAE (hierarchical VAE)"),
                          denoisplit=denoisplit_config(ctx)),
            **extra)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"invalid package description: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return descr
