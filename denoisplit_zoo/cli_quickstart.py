"""`denoisplit-zoo quickstart` (registered in cli._COMMANDS): a thin layer over quickstart.run_quickstart.

Heavy imports happen inside the command function so `--help` stays instant.
"""

from __future__ import annotations

from .cli_args import add_threads
from .sample_data import BRIGHTNESS, DEMO_BRIGHTNESS, DEMO_GAUSSIAN, DEMO_POISSON


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="train, calibrate, evaluate and export a model on the bundled sample, in ~10 minutes",
        description="Splits actin from mitochondria in the bundled BPAE sample (CC-BY 4.0, Robert Haase): synthetic "
                    "noise, noise models, fine-tuning of the bundled `small` W2S model, calibration without clean "
                    "data, evaluation on a held-out region, a self-tested bioimage.io zip, a prediction through bioimageio.core from the "
                    "zip, a figure and a report.")
    p.add_argument("--out", default="quickstart_out", help="output folder, missing or empty (default: quickstart_out)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget of the whole command in minutes (default 10); training gets what the other "
                        "stages leave")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the split's patches and training")
    p.add_argument("--gaussian", type=float, default=None,
                   help="synthetic Gaussian noise std as a multiple of std(mean of the two channels) "
                        f"(default {DEMO_GAUSSIAN:g})")
    p.add_argument("--poisson", type=float, default=None,
                   help=f"Poisson factor F: x <- Poisson(x / F) * F (default {DEMO_POISSON:g})")
    p.add_argument("--brightness", choices=BRIGHTNESS, default=DEMO_BRIGHTNESS,
                   help="balanced: the mitochondria scaled to the actin's brightness (two stains of about equal "
                        "brightness in one channel); raw: the sample's counts, actin ~8x brighter (the harder case) "
                        f"(default {DEMO_BRIGHTNESS})")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init-from", metavar="SOURCE", default="auto",
                       help="fine-tune from these weights: a bundled model (`denoisplit-zoo models`), a run folder "
                            "or a package zip exported by this tool (default: the bundled W2S mitochondria/actin "
                            "model)")
    start.add_argument("--from-scratch", action="store_true", help="train from random weights instead")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines are still printed)")
    add_threads(p)
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(a) -> int:
    from .quickstart import print_summary, run_quickstart

    noise = {k: v for k, v in (("gaussian", a.gaussian), ("poisson", a.poisson)) if v is not None}
    summary = run_quickstart(a.out, a.minutes, seed=a.seed, device=a.device, progress=not a.no_progress,
                             init_from=None if a.from_scratch else a.init_from, brightness=a.brightness, **noise)
    print_summary(summary)
    return 0
