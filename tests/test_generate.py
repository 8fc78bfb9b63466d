"""Generation end to end through the CLI: resume after kill -9, extension, bad input. Runs
that generate go through the subprocess entry point ``python -m phisnet_jax``; the bad-input
checks run the same command line in-process (they end before any work starts)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import run_phisnet_cli

from phisnet_jax import dataset, sampling
from phisnet_jax.generate import SAMPLE_FILE
from phisnet_jax.reference import LevelOfTheory, compute_labels

PHISNET = [sys.executable, "-m", "phisnet_jax"]
WATER_HF = ["water", "--method", "hf", "--basis", "6-31g"]


def run_phisnet(*args, cwd):
    return subprocess.run(PHISNET + list(args), cwd=cwd, capture_output=True, text=True, timeout=600)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def staged_samples(staging):
    """Completed staged samples; a kill during a write can leave ``sample_<i>.npz.tmp.npz``."""
    return [p for p in os.listdir(staging) if SAMPLE_FILE.fullmatch(p)] if os.path.isdir(staging) else []


def test_kill_minus_9_then_resume(tmp_path):
    out = tmp_path / "water.h5"
    staging = str(out) + ".partial/water"
    args = ["generate", *WATER_HF, "-n", "40", "-j", "1", "-o", str(out)]
    proc = subprocess.Popen(PHISNET + args, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(staged_samples(staging)) < 3:
        assert proc.poll() is None, "generation finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing is written to the output until all samples exist
    n_staged = len(staged_samples(staging))
    assert 3 <= n_staged < 40

    result = run_phisnet(*args, "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_new"] == 40 - n_staged
    assert not os.path.exists(str(out) + ".partial")

    data = dataset.read_molecule(str(out), "water", include_unconverged=True)
    np.testing.assert_array_equal(data.arrays["sample_index"], np.arange(40))
    ensemble = sampling.ensemble_from_arrays(data.ensemble_arrays, data.ensemble_attrs)
    level = LevelOfTheory("hf", "6-31g")
    for i in (1, 20, 39):  # staged before the kill, and computed after the resume
        np.testing.assert_array_equal(data.arrays["positions"][i], ensemble.geometry(i).positions)
        fresh = compute_labels(ensemble.geometry(i), level)
        np.testing.assert_allclose(data.arrays["energy"][i], fresh["energy"], atol=1e-9)
        np.testing.assert_allclose(data.arrays["fock"][i], fresh["fock"], atol=1e-6)

    # Extending the group reuses its stored ensemble: the first 40 samples stay as they are.
    result = run_phisnet(*args[:-4], "-n", "42", "-j", "2", "-o", str(out), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_new"] == 2
    extended = dataset.read_molecule(str(out), "water", include_unconverged=True)
    np.testing.assert_array_equal(extended.arrays["sample_index"], np.arange(42))
    np.testing.assert_array_equal(extended.arrays["fock"][:40], data.arrays["fock"])


def test_trajectory_input_and_inspect(tmp_path):
    xyz = tmp_path / "traj.xyz"
    frames = []
    for dz in (0.0, 0.05, 0.1):
        frames.append(f"3\nframe\nO 0 0 {dz}\nH 0 0.76 0.58\nH 0 -0.76 0.58\n")
    xyz.write_text("".join(frames))
    out = tmp_path / "t.h5"
    result = run_phisnet("generate", "--xyz", str(xyz), "--method", "hf", "--basis", "sto-3g",
                         "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(run_phisnet("inspect", str(out), "--json", cwd=tmp_path).stdout)
    (entry,) = summary["molecules"]
    assert entry["name"] == "traj" and entry["n_samples"] == 3 and entry["n_converged"] == 3
    assert entry["ensemble"]["kind"] == "trajectory"
    data = dataset.read_molecule(str(out), "traj")
    np.testing.assert_allclose(data.arrays["positions"][2][0], [0, 0, 0.1 / 0.52917721092])
    text = run_phisnet("inspect", str(out), cwd=tmp_path)
    assert text.returncode == 0 and "3/3 converged" in text.stdout

    # A second molecule of another size joins the same file; re-running it changes nothing.
    for _ in range(2):
        added = run_phisnet("generate", "hydrogen", "--method", "hf", "--basis", "sto-3g", "-n", "2",
                            "-o", str(out), cwd=tmp_path)
        assert added.returncode == 0, added.stderr
    summary = json.loads(run_phisnet("inspect", str(out), "--json", cwd=tmp_path).stdout)
    assert [(m["name"], m["n_ao"], m["n_samples"]) for m in summary["molecules"]] == [
        ("hydrogen", 2, 2), ("traj", 7, 3)]


BAD_XYZ = {
    "nan.xyz": "3\n\nO 0 0 0\nH 0 0 nan\nH 0 1 0\n",
    "garbage.xyz": "this is not xyz\n",
    "uranium.xyz": "2\n\nU 0 0 0\nH 0 0 2.5\n",
    "close.xyz": "2\n\nO 0 0 0\nH 0 0 0.2\n",
    "water.xyz": "3\n\nO 0 0 0\nH 0 0.76 0.58\nH 0 -0.76 0.58\n",
}


@pytest.fixture(scope="module")
def existing_dataset(tmp_path_factory):
    """A one-sample HF/STO-3G water dataset, made once and copied by each test."""
    folder = tmp_path_factory.mktemp("existing")
    (folder / "water.xyz").write_text(BAD_XYZ["water.xyz"])
    created = run_phisnet("generate", "--xyz", "water.xyz", "--method", "hf", "--basis", "sto-3g",
                          "--no-optimize", "-n", "1", "-o", "existing.h5", cwd=folder)
    assert created.returncode == 0, created.stderr
    return folder / "existing.h5"


@pytest.mark.parametrize("args, message", [
    (["no_such_molecule"], "unknown molecule"),
    (["--xyz", "missing.xyz"], "not found"),
    (["--xyz", "garbage.xyz"], "cannot read geometry file"),
    (["--xyz", "nan.xyz"], "non-finite"),
    (["--xyz", "uranium.xyz", "--basis", "sto-3g", "--spin", "1"], "no functions for element"),
    (["--xyz", "close.xyz", "--charge", "-1"], "angstrom apart"),
    (["--xyz", "water.xyz", "--charge", "1"], "impossible"),
    (["--xyz", "water.xyz", "--method", "pbe", "--basis", "sto-3g"], "holds hf/sto-3g data"),
    (["water", "--method", "hf", "--basis", "no-such-basis"], "unknown basis"),
    (["water", "--samples", "0"], "at least 1"),
    (["water", "--smiles", "O"], "exactly one"),
])
def test_bad_input_exits_2_and_keeps_existing_file(tmp_path, monkeypatch, capsys, existing_dataset, args, message):
    for name, text in BAD_XYZ.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "existing.h5"
    shutil.copyfile(existing_dataset, out)
    before = digest(out)
    extra = [] if "--method" in args else ["--method", "hf", "--basis", "sto-3g"]
    monkeypatch.chdir(tmp_path)
    code, _, err = run_phisnet_cli(["generate", *args, *extra, "-o", str(out)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert digest(out) == before
    assert sorted(os.listdir(tmp_path)) == sorted(list(BAD_XYZ) + ["existing.h5"])


def test_inspect_rejects_corrupt_file(tmp_path):
    """Through the subprocess entry point: what a shell sees is one line and exit code 2."""
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    result = run_phisnet("inspect", str(bad), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a valid HDF5" in result.stderr


def test_help_lists_subcommands(capsys):
    for cmd in (PHISNET, [sys.executable, "-m", "vmc"]):  # the entry points
        result = subprocess.run(cmd + ["--help"], capture_output=True, text=True)
        assert result.returncode == 0 and "Usage" in result.stdout
    code, out, _ = run_phisnet_cli(["--help"], capsys)
    assert code == 0 and "generate" in out and "inspect" in out
    for sub in ("generate", "inspect"):
        assert run_phisnet_cli([sub, "--help"], capsys)[0] == 0
