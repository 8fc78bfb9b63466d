"""Sets of systems for shared training: one network over many molecules and geometries.

A system set is a ``list[System]`` with unique names. It comes from

- a file (:func:`read_system_set` / :func:`write_system_set`): a multi-frame XYZ file in
  angstrom, one system per frame, whose comment lines may carry ``name=``, ``charge=`` and
  ``spin=`` (2S); the format is documented in ``docs/system_sets.md``;
- a generator: :func:`hydrogen_chains` (every length x spacing) or :func:`small_molecules`
  (RDKit start geometries, randomly rotated and distorted, reproducible from a seed);
- a command-line specification (:func:`load_system_set`): a file, ``hchains:6,10@1.4,1.8`` or
  ``molecules:CH4,H2O,NH3x20``.

Positions are in bohr inside (as in :class:`~vmc.systems.System`) and in angstrom in files.
Elements are limited to H-Ne, the elements the minimal-basis (STO-6G) orbital featurizer
covers. Every problem raises :class:`~molfoundation.errors.InputError` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import tempfile
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from molfoundation import molecules
from molfoundation.errors import InputError
from vmc import systems
from vmc.systems import System

# The minimal-basis featurizer (molfoundation.orbital_features.MINIMAL_BASIS_SLOTS) holds
# 1s, 2s and 2p shells: STO-nG covers exactly the elements H-Ne with these.
MAX_ATOMIC_NUMBER = 10

COMMENT_KEYS = ("name", "charge", "spin")
XYZ_EXTENSIONS = (".xyz", ".extxyz")
# Positions are written with 12 decimals in angstrom: the round trip is exact to ~1e-12 bohr.
POSITION_DECIMALS = 12

# The 18 small compounds of the reference paper's base model (Scherbela, Gerard, Grohs 2023).
PAPER_SMALL_MOLECULES: dict[str, str] = {
    "CH4": "C",
    "NH3": "N",
    "H2O": "O",
    "C2H2": "C#C",
    "N2": "N#N",
    "HCN": "C#N",
    "C2H4": "C=C",
    "N2H2": "[H]/N=N/[H]",  # trans-diazene, the more stable isomer
    "CH2NH": "C=N",
    "O2": "O=O",
    "HNO": "N=O",
    "CH2O": "C=O",
    "C2H6": "CC",
    "N2H4": "NN",
    "CH3NH2": "CN",
    "H2O2": "OO",
    "NH2OH": "NO",
    "CH3OH": "CO",
}
# Ground states that are not the lowest spin: O2 is a triplet.
PAPER_SPINS: dict[str, int] = {"O2": 2}

DEFAULT_DISTORTION = 0.1  # bohr, standard deviation of the displacement of every coordinate
DEFAULT_MIN_DISTANCE = 1.0  # bohr; below every equilibrium bond of H-Ne compounds (H2: 1.4)
MAX_DISTORTION_ATTEMPTS = 1000
EMBED_SEED = 0  # RDKit conformer seed: start geometries do not depend on the sampling seed


# --- checks ----------------------------------------------------------------------------------


def check_elements(system: System) -> None:
    """Raise InputError unless every atom of ``system`` is H-Ne."""
    beyond = system.atomic_numbers[system.atomic_numbers > MAX_ATOMIC_NUMBER]
    if beyond.size:
        from pyscf.data.elements import ELEMENTS

        z = int(beyond[0])
        label = f" ({system.name})" if system.name else ""
        raise InputError(
            f"system{label} has element {ELEMENTS[z]} (Z = {z}): the minimal-basis (STO-6G) "
            f"orbital featurizer supports only H-Ne (Z <= {MAX_ATOMIC_NUMBER})"
        )


def _check_set(system_set: Sequence[System]) -> list[System]:
    """The set as a list, after checking that it is non-empty, H-Ne only, with unique names."""
    system_set = list(system_set)
    if not system_set:
        raise InputError("a system set needs at least one system")
    seen: dict[str, int] = {}
    for i, system in enumerate(system_set):
        if not isinstance(system, System):
            raise InputError(f"entry {i} of the system set is not a System")
        check_elements(system)
        if system.name in seen:
            raise InputError(
                f"systems {seen[system.name]} and {i} have the same name {system.name!r}; "
                "names in a system set must be unique"
            )
        seen[system.name] = i
    return system_set


# --- files -----------------------------------------------------------------------------------


def _check_extension(path: str) -> None:
    if not str(path).lower().endswith(XYZ_EXTENSIONS):
        raise InputError(f"system set files are XYZ files ending in .xyz, got {path}")


def _comment_lines(path: str) -> list[str]:
    """The comment line of every frame of an XYZ file, found by walking the atom counts."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    comments = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        count = lines[i].split()[0]
        if not count.isdigit():
            raise InputError(f"cannot read system set {path}: line {i + 1} should be an atom count")
        comments.append(lines[i + 1] if i + 1 < len(lines) else "")
        i += int(count) + 2
    return comments


