"""The ``phisnet`` command line.

Every sub-command has ``--help``; those that produce numbers take ``--json`` and then print one
JSON object on stdout. Bad input ends with a one-line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import warnings

import click

from molfoundation.cli import checkpoint_option, print_error, process_group_options, run_cli, settings_option
from molfoundation.errors import InputError
from molfoundation.settings import apply_settings, split_settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def phisnet():
    """PhiSNet in JAX: reference data, equivariant Hamiltonian models, and what follows."""


@phisnet.command()
@click.argument("molecule", required=False)
@click.option("--xyz", "xyz_path", type=str, help="XYZ / extended-XYZ file (angstrom). One frame: "
              "start geometry for thermal sampling; several frames: use the frames as they are.")
@click.option("--smiles", type=str, help="Build the start geometry from SMILES with RDKit.")
@click.option("--name", type=str, help="Group name in the output file (default: molecule name).")
@click.option("-n", "--samples", type=int, help="Geometries wanted in total "
              "[default: 100; all frames of a multi-frame XYZ].")
@click.option("--method", default="pbe", show_default=True, help="'hf' or a DFT functional.")
@click.option("--basis", default="def2-svp", show_default=True, help="pyscf basis-set name.")
@click.option("--temperature", default=500.0, show_default=True, help="Kelvin, for normal-mode sampling.")
@click.option("--quantum/--classical", default=False, show_default=True,
              help="Quantum harmonic (zero-point) or classical Boltzmann amplitudes.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Optimise the start geometry at the chosen level first.")
@click.option("--ccsd-t", is_flag=True, help="Also compute CCSD(T) energies and forces (small molecules).")
@click.option("--charge", default=0, show_default=True)
@click.option("--spin", default=0, show_default=True, help="2S = N_alpha - N_beta.")
@click.option("--seed", default=0, show_default=True, help="Seed of the geometry sampling.")
@click.option("-j", "--workers", default=1, show_default=True, help="Parallel worker processes.")
@click.option("-o", "--output", required=True, type=str, help="HDF5 file to create or extend.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout.")
def generate(molecule, xyz_path, smiles, name, samples, method, basis, temperature, quantum,
             optimize, ccsd_t, charge, spin, seed, workers, output, as_json):
    """Generate pyscf reference data (Fock, overlap, energies, forces) for a geometry ensemble.

    Give a MOLECULE name (water, ethanol, malondialdehyde, uracil, ...), --smiles or --xyz.
    Interrupted runs continue when the same command is run again.
    """
    from molfoundation import molecules as mols
    from phisnet_jax import generate as gen
    from phisnet_jax.reference import LevelOfTheory
    from phisnet_jax.sampling import TrajectoryEnsemble, thermal_ensemble

    given = [x for x in (molecule, xyz_path, smiles) if x]
    if len(given) != 1:
        raise InputError("give exactly one of MOLECULE, --xyz or --smiles")
    level = LevelOfTheory(method=method, basis=basis)
    level.check()

    trajectory = None
    if molecule:
        start = mols.from_name(molecule, charge, spin)
        origin, default_name = f"name:{molecule.lower()}", molecule.lower()
    elif smiles:
        start = mols.from_smiles(smiles, charge, spin)
        origin, default_name = f"smiles:{smiles}", "smiles_" + start.formula
    else:
        frames = mols.read_xyz(xyz_path, charge, spin)
        start = frames[0]
        origin = f"xyz:{os.path.basename(xyz_path)}"
        default_name = os.path.splitext(os.path.basename(xyz_path))[0]
        if len(frames) > 1:
            trajectory = tuple(frames)
            if any(f.atomic_numbers.tolist() != start.atomic_numbers.tolist() for f in frames):
                raise InputError(f"frames of {xyz_path} do not all have the same atoms in the same order")
            for f in frames:
                mols.validate(f, level.basis)
    mols.validate(start, level.basis)

    if trajectory is not None:
        source = f"{origin} trajectory"
        n_samples = samples if samples is not None else len(trajectory)
        make_ensemble = lambda: TrajectoryEnsemble(trajectory)  # noqa: E731
    else:
        source = (f"{origin} T={temperature:g}K seed={seed} {'quantum' if quantum else 'classical'}"
                  f"{'' if optimize else ' unoptimised'}")
        n_samples = samples if samples is not None else 100
        make_ensemble = lambda: thermal_ensemble(  # noqa: E731
            start, level, temperature, seed, quantum=quantum, optimize_first=optimize)

    request = gen.GenerationRequest(
        output=output, name=name or default_name, source=source, n_samples=n_samples,
        level=level, with_ccsd_t=ccsd_t, workers=workers,
    )
    gen.check_request(request)
    report = gen.generate(request, make_ensemble)
    if as_json:
        click.echo(json.dumps(report.to_dict()))


@phisnet.command()
@click.argument("path", type=str)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def inspect(path, as_json):
    """Summarise a reference dataset: level of theory, molecules, samples, energies."""
    from phisnet_jax.dataset import summarize

    summary = summarize(path)
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"{summary['path']}: {summary['method']}/{summary['basis']}, "
               f"units bohr/hartree, schema {summary['schema_version']}")
    click.echo(f"  AO order: {summary['ao_convention']}")
    versions = summary["created_with"]
    click.echo("  made with " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    for m in summary["molecules"]:
        ens = m["ensemble"]
        how = (f"normal modes at {ens['temperature_kelvin']:g} K, seed {ens['seed']}"
               if ens["kind"] == "normal_modes" else "trajectory frames")
        click.echo(f"  {m['name']} ({m['formula']}, {m['n_atoms']} atoms, {m['n_ao']} AOs): "
                   f"{m['n_converged']}/{m['n_samples']} converged, {how}"
                   f"{', with CCSD(T)' if m['has_ccsd_t'] else ''}")
        if m["energy_min"] is not None:
            click.echo(f"    energy {m['energy_min']:.6f} .. {m['energy_max']:.6f} Ha, "
                       f"{m['mean_scf_iterations']:.1f} SCF iterations on average")
        click.echo(f"    source: {m['source']}")


@phisnet.command()
@click.argument("dataset", required=False)
@click.option("--run-dir", required=True, help="Run directory (created, or resumed if it exists).")
@click.option("--molecule", "molecules_", multiple=True, help="Molecule group(s) to train on [default: all].")
@click.option("--train", "n_train", default=500, show_default=True, help="Training samples per molecule.")
@click.option("--valid", "n_valid", default=500, show_default=True, help="Validation samples per molecule.")
@click.option("--split-seed", default=42, show_default=True)
@click.option("--preset", type=click.Choice(["paper", "small", "tiny"]),
              help="Model size: the paper's configuration or smaller ones for CPU runs "
                   "(phisnet_jax.model.MODEL_PRESETS) [default: paper].")
@click.option("--max-order", type=int, help="Feature order [default: 2 x the largest shell l of the basis].")
@click.option("--batch-size", type=int, default=50, show_default=True)
@settings_option("Override any PhiSNetConfig or TrainConfig field, e.g. --set features=64, "
                 "--set energy_weight=1 --set energy_source=ccsd_t.")
@click.option("--init-from", "init_from", metavar="RUN_DIR",
              help="Fine-tune: start the new run from the EMA parameters of RUN_DIR's latest checkpoint "
                   "(its model configuration, a fresh optimiser; loss weights and learning rate via --set, "
                   "e.g. learning_rate=1e-5).")
@click.option("--steps", type=int, help="Stop at this total step count.")
@click.option("--time-budget", type=float, help="Stop after this many seconds of training.")
@click.option("--float64", is_flag=True, help="Train in float64.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@process_group_options
def train(dataset, run_dir, molecules_, n_train, n_valid, split_seed, preset, max_order, batch_size,
          settings, init_from, steps, time_budget, float64, as_json):
    """Train PhiSNet on a reference dataset (or resume the run in --run-dir).

    Without DATASET, the run in --run-dir continues with its stored configuration. A model with
    the core-Hamiltonian head (--set core_hamiltonian=true) also fits H_core, and with
    --set energy_weight=... / forces_weight=... energies and forces (energy_source=scf or ccsd_t).
    With --set lr_schedule=budget the learning rate falls linearly to min_learning_rate over
    --steps or --time-budget, instead of the paper's reduce-on-plateau.
    """
    from phisnet_jax import train as training
    from phisnet_jax.dataset import read_file_info, read_molecule
    from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig

    if steps is None and time_budget is None:
        raise InputError("give --steps or --time-budget (or both)")
    if dataset is None:
        model_cfg, train_cfg, data_cfg = training.load_run_config(run_dir)
    else:
        model_settings, train_settings = split_settings(settings, PhiSNetConfig, training.TrainConfig)
        train_cfg = apply_settings(training.TrainConfig(batch_size=batch_size, float64=float64), train_settings)
        info = read_file_info(dataset)
        names = list(molecules_) or list(info.molecules)
        if init_from:
            given = [f"--{k}" for k, v in (("preset", preset), ("max-order", max_order)) if v] + sorted(model_settings)
            if given:
                raise InputError(f"--init-from uses the model configuration of {init_from}; leave out {', '.join(given)}")
            model_cfg = training.load_run_config(init_from)[0]
        else:
            elements = sorted({int(z) for n in names for z in read_molecule(dataset, n, fields=()).atomic_numbers})
            model_cfg = PhiSNetConfig(elements=tuple(elements), basis=info.level.basis,
                                      **MODEL_PRESETS[preset or "paper"])
            model_cfg = dataclasses.replace(model_cfg, max_order=max_order or 2 * model_cfg.element_basis.max_l)
            model_cfg = apply_settings(model_cfg, model_settings)
        data_cfg = training.DataConfig(os.path.abspath(dataset), tuple(names), n_train, n_valid, split_seed)
    try:
        result = training.train(run_dir, model_cfg, train_cfg, data_cfg, max_steps=steps, time_budget=time_budget,
                                init_from=init_from)
    except training.TrainingDiverged as exc:
        print_error(str(exc))
        sys.exit(1)
    summary = dataclasses.asdict(result)
    summary["init_from"] = training.load_run_origin(run_dir)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"trained to step {result.steps} ({result.stopped_because}); "
                   f"best validation loss {result.best_valid:.4g}, learning rate {result.learning_rate:.2g}")


@phisnet.command()
@click.argument("run_dir")
@click.option("--dataset", help="Dataset to evaluate on [default: the run's training dataset; required for a "
              "shipped model].")
@click.option("--split", type=click.Choice(["train", "valid", "test", "all"]),
              help="The run's split of its molecules [default: test; all for a shipped model].")
@checkpoint_option()
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON on stdout.")
def evaluate(run_dir, dataset, split, checkpoint_step, as_json):
    """Accuracy of a trained model: MAE of F, S, occupied orbital energies, orbital similarity."""
    from phisnet_jax.evaluate import accuracy, load_trained_model, model_split

    trained = load_trained_model(run_dir, checkpoint_step)
    data, path, split = model_split(run_dir, trained.config, split, dataset)
    metrics = accuracy(trained, data)
    metrics.update({"run_dir": run_dir, "dataset": path, "split": split, "step": trained.step})
    if as_json:
        click.echo(json.dumps(metrics))
        return
    click.echo(f"{run_dir} (step {trained.step}) on {split} split of {path}, {metrics['samples']} samples:")
    click.echo(f"  MAE F    {metrics['fock_mae_uha']:10.2f} micro-hartree")
    click.echo(f"  MAE eps  {metrics['orbital_energy_mae_uha']:10.2f} micro-hartree (occupied)")
    click.echo(f"  MAE S    {metrics['overlap_mae']:10.2e}")
    click.echo(f"  psi      {metrics['orbital_cosine_similarity']:10.6f} (mean |cosine|, occupied)")


@phisnet.command()
@click.argument("run_dir")
@click.option("--xyz", "xyz_path", help="Geometry file (angstrom); every frame is predicted.")
@click.option("--dataset", help="Dataset to take geometries from (with --molecule).")
@click.option("--molecule", help="Molecule group in --dataset.")
@click.option("--index", "indices", type=int, multiple=True, help="Sample row(s) in the group [default: all].")
@click.option("-o", "--output", required=True, help="Output .npz file.")
@click.option("--cube", "cube_dir", metavar="DIR",
              help="Also write the density and the HOMO and LUMO of each geometry as cube files into DIR.")
@click.option("--overlap", "overlap_source", type=click.Choice(["exact", "predicted"]), default="exact",
              show_default=True, help="The overlap matrix S that orbitals, densities, charges and dipoles use: "
              "the exact integrals of the geometry or the model's prediction.")
@checkpoint_option()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def predict(run_dir, xyz_path, dataset, molecule, indices, output, cube_dir, overlap_source, checkpoint_step, as_json):
    """Predict F and S (pyscf AO order) for geometries and everything derived from them.

    The .npz holds, per geometry, F, the S used and the predicted S, orbital energies and coefficients, density matrix,
    HOMO-LUMO gap, Mulliken charges and dipole; with a core-Hamiltonian head also H_core, the
    energy and the forces (see phisnet_jax.prediction.save_predictions).
    """
    from molfoundation import molecules as mols
    from phisnet_jax import observables
    from phisnet_jax import prediction as predictions
    from phisnet_jax.evaluate import load_trained_model

    if bool(xyz_path) == bool(dataset):
        raise InputError("give either --xyz or --dataset with --molecule")
    if not output.endswith(".npz"):
        raise InputError("the output file must end in .npz")
    if dataset:
        from phisnet_jax.dataset import read_molecule

        if not molecule:
            raise InputError("--dataset needs --molecule")
        group = read_molecule(dataset, molecule, fields=("positions",))
        rows = list(indices) or list(range(group.n_samples))
        if any(r < 0 or r >= group.n_samples for r in rows):
            raise InputError(f"sample index out of range 0..{group.n_samples - 1}")
        geometries = [mols.Molecule(group.atomic_numbers, group.arrays["positions"][r]) for r in rows]
    else:
        geometries = mols.read_xyz(xyz_path)
    for g in geometries:
        mols.validate(g)
        if [int(z) for z in g.atomic_numbers] != [int(z) for z in geometries[0].atomic_numbers]:
            raise InputError("all geometries must have the same atoms in the same order")
    trained = load_trained_model(run_dir, checkpoint_step)
    trained.config.element_basis.index_of(geometries[0].atomic_numbers)  # elements the model knows

    with warnings.catch_warnings():  # said below with the geometry's number, from the predictions
        warnings.simplefilter("ignore", predictions.PredictionWarning)
        results = [predictions.predict(trained, g, overlap=overlap_source) for g in geometries]
    for k, p in enumerate(results):
        for message in p.warnings:
            print(f"warning: geometry {k}: {message}", file=sys.stderr)
    predictions.save_predictions(output, results)
    cube_files = []
    if cube_dir:
        os.makedirs(cube_dir, exist_ok=True)
        for k, p in enumerate(results):
            homo_lumo = [p.n_occupied - 1, p.n_occupied] if p.n_occupied < p.orbital_energies.size else [p.n_occupied - 1]
            cube_files += observables.write_cube_files(mols.to_pyscf(p.molecule, p.basis), p.density_matrix,
                                                       p.coefficients, homo_lumo, os.path.join(cube_dir, f"geometry{k}"))
    summary = {"output": output, "geometries": len(geometries), "n_ao": int(results[0].fock.shape[-1]),
               "basis": trained.config.basis, "model_step": trained.step,
               "geometries_outside_training_distances": sum(bool(p.outside_training) for p in results),
               "overlap": overlap_source,
               "smallest_overlap_eigenvalue": [p.smallest_overlap_eigenvalue for p in results],
               "homo_lumo_gap_hartree": [p.homo_lumo_gap for p in results],
               "dipole_au": [p.dipole.tolist() for p in results],
               "energy_hartree": [p.energy for p in results] if results[0].energy is not None else None,
               "cube_files": cube_files}
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(f"wrote {output}: {len(geometries)} geometries ({results[0].fock.shape[-1]} AOs, {trained.config.basis})"
               + (f" and {len(cube_files)} cube files in {cube_dir}" if cube_files else ""))
    shown = 10
    for k, p in enumerate(results[:shown]):
        click.echo(f"  geometry {k}: {predictions.summary_line(p)}")
    if len(results) > shown:
        click.echo(f"  ... {len(results) - shown} more in {output}")


@phisnet.command()
@click.argument("run_dir")
@click.argument("name")
@click.option("--made-by", required=True, help="The commands that made the run (data generation, training), for the card.")
@click.option("--samples", default=5, show_default=True, help="Held-out samples whose metrics the card records.")
@click.option("--directory", help="Where to write the model [default: the package's models directory].")
def export(run_dir, name, made_by, samples, directory):
    """Ship the latest EMA parameters of RUN_DIR as the model NAME (loadable by name, e.g.
    phisnet predict NAME --xyz ...), with a card of its data and metrics."""
    from phisnet_jax import shipped

    shelf = shipped.MODELS if directory is None else dataclasses.replace(shipped.MODELS, directory=directory)
    record = shipped.export(run_dir, name, made_by, samples, shelf)
    metrics = record["card"]["test_metrics"]
    click.echo(f"wrote {name}: step {record['step']}, test MAE F {metrics['fock_mae_uha']:.1f} uHa "
               f"over {metrics['samples']} samples")


@phisnet.command("scf-guess")
@click.argument("run_dir")
@click.option("--dataset", help="Dataset with the geometries [default: the run's dataset; for a shipped model, "
              "give it or --xyz].")
@click.option("--molecule", help="Molecule group [default: every molecule of the run, or of --dataset].")
@click.option("--split", type=click.Choice(["train", "valid", "test", "all"]),
              help="The run's split of its molecules [default: test; all for a shipped model].")
@click.option("--xyz", "xyz_path", help="Use the geometries of this file instead of a dataset.")
@click.option("-n", "--max-geometries", default=10, show_default=True)
@click.option("--overlap", "overlaps", type=click.Choice(["exact", "predicted"]), multiple=True,
              help="The S of the predicted density (repeat for both: guesses 'predicted' and 'predicted_S') "
              "[default: exact].")
@checkpoint_option()
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def scf_guess(run_dir, dataset, molecule, split, xyz_path, max_geometries, overlaps, checkpoint_step, as_json):
    """SCF iterations and time from the predicted density vs pyscf's guesses (minao, atom, huckel, 1e).

    SCF runs at the run's level of theory; converged energies must agree to 1e-8 hartree.
    """
    from phisnet_jax import scf_guess as guesses
    from phisnet_jax.evaluate import load_trained_model

    summary = guesses.compare_guesses(run_dir, trained=load_trained_model(run_dir, checkpoint_step), dataset=dataset,
                                      molecule=molecule, split=split,
                                      xyz_path=xyz_path, max_geometries=max_geometries,
                                      overlaps=overlaps or ("exact",))
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"SCF from each guess, {summary['geometries']} geometries, {summary['level_of_theory']}:")
        click.echo(f"  {'guess':10s} {'iterations':>10s} {'vs minao':>9s} {'seconds':>8s}")
        for name, row in summary["guesses"].items():
            click.echo(f"  {name:10s} {row['mean_iterations']:10.1f} {row.get('iterations_vs_minao', float('nan')):9.2f} "
                       f"{row['mean_seconds']:8.2f}")
        click.echo(f"  converged energies agree to {summary['max_energy_spread_hartree']:.1e} Ha"
                   f" ({'ok' if summary['energies_agree'] else 'MISMATCH'})")
    if not summary["energies_agree"]:
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    run_cli(phisnet, argv)
