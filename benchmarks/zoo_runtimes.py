"""Does an exported zip pass where the zoo and its consumers run it? Builds one isolated venv per runtime (pip, from
the package registries; nothing of this project is installed there), runs `bioimageio test` for each weight format
in it, and writes the table to docs/zoo_runtimes.md.

    python benchmarks/zoo_runtimes.py MODEL.zip [--runtimes zoo-remote core-0.10.4 torch-2.0.1 dev] [--venvs /tmp/zoo_venvs]

Runtimes (name: pip requirements):
    zoo-remote    the bioimage.io website's remote test runtime as far as its versions are public: bioimageio.core
                  0.10.4 (-> spec 0.5.10.x), torch 2.5.1, onnxruntime 1.20.1. PyPI's torch 2.5.1 is a CUDA 12 build
                  (~3.5 GB with its nvidia wheels); it runs on the CPU
    core-0.10.4   the same core and onnxruntime with this project's CPU torch (TORCH below): no CUDA download
    torch-2.0.1   the oldest consumers: torch 2.0.1 (the newest TorchScript engine of JDLL / deepImageJ, and the
                  `pytorch_version` the package declares) with onnxruntime 1.15.1 (the oldest with Python 3.11
                  wheels; JDLL's 1.13.1 has none) under bioimageio.core 0.10.4; numpy < 2 (torch 2.0.1 was built
                  against numpy 1). PyPI's torch 2.0.1 is a CUDA 11.7 build (~2.6 GB with its nvidia wheels); it
                  runs on the CPU
    dev           today's development runtime (constraints.txt: bioimageio.core 0.11.0)

"passed" for a weight format means bioimageio.core's whole test: the rdf validates, the weights load, inference runs
at the test size and at other valid sizes and batch sizes, and the outputs reproduce test_output.npy.

Each venv is reused when it exists (so a venv built by hand, or the development venv, can be linked in under a
runtime's name). The table: runtime, package versions, per weight format passed / failed and the
first failing check. Nothing of the zip's code runs outside these venvs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # the CPU wheel this project pins (constraints.txt); a runtime may name its own
RUNTIMES = {
    "zoo-remote": ["bioimageio.core==0.10.4", "onnxruntime==1.20.1", "torch==2.5.1", "pydantic<2.14"],
    "core-0.10.4": ["bioimageio.core==0.10.4", "onnxruntime==1.20.1", TORCH, "pydantic<2.14"],
    "torch-2.0.1": ["bioimageio.core==0.10.4", "onnxruntime==1.15.1", "torch==2.0.1", "numpy<2", "pydantic<2.14"],
    "dev": ["bioimageio.core==0.11.0", "onnxruntime", TORCH, "pydantic<2.14"],
}
FORMATS = ("pytorch_state_dict", "torchscript", "onnx")
PROBE = """
import json, sys
from importlib.metadata import version
from bioimageio.core import test_model
out = {"versions": {p: version(p) for p in ("bioimageio.core", "bioimageio.spec", "torch", "onnxruntime", "pydantic")}}
for fmt in sys.argv[2:]:
    s = test_model(sys.argv[1], weight_format=fmt, devices=["cpu"])
    failed = [d for d in s.details if d.status == "failed"]
    first = ""
    if failed:
        d = failed[0]
        err = d.errors[0] if d.errors else None
        first = d.name + (": " + err.msg.strip().splitlines()[0] if err is not None and err.msg.strip() else "")
    out[fmt] = {"status": s.status, "first_failure": first}
print("RESULT " + json.dumps(out))
"""


def venv(root: Path, name: str, reqs: list[str]) -> Path:
    py = root / name / "bin" / "python"
    if not py.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(root / name)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *reqs], check=True)
    return py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zip", type=Path)
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    ap.add_argument("--venvs", type=Path, default=Path("/tmp/zoo_venvs"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "zoo_runtimes.md")
    args = ap.parse_args()
    rows = []
    for name in args.runtimes:
        t0 = time.time()
        try:
            py = venv(args.venvs, name, RUNTIMES[name])
            p = subprocess.run([str(py), "-c", PROBE, str(args.zip.resolve()), *FORMATS], capture_output=True,
                               text=True, timeout=1800, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2",
                                                             "HOME": str(args.venvs)})
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            res = {"error": f"{type(e).__name__}: {e}"}
        res["runtime"], res["seconds"] = name, round(time.time() - t0)
        rows.append(res)
        print(json.dumps(res), flush=True)
    lines = ["# Where the exported package passes", "",
             f"`python benchmarks/zoo_runtimes.py {args.zip.name} --runtimes {' '.join(args.runtimes)}` — one isolated "
             "venv per runtime, `bioimageio.core.test_model` per weight format (CPU). Regenerate after changing "
             f"the package format or model.py. Measured {time.strftime('%Y-%m-%d')} on {args.zip.name}.", "",
             "\"passed\" is bioimageio.core's whole test: the rdf validates, the weights load, inference runs at the "
             "test size and at other valid sizes and batch sizes, and the outputs reproduce test_output.npy.", "",
             "| runtime | bioimageio.core | bioimageio.spec | torch | onnxruntime | " + " | ".join(FORMATS) + " |",
             "|---|---|---|---|---|" + "---|" * len(FORMATS)]
    for r in rows:
        v = r.get("versions", {})
        cells = [r["runtime"], *(v.get(k, "-") for k in ("bioimageio.core", "bioimageio.spec", "torch", "onnxruntime"))]
        for fmt in FORMATS:
            f = r.get(fmt)
            cells.append(r.get("error", "-")[:80] if f is None else
                         f["status"] + (f" ({f['first_failure'][:80]})" if f["first_failure"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    doc = __doc__.split("Runtimes (name: pip requirements):\n")[1].split("\n\n")[0]
    lines += ["", "Runtimes (pip requirements: `RUNTIMES` in the script):", "", "```", doc, "```"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
