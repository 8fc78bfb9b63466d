"""Another revision of this project, checked out beside this one, for benchmarks that compare
the two in one run."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def checkout(revision: str):
    """A temporary ``git worktree`` of ``revision`` (run it with the same virtual environment,
    its packages first on PYTHONPATH); yields (its directory, the full commit hash). Removed
    afterwards."""
    work = tempfile.mkdtemp(prefix="revision_")
    tree = os.path.join(work, "tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, revision], check=True,
                   capture_output=True)
    try:
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], check=True, capture_output=True,
                                text=True).stdout.strip()
        yield tree, commit
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def run_python(tree: str, args: list[str], **env: str) -> str:
    """``python ARGS`` (this interpreter) run from ``tree`` with its packages first on PYTHONPATH
    and ``env`` added to the environment; returns its stdout. A failure raises RuntimeError
    with the end of its stderr."""
    done = subprocess.run([sys.executable, *args], cwd=tree, env={**os.environ, "PYTHONPATH": tree, **env},
                          capture_output=True, text=True)
    if done.returncode != 0:
        what = " ".join(args[:2]) if args[0] == "-m" else args[0]  # not a -c program's text
        raise RuntimeError(f"python {what} ... failed in {tree}:\n{done.stderr[-3000:]}")
    return done.stdout
