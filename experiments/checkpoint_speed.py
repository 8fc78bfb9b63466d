"""Benchmark: saving and restoring a training state, orbax writing every array on its own
against :mod:`molfoundation.checkpoints` (replicated arrays packed into one flat array per
dtype), in one run on the same state.

The state is a real one: the VMC checkpoint of a short ``vmc train`` run (``--preset``, KFAC,
made in a temporary directory by this script), read back as nested dicts. Each variant
saves it ``--saves`` times into a fresh directory (waiting until each save is on disk) and
restores the last save. Writes experiments/results/checkpoint_speed_<platform>.json.

    .venv/bin/python experiments/checkpoint_speed.py --saves 10
"""

import argparse
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from machine import machine_info, result_stem  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--system", default="LiH")
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()

    import jax
    import orbax.checkpoint as ocp

    from molfoundation import checkpoints

    work = tempfile.mkdtemp()
    run_dir = os.path.join(work, "run")
    command = ["vmc", "train", args.system, "--run-dir", "RUN", "--preset", args.preset, "--steps", "2",
               "--hf-fit-steps", "2"]
    subprocess.run([sys.executable, "-m", *[run_dir if c == "RUN" else c for c in command]], check=True,
                   capture_output=True)
    state = checkpoints.restore_raw(os.path.join(run_dir, "checkpoints", "vmc"))
    template = jax.eval_shape(lambda: state)

    def orbax_each_array(directory):
        manager = checkpoints.manager(directory)
        saves = []
        for step in range(args.saves):
            saves.append(timed(lambda: (manager.save(step, args=ocp.args.StandardSave(state), force=True),
                                        manager.wait_until_finished())))
        restore = timed(lambda: jax.block_until_ready(
            manager.restore(args.saves - 1, args=ocp.args.StandardRestore(template))))
        return saves, restore

    def packed(directory):
        manager = checkpoints.manager(directory)
        saves = [timed(lambda: checkpoints.save(manager, state, step)) for step in range(args.saves)]
        restore = timed(lambda: jax.block_until_ready(checkpoints.restore_latest(directory, lambda: template)))
        return saves, restore

    variants = {}
    for name, fn in (("orbax_each_array", orbax_each_array), ("packed", packed)):
        saves, restore = fn(os.path.join(work, name))
        variants[name] = {"save_seconds": saves, "median_save_seconds": statistics.median(saves),
                          "restore_seconds": restore}
    result = {
        "benchmark": "checkpoint_speed",
        "command": (f"python experiments/checkpoint_speed.py --saves {args.saves} --system {args.system} "
                    f"--preset {args.preset}"),
        "state": {"run": " ".join(command), "arrays": len(jax.tree.leaves(state)),
                  "bytes": sum(x.nbytes for x in jax.tree.leaves(state))},
        **variants,
        "save_ratio": variants["packed"]["median_save_seconds"] / variants["orbax_each_array"]["median_save_seconds"],
        "restore_ratio": variants["packed"]["restore_seconds"] / variants["orbax_each_array"]["restore_seconds"],
        "machine": machine_info(),
    }
    shutil.rmtree(work)
    path = result_stem("checkpoint_speed", None, jax.default_backend()) + ".json"
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("state", "save_ratio", "restore_ratio")}))
    print({name: (round(v["median_save_seconds"], 3), round(v["restore_seconds"], 3)) for name, v in variants.items()})


if __name__ == "__main__":
    main()
