"""Profile: where one PhiSNet training step spends its time, part by part.

The jitted training step (loss, gradient, optimiser, moving average; the same function as
``phisnet train``) runs --repeats times under JAX's profiler after two warm-up steps. The trace
names the compiled program's operations (HLO instructions, fusions included); each one's
metadata holds the name stack of the code it came from (Flax module paths, einsum subscripts,
``jvp``/``transpose`` for the forward and backward pass), which sorts its time into a part:

- ``cg_interaction``: the Clebsch-Gordan products of the messages (sender features x Y(r_ij)),
  ``cg_pair``: those of the pair features (a_i x a_j), ``cg_self_mixing``: those of the
  self-mixing layers (x^l1 x x^l2 within an atom or pair);
- ``path_sums``: the weighted sums over CG paths and neighbours around those products (the
  rest of ``Interaction``, ``SelfMixing`` and the pair-feature code);
- ``radial_weights``: the linear maps of the radial basis to per-path, per-channel weights;
- ``linear``: the per-order channel mixing (``PerOrderLinear``); ``activations``: the swish;
- ``matrix_heads``: the output heads and the assembly of F and S from atom-pair blocks;
- ``loss``: the loss on F and S; ``optimizer``: the optimiser and moving-average updates;
- ``model_other``: the rest of the network (embedding, geometry, radial basis, residual
  additions).

Each part's seconds are summed over the operations' trace events (CPU threads may overlap, so
the parts add up to the busy time, ``attributed_seconds``, not to the wall clock);
``step_seconds`` is the wall-clock time per step under the profiler. The forward/backward split
of each part is given as ``backward_share``; ``top_operations`` lists the single operations that
take longest, with the name stack they came from. Writes
experiments/results/phisnet_profile[_<label>]_<platform>.json.

    .venv/bin/python experiments/phisnet_profile.py --config paper --batch 50
    .venv/bin/python experiments/phisnet_profile.py --config small --batch 10 --label small
"""

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

from machine import machine_info, result_stem  # noqa: E402
from molfoundation import molecules  # noqa: E402
from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig  # noqa: E402
from phisnet_jax.train import init_state, make_train_step  # noqa: E402
from phisnet_speed import training_problem  # noqa: E402

# (part, pattern in the op's name stack), first match wins. The einsum subscripts are those of
# phisnet_jax.layers.weighted_cg_product as called by each layer.
MODEL_PARTS = (
    ("cg_interaction", "jaf,ijb,abc->ijcf"),
    ("cg_pair", "iaf,jbf,abc->ijcf"),
    ("cg_self_mixing", "...af,...bf,abc->...cf"),
    ("radial_weights", r"_radial(_\d+)?(/|$)"),
    ("linear", r"PerOrderLinear|_linear(/|$)"),
    ("activations", r"ScalarSwish|_activation(/|$)"),
    ("matrix_heads", r"_matrix_head|_overlap"),
    ("path_sums", r"SelfMixing|_interaction(/|$)|_hamiltonians"),
)
MODEL_SCOPE = "(PhiSNet)"
TOP_OPERATIONS = 15


def classify(op_name: str) -> tuple[str, bool]:
    """(part, whether it belongs to the backward pass) of an op from its name stack."""
    backward = "transpose(" in op_name
    if MODEL_SCOPE in op_name:
        for part, pattern in MODEL_PARTS:
            if re.search(pattern, op_name):
                return part, backward
        return "model_other", backward
    if "jvp(" in op_name or backward:
        return "loss", backward
    return "optimizer", False


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op_name metadata of a compiled module's text; a fusion without its
    own metadata takes its fused computation's root's."""
    computation_root, own, calls = {}, {}, {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if header:
            current = header.group(1)
            continue
        inst = re.match(r"^\s*(ROOT )?%(\S+) = ", line)
        if not inst:
            continue
        name = inst.group(2)
        meta = re.search(r'op_name="([^"]+)"', line)
        if meta:
            own[name] = meta.group(1)
            if inst.group(1):
                computation_root[current] = meta.group(1)
        called = re.search(r"calls=%([^\s,)]+)", line)
        if called:
            calls[name] = called.group(1)
    for name, computation in calls.items():
        if name not in own and computation in computation_root:
            own[name] = computation_root[computation]
    return own


def trace_durations(log_dir: str) -> dict[str, float]:
    """Seconds per trace-event name, summed over the perfetto trace the profiler wrote."""
    (path,) = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            seconds[event["name"]] += event["dur"] * 1e-6
    return seconds


def profile(preset: str, molecule: str, batch: int, repeats: int) -> dict:
    mol = molecules.from_name(molecule)
    cfg = dataclasses.replace(PhiSNetConfig(elements=tuple(sorted(set(mol.atomic_numbers.tolist())))),
                              **MODEL_PRESETS[preset])
    model, _, batched, (fock, overlap), tcfg, optimizer = training_problem(cfg, mol, batch)
    state = init_state(model, tcfg, batched, optimizer)
    step = jax.jit(make_train_step(model, tcfg, optimizer))
    compiled = step.lower(state, batched, fock, overlap).compile()
    names = op_names(compiled.as_text())
    for _ in range(2):
        state, metrics = compiled(state, batched, fock, overlap)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(repeats):
                state, metrics = compiled(state, batched, fock, overlap)
                jax.block_until_ready(metrics)
            wall = (time.perf_counter() - start) / repeats
        durations = trace_durations(log_dir)
    parts = collections.defaultdict(lambda: [0.0, 0.0])  # part -> [forward/update, backward] seconds
    for name, seconds in durations.items():
        if name in names:
            part, backward = classify(names[name])
            parts[part][backward] += seconds / repeats
    top = sorted(((s / repeats, n) for n, s in durations.items() if n in names), reverse=True)[:TOP_OPERATIONS]
    unmatched = sorted(((s, n) for n, s in durations.items() if n not in names), reverse=True)[:5]
    print("largest trace events that are not operations of the step:",
          ", ".join(f"{n} {s / repeats:.3f} s" for s, n in unmatched), file=sys.stderr)
    attributed = sum(sum(v) for v in parts.values())
    rows = {part: {"seconds": sum(v), "share": sum(v) / attributed, "backward_share": v[1] / sum(v)}
            for part, v in sorted(parts.items(), key=lambda kv: -sum(kv[1]))}
    return {"config": preset, "molecule": molecule, "batch": batch, "repeats": repeats,
            "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
            "step_seconds": wall, "attributed_seconds": attributed, "operations": sum(n in names for n in durations), "parts": rows,
            "top_operations": [{"name": n, "seconds": s, "op_name": names[n]} for s, n in top]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--molecule", default="water")
    parser.add_argument("--batch", type=int, default=50, help="molecules per step [default: the paper's for water]")
    parser.add_argument("--repeats", type=int, default=3, help="profiled steps after two warm-up steps")
    parser.add_argument("--label", help="suffix of the result file's name")
    args = parser.parse_args()
    result = {
        "benchmark": "phisnet_profile",
        "command": "python experiments/phisnet_profile.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(), "jax": jax.__version__,
        **profile(args.config, args.molecule, args.batch, args.repeats),
    }
    for part, row in result["parts"].items():
        print(f"{part:16s} {row['seconds']:8.3f} s  {100 * row['share']:5.1f} %  backward {100 * row['backward_share']:3.0f} %")
    path = result_stem("phisnet_profile", args.label, jax.default_backend()) + ".json"
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
