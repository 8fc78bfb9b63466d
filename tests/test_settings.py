"""Typed ``--set KEY=VALUE`` settings (molfoundation.settings) and the shared command-line
plumbing (molfoundation.cli), on small dataclasses, the real configurations and both command
lines. Nothing here trains or runs Hartree-Fock: bad settings must fail before either."""

from __future__ import annotations  # string annotations, as in the project's config modules

import dataclasses

import click
import pytest
from conftest import run_phisnet_cli, run_vmc_cli

from molfoundation import cli as plumbing
from molfoundation.errors import InputError
from molfoundation.settings import (
    apply_settings, parse_assignments, parse_settings, setting_keys, split_settings,
)


@dataclasses.dataclass(frozen=True)
class Sampling:
    n_walkers: int = 16
    step_size: float = 0.2
    float64: bool = False
    optimizer: str = "kfac"
    seed: int | None = None
    clip: float | None = 5.0
    threshold: int | float = 4
    widths: tuple[int, ...] = (8, 8)
    names: tuple[str, ...] = ("a",)
    pair: tuple[int, float] = (1, 0.5)
    label: str | None = "boys"

    def __post_init__(self):
        if self.n_walkers < 2:
            raise ValueError("n_walkers must be\n at least 2")


@dataclasses.dataclass(frozen=True)
class Slots:
    channels: tuple[int, ...] = (2, 1)


@dataclasses.dataclass(frozen=True)
class Network:
    width: int = 32
    slots: Slots = Slots()  # a dataclass inside a section: no text form
    activation: object = None  # no text form either
    seed: int = 0

    def __post_init__(self):
        if self.width < 1:
            raise InputError("width must be positive")


@dataclasses.dataclass(frozen=True)
class Optimiser:
    learning_rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class Adam:
    learning_rate: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Run:
    sampling: Sampling = Sampling()
    network: Network = Network()
    kfac: Optimiser = Optimiser()
    adam: Adam = Adam()
    init_from: str | None = None


# --- parsing by the declared type ---------------------------------------------------------

@pytest.mark.parametrize("key, text, expected", [
    ("n_walkers", "64", 64),
    ("n_walkers", " 32 ", 32),
    ("step_size", "-3", -3.0),
    ("step_size", "0.05", 0.05),
    ("step_size", "1e-3", 1e-3),
    ("step_size", "2", 2.0),
    ("float64", "true", True), ("float64", "False", False), ("float64", "YES", True),
    ("float64", "no", False), ("float64", "1", True), ("float64", "0", False),
    ("optimizer", "adam", "adam"),
    ("optimizer", "a=b", "a=b"),
    ("seed", "2", 2),  # int | None with a None default: an int, not 2.0
    ("seed", "none", None), ("seed", "NULL", None),
    ("clip", "none", None), ("clip", "3", 3.0),
    ("threshold", "2", 2), ("threshold", "2.5", 2.5),  # int | float: the int where it is one
    ("widths", "16,32, 64", (16, 32, 64)), ("widths", "4", (4,)), ("widths", "", ()),
    ("names", "x,y", ("x", "y")),
    ("pair", "3,0.25", (3, 0.25)),
    ("label", "none", None), ("label", "pipek", "pipek"),
])
def test_values_are_parsed_by_the_annotation(key, text, expected):
    value = parse_settings(Sampling, {key: text})[key]
    assert value == expected and type(value) is type(expected)
    assert getattr(apply_settings(Sampling(), [f"{key}={text}"]), key) == expected


@pytest.mark.parametrize("key, text, expected", [
    ("n_walkers", "2.5", "expected int"),
    ("n_walkers", "abc", "expected int"),
    ("n_walkers", "none", "expected int"),
    ("step_size", "fast", "expected float"),
    ("float64", "maybe", "expected bool (true/false)"),
    ("seed", "1.5", "expected int or none"),
    ("threshold", "x", "expected int or float"),
    ("widths", "1,a", "expected comma-separated int values"),
    ("pair", "1,2,3", "expected 2 comma-separated values (int, float)"),
])
def test_a_bad_value_names_the_key_and_the_type(key, text, expected):
    with pytest.raises(InputError) as info:
        apply_settings(Sampling(), [f"{key}={text}"])
    message = str(info.value)
    assert message == f"invalid value {text!r} for {key}: {expected}" and "\n" not in message


