"""One call from a molecule and a trained PhiSNet model to everything derived from F and S.

    from phisnet_jax.evaluate import load_trained_model
    from phisnet_jax.prediction import predict
    p = predict(load_trained_model("runs/water"), mol)      # a pyscf Mole or a Molecule
    p.orbital_energies, p.density_matrix, p.dipole, p.energy, p.forces

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
      fock, overlap: (M, M); core_hamiltonian: (M, M) or None (model without H_core head).
      orbital_energies: (M,) hartree; coefficients: (M, M), columns, S-orthonormal.
      density_matrix: (M, M) closed-shell 2 C_occ C_occ^T; n_occupied: doubly occupied orbitals.
      homo_lumo_gap: hartree; mulliken_charges: (n,) e; dipole: (3,) e bohr about the origin.
      energy: hartree and forces: (n, 3) hartree/bohr, only with an H_core head (else None).
      outside_training: the atom pairs outside the model's training data (element pairs never
        seen, distances outside the training range), where the prediction extrapolates.
      smallest_overlap_eigenvalue: of the predicted S; below ``observables.
        DEFAULT_MIN_OVERLAP_EIGENVALUE`` the eigen-solve clamps it and S is not a valid overlap.
      warnings: one line for each reason not to trust the prediction as it is (the two above);
        empty if none. ``predict`` also raises each as a :class:`PredictionWarning`.
    """

    molecule: Molecule
    basis: str
    fock: np.ndarray
    overlap: np.ndarray
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


def _warnings(outside: tuple[str, ...], smallest_overlap_eigenvalue: float) -> tuple[str, ...]:
    said = []
    if outside:
        more = f" (and {len(outside) - 1} more pairs)" if len(outside) > 1 else ""
        said.append(f"the geometry is outside the training data: {outside[0]}{more}")
    if smallest_overlap_eigenvalue < observables.DEFAULT_MIN_OVERLAP_EIGENVALUE:
        said.append(f"the predicted overlap matrix is not positive definite (smallest eigenvalue "
                    f"{smallest_overlap_eigenvalue:.3g}): orbitals and everything derived from them are unreliable")
    return tuple(said)


def _as_molecule(mol_or_molecule) -> Molecule:
    if isinstance(mol_or_molecule, Molecule):
        return mol_or_molecule
    mol = mol_or_molecule  # a pyscf Mole
    return Molecule(np.asarray(mol.atom_charges()), np.asarray(mol.atom_coords(unit="Bohr")),
                    int(mol.charge), int(mol.spin))


def predict(trained: TrainedModel, mol_or_molecule) -> Prediction:
    """Predict F, S (and H_core) for a molecule and derive the observables. A geometry outside
    the training data, or a predicted S that is not positive definite, is said in
    ``Prediction.warnings`` and as a :class:`PredictionWarning`."""
    from molfoundation.molecules import to_pyscf

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
        matrices = trained.apply(trained.params, inputs)
        fock, overlap = matrices["fock"], matrices["overlap"]
        eps, coefficients = observables.roothaan(fock, overlap)
        density = observables.density_matrix(coefficients, n_occupied)
        mulliken = observables.mulliken_charges(density, overlap, ao_atom, jnp.asarray(charges, dtype))
        dip = observables.dipole_moment(density, jnp.asarray(observables.dipole_integrals(to_pyscf(molecule, trained.config.basis)), dtype),
                                        jnp.asarray(charges, dtype), inputs.positions)
        energy = forces = None
        core = matrices.get("core_hamiltonian")
        if core is not None:
            e, grad = trained.energy_and_gradient(trained.params, inputs, jnp.asarray(charges, dtype), n_occupied)
            energy, forces = float(e), -np.asarray(grad, np.float64)
        as_np = lambda x: np.asarray(x, np.float64)  # noqa: E731
        smallest = float(np.linalg.eigvalsh(as_np(overlap))[0])
        said = _warnings(outside, smallest)
        for message in said:
            warnings.warn(message, PredictionWarning, stacklevel=2)
        return Prediction(
            molecule=molecule, basis=trained.config.basis, fock=as_np(fock), overlap=as_np(overlap),
            core_hamiltonian=None if core is None else as_np(core), orbital_energies=as_np(eps),
            coefficients=as_np(coefficients), density_matrix=as_np(density), n_occupied=n_occupied,
            homo_lumo_gap=float(observables.homo_lumo_gap(eps, n_occupied)),
            mulliken_charges=as_np(mulliken), dipole=as_np(dip), energy=energy, forces=forces,
            outside_training=outside, smallest_overlap_eigenvalue=smallest, warnings=said,
        )


_PER_GEOMETRY_FIELDS = ("fock", "overlap", "orbital_energies", "coefficients", "density_matrix",
                        "homo_lumo_gap", "mulliken_charges", "dipole")


def save_predictions(path: str, predictions: list[Prediction]) -> None:
    """Write predictions of geometries of one molecule to an ``.npz`` file, stacked over geometries.

    Arrays (n geometries, M AOs, N atoms): fock, overlap, density_matrix, coefficients (n, M, M);
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
