"""Print the project's requirements, pyproject.toml's dependencies and its test extra, with the
pins of an override file in place of the same packages' pins: the install list of an
environment at another end of the supported range.

    python requirements/override.py requirements/oldest-jax.txt > requirements.txt
"""

import os
import re
import sys
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def name_of(requirement: str) -> str:
    """The normalised package name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def main(override_path: str) -> None:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(override_path) as f:
        overrides = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    replaced = {name_of(r): r for r in overrides}
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    unknown = set(replaced) - {name_of(r) for r in requirements}
    if unknown:
        sys.exit(f"{override_path}: not a requirement of the project: {', '.join(sorted(unknown))}")
    for requirement in requirements:
        print(replaced.get(name_of(requirement), requirement))


if __name__ == "__main__":
    main(sys.argv[1])
