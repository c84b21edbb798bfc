"""`denoisplit-zoo` command line: a thin layer over the Python API (each command calls one function).

Errors a user can fix (UserError, a missing file, a bad value, a full disk, an unwritable folder) print one line
and exit 2; nothing half-written stays behind because every writer in the package is atomic, and commands that write
several files remove them again when they fail (fileio.OutputSet). Anything else is a bug: still one line ("internal
error", exit 1) unless DENOISPLIT_ZOO_TRACEBACK=1 asks for the traceback. docs/bad_inputs.md lists what was tried.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback

from . import cli_export, cli_predict, cli_quickstart
from .cli_args import add_threads, positive_float, positive_int
from .config import DATA_FROM_RUN, NM_BATCH, NM_ITERATIONS, NM_MIN_SIGMA


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
    p.add_argument("--init-from", metavar="SOURCE",
                   help="fine-tune: start from the weights of a bundled model (see `denoisplit-zoo models`), a run "
                        "folder or a package zip exported by this tool; the architecture (and, unless --preset is "
                        "given, the preset) is the source's")
    p.add_argument("--init-channels", nargs=2, type=int, choices=(0, 1), metavar=("SRC_A", "SRC_B"),
                   help="with --init-from: which source structure starts each of this run's two (default: matched "
                        "by channel name, e.g. a source's mitochondria/actin onto actin/mito data is 1 0; the "
                        "source's order 0 1 where names do not tell)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--nproc", type=positive_int, metavar="N",
                   help="train data-parallel in N processes on this machine (torchrun's elastic agent; gloo on the "
                        "CPU, NCCL on GPUs, one GPU each); for several machines use torchrun (docs/distributed.md)")
    add_threads(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(a) -> int:
    if a.nproc is not None:
        from .distributed import launch

        if "WORLD_SIZE" in os.environ:
            from .errors import UserError

            raise UserError("--nproc starts torchrun itself; under torchrun (WORLD_SIZE is set) leave it out")
        return launch(a.nproc, _without_nproc(a.argv))
    from .config import build_run_config
    from .distributed import world_from_env
    from .errors import UserError
    from .fileio import read_yaml
    from .training import train

    over: dict = {}
    if a.config:
        over = read_yaml(a.config) or {}
        if not isinstance(over, dict):
            raise UserError(f"{a.config}: expected a mapping of sections (model, noise_model, train, data)")

    def section(parent: dict, key: str, where: str) -> dict:
        val = parent.setdefault(key, {})
        if val is None:
            val = parent[key] = {}
        if not isinstance(val, dict):
            raise UserError(f"{a.config}: {where}: expected a mapping, got {type(val).__name__} {val!r:.40}")
        return val

    explicit_arch = a.preset is not None or "preset" in over or "model" in over  # --init-from: else the source's
    preset = a.preset or over.get("preset", "small")  # --preset wins over the file's preset
    over.pop("preset", None)
    tr, dt = section(over, "train", "train"), section(over, "data", "data")
    nz = section(dt, "noise", "data.noise")
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
        dt["path"] = DATA_FROM_RUN
    if "path" not in dt:
        raise UserError("--data is required (or data.path in --config)")
    src = None
    if a.init_from:
        from .pretrained import fine_tune_overrides, load_init_source, require_same_architecture

        if a.resume:
            raise UserError("--init-from starts a new run; --resume continues one (its weights come from last.pt)")
        src = load_init_source(a.init_from)  # before anything is written: a bad source changes nothing
        ft = fine_tune_overrides(src, take_architecture=not explicit_arch)
        if not explicit_arch:
            preset = src.preset or preset
            over["model"] = ft["model"]
        for key, val in ft["train"].items():
            tr.setdefault(key, val)
        tr["init_from"] = a.init_from
    if a.init_channels:
        if not a.init_from:
            raise UserError("--init-channels needs --init-from")
        tr["init_channels"] = tuple(a.init_channels)
    cfg = build_run_config(preset, over)
    if src is not None:  # here, before the data and noise models are prepared; train() checks again for API users
        require_same_architecture(cfg.model, cfg.train.patch_size, src)
    res = train(cfg, a.out, resume=a.resume, noise_models=a.noise_models)
    if world_from_env().main:  # (under torchrun, rank 0 reports)
        print(f"trained {res.step} steps in {res.seconds / 60:.1f} min ({res.stopped_because}); "
              f"best val_loss {res.best_val_loss:.4f}; run folder: {res.run_dir}")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line without its --nproc option (what every launched process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _add_noise_model(sub) -> None:
    p = sub.add_parser("noise-model", help="GMM noise models")
    nsub = p.add_subparsers(dest="nm_cmd", required=True)
    f = nsub.add_parser("fit", help="fit p(noisy | clean) from paired images or repeated noisy frames")
    f.add_argument("--clean", help="clean image/stack (TIFF or .npy); omit to use the average of the --noisy frames")
    f.add_argument("--noisy", required=True, help="noisy image/stack (TIFF or .npy), same shape as --clean")
    f.add_argument("--iterations", type=positive_int, default=NM_ITERATIONS)
    f.add_argument("--batch-size", type=positive_int, default=NM_BATCH)
    f.add_argument("--min-sigma", type=positive_float, default=NM_MIN_SIGMA,
                   help="lower clamp on the components' VARIANCES, despite the name (raw units^2)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output .npz")
    add_threads(f)
    f.set_defaults(func=_cmd_noise_model_fit)


def _cmd_noise_model_fit(a) -> int:
    from .data import read_image
    from .errors import UserError
    from .noise_model import fit_noise_model, pairs_from_frames

    noisy = read_image(a.noisy)
    if a.clean:
        clean = read_image(a.clean)
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


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the bundled pretrained models (for train --init-from NAME)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(a) -> int:
    from .pretrained import WEIGHTS_DIR, describe_bundled

    rows = describe_bundled()
    if not rows:
        print(f"no bundled models (looked in {WEIGHTS_DIR})")
        return 0
    for r in rows:
        psnr = ", ".join(f"{k} {v:.2f} dB" for k, v in (r["ri_psnr"] or {}).items()) or "no test metrics"
        gain = r["split_gain"]
        split = ("; split gain " + ", ".join(f"{k} {v:+.2f} dB ({(r['split_status'] or {}).get(k, '?')})"
                                             for k, v in gain.items() if v is not None)) if gain else \
            "; split gain not measured"
        print(f"{r['name']}: preset {r['preset']}, loss {r['loss']}, {r['data']}, channels "
              f"{'/'.join(map(str, r['channels']))}, {r['noise']}, {r['steps'] or '?'} steps; test RI-PSNR {psnr}"
              f"{split}")
    return 0


# Every command, in the order `--help` lists them. The cli_* modules import only light modules at the top (the
# stages' torch / bioimageio imports happen inside their command functions), so `--help` stays instant.
_COMMANDS = [_add_noise_model, _add_train, _add_models, cli_predict.register, cli_export.register,
             cli_quickstart.register]


class _Parser(argparse.ArgumentParser):
    """argparse with ONE error line (not usage + message): bad options read like every other bad input. Sub-command
    parsers are of this class too (add_subparsers uses the parent's class)."""

    def error(self, message: str):
        where = self.prog.partition(" ")[2]  # the sub-command, e.g. "noise-model fit"
        print(f"denoisplit-zoo: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="denoisplit-zoo",
        description="denoiSplit: split a noisy superimposed fluorescence image into two clean structures, "
                    "with calibrated uncertainty; export as a bioimage.io package.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is: the same unwinding as Ctrl-C, so every OutputSet, temporary folder and
    atomic writer cleans up exactly as it does for SIGINT."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_like_sigint():
    """While a command runs, SIGTERM (schedulers, `timeout`, `docker stop`) behaves like SIGINT. Only the main
    thread may install handlers (a notebook calling main() from a worker thread keeps the default)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    with _sigterm_like_sigint():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from .errors import UserError

    parser = build_parser()
    in_process = argv is not None  # main([...]) from Python: that caller owns torch's thread setting
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a bad option (one line, above): an exit code, also in-process
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else 2
    args.argv = argv
    explicit = any(a == "--threads" or a.startswith("--threads=") for a in argv)
    try:
        # the heavy commands (cli_args.add_threads); called in-process, only an explicit --threads changes torch's
        # setting (the Python API leaves it to the caller; the program itself applies `auto` too)
        if hasattr(args, "threads") and (explicit or not in_process):
            from .runtime import allowed_cpus, use_threads  # torch: not imported for --help

            n, cpus = use_threads(args.threads), len(allowed_cpus())
            if args.threads == "auto" and n < cpus and "OMP_NUM_THREADS" not in os.environ:  # chosen by load
                _say(f"{cpus - n} of {cpus} CPUs are busy with other processes; using {n} "
                     f"thread{'s' if n > 1 else ''} (--threads N to choose)")
        return int(args.func(args) or 0)
    except UserError as e:
        _say(f"error: {' '.join(str(e).splitlines())}")
        return 2
    except Terminated:
        _say("terminated (SIGTERM)")
        return 143
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except OSError as e:  # disk full, permission denied, ...: the writer already removed its temp file
        _say(f"error: {e.strerror or _first_line(e)}{f': {e.filename}' if e.filename else ''}")
        return 2
    except Exception as e:  # a bug, not bad input: still one line unless asked for the traceback
        if _out_of_memory(e):  # an allocation the machine cannot hold: what to do instead, in one line
            hint = ("predict a zarr input, or a TIFF with --blockwise: memory of one tile, not of the image"
                    if getattr(args, "cmd", None) == "predict" else
                    "a smaller preset, batch, --tile or --chunk lowers it")
            _say(f"error: out of memory ({hint})")
            return 2
        if os.environ.get("DENOISPLIT_ZOO_TRACEBACK"):
            raise
        if _peer_gone(e):
            return 1
        _say(f"internal error: {type(e).__name__}: {_first_line(e)} "
             "(set DENOISPLIT_ZOO_TRACEBACK=1 for the traceback; please report it)", always=True)
        return 1


def _out_of_memory(e: BaseException) -> bool:
    """numpy's MemoryError, or torch's allocator failing (a RuntimeError on the CPU: "DefaultCPUAllocator: can't
    allocate memory"; torch.OutOfMemoryError on CUDA)."""
    first = _first_line(e)
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in first or "out of memory" in first.lower()))


def _peer_gone(e: BaseException) -> bool:
    """A rank > 0 whose collective failed inside torch.distributed: another rank (rank 0, which reports why) is gone,
    e.g. it refused a bad input while this one waited at the barrier."""
    frames = traceback.extract_tb(e.__traceback__)
    return os.environ.get("RANK", "0") not in ("", "0") and bool(frames) and \
        f"torch{os.sep}distributed{os.sep}" in frames[-1].filename


def _say(message: str, always: bool = False) -> None:
    """One stderr line. Under torchrun only rank 0 speaks: the ranks share the inputs, so a bad input fails them
    alike, and the agent stops the others when one fails (SIGTERM); a bug (`always`) is printed by every rank."""
    rank = os.environ.get("RANK", "0")
    if rank in ("", "0"):
        print(f"denoisplit-zoo: {message}", file=sys.stderr)
    elif always:
        print(f"denoisplit-zoo: [rank {rank}] {message}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
