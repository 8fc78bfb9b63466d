"""Device check: what the project does on one GPU, measured in a single run of a few minutes.

Run by ``experiments/gpu/check.sh`` (which first installs the wheels the GPU image lacks) after
``experiments/gpu/prepare.sh`` has made the wheels and the data on a CPU machine. Stages:

- ``tests``: the float32 rotation-equivariance test of PhiSNet and the KFAC tests that take
  optimiser steps, run by pytest on the default device.
- ``phisnet_water``, ``phisnet_ethanol``: PhiSNet training step (loss, gradient, optimiser,
  EMA) and single-molecule inference at the paper configuration, water batch 50 and ethanol
  batch 10, compile times apart, with the peak device memory of the process.
- ``vmc_LiH``, ``vmc_H2O``: one VMC step (an MCMC call and a KFAC step) at the paper preset.
- ``vmc_shared``: one shared step over three H4 chain geometries at the paper preset.
- ``burst``: PhiSNet (paper configuration) trained on the prepared water data for whatever
  time is left, then its test-set accuracy: what a GPU-minute buys.

Each stage runs in its own process. On a GPU they start at once, so that their compilations
(which run on the host's cores) overlap; the timed part of each holds a lock on the device, so timings
never overlap, and the burst trains only after every timing has ended. Each process takes
device memory as it needs it (no preallocation), so its peak is its own. A stage first runs
once to compile (filling JAX's persistent compilation cache), then again under the lock, timed;
compile seconds come from the first run, with the other stages compiling alongside. On a CPU
the stages run one after another (--parallel overrides that, as the rehearsal does).

``--sizes tiny`` runs the same stages at test sizes (the rehearsal on a CPU machine); ``full``
at the sizes above. The report, ``gpu_check_<platform>.json`` in --out (default ``$OUT``), is
rewritten whenever a stage ends, so a run cut short keeps what it measured; each stage's output
is appended to ``check.log`` beside it. Each timing is reported next to its CPU figure, with the
speedup, where one exists (:func:`cpu_figures`).

    python experiments/gpu/check.py [--sizes full|tiny] [--budget SECONDS] [--out DIR]
        [--stages NAME ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = os.path.join(ROOT, "experiments")
DATA = os.path.join(ROOT, ".gpu", "data")
CPU_REFERENCE = os.path.join(EXPERIMENTS, "results", "gpu_check_cpu.json")

# Stage sizes. full: the paper's configurations; tiny: the rehearsal's.
SIZES = {
    "full": {
        "phisnet_preset": "paper", "water_batch": 50, "ethanol_batch": 10, "repeats": 5,
        "vmc_preset": "paper", "vmc_repeats": 5, "shared_steps": 8,
        "burst_train": 600, "burst_valid": 50, "burst_batch": 50, "burst_validate_every": 500,
        "burst_max_seconds": None,
    },
    "tiny": {
        "phisnet_preset": "tiny", "water_batch": 4, "ethanol_batch": 2, "repeats": 2,
        "vmc_preset": "tiny", "vmc_repeats": 2, "shared_steps": 4,
        "burst_train": 12, "burst_valid": 4, "burst_batch": 4, "burst_validate_every": 20,
        "burst_max_seconds": 30,
    },
}
TESTS = [
    "tests/test_model.py::test_rotation_equivariance_float32",
    "tests/test_vmc_optim.py::test_optimizer_lowers_h2_energy",
    "tests/test_vmc_optim.py::test_kfac_curvature_comes_from_the_curvature_log_psi",
]
TIMING_STAGES = ("phisnet_water", "phisnet_ethanol", "vmc_LiH", "vmc_H2O", "vmc_shared")
STAGES = ("tests",) + TIMING_STAGES + ("burst",)
# Seconds kept after the burst's training for its evaluation and the report.
BURST_RESERVE = 45.0


# --- the stages (each runs in a worker process) --------------------------------------------


@contextlib.contextmanager
def device_lock(work: str):
    """Exclusive use of the device for a timed section, across the stage processes."""
    with open(os.path.join(work, "device.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def peak_device_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_then_timed(measure, work: str) -> dict:
    """``measure()`` once to compile (its compile times are kept), then again under the device
    lock, compilations served from the persistent cache (its run times are kept)."""
    first = measure()
    with device_lock(work):
        timed = measure()
    compile_keys = {k for k in first if "compile" in k or k.startswith("first_step")}
    return {**timed, **{k: first[k] for k in compile_keys}, "peak_device_bytes": peak_device_bytes()}


def stage_tests(sizes: dict, work: str, deadline: float) -> dict:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            timeout=max(deadline - time.time(), 1))
    print(result.stdout[-6000:], result.stderr[-3000:], sep="\n")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return {"passed": result.returncode == 0, "returncode": result.returncode, "summary": summary,
            "tests": TESTS}


def load_geometry(name: str):
    """The RDKit geometry of a named molecule, from the test suite's fixture (the GPU image has
    no RDKit)."""
    import numpy as np

    from molfoundation import molecules

    with open(os.path.join(ROOT, "tests", "fixtures", "named_geometries.json")) as f:
        geometry = json.load(f)[name]
    return molecules.Molecule(np.asarray(geometry["atomic_numbers"]), np.asarray(geometry["positions_bohr"]))


def stage_phisnet(molecule: str, sizes: dict, work: str, deadline: float) -> dict:
    sys.path.insert(0, EXPERIMENTS)
    from phisnet_speed import measure_model

    from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig

    cfg = PhiSNetConfig(elements=(1, 6, 8), **MODEL_PRESETS[sizes["phisnet_preset"]])
    mol = load_geometry(molecule)
    batch = sizes[f"{molecule}_batch"]
    row = compiled_then_timed(lambda: measure_model(cfg, mol, batch, sizes["repeats"]), work)
    return {"config": sizes["phisnet_preset"], "molecule": molecule, **row}


def stage_vmc(system: str, sizes: dict, work: str, deadline: float) -> dict:
    sys.path.insert(0, EXPERIMENTS)
    from vmc_speed import time_config

    from vmc.config import SystemsConfig, preset_config

    config = preset_config(sizes["vmc_preset"], SystemsConfig(system), hf_fit_steps=0)
    row = compiled_then_timed(lambda: time_config(config, sizes["vmc_repeats"]), work)
    return {"preset": sizes["vmc_preset"], "system": system, **row}


def stage_vmc_shared(sizes: dict, work: str, deadline: float) -> dict:
    sys.path.insert(0, EXPERIMENTS)
    from shared_throughput import time_shared

    from vmc import system_sets
    from vmc.config import SystemsConfig

    spec = "hchains:4@1.6,1.8,2.0"
    system_set = SystemsConfig(spec).load()
    set_file = os.path.join(work, "h4_chains.xyz")
    system_sets.write_system_set(set_file, system_set)
    sampling = dict(hf_fit_steps=0, burn_in_sweeps=2, checkpoint_every=10**6)
    runs = iter(range(2))
    row = compiled_then_timed(
        lambda: time_shared(set_file, len(system_set), len(system_set), sizes["vmc_preset"], sampling,
                            sizes["shared_steps"], 2, os.path.join(work, f"shared_{next(runs)}")),
        work)
    return {"preset": sizes["vmc_preset"], "systems": spec, **row}


def stage_burst(sizes: dict, work: str, deadline: float) -> dict:
    import jax

    from phisnet_jax import train as training
    from phisnet_jax.data import SplitSpec, load_splits
    from phisnet_jax.dataset import read_file_info
    from phisnet_jax.evaluate import accuracy, load_trained_model
    from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig

    dataset = os.path.join(DATA, "water.h5")
    info = read_file_info(dataset)
    cfg = PhiSNetConfig(elements=(1, 8), basis=info.level.basis, **MODEL_PRESETS[sizes["phisnet_preset"]])
    tcfg = training.TrainConfig(batch_size=sizes["burst_batch"], validate_every=sizes["burst_validate_every"])
    dcfg = training.DataConfig(dataset, ("water",), sizes["burst_train"], sizes["burst_valid"])
    # Compile while the timings run: a two-step run fills the persistent compilation cache.
    t0 = time.perf_counter()
    training.train(os.path.join(work, "burst_compile"), cfg, tcfg, dcfg, max_steps=2, progress=False)
    compile_seconds = time.perf_counter() - t0
    while not os.path.exists(os.path.join(work, "timings_done")) and time.time() < deadline:
        time.sleep(1.0)
    budget = min(deadline - time.time() - BURST_RESERVE, sizes["burst_max_seconds"] or float("inf"))
    if budget <= 10:
        return {"skipped": f"{budget + BURST_RESERVE:.0f} s left after the timings"}
    run_dir = os.path.join(work, "burst")
    with device_lock(work):
        t0 = time.perf_counter()
        result = training.train(run_dir, cfg, tcfg, dcfg, time_budget=budget, progress=False)
        seconds = time.perf_counter() - t0
    trained = load_trained_model(run_dir)
    test = load_splits(dataset, ["water"], cfg, SplitSpec(dcfg.n_train, dcfg.n_valid))["test"]
    curve = os.path.join(run_dir, "learning_curve.png")
    if os.path.exists(curve) and os.environ.get("CHECK_OUT"):
        os.replace(curve, os.path.join(os.environ["CHECK_OUT"], "burst_learning_curve.png"))
    return {
        "config": sizes["phisnet_preset"], "model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tcfg),
        "split": {"train": dcfg.n_train, "valid": dcfg.n_valid, "test": len(test)},
        "compile_seconds": compile_seconds, "training_seconds": seconds, "steps": result.steps,
        "steps_per_second": result.steps / seconds, "stopped_because": result.stopped_because,
        "test": accuracy(trained, test), "peak_device_bytes": peak_device_bytes(),
        "jax_devices": [str(d) for d in jax.devices()],
    }


def run_stage(name: str, sizes: dict, work: str, deadline: float) -> dict:
    if name == "tests":
        return stage_tests(sizes, work, deadline)
    if name.startswith("phisnet_"):
        return stage_phisnet(name.removeprefix("phisnet_"), sizes, work, deadline)
    if name == "vmc_shared":
        return stage_vmc_shared(sizes, work, deadline)
    if name.startswith("vmc_"):
        return stage_vmc(name.removeprefix("vmc_"), sizes, work, deadline)
    if name == "burst":
        return stage_burst(sizes, work, deadline)
    raise ValueError(f"unknown stage {name!r}")


def worker(name: str, sizes_name: str, work: str, deadline: float) -> None:
    """One stage in this process; its result goes to ``<work>/<name>.json``."""
    t0 = time.perf_counter()
    result = run_stage(name, SIZES[sizes_name], work, deadline)
    result["wall_seconds"] = time.perf_counter() - t0
    path = os.path.join(work, f"{name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


# --- the orchestrator ----------------------------------------------------------------------


def environment() -> dict:
    import importlib.metadata
    import platform

    import jax

    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "e3nn-jax", "kfac-jax", "folx", "chex",
                    "orbax-checkpoint", "pyscf", "h5py", "numpy", "scipy", "distrax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        gpus = smi.stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        gpus = []
    sys.path.insert(0, EXPERIMENTS)
    from machine import machine_info

    return {"machine": machine_info(), "gpus": gpus, "python": platform.python_version(),
            "platform": jax.default_backend(), "versions": versions}


def cpu_figures() -> dict[str, dict]:
    """Each stage's CPU figures: from gpu_check_cpu.json (this script at full size on a CPU
    machine) where it exists, else the paper-configuration rows of phisnet_speed_cpu.json for
    the PhiSNet stages, with the file they come from."""
    if os.path.exists(CPU_REFERENCE):
        with open(CPU_REFERENCE) as f:
            return {name: dict(row, source=CPU_REFERENCE) for name, row in json.load(f)["stages"].items()}
    path = os.path.join(EXPERIMENTS, "results", "phisnet_speed_cpu.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["results"]
    return {f"phisnet_{row['molecule']}": dict(row, source=path) for row in rows
            if row["config"] == "paper"}


def with_cpu_reference(report: dict) -> dict:
    """Each timed stage's figures next to the CPU run's (``speedup`` = CPU time / this time)."""
    if report["platform"] == "cpu":
        return report
    cpu = cpu_figures()
    for name, row in report["stages"].items():
        reference = cpu.get(name, {})
        for key in ("train_step_ms", "inference_ms_per_molecule", "step_seconds"):
            if key in row and key in reference:
                row.setdefault("cpu", {"source": os.path.relpath(reference["source"], ROOT)})[key] = reference[key]
                row.setdefault("speedup_vs_cpu", {})[key] = reference[key] / row[key]
    return report


def orchestrate(args) -> int:
    out = os.path.abspath(args.out or os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_"))
    os.makedirs(out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check_work_")
    start = time.time()
    deadline = start + args.budget
    env = dict(os.environ, CHECK_OUT=out, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               JAX_COMPILATION_CACHE_DIR=os.path.join(work, "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    log_path = os.path.join(out, "check.log")
    report = {"benchmark": "device check", "sizes": args.sizes, "budget_seconds": args.budget,
              "command": "python experiments/gpu/check.py " + " ".join(sys.argv[1:]),
              **environment(), "stages": {}}
    platform = report["platform"]
    report_path = os.path.join(out, f"gpu_check_{platform}.json")

    def write_report():
        with open(report_path + ".tmp", "w") as f:
            json.dump(with_cpu_reference(report), f, indent=2)
        os.replace(report_path + ".tmp", report_path)

    write_report()
    parallel = args.parallel if args.parallel is not None else platform != "cpu"
    pending = list(args.stages)
    running = {}

    def start_next():
        name = pending.pop(0)
        log = open(os.path.join(work, f"{name}.log"), "w")
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--sizes", args.sizes,
                   "--work", work, "--deadline", str(deadline)]
        running[name] = (subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        print(f"{time.time() - start:6.0f} s  {name}: started", flush=True)

    def finish(name: str, status: str):
        process, log = running.pop(name)
        log.close()
        result_path = os.path.join(work, f"{name}.json")
        if os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
        else:
            result = {"error": status}
        report["stages"][name] = result
        with open(os.path.join(work, f"{name}.log")) as f, open(log_path, "a") as log_out:
            log_out.write(f"===== {name}: {status} =====\n{f.read()}\n")
        write_report()
        print(f"{time.time() - start:6.0f} s  {name}: {status}", flush=True)

    while running or pending:
        while pending and (parallel or not running):
            start_next()
        for name, (process, _) in list(running.items()):
            code = process.poll()
            if code is not None:
                finish(name, "done" if code == 0 else f"failed (exit code {code})")
        if not any(name in running or name in pending for name in TIMING_STAGES):
            open(os.path.join(work, "timings_done"), "w").close()
        if time.time() > deadline + 15:
            for name, (process, _) in list(running.items()):
                process.kill()
                process.wait()
                finish(name, "killed at the deadline")
            for name in pending:
                report["stages"][name] = {"error": "not started before the deadline"}
            pending.clear()
        time.sleep(0.5)
    report["wall_seconds"] = time.time() - start
    write_report()
    failed = [n for n, r in report["stages"].items() if "error" in r or r.get("passed") is False]
    print(json.dumps({n: {k: v for k, v in r.items() if isinstance(v, (int, float, str, bool))}
                      for n, r in report["stages"].items()}, indent=1))
    print(f"wrote {report_path}; failed: {failed or 'none'}")
    return 1 if failed else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="full", choices=sorted(SIZES))
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds from start to the end of the burst's training and evaluation")
    parser.add_argument("--out", help="folder of the report and log [default: $OUT, else a new temporary folder]")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--parallel", action=argparse.BooleanOptionalAction,
                        help="start every stage at once [default: on a GPU; on a CPU the stages "
                             "run one after another, since compiling beside a timing slows it]")
    parser.add_argument("--worker", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.sizes, args.work, args.deadline)
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
