"""System sets for shared training: the XYZ file format (round trip, comment lines, bad input),
the hydrogen-chain and small-molecule generators, and the command-line shorthands."""

import os
import re

import numpy as np
import pytest

from molfoundation import molecules
from molfoundation.errors import InputError
from vmc import system_sets, systems

# Covalent radii (Cordero et al. 2008), angstrom, for bond graphs of H, C, N, O compounds.
COVALENT_RADIUS_ANGSTROM = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66}


def write_text(path, text):
    path.write_text(text)
    return str(path)


def kabsch_rotation(moved, reference):
    """(3, 3) proper rotation R minimising |moved @ R.T - reference| (rotation about the origin)."""
    u, _, vt = np.linalg.svd(reference.T @ moved)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def bond_graph(system, factor=1.3):
    radii = np.array([COVALENT_RADIUS_ANGSTROM[int(z)] for z in system.atomic_numbers])
    cutoff = factor * (radii[:, None] + radii[None]) * molecules.BOHR_PER_ANGSTROM
    d = np.linalg.norm(system.positions[:, None] - system.positions[None], axis=-1)
    return (d < cutoff) & ~np.eye(system.n_atoms, dtype=bool)


def min_distance(positions):
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    return d[np.triu_indices(len(positions), 1)].min()


# --- files -----------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path):
    mixed = [
        *system_sets.hydrogen_chains([3], [1.4]),
        *system_sets.small_molecules(["O2", "CH3OH"], n_geometries=2, seed=3),
        systems.System(np.array([7, 1, 1, 1, 1]), systems.from_name("CH4").positions, charge=1,
                       spin=0, name="ammonium ion"),
        systems.System(np.array([1, 1]), [[0, 0, 0], [0, 0, 1.4]], charge=1, spin=1, name="a=b"),
    ]
    path = str(tmp_path / "set.xyz")
    system_sets.write_system_set(path, mixed)
    back = system_sets.read_system_set(path)
    assert [s.name for s in back] == [s.name for s in mixed]
    for original, read in zip(mixed, back):
        np.testing.assert_array_equal(read.atomic_numbers, original.atomic_numbers)
        np.testing.assert_allclose(read.positions, original.positions, rtol=0, atol=1e-10)
        assert (read.charge, read.spin) == (original.charge, original.spin)
    assert [f for f in os.listdir(tmp_path)] == ["set.xyz"]  # no temporary file left behind

    # Writing again replaces the file; systems without a name get a default one on reading.
    unnamed = systems.System(np.array([8, 1, 1]), systems.from_name("H2O").positions)
    system_sets.write_system_set(path, [unnamed])
    (water,) = system_sets.read_system_set(path)
    assert water.name == "H2O_000"
    np.testing.assert_allclose(water.positions, unnamed.positions, rtol=0, atol=1e-10)


def test_comment_lines_and_defaults(tmp_path):
    path = write_text(tmp_path / "set.xyz", "\n".join([
        "1", "", "H 0 0 0",
        "2", "hydroxyl radical, free text", "O 0 0 0", "H 0 0 0.97",
        "1", 'Charge=+1 name="helium cation"', "He 0 0 0",
        "2", "spin=2 name=O2_triplet", "O 0 0 0", "O 0 0 1.21",
        "2", "charge=-1", "O 0 0 0", "H 0 0 0.96",
    ]) + "\n")
    result = system_sets.read_system_set(path)
    assert [(s.name, s.charge, s.spin, s.n_electrons) for s in result] == [
        ("H_000", 0, 1, 1),             # no comment: charge 0, lowest spin, name from formula
        ("HO_001", 0, 1, 9),            # free text (no '=') sets nothing
        ("helium cation", 1, 1, 1),     # keys are case-insensitive; names may be quoted
        ("O2_triplet", 0, 2, 16),
        ("HO_004", -1, 0, 10),          # the default spin follows the charge
    ]
    np.testing.assert_allclose(result[3].positions[1], [0, 0, 1.21 * molecules.BOHR_PER_ANGSTROM])


def test_documented_example_reads_as_documented(tmp_path):
    docs = os.path.join(os.path.dirname(__file__), "..", "docs", "system_sets.md")
    example = open(docs).read().split("```\n")[1]
    result = system_sets.read_system_set(write_text(tmp_path / "example.xyz", example))
    assert [(s.name, s.charge, s.spin) for s in result] == [
        ("CH4_000", 0, 0), ("O2", 0, 2), ("hydroxide, distorted", -1, 0), ("HO_003", 0, 1)
    ]


