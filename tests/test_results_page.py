"""The results page is what experiments/results_page.py writes from the result files: a result
added or changed without regenerating the page fails here."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_results_page_is_generated_from_the_result_files():
    script = os.path.join(ROOT, "experiments", "results_page.py")
    out = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_result_file_has_a_section():
    with open(os.path.join(ROOT, "experiments", "README.md")) as f:
        page = f.read()
    for name in os.listdir(os.path.join(ROOT, "experiments", "results")):
        if name.endswith(".json"):
            assert f"\n## {name[:-len('.json')]}\n" in page
