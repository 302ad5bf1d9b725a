"""Tests (`python -m pytest -q`): all three files, LDNS, GNOCCHI, Spike-GAN, the tutorial. A test earns its place when
a one-line bug in what it guards makes it fail (tools/mutation_score.py measures this): values are checked against
an independent computation (by hand, closed form, brute-force loop), not against the function under test."""
import ast
import contextlib
import copy
import json
import math
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import gnocchi_minimal as gn  # noqa: E402
import ldns_minimal as ldns  # noqa: E402
import spikegan_minimal as sg  # noqa: E402

MODULES = {"ldns_minimal.py": ldns, "gnocchi_minimal.py": gn, "spikegan_minimal.py": sg}
# --quick runs at a fixed thread count (the same float sums every time); flags that make the first stage diverge
QUICK = {f: ["--quick", "--threads", "1", *(["--seed", "3"] if f == "ldns_minimal.py" else [])] for f in MODULES}
PART_II = [("ldns_minimal.py", "lorenz-refractory"), ("ldns_minimal.py", "lorenz-varlen"), ("ldns_minimal.py", "reach"),
           ("spikegan_minimal.py", "packets")]
DIVERGE = {f: ["--ae-lr" if f == "ldns_minimal.py" else "--lr", "1e12"] for f in MODULES}