def parse_comment(comment: str) -> dict:
    """The ``name`` (str), ``charge`` and ``spin`` (int) set on one frame's comment line.

    A line without ``=`` is free text and sets nothing; otherwise every whitespace-separated
    token must be ``key=value`` with a key in ``COMMENT_KEYS`` (names may be double-quoted).
    """
    if "=" not in comment:
        return {}
    try:
        tokens = shlex.split(comment)
    except ValueError:
        raise InputError(f"unbalanced quotes in comment line {comment!r}") from None
    values: dict = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        key = key.lower()
        if not sep or not key:
            raise InputError(
                f"expected key=value in comment line, got {token!r} "
                f"(keys: {', '.join(COMMENT_KEYS)})"
            )
        if key not in COMMENT_KEYS:
            raise InputError(
                f"unknown key {key!r} in comment line; known keys: {', '.join(COMMENT_KEYS)}"
            )
        if key in values:
            raise InputError(f"key {key!r} given twice in comment line")
        if key == "name":
            if not value:
                raise InputError("empty name= in comment line")
            values[key] = value
        else:
            if not re.fullmatch(r"[+-]?\d+", value):
                raise InputError(f"{key} must be an integer, got {key}={value!r}")
            values[key] = int(value)
    return values


def read_system_set(path: str) -> list[System]:
    """All frames of a system-set XYZ file (angstrom) as systems (positions in bohr).

    Per frame, ``charge`` defaults to 0, ``spin`` to the lowest spin for the electron count and
    ``name`` to ``<Hill formula>_<frame index, 3 digits>``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"system set file not found: {path}")
    _check_extension(path)
    frames = molecules.read_xyz(path)
    try:
        comments = _comment_lines(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read system set {path}: {exc}") from None
    if len(comments) != len(frames):
        raise InputError(
            f"cannot read system set {path}: it has {len(comments)} frames but only "
            f"{len(frames)} could be read (blank lines between frames are not allowed)"
        )
    system_set = []
    for index, (frame, comment) in enumerate(zip(frames, comments)):
        where = f"{path}, frame {index}"
        try:
            values = parse_comment(comment)
            charge = values.get("charge", 0)
            n_electrons = int(np.sum(frame.atomic_numbers)) - charge
            spin = values.get("spin", systems.lowest_spin(n_electrons))
            name = values.get("name", f"{frame.formula}_{index:03d}")
            system = System(frame.atomic_numbers, frame.positions, charge, spin, name=name)
            check_elements(system)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        system_set.append(system)
    try:
        return _check_set(system_set)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def _format_name(name: str) -> str:
    """``name=...`` for a comment line, quoted where it holds spaces or '='."""
    if any(c in name for c in "\"'\\") or not name.isprintable():
        raise InputError(
            f"system name {name!r} cannot be written: no quotes, backslashes or control characters"
        )
    return f'name="{name}"' if re.search(r"[\s=]", name) else f"name={name}"


def write_system_set(path: str, system_set: Sequence[System]) -> None:
    """Write systems as a multi-frame XYZ file (angstrom) with ``name``, ``charge`` and ``spin``
    on every comment line (``name`` left out for unnamed systems). The file is replaced
    atomically: on any error no file, partial or otherwise, is left behind."""
    path = os.fspath(path)
    _check_extension(path)
    system_set = _check_set(system_set)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise InputError(f"cannot write system set {path}: directory {directory} does not exist")
    lines = []
    for system in system_set:
        fields = ([_format_name(system.name)] if system.name else []) + [
            f"charge={system.charge}", f"spin={system.spin}"
        ]
        lines += [str(system.n_atoms), " ".join(fields)]
        for symbol, xyz in zip(system.symbols, system.positions / molecules.BOHR_PER_ANGSTROM):
            lines.append(f"{symbol:2s}" + "".join(f" {x:19.{POSITION_DECIMALS}f}" for x in xyz))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a data file is world-readable
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --- generators ------------------------------------------------------------------------------


def hydrogen_chains(lengths: Sequence[int], spacings: Sequence[float]) -> list[System]:
    """Hydrogen chains for every (length, spacing bohr) pair, named ``H<n>_d<spacing:.2f>``,
    ordered by length, then spacing; lowest spin, centred on the z axis."""
    lengths, spacings = list(lengths), list(spacings)
    if not lengths or not spacings:
        raise InputError("hydrogen chains need at least one length and one spacing")
    chains = []
    for n in lengths:
        for spacing in spacings:
            chain = systems.hydrogen_chain(n, spacing)
            name = f"H{chain.n_atoms}_d{float(spacing):.2f}"
            chains.append(dataclasses.replace(chain, name=name))
    return _check_set(chains)


def _rdkit_molecule(smiles: str):
    """An RDKit molecule with explicit hydrogens; InputError for bad SMILES or elements."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # RDKit reports failures on stderr as well as by value
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise InputError(
            f"{smiles!r} is neither a known molecule ({', '.join(PAPER_SMALL_MOLECULES)}) "
            "nor a valid SMILES"
        )
    for atom in mol.GetAtoms():
        if not 1 <= atom.GetAtomicNum() <= MAX_ATOMIC_NUMBER:
            raise InputError(
                f"SMILES {smiles!r} has element {atom.GetSymbol()}: the minimal-basis (STO-6G) "
                "orbital featurizer supports only H-Ne"
            )
    return Chem.AddHs(mol)


