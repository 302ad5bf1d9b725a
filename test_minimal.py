"""Tests for neurogen-minimal: identity and oracle tests of each component, end-to-end --quick runs, bad input.

Run: python -m pytest -q   (under 5 minutes on 2 CPU cores)
"""
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ["ldns_minimal.py", "gnocchi_minimal.py", "spikegan_minimal.py"]
PRESENT = [f for f in MODEL_FILES if os.path.exists(os.path.join(ROOT, f))]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def run_cli(args, cwd, timeout=120):
    """Run `python <args>` in cwd with the repo on PYTHONPATH; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# -----------------------------------------------------------------------------
# Foundation: every present model file imports cleanly, has --help, rejects bad CLI values
# -----------------------------------------------------------------------------
@pytest.mark.parametrize("fname", PRESENT)
def test_import_has_no_side_effects(fname, tmp_path):
    mod = fname[:-3]
    r = run_cli(["-c", f"import {mod}; assert callable({mod}.main)"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == [], "import created files"


@pytest.mark.parametrize("fname", PRESENT)
def test_help_lists_the_shared_flags(fname, tmp_path):
    r = run_cli([os.path.join(ROOT, fname), "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for flag in ("--demo", "--quick", "--out", "--seed", "--device", "--data", "--threads"):
        assert flag in r.stdout, f"{fname} --help lacks {flag}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fname", PRESENT)
def test_bad_cli_values_exit_2(fname, capsys):
    mod = importlib.import_module(fname[:-3])
    bad = [["--demo", "no-such-demo"], ["--device", "tpu"]]
    bad += [["--" + name.replace("_", "-"), "-1"] for name in mod.POSITIVE_FIELDS]
    assert len(bad) > 2, "POSITIVE_FIELDS should list the step/size fields"
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert "error" in err and argv[0] in err, (argv, err)
