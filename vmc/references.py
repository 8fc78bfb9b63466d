"""Exact (non-relativistic, Born-Oppenheimer) total energies of a few named systems, hartree,
for comparison in logs, plots and benchmarks. Values are from the literature; each applies
only at the geometry of :func:`vmc.systems.from_name` (checked)."""

from __future__ import annotations

import numpy as np

from vmc import systems

# name -> (energy in hartree, source)
EXACT_ENERGIES = {
    "H": (-0.5, "exact"),
    "H2": (-1.1744757, "Kolos and Wolniewicz (1968), R = 1.4 bohr"),
    "LiH": (-8.070548, "exact value quoted by Pfau et al. (2020), R = 3.015 bohr"),
    "Li": (-7.4780603, "Puchalski and Pachucki (2008)"),
    "Be": (-14.667356, "Pachucki and Komasa (2004)"),
}


def exact_energy(system: systems.System) -> float | None:
    """The exact energy of ``system`` if it is one of the named reference systems (same atoms,
    positions within 1e-6 bohr, charge and spin), else None."""
    entry = EXACT_ENERGIES.get(system.name)
    if entry is None:
        return None
    named = systems.from_name(system.name)
    same = (
        np.array_equal(named.atomic_numbers, system.atomic_numbers)
        and np.allclose(named.positions, system.positions, atol=1e-6)
        and named.charge == system.charge
        and named.spin == system.spin
    )
    return entry[0] if same else None
