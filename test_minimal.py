"""Tests for neurogen-minimal. Run: python -m pytest -q (a few minutes on 2 CPU cores).

All three files (parametrised):
  import has no side effects; --help lists the shared flags; bad CLI values exit with status 2; a --quick run writes
  the whole output contract (config/metrics/timing json, samples.npz, figures, state dicts loadable with
  weights_only=True, ordinary file permissions, no temporary files); the same seed gives an identical metrics.json;
  malformed --data files (missing, a directory, wrong extension, corrupt archive, text, pickled object array, wrong
  key) raise a ValueError naming the file before anything is written; an --out that cannot be written stops before
  training; a diverging run stops with FloatingPointError, leaving no metrics.json (also not an earlier run's);
  the copy-out test (each class a course would lift runs from its own source plus the top-level definitions it
  needs, in a namespace with only torch, numpy and the standard library); the device rule (static check: every
  random draw is made on the CPU, every .numpy() follows .cpu(), no ungated torch.cuda).
LDNS: S4 FFT convolution == explicit causal convolution == recurrence (and the bidirectional form); kernel(2L)
  extends kernel(L); HiPPO-LegS eigenvalues against an independent eigen-solver; DDPM q_sample closed form, eps-form
  posterior mean == x0-form, respaced schedule, DDIM with an oracle eps recovers x0; the masked Poisson NLL; AE and
  denoiser at T and 4T; the Lorenz recipe and the refractory data's dip; ISIs and lag ratios on hand examples; the
  spike-history GLM (oracle refit of known weights, causality, cap and zero history in the sampler); the --paper
  models at full size with one optimiser step and the denoiser's parameter count against the official 179,432;
  --demo lorenz-refractory --quick; variable-length trials (the causal AE ignores later inputs, masked losses and
  statistics ignore padded bins, centred re-padding and cropping are inverse, generated trials have the requested
  lengths, --demo lorenz-varlen --quick, bad length flags); conditional reaching (the angle condition equals the
  generating angle, adaLN-Zero ignores c before training and uses it after one step, the velocity channels are
  inputs only and outside the loss, the ridge decoder recovers a known linear map, --demo reach --quick for both
  conditions, bad reach flags); own data; bad data and bad flags.
GNOCCHI: MMD zero/symmetric/positive and equal to InfoDiffusion's kernel written out; AdaGN uses the code and the
  output layer starts at zero; attention == scaled dot-product attention; the --paper U-Net layout; the schedule
  ends near abar = 0 and DDIM with an oracle eps recovers x0; the lr schedule; held-out targets never enter
  training or normalisation; the LFADS-like KL equals torch's closed form and its generator equals hand-unrolled
  GRU equations; both training loops stop on a non-finite loss; --paper models at full size; 18 bad-data cases;
  own spikes are smoothed counts; --quick end to end.
Spike-GAN: the gradient penalty takes the norm over all non-batch dims, is zero for a unit-norm linear critic and
  interpolates on the segment; the fused real/fake critic pass equals separate passes; generator shape, range and
  initialisation; one iteration changes both nets; the lr schedule; real batches cover the training set once per
  epoch; sampling and binarisation draw on the CPU; the data generator's rates, correlations and refractory dip;
  the refractory rules; the packet test set; Phi2 against its closed form; a dichotomized Gaussian with known
  parameters refitted; importance is zero where there is no spike; statistics on a known pattern; the --paper
  configuration, models and CPU warning; end to end, metrics recomputed from Spike-GAN's own samples; long-series
  windowing; own data; the bad-data cases.
Tutorial: every code cell of tutorial.ipynb runs, in order, in a fresh interpreter (its tiny sizes); it is committed
  with outputs and figures under 3 MB; each exercise stub raises NotImplementedError and precedes its solution
  and check; its runs and side-by-side table leave finite numbers; nothing is written outside its folder.
"""
import ast
import copy
import dataclasses
import importlib
import json
import math
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ["ldns_minimal.py", "gnocchi_minimal.py", "spikegan_minimal.py"]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import gnocchi_minimal as gn  # noqa: E402
import ldns_minimal as ldns  # noqa: E402
import spikegan_minimal as sg  # noqa: E402

MODULES = {"ldns_minimal.py": ldns, "gnocchi_minimal.py": gn, "spikegan_minimal.py": sg}
# a --quick run of each file's default demo, fixed threads (float sums must run in the same order in both runs)
QUICK = {"ldns_minimal.py": ["--quick", "--threads", "1", "--seed", "3"],
         "gnocchi_minimal.py": ["--quick", "--threads", "1"],
         "spikegan_minimal.py": ["--quick", "--threads", "1"]}
# flags that make the first training stage diverge (a non-finite loss)
DIVERGE = {"ldns_minimal.py": ["--ae-lr", "1e12"], "gnocchi_minimal.py": ["--lr", "1e12"],
           "spikegan_minimal.py": ["--lr", "1e12"]}


def run_cli(args, cwd, timeout=300):
    """Run `python <args>` in cwd with the repo on PYTHONPATH; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# =====================================================================================================================
# All three files
# =====================================================================================================================
@pytest.mark.parametrize("fname", MODEL_FILES)
def test_import_has_no_side_effects(fname, tmp_path):
    mod = fname[:-3]
    r = run_cli(["-c", f"import {mod}; assert callable({mod}.main)"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", (r.stdout, r.stderr)
    assert list(tmp_path.iterdir()) == [], "import created files"


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_help_lists_the_shared_flags(fname, tmp_path):
    r = run_cli([os.path.join(ROOT, fname), "--help"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for flag in ("--demo", "--quick", "--paper", "--out", "--seed", "--device", "--data", "--threads"):
        assert flag in r.stdout, f"{fname} --help lacks {flag}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_bad_cli_values_exit_2(fname, capsys):
    mod = MODULES[fname]
    bad = [["--demo", "no-such-demo"], ["--device", "tpu"], ["--quick", "--paper"]]
    bad += [["--" + name.replace("_", "-"), "-1"] for name in mod.POSITIVE_FIELDS]
    assert len(bad) > 3, "POSITIVE_FIELDS should list the step/size fields"
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2, argv
        err = capsys.readouterr().err
        assert "error" in err and argv[-2 if argv[-1] == "--paper" else 0] in err, (argv, err)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """One --quick run of each file's default demo, in a fresh process (the output contract is checked on it)."""
    runs = {}
    for fname in MODEL_FILES:
        out = tmp_path_factory.mktemp(fname[:-3]) / "run"
        r = run_cli([os.path.join(ROOT, fname), *QUICK[fname], "--out", str(out)], cwd=out.parent)
        runs[fname] = (r, out)
    return runs


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_quick_run_writes_the_output_contract(fname, quick_runs):
    r, out = quick_runs[fname]
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz"):
        assert (out / f).is_file(), f
    assert list((out / "figures").glob("*.png")), "no figures"
    config, metrics = (json.loads((out / f).read_text()) for f in ("config.json", "metrics.json"))
    assert config["seed"] == config["config"]["seed"] and config["torch"] == torch.__version__
    assert metrics and "total" in json.loads((out / "timing.json").read_text())
    with np.load(out / "samples.npz") as z:
        assert z["real"].ndim == 3 and z["generated"].ndim == 3 and z["real"].shape[1:] == z["generated"].shape[1:]
        assert np.isfinite(z["generated"]).all()
    weights = list(out.glob("*.pt"))
    assert weights, "no state dicts"
    for w in weights:
        assert isinstance(torch.load(w, weights_only=True), dict)
    umask = os.umask(0)
    os.umask(umask)
    for p in [*out.iterdir(), *(out / "figures").iterdir()]:
        assert not p.name.endswith(".tmp"), f"temporary file left: {p.name}"
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_same_seed_gives_identical_metrics(fname, quick_runs, tmp_path):
    _, out = quick_runs[fname]
    MODULES[fname].main(QUICK[fname] + ["--out", str(tmp_path / "again")])  # in process, same seed and threads
    assert (tmp_path / "again" / "metrics.json").read_text() == (out / "metrics.json").read_text()


def _bad_file(tmp_path, kind):
    """Malformed --data files a new user produces; returns (path, expected message fragment)."""
    p = tmp_path / {"missing": "none.npz", "directory": "dir.npz", "extension": "spikes.csv", "corrupt": "c.npz",
                    "text": "t.npy", "object": "o.npy", "key": "k.npz"}[kind]
    if kind == "directory":
        p.mkdir()
    elif kind == "extension":
        p.write_text("1,0,1\n")
    elif kind == "corrupt":
        np.savez(p, spikes=np.zeros((12, 4, 32)))
        p.write_bytes(p.read_bytes()[:40])                         # a truncated zip archive
    elif kind == "text":
        p.write_text("this is not an array\n")
    elif kind == "object":
        np.save(p, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)
    elif kind == "key":
        np.savez(p, counts=np.zeros((12, 4, 32)))
    return str(p), {"missing": "no such file", "directory": "a directory", "extension": "extension", "corrupt": "zip",
                    "text": "not a .npy or .npz", "object": "object array", "key": "spikes"}[kind]


@pytest.mark.parametrize("kind", ["missing", "directory", "extension", "corrupt", "text", "object", "key"])
@pytest.mark.parametrize("fname", MODEL_FILES)
def test_malformed_data_file_raises_value_error_before_output(fname, kind, tmp_path):
    path, match = _bad_file(tmp_path, kind)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        MODULES[fname].main(["--data", path, "--out", str(out), "--quick"])
    assert path in str(e.value) and "expected" in str(e.value)
    assert not out.exists(), "output written before validation"


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_unwritable_out_stops_before_training(fname, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="writable"):
        MODULES[fname].main(QUICK[fname] + ["--out", str(blocker / "run")])
    assert "step" not in capsys.readouterr().out, "training started"


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_diverging_run_stops_and_leaves_no_metrics(fname, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "an earlier run"}')
    with pytest.raises(FloatingPointError, match="step"):
        MODULES[fname].main(QUICK[fname] + DIVERGE[fname] + ["--out", str(out)])
    assert not (out / "metrics.json").exists() and not (out / "samples.npz").exists()


def test_command_line_error_is_one_sentence(tmp_path):
    r = run_cli([os.path.join(ROOT, "ldns_minimal.py"), "--data", str(tmp_path / "none.npy")], cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: --data") and "Traceback" not in r.stderr


# --- copy-out: a class lifted with the definitions it needs runs in a namespace of torch, numpy and the stdlib -------
def _lift(fname, name):
    """Source of `name` plus every top-level definition it needs (transitively), in file order, and the file's
    imports; executed in a fresh namespace."""
    src = open(os.path.join(ROOT, fname)).read()
    tree = ast.parse(src)
    defs, imports = {}, []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, ast.Assign) and all(isinstance(t, (ast.Name, ast.Tuple)) for t in node.targets):
            for t in node.targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        defs[n.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imports.append(node)
    for node in imports:
        for alias in node.names:
            top = (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
            assert top in ("torch", "numpy") or top in sys.stdlib_module_names, f"{fname} imports {top}"
    need, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n in need or n not in defs:
            continue
        need.add(n)
        todo += [m.id for m in ast.walk(defs[n]) if isinstance(m, ast.Name)]
    nodes = sorted({id(defs[n]): defs[n] for n in need}.values(), key=lambda nd: nd.lineno)
    ns = {"__name__": "copied"}
    exec(compile(ast.Module(body=imports + nodes, type_ignores=[]), f"<{name} from {fname}>", "exec"), ns)
    return ns, sorted(need)


COPY_OUT = {
    ("ldns_minimal.py", "S4D"): lambda ns: ns["S4D"](4, 8)(torch.randn(2, 4, 16)).shape == (2, 4, 16),
    ("ldns_minimal.py", "AutoEncoder"): lambda ns: ns["AutoEncoder"](6, 16, 4, 1, 8)(torch.rand(2, 6, 16))[0].shape
    == (2, 6, 16),
    ("ldns_minimal.py", "Denoiser"): lambda ns: ns["Denoiser"](4, 16, 1, 8)(torch.randn(2, 4, 16),
                                                                           torch.tensor([0, 9])).shape == (2, 4, 16),
    ("ldns_minimal.py", "DDPM"): lambda ns: ns["DDPM"](100).sample(lambda x, t: torch.zeros_like(x), (1, 2, 8), 5,
                                                                   1.0).shape == (1, 2, 8),
    ("ldns_minimal.py", "EMA"): lambda ns: ns["EMA"](torch.nn.Linear(2, 2)).update(torch.nn.Linear(2, 2)) is None,
    ("ldns_minimal.py", "SpikeHistoryGLM"): lambda ns: ns["SpikeHistoryGLM"](3, 4).sample(torch.rand(2, 3, 10)).shape
    == (2, 3, 10),
    ("gnocchi_minimal.py", "Encoder"): lambda ns: ns["Encoder"](6, 10, 8, 3)(torch.randn(2, 6, 10)).shape == (2, 3),
    ("gnocchi_minimal.py", "UNet1D"): lambda ns: ns["UNet1D"](6, 16, 3, 20, 0.0)(
        torch.randn(2, 6, 10), torch.tensor([1, 2]), torch.randn(2, 3)).shape == (2, 6, 10),
    ("gnocchi_minimal.py", "mmd"): lambda ns: float(ns["mmd"](torch.ones(4, 2), torch.ones(4, 2))) == 0.0,
    ("gnocchi_minimal.py", "GNOCCHI"): lambda ns: ns["GNOCCHI"](ns["Config"](channels=16, diff_steps=20, ddim_steps=5),
                                                              6, 10).sample(torch.randn(2, 4), torch.Generator()
                                                                            .manual_seed(0)).shape == (2, 6, 10),
    ("spikegan_minimal.py", "Critic"): lambda ns: ns["Critic"](4, 16, 4)(torch.rand(2, 4, 16)).shape == (2,),
    ("spikegan_minimal.py", "Generator"): lambda ns: ns["Generator"](4, 16, 4)(torch.randn(2, 128)).shape
    == (2, 4, 16),
    ("spikegan_minimal.py", "gradient_penalty"): lambda ns: float(ns["gradient_penalty"](
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 1)), torch.rand(3, 2, 4), torch.rand(3, 2, 4))) >= 0,
    ("spikegan_minimal.py", "fit_dg"): lambda ns: ns["fit_dg"](np.random.default_rng(0).random((300, 3, 4)) < 0.3)[1]
    .shape == (12, 12),
    ("spikegan_minimal.py", "importance_map"): lambda ns: ns["importance_map"](
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(24, 1), torch.nn.Flatten(0)),
        (torch.rand(2, 3, 8) < 0.3).float(), 4, 1,
        torch.Generator().manual_seed(0)).shape == (2, 3, 8),
}


