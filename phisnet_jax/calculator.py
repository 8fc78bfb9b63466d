"""A trained PhiSNet model with a core-Hamiltonian head as an ASE calculator (energy, forces).

    from ase.md.verlet import VelocityVerlet
    from phisnet_jax.calculator import PhiSNetCalculator
    atoms.calc = PhiSNetCalculator(load_trained_model("runs/water_energy"))
    VelocityVerlet(atoms, timestep=0.5 * ase.units.fs).run(100)

The energy is the model's (``train.make_energy_and_forces``: predicted F and H_core, exact S),
the forces its exact negative gradient, both in ASE's units (eV, eV/angstrom). A geometry
outside the model's training data is said with a :class:`~phisnet_jax.prediction.PredictionWarning`.
"""

from __future__ import annotations

import warnings

from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from molfoundation import runs
from molfoundation.errors import InputError
from molfoundation.molecules import Molecule, validate
from phisnet_jax.evaluate import TrainedModel
from phisnet_jax.model import make_inputs
from phisnet_jax.prediction import PredictionWarning
from phisnet_jax.train import cast_inputs


class PhiSNetCalculator(Calculator):
    """ASE calculator of a PhiSNet model with a core-Hamiltonian head, for closed-shell
    molecules of the model's elements; ``charge`` is the molecule's total charge."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, trained: TrainedModel, charge: int = 0, **kwargs):
        if not trained.config.core_hamiltonian:
            raise InputError("the model has no core-Hamiltonian head, so it has no energy or forces")
        super().__init__(**kwargs)
        self.trained = trained
        self.charge = int(charge)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        molecule = Molecule(self.atoms.get_atomic_numbers(), self.atoms.get_positions() / Bohr, self.charge)
        validate(molecule, self.trained.config.basis)  # spin 0: an odd electron count is an error
        for pair in self.trained.extrapolation_warnings(molecule.atomic_numbers, molecule.positions):
            warnings.warn(f"the geometry is outside the training data: {pair}", PredictionWarning, stacklevel=2)
        inputs = make_inputs(self.trained.config, molecule.atomic_numbers, molecule.positions)
        with runs.precision(self.trained.train_config.float64):
            energy, forces, _ = self.trained.energy_and_forces(cast_inputs(inputs, self.trained.dtype),
                                                               molecule.n_electrons // 2)
        self.results["energy"] = energy * Hartree
        self.results["forces"] = forces * (Hartree / Bohr)