def run_cli(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

# ==== All three files: the command line, the output contract, bad input, copy-out, the static rules ===================
@pytest.mark.parametrize("fname", MODULES)
def test_import_is_silent_and_help_explains_every_flag(fname, tmp_path):
    r = run_cli(["-c", f"import {fname[:-3]}"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == r.stderr == "" and not list(tmp_path.iterdir()), r.stderr
    r = run_cli([os.path.join(ROOT, fname), "--help"], cwd=tmp_path)
    flags = dict(re.findall(r"^  (--[\w-]+)(.*\n(?: {20,}\S.*\n)*)", r.stdout, re.M))
    assert {"--demo", "--quick", "--paper", "--out", "--seed", "--device", "--data", "--threads"} <= set(flags)
    vague = [f for f, text in flags.items() if f != "--help" and len(re.sub(r"\(default[^)]*\)|\s", "", text)) < 8]
    assert not vague, f"flags without a help text: {vague}"

BAD_FLAGS = [(f, a) for f in MODULES for a in ("--demo no-such-demo", "--device tpu", "--quick --paper", "--seed -1",
    "--threads -2")] + [("ldns_minimal.py", a) for a in ("--demo lorenz-refractory --sh-bins 200; --ae-channels 30; "
    "--mask-p 1; --sample-steps 2000; --demo reach --data x; --demo lorenz-varlen --len-min 500; --demo reach "
    "--angle-bin 38; --demo reach --n-vel 301; --demo lorenz-varlen --n-bins 9 --n-buckets 9").split("; ")]  # + LDNS's

@pytest.mark.parametrize("fname,argv", BAD_FLAGS)
def test_bad_flags_exit_2_naming_the_flag(fname, argv, capsys):
    with pytest.raises(SystemExit) as e:
        MODULES[fname].parse_args(argv.split())
    assert e.value.code == 2 and argv.split()[-2] in capsys.readouterr().err

@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """One --quick run of every experiment of every file, each in a fresh process -> {(file, demo): (result, out)}."""
    runs = {}
    for fname, demo in [(f, "") for f in MODULES] + PART_II:
        out = tmp_path_factory.mktemp(fname[:-3]) / "run"
        argv = [os.path.join(ROOT, fname), *QUICK[fname], *(["--demo", demo] if demo else []), "--out", str(out)]
        runs[fname, demo] = run_cli(argv, cwd=out.parent), out
    return runs

@pytest.mark.parametrize("fname,demo", [(f, "") for f in MODULES] + PART_II)
def test_quick_run_writes_the_output_contract_and_repeats_exactly(fname, demo, quick_runs, tmp_path):
    r, out = quick_runs[fname, demo]
    assert r.returncode == 0, r.stderr[-3000:]
    config, metrics = (json.loads((out / f).read_text()) for f in ("config.json", "metrics.json"))
    assert config["config"]["seed"] == (3 if "--seed" in QUICK[fname] else 0) and config["torch"] == torch.__version__
    assert metrics and json.loads((out / "timing.json").read_text())["total"] > 0 and list(out.glob("figures/*.png"))
    with np.load(out / "samples.npz") as z:
        assert z["real"].shape[1:] == z["generated"].shape[1:] and np.isfinite(z["generated"]).all()
    assert all(isinstance(torch.load(w, weights_only=True), dict) for w in out.glob("*.pt")) and list(out.glob("*.pt"))
    os.umask(umask := os.umask(0))                                     # read the umask, leave it unchanged
    for p in [*out.iterdir(), *(out / "figures").iterdir()]:
        assert not p.name.endswith(".tmp") and stat.S_IMODE(p.stat().st_mode) in (0o666 & ~umask, 0o777 & ~umask), p
    if not demo:                                                       # in process: same seed and threads
        MODULES[fname].main(QUICK[fname] + ["--out", str(tmp_path / "again")])
        assert (tmp_path / "again" / "metrics.json").read_text() == (out / "metrics.json").read_text()

BAD_FILES = {"missing": "no such file", "dir.npz": "a directory", "x.csv": "another extension", "c.npz": "unreadable",
             "t.npy": "unreadable", "o.npy": "Object arrays", "k.npz": "spikes"}  # the file a new user makes -> message

@pytest.mark.parametrize("name", BAD_FILES)
@pytest.mark.parametrize("fname", MODULES)
def test_malformed_data_file_is_one_value_error_before_any_output(fname, name, tmp_path):
    p = tmp_path / name
    {"dir.npz": p.mkdir, "x.csv": lambda: p.write_text("1,0"), "t.npy": lambda: p.write_text("1,0"),
     "c.npz": lambda: np.savez(p, spikes=np.zeros((12, 4, 32))) or p.write_bytes(p.read_bytes()[:40]),  # truncated
     "o.npy": lambda: np.save(p, np.array([{"a": 1}] * 3), allow_pickle=True),
     "k.npz": lambda: np.savez(p, counts=np.zeros((12, 4, 32)))}.get(name, lambda: None)()
    with pytest.raises(ValueError, match=BAD_FILES[name]) as e:
        MODULES[fname].main(["--data", str(p), "--out", str(tmp_path / "out"), "--quick"])
    assert str(p) in str(e.value) and "expected" in str(e.value) and not (tmp_path / "out").exists()

GOOD = np.random.default_rng(0).poisson(2.0, (20, 5, 12))

@pytest.mark.parametrize("mod,arrays,match", [  # arrays saved with np.savez, the message expected (None: a good file)
    (gn, dict(counts=GOOD), r"exactly one of the arrays 'rates' or 'spikes'.*\['counts'\]"),
    (gn, dict(spikes=GOOD[:5]), r"shaped \(trials >= 8, neurons, bins >= 4\), found the shape \(5, 5, 12\)"),
    (gn, dict(spikes=GOOD + 0.5), r"integer spike counts.*found values such as \[\d+\.5"),
    (gn, dict(rates=np.full((20, 5, 12), 1e200)), r"\|rates\| <= 10000.*overflow float32.*1e\+200"),
    (gn, dict(spikes=GOOD, targets=np.zeros((20, 2)), heldout=np.arange(20) > 2), r">= 8 training.*found 3"),
    (gn, dict(spikes=GOOD.astype(np.float32), targets=np.ones((20, 2)), heldout=np.arange(20) < 4), None),
    *[(m, dict(spikes=np.full(shape, v)), match) for m, shape, v, match in [  # LDNS: counts; Spike-GAN: binary
        (ldns, (12, 4), 1, "3 dims"), (ldns, (9, 4, 32), 1, "at least 10 trials"), (ldns, (12, 4, 32), np.nan, "NaN"),
        (ldns, (12, 4, 32), -1, "non-negative"), (ldns, (12, 4, 32), 1.5, "integer"), (ldns, (12, 4, 32), 0, "zeros"),
        (ldns, (12, 4, 32), 501, "at most 500"), (ldns, (20, 4, 32), 3, None), (sg, (300, 4, 32), 2, "binary"),
        (sg, (300, 4, 30), 1, "30 bins"), (sg, (100, 4, 32), 1, "80 and 20"), (sg, (300, 4, 32), 1, None)]]])
def test_own_data_checks_and_a_good_file(mod, arrays, match, tmp_path):
    np.savez(path := tmp_path / "d.npz", **arrays)                # GNOCCHI's good file: smoothed, sd 1.5 bins
    with pytest.raises(ValueError, match=match) if match else contextlib.nullcontext():
        d, K = mod.load_data(mod.Config(data=str(path))), np.exp(-np.subtract.outer(*[range(12)] * 2) ** 2 / 4.5)
        assert np.allclose(d["rates"], GOOD @ (K / K.sum(0))) and (d["heldout"].sum(), d["targets"].size) == (4, 40) \
            if mod is gn else (len(d["train"]), len(d["test"])) == ((14, 4) if mod is ldns else (240, 60))

@pytest.mark.parametrize("fname", MODULES)
def test_unwritable_out_and_a_diverging_run_stop_cleanly(fname, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="writable"):
        MODULES[fname].main(QUICK[fname] + ["--out", str(tmp_path / "a_file" / "run")])
    assert "step" not in capsys.readouterr().out, "training started"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"from": "an earlier run"}')
    with pytest.raises(FloatingPointError, match="loss became"):
        MODULES[fname].main(QUICK[fname] + DIVERGE[fname] + ["--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "metrics.json").exists() and not (tmp_path / "run" / "samples.npz").exists()
    r = run_cli([os.path.join(ROOT, fname), "--data", str(tmp_path / "none.npy")], cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: --data") and "Traceback" not in r.stderr

def _lift(fname, name):
    """Copying `name` out: it, the definitions it needs and the file's imports, in a fresh namespace."""
    tree = ast.parse(open(os.path.join(ROOT, fname)).read())
    defs, imports = {}, [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            n.id for t in getattr(node, "targets", []) for n in ast.walk(t) if isinstance(n, ast.Name)]
        defs.update(dict.fromkeys(names, node))
    need, todo = set(), [name]
    while todo:
        if (n := todo.pop()) not in need and n in defs:
            need.add(n)
            todo += [m.id for m in ast.walk(defs[n]) if isinstance(m, ast.Name)]
    nodes = sorted({id(defs[n]): defs[n] for n in need}.values(), key=lambda nd: nd.lineno)
    exec(compile(ast.Module(imports + nodes, []), f"<{name} from {fname}>", "exec"), ns := {"__name__": "copied"})
    return ns

x3, z = torch.linspace(-1, 1, 96).reshape(2, 3, 16), torch.linspace(-2, 2, 256).reshape(2, 128)  # (B, N, T), (B, Z)
t2, z3 = torch.tensor([1, 7]), -x3                                    # (B,) diffusion steps, fakes (B, N, T)
COPY_OUT = {  # (file, piece) -> a use of it, given the namespace it lives in (the file's, or the copied piece's own)
    ("ldns_minimal.py", "AutoEncoder"): lambda m: m["AutoEncoder"](3, 8, 2, 1, 8)(x3.exp())[0],
    ("ldns_minimal.py", "Denoiser"): lambda m: m["Denoiser"](3, 8, 1, 8)(x3, t2),
    ("ldns_minimal.py", "DDPM"): lambda m: m["DDPM"](100).loss(lambda x, t: x.flip(1) * t[:, None, None], x3),
    ("ldns_minimal.py", "SpikeHistoryGLM"): lambda m: m["SpikeHistoryGLM"](3, H=4).sample(x3.exp()),
    ("gnocchi_minimal.py", "UNet1D"): lambda m: m["UNet1D"](3, 8, 2, 10, 0.0, groups=4)(x3, t2, z[:, :2]),
    ("gnocchi_minimal.py", "GNOCCHI"): lambda m: m["GNOCCHI"](m["Config"](channels=8, groups=4), 3, 16).loss(x3)[0],
    ("spikegan_minimal.py", "Critic"): lambda m: m["Critic"](3, 16, 4)(x3),
    ("spikegan_minimal.py", "Generator"): lambda m: m["Generator"](3, 16, 4)(z),
    ("spikegan_minimal.py", "gradient_penalty"): lambda m: m["gradient_penalty"](lambda x: x.sin().sum((1, 2)), x3, z3),
    ("spikegan_minimal.py", "fit_dg"): lambda m: m["fit_dg"]((x3 > 0).numpy(), temporal=False)[1]}

@pytest.mark.parametrize("fname,name", list(COPY_OUT))
def test_a_copied_out_piece_runs_alone_and_computes_what_the_file_does(fname, name):
    copied = _lift(fname, name)
    assert set(copied) - {"__name__", "__builtins__"} < set(vars(MODULES[fname]))   # a part of the file, not all
    alone, whole = (torch.manual_seed(0) and COPY_OUT[fname, name](ns) for ns in (copied, vars(MODULES[fname])))
    torch.testing.assert_close(alone, whole)

def _is_cpu(node):
    """A chain of calls through x.cpu(), or a CPU draw torch.poisson(x.cpu()) / torch.bernoulli(x.cpu())."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "cpu" or node.func.attr in ("poisson", "bernoulli") and _is_cpu(node.args[0]):
            return True
        node = node.func.value
    return False

@pytest.mark.parametrize("fname", MODULES)
def test_static_rules_shared_block_imports_and_every_random_draw_on_the_cpu(fname):
    """One plumbing block; imports of the standard library, numpy, torch; no device= in random constructors, no *_like
    draws or device generators, poisson / bernoulli of .cpu() inputs, .numpy() after .cpu(), torch.cuda only to ask."""
    src, first = (open(os.path.join(ROOT, f)).read() for f in (fname, "ldns_minimal.py"))
    assert src.split("# Part III, plumbing")[1] == first.split("# Part III, plumbing")[1]
    bad, tree = [], ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "torch.cuda" and node.attr != "is_available":
            bad.append((node.lineno, ast.unparse(node)))
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, base, kws = node.func.attr, ast.unparse(node.func.value), {k.arg for k in node.keywords}
        if base == "torch" and (name.startswith("rand") and name.endswith("_like") or name == "Generator" and (
                node.args or kws) or name in ("randn", "rand", "randint", "randperm", "normal") and "device" in kws
                or name in ("poisson", "bernoulli", "multinomial") and not _is_cpu(node.args[0])):
            bad.append((node.lineno, ast.unparse(node)[:60]))
        if name == "numpy" and not _is_cpu(node.func.value):
            bad.append((node.lineno, ".numpy() without .cpu()"))
    tops = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0] for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert not bad and tops <= set(sys.stdlib_module_names) | {"numpy", "torch"}, (bad, tops)

# ==== LDNS ============================================================================================================
IN = lambda a, eps=1e-5: (a - a.mean(-1, True)) / (a.var(-1, unbiased=False, keepdim=True) + eps).sqrt()  # noqa: E731

@torch.no_grad()
def _perturbed(model, scale=0.1):                              # non-zero adaLN etc., so every path acts
    return [p.add_(scale * torch.randn(p.shape)) for p in model.parameters()] and model

def _seeded(f, *args, seed, **kw):                             # f(*args) right after torch.manual_seed(seed)
    return torch.manual_seed(seed) and f(*args, **kw)

_rows = lambda a: np.concatenate([a[k].T for k in range(len(a))])  # noqa: E731   (K,c,T) -> (K*T, c), by hand

def test_ldns_s4_discretisation_by_hand_fft_equals_convolution_and_recurrence():
    s4 = ldns.S4D(1, 2)
    for dt, a, b, A_bar, B_bar in [(0.5, -2 + 0j, 3 - 1j, 1 / 3, (3 - 1j) / 3),   # (1 - 1/2)/(1 + 1/2), 0.5 b/1.5
                                   (1.0, 2j, 1 + 0j, 1j, (1 + 1j) / 2),           # (1 + i)/(1 - i) = i, b/(1 - i)
                                   (1e-2, -0.5 + 3j, 1 + 0j, np.exp((-0.5 + 3j) * 1e-2), None)]:  # exp(a dt) + O(dt^3)
        with torch.no_grad():
            s4.log_dt.fill_(math.log(dt)), s4.log_A_real.fill_(math.log(-a.real) if a.real else -40.0)
            s4.A_imag.fill_(a.imag), s4.B.copy_(torch.tensor([[[b.real, b.imag]]]))
        got = [complex(v.item()) for v in s4.discretise()]
        assert abs(got[0] - A_bar) < 1e-6 + abs(a * dt) ** 3 / 12 and (B_bar is None or abs(got[1] - B_bar) < 1e-6)
    for bi in (False, True):                                   # both sides from the parameters, in numpy float64
        s4, u, L = ldns.S4D(3, 8, bi), torch.randn(2, 3, 20), 20
        torch.nn.init.constant_(s4.log_dt, math.log(0.05))     # a visible impulse response within 20 steps
        p = {k: v.detach().double().numpy() for k, v in s4.named_parameters()}
        dt, A = np.exp(p["log_dt"])[:, None], -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
        A_bar, B_bar = (1 + dt * A / 2) / (1 - dt * A / 2), dt * (p["B"] @ [1, 1j]) / (1 - dt * A / 2)
        C, D, un, zero = p["C"] @ [1, 1j], p["D"], u.double().numpy(), np.zeros((2, 3))
        K = np.stack([2 * (C * B_bar * A_bar ** l).sum(-1).real for l in range(L)], -1)  # (ch,H,L)
        fwd = np.stack([sum(K[0][:, s] * un[..., t - s] for s in range(t + 1)) + D * un[..., t] for t in range(L)], -1)
        bwd = np.stack([sum((K[-1][:, m - 1] * un[..., t + m] for m in range(1, L - t)), zero) for t in range(L)], -1)
        assert np.allclose(s4(u).detach(), fwd + bi * bwd, atol=1e-4) and np.allclose(s4.kernel(L).detach(), K, 0, 1e-5)
    x, ys = np.zeros((2, *A_bar.shape), complex), []
    for t in range(L):                                         # x_t = A_bar x_{t-1} + B_bar u_t, y = 2 Re(C x) + D u
        x = A_bar * x + B_bar * un[..., t, None]
        ys.append(2 * (C[0] * x).sum(-1).real + D * un[..., t])
    big = ldns.S4D(20000, 2)                                   # init: dt ~ LogUniform[1e-3, 0.1], D ~ N(0, 1)
    assert np.allclose(np.quantile(big.log_dt.detach(), [0, .5, 1]), np.log([1e-3, 1e-2, .1]), atol=.05) and abs(
        big.D.mean()) + abs(big.D.std() - 1) < 0.05
    assert np.allclose(np.stack(ys, -1), fwd) and ldns.S4D(3, 8).C.shape[0] == 2  # bidirectional by default
    N, s4 = 64, ldns.S4D(5, 64)                                # HiPPO-LegS: the normal part S written out entry by
    (w, B), q = ldns.hippo_legs(N), np.sqrt(2 * np.arange(N) + 1)  # entry, -1/2 on the diagonal, -+q_n q_k / 2 off it
    S = np.array([[-0.5 if n == k else np.sign(k - n) * q[n] * q[k] / 2 for k in range(N)] for n in range(N)])
    lam = np.linalg.eigvals(S)                                 # a general (non-Hermitian) solver
    assert np.allclose(lam.real, -0.5, atol=1e-6) and np.allclose(np.sort(w), np.sort(lam.imag[lam.imag > 0]))
    B_ref = np.linalg.eigh(-1j * S)[1][:, N // 2:].conj().T @ q  # official B = V^H q, V of eigh(-i S); the phase of
    assert np.allclose(B.real, B_ref.real) and np.allclose(B.imag, B_ref.imag.clip(-2, 2))  # V decides the clipping
    assert B.imag.min() == -2 and B.imag.max() == 2 and torch.allclose(-s4.log_A_real.exp(), torch.tensor(-0.5))
    assert np.allclose(torch.view_as_complex(s4.B[4]).detach(), B) and np.allclose(s4.A_imag[3].detach(), w)

def test_ldns_blocks_autoencoder_denoiser_wiring_and_paper_size():
    h, e, blk, dblk = torch.randn(2, 8, 10), torch.randn(2, 2), *map(_perturbed, (ldns.AEBlock(8, 4),
                                                                                ldns.DenoiserBlock(8, 4)))
    sh1, sc1, _, sh2, sc2, _ = blk.ada[0, :, 0].reshape(6, 8, 1)
    h1 = h + blk.post_tm_scale(F.gelu(blk.s4(IN(h) * (1 + sc1) + sh1)))
    assert torch.allclose(blk(h), h1 + blk.mlp(IN(h1) * (1 + sc2) + sh2), atol=1e-5) and blk.s4.bidirectional
    sh1, sc1, g1, sh2, sc2, g2 = (F.gelu(e) @ dblk.ada.weight.T + dblk.ada.bias).reshape(2, 6, 8, 1).unbind(1)
    h1 = h + g1 * F.gelu(dblk.s4(IN(h) * (1 + sc1) + sh1))     # Conv1x1 = the 1x1 convolution, bias or not:
    assert torch.allclose(dblk(h, e), h1 + g2 * F.conv1d(F.gelu(F.conv1d(IN(h1) * (1 + sc2) + sh2, dblk.mlp[
        0].weight, dblk.mlp[0].bias)), dblk.mlp[2].weight, dblk.mlp[2].bias), atol=1e-5) and blk.mlp[0].bias is None
    ae, x = _perturbed(ldns.AutoEncoder(6, 8, 2, 2, 4)), torch.poisson(torch.rand(2, 6, 10) * 2)
    z, (rates, z2) = ae.bottleneck(ae.blocks[1](ae.blocks[0](ae.conv_in(x)))), ae(x)
    assert torch.allclose(z, z2, atol=1e-5) and torch.equal(rates, F.softplus(ae.decoder[2](F.gelu(ae.decoder[0](z2)))))
    dn, t, f = _perturbed(ldns.Denoiser(2, 8, 1, 4)), torch.tensor([0, 7]), 10000 ** (-torch.arange(128) / 128.0)
    emb = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], -1)  # sinusoidal embedding of the raw t
    sh, sc = (dn.ada_out(F.gelu(dn.t_mlp(emb)))[..., None]).chunk(2, 1)
    assert torch.allclose(ldns.timestep_embedding(t), emb, atol=1e-5) and dn.conv_in.groups == 2
    assert torch.allclose(dn(z, t), dn.conv_out(dn.blocks[0](dn.conv_in(z), dn.t_mlp(emb)) * (1 + sc) + sh), atol=1e-5)
    assert ldns.Denoiser(4, 4, 1, 4).conv_in.groups == ldns.Denoiser(3, 8, 1, 4).conv_in.groups == 1  # grouped if d | C
    # official Lorenz denoiser (C 64, d_state 64, 4 blocks): 179,432, less S4's low-rank P, plus Linear(C/4, 2C)
    assert sum(p.numel() for p in ldns.Denoiser(8, 64, 4, 64).parameters()) == 179_432 - 4 * 64 * 64 + 16 * 128 + 128

@pytest.mark.parametrize("masked", [False, True])
def test_ldns_ae_loss_with_a_stub_autoencoder_by_hand(masked):
    cfg, seen, x = ldns.Config(mask_p=0.25, beta_lat=0.1, beta_td=0.2), [], torch.poisson(torch.rand(3, 4, 8) * 3)
    ae = lambda x_in: seen.append(x_in) or (torch.full(x.shape, 0.7) * (torch.arange(8) > 0),  # noqa: E731
                                           torch.arange(8) * torch.tensor([[1.0], [2.0]]))  # stub: z = (c+1) t
    m, total = ldns.valid_mask(torch.tensor([8, 2, 5] if masked else [8, 8, 8]), 8), 0.0
    loss = _seeded(ldns.ae_loss, ae, x, cfg, seed=5, **({"m": m} if masked else {}))
    M = (_seeded(torch.rand, x.shape, seed=5) >= 0.25).float()  # the same draw: the coordinated-dropout keep mask
    assert torch.equal(seen[0], x * M / 0.75) and 0.6 < M.mean() < 0.9
    for b, n, t in np.ndindex(3, 4, 8):                        # Poisson NLL r - k log(r + 1e-8) + Stirling for k > 1
        k, w, r = x[b, n, t].item(), (1 - M[b, n, t].item()) * m[b, 0, t].item(), 0.7 * (t > 0)
        total += w * (r - k * math.log(r + 1e-8) + (k * math.log(k) - k + math.log(math.tau * k) / 2 if k > 1 else 0))
    z2 = sum(((c + 1) * t) ** 2 for c in range(2) for t in range(8))        # sum z^2 and the TD penalty (K = 5)
    td = sum((c + 1) ** 2 * i ** 2 * (8 - i) / (1 + i) for c in range(2) for i in range(1, 6))
    assert math.isclose(loss.item(), total / 96 + (0.1 * z2 + 0.2 * td) / 96, rel_tol=1e-5)

def test_ldns_ddpm_closed_forms_and_algorithm_1():
    ddpm, x0, eps, seen = ldns.DDPM(1000), torch.randn(6, 2, 7), torch.randn(6, 2, 7), {}
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for t, t_prev in [(500, 499), (1, 0), (999, 949), (300, 299)]:   # plain and respaced steps
        ab, ab_prev = [float(torch.prod(1 - beta[:k + 1])) for k in (t, t_prev)]
        xt = ddpm.q_sample(x0, torch.full((6,), t), eps)
        (mean, var), var_eta = [ddpm.p_step(xt, eps, ddpm.alpha_bar[t], ddpm.alpha_bar[t_prev], e) for e in (1.0, 0.5)]
        b = 1 - ab / ab_prev                                   # Eq. 7 in x0-form, beta_t of the (respaced) step
        post = math.sqrt(ab_prev) * b / (1 - ab) * x0 + math.sqrt(1 - b) * (1 - ab_prev) / (1 - ab) * xt
        assert torch.allclose(xt, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, atol=1e-5)
        assert torch.allclose(mean, post, atol=1e-4) and torch.allclose(var_eta[1] * 4, var) and math.isclose(
            var.item(), (1 - ab_prev) / (1 - ab) * b, rel_tol=1e-4 if t > 1 else 0.02)  # float32 abar near 1
    beta = torch.linspace(5e-4, 0.1, 200, dtype=torch.float64)    # 200 steps: the schedule rescaled by 1000/200
    assert torch.allclose(ldns.DDPM(200).alpha_bar, torch.cumprod(1 - beta, 0).float())
    loss = _seeded(ddpm.loss, lambda xt, t, c: seen.update(xt=xt, t=t, c=c) or xt * 0.5, x0, c="cond", seed=2)
    t, eps = _seeded(lambda: (torch.randint(0, 1000, (6,)), torch.randn(x0.shape)), seed=2)  # Alg. 1's draws
    xt = ddpm.alpha_bar[t][:, None, None].sqrt() * x0 + (1 - ddpm.alpha_bar[t][:, None, None]).sqrt() * eps
    assert torch.equal(seen["t"], t) and seen["c"] == "cond" and torch.allclose(seen["xt"], xt) and math.isclose(
        loss.item(), ((xt * 0.5 - eps) ** 2).mean().item(), rel_tol=1e-5)

@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ldns_sampler_with_the_exact_eps_reproduces_gaussian_data(eta):
    ddpm, seen, x0 = ldns.DDPM(1000), [], torch.tensor(0.7)
    ab = lambda t: ddpm.alpha_bar[t][:, None, None]  # noqa: E731
    for s in (0.5, 2.0):                                       # N(0, s^2) data, exact E[eps | x_t] -> variance s^2
        torch.manual_seed(1)
        x = ddpm.sample(lambda x, t: (1 - ab(t)).sqrt() * x / (ab(t) * s ** 2 + 1 - ab(t)), (20000, 1, 1), 1000, eta)
        assert abs(x.var().item() / s ** 2 - 1) < 0.04 and abs(x.mean().item()) < 0.03 * s, (s, x.var())
    out = ddpm.sample(lambda x, t: seen.append((x, t)) or (x - ab(t).sqrt() * x0) / (1 - ab(t)).sqrt(), (20000, 1, 1),
                      5, eta)                                  # one x0: q(x_t | x0) at every step, DDIM on its path
    eps = (seen[0][0] - ab(seen[0][1]).sqrt() * x0) / (1 - ab(seen[0][1])).sqrt()
    assert torch.allclose(out, x0.expand(out.shape), atol=1e-3) and [t[0] for _, t in seen] == [999, 749, 500, 250, 0]
    assert all(abs(x.mean() - ab(t)[0].sqrt() * x0) < .03 and abs(x.var() / (1 - ab(t)[0]) - 1) < .05 for x, t in seen)
    assert eta or all(torch.allclose(x, ab(t).sqrt() * x0 + (1 - ab(t)).sqrt() * eps, atol=1e-4) for x, t in seen)

def test_ldns_ema_lr_schedule_and_training_loop(monkeypatch):
    lin, e, log, seen = torch.nn.Linear(1, 1), 1.0, [], []
    lin.register_buffer("b", torch.zeros(1))
    ema = ldns.EMA(lin)
    for k in range(1, 8):                                      # decay_k = min(0.9999, 1 - k^(-2/3)); decay_1 = 0
        torch.nn.init.constant_(lin.weight, k ** 2), lin.b.fill_(k), ema.update(lin)
        e = e if k == 1 else min(0.9999, 1 - k ** (-2 / 3)) * e + (1 - min(0.9999, 1 - k ** (-2 / 3))) * k ** 2
    assert math.isclose(ema.model.weight.item(), e, rel_tol=1e-6) and ema.model.b.item() == 7.0
    assert [ldns.warmup_cosine(k, 100) for k in (0, 1, 4)] == [0.0, 0.2, 0.8] and ldns.warmup_cosine(1, 10) == 1.0
    assert all(math.isclose(ldns.warmup_cosine(k, 100), 0.5 * (1 + math.cos(math.pi * (k - 5) / 125))) for k in (
        5, 50, 99))                                            # cosine with the horizon at 130 steps
    monkeypatch.setattr(ldns, "Progress", lambda name, total: lambda step, **v: log.append((v["lr"], v["loss"])))
    w, w_ref, ema = torch.nn.Parameter(torch.tensor([3.0])), torch.nn.Parameter(torch.tensor([3.0])), ldns.EMA(lin)
    ldns.train_loop(torch.nn.ParameterList([w]), lambda idx: seen.append(idx.tolist()) or (idx.float().mean() + 1) * w
                    ** 2, 6, steps=6, batch=3, lr=0.1, clip=1.0, name="t", ema=ema)
    assert [len(b) for b in seen] == [3] * 6 and all(len(set(seen[i] + seen[i + 1])) == 6 for i in (0, 2, 4))
    assert [lr for lr, _ in log] == pytest.approx([0.1 * ldns.warmup_cosine(k, 6) for k in range(6)]) and ema.k == 6
    opt = torch.optim.AdamW([w_ref], lr=0.1, weight_decay=0.01)   # the same steps, written out
    for k, idx in enumerate(seen):
        opt.param_groups[0]["lr"] = 0.1 * ldns.warmup_cosine(k, 6)
        opt.zero_grad(), ((torch.tensor(idx).float().mean() + 1) * w_ref ** 2).backward()
        torch.nn.utils.clip_grad_norm_([w_ref], 1.0), opt.step()
    assert math.isclose(w.item(), w_ref.item(), rel_tol=1e-6) and log[0][1] == pytest.approx((np.mean(seen[0]) + 1) * 9)

def test_ldns_lorenz_data_vector_field_and_refractory_spikes():
    d, rng = ldns.simulate_lorenz(20, 64, 16, np.random.default_rng(0)), np.random.default_rng(0)
    rng.standard_normal((16, 3))                               # the readout, then ICs = dysts default + 2 N(0, I)
    traj = ldns.lorenz_rk4(ldns.LORENZ_IC + 2 * rng.standard_normal((20, 3)), 164, 1.5008 * 164 / 100 / 163)[:, 100:]
    assert np.allclose(d["latents"], ((traj - traj.mean(1, keepdims=True)) / traj.std(1, keepdims=True)).transpose(
        0, 2, 1), atol=1e-5)                                   # dysts: 100 samples per period 1.5008, 100 burn-in
    u = np.log(np.expm1(2 * d["rates"].astype(np.float64))) / 2 - np.log(0.3)   # rates = softplus_2(C x + log 0.3)
    C = np.linalg.lstsq(_rows(d["latents"]).astype(np.float64), _rows(u), rcond=None)[0]  # (3, N)
    assert np.abs(_rows(d["latents"]) @ C - _rows(u)).max() < 1e-4 and np.allclose(np.linalg.norm(C, axis=0), 1)
    assert (np.diff(C[0]) >= 0).all() and 0.05 < d["spikes"].mean() < 0.4 and d["spikes"].dtype.kind == "i"
    x = ldns.lorenz_rk4(np.array([[1.0, 2.0, 20.0]]), 201, 1e-3)[0]  # central differences = the Lorenz vector field
    f = np.stack([10 * (x[:, 1] - x[:, 0]), x[:, 0] * (28 - x[:, 2]) - x[:, 1], x[:, 0] * x[:, 1] - 2.667 * x[:, 2]], 1)
    assert np.abs((x[2:] - x[:-2]) / 2e-3 - f[1:-1]).max() < 1e-2 * np.abs(f).max() and x[0].tolist() == [1, 2, 20]
    e8, e16 = (np.abs(ldns.lorenz_rk4(x[:1], 2, 0.1, k) - ldns.lorenz_rk4(x[:1], 2, 0.1, 512)).max() for k in (8, 16))
    assert 12 < e8 / e16 < 20                                  # fourth order: halving the step divides the error by 16
    rng, lam = np.random.default_rng(0), np.random.default_rng(1).uniform(0.2, 3.0, (50, 3, 9))
    a, tau, s = rng.uniform(1.5, 3.0, 3), rng.uniform(0.5, 1.5, 3), np.zeros((50, 3, 9), np.int64)
    for t in range(9):                                         # s_t ~ Poisson(softplus(log lam_t + sum_k h_k s_{t-k}))
        h = sum(-a * np.exp(-(k - 1) / tau) * s[..., t - k] for k in range(1, min(t, 4) + 1))  # h_k = -a e^{-(k-1)/tau}
        s[..., t] = rng.poisson(np.logaddexp(0.0, np.log(lam[..., t]) + h))
    r = ldns.simulate_lorenz(100, 64, 32, np.random.default_rng(0), ldns.refractory_poisson)  # the same rates
    assert np.array_equal(ldns.refractory_poisson(lam, np.random.default_rng(0)), s) and np.array_equal(r["rates"], ldns
        .simulate_lorenz(100, 64, 32, np.random.default_rng(0))["rates"]) and ldns.lag_ratios(r["spikes"], 1) < 0.5

def test_ldns_normalisation_and_sampling_helpers():
    z = torch.randn(6, 3, 16) * 4 + 1
    z[0, 0, 0], z[0, 0, 1] = 100.0, -100.0                     # outliers: clamped at 5 sigma
    (mu, sigma, zn), flat = ldns.normalise_latents(z), z.permute(1, 0, 2).reshape(3, -1)  # (d,K,T) -> (d, K T)
    assert torch.allclose(mu[0, :, 0], flat.mean(1)) and torch.allclose(sigma[0, :, 0], flat.std(1, unbiased=True))
    assert zn[0, 0, 0] == 5 and zn[0, 0, 1] == -5 and torch.allclose(zn[1:], ((z[1:] - mu) / sigma).clamp(-5, 5))
    stub = type("StubDDPM", (), dict(sample=lambda self, model, shape, K, eta, m: m.expand(shape) + K + 10 * eta))()
    m, cfg, ae = torch.arange(5.0)[:, None, None].expand(5, 1, 4), ldns.Config(d_latent=2, sample_steps=7, eta=0.5), \
        ldns.AutoEncoder(3, 4, 2, 1, 4)                        # the stub returns its condition + K + 10 eta
    assert torch.equal(ldns.sample_latents(cfg, stub, 0, 1.0, 3.0, 5, 4, chunk=2, m=m), 3 * m.expand(5, 2, 4) + 37)
    torch.nn.init.zeros_(ae.decoder[2].weight), torch.nn.init.constant_(ae.decoder[2].bias, math.log(math.e ** 2 - 1))
    out = ldns.sample_trials(cfg, stub, None, ae, 0.0, 1.0, 4000, 4, m=torch.ones(4000, 1, 4))  # rates 2: Poisson(2)
    assert torch.allclose(out["rates"], torch.tensor(2.0)) and abs(out["spikes"].mean() - 2) < 0.05
    assert abs(out["spikes"].var() - 2) < 0.1

def test_ldns_isi_lag_ratios_group_acg_by_hand():
    s = np.zeros((2, 2, 10), dtype=np.int64)
    s[0, 0, [1, 4]], s[0, 0, 7], s[1, 1, 3] = 1, 2, 3          # spikes at 1.5, 4.5, 7+1/3, 7+2/3; 3 in one bin
    isi, p2 = np.diff([1.5, 4.5, 7 + 1 / 3, 7 + 2 / 3]), (np.arange(8) % 2 == 0)[None, None] * 1  # p2: period 2
    assert np.allclose(ldns.isi_stats(s), [[isi.mean(), 0.25], [isi.std(), 0.0]]) and np.allclose(ldns.lag_ratios(
        p2, 2), [0.0, (3 / 3) / 0.5]) and np.allclose(ldns.lag_ratios(np.ones((1, 1, 12))), [1] * 10)  # default L 10
    s, groups, acg = np.random.default_rng(0).poisson(0.8, (3, 4, 9)).astype(float), [[0, 2], [1, 3]], np.zeros((2, 3))
    rho = [sum(s[k, n, t] * s[k, n, t + l] for k, n, t in np.ndindex(3, 4, 9 - l)) /
           sum(s[:, n].mean() * s[k, n, t] for k, n, t in np.ndindex(3, 4, 9 - l)) for l in (1, 2, 3)]
    for g, l, k, i in np.ndindex(2, 3, 3, 2):                  # per trial and neuron: mean removed, sum x_t x_t+l / T
        xx = s[k, groups[g][i]] - s[k, groups[g][i]].mean()
        acg[g, l] += (xx[:9 - l - 1] * xx[l + 1:]).sum() / 9 / (3 * 2)
    assert np.allclose(ldns.group_acg(s, groups, 3), acg) and np.allclose(ldns.lag_ratios(s, 3), rho)
    corr = np.eye(4) + np.array([[0, -.8, .9, 0], [-.8, 0, 0, np.nan], [.9, 0, 0, .5], [0, np.nan, .5, 0]])
    res, rho_sh = ldns.autocorrelogram_metrics(s, s[::-1].copy(), s * 0 + 1, corr, 3), ldns.lag_ratios(s * 0 + 1, 3)
    assert math.isclose(res["acg/data/lag2_ratio"], rho[1]) and math.isclose(res["acg/ldns_sh/lag1_rel_error"], abs(
        rho_sh[0] - rho[0]) / rho[0]) and res["acg/ldns/lag_ratio"] == ldns.lag_ratios(s[::-1].copy(), 3).tolist()
    assert res["acg/data/group_acg"] == ldns.group_acg(s, [[0], [2], [1], [3]], 3).tolist()  # groups by sum_j c_ij^2

def test_ldns_spike_stats_kde_compare_and_latent_r2_by_hand():
    rng, ln = np.random.default_rng(1), np.array([7, 3, 5, 7, 2])
    a, b = rng.poisson(0.6, (5, 4, 7)), rng.poisson(0.9, (6, 4, 7))
    st_a, st_b, st = (ldns.spike_stats(*s) for s in ((a,), (b,), (a * (np.arange(7) < ln[:, None, None]), ln)))
    valid = np.concatenate([a[k][:, :l] for k, l in enumerate(ln)], 1)     # (N, sum l): valid bins only
    assert np.array_equal(st_a["psc"], [a[k, :, t].sum() for k in range(5) for t in range(7)]) and len(st["psc"]) == 24
    assert np.allclose(st["corr"], np.corrcoef(valid)) and np.allclose(st["rate"], valid.mean(1))
    x, il = np.array([0, 0, 1, 3, 5]), [(i, j) for i in range(4) for j in range(i)]
    dens = [sum(math.exp(-0.5 * ((g - xi) / (np.std(x, ddof=1) * 5 ** -0.2)) ** 2) for xi in x) for g in range(7)]
    assert np.allclose(ldns.kde_on_grid(x, np.arange(7)), np.array(dens) / sum(dens))  # Scott: std n^(-1/5)
    for sa in (st_a, ldns.spike_stats(a + 30 * (np.arange(7) == 0))):  # counts far beyond b's: the KDE floor acts
        out, g = ldns.compare(sa, st_b), np.arange(max(sa["psc"].max(), st_b["psc"].max()) + 1)
        p, q = ldns.kde_on_grid(sa["psc"], g), ldns.kde_on_grid(st_b["psc"], g)
        assert math.isclose(out["kl_psc"], sum(pi * math.log(max(pi, 1e-12) / max(qi, 1e-12)) for pi, qi in zip(p, q)))
        assert math.isclose(out["r_psc"], np.corrcoef(p, q)[0, 1])
        for k, u, v in [("corr", *(np.array([s["corr"][ij] for ij in il]) for s in (sa, st_b)))] + [
                (k, sa[k], st_b[k]) for k in ("rate", "mean_isi", "std_isi")]:
            assert math.isclose(out[f"r_{k}"], np.corrcoef(u, v)[0, 1]) and math.isclose(
                out[f"rmse_{k}"], math.sqrt(np.mean((u - v) ** 2)))
    rows = ldns.comparison_rows(b, a, b + 1)[0]                # the halves: real[:3] vs real[3:]
    for row, u, v in (("real_vs_real", b[:3], b[3:]), ("gen_vs_real_half", a[:3], b[3:]), ("ae_vs_real", b + 1, b)):
        assert rows[f"{row}/kl_psc"] == ldns.compare(ldns.spike_stats(u), ldns.spike_stats(v))["kl_psc"]
    Z, E = rng.standard_normal((200, 3)), rng.standard_normal((200, 2))
    X = Z @ rng.standard_normal((3, 2)) + 0.5 + 0.3 * E        # R^2 of the affine fit, held-out half, by hand
    W = np.linalg.lstsq(np.c_[Z[:100], np.ones(100)], X[:100], rcond=None)[0]
    r2 = 1 - ((X[100:] - np.c_[Z[100:], np.ones(100)] @ W) ** 2).sum() / ((X[100:] - X[100:].mean(0)) ** 2).sum()
    assert math.isclose(ldns.latent_r2(Z[:100], X[:100], Z[100:], X[100:]), r2) and 0.5 < r2 < 0.99

def test_ldns_spike_history_glm_refits_known_weights_and_is_written_out():
    torch.manual_seed(0)                                       # 3 neurons x 60,000 bins: standard errors 0.02-0.05
    true, cfg, w = ldns.SpikeHistoryGLM(3, 4), ldns.Config(), [[-2, -1, -.3, 0, 1, 0], [-1, 0, 0, 0, .8, .3]]
    torch.nn.init.constant_(true.w, 0).data.add_(torch.tensor(w + [[-3, -1.5, -.5, -.2, 1.2, -.2]]))
    lam = 0.3 * torch.exp(torch.sin(torch.arange(104.0) / 8 + torch.rand(600, 3, 1) * 6))  # (600, 3, 104)
    vars(cfg).update(sh_bins=4, sh_epochs=400, sh_trials=600, sh_lr=0.1, sh_cap=5)
    assert (ldns.fit_spike_history(cfg, true.sample(lam, cap=5), lam).w - true.w).abs().max().item() < 0.15
    glm, H, s, log_lam = ldns.SpikeHistoryGLM(2, 3), 3, torch.poisson(torch.rand(2, 2, 9) * 2), torch.randn(2, 2, 9)
    X = glm.design(s, log_lam)                                 # (N, B(T-H), H+2); row of bin H + t:
    assert all(torch.allclose(X[n, b * 6 + t], torch.tensor([s[b, n, H + t - k].item() for k in range(1, H + 1)] + [
        log_lam[b, n, H + t].item(), 1.0])) for n, b, t in np.ndindex(2, 2, 6))  # s_{t-1..t-H}, log lambda_t, 1
    assert torch.allclose(glm(X), F.softplus((X * glm.w[:, None]).sum(-1)))
    s, lam = torch.poisson(torch.rand(5, 3, 12) * 2), torch.rand(5, 3, 12).clamp(min=0.1) - 0.1  # some rates 0
    vars(cfg).update(sh_bins=2, sh_epochs=3, sh_trials=4, sh_cap=1)
    fit = _seeded(ldns.fit_spike_history, cfg, s, lam, seed=1)  # the official recipe, written out: N(0,1) init,
    w = torch.nn.Parameter(_seeded(torch.randn, 3, 4, seed=1))  # capped targets of 4 trials, full-batch AdamW(0.1)
    y, opt = s[:4, :, 2:].clamp(max=1).permute(1, 0, 2).reshape(3, -1), torch.optim.AdamW([w], 0.1)  # (N, B(T-H))
    X = ldns.SpikeHistoryGLM(3, 2).design(s[:4].clamp(max=1), lam[:4].clamp(min=1e-8).log())  # log rates floored
    for _ in range(3):
        opt.zero_grad(), F.poisson_nll_loss(F.softplus((X * w[:, None]).sum(-1)), y, False).backward(), opt.step()
    torch.nn.init.constant_(glm.w, 0).data.add_(torch.tensor([[-50.0, 0, 0, 1, 40], [0, 0, -50, 2, 0]]))
    out = glm.sample(torch.full((4000, 2, 6), 2.0), cap=3)     # neuron 0: bias 40, a spike silences the next bin;
    capped = sum(min(k, 3) * math.log(5) ** k / 5 / math.factorial(k) for k in range(40))  # 1: log 5, silent at t+3
    assert (out[:, 0, 0::2] == 3).all() and (out[:, 0, 1::2] == 0).all() and (out[:, 1, 3][out[:, 1, 0] > 0] == 0).all()
    assert abs(out[:, 1, :3].mean() - capped) < 0.05 and glm.sample(torch.full((9, 2, 3), 1e3)).max() == 5 and \
        torch.allclose(fit.w, w, atol=1e-6)

def test_ldns_varlen_causal_autoencoder_masks_moments_centre_pad_and_crop():
    t, x = 17, torch.poisson(torch.rand(3, 8, 40, dtype=torch.float64) * 2)
    x2 = torch.cat([x[..., :t + 1], 3 * x[..., t + 1:] + 1], -1)  # the same up to bin t, different after it
    for AE in (ldns.CausalAutoEncoder, ldns.AutoEncoder):      # the bidirectional AE does see later inputs
        ae = _perturbed(AE(8, 16, 4, 2, 8)).double()
        (r1, z1), (r2, z2) = ae(x), ae(x2)
        early = max((z1 - z2)[..., :t + 1].abs().max(), (r1 - r2)[..., :t + 1].abs().max()).item()
        assert (early < 1e-10) == (AE is ldns.CausalAutoEncoder) and (z1 - z2)[..., t + 1:].abs().max() > 1e-3
    h = torch.randn(2, 3, 25, dtype=torch.float64)             # causal norm: the statistics of bins <= t
    assert all(torch.allclose(ldns.causal_instance_norm(h)[..., t], IN(h[..., :t + 1])[..., -1]) for t in (0, 7, 24))
    T, lengths = 17, torch.tensor([17, 16, 1, 8, 9, 2])
    m, mc = ldns.valid_mask(lengths, T), ldns.valid_mask(lengths, T, centred=True)
    z = torch.randn(6, 3, T, dtype=torch.float64) * m + 100 * (1 - m)  # padding far off
    (mu, var), (zc, mc2) = ldns.masked_moments(z, m, (0, 2)), ldns.centre_pad(z * m, lengths)
    valid = np.concatenate([z[i, :, :l].numpy() for i, l in enumerate(lengths.tolist())], axis=1)  # (3, sum l)
    assert np.allclose(mu[0, :, 0], valid.mean(1)) and np.allclose(var[0, :, 0], valid.var(1))
    assert torch.equal(mc, mc2) and torch.equal(ldns.crop_centred(zc, lengths), z * m)  # crop o pad = identity
    for i, l in enumerate(lengths.tolist()):                   # the segment in the middle, edge values either side
        left, nz = (T - l) // 2, lambda v: v[i, 0].nonzero().ravel().tolist()  # noqa: E731
        assert nz(m) == list(range(l)) and nz(mc) == list(range(left, left + l))
        assert torch.equal(zc[i, :, left:left + l], z[i, :, :l]) and (zc[i, :, :left] == z[i, :, :1]).all() and (
            zc[i, :, left + l:] == z[i, :, l - 1:l]).all()

def test_ldns_varlen_masked_denoiser_loss_and_sampling_at_lengths():
    torch.manual_seed(0)
    dn, ddpm, lengths = _perturbed(ldns.MaskedDenoiser(4, 16, 2, 8)).eval(), ldns.DDPM(), torch.tensor([30, 12, 7])
    zc, mc = ldns.centre_pad(torch.randn(3, 4, 30), lengths)
    zc2, t, ones = zc + 5 * torch.randn(zc.shape) * (1 - mc), torch.tensor([10, 500, 990]), mc * 0 + 1
    with torch.no_grad():
        e1, e2 = dn(zc, t, m=mc), dn(zc2, t, m=mc)             # the padding does not reach valid bins; with nothing
        assert ((e1 - e2) * mc).abs().max() < 1e-5 and ((e1 - e2) * (1 - mc)).abs().max() > 1e-3 and torch.allclose(
            dn(zc, t, m=ones), dn.backbone(torch.cat([zc, ones], 1), dn.t_mlp(ldns.timestep_embedding(t))), atol=1e-5)
        l1, l2 = (_seeded(ldns.masked_diffusion_loss, ddpm, dn, x0, mc, seed=3) for x0 in (zc, zc2))  # padded: the
        eps_hat, eps = _seeded(ddpm.predict_noise, dn, zc, m=mc, seed=3)  # plain instance norm; the loss written out
        assert abs(l1 - l2) < 1e-6 and torch.allclose(l1, (mc * (eps_hat - eps) ** 2).sum() / 196)
    ae, dn, lens = ldns.CausalAutoEncoder(6, 8, 2, 1, 8), ldns.MaskedDenoiser(2, 8, 1, 8), torch.tensor([3, 10, 24, 17])
    out = ldns.sample_at_lengths(ldns.Config(d_latent=2, sample_steps=5), ddpm, dn, ae, 0.0, 1.0, lens, 24)
    valid, left = ldns.valid_mask(lens, 24), (24 - lens) // 2
    assert (out["rates"] * (1 - valid) == 0).all() and (out["spikes"] * (1 - valid) == 0).all()
    assert ldns.length_buckets(48, 160, 3) == [(48, 85), (86, 122), (123, 160)] and all(torch.equal(out["rates"][
        i, :, :l], ae.decoder(out["z"])[i, :, left[i]:left[i] + l]) for i, l in enumerate(lens))  # decoded, cropped

def test_ldns_reach_data_conditions_and_decoders():
    T, d = 128, ldns.simulate_reach(40, 128, 64, np.random.default_rng(0))
    for b in (39, 57):                                         # inside every reach (onset <= 0.3 T < 0.45 T <= end)
        c = ldns.reach_condition(torch.tensor(d["velocity"]), b).numpy()
        assert np.allclose(np.arctan2(c[:, 1], c[:, 0]), d["angle"], atol=1e-5)  # the generating angle
    speed = np.hypot(*d["velocity"].transpose(1, 0, 2))        # (K,T); its integral is the reach distance
    assert ((speed.sum(1) / 100 > 0.08 - 1e-3) & (speed.sum(1) / 100 < 0.12 + 1e-3)).all() and speed[:, -19:].max() == 0
    assert speed[:, :19].max() == 0 and np.allclose(speed.max(1) / (speed.sum(1) / 100), 1.875 / (speed > 0).sum(1)
                                                    * 100, rtol=0.1)  # min-jerk peak speed: 15/8 distance/duration
    reg = np.concatenate([_rows(d["velocity"]), _rows(d["shared"]), np.ones((40 * T, 1))], 1)  # log-rates: linear
    coef = np.linalg.lstsq(reg, _rows(np.log(d["rates"])), rcond=None)[0]  # in v and x; cosine tuning, depth 0.7-1.4
    assert np.abs(reg @ coef - _rows(np.log(d["rates"]))).max() < 1e-3 and np.allclose(np.angle(np.exp(1j * (
        np.arctan2(coef[1], coef[0]) - d["pref_dir"]))), 0, atol=1e-3) and np.hypot(*coef[:2]).min() * 0.35 > 0.699
    hz, step = np.exp(coef[-1]) / 0.01, np.diff(np.unwrap(np.arctan2(d["shared"][:, 1], d["shared"][:, 0])), axis=1)
    assert 10 < hz.min() < 13 and 27 < hz.max() < 30 and 2 * np.pi * 0.0149 < step.min() and step.max() < 2 * np.pi * \
        0.0251 and 0.5 < np.hypot(*d["shared"][:, :2].transpose(1, 0, 2)).min()  # 10-30 Hz; rotation 1.5-2.5 Hz
    v = np.ones((2, 2, 3)) * np.array([[1, -1], [0, 1]])[..., None]  # directions -45 and 90 degrees
    assert np.allclose(ldns.angular_error_deg(v, np.radians([170.0, 10.0])), [145.0, 80.0])
    assert np.allclose(ldns.trajectory(v)[0, 0], [0.01, 0.02, 0.03]) and 0.3 < coef[2:5].std() < 0.5  # w ~ N(0, 0.16)
    rng = np.random.default_rng(0)                             # the ridge decoder recovers a known linear map
    rates, W, b = rng.gamma(2.0, 0.5, (30, 12, 40)), rng.standard_normal((12, 2)), np.array([0.3, -0.2])
    v = np.einsum("knt,nc->kct", rates, W) + b[None, :, None]  # (K,2,T)
    noisy, (X, Y) = v + rng.standard_normal(v.shape), (_rows(rates), _rows(v))  # R^2 = 1 - SSE/SST per output
    r2 = np.mean([1 - ((v[:, c] - noisy[:, c]) ** 2).sum() / ((v[:, c] - v[:, c].mean()) ** 2).sum() for c in (0, 1)])
    assert np.array_equal(ldns.bins_as_rows(v), Y) and math.isclose(ldns.r2_score(v, noisy), r2)
    Xc, Yc = X - X.mean(0), _rows(noisy) - _rows(noisy).mean(0)
    W50 = np.linalg.solve(Xc.T @ Xc + 50 * np.eye(12), Xc.T @ Yc)  # the ridge normal equations
    assert np.allclose(np.vstack(ldns.fit_ridge(X, _rows(noisy), 50.0)), np.vstack([W50, _rows(noisy).mean(0) - X.mean(
        0) @ W50]))

def test_ldns_reach_conditional_denoisers():
    torch.manual_seed(0)                                       # adaLN-Zero: the angle acts only after a training step
    dn, ddpm, z, t = ldns.ConditionalDenoiser(4, 16, 1, 8, 2), ldns.DDPM(), torch.randn(2, 4, 24), torch.tensor([5, 9])
    c1, c2, opt = torch.eye(2)[[0, 0]], torch.tensor([[0.0, 1], [-1, 0]]), torch.optim.AdamW(dn.parameters())
    assert torch.equal(dn(z, t, c=c1), dn(z, t, c=c2))
    ddpm.loss(dn, z, c=c1).backward(), opt.step()              # one training step
    assert not torch.allclose(dn(z, t, c=c1), dn(z, t, c=c2)) and torch.allclose(dn(z, t, c=c2), dn.backbone(
        z, dn.t_mlp(ldns.timestep_embedding(t)) + dn.c_mlp(c2)))     # e = e_t + e_c
    vdn, x0, v = _perturbed(ldns.VelocityDenoiser(4, 16, 1, 8)), torch.randn(2, 4, 24), torch.randn(2, 2, 24)
    (base := _seeded(ddpm.loss, vdn, x0, v=v, seed=1)).backward()  # the two extra output channels:
    assert vdn.conv_out.weight.grad[4:].abs().max() == vdn.conv_out.bias.grad[4:].abs().max() == 0  # no gradient
    assert torch.allclose(vdn(x0, t, v=v), vdn.backbone(torch.cat([x0, v], 1), vdn.t_mlp(ldns.timestep_embedding(t))))
    torch.nn.init.normal_(vdn.conv_out.weight[4:], 0, 10.0)
    assert _seeded(ddpm.loss, vdn, x0, v=v, seed=1) == base    # and no effect

# ==== GNOCCHI =========================================================================================================
def test_gn_mmd_adagn_attention_unet_and_encoder_written_out():
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), torch.randn(9, 3) + 0.5
    k = lambda a, b: np.mean([[math.exp(-sum((p - q) ** 2 for p, q in zip(u, v)) / 9) for v in b.tolist()]  # noqa
                              for u in a.tolist()])              # utils.py compute_kernel: exp(-||u - v||^2 / L^2), L 3
    assert abs(gn.mmd(x, y).item() - (k(x, x) + k(y, y) - 2 * k(x, y))) < 1e-6 and gn.mmd(x, x).abs() < 1e-6
    torch.manual_seed(0)
    blk, x, temb, cemb = gn.AuxResBlock(8, 16, 12, 0.0, groups=4), torch.randn(3, 8, 10), *torch.randn(2, 3, 12)
    (s_t, b_t), (s_c, b_c) = ((F.silu(e) @ p[1].weight.T)[..., None].chunk(2, 1) for e, p in ((temb, blk.temb_proj),
                                                                                  (cemb, blk.cemb_proj)))  # zero biases
    conv = lambda h, m: F.conv1d(h, m.weight, padding=1)                        # noqa: E731
    h = F.group_norm(conv(F.silu(F.group_norm(x, 4)), blk.block1[2]), 4) * (1 + s_t) + b_t  # GN(h)(1 + s_t) + b_t
    h = h * (1 + s_c) + b_c                                                     # then h (1 + s_c) + b_c
    h = conv(F.silu(F.group_norm(conv(F.silu(h), blk.block2[2]), 4)), blk.block3[3]) + F.conv1d(x, blk.shortcut.weight)
    assert torch.allclose(blk(x, temb, cemb), h, atol=1e-5) and gn.AuxResBlock(8, 8, 4, 0.0).norm2.num_groups == 8
    att, x = gn.AttnBlock(16, groups=8), torch.randn(3, 16, 11)
    q, k, v = F.conv1d(F.group_norm(x, 8), att.qkv.weight, att.qkv.bias).transpose(1, 2).chunk(3, 2)  # (B, T, C)
    assert torch.allclose(att(x), x + att.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2)), atol=1e-5)
    net = gn.UNet1D(5, 32, 3, 10, 0.1, ch_mult=(1, 2, 2, 2), res_blocks=2, attention=True, skip_all=True, groups=32)
    assert [sum(p.numel() for p in m.parameters()) for m in (gn.UNet1D(5, 16, 3, 10, 0.0), gn.GNOCCHI(  # --paper: 2
        gn.Config(), 48, 36), gn.GNOCCHI(gn.parse_args(["--paper"]), 48, 36))] == [101013, 431540, 6935696]  # + 3 up
    f = 1e4 ** (-torch.arange(16) / 16)                                         # sin(i f_k), cos(i f_k)
    assert torch.allclose(net.sin_table[7], torch.cat([torch.sin(7 * f), torch.cos(7 * f)]), atol=1e-5)
    x, i, c = torch.randn(2, 5, 13), torch.tensor([0, 9]), torch.randn(2, 3)  # T = 13 is padded to 16 and cropped
    assert (net(x, i, c) == 0).all() and [type(b.attn) for b in net.mid] == [gn.AttnBlock, torch.nn.Identity]  # tail 0
    out = torch.nn.init.normal_(net.tail[-1].weight) is not None and net.eval()(x, i, c)
    assert out.shape == (2, 5, 13) and not torch.allclose(out, net(x, i, torch.zeros(2, 3)))  # the code matters
    out = (enc := gn.Encoder(4, 13, 8, 3))(h := torch.randn(2, 4, 13))          # an odd T
    for conv, stride in zip(enc.net[::2], (1, 2, 2)):                           # Conv-SiLU, stride 2 on two
        h = F.silu(F.conv1d(h, conv.weight, conv.bias, stride=stride, padding=1))
    assert torch.allclose(out, enc.fc(h.flatten(1)), atol=1e-6)

def test_gn_loss_with_its_draws_ddim_with_exact_eps_predictors_the_sampler_and_the_train_loop():
    torch.manual_seed(0)
    model = gn.GNOCCHI(gn.Config(channels=16, diff_steps=20, code_dim=3, beta_1=.1, beta_T=.3, mmd_weight=.3), 4, 8)
    _, x0 = torch.nn.init.normal_(model.eps_model.tail[-1].weight), torch.randn(5, 4, 8)  # a U-Net output that is not 0
    torch.manual_seed(1)
    total, parts = model.loss(x0)
    torch.manual_seed(1)                                         # the same draws: i ~ U{0..19}, eps, the MMD's prior z
    i, eps, z, beta = torch.randint(0, 20, (5,)), torch.randn(5, 4, 8), torch.randn(5, 3), torch.linspace(.1, .3, 20)
    ab, c = torch.cumprod(1 - beta, 0)[i][:, None, None], model.encoder(x0)    # the code of the CLEAN x0
    x_i = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat = (1 - ab).sqrt() * x_i + ab.sqrt() * model.eps_model(x_i, i, c)   # the input skip
    x0_hat = (x0 - beta[0] / beta[0].sqrt() * eps_hat) / (1 - beta[0]).sqrt()  # (x0 - b_1/sqrt(1 - ab_1) e)/sqrt a_1
    ref = [t.item() for t in (((eps_hat - eps) ** 2).mean(), ((x0_hat - x0) ** 2).mean(), gn.mmd(c, z))]  # MMD^2
    assert np.allclose([*parts.values(), total.item()], [*ref, ref[0] + ref[1] / 20 + .3 * ref[2]], 1e-4)  # score, rec
    ab = gn.GNOCCHI(gn.Config(), N=2, T=3).alpha_bar.double()                  # 200 steps, abar_T as InfoDiffusion's
    x0, x_T = torch.randn(5, 6, 10, dtype=torch.float64), torch.randn(5, 6, 10, dtype=torch.float64)
    point = lambda x, i: (x - ab[i].sqrt()[:, None, None] * x0) / (1 - ab[i]).sqrt()[:, None, None]  # noqa: E731
    assert torch.allclose(gn.ddim_sample(point, x_T, ab, steps=7), x0)        # data = one point: DDIM lands on it
    # data N(0, 4): eps_hat = e x with e = sqrt(1 - abar) / (4 abar + 1 - abar), so each eta = 1 step is x' = A x + s z
    # and the variance follows v' = A^2 v + s^2 over the strided steps 199, 133, 66, 0 (DDIM Eq. 12, 16 written out)
    e, v, seq = lambda a: (1 - a).sqrt() / (4 * a + 1 - a), 1.0, [199, 133, 66, 0]  # noqa: E731
    for a, p in zip(ab[seq], [*ab[seq[1:]], torch.tensor(1.0)]):
        s2 = (1 - p) / (1 - a) * (1 - a / p)
        v = ((p / a).sqrt() * (1 - (1 - a).sqrt() * e(a)) + (1 - p - s2).sqrt() * e(a)) ** 2 * v + s2
    x_T = torch.randn(200000, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = gn.ddim_sample(lambda x, i: e(ab[i])[:, None, None] * x, x_T, ab, 4, 1.0, torch.Generator().manual_seed(1))
    model = gn.GNOCCHI(gn.Config(diff_steps=20, ddim_steps=2), 2, 3)          # at init eps_hat = sqrt(1 - abar) x, so
    a, b = model.alpha_bar[[19, 0]]                             # the steps 19 -> 0 -> x0 scale x_T by (v = 1.40 below)
    gain = ((a * b).sqrt() + ((1 - a) * (1 - b)).sqrt()) * b.sqrt()
    assert abs(x.var() / v - 1) < 0.02 and torch.allclose(model.sample(torch.zeros(4, 4), torch.Generator().manual_seed(
        3)), gain * torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(3)), atol=1e-5)
    torch.manual_seed(0)                                         # the training loop with a stub model:
    cfg, ks, model, seen = gn.Config(warmup=2, steps=5, weight_decay=.5), [3, .5, 3, .5, 3], torch.nn.Module(), []
    model.p = torch.nn.Parameter(torch.zeros(()))                # loss = k_t p: the gradient at step t is k_t
    step = lambda xb, t: seen.append((xb[:, 0, 0].tolist(), model.p.item())) or (model.p * ks[t - 1], dict(t=t))  # noqa
    hist = gn.train(model, torch.arange(1., 7)[:, None, None], cfg, 5, lambda s: .1 * gn.lr_factor(s, cfg), step, "")
    p, m, v = [0.0], 0.0, 0.0                                   # AdamW by hand on gradients clipped to norm 1, lr from
    for t, (lr, g) in enumerate(zip(0.1 * np.array([1, 1.5, 2, 1.5, 0.5]), np.minimum(ks, 1.0)), 1):  # warmup, cosine
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        p.append(p[-1] * (1 - lr * 0.5) - lr * m / (1 - 0.9 ** t) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8))
    assert np.allclose([s[1] for s in seen] + [model.p.item()], p, atol=1e-6) and len(hist) == 5 == hist[-1]["t"]
    assert {b for s in seen for b in s[0]} == {1, 2, 3, 4, 5, 6} and all(len(s[0]) == 64 for s in seen)  # batch 64
    with pytest.raises(FloatingPointError, match=r"LFADS-like: the training loss became nan at step 1; likely cause"):
        gn.train(model, torch.ones(4, 1, 1), cfg, 3, float, lambda xb, t: (model.p * math.nan, {}), "LFADS-like")

GRID = np.mgrid[-2:3:2, -2:3:2].reshape(2, -1).T * 1.0                     # targets (x, y) in {-2, 0, 2}^2
C_BAR, W = np.array([1., -1, 0]), np.array([[1., 0], [1, 1], [0, 2]])

def test_gn_simulator_the_split_the_input_ridge_r2_code_snrs_and_code_metrics():
    d, cfg = gn.make_reach_data(gn.Config(n_neurons=3, trials_per_target=2)), gn.parse_args(["--input", "rates"])
    for k, sums in dict(rates=(38125.55462570417, 718244.382326731), true_rates=(39059.51006634041, 398346.0930501437),
                        behaviour=(22602.164096662622, 10391739.85551107)).items():  # golden: seed 0, as llm.c keeps
        assert np.allclose([d[k].sum(), (d[k] ** 2).sum()], sums, rtol=1e-9), k
    pulled = gn.make_reach_data(gn.Config(n_neurons=3, trials_per_target=2, start_pull=0.5))["behaviour"]
    assert np.allclose(pulled - d["behaviour"], np.c_[0 * d["targets"], 0.5 * d["targets"], np.zeros(50)])  # start
    assert {tuple(t) for t in d["targets"][d["heldout"]]} == {(-2, 2), (2, 0), (0, -2)} and d["heldout"].sum() == 6
    d["rates"][:, 0] = 0.0                                                      # a silent neuron: z = 0, not NaN
    s, val = gn.split_and_zscore(dict(d), 0), ~d["heldout"] & (np.random.default_rng(1).random(50) < 0.15)  # seed + 1
    assert np.array_equal(s["val"], val) and np.array_equal(s["train"], ~d["heldout"] & ~val)  # 15 % validation
    x_tr = s["x"][s["train"], 1:]                                               # z-scored with TRAINING statistics
    assert np.allclose([x_tr.mean((0, 2)), x_tr.std((0, 2))], [[0], [1]], atol=1e-6) and (s["x"][:, 0] == 0).all()
    assert np.allclose(s["truth"] * s["sd"] + s["mu"], d["true_rates"])       # --input rates: the true rates (z)
    assert gn.gnocchi_input(cfg, s, {}) is s["truth"] and gn.gnocchi_input(gn.Config(input="smooth"), s, {}) is s["x"]
    assert (gn.gnocchi_input(gn.Config(), s, {"LFADS-like": (np.ones((2, 3)), lambda c: 2 * c)}) == 2).all()  # lfads
    assert np.allclose(gn.r2(np.array([[1., 0], [2, 1], [3, 5]]), np.array([[1., 1], [2, 1], [4, 5]])), [0.5, 13 / 14])
    C, lab = np.array([[0., 0], [2, 0], [10, 1], [10, 3], [10, 2]]), np.array([0, 0, 1, 1, 1])  # means (1, 0), (10, 2)
    # S_b = [[20.25, 4.5], [4.5, 1]], S_w = diag(1/2, 1/3): tr S_b / tr S_w, tr(S_w^-1 S_b) = 40.5 + 3; any invertible
    assert np.allclose([*gn.code_snr(C, lab), gn.code_snr(C @ [[2, 1], [0, 3]], lab)[1]], [21.25 * 6 / 5, 43.5, 43.5])
    X, Y = np.random.default_rng(0).normal(size=(20, 3)), np.random.default_rng(1).normal(size=(20, 2))
    Xc, lam = X - X.mean(0), 2.0 * (X - X.mean(0)).var(0).sum() * 20 / 3        # lam 2 x tr(Xc'Xc) / 3
    A = np.linalg.lstsq(np.r_[Xc, math.sqrt(lam) * np.eye(3)], np.r_[Y - Y.mean(0), np.zeros((3, 2))], rcond=None)[0]
    assert np.allclose(gn.ridge(X, Y, lam=2.0)(X[:4] + 1), (X[:4] + 1 - X.mean(0)) @ A + Y.mean(0))
    Y, s, k = np.repeat(GRID, 4, 0), np.tile([1., -1], 18), np.arange(36) // 4  # s = +-1 in each target: no effect
    ho, va, v = np.isin(k, [5, 7]), np.isin(k, [2, 6]), W @ [0.5, -0.25]         # on the fit of W; trial noise s v
    C = C_BAR + Y @ W.T + s[:, None] * v                         # codes on a plane: X'X is singular, lam 1e-6 copes
    m, res = gn.code_metrics(C, dict(targets=Y, heldout=ho, val=va, train=~ho & ~va))
    assert np.allclose(res["c_bar"], C_BAR) and np.allclose(res["W"], W) and np.isclose(m["cos_wx_wy"], 10 ** -0.5)
    mus, u = [C_BAR + W @ y for y in GRID[[0, 1, 3, 4, 8]]], W[:, 0] / math.sqrt(2)  # training targets' mean codes
    assert np.allclose([m["snr_train"], m["snr_x"], m["snr_heldout"]], [np.mean([np.sum((mu - np.mean(
        mus, 0)) ** 2) for mu in mus]) / (v @ v), np.var([mu @ u for mu in mus]) / (v @ u) ** 2, 5 / (v @ v)])
    B = np.linalg.lstsq(np.c_[np.ones(20), C[~ho & ~va]], Y[~ho & ~va], rcond=None)[0]  # the plane: unique predictions
    r = {n: gn.r2(Y[i], np.c_[np.ones(8), C[i]] @ B) for n, i in (("h", ho), ("v", va))}
    assert np.allclose([m["heldout_r2_x"], m["heldout_r2_y"], m["heldout_r2"], m["val_r2"]],
                       [*r["h"], r["h"].mean(), r["v"].mean()], atol=1e-4) and abs(r["h"][0] - r["h"][1]) > 0.01

def test_gn_generation_metrics_unintended_movement_sample_statistics_decoders_pca_and_seqvae():
    Y, ho = np.repeat(np.array([[0., 2], [2, 0], [1, 1]]), 2, 0), np.arange(6) < 4  # 4 bins of 2 b_x, b_y + .1 b_x,
    gen = lambda c: np.repeat(np.stack([2 * (b := (c - C_BAR) @ np.linalg.pinv(W).T)[:, 0], b[:, 1] + .1 * b[:, 0],
                                        2 * b[:, 0] - b[:, 1] + 1], 1)[..., None], 4, 2)  # noqa: E731  2 b_x - b_y + 1
    truth = np.repeat(np.c_[Y, 2 * Y[:, 0] - Y[:, 1]][:, :, None], 4, 2)       # the true PSTHs, without the errors
    m = gn.generation_metrics(C_BAR, W, gen, dict(targets=Y, heldout=ho, truth=truth), lambda x: x[:, :2, 0], 15)
    r_n = [1 - 16 / 8, 1 - 4 * 0.2 ** 2 / 8, 1 - 8 / 72]  # truth pooled over 2 held-out targets x 4 bins, per neuron
    assert np.allclose(list(m.values()), [np.mean(r_n), np.median(r_n), math.hypot(2, 0.2) / 2])  # end (0 2), (4 .2)
    B = np.c_[(rng := np.random.default_rng(0)).uniform(-4, 4, (60, 2)), rng.normal(0, .6, (60, 2)), rng.uniform(
        350, 550, 60)]                                           # end x, y, start x, y, duration
    Wc, c_bar, span = rng.normal(size=(6, 5)), rng.normal(size=6), np.ptp(B[5:, :2], 0)  # codes linear in behaviour
    for kappa in (0.0, 0.3):                                     # end x moves start x, end y moves start y and duration
        gen = lambda c: ((b := (c - c_bar) @ np.linalg.pinv(Wc).T) + kappa * np.c_[0 * b[:, :2], b[:, :2], 100 * b[
            :, 1]])[..., None]                                   # noqa: E731  trials (K, 5, 1) carrying W^+ (c - c_bar)
        m, means = gn.unintended_movement(c_bar + B @ Wc.T, B, np.arange(60) > 4, gen, lambda x: x[..., 0], 3)
        assert np.allclose(list(m.values()), [kappa * span.mean(), kappa, 50 * kappa * span[1]])  # U (cm), rel, ms
        assert np.allclose(means[1][:, 1], np.linspace(B[5:, 1].min(), B[5:, 1].max(), 9))  # w_y: 9 steps of end y
    x = np.stack([(Y := np.repeat(GRID / 2, 2, 0))[:, 0] + 1, Y[:, 1], Y[:, 0] - Y[:, 1]], 1)[..., None] * [1., 2]
    data, decode = dict(x=x, truth=x, targets=Y, train=np.ones(18, bool)), lambda z: np.c_[z[:, 0, 0] - 1, z[:, 1:, 0]]
    m = gn.sample_statistics(np.stack([3 * x[:, 0], x[:, 1], x[:, 0] - [1, 2]], 1), data, decode)  # 18 trials, 2 bins;
    # real neurons tx + 1, ty, tx - ty; generated 3 (tx + 1): end x 3 tx + 2 (in range at tx = -1), the mean PSTH x 3 in
    # neuron 0; ty; tx: pair correlations (0, 1, 0) against (0, .5, -.5) sqrt 2, r = sqrt(3) / 2 (by hand)
    assert np.allclose(list(m.values()), [1 - (2 ** 2 + 4 ** 2) / 3.5, 3 ** .5 / 2, 2, 1 / 3])
    B, A = rng.normal(size=(200, 5)) + [0, 0, 0, 0, 450], rng.normal(size=(5, 300))  # rates linear in all 5 variables
    data = dict(x=(B @ A).reshape(200, 30, 10), targets=B[:, :2], behaviour=B, train=np.arange(200) < 120,
                val=np.arange(200) // 40 == 3, heldout=np.arange(200) >= 160)
    gn.evaluate(gn.Config(), data, {}, metrics := {})            # the decoders recover end, start and duration
    assert np.allclose([*metrics["decoder_val_r2"], metrics["decoder_heldout_r2"]], 1, atol=2e-3)
    x = np.random.default_rng(0).normal(size=(30, 2, 3)) * np.array([3., 2, 1.5, 1, .7, .5]).reshape(1, 2, 3)
    (codes, generate), X = gn.pca_latent(dict(x=x, train=np.arange(30) < 20), 2), x.reshape(30, 6)
    V, Xc = np.linalg.eigh(np.cov(X[:20].T))[1][:, ::-1][:, :2], X - X[:20].mean(0)  # the top 2 eigenvectors
    assert np.allclose(abs(codes), abs(Xc @ V)) and np.allclose(generate(codes).reshape(30, 6), X - Xc + Xc @ V @ V.T)
    vae, x = gn.SeqVAE(N=6, L=3, H=8, n_fac=4), torch.randn(5, 6, 9)
    states = vae.encoder(x.transpose(1, 2))[0]                                  # (B, T, 2H): forward | backward
    mu, logvar = vae.to_post(torch.cat([states[:, -1, :8], states[:, 0, 8:]], 1)).chunk(2, 1)
    loss, parts = torch.manual_seed(1) and vae.loss(x, kl_weight=0.3)    # the generator from h_0 = tanh(W g0 + b)
    g0 = mu + (0.5 * logvar).exp() * torch.randn(5, 3, generator=torch.Generator().manual_seed(1))  # the same z
    rates = vae.readout(vae.generator(torch.zeros(5, 9, 1), torch.tanh(vae.to_h0(g0))[None])[0] @ vae.to_fac.weight.T)
    kl, rec = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar), 0.5 * ((rates.transpose(1, 2) - x) ** 2).sum((1, 2))
    assert abs(parts["kl"] - kl.sum(1).mean().item()) < 1e-5 and torch.isclose(loss, (rec + .3 * kl.sum(1)).mean() / 54)
    cfg, d = gn.Config(lfads_steps=2, device="cpu"), dict(x=np.random.default_rng(0).normal(size=(9, 6, 9)))
    C, generate = gn.baseline_latents(cfg, dict(d, train=np.arange(9) < 6), m := {})["LFADS-like"]
    assert len(m["lfads_kl_per_dim"]) == 4 and min(m["lfads_kl_per_dim"]) > 0 and generate(C).shape == (9, 6, 9)

# ==== Spike-GAN =======================================================================================================
def test_sg_wgan_gp_objective_in_closed_form():
    w, x, xf, alpha = torch.randn(3, 5).requires_grad_(), torch.rand(4, 3, 5), torch.rand(4, 3, 5), torch.rand(4, 1, 1)
    linear, quadratic = (lambda y: (y * w).flatten(1).sum(1)), (lambda y: (y * w).pow(2).flatten(1).sum(1) / 2)
    gp = sg.gradient_penalty(linear, x, xf, alpha)                       # grad <w, x> = w: the norm of the whole sample
    gp.backward()                                                        # the penalty's gradient reaches the critic
    assert torch.allclose(gp, (w.norm() - 1) ** 2) and torch.allclose(w.grad, 2 * (w.norm() - 1) * w / w.norm())
    g = (w ** 2 * (x + alpha * (xf - x))).flatten(1).norm(dim=1)         # grad |w x|^2 / 2 = w^2 x_hat, per sample
    assert torch.allclose(sg.gradient_penalty(quadratic, x, xf, alpha), ((g - 1) ** 2).mean())
    torch.manual_seed(1)
    drawn = sg.gradient_penalty(quadratic, x, xf)
    torch.manual_seed(1)                                                 # alpha ~ U(0, 1), one per sample
    assert torch.allclose(drawn, sg.gradient_penalty(quadratic, x, xf, torch.rand(4, 1, 1)))
    mean_D = (xf * w).sum() / 4 - (x * w).sum() / 4                      # E[D(x_fake)] - E[D(x)], lambda 10 or 3
    assert torch.allclose(sg.critic_loss(linear, x, xf), mean_D + 10 * (w.norm() - 1) ** 2)
    assert torch.allclose(sg.critic_loss(linear, x, xf, 3.0), mean_D + 3 * (w.norm() - 1) ** 2)

@pytest.mark.parametrize("decay", [True, False])
def test_sg_train_is_alg1_written_out(decay):
    cfg = sg.Config(device="cpu", iters=3, critic_iters=2, batch=4, lr=0.01, lr_decay=decay, lambd=3.0, eval_every=2)
    x, y = np.random.default_rng(0).random((2, 11, 3, 4)) < 0.3        # 2 batches per epoch, 3 samples left over
    torch.manual_seed(0)
    G, D = sg.init_weights(sg.Generator(3, 4, 2, z_dim=5)), sg.init_weights(sg.Critic(3, 4, 2))
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    torch.manual_seed(1)
    history = sg.train(cfg, G, D, dict(train=x, test=y))
    torch.manual_seed(1)                                                 # the same draws, in the same order
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), betas=(0.0, 0.9)) for m in (G0, D0))
    data, queue = torch.as_tensor(x).float(), []
    for it in range(3):
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = 0.01 * (1 - it / 3) if decay else 0.01       # linear decay to 0, or constant
        for xf in G0(torch.randn(8, 5)).detach().split(4):              # the critic steps' fakes drawn first, then
            queue = queue or list(torch.randperm(11)[:8].view(2, 4))    # a real batch (a reshuffle every epoch)
            xr = data[queue.pop(0)]
            xh = (xr + torch.rand(4, 1, 1) * (xf - xr)).requires_grad_()
            g, = torch.autograd.grad(D0(xh).sum(), xh, create_graph=True)
            loss_D = D0(xf).mean() - D0(xr).mean() + 3.0 * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
            opt_D.zero_grad(), loss_D.backward(), opt_D.step()
        loss_G = -D0(G0(torch.randn(4, 5))).mean()                       # then one generator step
        opt_G.zero_grad(), loss_G.backward(), opt_G.step()
    for a, b in zip([*G.parameters(), *D.parameters()], [*G0.parameters(), *D0.parameters()]):
        assert torch.allclose(a, b, atol=1e-5) and a.requires_grad
    gen, h = torch.Generator().manual_seed(1), history[-1]               # the monitor's own draws: 2 evaluations
    torch.randn(2048, 5, generator=gen), torch.rand(2048, 3, 4, generator=gen)
    with torch.no_grad():
        p = G0(torch.randn(2048, 5, generator=gen))
        s, w = p > torch.rand(p.shape, generator=gen), [(D0(torch.tensor(r).float()).mean() - D0(p[:1024]).mean())
                                                         .item() for r in (x, y)]
    assert [h["iter"] for h in history] == [2, 3] and h["loss_G"] == pytest.approx(loss_G.item(), abs=1e-5)
    assert h["loss_D"] == pytest.approx(loss_D.item(), abs=1e-5) and [h["train_w"], h["dev_w"]] == pytest.approx(w)
    assert h["lag1_ratio"] == pytest.approx(((s[..., 1:] & s[..., :-1]).sum() / s.sum() / s.float().mean()).item())

def test_sg_critic_and_generator_layers_and_official_parameter_counts():
    torch.manual_seed(0)
    D, G = sg.init_weights(sg.Critic(3, 8, 2)), sg.init_weights(sg.Generator(3, 8, 2, z_dim=5))
    W = [*D.parameters(), *G.parameters()]                               # critic channels F, 2F; generator 2F, F, N
    assert [tuple(p.shape) for p in W] == [(2, 3, 5), (2,), (4, 2, 5), (4,), (1, 8), (1,), (8, 5), (8,),
                                           (2, 4, 5), (2,), (3, 2, 5), (3,)]
    weights = torch.cat([p.flatten() for p in W if p.dim() > 1])         # U(-0.02 sqrt 3, 0.02 sqrt 3): std 0.02
    assert all((p == 0).all() for p in W if p.dim() == 1) and weights.abs().max() <= 0.02 * math.sqrt(3) and 0.018 < \
        weights.std() < 0.022
    for p in W:
        p.data.normal_(0, 0.5)
    leaky, x, z = (lambda h: torch.where(h > 0, h, 0.2 * h)), torch.rand(2, 3, 8), torch.randn(2, 5)
    h = leaky(F.conv1d(leaky(F.conv1d(x, W[0], W[1], stride=2, padding=2)), W[2], W[3], stride=2, padding=2))
    assert torch.allclose(D(x), h.flatten(1) @ W[4][0] + W[5], atol=1e-5)
    h = leaky((z @ W[6].T + W[7]).view(2, 4, 2))
    for w, b in ((W[8], W[9]), (W[10], W[11])):
        h = leaky(F.conv1d(h.repeat_interleave(2, -1), w, b, padding=2))   # nearest x2, then a 'same' conv
    assert torch.allclose(G(z), torch.sigmoid(h), atol=1e-6)
    cfg, N, T, F_ = sg.parse_args(["--paper"]), 16, 128, 256             # Fig 2 job: critic N -> 256 -> 512 -> 1
    assert (cfg.window, cfg.features, cfg.lr, cfg.lr_decay, cfg.iters) == (T, F_, 1e-4, False, 300000)
    assert sum(p.numel() for p in sg.Critic(N, T, F_).parameters()) == (N * F_ * 5 + F_) + (F_ * 2 * F_ * 5 + 2 * F_
                                                                          ) + (2 * F_ * T // 4 + 1) == 692993
    assert sum(p.numel() for p in sg.Generator(N, T, F_).parameters()) == (128 * 2 * F_ * T // 4 + 2 * F_ * T // 4) + (
        2 * F_ * F_ * 5 + F_) + (F_ * N * 5 + N) == 2789648                # z 128 -> (512, T/4) -> 256 -> N

def test_sg_simulators():
    rng = np.random.default_rng(0)
    for d in (1, 3):                      # two spikes d bins apart: one pass, the later survives w.p. 1 - e^(-d/s^2)
        s = sg.refractory_soft(np.isin(np.arange(8), [2, 2 + d])[None].repeat(20000, 0), np.zeros(20000), 2.0, rng)
        assert s[:, 2].all() and abs(s[:, 2 + d].mean() - 1 + math.exp(-d / (2 / 1.5) ** 2)) < 0.015
    x = sg.make_uniform_data(sg.Config(n_train=2048, n_test=1))["train"]     # Fig 2 data, T 32: spec 0.119, .12 .37 .64
    ratio = [(x[..., :-l] & x[..., l:]).sum() / x.sum() / x.mean() for l in (1, 2, 3)]
    assert 0.1 < x.mean() < 0.14 and ratio[0] < 0.2 and ratio[0] < ratio[1] < ratio[2] < 1
    data = sg.make_uniform_data(sg.Config(neurons=5, window=16, refr=1e-3, rate=0.2, corr=0.4, n_train=4000, n_test=3))
    (f, c, perm), x = data["params"].values(), data["train"][:, np.argsort(data["params"]["perm"])]   # refr ~0, grouped
    r = np.corrcoef(x.transpose(1, 0, 2).reshape(5, -1)[:4])                         # (N, S*T) -> (4, 4)
    assert np.allclose(x.mean((0, 2)), [f[0], f[0], f[1], f[1], 0], atol=0.01) and np.abs(r[:2, 2:]).max() < 0.03
    assert np.allclose([r[0, 1], r[2, 3]], c, atol=0.03) and data["test"].shape == (3, 5, 16)   # correlation c_g

def test_sg_statistics_sampling_and_importance_maps_against_loops():
    x = np.random.default_rng(0).random((3, 4, 6)) < 0.4
    S, N, T = x.shape
    st, rows = sg.spike_stats(x), [[int(x[s, n, t]) for s in range(S) for t in range(T)] for n in range(N)]

    def cov(a, b):                                                      # sample covariance, ddof 1
        return sum((u - sum(a) / len(a)) * (v - sum(b) / len(b)) for u, v in zip(a, b)) / (len(a) - 1)
    C = [[cov(rows[i], rows[j]) for j in range(N)] for i in range(N)]
    assert np.allclose(st["cov"], [C[i][j] for i in range(N) for j in range(N) if i != j])
    assert np.allclose(st["var"], [C[i][i] for i in range(N)]) and np.allclose(st["mean"], [sum(r) / S for r in rows])
    lag = [cov(rows[i][:-1], rows[j][1:]) for i in range(N) for j in range(N)]          # cov(x_i(t), x_j(t+1))
    acg = [sum(x[s, n, t] & x[s, n, t + l] for s in range(S) for n in range(N) for t in range(T - l)) / x.sum()
           for l in range(1, T)]                                        # lags 1..T-1 (max_lag 10 > T - 1)
    assert np.allclose(st["lag_cov"], lag) and np.allclose(st["acg"], acg[::-1] + [0] + acg)
    assert np.allclose(st["k_probs"], [np.mean(x.sum(1) == k) for k in range(N + 1)]) and st["lag1_ratio"] == \
        pytest.approx(acg[0] / x.mean()) and len(sg.spike_stats(x.repeat(6, 2))["acg"]) == 21
    assert np.allclose(st["psth"], [x[:, n, t].mean() for n in range(N) for t in range(T)])
    keys = ("mean", "cov", "var", "k_probs", "acg", "psth", "lag_cov")
    out = sg.compare({"lag1_ratio": 0.5, **{k: np.array([1., 3, 2]) * (i + 1) for i, k in enumerate(keys)}},
                     {k: np.array([1., 2, 4]) for k in keys})                  # r = 3 / sqrt(84) and L1 by hand
    assert out == {"lag1_ratio": 0.5, **{f"{k}_{m}": pytest.approx(3 / math.sqrt(84) if m == "r" else sum(abs(
        a * (i + 1) - b) for a, b in ((1, 1), (3, 2), (2, 4)))) for i, k in enumerate(keys) for m in ("r", "l1")}}
    train = np.random.default_rng(1).random((8200, 2, 8)) < 0.5         # more than one chunk of 8192
    train[1:8192] = False                                               # the nearest patterns: first and last chunk
    x = np.stack([train[8192], ~train[0], ~train[8198], train[5]])      # n_near 3 of 4 samples; a 0 past n_near
    near = [min((a != b).sum() for b in train) for a in x[:3]]          # Hamming distance by brute force
    assert sg.memorisation(x, train, 3) == pytest.approx(dict(memorised_frac=1 / 3, nearest_hamming=np.mean(near)))
    G, gen = sg.init_weights(sg.Generator(4, 8, 2)), torch.Generator().manual_seed(7)
    p, x = sg.sample(G, 5, torch.Generator().manual_seed(7))
    assert torch.equal(p, G(torch.randn(5, 128, generator=gen)))        # z, then u, from the one generator
    assert x.dtype == bool and (x == (p > torch.rand(p.shape, generator=gen)).numpy()).all()
    w, x = torch.randn(2, 10), (torch.rand(2, 2, 10) < 0.5).float()    # S 2, N 2, T 10
    I = sg.importance_map(lambda y: (y * w).flatten(1).sum(1), x, gen=torch.Generator().manual_seed(0))  # P 8, 5 reps
    gen, g = torch.Generator().manual_seed(0), torch.zeros(2, 3, 2)      # g: (S, T - P + 1 windows, N)
    for tau, _ in np.ndindex(3, 5):                                      # 5 shuffles per window, in the same draws
        order = torch.rand(2, 2, 8, generator=gen).argsort(-1)
        for s, n in np.ndindex(2, 2):                                    # |D(x') - D(x)| of the linear critic
            v = x[s, n, tau:tau + 8]
            g[s, tau, n] += ((v[order[s, n]] - v) * w[n, tau:tau + 8]).sum().abs() / 5
    for s, n, t in np.ndindex(2, 2, 10):                                 # a spike's mean over the windows holding it
        assert I[s, n, t] == pytest.approx(x[s, n, t] * g[s, [u for u in range(3) if u <= t < u + 8], n].mean())

def test_sg_dichotomized_gaussians_and_independent_baseline_on_refractory_data():
    rho = torch.tensor([-0.7, 0.95, 0.5], dtype=torch.float64)          # P(u < 0, v < 0) = 1/4 + asin(rho) / 2 pi
    assert torch.allclose(sg.Phi2(rho * 0, rho * 0, rho), 0.25 + torch.asin(rho) / (2 * math.pi), atol=1e-6)
    cfg = sg.Config(neurons=8, window=16, n_train=3000, n_test=1, n_gen=8000, seed=3)
    x = sg.make_uniform_data(cfg)["train"]                               # (3000, 8, 16) with a refractory dip
    gen = torch.Generator().manual_seed(6)                               # seed + 3: independent, spatial, temporal
    ind = torch.rand(8000, 8, 16, generator=gen, dtype=torch.float64).numpy() < x.mean((0, 2))[:, None]
    gamma, A = sg.fit_dg(x, temporal=False)
    out, Lam = sg.baselines(cfg, x), (A @ A.T).view(8, 16, 8, 16)       # Lambda (n t, n' t'): no coupling across bins
    assert (out["independent"] == ind).all() and (out["spatial DG"] == sg.sample_dg(gamma, A, 8000, gen)).all()
    eps = torch.randn(5, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)   # 1[gamma + A eps > 0]
    assert (sg.sample_dg(gamma, A, 5, torch.Generator().manual_seed(1)) == (gamma[:, None] + (eps @ A.T).view(
        5, 8, 16) > 0).numpy()).all()
    assert (Lam * (1 - torch.eye(16, dtype=torch.float64))[None, :, None]).abs().max() < 1e-9
    pn, moments = x.mean((0, 2)), (lambda z: np.einsum("sit,sjt->ij", z, z) / z[:, 0].size - np.outer(
        z.mean((0, 2)), z.mean((0, 2))))                                 # lag-0 covariance per bin (N, N)
    C, memoryless = moments(x.astype(float)), 15 / 16 * 8 * (pn ** 2).sum() / pn.sum() ** 2   # (T-1)/T E p^2 / (E p)^2
    for name, want in (("independent", np.diag(np.diag(C))), ("spatial DG", C), ("spatiotemporal DG", C)):
        y = out[name]
        assert np.abs(y.mean((0, 2)) - pn).max() < 0.01 and np.abs(moments(y.astype(float)) - want).max() < 0.006
        ratio = (y[..., 1:] & y[..., :-1]).sum() / y.sum() / y.mean()   # memoryless, but the spatiotemporal DG's dip
        assert ratio == pytest.approx(memoryless, abs=0.03) if name != "spatiotemporal DG" else ratio < 0.5
    m = [np.einsum("sit,sjt->ij", z[..., :16 - l], z[..., l:]) / (len(z) * (16 - l)) for z in (
        x.astype(float), out["spatiotemporal DG"].astype(float)) for l in (1, 3)]   # E[x_i(t) x_j(t + l)] reproduced
    assert np.abs(np.subtract(m[:2], m[2:])).max() < 0.004

# ==== Tutorial ========================================================================================================
def test_tutorial_notebook_executes(tmp_path, monkeypatch):
    """Committed executed (no error, >= 6 figures, < 3 MB, >= 10 asserts, 4 exercises: stub, solution, check); every
    cell runs in order in a fresh interpreter at toy sizes, passes its checks and writes only into its OUT folder."""
    path = os.path.join(ROOT, "tutorial.ipynb")
    nb = json.loads(open(path, encoding="utf-8").read())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    cells, outputs = ["".join(c["source"]) for c in code], [o for c in code for o in c.get("outputs", [])]
    assert nb["nbformat"] == 4 and os.path.getsize(path) < 3e6 and all(c.get("execution_count") for c in code)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 6 and sum(s.count("assert ") for s in cells) >= 10
    assert not [o for o in outputs if o["output_type"] == "error"]
    stubs = [i for i, src in enumerate(cells) if "raise NotImplementedError" in src]
    defs = [re.findall(r"^def (\w+)", c, re.M) for c in cells]   # stub -> solution (the same functions) -> check
    assert all(defs[i] and defs[i + 1] == defs[i] and "assert" in cells[i + 2] for i in stubs)
    script = tmp_path / "tutorial_cells.py"
    script.write_text("\n\n".join(cells) + "\nimport json\nprint('METRICS', json.dumps([res['gen_vs_real/r_corr'], "
                      "m_sg['Spike-GAN']['mean_r'], results_g['GNOCCHI']['metrics']['heldout_r2'], *[v for r in "
                      "side.values() for v in r.values()]]))\n", encoding="utf-8")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("NEUROGEN_TUTORIAL_FAST", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))      # OUT = tempfile.mkdtemp() lands in tmp_path/tmp
    r = run_cli([str(script)], cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and len(stubs) == 4 and r.stdout.count(": correct") == 4, r.stderr[-3000:]
    assert all(np.isfinite(json.loads(r.stdout.split("METRICS ")[-1])))
    out = [p for p in (tmp_path / "tmp").iterdir() if not p.name.startswith("torchinductor_")]  # torch's own cache
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp", "tutorial_cells.py"] and len(out) == 1
    assert out[0].name.startswith("neurogen-tutorial-") and [p.name for p in out[0].iterdir()] == ["side_by_side.npz"]
