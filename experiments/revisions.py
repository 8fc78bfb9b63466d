"""Another revision of this project, checked out beside this one, for benchmarks that compare
the two in one run."""

import contextlib
import os
import shutil
import subprocess
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