@pytest.mark.parametrize("comment, expected", [
    ("", {}),
    ("just a title", {}),
    ("name=CH4_000 charge=0 spin=0", {"name": "CH4_000", "charge": 0, "spin": 0}),
    ('NAME="two words" Spin=+2', {"name": "two words", "spin": 2}),
    ("charge=-2", {"charge": -2}),
])
def test_parse_comment(comment, expected):
    assert system_sets.parse_comment(comment) == expected


FRAME = "2\n{comment}\nO 0 0 0\nH 0 0 0.96\n"


@pytest.mark.parametrize("text, message", [
    ("not an xyz file\n", "cannot read"),
    ("3\nname=x\nH 0 0 0\n", "cannot read"),
    (FRAME.format(comment="charge=1.5"), "charge must be an integer"),
    (FRAME.format(comment="spin=two"), "spin must be an integer"),
    (FRAME.format(comment="charge=0 multiplicity=2"), "unknown key 'multiplicity'"),
    (FRAME.format(comment="name=OH spin"), "expected key=value"),
    (FRAME.format(comment="spin=1 spin=1"), "given twice"),
    (FRAME.format(comment='name="unbalanced'), "cannot read|unbalanced"),
    (FRAME.format(comment="spin=0"), "impossible"),            # 9 electrons cannot pair up
    (FRAME.format(comment="charge=1 spin=1"), "impossible"),   # 8 electrons, 2S = 1
    (FRAME.format(comment="spin=-3"), "must not be negative"),
    ("2\n\nH 0 0 0\nH 0 0 0.1\n", "apart"),
    ("2\n\nH 0 0 0\nH 0 0 nan\n", "non-finite"),
    ("2\n\nNa 0 0 0\nH 0 0 1.9\n", "H-Ne"),
    (FRAME.format(comment="name=a") + "\n" + FRAME.format(comment="name=b"), "blank lines"),
    (FRAME.format(comment="name=a") + FRAME.format(comment="name=a"), "same name 'a'"),
])
def test_bad_files_raise_one_line_input_errors(tmp_path, text, message):
    path = write_text(tmp_path / "bad.xyz", text)
    with pytest.raises(InputError, match=message) as exc:
        system_sets.read_system_set(path)
    assert "\n" not in str(exc.value)


def test_missing_file_and_wrong_extension(tmp_path):
    with pytest.raises(InputError, match="not found"):
        system_sets.read_system_set(str(tmp_path / "missing.xyz"))
    with pytest.raises(InputError, match="ending in .xyz"):
        system_sets.read_system_set(write_text(tmp_path / "set.txt", FRAME.format(comment="")))


def test_frame_errors_name_the_frame(tmp_path):
    text = FRAME.format(comment="spin=1") + FRAME.format(comment="spin=3 charge=x")
    path = write_text(tmp_path / "set.xyz", text)
    with pytest.raises(InputError, match=r"set\.xyz, frame 1: charge must be an integer"):
        system_sets.read_system_set(path)


@pytest.mark.parametrize("make_set, message", [
    (lambda: [], "at least one system"),
    (lambda: [systems.System(np.array([11, 9]), [[0, 0, 0], [0, 0, 3.6]], name="NaF")], "H-Ne"),
    (lambda: [systems.from_name("H2"), systems.from_name("H2")], "same name 'H2'"),
    (lambda: [systems.System(np.array([1, 1]), [[0, 0, 0], [0, 0, 1.4]], name='say "hi"')],
     "quotes"),
])
def test_bad_writes_leave_the_old_file_and_nothing_else(tmp_path, make_set, message):
    path = str(tmp_path / "set.xyz")
    system_sets.write_system_set(path, [systems.from_name("H2")])
    before = open(path).read()
    with pytest.raises(InputError, match=message) as exc:
        system_sets.write_system_set(path, make_set())
    assert "\n" not in str(exc.value)
    assert open(path).read() == before
    assert os.listdir(tmp_path) == ["set.xyz"]


