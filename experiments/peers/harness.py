"""What the peer benchmarks share: each code's run in a fresh process, versions, result files.

A benchmark script runs itself as ``SCRIPT child JOB OUT`` for every measured run: the child
writes its figures as JSON to OUT and may leave arrays in ``arrays_path(OUT)``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from machine import machine_info, result_stem


def run_child(child) -> bool:
    """When this process is a child (``SCRIPT child JOB OUT``), run ``child(job, out_path)``
    and say so."""
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        child(json.loads(sys.argv[2]), sys.argv[3])
        return True
    return False


def mode_parsers(description: str, peer: str, peer_help: str, optional_in: tuple[str, ...] = (),
                 modes: tuple[str, ...] = ("speed", "budget")):
    """The command line of a peer benchmark: its ``modes``, each with ``--<peer>`` (where the
    peer is; required except in the modes ``optional_in``) and ``--label``. Returns (parser,
    {mode: subparser})."""
    parser = argparse.ArgumentParser(description=description)
    subparsers = parser.add_subparsers(dest="mode", required=True)
    subs = {}
    for mode in modes:
        subs[mode] = sub = subparsers.add_parser(mode)
        sub.add_argument(f"--{peer}", required=mode not in optional_in, help=peer_help)
        sub.add_argument("--label", help="suffix of the result file's name, for a variant of the settings")
    return parser, subs


def arrays_path(out_path: str) -> str:
    """Where a child leaves its arrays (an .npz beside its JSON)."""
    return os.path.join(os.path.dirname(out_path), "arrays.npz")


def launch(script: str, job: dict, python: str = sys.executable) -> dict:
    """Run ``job`` in a fresh process of ``script`` (nothing compiled is shared between runs),
    started by the interpreter ``python`` (a peer may need an environment of its own): what its
    child wrote, its arrays under ``"arrays"`` if it left any, and ``"launched"``, the time the
    process was started."""
    import numpy as np

    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "out.json")
        job = dict(job, launched=time.time())
        # No persistent compilation cache (an empty directory setting turns off both JAX's
        # and this project's default one), or a repeat would load what the first run compiled.
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
        env["JAX_COMPILATION_CACHE_DIR"] = ""
        done = subprocess.run([python, os.path.abspath(script), "child", json.dumps(job), out],
                              env=env, text=True, capture_output=True)
        if done.returncode != 0:
            raise SystemExit(f"the {job['code']} run failed:\n{done.stderr[-4000:]}")
        with open(out) as f:
            raw = json.load(f)
        if os.path.exists(arrays_path(out)):
            with np.load(arrays_path(out)) as arrays:
                raw["arrays"] = {k: arrays[k] for k in arrays.files}
    raw["launched"] = job["launched"]
    return raw


def versions(peer: str | None, packages: tuple[str, ...]) -> dict:
    """Installed versions of ``packages`` and, given its path, the git commit of the peer's
    source (``peer_commit``)."""
    import importlib.metadata as md

    found = {name: md.version(name) for name in packages}
    if peer is None:
        return found
    commit = subprocess.run(["git", "-C", peer, "rev-parse", "HEAD"], capture_output=True, text=True)
    found["peer_commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    return found


# Environment variables that set the codes' thread pools; both codes' processes inherit them.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")


def header(script: str, benchmark: str, peer: str | None, packages: tuple[str, ...]) -> dict:
    """What every peer result file starts with: the benchmark's name, the command that made it
    (see ``command_line``), the machine, the versions (see ``versions``) and the thread
    settings of the environment (``environment``: those of THREAD_VARIABLES that are set)."""
    return {"benchmark": benchmark, "command": command_line(script, peer), "machine": machine_info(),
            "versions": versions(peer, packages),
            "environment": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}}


def command_line(script: str, peer: str | None) -> str:
    """This process's command line, with the peer's path written as PEER."""
    return f"python experiments/peers/{os.path.basename(script)} " + " ".join(
        "PEER" if a == peer else a for a in sys.argv[1:])


def result_path(name: str, label: str | None) -> str:
    """experiments/results/<name>[_<label>]_<platform>.json"""
    import jax

    return result_stem(name, label, jax.default_backend()) + ".json"


def write_result(name: str, label: str | None, out: dict) -> None:
    """Write ``result_path(name, label)`` atomically."""
    path = result_path(name, label)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
