"""Every model shipped with the package loads by name and reproduces its card's check metrics
on the held-out samples shipped with it."""

import numpy as np
import pytest

from phisnet_jax import shipped
from phisnet_jax.evaluate import accuracy, load_trained_model
from vmc import shipped as vmc_shipped

# The shipped VMC model computes in float32. On hchains-base, the same values in float64 differ
# from the float32 ones by up to 6.5e-7 in log|psi| and 3.6e-6 Ha in a local energy, and a fresh
# float32 load from the stored ones by 1.5e-6 in both: the bounds leave room for another
# machine's rounding, an order of magnitude beyond, and catch any change of the function.
TOL_LOG_PSI, TOL_LOCAL_ENERGY = 2e-5, 1e-4


@pytest.mark.parametrize("name", shipped.MODELS.names())
def test_shipped_model_reproduces_its_card(name):
    record = shipped.MODELS.read_record(name)
    expected = record["card"]["check_metrics"]
    trained = load_trained_model(name)
    assert trained.step == record["step"]
    measured = accuracy(trained, shipped.check_data(name))
    assert measured["samples"] == expected["samples"]
    # float32 predictions: the same model on another machine may round differently (observed
    # agreement of the metrics between runs on one machine: exact).
    for key in ("fock_mae_uha", "overlap_mae", "orbital_energy_mae_uha", "orbital_cosine_similarity"):
        assert measured[key] == pytest.approx(expected[key], rel=1e-3), key


@pytest.mark.parametrize("name", shipped.MODELS.names())
def test_shipped_model_is_a_better_pyscf_guess_than_minao(name):
    """On the shipped held-out geometries, at the level of theory the model was trained on: the
    SCF started by ``use_predicted_guess`` converges to minao's energy in fewer iterations."""
    import dataclasses

    from molfoundation.molecules import Molecule, to_pyscf
    from phisnet_jax.reference import make_scf
    from phisnet_jax.scf_guess import use_predicted_guess

    trained = load_trained_model(name)
    level = dataclasses.replace(shipped.level_of_theory(name), conv_tol=1e-9)
    data = shipped.check_data(name)
    iterations = {"predicted": [], "minao": []}
    for i in range(len(data)):
        real = np.asarray(data.inputs.atom_mask[i])
        z = np.asarray(trained.config.elements)[np.asarray(data.inputs.element_index[i])[real]]
        mol = to_pyscf(Molecule(z, np.asarray(data.inputs.positions[i])[real]), level.basis)
        reference = make_scf(mol, level)
        reference.kernel()
        guessed = use_predicted_guess(make_scf(mol, level), trained)
        guessed.kernel()
        assert guessed.converged and abs(guessed.e_tot - reference.e_tot) < 1e-7
        iterations["minao"].append(reference.cycles)
        iterations["predicted"].append(guessed.cycles)
    assert np.mean(iterations["predicted"]) < np.mean(iterations["minao"]), iterations


@pytest.mark.parametrize("name", vmc_shipped.MODELS.names())
def test_shipped_vmc_model_reproduces_its_check_values(name):
    """log|psi| and the local energies at the electron configurations stored with the model, as
    a fresh load of its parameters computes them, within the float32 bounds above."""
    from vmc.evaluate import load_model

    record = vmc_shipped.MODELS.read_record(name)
    config = vmc_shipped.load_config(name)
    network, params, origin = load_model(name)
    assert network == config.ansatz and origin == f"shipped model {name} (vmc step {record['step']})"
    system = next(s for s in vmc_shipped.load_systems(name) if s.name == record["card"]["check"]["system"])
    stored = vmc_shipped.MODELS.read_arrays(name, vmc_shipped.CHECK_FILE)
    log_psi, energies = vmc_shipped.check_values(config, params, system, stored["walkers"])
    np.testing.assert_allclose(log_psi, stored["log_psi"], rtol=0, atol=TOL_LOG_PSI)
    np.testing.assert_allclose(energies, stored["local_energy"], rtol=0, atol=TOL_LOCAL_ENERGY)
    assert energies.mean() == pytest.approx(record["card"]["check"]["mean_local_energy"], abs=TOL_LOCAL_ENERGY)