def test_write_failures_leave_no_file(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        system_sets.write_system_set(str(tmp_path / "no" / "set.xyz"), [systems.from_name("H2")])
    with pytest.raises(InputError, match="ending in .xyz"):
        system_sets.write_system_set(str(tmp_path / "set.csv"), [systems.from_name("H2")])

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        system_sets.write_system_set(str(tmp_path / "set.xyz"), [systems.from_name("H2")])
    assert os.listdir(tmp_path) == []


# --- generators ------------------------------------------------------------------------------


def test_hydrogen_chains():
    chains = system_sets.hydrogen_chains([6, 10], [1.4, 1.8, 2.2])
    assert [c.name for c in chains] == ["H6_d1.40", "H6_d1.80", "H6_d2.20",
                                        "H10_d1.40", "H10_d1.80", "H10_d2.20"]
    for chain in chains:
        n, spacing = chain.n_atoms, float(chain.name.split("_d")[1])
        assert (chain.charge, chain.spin) == (0, 0)
        np.testing.assert_array_equal(chain.atomic_numbers, np.ones(n))
        np.testing.assert_array_equal(chain.positions[:, :2], 0.0)
        np.testing.assert_allclose(np.diff(chain.positions[:, 2]), spacing, rtol=0, atol=1e-12)
        assert chain.positions[:, 2].sum() == pytest.approx(0.0, abs=1e-12)
    assert system_sets.hydrogen_chains([5], [1.8])[0].spin == 1
    for lengths, spacings in [([], [1.8]), ([6], []), ([6], [-1.0]), ([0], [1.8]), ([6, 6], [1.8])]:
        with pytest.raises(InputError):
            system_sets.hydrogen_chains(lengths, spacings)


def test_paper_molecules_have_the_paper_formulas_and_spins():
    assert len(system_sets.PAPER_SMALL_MOLECULES) == 18
    result = system_sets.small_molecules(list(system_sets.PAPER_SMALL_MOLECULES), seed=1)
    assert [s.name for s in result] == [f"{name}_000" for name in system_sets.PAPER_SMALL_MOLECULES]
    for system in result:
        expected = system.name[:-4]
        counts = {}
        for symbol in system.symbols:
            counts[symbol] = counts.get(symbol, 0) + 1
        assert counts == _count_formula(expected)
        assert system.charge == 0
        assert system.spin == (2 if expected == "O2" else 0)
    o2 = next(s for s in result if s.name == "O2_000")
    assert (o2.n_up, o2.n_down) == (9, 7)


def _count_formula(formula):
    """Element counts of a condensed formula such as CH3NH2."""
    counts = {}
    for symbol, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula):
        counts[symbol] = counts.get(symbol, 0) + (int(n) if n else 1)
    return counts


def test_small_molecules_are_reproducible_and_extendable():
    a = system_sets.small_molecules(["CH4", "NH2OH"], n_geometries=3, seed=7)
    b = system_sets.small_molecules(["CH4", "NH2OH"], n_geometries=3, seed=7)
    c = system_sets.small_molecules(["CH4", "NH2OH"], n_geometries=3, seed=8)
    more = system_sets.small_molecules(["NH2OH", "CH4"], n_geometries=5, seed=7)
    assert [s.name for s in a] == ["CH4_000", "CH4_001", "CH4_002",
                                   "NH2OH_000", "NH2OH_001", "NH2OH_002"]
    by_name = {s.name: s for s in more}
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x.positions, y.positions)
        np.testing.assert_array_equal(x.positions, by_name[x.name].positions)
        assert np.abs(x.positions - z.positions).max() > 0.1
    assert np.abs(a[0].positions - a[1].positions).max() > 0.1


def test_distortion_rms_matches_the_requested_deviation():
    """After the Kabsch rotation onto the start geometry, the residual displacements of N atoms
    are Gaussian with 3N - 3 degrees of freedom (the fitted rotation absorbs 3)."""
    sigma = 0.15
    squared, dof = 0.0, 0
    for name in ("C2H6", "CH3OH"):
        start = system_sets.start_geometry(name)
        for system in system_sets.small_molecules([name], n_geometries=100, seed=0,
                                                  distortion=sigma):
            rotation = kabsch_rotation(system.positions, start.positions)
            squared += np.sum((system.positions @ rotation.T - start.positions) ** 2)
            dof += 3 * start.n_atoms - 3
    # 3600 degrees of freedom: the estimate of sigma has a relative spread of about 1.2 %.
    assert np.sqrt(squared / dof) == pytest.approx(sigma, rel=0.05)


def test_distortions_keep_the_bond_topology():
    names = ["CH4", "C2H4", "HCN", "H2O2", "N2H4", "CH3NH2"]
    starts = {name: system_sets.start_geometry(name) for name in names}
    result = system_sets.small_molecules(names, n_geometries=25, seed=2)
    for system in result:
        start = starts[system.name[:-4]]
        assert min_distance(system.positions) >= system_sets.DEFAULT_MIN_DISTANCE
        np.testing.assert_array_equal(bond_graph(system), bond_graph(start))
    # A large distortion is redrawn until no two atoms are closer than the threshold.
    wild = system_sets.small_molecules(["CH4"], n_geometries=50, seed=0, distortion=0.5,
                                       min_distance=1.6)
    assert min(min_distance(s.positions) for s in wild) >= 1.6