def _paper_name(smiles: str) -> str | None:
    """The name in PAPER_SMALL_MOLECULES of the molecule with this SMILES, if it is one."""
    from rdkit import Chem

    canonical = Chem.MolToSmiles(Chem.MolFromSmiles(smiles))
    for name, paper_smiles in PAPER_SMALL_MOLECULES.items():
        if Chem.MolToSmiles(Chem.MolFromSmiles(paper_smiles)) == canonical:
            return name
    return None


def start_geometry(molecule: str, name: str | None = None, spin: int | None = None) -> System:
    """The force-field minimum of a molecule, centred at its centroid (positions bohr).

    Args:
      molecule: a name of PAPER_SMALL_MOLECULES (case-insensitive) or a SMILES string.
      name: the system's name; default the paper name of the molecule, else its Hill formula.
      spin: 2S; default PAPER_SPINS for the paper molecules (O2: triplet), else the lowest.

    The charge is the SMILES's total formal charge. One RDKit conformer (fixed seed) is
    optimised with UFF, or MMFF94 where UFF lacks parameters.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    if not isinstance(molecule, str) or not molecule.strip():
        raise InputError("a molecule must be a non-empty name or SMILES string")
    by_name = {key.lower(): key for key in PAPER_SMALL_MOLECULES}
    key = by_name.get(molecule.strip().lower())
    smiles = PAPER_SMALL_MOLECULES[key] if key else molecule.strip()
    mol = _rdkit_molecule(smiles)
    if AllChem.EmbedMolecule(mol, randomSeed=EMBED_SEED) != 0:
        raise InputError(f"RDKit could not embed a 3D conformer for {molecule!r}")
    # UFF first: MMFF94 puts N2's triple bond at 1.46 angstrom (experiment 1.10, UFF 1.12) and
    # has no parameters for O2.
    if mol.GetNumAtoms() > 1:
        if AllChem.UFFHasAllMoleculeParams(mol):
            AllChem.UFFOptimizeMolecule(mol, maxIters=10000)
        elif AllChem.MMFFHasAllMoleculeParams(mol):
            AllChem.MMFFOptimizeMolecule(mol, maxIters=10000)
        else:
            raise InputError(f"no force-field (UFF or MMFF94) parameters for {molecule!r}")
    positions = mol.GetConformer().GetPositions() * molecules.BOHR_PER_ANGSTROM
    positions -= positions.mean(axis=0)
    numbers = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()], dtype=np.int64)
    charge = Chem.GetFormalCharge(mol)
    paper = key or _paper_name(smiles)
    if spin is None:
        spin = PAPER_SPINS.get(paper, systems.lowest_spin(int(numbers.sum()) - charge))
    if name is None:
        name = paper or molecules.Molecule(numbers, positions).formula
    return System(numbers, positions, charge, spin, name=name)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) rotation matrix, uniform on SO(3): a normalised Gaussian quaternion."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_quat(rng.standard_normal(4)).as_matrix()


def _min_distance(positions: np.ndarray) -> float:
    if len(positions) < 2:
        return np.inf
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return float(d[np.triu_indices(len(positions), 1)].min())


def distorted_geometries(start: System, n_geometries: int, seed: int = 0,
                         distortion: float = DEFAULT_DISTORTION,
                         min_distance: float = DEFAULT_MIN_DISTANCE) -> list[System]:
    """``n_geometries`` copies of ``start``, each rotated about the origin by a uniform random
    rotation R and displaced: x -> x @ R.T + N(0, distortion^2) per coordinate (bohr).

    Geometries with two atoms closer than ``min_distance`` bohr are drawn again. Geometry i
    depends only on (seed, start.name, i), so asking for more geometries keeps the first ones.
    Names are ``<start.name>_<i, 3 digits>``.
    """
    if int(n_geometries) != n_geometries or n_geometries < 1:
        raise InputError(f"the number of geometries must be a positive integer, got {n_geometries}")
    if int(seed) != seed or seed < 0:
        raise InputError(f"the seed must be a non-negative integer, got {seed}")
    if not np.isfinite(distortion) or distortion < 0:
        raise InputError(f"the distortion must be a non-negative length in bohr, got {distortion}")
    if _min_distance(start.positions) < min_distance:
        raise InputError(
            f"{start.name}: the start geometry already has atoms closer than {min_distance} bohr"
        )
    name_key = zlib.crc32(start.name.encode("utf-8"))
    geometries = []
    for i in range(int(n_geometries)):
        rng = np.random.default_rng([int(seed), name_key, i])
        rotated = start.positions @ _random_rotation(rng).T
        for _ in range(MAX_DISTORTION_ATTEMPTS):
            positions = rotated + distortion * rng.standard_normal(rotated.shape)
            if _min_distance(positions) >= min_distance:
                break
        else:
            raise InputError(
                f"{start.name}: no distortion of {distortion} bohr kept atoms {min_distance} bohr "
                f"apart in {MAX_DISTORTION_ATTEMPTS} tries; use a smaller distortion"
            )
        name = f"{start.name}_{i:03d}"
        geometries.append(dataclasses.replace(start, positions=positions, name=name))
    return geometries


def small_molecules(smiles_or_names: Sequence[str] | Mapping[str, str], n_geometries: int = 1,
                    seed: int = 0, distortion: float = DEFAULT_DISTORTION,
                    spins: Mapping[str, int] | None = None,
                    min_distance: float = DEFAULT_MIN_DISTANCE) -> list[System]:
    """Randomly rotated and distorted geometries of small molecules (see
    :func:`start_geometry` and :func:`distorted_geometries`).

    Args:
      smiles_or_names: paper names (``CH4``, ``O2``, ...) or SMILES; or a mapping from the name
        to give each molecule to its paper name or SMILES (needed for isomers, which would
        otherwise share their Hill formula as name).
      n_geometries: geometries per molecule, named ``<molecule>_000``, ``<molecule>_001``, ...
      seed: geometry i of a molecule depends only on (seed, molecule name, i).
      distortion: standard deviation of every coordinate's Gaussian displacement, bohr.
      spins: 2S per molecule, keyed by the entry as given or by the molecule's name; default
        the lowest spin (O2: 2).
      min_distance: geometries with two atoms closer than this (bohr) are redrawn.
    """
    if isinstance(smiles_or_names, str):
        raise InputError("small_molecules takes a list of names or SMILES, not one string")
    entries = (list(smiles_or_names.items()) if isinstance(smiles_or_names, Mapping)
               else [(None, entry) for entry in smiles_or_names])
    spins = dict(spins or {})
    used_spin_keys = set()
    result = []
    for name, entry in entries:
        start = start_geometry(entry, name=name)
        spin_key = next((k for k in (entry, start.name) if k in spins), None)
        if spin_key is not None:
            used_spin_keys.add(spin_key)
            start = dataclasses.replace(start, spin=spins[spin_key])
        result += distorted_geometries(start, n_geometries, seed, distortion, min_distance)
    unused = set(spins) - used_spin_keys
    if unused:
        raise InputError(f"spins given for molecule(s) not in the set: {', '.join(sorted(unused))}")
    return _check_set(result)


# --- command-line specifications -------------------------------------------------------------

SPEC_HELP = ("an XYZ system-set file, 'hchains:<lengths>@<spacings bohr>' (e.g. "
             "hchains:6,10@1.4,1.8) or 'molecules:<names or SMILES>[x<geometries each>]' "
             "(e.g. molecules:CH4,H2O,NH3x20)")


def _split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise InputError(f"empty entry in the {what} list {text!r}")
    return items


def _parse_hchains(body: str) -> list[System]:
    lengths_text, at, spacings_text = body.partition("@")
    lengths = []
    for item in _split_list(lengths_text, "chain length"):
        if not item.isdigit():
            raise InputError(f"hydrogen chain length must be a positive integer, got {item!r}")
        lengths.append(int(item))
    if not at:
        return hydrogen_chains(lengths, [systems.DEFAULT_CHAIN_SPACING])
    spacings = []
    for item in _split_list(spacings_text, "chain spacing"):
        try:
            spacings.append(float(item))
        except ValueError:
            raise InputError(
                f"hydrogen chain spacing must be a number in bohr, got {item!r}"
            ) from None
    return hydrogen_chains(lengths, spacings)


def _parse_molecules(body: str, seed: int) -> list[System]:
    count = re.fullmatch(r"(.*)x(\d+)", body.strip())
    n_geometries = int(count.group(2)) if count else 1
    names = _split_list(count.group(1) if count else body, "molecule")
    return small_molecules(names, n_geometries, seed=seed)


def load_system_set(spec: str, seed: int = 0) -> list[System]:
    """A system set from a command-line specification.

    - an existing file (or a path ending in .xyz): :func:`read_system_set`;
    - ``hchains:6,10@1.4,1.8,2.2``: :func:`hydrogen_chains` for every length x spacing (bohr);
      without ``@...`` the spacing is 1.8 bohr;
    - ``molecules:CH4,H2O,NH3x20``: :func:`small_molecules` of paper names or SMILES, with
      ``x<N>`` geometries each (default 1) from ``seed``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"a system set must be {SPEC_HELP}")
    spec = spec.strip()
    if os.path.isfile(spec):
        return read_system_set(spec)
    kind, sep, body = spec.partition(":")
    if sep and kind.strip().lower() == "hchains":
        return _parse_hchains(body)
    if sep and kind.strip().lower() == "molecules":
        return _parse_molecules(body, seed)
    if spec.lower().endswith(XYZ_EXTENSIONS):
        return read_system_set(spec)
    raise InputError(f"unknown system set {spec!r}: expected {SPEC_HELP}")
