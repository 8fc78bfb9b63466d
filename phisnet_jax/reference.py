"""Reference labels from pyscf: Fock/Kohn-Sham and overlap matrices, energies, forces.

One call, ``compute_labels``, runs the SCF for one geometry at one level of theory and returns
everything the models train on. All quantities are in hartree and bohr, AO matrices in pyscf's
AO order (see ``molfoundation.basis``).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from molfoundation.errors import InputError
from molfoundation.molecules import Molecule, to_pyscf


@dataclasses.dataclass(frozen=True)
class LevelOfTheory:
    """Method and basis of the reference data.

    Attributes:
      method: 'hf' for restricted Hartree-Fock, otherwise a pyscf/libxc functional (e.g. 'pbe').
      basis: a pyscf basis-set name (e.g. 'def2-svp').
      conv_tol: SCF energy convergence threshold (hartree). Tight, so that the Fock matrix is
        accurate far below the ~1e-5 hartree errors the models reach.
      conv_tol_grad: SCF orbital-gradient threshold.
      max_cycle: SCF iterations before a sample is flagged as unconverged.
      grid_level: pyscf DFT integration grid level (ignored for HF).
    """

    method: str = "pbe"
    basis: str = "def2-svp"
    conv_tol: float = 1e-11
    conv_tol_grad: float = 1e-7
    max_cycle: int = 100
    grid_level: int = 3

    def __post_init__(self):
        object.__setattr__(self, "method", self.method.lower())
        object.__setattr__(self, "basis", self.basis.lower())

    @property
    def is_hf(self) -> bool:
        return self.method == "hf"

    def check(self) -> None:
        """Raise ``InputError`` for an unknown method or basis-set name."""
        from pyscf.dft import libxc

        if not self.is_hf:
            try:
                libxc.parse_xc(self.method)
            except Exception:
                raise InputError(
                    f"unknown method {self.method!r}: use 'hf' or a functional such as 'pbe'"
                ) from None
        with warnings.catch_warnings():  # pyscf warns before raising for unknown names
            warnings.simplefilter("ignore")
            known = any(_basis_defines(self.basis, sym) for sym in ("H", "C", "O"))
        if not known:
            raise InputError(f"unknown basis set {self.basis!r}")


def _basis_defines(basis: str, symbol: str) -> bool:
    from pyscf import gto

    try:
        return bool(gto.basis.load(basis, symbol))
    except Exception:
        return False


def make_scf(mol, level: LevelOfTheory):
    """A configured (not yet run) restricted pyscf SCF object for a closed-shell ``Mole``."""
    from pyscf import dft, scf

    if mol.spin != 0:
        raise InputError(
            f"open-shell molecules (spin {mol.spin}) are not supported for Hamiltonian data; "
            "use a closed-shell charge state"
        )
    if level.is_hf:
        mf = scf.RHF(mol)
    else:
        mf = dft.RKS(mol)
        mf.xc = level.method
        mf.grids.level = level.grid_level
    mf.conv_tol = level.conv_tol
    mf.conv_tol_grad = level.conv_tol_grad
    mf.max_cycle = level.max_cycle
    mf.verbose = 0
    return mf


def run_scf(molecule: Molecule, level: LevelOfTheory, dm0: np.ndarray | None = None):
    """Run the SCF; returns the pyscf SCF object (check ``.converged``)."""
    mf = make_scf(to_pyscf(molecule, level.basis), level)
    mf.kernel(dm0=dm0)
    return mf


def scf_forces(mf) -> np.ndarray:
    """(n_atoms, 3) analytic forces (hartree/bohr) = minus the nuclear gradient."""
    grad = mf.nuc_grad_method()
    grad.verbose = 0
    return -np.asarray(grad.kernel())


LABEL_FIELDS = (
    "fock",
    "overlap",
    "core_hamiltonian",
    "density_matrix",
    "mo_energies",
    "mo_coefficients",
    "energy",
    "forces",
    "scf_iterations",
    "converged",
)
CCSD_T_FIELDS = ("ccsd_t_energy", "ccsd_t_forces")


def compute_labels(
    molecule: Molecule, level: LevelOfTheory, with_ccsd_t: bool = False
) -> dict[str, np.ndarray]:
    """All reference labels of one geometry.

    Returns a dict with (n_ao = number of AOs, n_atoms):
      fock, overlap, core_hamiltonian, density_matrix: (n_ao, n_ao) hartree / dimensionless;
        ``fock`` is the converged Fock (HF) or Kohn-Sham (DFT) matrix.
      mo_energies: (n_ao,) hartree; mo_coefficients: (n_ao, n_ao), columns are orbitals.
      energy: () total energy, hartree; forces: (n_atoms, 3) hartree/bohr.
      scf_iterations: () int; converged: () bool.
      with ``with_ccsd_t``: ccsd_t_energy () and ccsd_t_forces (n_atoms, 3), CCSD(T) on an RHF
        reference in the same basis (frozen core off).
    """
    mf = run_scf(molecule, level)
    dm = mf.make_rdm1()
    labels = {
        "fock": np.asarray(mf.get_fock(dm=dm)),
        "overlap": np.asarray(mf.get_ovlp()),
        "core_hamiltonian": np.asarray(mf.get_hcore()),
        "density_matrix": np.asarray(dm),
        "mo_energies": np.asarray(mf.mo_energy),
        "mo_coefficients": np.asarray(mf.mo_coeff),
        "energy": np.asarray(mf.e_tot),
        "forces": scf_forces(mf),
        "scf_iterations": np.asarray(int(getattr(mf, "cycles", -1)), dtype=np.int64),
        "converged": np.asarray(bool(mf.converged)),
    }
    if with_ccsd_t:
        hf = mf if level.is_hf else run_scf(molecule, dataclasses.replace(level, method="hf"))
        energy, forces, converged = ccsd_t_energy_forces(hf)
        labels["ccsd_t_energy"] = np.asarray(energy)
        labels["ccsd_t_forces"] = forces
        labels["converged"] = np.asarray(bool(labels["converged"]) and converged and hf.converged)
    return labels


def ccsd_t_energy_forces(hf) -> tuple[float, np.ndarray, bool]:
    """CCSD(T) total energy (hartree), analytic forces (hartree/bohr) and convergence flag."""
    from pyscf import cc
    from pyscf.cc import ccsd_t_lambda
    from pyscf.grad import ccsd_t as ccsd_t_grad

    mycc = cc.CCSD(hf)
    mycc.conv_tol = 1e-10
    mycc.verbose = 0
    mycc.kernel()
    eris = mycc.ao2mo()
    e_t = mycc.ccsd_t(eris=eris)
    # The gradient of the (T) energy needs the (T)-modified lambda amplitudes; pyscf's gradient
    # object would otherwise solve the plain CCSD lambda equations and return a wrong force.
    lambda_converged, l1, l2 = ccsd_t_lambda.kernel(mycc, eris, mycc.t1, mycc.t2, verbose=0)
    grad = ccsd_t_grad.Gradients(mycc)
    grad.verbose = 0
    gradient = grad.kernel(t1=mycc.t1, t2=mycc.t2, l1=l1, l2=l2, eris=eris)
    converged = bool(mycc.converged and lambda_converged)
    return float(hf.e_tot + mycc.e_corr + e_t), -np.asarray(gradient), converged
