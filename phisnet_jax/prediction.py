"""One call from a molecule and a trained PhiSNet model to everything derived from F and S.

    from phisnet_jax.evaluate import load_trained_model
    from phisnet_jax.prediction import predict
    p = predict(load_trained_model("runs/water"), mol)      # a pyscf Mole or a Molecule
    p.orbital_energies, p.density_matrix, p.dipole, p.energy, p.forces

The overlap matrix S is by default the exact one of the geometry (``predict(..., overlap=
"predicted")`` uses the model's instead).

All arrays are numpy, in hartree and bohr, AO matrices in pyscf's AO order (they drop straight
into pyscf, e.g. ``mf.kernel(dm0=p.density_matrix)``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import jax.numpy as jnp
import numpy as np

from molfoundation import runs
from molfoundation.errors import InputError
from molfoundation.molecules import Molecule, validate
from phisnet_jax import observables
from phisnet_jax.evaluate import TrainedModel
from phisnet_jax.model import MoleculeInputs, make_inputs


@dataclasses.dataclass(frozen=True, eq=False)
class Prediction:
    """Predicted matrices and observables of one closed-shell molecule.

    Attributes (M = number of AOs, n = number of atoms):
      fock: (M, M) predicted; core_hamiltonian: (M, M) or None (model without H_core head).
      overlap: (M, M) the S that the orbitals and everything derived from them use:
        ``overlap_source`` "exact" (the integrals of the basis at this geometry, the default)
        or "predicted" (the model's S, as in the paper's benchmarks).
      predicted_overlap: (M, M) the model's S, whichever S is used.
      orbital_energies: (M,) hartree; coefficients: (M, M), columns, S-orthonormal.
      density_matrix: (M, M) closed-shell 2 C_occ C_occ^T; n_occupied: doubly occupied orbitals.
      homo_lumo_gap: hartree; mulliken_charges: (n,) e; dipole: (3,) e bohr about the origin.
      energy: hartree and forces: (n, 3) hartree/bohr, only with an H_core head (else None);
        always with the exact S, the energy the H_core head is trained for.
      outside_training: the atom pairs outside the model's training data (element pairs never
        seen, distances outside the training range), where the prediction extrapolates.
      smallest_overlap_eigenvalue: of ``overlap``; below ``observables.
        DEFAULT_MIN_OVERLAP_EIGENVALUE`` the eigen-solve clamps it (a predicted S that is not
        positive definite is not an overlap matrix).
      warnings: one line for each reason not to trust the prediction as it is (the two above);
        empty if none. ``predict`` also raises each as a :class:`PredictionWarning`.
    """

    molecule: Molecule
    basis: str
    fock: np.ndarray
    overlap: np.ndarray
    overlap_source: str
    predicted_overlap: np.ndarray
    core_hamiltonian: np.ndarray | None
    orbital_energies: np.ndarray
    coefficients: np.ndarray
    density_matrix: np.ndarray
    n_occupied: int
    homo_lumo_gap: float
    mulliken_charges: np.ndarray
    dipole: np.ndarray
    energy: float | None
    forces: np.ndarray | None
    outside_training: tuple[str, ...]
    smallest_overlap_eigenvalue: float
    warnings: tuple[str, ...]


class PredictionWarning(UserWarning):
    """A prediction not to be trusted as it is: its geometry lies outside the model's training
    data, or its predicted overlap matrix is not positive definite."""


OVERLAP_SOURCES = ("exact", "predicted")


def _warnings(outside: tuple[str, ...], overlap_source: str, smallest_overlap_eigenvalue: float) -> tuple[str, ...]:
    said = []
    if outside:
        more = f" (and {len(outside) - 1} more pairs)" if len(outside) > 1 else ""
        said.append(f"the geometry is outside the training data: {outside[0]}{more}")
    if smallest_overlap_eigenvalue < observables.DEFAULT_MIN_OVERLAP_EIGENVALUE:
        said.append(f"the {overlap_source} overlap matrix is not positive definite (smallest eigenvalue "
                    f"{smallest_overlap_eigenvalue:.3g}): orbitals and everything derived from them are unreliable")
    return tuple(said)


def _as_molecule(mol_or_molecule) -> Molecule:
    if isinstance(mol_or_molecule, Molecule):
        return mol_or_molecule
    mol = mol_or_molecule  # a pyscf Mole
    return Molecule(np.asarray(mol.atom_charges()), np.asarray(mol.atom_coords(unit="Bohr")),
                    int(mol.charge), int(mol.spin))


def predict(trained: TrainedModel, mol_or_molecule, overlap: str = "exact") -> Prediction:
    """Predict F (and H_core) for a molecule and derive the observables, with the exact overlap
    matrix S of the geometry or (``overlap="predicted"``) the model's. A geometry outside the
    training data, or an S that is not positive definite, is said in ``Prediction.warnings``
    and as a :class:`PredictionWarning`."""
    from molfoundation.molecules import to_pyscf

    if overlap not in OVERLAP_SOURCES:
        raise InputError(f"overlap must be one of {OVERLAP_SOURCES}, not {overlap!r}")
    molecule = _as_molecule(mol_or_molecule)
    validate(molecule, trained.config.basis)
    if molecule.spin != 0:
        raise InputError("only closed-shell molecules (spin 0) are supported")
    n_occupied = molecule.n_electrons // 2
    inputs = make_inputs(trained.config, molecule.atomic_numbers, molecule.positions)
    outside = tuple(trained.extrapolation_warnings(molecule.atomic_numbers, molecule.positions))
    ao_atom = np.asarray(inputs.ao_atom)
    charges = np.asarray(molecule.atomic_numbers, np.float64)
    with runs.precision(trained.train_config.float64):
        dtype = trained.dtype
        inputs = MoleculeInputs(**{k: (jnp.asarray(v, dtype) if np.asarray(v).dtype == np.float64 else jnp.asarray(v))
                                   for k, v in vars(inputs).items()})
        energy = forces = None
        if trained.config.core_hamiltonian:
            energy, forces, matrices = trained.energy_and_forces(inputs, n_occupied)
        else:
            matrices = trained.apply(trained.params, inputs)
        fock, core = matrices["fock"], matrices.get("core_hamiltonian")
        s = trained.exact_overlap(inputs) if overlap == "exact" else matrices["overlap"]
        eps, coefficients = observables.roothaan(fock, s)
        density = observables.density_matrix(coefficients, n_occupied)
        mulliken = observables.mulliken_charges(density, s, ao_atom, jnp.asarray(charges, dtype))
        dip = observables.dipole_moment(density, jnp.asarray(observables.dipole_integrals(to_pyscf(molecule, trained.config.basis)), dtype),
                                        jnp.asarray(charges, dtype), inputs.positions)
        as_np = lambda x: np.asarray(x, np.float64)  # noqa: E731
        smallest = float(np.linalg.eigvalsh(as_np(s))[0])
        said = _warnings(outside, overlap, smallest)
        for message in said:
            warnings.warn(message, PredictionWarning, stacklevel=2)
        return Prediction(
            molecule=molecule, basis=trained.config.basis, fock=as_np(fock), overlap=as_np(s), overlap_source=overlap,
            predicted_overlap=as_np(matrices["overlap"]), core_hamiltonian=None if core is None else as_np(core),
            orbital_energies=as_np(eps), coefficients=as_np(coefficients), density_matrix=as_np(density),
            n_occupied=n_occupied, homo_lumo_gap=float(observables.homo_lumo_gap(eps, n_occupied)),
            mulliken_charges=as_np(mulliken), dipole=as_np(dip), energy=energy, forces=forces,
            outside_training=outside, smallest_overlap_eigenvalue=smallest, warnings=said,
        )


_PER_GEOMETRY_FIELDS = ("fock", "overlap", "predicted_overlap", "orbital_energies", "coefficients", "density_matrix",
                        "homo_lumo_gap", "mulliken_charges", "dipole")


def save_predictions(path: str, predictions: list[Prediction]) -> None:
    """Write predictions of geometries of one molecule to an ``.npz`` file, stacked over geometries.

    Arrays (n geometries, M AOs, N atoms): fock, overlap (the S used), predicted_overlap,
    density_matrix, coefficients (n, M, M);
    orbital_energies (n, M); homo_lumo_gap (n,); mulliken_charges (n, N); dipole (n, 3);
    positions (n, N, 3); atomic_numbers (N,); with an H_core head also core_hamiltonian,
    energy (n,), forces (n, N, 3). Hartree and bohr, AOs in pyscf's order. Written to a
    temporary name and renamed, so the file is either complete or absent.
    """
    fields = list(_PER_GEOMETRY_FIELDS)
    if all(p.energy is not None for p in predictions):
        fields += ["core_hamiltonian", "energy", "forces"]
    arrays = {name: np.stack([np.asarray(getattr(p, name), np.float64) for p in predictions]) for name in fields}
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **arrays, atomic_numbers=predictions[0].molecule.atomic_numbers,
             positions=np.stack([p.molecule.positions for p in predictions]), basis=predictions[0].basis,
             overlap_source=predictions[0].overlap_source,
             units="hartree, bohr, e; AOs in pyscf order")
    os.replace(tmp, path)


def summary_line(prediction: Prediction) -> str:
    """HOMO-LUMO gap, dipole and (if predicted) energy of one prediction, in common units."""
    from pyscf.data.nist import AU2DEBYE, HARTREE2EV

    text = (f"gap {prediction.homo_lumo_gap * HARTREE2EV:.3f} eV, "
            f"dipole {np.linalg.norm(prediction.dipole) * AU2DEBYE:.3f} D")
    if prediction.energy is not None:
        text += f", energy {prediction.energy:.6f} Ha, max |force| {np.abs(prediction.forces).max():.4f} Ha/bohr"
    return text