@pytest.mark.parametrize("fname,name", list(COPY_OUT))
def test_copy_out_piece_runs_alone(fname, name):
    torch.manual_seed(0)
    ns, _ = _lift(fname, name)
    assert COPY_OUT[fname, name](ns)


# --- the device rule, checked statically -----------------------------------------------------------------------------
def _call_name(node):
    f = node.func
    base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
    return base, (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None)


def _is_cpu_call(node):
    """x.cpu(), or a CPU draw torch.poisson(x.cpu()) / torch.bernoulli(x.cpu())."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return False
    return node.func.attr == "cpu" or (_call_name(node) in (("torch", "poisson"), ("torch", "bernoulli"))
                                       and _is_cpu_call(node.args[0]))


@pytest.mark.parametrize("fname", MODEL_FILES)
def test_device_rule_random_draws_on_the_cpu(fname):
    """Every random draw is made on the CPU and moved afterwards: no device= in torch's random constructors, no
    *_like random draws, no device generators; torch.poisson / bernoulli get .cpu() inputs; .numpy() only after
    .cpu() or such a CPU draw; torch.cuda only to ask whether it is available. It cannot see tensors that end up on different devices
    through non-random operations; the same code must still be run on a GPU once (README)."""
    tree = ast.parse(open(os.path.join(ROOT, fname)).read())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cuda" \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "torch" \
                and node.attr != "is_available":
            bad.append((node.lineno, f"torch.cuda.{node.attr}"))
        if not isinstance(node, ast.Call):
            continue
        base, name = _call_name(node)
        kws = {k.arg for k in node.keywords}
        if base == "torch" and name in ("randn_like", "rand_like", "randint_like"):
            bad.append((node.lineno, name))
        if base == "torch" and name in ("randn", "rand", "randint", "randperm", "normal") and "device" in kws:
            bad.append((node.lineno, f"{name}(device=...)"))
        if base == "torch" and name == "Generator" and (node.args or "device" in kws):
            bad.append((node.lineno, "Generator on a device"))
        if base == "torch" and name in ("poisson", "bernoulli", "multinomial") and not _is_cpu_call(node.args[0]):
            bad.append((node.lineno, f"{name} of a tensor that may live on the device"))
        if name == "numpy" and isinstance(node.func, ast.Attribute) and not _is_cpu_call(node.func.value):
            bad.append((node.lineno, ".numpy() without .cpu()"))
    assert not bad, f"{fname}: {bad}"


# =====================================================================================================================
# LDNS
# =====================================================================================================================
LDNS_TINY = QUICK["ldns_minimal.py"]


def _s4(bidirectional, H=3, d_state=8, L=20):
    torch.manual_seed(0)
    s4 = ldns.S4D(H, d_state, bidirectional)
    with torch.no_grad():
        s4.log_dt.fill_(np.log(0.05))                          # a visible impulse response within L steps
    return s4, torch.randn(2, H, L)


def test_ldns_s4_fft_equals_causal_conv_and_recurrence():
    s4, u = _s4(bidirectional=False)
    L = u.shape[-1]
    with torch.no_grad():
        y_fft = s4(u)
        K = s4.kernel(L)[0]                                    # (H,L)
        y_conv = torch.stack([sum(K[:, s] * u[..., t - s] for s in range(t + 1)) for t in range(L)], -1)
        y_conv = y_conv + s4.D[:, None] * u
        A_bar, B_bar = s4.discretise()                         # (H,n) each
        C = torch.view_as_complex(s4.C)[0]
        x, ys = torch.zeros(2, *A_bar.shape, dtype=torch.complex64), []
        for t in range(L):                                     # x_t = A_bar x_{t-1} + B_bar u_t; y = 2 Re(C x) + D u
            x = A_bar * x + B_bar * u[..., t, None]
            ys.append(2 * (C * x).sum(-1).real + s4.D * u[..., t])
        y_rec = torch.stack(ys, -1)
    assert torch.allclose(y_fft, y_conv, atol=1e-4), (y_fft - y_conv).abs().max()
    assert torch.allclose(y_fft, y_rec, atol=1e-4), (y_fft - y_rec).abs().max()


def test_ldns_s4_bidirectional_equals_explicit_two_sided_conv():
    s4, u = _s4(bidirectional=True)
    L = u.shape[-1]
    with torch.no_grad():
        Kf, Kb = s4.kernel(L)
        y = torch.stack([sum(Kf[:, s] * u[..., t - s] for s in range(t + 1))
                         + sum((Kb[:, mm - 1] * u[..., t + mm] for mm in range(1, L - t)), torch.zeros(2, 3))
                         for t in range(L)], -1) + s4.D[:, None] * u
        assert torch.allclose(s4(u), y, atol=1e-4)


def test_ldns_s4_kernel_of_length_2L_starts_with_kernel_of_length_L():
    s4, _ = _s4(bidirectional=True, H=4, d_state=16)
    with torch.no_grad():
        assert torch.allclose(s4.kernel(64)[..., :32], s4.kernel(32), atol=1e-5)


def test_ldns_hippo_legs_eigenvalues_against_an_independent_solver():
    N = 64
    w, B = ldns.hippo_legs(N)
    # the normal part of HiPPO-LegS written out entry by entry: S_nk = -1/2 on the diagonal,
    # -sqrt((2n+1)(2k+1))/2 below it, +sqrt((2n+1)(2k+1))/2 above it; general (non-Hermitian) eigen-solver
    S = np.array([[-0.5 if n == k else np.sign(k - n) * np.sqrt((2 * n + 1) * (2 * k + 1)) / 2 for k in range(N)]
                  for n in range(N)])
    lam = np.linalg.eigvals(S)
    assert np.allclose(lam.real, -0.5, atol=1e-6)
    assert np.allclose(np.sort(w), np.sort(lam.imag[lam.imag > 0]), rtol=1e-6, atol=1e-6)
    assert w.shape == (N // 2,) and np.abs(B.imag).max() <= 2
    s4 = ldns.S4D(5, N)
    assert torch.allclose(-s4.log_A_real.exp(), torch.full((5, N // 2), -0.5))
    dt = s4.log_dt.exp()
    assert (dt >= 1e-3).all() and (dt <= 1e-1).all()


def test_ldns_q_sample_closed_form():
    ddpm = ldns.DDPM(1000)
    x0, eps, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.tensor([0, 10, 500, 999])
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.tensor([float(torch.prod(1 - beta[:k + 1])) for k in t])[:, None, None].float()
    assert torch.allclose(ddpm.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-5)


def test_ldns_eps_form_posterior_mean_equals_x0_form_with_true_noise():
    ddpm = ldns.DDPM(1000)
    x0, eps = torch.randn(6, 2, 7), torch.randn(6, 2, 7)
    for t, t_prev in [(500, 499), (1, 0), (999, 949)]:        # plain and respaced steps
        ab, ab_prev = ddpm.alpha_bar[t], ddpm.alpha_bar[t_prev]
        xt = ddpm.q_sample(x0, torch.full((6,), t), eps)
        mean, var = ddpm.p_step(xt, eps, ab, ab_prev, eta=1.0)
        assert torch.allclose(mean, ddpm.q_posterior_mean(x0, xt, ab, ab_prev), atol=1e-4)
        beta = 1 - ab / ab_prev
        assert torch.allclose(var, (1 - ab_prev) / (1 - ab) * beta)  # beta_tilde ("fixed_small")
    # Ho et al. Eq. 11 for a plain step: mean = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    t = 300
    xt = ddpm.q_sample(x0, torch.full((6,), t), eps)
    mean, _ = ddpm.p_step(xt, eps, ddpm.alpha_bar[t], ddpm.alpha_bar[t - 1], 1.0)
    b = ddpm.beta[t]
    assert torch.allclose(mean, (xt - b / (1 - ddpm.alpha_bar[t]).sqrt() * eps) / (1 - b).sqrt(), atol=1e-4)


def test_ldns_respaced_schedule():
    for n in (1000, 200):
        ddpm = ldns.DDPM(n)
        ts, ab = ddpm.respaced(50)
        assert len(ts) == 50 and ts[0] == 0 and ts[-1] == n - 1
        assert ab[-1] < 1e-3 and (ab[1:] < ab[:-1]).all()      # ends near alpha_bar = 0, decreasing
        ts, ab = ddpm.respaced(n)
        assert torch.equal(ts, torch.arange(n)) and torch.equal(ab, ddpm.alpha_bar)


def test_ldns_sampler_with_oracle_eps_recovers_x0():
    """Deterministic DDIM driven by the exact noise of a single known x0 lands on x0."""
    ddpm, x0 = ldns.DDPM(1000), torch.randn(1, 2, 8)

    def oracle(x, t):
        ab = ddpm.alpha_bar[t][:, None, None]
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    assert torch.allclose(ddpm.sample(oracle, (1, 2, 8), 20, eta=0.0), x0, atol=1e-3)


def test_ldns_masked_poisson_nll_counts_only_masked_entries():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(2, 5, 9) * 2)
    M = (torch.rand(x.shape) > 0.3).float()                   # 1 = kept, 0 = dropped
    rates = torch.rand(x.shape) + 0.1
    loss = ldns.masked_poisson_nll(rates, x, M)
    rates2 = torch.where(M.bool(), rates * 7.0, rates)         # change only kept entries
    assert torch.allclose(loss, ldns.masked_poisson_nll(rates2, x, M))
    full = torch.nn.functional.poisson_nll_loss(rates, x, log_input=False, full=True, reduction="none")
    assert torch.allclose(loss, (full * (1 - M)).sum() / x.numel())


def test_ldns_ae_and_denoiser_run_at_T_and_4T():
    torch.manual_seed(0)
    ae, dn = ldns.AutoEncoder(12, 16, 4, 1, 16), ldns.Denoiser(4, 16, 1, 16)
    for T in (32, 128):
        rates, z = ae(torch.poisson(torch.rand(2, 12, T)))
        assert rates.shape == (2, 12, T) and z.shape == (2, 4, T) and (rates >= 0).all()
        eps = dn(torch.randn(2, 4, T), torch.tensor([0, 999]))
        assert eps.shape == (2, 4, T) and torch.isfinite(eps).all()


def test_ldns_lorenz_data_recipe_and_refractory_dip():
    d = ldns.make_lorenz_data(20, 64, 16, np.random.default_rng(0))
    assert d["spikes"].shape == (20, 16, 64) and d["latents"].shape == (20, 3, 64)
    assert np.allclose(d["latents"].mean(-1), 0, atol=1e-5) and np.allclose(d["latents"].std(-1), 1, atol=1e-4)
    assert 0.05 < d["spikes"].mean() < 0.4 and d["spikes"].dtype.kind == "i"
    r = ldns.make_lorenz_data(100, 64, 32, np.random.default_rng(0), refractory=True)
    assert np.array_equal(r["rates"], ldns.make_lorenz_data(100, 64, 32, np.random.default_rng(0))["rates"])
    assert ldns.lag_ratios(r["spikes"], 2)[0] <= 0.5 < ldns.lag_ratios(d["spikes"], 2)[0]  # the data bar


def test_ldns_isi_stats_and_lag_ratios_small_examples():
    s = np.zeros((1, 1, 10), dtype=np.int64)
    s[0, 0, [1, 4]] = 1
    s[0, 0, 7] = 2                                             # spikes at 1.5, 4.5, 7+1/3, 7+2/3
    mean, std = ldns.isi_stats(s)
    isi = np.diff([1.5, 4.5, 7 + 1 / 3, 7 + 2 / 3])
    assert np.isclose(mean[0], isi.mean()) and np.isclose(std[0], isi.std())
    s = np.zeros((1, 1, 8), dtype=np.int64)
    s[0, 0, [0, 2, 4, 6]] = 1                                  # period 2: never at lag 1, always at lag 2
    assert np.allclose(ldns.lag_ratios(s, 2), [0.0, (3 / 3) / 0.5])
    poisson = np.random.default_rng(0).poisson(0.2, (400, 5, 64))
    assert np.allclose(ldns.lag_ratios(poisson, 3), 1.0, atol=0.05)  # no temporal structure: ratio 1


# --- spike-history observation model --------------------------------------------------------------------------------
def test_ldns_spike_history_glm_refits_known_weights():
    """Oracle: spikes simulated from a GLM with known weights; the fit recovers them. 3 neurons x 60,000 fitted bins
    each give standard errors of about 0.02-0.05 for these weights, so 0.15 is a >3-sigma tolerance."""
    torch.manual_seed(0)
    N, H = 3, 4
    true = ldns.SpikeHistoryGLM(N, H)
    with torch.no_grad():
        true.w.copy_(torch.tensor([[-2.0, -1.0, -0.3, 0.0, 1.0, 0.0],
                                   [-1.0, 0.0, 0.0, 0.0, 0.8, 0.3],
                                   [-3.0, -1.5, -0.5, -0.2, 1.2, -0.2]]))
    t = torch.arange(104, dtype=torch.float32)
    lam = 0.3 * torch.exp(torch.sin(t / 8 + torch.rand(600, N, 1) * 6))  # smooth positive rates (600, N, 104)
    s = true.sample(lam, cap=5)
    cfg = ldns.Config(sh_bins=H, sh_epochs=400, sh_trials=600)
    fit = ldns.fit_spike_history(cfg, s, lam)
    err = (fit.w - true.w).abs().max().item()
    assert err < 0.15, (err, fit.w)


def test_ldns_spike_history_rate_is_causal():
    torch.manual_seed(0)
    glm, H = ldns.SpikeHistoryGLM(4, 5), 5
    s, log_lam = torch.poisson(torch.rand(2, 4, 30)), torch.randn(2, 4, 30)
    r = glm(glm.design(s, log_lam)).reshape(4, 2, -1)          # (N, B(T-H)) -> (N, B, T-H): bins H..T-1
    for j in (H, 12, 29):                                      # change the spikes of bin j and later
        s2 = s.clone()
        s2[..., j:] += 3
        r2 = glm(glm.design(s2, log_lam)).reshape(4, 2, -1)
        assert torch.equal(r[..., :j + 1 - H], r2[..., :j + 1 - H])   # bins <= j do not see it
        assert j == 29 or not torch.equal(r[..., j + 1 - H:], r2[..., j + 1 - H:])


def test_ldns_spike_history_sampler_starts_from_zero_history_and_honours_the_cap():
    glm = ldns.SpikeHistoryGLM(3, 6)
    with torch.no_grad():
        glm.w.zero_()
        glm.w[:, :6] = 10.0                                    # strongly self-exciting history
        glm.w[:, 6] = 1.0                                      # gain on log lambda, bias 0
    quiet = glm.sample(torch.full((50, 3, 40), 1e-7), cap=5)
    assert quiet.sum() == 0                                    # zero history and a tiny rate: never a first spike
    with torch.no_grad():
        glm.w[:, 7] = 50.0                                     # bias 50: softplus(...) >= 50 spikes expected per bin
    busy = glm.sample(torch.full((50, 3, 40), 1.0), cap=5)
    assert (busy == 5).all()                                   # every count is capped at 5


@pytest.fixture(scope="module")
def ldns_refractory_quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("refractory") / "run"
    return ldns.main(["--demo", "lorenz-refractory", *LDNS_TINY, "--out", str(out)]), out


def test_ldns_refractory_quick_writes_history_outputs(ldns_refractory_quick):
    res, out = ldns_refractory_quick
    for key in ("acg/data/lag1_ratio", "acg/ldns/lag1_ratio", "acg/ldns_sh/lag2_rel_error", "plain_vs_real/r_rate",
                "gen_vs_real/r_std_isi"):
        assert key in res, key
    assert (out / "figures" / "6_autocorrelograms.png").exists()
    with np.load(out / "samples.npz") as z:
        assert z["generated"].shape == z["generated_plain"].shape and z["generated"].max() <= 5
    assert json.loads((out / "metrics.json").read_text())["acg/data/lag1_ratio"] == res["acg/data/lag1_ratio"]


@pytest.mark.parametrize("argv", [["--spike-history", "maybe"], ["--sh-bins", "0"], ["--sh-epochs", "-3"],
                                  ["--sh-cap", "0"], ["--sh-bins", "200", "--spike-history"]])
def test_ldns_bad_spike_history_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ldns.main(argv)
    assert e.value.code == 2 and "--s" in capsys.readouterr().err


# --- variable-length trials (--demo lorenz-varlen) -----------------------------------------------------------------
def _small_ae(causal, seed=0):
    torch.manual_seed(seed)
    return ldns.AutoEncoder(8, 16, 4, 2, 8, bidirectional=not causal).double().eval()


def test_ldns_varlen_causal_autoencoder_outputs_ignore_later_inputs():
    """Changing inputs after bin t changes no AE output (latents, rates) at or before t; the bidirectional AE does
    change them, so the test can fail."""
    g = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand((3, 8, 40), generator=g, dtype=torch.float64) * 2)
    t = 17
    x2 = x.clone()
    x2[..., t + 1:] = torch.poisson(torch.rand((3, 8, 40 - t - 1), generator=g, dtype=torch.float64) * 5)
    for causal in (True, False):
        ae = _small_ae(causal)
        with torch.no_grad():
            (r1, z1), (r2, z2) = ae(x), ae(x2)
        dz = (z1[..., :t + 1] - z2[..., :t + 1]).abs().max().item()
        dr = (r1[..., :t + 1] - r2[..., :t + 1]).abs().max().item()
        if causal:
            assert dz < 1e-10 and dr < 1e-10
            assert (z1[..., t + 1:] - z2[..., t + 1:]).abs().max().item() > 1e-3  # later outputs do react
        else:
            assert dz > 1e-3


def test_ldns_varlen_default_autoencoder_is_bidirectional_with_instance_norm():
    ae = ldns.AutoEncoder(8, 16, 4, 2, 8)
    assert all(b.norm is ldns.instance_norm and b.s4.bidirectional for b in ae.blocks)
    causal = ldns.AutoEncoder(8, 16, 4, 2, 8, bidirectional=False)
    assert all(b.norm is ldns.causal_instance_norm and not b.s4.bidirectional for b in causal.blocks)
    assert list(ae.state_dict()) == list(causal.state_dict())


def test_ldns_varlen_causal_instance_norm_matches_prefix_statistics():
    h = torch.randn(2, 3, 25, dtype=torch.float64)
    out = ldns.causal_instance_norm(h)
    for t in (1, 7, 24):
        ref = F.instance_norm(h[..., :t + 1], eps=1e-5)[..., -1]  # normalised with bins <= t
        assert torch.allclose(out[..., t], ref, atol=1e-10)


def test_ldns_varlen_masked_instance_norm_uses_valid_bins_and_zeroes_padding():
    h = torch.randn(3, 4, 30, dtype=torch.float64)
    lengths = torch.tensor([30, 11, 20])
    m = ldns.centre_mask(lengths, 30).double()
    out = ldns.instance_norm(h, m)
    left = (30 - lengths) // 2
    for i, l in enumerate(lengths.tolist()):
        seg = slice(int(left[i]), int(left[i]) + l)
        assert torch.allclose(out[i, :, seg], F.instance_norm(h[i:i + 1, :, seg], eps=1e-5)[0], atol=1e-10)
    assert (out * (1 - m) == 0).all()
    assert torch.equal(ldns.instance_norm(h), F.instance_norm(h, eps=1e-5))  # no mask: unchanged


def test_ldns_varlen_masked_poisson_nll_ignores_padded_bins():
    torch.manual_seed(0)
    B, N, T = 4, 6, 30
    lengths = torch.tensor([30, 12, 5, 21])
    m = ldns.end_mask(lengths, T)
    x = torch.poisson(torch.rand(B, N, T) * 2) * m
    M = (torch.rand(B, N, T) > 0.2).float()
    rates = torch.rand(B, N, T) + 0.1
    x2 = x + 7 * (1 - m)                                       # other values in the padding
    rates2 = rates + 3 * (1 - m)
    assert torch.equal(ldns.masked_poisson_nll(rates, x, M, m), ldns.masked_poisson_nll(rates2, x2, M, m))
    assert not torch.equal(ldns.masked_poisson_nll(rates, x, M), ldns.masked_poisson_nll(rates2, x2, M))
    ones = torch.ones(B, 1, T)
    assert torch.equal(ldns.masked_poisson_nll(rates, x, M, ones), ldns.masked_poisson_nll(rates, x, M))


def test_ldns_varlen_ae_reconstruction_loss_ignores_padding_inputs():
    """causal AE + padding mask: the reconstruction term does not see what the padding holds."""
    ae = _small_ae(True).float()
    lengths = torch.tensor([40, 15, 28])
    m = ldns.end_mask(lengths, 40)
    x = torch.poisson(torch.rand(3, 8, 40) * 2) * m
    x2 = x + torch.poisson(torch.full_like(x, 3.0)) * (1 - m)
    M = (torch.rand(3, 8, 40) > 0.2).float()
    with torch.no_grad():
        a = ldns.masked_poisson_nll(ae(x * M / 0.8)[0], x, M, m)
        b = ldns.masked_poisson_nll(ae(x2 * M / 0.8)[0], x2, M, m)
    assert abs(a.item() - b.item()) < 1e-6


def test_ldns_varlen_masked_diffusion_loss_and_denoiser_ignore_padded_bins():
    """The mask-channel denoiser's output on valid bins and the masked eps-loss do not change when the latents in
    the padding change; without the mask the loss does see the padding."""
    torch.manual_seed(0)
    dn = ldns.Denoiser(4, 16, 2, 8, d_extra=1, mask_norm=True).eval()
    for p in dn.parameters():                                  # non-zero adaLN so the blocks act
        p.data += 0.1 * torch.randn(p.shape)
    ddpm = ldns.DDPM(1000)
    lengths = torch.tensor([30, 12, 7])
    zc, mc = ldns.centre_pad(torch.randn(3, 4, 30), lengths)
    zc2 = zc + 5 * torch.randn(zc.shape) * (1 - mc)
    t = torch.tensor([10, 500, 990])
    with torch.no_grad():
        e1, e2 = dn(zc, t, extra=mc), dn(zc2, t, extra=mc)
    assert ((e1 - e2) * mc).abs().max().item() < 1e-5
    assert ((e1 - e2) * (1 - mc)).abs().max().item() > 1e-3
    losses = []
    for x0 in (zc, zc2):
        torch.manual_seed(3)
        with torch.no_grad():
            losses.append(ddpm.loss(dn, x0, mask=mc, extra=mc).item())
    assert abs(losses[0] - losses[1]) < 1e-6
    torch.manual_seed(3)
    with torch.no_grad():
        assert abs(ddpm.loss(dn, zc2, extra=mc).item() - losses[1]) > 1e-3


def test_ldns_varlen_denoiser_defaults_unchanged_and_mask_channel_is_dropped():
    torch.manual_seed(0)
    a = ldns.Denoiser(8, 64, 2, 16)
    assert a.conv_in.groups == 8 and not a.mask_norm
    dn = ldns.Denoiser(8, 64, 2, 16, d_extra=1, mask_norm=True)
    assert dn.conv_in.groups == 1 and dn.conv_in.in_channels == 9 and dn.conv_out.out_channels == 9
    assert list(a.state_dict()) == list(dn.state_dict())
    out = dn(torch.randn(2, 8, 20), torch.tensor([3, 900]), extra=ldns.centre_mask(torch.tensor([20, 9]), 20))
    assert out.shape == (2, 8, 20)


def test_ldns_varlen_masked_latent_stats_use_valid_bins_only():
    torch.manual_seed(0)
    lengths = torch.tensor([20, 5, 13, 1])
    m = ldns.end_mask(lengths, 20)
    z = torch.randn(4, 3, 20, dtype=torch.float64) + 100 * (1 - m)  # padding far off
    mu, sd = ldns.masked_latent_stats(z, m)
    valid = np.concatenate([z[i, :, :l].numpy() for i, l in enumerate(lengths.tolist())], axis=1)  # (3, sum l)
    assert np.allclose(mu[0, :, 0].numpy(), valid.mean(1))
    assert np.allclose(sd[0, :, 0].numpy(), valid.std(1))


def test_ldns_varlen_latents_for_diffusion_fixed_length_is_the_lorenz_recipe():
    z = torch.randn(6, 3, 16) * 4
    mu, sigma, zn, m = ldns.latents_for_diffusion(z)
    assert m is None and torch.equal(zn, ((z - mu) / sigma).clamp(-5, 5))
    lengths = torch.tensor([16, 4, 9, 12, 2, 7])
    mu, sigma, zn, m = ldns.latents_for_diffusion(z * ldns.end_mask(lengths, 16), lengths)
    assert torch.equal(m, ldns.centre_mask(lengths, 16))
    assert torch.allclose(ldns.masked_latent_stats(ldns.crop_centred(zn, lengths), ldns.end_mask(lengths, 16))[1],
                          torch.ones(1, 3, 1), atol=1e-5)     # unit std on the valid bins


def test_ldns_varlen_centre_pad_and_crop_are_inverse():
    torch.manual_seed(0)
    T = 17
    lengths = torch.tensor([17, 16, 1, 8, 9, 2])
    m = ldns.end_mask(lengths, T)
    z = torch.randn(6, 3, T) * m
    zc, mc = ldns.centre_pad(z, lengths)
    assert torch.equal(mc.sum((1, 2)).long(), lengths)
    left = (T - lengths) // 2
    for i, l in enumerate(lengths.tolist()):
        assert torch.equal(mc[i, 0].nonzero()[:, 0], torch.arange(left[i], left[i] + l))
        assert torch.equal(zc[i, :, left[i]:left[i] + l], z[i, :, :l])
        assert (zc[i, :, :left[i]] == z[i, :, :1]).all() and (zc[i, :, left[i] + l:] == z[i, :, l - 1:l]).all()
    assert torch.equal(ldns.crop_centred(zc, lengths), z)      # crop o pad = identity on end-padded trials
    x = torch.randn(6, 3, T)
    assert torch.equal(ldns.centre_pad(ldns.crop_centred(x, lengths), lengths)[0] * mc, x * mc)  # pad o crop on mask


def test_ldns_varlen_generated_trials_have_the_requested_lengths():
    torch.manual_seed(0)
    ae = ldns.AutoEncoder(6, 8, 2, 1, 8, bidirectional=False).eval()
    dn = ldns.Denoiser(2, 8, 1, 8, d_extra=1, mask_norm=True).eval()
    lengths = torch.tensor([3, 10, 24, 17])
    cfg = ldns.Config(d_latent=2, sample_steps=5)
    out = ldns.sample_at_lengths(cfg, ldns.DDPM(1000), dn, ae, torch.zeros(1, 2, 1), torch.ones(1, 2, 1), lengths, 24)
    z, rates, s = out["z"], out["rates"], out["spikes"]
    assert z.shape == (4, 2, 24) and s.shape == (4, 6, 24)
    valid = ldns.end_mask(lengths, 24)
    assert (rates * (1 - valid) == 0).all() and (s * (1 - valid) == 0).all()
    assert torch.equal(ldns.support_length(rates), lengths)
    left = (24 - lengths) // 2
    with torch.no_grad():
        full = ae.decode(z)                                    # the whole centred window
    for i, l in enumerate(lengths.tolist()):
        assert torch.equal(rates[i, :, :l], full[i, :, left[i]:left[i] + l])


def test_ldns_varlen_masked_spike_stats_equal_spike_stats_at_full_length():
    s = np.random.default_rng(0).poisson(0.4, (7, 5, 30))
    a, b = ldns.masked_spike_stats(s, np.full(7, 30)), ldns.spike_stats(s)
    for k in a:
        assert np.allclose(a[k], b[k], equal_nan=True)
    short = ldns.masked_spike_stats(s * (np.arange(30) < 12), np.full(7, 12))
    assert np.allclose(short["rate"], s[..., :12].mean((0, 2)))
    assert len(short["psc"]) == 7 * 12


def test_ldns_varlen_length_buckets_cover_the_range():
    bk = ldns.length_buckets(48, 160, 3)
    assert bk[0][0] == 48 and bk[-1][1] == 160
    assert all(b[0] == a[1] + 1 for a, b in zip(bk[:-1], bk[1:]))


@pytest.mark.parametrize("argv", [
    ["--demo", "lorenz-varlen", "--len-min", "500"],
    ["--demo", "lorenz-varlen", "--len-min", "1"],
    ["--demo", "lorenz-varlen", "--len-min", "-4"],
    ["--demo", "lorenz-varlen", "--len-min", "150", "--n-buckets", "20"],
    ["--demo", "lorenz-varlen", "--n-buckets", "0"],
    ["--demo", "lorenz-varlen", "--ae-causal", "0"],
    ["--demo", "lorenz-varlen", "--data", "x.npz"],
    ["--demo", "lorenz-varlen", "--spike-history"],
    ["--demo", "lorenz", "--len-min", "40"],
])
def test_ldns_varlen_bad_length_settings_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ldns.parse_args(argv)
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err


def test_ldns_varlen_len_min_default_follows_the_window():
    assert ldns.parse_args(["--demo", "lorenz-varlen"]).len_min == 48
    assert ldns.parse_args(["--demo", "lorenz-varlen", "--quick"]).len_min == 10
    assert ldns.parse_args([]).len_min == 0 and not ldns.parse_args([]).ae_causal


def test_ldns_varlen_quick_varlen_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    res = ldns.main(["--demo", "lorenz-varlen", "--quick", "--threads", "1", "--out", out])
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz", "ae.pt", "denoiser.pt",
              "figures/1_data.png", "figures/2_ae_fit.png", "figures/5_stats.png", "figures/6_varlen.png"):
        assert os.path.exists(os.path.join(out, f)), f
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert list(f.files)[:2] == ["real", "generated"]
        assert set(f.files) == {"real", "generated", "lengths_real", "lengths_generated"}
        T = f["generated"].shape[-1]
        assert len(f["lengths_generated"]) == len(f["generated"]) and len(f["lengths_real"]) == len(f["real"])
        assert (f["generated"] * (np.arange(T) >= f["lengths_generated"][:, None, None])).sum() == 0
        assert (f["real"] * (np.arange(T) >= f["lengths_real"][:, None, None])).sum() == 0
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    assert res["lengths/n_wrong_length"] == 0
    buckets = ldns.length_buckets(10, 32, 3)
    for lo, hi in buckets:
        for k in ("r_rate", "r_corr", "r_mean_isi", "r_std_isi", "r_psc"):
            assert f"len_{lo}-{hi}/gen_vs_real/{k}" in res and f"len_{lo}-{hi}/real_vs_real/{k}" in res
    assert sum(res[f"len_{lo}-{hi}/n_generated"] for lo, hi in buckets) == res["data/n_generated"]


# --- conditional generation on the synthetic reaching task (--demo reach) -------------------------------------------
def test_ldns_reach_data_angle_and_minimum_jerk_profile():
    """The angle condition read at any bin inside every reach is the generating angle (straight reaches); the
    minimum-jerk speed integrates to the reach distance and is zero before onset."""
    T = 128
    d = ldns.make_reach_data(40, T, 16, np.random.default_rng(0))
    lo, hi = ldns.reach_angle_bins(T)
    for b in (lo, hi):
        c = ldns.reach_condition(torch.tensor(d["velocity"]), b).numpy()
        np.testing.assert_allclose(np.arctan2(c[:, 1], c[:, 0]), d["angle"], atol=1e-5)
    speed = np.hypot(*d["velocity"].transpose(1, 0, 2))        # (K,T)
    dist = speed.sum(1) * ldns.REACH_BIN_S
    assert ((dist > ldns.REACH_DISTANCE[0] - 1e-3) & (dist < ldns.REACH_DISTANCE[1] + 1e-3)).all()
    assert (speed[:, :int(ldns.REACH_ONSET[0] * T)] == 0).all()
    assert d["spikes"].shape == (40, 16, T) and d["spikes"].dtype == np.int64


def _angle_denoiser():
    torch.manual_seed(0)
    return ldns.Denoiser(4, 16, 1, 8, d_cond=2)


def test_ldns_reach_untrained_conditional_denoiser_ignores_c_then_uses_it_after_one_step():
    """adaLN-Zero: before training the angle embedding reaches the output only through zero-initialised layers,
    so two angles give identical outputs; after one optimiser step they differ (conditioning reaches the output)."""
    dn, ddpm = _angle_denoiser(), ldns.DDPM()
    z, t = torch.randn(2, 4, 24), torch.tensor([500, 500])
    c1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    c2 = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    with torch.no_grad():
        assert torch.equal(dn(z, t, c=c1), dn(z, t, c=c2))
    opt = torch.optim.AdamW(dn.parameters(), lr=1e-2)
    ddpm.loss(dn, torch.randn(8, 4, 24), c=torch.randn(8, 2)).backward()
    opt.step()
    with torch.no_grad():
        assert (dn(z, t, c=c1) - dn(z, t, c=c2)).abs().max() > 1e-6


def test_ldns_reach_velocity_channels_are_inputs_only_and_excluded_from_the_loss():
    """Denoiser(C_in = d + 2): the velocity enters the output, but the two extra output channels are dropped, so
    whatever they would predict (their weights, i.e. their 'target') changes neither the loss nor its gradients."""
    torch.manual_seed(0)
    dn = ldns.Denoiser(4, 16, 1, 8, d_extra=2)
    with torch.no_grad():                                      # make the blocks non-trivial
        for p in dn.parameters():
            p.add_(0.1 * torch.randn(p.shape))
    x0, v = torch.randn(3, 4, 24), torch.randn(3, 2, 24)
    ddpm = ldns.DDPM()

    def loss():
        torch.manual_seed(1)
        return ddpm.loss(dn, x0, extra=v)
    base = loss()
    base.backward()
    assert dn.conv_out.weight.grad[4:].abs().max() == 0 and dn.conv_out.bias.grad[4:].abs().max() == 0
    with torch.no_grad():
        dn.conv_out.weight[4:].normal_(0, 10.0)
        dn.conv_out.bias[4:].normal_(0, 10.0)
        assert loss() == base
        t = torch.tensor([100, 100, 100])
        assert (dn(x0, t, extra=v) - dn(x0, t, extra=-v)).abs().max() > 1e-4


def test_ldns_reach_ridge_decoder_recovers_a_known_linear_map():
    """Oracle: rates from a known linear map plus intercept; fit_ridge (tiny alpha) recovers W and b, and the
    decoded velocity reaches R^2 ~ 1 (r2_score equals 1 - SSE/SST per output, averaged)."""
    rng = np.random.default_rng(0)
    rates = rng.gamma(2.0, 0.5, (30, 12, 40))                  # (K,N,T)
    W, b = rng.standard_normal((12, 2)), np.array([0.3, -0.2])
    v = ldns.bins_as_rows(rates) @ W + b                       # (K*T, 2)
    v = v.reshape(30, 40, 2).transpose(0, 2, 1)                # (K,T,2) -> (K,2,T)
    W_hat, b_hat = ldns.fit_ridge(ldns.bins_as_rows(rates), ldns.bins_as_rows(v), 1e-8)
    np.testing.assert_allclose(W_hat, W, atol=1e-6)
    np.testing.assert_allclose(b_hat, b, atol=1e-6)
    assert ldns.r2_score(v, ldns.decode_velocity(rates, W_hat, b_hat)) > 1 - 1e-10
    assert abs(ldns.r2_score(v, np.broadcast_to(v.mean((0, 2), keepdims=True), v.shape))) < 1e-12


def test_ldns_reach_direction_and_angular_error():
    theta = np.array([0.1, 2.0, -3.0])
    v = np.zeros((3, 2, 10))
    v[:, 0, 3:7], v[:, 1, 3:7] = np.cos(theta)[:, None], np.sin(theta)[:, None]
    np.testing.assert_allclose(ldns.reach_direction(v), theta, atol=1e-12)
    np.testing.assert_allclose(ldns.angular_error_deg(np.array([np.pi - 0.1, 0.2]), np.array([-np.pi + 0.1, -0.2])),
                               np.degrees([0.2, 0.4]), atol=1e-9)


@pytest.mark.parametrize("argv", [
    ["--demo", "reach", "--angle-bin", "20"],                  # before the latest onset
    ["--demo", "reach", "--n-vel", "400"],                     # more than the 300 held-out trials
    ["--demo", "reach", "--data", "x.npz"],
    ["--demo", "reach", "--spike-history"],
    ["--demo", "reach", "--condition", "speed"],
    ["--ridge-alpha", "-1"],
])
def test_ldns_reach_bad_settings_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ldns.parse_args(argv)
    assert e.value.code == 2
    assert "--" in capsys.readouterr().err


@pytest.mark.parametrize("condition", ["both", "velocity"])
def test_ldns_reach_quick_end_to_end(tmp_path, condition):
    out = tmp_path / "run"
    res = ldns.main(["--demo", "reach", "--quick", "--threads", "1", "--condition", condition, "--out", str(out)])
    both = condition == "both"
    names = ["config.json", "metrics.json", "timing.json", "samples.npz", "ae.pt", "denoiser_velocity.pt",
             "figures/1_data.png", "figures/7_reach_velocity.png"]
    names += ["denoiser_angle.pt", "figures/6_reach_angle_fan.png", "figures/8_reach_raster.png"] if both else []
    for f in names:
        assert (out / f).is_file(), f
    assert both == (out / "denoiser_angle.pt").exists()
    w = torch.load(out / "denoiser_velocity.pt", weights_only=True)
    assert w["conv_in.weight"].shape[1] == 8 + 2 and {"latent_mu", "latent_sigma", "velocity_scale"} <= set(w)
    with np.load(out / "samples.npz") as s:
        keys = {"real", "generated", "generated_velocity", "velocity_requested", "velocity_requested_trials"}
        assert set(s.files) == keys | ({"angle_requested"} if both else set())
        assert s["generated_velocity"].shape == (8, 32, 32) and s["velocity_requested"].shape == (8, 2, 32)
        if both:
            assert s["generated"].shape == (16, 32, 32) and len(np.unique(s["angle_requested"])) == 8
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(res))
    assert res["behaviour/decoder_r2_real_test"] <= 1 and res["behaviour/real_test_angle_error_median_deg"] <= 180
    for k in ["velocity/r2_decoded_vs_requested", "velocity_gen_vs_real_test/r_rate"] + (
            ["angle/error_median_deg", "angle/error_p90_deg", "angle_gen_vs_real/r_corr"] if both else []):
        assert np.isfinite(res[k]), k
    assert both == ("angle/error_median_deg" in res)


# --- the official scale ---------------------------------------------------------------------------------------------
def test_ldns_paper_models_at_full_size_take_one_step():
    """--paper builds the official Lorenz AE and denoiser; one optimiser step runs on a batch of 2 at 128 x 256. The
    denoiser's count differs from the official 179,432 exactly by the documented architectural differences: the
    diagonal S4D layer has no low-rank P (32 complex = 64 real numbers per channel and layer), and the final adaLN
    modulation adds Linear(C/4, 2C)."""
    cfg = ldns.parse_args(["--paper"])
    ae = ldns.AutoEncoder(cfg.n_neurons, cfg.ae_channels, cfg.d_latent, cfg.ae_blocks, cfg.d_state)
    dn = ldns.Denoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state)
    n_ae, n_dn = (sum(p.numel() for p in m.parameters()) for m in (ae, dn))
    C, n = cfg.dn_channels, cfg.d_state // 2
    assert n_dn == 179_432 - cfg.dn_blocks * C * 2 * n + (C // 4 * 2 * C + 2 * C), n_dn
    print(f"--paper: AE {n_ae:,} parameters (official 1,453,192 with DPLR), denoiser {n_dn:,}")
    x = torch.poisson(torch.rand(2, cfg.n_neurons, cfg.n_bins) * 0.3)
    for model, loss in ((ae, lambda: ldns.ae_loss(ae, x, cfg)),
                        (dn, lambda: ldns.DDPM(cfg.n_diffusion).loss(dn, torch.randn(2, cfg.d_latent, cfg.n_bins)))):
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.ae_lr)
        before = copy.deepcopy(model.state_dict())
        loss().backward()
        opt.step()
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- own data and bad data ------------------------------------------------------------------------------------------
GOOD = np.random.default_rng(0).poisson(0.3, (12, 8, 32))


@pytest.mark.parametrize("name,arr,match", [
    ("dims", GOOD[0], "3 dims"),
    ("negative", GOOD - 1, "non-negative"),
    ("nan", np.where(GOOD > 1, np.nan, GOOD), "finite"),
    ("non-integer", GOOD + 0.5, "integer"),
    ("huge counts", GOOD * 10 ** 12, "re-bin"),
    ("few trials", GOOD[:9], "10 trials"),
    ("few bins", GOOD[..., :15], "16 time bins"),
    ("silent", GOOD * 0, "only zeros"),
])
def test_ldns_bad_counts_raise_before_training(tmp_path, name, arr, match):
    path = str(tmp_path / "a.npz")
    np.savez(path, spikes=arr)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        ldns.main(["--data", path, "--out", str(out), "--quick"])
    assert not out.exists(), "output written before validation"


def test_ldns_own_data_runs_without_latent_metrics(tmp_path):
    path = str(tmp_path / "s.npy")
    np.save(path, GOOD)
    res = ldns.main(["--data", path, "--out", str(tmp_path / "o"), "--quick", "--ae-steps", "3", "--dn-steps", "3"])
    assert "ae/latent_r2" not in res and np.isfinite(res["gen_vs_real/r_rate"])


def test_ldns_cli_rejects_indivisible_latent_groups(capsys):
    with pytest.raises(SystemExit) as e:
        ldns.main(["--ae-channels", "30", "--d-latent", "8"])
    assert e.value.code == 2 and "--d-latent" in capsys.readouterr().err


# =====================================================================================================================
# GNOCCHI
# =====================================================================================================================
GN_TINY = ["--quick", "--threads", "1"]  # fixed thread count: float sums run in the same order in both runs


# -----------------------------------------------------------------------------
# Components: MMD, AdaGN, attention, U-Net layouts, schedule and DDIM
# -----------------------------------------------------------------------------
def test_gn_mmd_zero_symmetric_positive():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 8, generator=g), torch.randn(128, 8, generator=g)
    assert gn.mmd(x, x).abs() < 1e-6                                   # biased V-statistic: exactly 0 on one set
    assert torch.allclose(gn.mmd(x, y), gn.mmd(y, x), rtol=0, atol=1e-6)  # up to float32 summation order
    assert gn.mmd(x, y + 1.5) > 10 * gn.mmd(x, y) > 0                   # a shifted set is far, two draws are close

    def kernel(a, b):  # utils.py compute_kernel written out: exp(-mean_l (a_l - b_l)^2 / L)
        return torch.exp(-((a[:, None] - b[None]) ** 2).mean(2) / 8)
    ref = kernel(x, x).mean() + kernel(y, y).mean() - 2 * kernel(x, y).mean()
    assert torch.allclose(gn.mmd(x, y), ref, atol=1e-5)


def test_gn_adagn_uses_code_and_output_layer_is_zero():
    torch.manual_seed(0)
    blk = gn.AuxResBlock(16, 32, 64, dropout=0.0)
    x, temb = torch.randn(4, 16, 12), torch.randn(4, 64)
    assert not torch.allclose(blk(x, temb, torch.randn(4, 64)), blk(x, temb, torch.randn(4, 64)))
    net = gn.UNet1D(N=10, C=16, L=4, T_diff=20, dropout=0.0)
    eps_hat = net(torch.randn(3, 10, 12), torch.tensor([0, 5, 19]), torch.randn(3, 4))
    assert eps_hat.shape == (3, 10, 12) and (eps_hat == 0).all()     # zero-initialised output conv
    torch.nn.init.normal_(net.tail[-1].weight)                        # once trained, the code changes eps_hat
    x, i = torch.randn(2, 10, 13), torch.tensor([3, 3])              # odd T is padded and cropped back
    assert not torch.allclose(net(x, i, torch.zeros(2, 4)), net(x, i, torch.ones(2, 4)))


def test_gn_attention_equals_scaled_dot_product_attention():
    torch.manual_seed(0)
    att, x = gn.AttnBlock(16, groups=8), torch.randn(3, 16, 11)
    h = att.norm(x)
    q, k, v = (p(h).transpose(1, 2) for p in (att.proj_q, att.proj_k, att.proj_v))  # (B, T, C)
    ref = x + att.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    assert torch.allclose(att(x), ref, atol=1e-5)


def test_gn_unet_paper_layout_block_counts_and_any_length(T=13):  # T = 13 is padded to 16 for 3 downsamples
    net = gn.UNet1D(N=5, C=32, L=3, T_diff=10, dropout=0.1, ch_mult=(1, 2, 2, 2), res_blocks=2, attention=True,
                    skip_all=True, groups=32)
    blocks = [m for m in net.modules() if isinstance(m, gn.AuxResBlock)]
    assert len(blocks) == 4 * 2 + 2 + 4 * 3                           # models.py AuxiliaryUNet: 2 down, 3 up per level
    assert sum(isinstance(m, gn.AttnBlock) for m in net.modules()) == 2 + 1 + 3  # level 2 down, middle, level 2 up
    assert all(m.num_groups == 32 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))
    torch.nn.init.normal_(net.tail[-1].weight)
    net.eval()
    out = net(torch.randn(2, 5, T), torch.tensor([0, 9]), torch.randn(2, 3))
    assert out.shape == (2, 5, T) and torch.isfinite(out).all() and out.abs().sum() > 0


def test_gn_schedule_ends_near_zero_and_ddim_oracle_recovers_x0():
    model = gn.GNOCCHI(gn.Config(), N=6, T=10)
    ab = model.alpha_bar
    assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] < 0.01    # abar_T ~ 0: x_T is almost white noise
    ref = torch.cumprod(1 - torch.linspace(1e-5, 1e-2, 1000, dtype=torch.float64), 0)[-1]  # InfoDiffusion's
    assert abs(ab[-1].item() - ref.item()) < 1e-3                        # 1000-step schedule ends at the same abar
    paper = gn.GNOCCHI(gn.parse_args(["--paper"]), N=6, T=10).alpha_bar
    assert len(paper) == 1000 and abs(paper[-1].item() - ref.item()) < 1e-5
    x0, x_T = torch.randn(5, 6, 10), torch.randn(5, 6, 10)

    def oracle(x, i):  # the exact eps for data that is the single point x0
        return (x - ab[i].sqrt()[:, None, None] * x0) / (1 - ab[i]).sqrt()[:, None, None]
    assert torch.allclose(gn.ddim_sample(oracle, x_T, ab, steps=7), x0, atol=1e-4)
    noisy = gn.ddim_sample(oracle, x_T, ab, steps=7, eta=1.0, gen=torch.Generator().manual_seed(0))
    assert torch.allclose(noisy, x0, atol=1e-4)                        # the last step has sigma = 0 and lands on x0
    q = model.q_sample(x0, torch.full((5,), 10), x_T)                 # forward process closed form
    assert torch.allclose(oracle(q, torch.full((5,), 10)), x_T, atol=1e-5)


def test_gn_lr_factor_is_warmup_to_two_then_cosine_to_zero():
    cfg = gn.Config(steps=100, warmup=10)
    f = [gn.lr_factor(s, cfg) for s in range(101)]
    assert f[0] == 1 and f[5] == 1.5 and f[10] == 2 and abs(f[55] - 1) < 1e-12 and abs(f[100]) < 1e-12
    assert all(a < b for a, b in zip(f[:10], f[1:11])) and all(a > b for a, b in zip(f[10:100], f[11:]))


# -----------------------------------------------------------------------------
# Data: held-out hygiene and the --data checks
# -----------------------------------------------------------------------------
def test_gn_heldout_targets_never_in_training_or_normalisation():
    cfg = gn.Config(trials_per_target=6, n_neurons=8)
    d = gn.make_data(cfg)
    ho_cm = {tuple(2.0 * np.array(t)) for t in gn.HELDOUT}
    assert {tuple(t) for t in d["targets"][d["heldout"]]} == ho_cm
    d1 = gn.prepare(dict(d), cfg.seed)
    assert not (d1["train"] & d["heldout"]).any() and not (d1["val"] & d["heldout"]).any()
    assert not ho_cm & {tuple(t) for t in d["targets"][d1["train"] | d1["val"]]}
    d2 = dict(d, rates=d["rates"].copy())
    d2["rates"][d["heldout"]] *= 10.0                                  # change held-out data only
    d2 = gn.prepare(d2, cfg.seed)
    assert np.array_equal(d1["x"][~d["heldout"]], d2["x"][~d["heldout"]])  # normalisation ignores held-out trials


GN_GOOD = np.random.default_rng(0).poisson(2.0, (20, 5, 12))
GN_BAD_DATA = {  # name -> (arrays saved with np.savez, or a callable writing the file; the message fragment expected)
    "nofile": (None, "no such file"),
    "nokey": (dict(counts=GN_GOOD), r"exactly one of the arrays 'rates' or 'spikes'.*\['counts'\]"),
    "both": (dict(rates=GN_GOOD * 1.0, spikes=GN_GOOD), "exactly one of the arrays"),
    "2d": (dict(rates=GN_GOOD[0] * 1.0), r"shaped \(trials >= 8, neurons, bins >= 4\), found the shape \(5, 12\)"),
    "fewtrials": (dict(spikes=GN_GOOD[:5]), r"trials >= 8.*\(5, 5, 12\)"),
    "nan": (dict(rates=np.full((20, 5, 12), np.nan)), r"finite 'rates', found 1200 NaN"),
    "inf": (dict(spikes=np.where(GN_GOOD > 3, np.inf, GN_GOOD)), r"finite 'spikes', found 0 NaN and \d+ infinite"),
    "neg": (dict(spikes=-GN_GOOD), r"non-negative integer spike counts.*found values such as \[-"),
    "fraction": (dict(spikes=GN_GOOD + 0.5), r"integer spike counts.*found values such as \[\d+\.5"),
    "npyfloat": (lambda p: np.save(p, GN_GOOD * 0.3 + 0.1), r"a \.npy file is read as spikes"),
    "toomany": (dict(spikes=np.where(GN_GOOD > 5, 501, GN_GOOD)), r"at most 500 spikes per neuron per bin.*re-bin.*501"),
    "hugerates": (dict(rates=np.full((20, 5, 12), 1e12)), r"\|rates\| <= 10000.*found a value of 1e\+12"),
    "overflow": (dict(rates=np.full((20, 5, 12), 1e200)), r"overflow float32.*1e\+200"),
    "tlen": (dict(spikes=GN_GOOD, targets=np.zeros((19, 2))), r"'targets' \(x, y\) shaped \(20, 2\).*\(19, 2\)"),
    "tnan": (dict(spikes=GN_GOOD, targets=np.full((20, 2), np.nan)), r"finite numeric 'targets'"),
    "hobool": (dict(spikes=GN_GOOD, targets=np.zeros((20, 2)), heldout=np.zeros(20)), r"'heldout' as a bool.*float64"),
    "honotargets": (dict(spikes=GN_GOOD, heldout=np.ones(20, bool)), r"'targets' with 'heldout'"),
    "hoall": (dict(spikes=GN_GOOD, targets=np.zeros((20, 2)), heldout=np.arange(20) > 2), r">= 8 training.*found 3"),
}


@pytest.mark.parametrize("name", list(GN_BAD_DATA))
def test_gn_bad_data_raises_value_error_naming_the_file_before_output(tmp_path, name):
    arrays, match = GN_BAD_DATA[name]
    path = str(tmp_path / (f"{name}.npy" if callable(arrays) else f"{name}.npz"))
    if callable(arrays):
        arrays(path)
    elif arrays is not None:
        np.savez(path, **arrays)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        gn.main(["--data", path, *GN_TINY, "--out", str(out)])
    assert str(e.value).startswith(f"--data {path}: expected ")
    assert not out.exists(), "outputs written before validation"


def test_gn_own_data_spikes_are_smoothed_counts_and_rates_pass_through(tmp_path):
    spikes = GN_GOOD.astype(np.float32)                                   # integer-valued floats are counts too
    np.save(tmp_path / "s.npy", spikes)
    cfg = gn.Config(smooth_bins=1.5)
    d = gn.load_data(str(tmp_path / "s.npy"), cfg)
    assert np.allclose(d["rates"], spikes @ gn.smooth_matrix(12, 1.5)) and not d["heldout"].any()
    assert np.allclose(np.full(12, 3.0) @ gn.smooth_matrix(12, 1.5), 3.0)  # a weighted mean per bin, also at edges
    np.savez(tmp_path / "r.npz", rates=-spikes, targets=np.ones((20, 2)), heldout=np.arange(20) < 4)
    d = gn.load_data(str(tmp_path / "r.npz"), cfg)
    assert np.array_equal(d["rates"], -spikes) and d["heldout"].sum() == 4 and d["targets"].shape == (20, 2)


# -----------------------------------------------------------------------------
# Training watches itself; the LFADS-like baseline
# -----------------------------------------------------------------------------
def _tiny_data(scale=1.0):
    d = gn.prepare(gn.make_data(gn.Config(n_neurons=6, trials_per_target=2)), 0)
    d["x"] = d["x"] * scale
    return d


def test_gn_gnocchi_training_stops_on_a_non_finite_loss(tmp_path):
    with pytest.raises(FloatingPointError, match=r"GNOCCHI: the training loss became nan at step \d+; likely cause"):
        gn.main([*GN_TINY, "--lr", "1e6", "--out", str(tmp_path)])
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "samples.npz").exists()


def test_gn_lfads_training_stops_on_a_non_finite_loss():
    cfg = gn.Config(code_dim=2, lfads_steps=3, batch=4)
    with pytest.raises(FloatingPointError, match="LFADS-like: the training loss became inf at step 1"):
        gn.lfads_baseline(_tiny_data(scale=1e30), cfg, torch.device("cpu"))


def test_gn_lfads_kl_matches_torch_and_generator_is_an_autonomous_gru():
    torch.manual_seed(0)
    vae, x = gn.SeqVAE(N=6, L=3, H=8, n_fac=4), torch.randn(5, 6, 9)
    mu, logvar = vae.posterior(x)
    _, kl = vae.loss(x)                                                # the posterior is deterministic given x
    q, p = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    assert abs(kl - torch.distributions.kl_divergence(q, p).sum(1).mean().item()) < 1e-5   # oracle: closed form
    g0 = torch.randn(2, 3)
    out = vae.decode(g0, 9)
    assert out.shape == (2, 6, 9) and not torch.allclose(out, vae.decode(-g0, 9))
    # oracle: the GRU equations unrolled by hand from h_0 = tanh(W g0 + b) with zero inputs
    W_hh, b_ih, b_hh = vae.generator.weight_hh_l0, vae.generator.bias_ih_l0, vae.generator.bias_hh_l0
    h, ref = torch.tanh(vae.to_h0(g0)), []
    for _ in range(9):
        a_i, a_h = b_ih.chunk(3), (h @ W_hh.T + b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(a_i[0] + a_h[0]), torch.sigmoid(a_i[1] + a_h[1])
        h = (1 - z) * torch.tanh(a_i[2] + r * a_h[2]) + z * h
        ref.append(vae.readout(vae.to_fac(h)))
    assert torch.allclose(out, torch.stack(ref, 2), atol=1e-5)
    assert torch.allclose(vae.decode(g0, 4), out[..., :4], atol=1e-6)   # shorter unroll = prefix: no look-ahead


# -----------------------------------------------------------------------------
# --paper: InfoDiffusion's scale built in full, one optimiser step at the paper's shapes
# -----------------------------------------------------------------------------
def test_gn_paper_preset_models_at_full_size_take_one_step(capsys):
    cfg = gn.parse_args(["--paper"])
    assert (cfg.preset, cfg.channels, cfg.ch_mult, cfg.res_blocks, cfg.code_dim) == ("paper", 64, "1,2,2,2", 2, 32)
    assert (cfg.diff_steps, cfg.beta_1, cfg.beta_T, cfg.lr, cfg.dropout, cfg.ddim_steps, cfg.ddim_eta) == (
        1000, 1e-5, 1e-2, 1e-4, 0.1, 1000, 0.01)
    N, T = gn.Config().n_neurons, 36                                   # the reach demo's shapes
    torch.manual_seed(0)
    model = gn.GNOCCHI(cfg, N, T)
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_eps = sum(p.numel() for p in model.eps_model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = {id(p) for p in model.parameters()}
    saved = []

    def pack(t):  # bytes of the activations autograd keeps for the backward pass (parameters excluded)
        saved.append(0 if id(t) in params or t._base is not None and id(t._base) in params else t.nbytes)
        return t
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, parts = model.loss(torch.randn(2, N, T))
    loss.backward()
    opt.step()
    assert np.isfinite(loss.item()) and all(np.isfinite(v) for v in parts.values())
    assert model.eps_model.tail[-1].weight.abs().sum() > 0              # the zero output conv moved first
    loss, _ = model.loss(torch.randn(2, N, T))                         # from now on every layer gets a gradient
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > 0.9 * len(before)
    model.eval()
    x = model.sample(torch.randn(2, cfg.code_dim), torch.Generator().manual_seed(0), steps=3)
    assert x.shape == (2, N, T) and torch.isfinite(x).all()
    n = n_enc + n_eps
    with capsys.disabled():
        print(f"\n--paper GNOCCHI: encoder {n_enc:,} + eps_theta U-Net {n_eps:,} = {n:,} parameters; "
              f"activations {sum(saved) / 2 / 2**20:.2f} MiB per trial in training; params + grads + AdamW "
              f"{16 * n / 2**20:.0f} MiB")
    gn.report_size(model, cfg, torch.device("cpu"))
    text = capsys.readouterr().out
    assert "WARNING: --paper" in text and f"{n / 1e6:.2f}M parameters" in text and "20000 training steps" in text


def test_gn_paper_lfads_like_baseline_takes_one_step():
    cfg = gn.parse_args(["--paper", "--lfads-steps", "1", "--batch", "2"])
    codes, gen, kl = gn.lfads_baseline(_tiny_data(), cfg, torch.device("cpu"))
    assert codes.shape[1] == 32 and gen(codes[:2]).shape == (2, 6, 36) and np.isfinite(kl)


# -----------------------------------------------------------------------------
# One --quick run end to end: gnocchi's own outputs; the same seed gives the same metrics
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gnocchi_quick")
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "gnocchi_minimal.py"), *GN_TINY, "--out", str(out)], cwd=out,
                       env=env, capture_output=True, text=True, timeout=600)
    return r, out


def test_gn_quick_end_to_end(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stderr
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz", "codes.npz", "gnocchi.pt"):
        assert (out / f).exists(), f
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        "task.png", "latents.png", "heldout_prediction.png", "traversal.png", "psth.png", "summary.png"}
    metrics = json.loads((out / "metrics.json").read_text())
    for prefix in ("gnocchi", "pca", "lfads"):
        for k in ("heldout_r2", "psth_r2", "cos_wx_wy", "snr_train", "unwanted", "gen_endpoint_err_cm"):
            assert np.isfinite(metrics[f"{prefix}_{k}"]), (prefix, k)
    assert 0 <= metrics["gnocchi_cos_wx_wy"] <= 1 and "targets" not in metrics
    with np.load(out / "codes.npz") as c, np.load(out / "samples.npz") as s:
        M = len(c["codes"])
        assert c["codes"].shape == (M, 4) and c["baseline_codes"].shape == c["lfads_codes"].shape == (M, 4)
        assert c["targets"].shape == (M, 2) and c["heldout"].dtype == bool and c["heldout"].shape == (M,)
        assert list(s.keys())[:2] == ["real", "generated"] and s["real"].shape[1:] == s["generated"].shape[1:]
        assert len(s["real"]) == c["heldout"].sum() and len(s["generated"]) == 3 * 4   # 3 held-out targets x K
        assert s["real"].min() >= 0                                      # in the data's units (Hz), not z units
    sd = torch.load(out / "gnocchi.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in sd) and any(k.startswith("eps_model.down.") for k in sd)


# =====================================================================================================================
# Spike-GAN
# =====================================================================================================================
SG_TINY = ["--n-train", "256", "--n-test", "128", "--n-gen", "256", "--iters", "4", "--eval-every", "2",
           "--d-features", "4", "--g-features", "4", "--window", "16", "--neurons", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module (small ops on a shared CPU), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Linear(torch.nn.Module):
    """A linear critic D(x) = <w, x> that records its inputs."""

    def __init__(self, w):
        super().__init__()
        self.w = w
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach())
        return (x * self.w).flatten(1).sum(1)


# -----------------------------------------------------------------------------
# WGAN-GP objective
# -----------------------------------------------------------------------------
def test_sg_gradient_penalty_norm_over_all_non_batch_dims():
    torch.manual_seed(0)
    w = torch.randn(3, 5)                                  # (N, T): grad of a linear critic is w for every sample
    x, xf = torch.rand(4, 3, 5), torch.rand(4, 3, 5)
    gp = sg.gradient_penalty(Linear(w), x, xf)
    assert torch.allclose(gp, (w.norm() - 1) ** 2)         # Frobenius norm of the whole sample, not per row
    assert not torch.allclose(gp, ((w.norm(dim=1) - 1) ** 2).mean())


def test_sg_gradient_penalty_zero_for_unit_norm_linear_critic_and_interpolates_on_segment():
    torch.manual_seed(1)
    w = torch.randn(3, 5)
    D = Linear(w / w.norm())
    x, xf = torch.rand(6, 3, 5), torch.rand(6, 3, 5)
    alpha = torch.rand(6, 1, 1)
    assert sg.gradient_penalty(D, x, xf, alpha).abs() < 1e-10
    assert torch.allclose(D.seen[-1], x + alpha * (xf - x))    # one alpha per sample
    sg.gradient_penalty(D, x, xf)                               # random alpha: still between x and x_fake
    t = (D.seen[-1] - x) / (xf - x)                            # (B, N, T), constant within a sample
    assert torch.allclose(t, t[:, :1, :1].expand_as(t), atol=1e-4)
    assert (t >= 0).all() and (t <= 1).all()


def test_sg_fused_critic_pass_equals_separate_passes():
    torch.manual_seed(0)
    D = sg.init_weights(sg.Critic(N=8, T=16, F_=4))
    x, x_fake = (torch.rand(6, 8, 16) < 0.2).float(), torch.rand(6, 8, 16)
    torch.manual_seed(1)                                       # same interpolation weights alpha in both
    fused = sg.critic_loss(D, x, x_fake)
    torch.manual_seed(1)
    separate = D(x_fake).mean() - D(x).mean() + 10.0 * sg.gradient_penalty(D, x, x_fake)
    assert torch.allclose(fused, separate, atol=1e-6)


# -----------------------------------------------------------------------------
# Model and training
# -----------------------------------------------------------------------------
def test_sg_generator_shape_range_and_init():
    torch.manual_seed(0)
    G = sg.init_weights(sg.Generator(16, 32, 8))
    p = G(torch.randn(5, 128))
    assert p.shape == (5, 16, 32) and (p > 0).all() and (p < 1).all()
    assert sg.Critic(16, 32, 8)(p).shape == (5,)
    for name, prm in G.named_parameters():
        if name.endswith("bias"):
            assert (prm == 0).all()
        else:
            assert prm.abs().max() <= 0.02 * math.sqrt(3)


def test_sg_one_training_iteration_changes_both_nets():
    cfg = sg.Config(iters=1, d_features=4, g_features=4, batch=16)
    x = np.random.default_rng(0).random((64, 8, 16)) < 0.2
    torch.manual_seed(0)
    G, D = sg.make_models(cfg, 8, 16)
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    assert sg.train(cfg, G, D, x, torch.device("cpu")) == []  # no monitor, no history
    changed = [not torch.equal(a, b) for a, b in zip(before, [*G.parameters(), *D.parameters()])]
    n_G = len(list(G.parameters()))
    assert any(changed[:n_G]) and any(changed[n_G:])


def test_sg_lr_schedule_linear_decay_and_constant():
    cfg = sg.Config(lr=4e-3, iters=100)
    assert sg.lr_at(cfg, 0) == 4e-3 and math.isclose(sg.lr_at(cfg, 50), 2e-3) and sg.lr_at(cfg, 100) == 0
    assert sg.lr_at(dataclasses.replace(cfg, lr_decay=False), 99) == 4e-3


def test_sg_real_batches_cover_the_training_set_once_per_epoch():
    torch.manual_seed(0)
    data = torch.arange(10, dtype=torch.uint8).view(10, 1, 1)            # (S, N, T) = (10, 1, 1), sample i holds i
    it = sg.real_batches(data, 3)
    epochs = [torch.cat([next(it).flatten() for _ in range(3)]) for _ in range(2)]   # 3 full batches per epoch
    for e in epochs:
        assert e.dtype == torch.float32 and len(set(e.tolist())) == 9   # no sample twice within an epoch
    assert not torch.equal(epochs[0], epochs[1])                        # reshuffled


def test_sg_sample_and_binarize_draw_on_the_cpu_from_their_generator():
    torch.manual_seed(0)
    G = sg.init_weights(sg.Generator(4, 8, 2))
    p = sg.sample(G, 5, 128, torch.Generator().manual_seed(7), chunk=2)
    with torch.no_grad():
        assert torch.equal(p, G(torch.randn(5, 128, generator=torch.Generator().manual_seed(7))))
    x = sg.binarize(p, torch.Generator().manual_seed(1))
    u = torch.rand(p.shape, generator=torch.Generator().manual_seed(1))
    assert x.dtype == bool and (x == (p > u).numpy()).all()


def test_sg_training_stops_at_a_non_finite_loss():
    cfg = sg.Config(iters=3, d_features=4, g_features=4, batch=16, lr=1e10)
    x = np.random.default_rng(0).random((64, 8, 16)) < 0.2
    torch.manual_seed(0)
    G, D = sg.make_models(cfg, 8, 16)
    with pytest.raises(FloatingPointError, match=r"Spike-GAN (critic|generator): the training loss became .* step 1"):
        sg.train(cfg, G, D, x, torch.device("cpu"))


# -----------------------------------------------------------------------------
# --paper: the paper's Fig 2 configuration at full size
# -----------------------------------------------------------------------------
def paper_cfg():
    return sg.parse_args(["--paper"])


def test_sg_paper_preset_is_the_fig2_configuration():
    cfg = paper_cfg()
    assert cfg.preset == "paper" and cfg.demo == "uniform"
    assert (cfg.neurons, cfg.window, cfg.n_train, cfg.d_features, cfg.g_features) == (16, 128, 8192, 128, 128)
    assert (cfg.lr, cfg.lr_decay, cfg.batch, cfg.critic_iters, cfg.iters) == (1e-4, False, 64, 5, 300000)
    assert (cfg.lambd, cfg.layers, cfg.kernel, cfg.z_dim) == (10.0, 2, 5, 128)
    assert all(sg.lr_at(cfg, t) == 1e-4 for t in (0, 150000, 299999))


def test_sg_paper_models_full_size_and_one_optimiser_step_at_batch_2(capsys):
    cfg = paper_cfg()
    torch.manual_seed(0)
    G, D = sg.make_models(cfg, cfg.neurons, cfg.window)
    n_G = sum(p.numel() for p in G.parameters())
    n_D = sum(p.numel() for p in D.parameters())
    with capsys.disabled():
        print(f"\n  --paper: generator {n_G} parameters, critic {n_D} parameters")
    N, T, Fc = 16, 128, 128                                    # paper Fig 1: critic channels 256, 512
    assert n_D == (N * 2 * Fc * 5 + 2 * Fc) + (2 * Fc * 4 * Fc * 5 + 4 * Fc) + (4 * Fc * T // 4 + 1) == 692993
    assert n_G == (128 * 4 * Fc * T // 4 + 4 * Fc * T // 4) + (4 * Fc * 2 * Fc * 5 + 2 * Fc) + (2 * Fc * N * 5 + N)
    assert round(n_D / 1e6, 2) == 0.69 and round(n_G / 1e6, 2) == 2.79   # the repo's paper-time counts
    before = [p.detach().clone() for p in [*G.parameters(), *D.parameters()]]
    x = np.random.default_rng(0).random((4, N, T)) < 0.1
    step = dataclasses.replace(cfg, iters=1, critic_iters=1, batch=2)    # one critic step (with GP), one G step
    sg.train(step, G, D, x, torch.device("cpu"))
    after = [*G.parameters(), *D.parameters()]
    assert all(torch.isfinite(p).all() for p in after)
    changed = [not torch.equal(a, b) for a, b in zip(before, after)]
    n_G = len(list(G.parameters()))
    assert all(changed[:n_G]) and any(changed[n_G:])


def test_sg_paper_on_cpu_warns_with_the_size_of_the_job(capsys):
    cfg = paper_cfg()
    G, D = sg.make_models(dataclasses.replace(cfg, g_features=2, d_features=2), 16, 128)  # counts only
    sg.warn_if_paper_on_cpu(cfg, G, D, torch.device("cpu"))
    err = capsys.readouterr().err
    assert "WARNING" in err and "300000 generator iterations" in err and "GPU" in err
    sg.warn_if_paper_on_cpu(cfg, G, D, torch.device("cuda"))          # no warning on a GPU, nor without --paper
    sg.warn_if_paper_on_cpu(sg.parse_args([]), G, D, torch.device("cpu"))
    assert capsys.readouterr().err == ""


def test_sg_quick_preset_caps_importance_maps():
    assert sg.parse_args(["--quick", "--demo", "packets"]).importance == 32
    assert sg.parse_args(["--demo", "packets"]).importance == 512


# -----------------------------------------------------------------------------
# Data generators
# -----------------------------------------------------------------------------
def test_sg_uniform_data_rates_correlations_and_refractory_dip():
    cfg = sg.Config()
    rng = np.random.default_rng(0)
    prm = sg.make_params(cfg, rng)
    x = sg.make_uniform(cfg, 2048, prm, rng)
    st = sg.spike_stats(x)
    assert x.shape == (2048, 16, 32) and 0.08 < x.mean() < 0.15          # ~0.119 at T 32 (sim_pop_activity.py)
    ratio = st["acg"][11:14] / x.mean()                                  # lags 1, 2, 3
    assert ratio[0] < 0.2 and ratio[0] < ratio[1] < ratio[2] < 1.0      # ~.12 .37 .64
    r = np.corrcoef(x.transpose(1, 0, 2).reshape(16, -1))               # (N, S*T) -> (N, N)
    first = [np.where(prm["perm"] == 2 * g)[0][0] for g in range(8)]
    second = [np.where(prm["perm"] == 2 * g + 1)[0][0] for g in range(8)]
    r_pair = r[first, second]
    assert r_pair.min() > 0.03 and np.abs(r[np.triu_indices(16, 1)]).sum() - r_pair.sum() < 0.02 * 112


def test_sg_refractory_rules():
    rng = np.random.default_rng(0)
    x = rng.random((4000, 30)) < 0.3
    h = sg.refractory_hard(x.copy(), 0.3, 3, rng)
    assert all((np.diff(np.flatnonzero(row)) > 3).all() for row in h) and h.sum() > 0
    s = sg.refractory_soft(x.copy(), np.full(4000, 0.3), 2.0, rng)
    assert (s <= x).all()                                               # only deletes spikes
    assert (s[:, :-1] & s[:, 1:]).mean() < 0.2 * s.mean() ** 2         # strong lag-1 suppression


def test_sg_packet_test_set_onsets_in_window():
    cfg = sg.Config(demo="packets", rate=1e-9, group=8, neurons=16, window=32)
    rng = np.random.default_rng(0)
    prm = sg.make_params(cfg, rng)
    x = sg.make_packets(cfg, 200, prm, rng, test=True)[:, np.argsort(prm["perm"])]   # undo the permutation
    assert x[:, 8:].sum() == 0                                          # only group 0 carries packets
    on = x[:, 0]                                                        # neuron 0 fires at the onsets
    assert on[:, :8].sum() == 0 and on[:, 17:].sum() == 0 and on.sum() > 50
    assert (x[:, 3, 3:] == on[:, :-3]).all()                            # neuron k fires at t0 + k


# -----------------------------------------------------------------------------
# Baseline, statistics, importance
# -----------------------------------------------------------------------------
def test_sg_phi2_matches_closed_form():
    rho = torch.tensor([-0.9, -0.3, 0.0, 0.5, 0.95], dtype=torch.float64)
    z = torch.zeros_like(rho)
    assert torch.allclose(sg.Phi2(z, z, rho), 0.25 + torch.arcsin(rho) / (2 * math.pi), atol=1e-6)


def test_sg_dg_fit_reproduces_rates_and_covariances():
    rng = np.random.default_rng(0)
    N, T, S = 3, 4, 20000                                               # a true DG with lag-0 and lag-1 structure
    u = rng.standard_normal((S, N, T + 1))
    u = u[..., 1:] + 0.6 * u[..., :-1] + 0.5 * u[:, :1, 1:]             # temporal + shared input
    x = u > np.array([1.0, 0.5, 1.2])[:, None] * u.std()
    gamma, A = sg.fit_dg(x)
    y = sg.sample_dg(gamma, A, 40000, torch.Generator().manual_seed(0))
    sx, sy = sg.spike_stats(x, 2), sg.spike_stats(y, 2)
    assert np.abs(x.mean((0, 2)) - y.mean((0, 2))).max() < 0.01
    assert np.abs(sx["cov"] - sy["cov"]).max() < 0.01 and np.abs(sx["lag_cov"] - sy["lag_cov"]).max() < 0.01


def test_sg_importance_is_zero_where_there_is_no_spike():
    torch.manual_seed(0)
    D = sg.init_weights(sg.Critic(6, 16, 4))
    x = (torch.rand(10, 6, 16) < 0.3).float()
    I = sg.importance_map(D, x, P=4, reps=2, gen=torch.Generator().manual_seed(0))
    assert I.shape == (10, 6, 16) and (I[x.numpy() == 0] == 0).all() and (I[x.numpy() == 1] > 0).mean() > 0.9


def test_sg_spike_stats_on_a_known_pattern():
    x = np.zeros((1, 2, 8), bool)
    x[0, 0, [0, 2, 4]] = True                                           # period-2 train: lag-1 never, lag-2 often
    st = sg.spike_stats(x, 3)
    assert np.allclose(st["acg"], [0, 2 / 3, 0, 0, 0, 2 / 3, 0]) and st["lag1_ratio"] == 0
    assert np.allclose(st["k_probs"], [5 / 8, 3 / 8, 0]) and np.allclose(st["mean"], [3, 0])


# -----------------------------------------------------------------------------
# End to end: the metrics describe Spike-GAN's own samples
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sg_tiny")
    return out, sg.main([*SG_TINY, "--out", str(out)])


def test_sg_end_to_end_metrics_are_spike_gans_samples(tiny_run):
    out, metrics = tiny_run
    with np.load(out / "samples.npz") as z:
        real, gen, probs, dg = z["real"], z["generated"], z["generated_probs"], z["dg"]
    assert real.shape == (128, 8, 16) and gen.shape == probs.shape == dg.shape == (256, 8, 16)
    assert set(np.unique(gen)) <= {0, 1} and ((probs > 0) & (probs < 1)).all()
    assert not np.array_equal(gen, dg)
    assert abs(gen.mean() - probs.mean()) < 0.02                        # Bernoulli draws of the probabilities
    ours = sg.compare(sg.spike_stats(gen.astype(bool)), sg.spike_stats(real.astype(bool)))
    for k, v in ours.items():                                           # metrics["Spike-GAN"] is these samples'
        assert metrics["Spike-GAN"][k] == pytest.approx(v, nan_ok=True), k
    assert metrics["Spike-GAN"] != metrics["DG"]
    assert [h["iter"] for h in metrics["history"]] == [2, 4] and json.loads((out / "metrics.json").read_text())
    G = sg.Generator(8, 16, 4)
    G.load_state_dict(torch.load(out / "generator.pt", weights_only=True))
    assert "targets" not in metrics


def test_sg_long_series_is_cut_into_windows(tmp_path):
    x = (np.random.default_rng(0).random((1000, 5)) < 0.1).astype(np.uint8)
    np.savez(tmp_path / "s.npz", spikes=x)
    cfg = sg.Config(data=str(tmp_path / "s.npz"), window=16, stride=8, batch=8)
    tr, te = sg.load_spikes(cfg, np.random.default_rng(0))
    assert tr.shape == ((800 - 16) // 8 + 1, 5, 16) and te.shape == ((200 - 16) // 8 + 1, 5, 16)
    assert (tr[1] == x[8:24].T).all() and (te[0] == x[800:816].T).all()


def test_sg_own_data_runs_and_same_seed_gives_identical_metrics(tmp_path):
    x = np.random.default_rng(0).random((400, 8, 16)) < 0.1
    np.save(tmp_path / "x.npy", x)
    runs = []
    for name in ("a", "b"):
        sg.main(["--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / name), *SG_TINY])
        runs.append((tmp_path / name / "metrics.json").read_text())
    assert runs[0] == runs[1]
    assert json.loads(runs[0])["data"]["shape"] == [320, 8, 16]


# -----------------------------------------------------------------------------
# --data checks: each bad file stops with the intended ValueError before anything is written
# -----------------------------------------------------------------------------
def _binary(shape, p=0.1, seed=0):
    return np.random.default_rng(seed).random(shape) < p


def _always_on():
    x = _binary((300, 4, 8))
    x[:, 2] = True
    return x


SG_BAD_DATA = [
    ("counts.npy", lambda: np.full((300, 4, 8), 2),
     r"expected binary spikes \(0 or 1 in every bin\), found the values \[2\]"),
    ("nan.npy", lambda: np.where(np.eye(8)[None].repeat(300, 0) > 0, np.nan, 0.0), "found 2400 NaN or inf values"),
    ("4d.npy", lambda: np.zeros((10, 4, 8, 2)), r"\(trials, neurons, bins\) or \(time, neurons\) array, found shape"),
    ("empty.npy", lambda: np.zeros((0, 4, 8)), r"non-empty .* found shape \(0, 4, 8\)"),
    ("silent.npy", lambda: np.zeros((300, 4, 8)), r"expected some spikes, found none"),
    ("always.npy", _always_on, r"found neurons \[2\] spiking in every bin"),
    ("full.npy", lambda: np.ones((300, 4, 8)), r"found neurons \[0, 1, 2, 3\] spiking in every bin"),
    ("few.npy", lambda: _binary((20, 4, 8)), r"at least 128 training and 16 held-out samples, found 16 and 4"),
    ("odd_bins.npy", lambda: _binary((300, 4, 6)), r"multiple of 2\^layers = 4, found 6"),
    ("transposed.npy", lambda: _binary((8, 5000)), r"transpose it"),
    ("late_spikes.npy", lambda: np.concatenate([np.zeros((5000, 4)), _binary((1000, 4), 0.3)]), "training part"),
]


@pytest.mark.parametrize("fname, make, match", SG_BAD_DATA, ids=[b[0] for b in SG_BAD_DATA])
def test_sg_bad_data_raises_the_intended_value_error_before_output(tmp_path, fname, make, match):
    np.save(tmp_path / fname, make())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match) as e:
        sg.main(["--data", str(tmp_path / fname), "--out", str(out), "--quick", "--window", "32"])
    assert str(tmp_path / fname) in str(e.value)                        # the message names the file
    assert not out.exists()


def test_sg_bad_data_files_and_keys(tmp_path):
    out = tmp_path / "out"
    np.savez(tmp_path / "y.npz", counts=_binary((300, 4, 8)))
    with pytest.raises(ValueError, match=r"expected an array named 'spikes', found \['counts'\]"):
        sg.main(["--data", str(tmp_path / "y.npz"), "--out", str(out), "--quick"])
    (tmp_path / "x.txt").write_text("0 1 0\n")
    with pytest.raises(ValueError, match=r"expected a \.npy file or a \.npz archive .* found a file with the ext"):
        sg.main(["--data", str(tmp_path / "x.txt"), "--out", str(out), "--quick"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"bad\.npz: expected a \.npy file or a \.npz archive"):
        sg.main(["--data", str(tmp_path / "bad.npz"), "--out", str(out), "--quick"])
    assert not out.exists()


# =====================================================================================================================
# Tutorial: every code cell of tutorial.ipynb runs, in order, in a fresh interpreter (no Jupyter needed)
# =====================================================================================================================
def test_tutorial_notebook_executes(tmp_path, monkeypatch):
    """Every code cell of tutorial.ipynb, in order, in a fresh interpreter, at the notebook's tiny sizes
    (NEUROGEN_TUTORIAL_FAST=1; its real runs take minutes). The cells assert the identity checks (S4 convolution ==
    recurrence, the DDPM posterior mean and forward process, MMD(x, x) = 0, the penalty of a linear critic) and the
    exercise checks against the files' own functions. Here also: the notebook is committed with its outputs (every
    code cell executed, figures embedded, under 3 MB); each exercise stub raises NotImplementedError and is
    followed by its solution and its check; the three runs and the side-by-side table leave finite numbers; and
    nothing is written outside the notebook's output folder (the temp folder is redirected into tmp_path)."""
    import re
    path = os.path.join(ROOT, "tutorial.ipynb")
    nb = json.loads(open(path).read())
    assert nb["nbformat"] == 4 and os.path.getsize(path) < 3e6
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    cells = ["".join(c["source"]) for c in code]
    assert len(cells) >= 20 and sum("assert " in c for c in cells) >= 10
    assert all(c.get("execution_count") for c in code), "commit the notebook executed, with its outputs"
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", [])) >= 6
    stubs = [i for i, src in enumerate(cells) if "raise NotImplementedError" in src]
    assert len(stubs) >= 3
    for i in stubs:                                            # stub -> solution (same functions) -> check
        names = re.findall(r"^def (\w+)", cells[i], re.M)
        assert names and re.findall(r"^def (\w+)", cells[i + 1], re.M) == names, cells[i + 1]
        assert "NotImplementedError" not in cells[i + 1] and "assert" in cells[i + 2]
        ns = {}
        exec(cells[i], ns)
        for name in names:
            with pytest.raises(NotImplementedError):
                ns[name](*[None] * ns[name].__code__.co_argcount)
    script = tmp_path / "tutorial_cells.py"
    script.write_text("\n\n".join(f"# --- cell {i}\n{src}" for i, src in enumerate(cells)) +
                      "\nprint('METRICS', json.dumps({'ldns': [m_ldns['gen_vs_real/r_corr'], "
                      "m_ldns['acg/ldns_sh/lag1_ratio']], 'gnocchi': [m_gn['gnocchi_heldout_r2'], "
                      "m_gn['gnocchi_psth_r2']], 'spikegan': [m_sg['Spike-GAN']['mean_r'], m_sg['DG']['cov_r']], "
                      "'side': side}))\n")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("NEUROGEN_TUTORIAL_FAST", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))      # OUT = tempfile.mkdtemp() lands in tmp_path/tmp
    r = run_cli([str(script)], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    vals = json.loads(r.stdout.split("METRICS ")[-1])
    side = vals.pop("side")
    assert all(np.isfinite(v) for pair in vals.values() for v in pair), vals
    assert {"real vs real (floor)", "LDNS alone (Poisson)", "LDNS + spike history", "Spike-GAN", "DG"} < set(side)
    assert all(0 < row["P(spike)"] < 1 for row in side.values()), side
    assert all(np.isfinite(v) for v in side["real vs real (floor)"].values()), side
    assert all(0 <= row["sync TV"] <= 1 for name, row in side.items() if "sync TV" in row), side
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp", "tutorial_cells.py"], "wrote outside OUT"
    out = [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
    assert len(out) == 1 and out[0].name.startswith("neurogen-tutorial-"), "wrote outside OUT"
    assert (out[0] / "ldns" / "metrics.json").exists() and (out[0] / "spikegan" / "samples.npz").exists()