def test_small_molecule_options_and_errors():
    (o2,) = system_sets.small_molecules(["O=O"])
    assert (o2.name, o2.spin) == ("O2_000", 2)            # recognised from its SMILES
    (singlet,) = system_sets.small_molecules(["O2"], spins={"O2": 0})
    assert singlet.spin == 0
    (cation,) = system_sets.small_molecules(["[NH4+]"])
    assert (cation.name, cation.charge, cation.spin) == ("H4N_000", 1, 0)
    isomers = system_sets.small_molecules({"ethanol": "CCO", "dimethyl_ether": "COC"})
    assert [s.name for s in isomers] == ["ethanol_000", "dimethyl_ether_000"]
    (rotated,) = system_sets.small_molecules(["HNO"], distortion=0.0)
    start = system_sets.start_geometry("HNO")
    rotation = kabsch_rotation(rotated.positions, start.positions)
    np.testing.assert_allclose(rotated.positions @ rotation.T, start.positions, atol=1e-10)

    for args, kwargs, message in [
        (["ClC(Cl)(Cl)Cl"], {}, "H-Ne"),
        (["[Na+]"], {}, "H-Ne"),
        (["not-a-molecule"], {}, "nor a valid SMILES"),
        (["CCO", "OCC"], {}, "same name 'C2H6O_000'"),
        (["CH4", "CH4"], {}, "same name"),
        (["CH4"], {"n_geometries": 0}, "positive integer"),
        (["CH4"], {"distortion": -0.1}, "non-negative"),
        (["CH4"], {"seed": -1}, "non-negative"),
        (["CH4"], {"min_distance": 3.0}, "already has atoms closer"),
        (["CH4"], {"spins": {"H2O": 0}}, "not in the set: H2O"),
        (["CH4"], {"spins": {"CH4": 1}}, "impossible"),
        ("CH4", {}, "not one string"),
    ]:
        with pytest.raises(InputError, match=message) as exc:
            system_sets.small_molecules(args, **kwargs)
        assert "\n" not in str(exc.value)


# --- command-line specifications -------------------------------------------------------------


def test_load_system_set_shorthands(tmp_path):
    chains = system_sets.load_system_set("hchains:6,10@1.4,1.8,2.2")
    expected = system_sets.hydrogen_chains([6, 10], [1.4, 1.8, 2.2])
    assert [c.name for c in chains] == [c.name for c in expected]
    assert [c.name for c in system_sets.load_system_set(" HChains: 4 ")] == ["H4_d1.80"]

    mols = system_sets.load_system_set("molecules:CH4,H2O,NH3x20")
    assert len(mols) == 60 and mols[20].name == "H2O_000" and mols[-1].name == "NH3_019"
    direct = system_sets.small_molecules(["CH4", "H2O", "NH3"], n_geometries=20, seed=0)
    for a, b in zip(mols, direct):
        np.testing.assert_array_equal(a.positions, b.positions)
    smiles_and_names = system_sets.load_system_set("molecules:C=C,O2")
    assert [s.name for s in smiles_and_names] == ["C2H4_000", "O2_000"]
    other_seed = system_sets.load_system_set("molecules:CH4", seed=1)[0]
    assert np.abs(other_seed.positions - mols[0].positions).max() > 0.1

    path = str(tmp_path / "set.xyz")
    system_sets.write_system_set(path, chains)
    assert [s.name for s in system_sets.load_system_set(path)] == [c.name for c in chains]


@pytest.mark.parametrize("spec, message", [
    ("", "a system set must be"),
    ("H2O", "unknown system set 'H2O'"),
    ("chains:6@1.8", "unknown system set"),
    ("missing.xyz", "not found"),
    ("hchains:", "empty entry"),
    ("hchains:6,,10", "empty entry"),
    ("hchains:six@1.8", "positive integer"),
    ("hchains:6@1.8,wide", "number in bohr"),
    ("hchains:6@-1", "positive length"),
    ("molecules:x20", "empty entry"),
    ("molecules:CH4,Xyz", "valid SMILES"),
    ("molecules:CH4x0", "positive integer"),
])
def test_bad_specs_raise_input_errors(spec, message):
    with pytest.raises(InputError, match=message) as exc:
        system_sets.load_system_set(spec)
    assert "\n" not in str(exc.value)
