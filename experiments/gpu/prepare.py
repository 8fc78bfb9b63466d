"""Prepare, on a CPU machine, everything the device check needs on a GPU machine that cannot
reach a package registry: ``.gpu/wheels.tar.xz`` and ``.gpu/data`` in the repository root (git
ignores ``.gpu``; the device call carries it, within its 64 MiB with the repository).

- wheels: those listed in experiments/gpu/wheels.txt, for CPython 3.12 on x86-64 Linux, stored
  uncompressed in one xz archive (xz packs pyscf's libraries into two thirds of what the
  wheels' own compression does). pyscf's wheel drops what the check never loads: its C sources
  and the relativistic, 5Z and pseudopotential basis sets.
- data: a water PBE/def2-SVP dataset for the burst (--water-samples geometries, generated with
  the project's CLI into runs/gpu/, resumable), copied with only the fields training reads
  (positions, F, S; a third of the size). The timings take their geometries from the test
  suite's fixture of RDKit geometries, which travels with the repository.

The rehearsal (experiments/gpu/rehearse.sh) proves that these suffice.

    .venv/bin/python experiments/gpu/prepare.py [--water-samples 700] [--workers 2]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU = os.path.join(ROOT, ".gpu")
STAGING = os.path.join(ROOT, "runs", "gpu")  # downloads and the full dataset
WHEEL_LIST = os.path.join(ROOT, "experiments", "gpu", "wheels.txt")
# manylinux tags pip must be told one by one (it matches N of manylinux_2_N exactly).
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
# Parts of pyscf the device check never loads (see the module docstring).
PYSCF_DROPPED = re.compile(
    r"pyscf/(lib/.*\.(c|h|cl)$"
    r"|gto/basis/(dyall-basis/|.*(-dk|-DK|5z|5Z|-pp|-PP|pc-[234]|pcseg-[234]|crenbl)))"
)
# Dataset fields the burst's training and evaluation read (phisnet_jax.data.load_splits).
DATA_FIELDS = ("positions", "fock", "overlap")


def download_wheels(wheels: str) -> None:
    os.makedirs(wheels, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
               "--abi", "none", *[a for p in PLATFORMS for a in ("--platform", p)],
               "-r", WHEEL_LIST, "-d", wheels]
    subprocess.run(command, check=True)


def record_line(name: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [name, f"sha256={digest}", str(len(data))]


def stored_wheel(path: str, target: str, dropped: re.Pattern | None = None) -> None:
    """The wheel at ``path`` written to ``target`` uncompressed, without the files ``dropped``
    matches (its RECORD made anew)."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target + ".tmp", "w", zipfile.ZIP_STORED) as out:
        names = [n for n in source.namelist() if dropped is None or not dropped.match(n)]
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = []
        for name in names:
            if name != record_name:
                data = source.read(name)
                out.writestr(source.getinfo(name), data, compress_type=zipfile.ZIP_STORED)
                rows.append(record_line(name, data))
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows + [[record_name, "", ""]])
        out.writestr(record_name, buffer.getvalue())
    os.replace(target + ".tmp", target)


def pack_wheels(downloaded: str, archive: str) -> None:
    """Every wheel of ``downloaded``, stored (pyscf's slimmed), in the xz archive ``archive``."""
    staged = os.path.join(os.path.dirname(downloaded), "stored")
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    for name in sorted(os.listdir(downloaded)):
        dropped = PYSCF_DROPPED if name.startswith("pyscf-") else None
        stored_wheel(os.path.join(downloaded, name), os.path.join(staged, name), dropped)
    with tarfile.open(archive + ".tmp", "w:xz") as tar:
        for name in sorted(os.listdir(staged)):
            tar.add(os.path.join(staged, name), arcname=name)
    os.replace(archive + ".tmp", archive)
    shutil.rmtree(staged)


def copy_fields(source: str, target: str, fields: tuple[str, ...]) -> None:
    """A copy of the dataset ``source`` whose molecule groups keep, of the per-sample arrays,
    only ``fields`` (and the bookkeeping every reader needs)."""
    import h5py

    # Per-sample scalars too, for the summary of `phisnet inspect`.
    keep = set(fields) | {"converged", "sample_index", "energy", "scf_iterations",
                          "atomic_numbers", "shell_atom", "shell_l"}
    with h5py.File(source, "r") as src, h5py.File(target + ".tmp", "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name, group in src.items():
            if name != "molecules":
                src.copy(group, dst, name)
                continue
            molecules = dst.create_group(name)
            for key, value in group.attrs.items():
                molecules.attrs[key] = value
            for molecule, mgroup in group.items():
                out = molecules.create_group(molecule)
                for key, value in mgroup.attrs.items():
                    out.attrs[key] = value
                for key, item in mgroup.items():
                    if isinstance(item, h5py.Group) or key in keep:
                        mgroup.copy(item, out, key)
    os.replace(target + ".tmp", target)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--water-samples", type=int, default=700)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    downloaded = os.path.join(STAGING, "wheels")
    download_wheels(downloaded)
    os.makedirs(GPU, exist_ok=True)
    pack_wheels(downloaded, os.path.join(GPU, "wheels.tar.xz"))

    data = os.path.join(GPU, "data")
    os.makedirs(data, exist_ok=True)
    full = os.path.join(STAGING, "water_pbe_def2svp.h5")
    phisnet = os.path.join(os.path.dirname(sys.executable), "phisnet")
    subprocess.run([phisnet, "generate", "water", "--samples", str(args.water_samples), "--workers",
                    str(args.workers), "--seed", "0", "--output", full], check=True)
    copy_fields(full, os.path.join(data, "water.h5"), DATA_FIELDS)

    total = 0
    for folder, _, files in os.walk(GPU):
        for name in files:
            total += os.path.getsize(os.path.join(folder, name))
    print(f"{GPU}: {total / 2**20:.1f} MB (the device call carries at most 64 MiB with the repository)")


if __name__ == "__main__":
    main()