def test_parse_assignments():
    assert parse_assignments(["a=1", " b = x=y ", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    for bad, message in [(["a"], "KEY=VALUE"), (["=1"], "KEY=VALUE"), (["a=1", "a=2"], "given twice")]:
        with pytest.raises(InputError, match=message):
            parse_assignments(bad)


# --- flat and sectioned configurations ----------------------------------------------------

def test_flat_configuration():
    config = apply_settings(Sampling(), {"n_walkers": "32", "widths": "1,2"})
    assert config == Sampling(n_walkers=32, widths=(1, 2))
    assert apply_settings(Sampling(), []) == Sampling()


def test_sections_by_dotted_and_bare_keys():
    config = apply_settings(Run(), ["n_walkers=64", "kfac.learning_rate=0.05", "width=8",
                                    "network.seed=3", "init_from=base"])
    assert config.sampling.n_walkers == 64 and config.kfac.learning_rate == 0.05
    assert config.network.width == 8 and config.network.seed == 3 and config.init_from == "base"
    assert config.adam == Adam() and config.network.slots == Slots()


@pytest.mark.parametrize("item, pieces", [
    ("learning_rate=1", ["ambiguous", "kfac.learning_rate", "adam.learning_rate"]),
    ("seed=1", ["ambiguous", "sampling.seed", "network.seed"]),
    ("nonsense=1", ["unknown setting 'nonsense'", "valid keys:", "sampling.n_walkers", "init_from"]),
    ("n_walker=1", ["did you mean n_walkers?"]),
    ("kfac.damping=1", ["unknown setting 'kfac.damping'", "kfac.learning_rate"]),
    ("foo.n_walkers=1", ["unknown setting 'foo.n_walkers'"]),
    ("kfac=1", ["kfac is a section", "kfac.FIELD=VALUE"]),
    ("slots=2,1", ["network.slots cannot be set from text", "Slots"]),
    ("network.slots=2,1", ["network.slots cannot be set from text"]),
    ("activation=relu", ["network.activation cannot be set from text"]),
])
def test_key_errors_are_one_line_and_name_the_keys(item, pieces):
    with pytest.raises(InputError) as info:
        apply_settings(Run(), [item])
    message = str(info.value)
    assert "\n" not in message and all(p in message for p in pieces), message


def test_fields_without_a_text_form_are_not_offered():
    keys = setting_keys(Run)
    assert "network.width" in keys and "sampling.widths" in keys and "init_from" in keys
    assert not any("slots" in k or "activation" in k for k in keys)


def test_one_field_set_twice_is_an_error():
    with pytest.raises(InputError, match="set the same field sampling.n_walkers"):
        apply_settings(Run(), ["n_walkers=4", "sampling.n_walkers=8"])


def test_post_init_validation_becomes_a_one_line_input_error():
    for item, text in [("n_walkers=1", "invalid setting n_walkers=1: n_walkers must be at least 2"),
                       ("width=0", "invalid setting width=0: width must be positive")]:
        with pytest.raises(InputError) as info:
            apply_settings(Run(), [item, "kfac.learning_rate=0.5"])
        assert str(info.value) == text


def test_split_settings_among_several_configurations():
    network, optimiser = split_settings(["width=8", "learning_rate=0.5", "seed=2"], Network, Optimiser)
    assert network == {"width": "8", "seed": "2"} and optimiser == {"learning_rate": "0.5"}


def test_split_settings_errors():
    with pytest.raises(InputError, match="valid keys: learning_rate, channels$"):
        split_settings(["depth=2"], Optimiser, Slots)
    with pytest.raises(InputError, match="ambiguous: Optimiser and Adam both have it"):
        split_settings(["learning_rate=2"], Optimiser, Adam)


# --- the real configurations --------------------------------------------------------------

def test_vmc_run_configuration():
    from vmc.config import SystemsConfig, preset_config

    config = preset_config("tiny", SystemsConfig("H2"))
    changed = apply_settings(config, ["spin=2", "localization=none", "jastrow=false", "kfac.learning_rate=0.05",
                                      "checkpoint_every=3", "schedule=round_robin", "systems.seed=4",
                                      "folx_sparsity=0"])
    assert changed.systems.spin == 2 and type(changed.systems.spin) is int
    assert changed.systems.localization is None and changed.systems.seed == 4
    assert changed.ansatz.jastrow is False and changed.kfac.learning_rate == 0.05
    assert changed.vmc.checkpoint_every == 3 and changed.schedule.schedule == "round_robin"
    assert changed.ansatz.slots == config.ansatz.slots and changed.vmc.folx_sparsity == 0
    for item, message in [("slots=2,1", "ansatz.slots cannot be set from text"),
                          ("seed=1", "ambiguous; write one of systems.seed, vmc.seed"),
                          ("vmc.optimizer=sgd", "invalid setting vmc.optimizer=sgd: unknown optimizer 'sgd'"),
                          ("schedule.schedule=random", "invalid setting schedule.schedule=random: unknown schedule"),
                          ("folx_sparsity=-1", "folx_sparsity must be at least 0, got -1")]:
        with pytest.raises(InputError, match=message):
            apply_settings(config, [item])


def test_phisnet_configurations():
    from phisnet_jax.model import MODEL_PRESETS, PhiSNetConfig
    from phisnet_jax.train import TrainConfig

    model, train = split_settings(["elements=1,8", "core_hamiltonian=yes", "learning_rate=1e-4"],
                                  PhiSNetConfig, TrainConfig)
    config = apply_settings(PhiSNetConfig(**MODEL_PRESETS["tiny"]), model)
    assert config.elements == (1, 8) and config.core_hamiltonian is True and config.features == 8
    assert apply_settings(TrainConfig(), train).learning_rate == 1e-4


# --- the command lines --------------------------------------------------------------------

def test_vmc_cli_rejects_a_bad_value_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_vmc_cli(["train", "H2", "--run-dir", str(run_dir), "--preset", "tiny",
                                  "--steps", "1", "--set", "spin=abc"], capsys)
    assert code == plumbing.EXIT_BAD_INPUT and out == ""
    assert err == "error: invalid value 'abc' for spin: expected int or none\n"
    assert not run_dir.exists()


@pytest.mark.parametrize("command, setting, message", [
    ("train", "nonsense=1", "unknown setting 'nonsense'"),
    ("train", "learning_rate=0.1", "ambiguous; write one of kfac.learning_rate, adam.learning_rate"),
    ("train", "n_walkers=2.5", "invalid value '2.5' for n_walkers: expected int"),
    ("train", "slots=2,1", "ansatz.slots cannot be set from text"),
    ("pretrain", "geometries_per_step=x", "invalid value 'x' for geometries_per_step: expected int"),
    ("pretrain", "kfac.nonsense=1", "unknown setting 'kfac.nonsense'"),
])
def test_vmc_cli_setting_errors(tmp_path, capsys, command, setting, message):
    run_dir = tmp_path / "run"
    code, _, err = run_vmc_cli([command, "H2", "--run-dir", str(run_dir), "--preset", "tiny",
                                "--steps", "1", "--set", setting], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not run_dir.exists()


@pytest.mark.parametrize("setting, message", [
    ("nonsense=1", "unknown setting 'nonsense'; valid keys: elements, basis, features"),
    ("learning_rate=fast", "invalid value 'fast' for learning_rate: expected float"),
    ("validate_every=2.5", "invalid value '2.5' for validate_every: expected int"),
    ("features", "--set expects KEY=VALUE"),
])
def test_phisnet_cli_setting_errors(tmp_path, capsys, setting, message):
    # The dataset does not exist: the settings are checked before it is opened.
    run_dir = tmp_path / "run"
    code, _, err = run_phisnet_cli(["train", str(tmp_path / "missing.h5"), "--run-dir", str(run_dir),
                                    "--steps", "1", "--set", setting], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not run_dir.exists()


def test_cli_presets_are_the_libraries():
    from phisnet_jax import cli as phisnet_cli
    from phisnet_jax.model import MODEL_PRESETS
    from vmc import cli as vmc_cli
    from vmc.config import PRESET_NAMES

    def choices(command):
        return sorted(next(p for p in command.params if p.name == "preset").type.choices)

    assert choices(phisnet_cli.phisnet.commands["train"]) == sorted(MODEL_PRESETS)
    for name in ("train", "pretrain"):
        assert choices(vmc_cli.vmc.commands[name]) == sorted(PRESET_NAMES)


def test_run_cli_error_contract(capsys):
    @click.group()
    def group():
        pass

    @group.command()
    @click.argument("what")
    def fail(what):
        if what == "input":
            raise InputError("bad\n input")
        if what == "interrupt":
            raise KeyboardInterrupt

    for args, code, err in [(["fail", "input"], 2, "error: bad input\n"),
                            (["fail", "interrupt"], 130, "interrupted; re-run the same command to continue\n"),
                            (["fail", "x", "y"], 2, "error: Got unexpected extra argument (y)\n"),
                            (["fail", "ok"], 0, "")]:
        with pytest.raises(SystemExit) as info:
            plumbing.run_cli(group, args)
        # click itself ends the line of a ^C echoed by the terminal before the message
        assert info.value.code == code and capsys.readouterr().err.lstrip("\n") == err
