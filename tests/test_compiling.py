"""The persistent compilation cache the command lines switch on (molfoundation.compiling)."""

import json
import os
import subprocess
import sys

import pytest

# Switches the cache on, compiles one function that counts as worth keeping, prints the directory.
PROGRAM = """
import json, jax
from molfoundation import compiling
directory = compiling.use_persistent_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.block_until_ready(jax.jit(lambda x: x * 3 + 1)(2.0))
print(json.dumps({"directory": directory, "config": jax.config.jax_compilation_cache_dir}))
"""


def run(env_changes: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("setting", ["jax", "xdg"])
def test_compiled_programs_are_written_where_the_environment_says(tmp_path, setting):
    if setting == "jax":
        expected = str(tmp_path / "chosen")
        out = run({"JAX_COMPILATION_CACHE_DIR": expected})
    else:
        expected = str(tmp_path / "xdg" / "molfoundation" / "jax")
        out = run({"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert out == {"directory": expected, "config": expected}
    assert any(name.startswith("jit_") for name in os.listdir(expected))


def test_an_empty_jax_setting_switches_the_cache_off(tmp_path):
    out = run({"JAX_COMPILATION_CACHE_DIR": "", "XDG_CACHE_HOME": str(tmp_path)})
    assert out["directory"] is None and not out["config"]
    assert not os.listdir(tmp_path)


def test_background_returns_the_value_or_raises_the_error_of_its_function():
    from molfoundation.compiling import Background

    def fail():
        raise ValueError("no stand-in")

    assert Background(lambda a, b: a + b, 2, 3).result() == 5
    with pytest.raises(ValueError, match="no stand-in"):
        Background(fail).result()
