"""The ``phisnet`` command line.

Every sub-command has ``--help``; those that produce numbers take ``--json`` and then print one
JSON object on stdout. Bad input ends with a one-line ``error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
import sys

import click

from phisnet_jax.errors import InputError

EXIT_BAD_INPUT = 2


def run_cli(group: click.Group, argv: list[str] | None = None) -> None:
    """Run a click group with the project's error contract (shared by ``phisnet`` and ``vmc``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = group.main(args=argv or ["--help"], standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        _print_error(exc.format_message())
        code = EXIT_BAD_INPUT
    except InputError as exc:
        _print_error(str(exc))
        code = EXIT_BAD_INPUT
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted; re-run the same command to continue", file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


def _print_error(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)


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
    from phisnet_jax import generate as gen
    from phisnet_jax import molecules as mols
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


def main(argv: list[str] | None = None) -> None:
    run_cli(phisnet, argv)
