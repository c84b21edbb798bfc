"""`denoisplit-zoo quickstart` (registered in cli._COMMANDS): a thin layer over quickstart.run_quickstart.

Heavy imports happen inside the command function so `--help` stays instant.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "quickstart", help="train, calibrate, evaluate and export a model on the bundled sample, in ~10 minutes",
        description="Splits actin from mitochondria in the bundled BPAE sample (CC-BY 4.0, Robert Haase): synthetic "
                    "noise, noise models, `small` preset training, calibration without clean data, evaluation on a "
                    "held-out region, a self-tested bioimage.io zip, a prediction through bioimageio.core from the "
                    "zip, a figure and a report.")
    p.add_argument("--out", default="quickstart_out", help="output folder, missing or empty (default: quickstart_out)")
    p.add_argument("--minutes", type=float, default=10.0,
                   help="time budget of the whole command in minutes (default 10); training gets what the other "
                        "stages leave")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise, the split's patches and training")
    p.add_argument("--init-from", metavar="SOURCE",
                   help="fine-tune from these weights instead of training from random ones: a bundled model "
                        "(`denoisplit-zoo models`), a run folder or a package zip exported by this tool")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (stage lines are still printed)")
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(a) -> int:
    from .quickstart import print_summary, run_quickstart

    summary = run_quickstart(a.out, a.minutes, seed=a.seed, device=a.device, progress=not a.no_progress,
                             init_from=a.init_from)
    print_summary(summary)
    return 0
