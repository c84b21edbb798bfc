"""`denoisplit-zoo export` and `denoisplit-zoo upload` (registered in cli._COMMANDS).

Heavy imports (torch, bioimageio) happen inside the command functions so `--help` stays instant.
"""

from __future__ import annotations

from .cli_args import add_threads, latent_seed


def register(sub) -> None:
    p = sub.add_parser("export", help="package a run as a self-tested bioimage.io model zip",
                       description="Run folder -> bioimage.io model zip (pytorch_state_dict + TorchScript + ONNX, "
                                   "posterior sampling inside the model). The zip is written only if bioimageio.core's "
                                   "test passes for all three weight formats.")
    p.add_argument("run", nargs="?", help="run folder (default: the recipe's `run`)")
    p.add_argument("--out", required=True, help="output model zip")
    p.add_argument("--recipe", help="release recipe (packaging/NAME.yaml): name, authors, licence, citations, ...")
    p.add_argument("--samples", type=int, help="posterior samples K per prediction (default: recipe, else 16)")
    p.add_argument("--seed", type=latent_seed,
                   help="seed of the in-model counter-based noise (default: recipe, else 42)")
    p.add_argument("--report", help="REPORT_DIR of `denoisplit-zoo evaluate` for the model card's Validation section")
    p.add_argument("--allow-collapsed-calibration", action="store_true",
                   help="package a channel whose calibration scale is at its clip floor (its std would be ~0)")
    p.add_argument("--posterior-means", "--noise-off", dest="posterior_means", action="store_true",
                   help="deterministic export (posterior means, no sampling; std channels are 0): for halo checks "
                        "(--noise-off: its earlier name)")
    add_threads(p)
    p.set_defaults(func=_cmd_export)

    u = sub.add_parser("upload", help="validate, self-test and publish a model zip to bioimage.io",
                       description="Validates and self-tests the zip, then publishes it with bioimageio.spec's upload. "
                                   "Token: BIOIMAGEIO_HYPHA_UPLOAD_TOKEN; endpoint: BIOIMAGEIO_HYPHA_UPLOAD.")
    u.add_argument("package", help="model zip written by `denoisplit-zoo export`")
    add_threads(u)
    u.set_defaults(func=_cmd_upload)


def _cmd_export(a) -> int:
    from .export import export_package

    res = export_package(a.run, a.out, recipe=a.recipe, n_samples=a.samples, seed=a.seed,
                         sample_latents=not a.posterior_means,
                         report_dir=a.report, allow_collapsed=a.allow_collapsed_calibration)
    print(res.test_summary)
    print(f"exported {res.path} ({res.size_bytes / 1e6:.2f} MB, {res.seconds:.0f} s): K={res.n_samples}, "
          f"seed={res.seed}, latents={'sampled (counter-hash)' if res.sample_latents else 'posterior means'}, "
          f"halo={res.halo} px, "
          f"sizes >= {res.min_size} px" + (f" in steps of {res.step}" if res.step > 1 else "") + ", "
          f"ONNX IR {res.onnx.get('ir_version')} opset {res.onnx.get('opset')}")
    return 0


def _cmd_upload(a) -> int:
    from .package.zoo import upload_package

    url = upload_package(a.package)
    print(f"uploaded {a.package}; staged for review at {url}")
    return 0
