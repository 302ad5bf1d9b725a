"""Tests for neurogen-minimal: identity and oracle tests of each component, end-to-end --quick runs, bad input.

Run: python -m pytest -q   (under 5 minutes on 2 CPU cores)
"""
import importlib
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_FILES = ["ldns_minimal.py", "gnocchi_minimal.py", "spikegan_minimal.py"]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import gnocchi_minimal as gn  # noqa: E402
import ldns_minimal as ldns  # noqa: E402
import spikegan_minimal as sg  # noqa: E402


def run_cli(args, cwd, timeout=120):
    """Run `python <args>` in cwd with the repo on PYTHONPATH; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# -----------------------------------------------------------------------------
# Foundation: every present model file imports cleanly, has --help, rejects bad CLI values
# -----------------------------------------------------------------------------
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
    for flag in ("--demo", "--quick", "--out", "--seed", "--device", "--data", "--threads"):
        assert flag in r.stdout, f"{fname} --help lacks {flag}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fname", MODEL_FILES)
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


# =====================================================================================================================
# LDNS: S4 identities, DDPM algebra, losses, --quick contract, bad input
# =====================================================================================================================

LDNS_TINY = ["--quick", "--threads", "1", "--seed", "3"]


# -----------------------------------------------------------------------------
# S4: FFT convolution == explicit convolution == recurrence; kernels extend exactly
# -----------------------------------------------------------------------------
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


def test_ldns_hippo_legs_init():
    w, B = ldns.hippo_legs(64)
    assert w.shape == (32,) and (w > 0).all() and np.abs(B.imag).max() <= 2
    s4 = ldns.S4D(5, 64)
    assert torch.allclose(-s4.log_A_real.exp(), torch.full((5, 32), -0.5))
    dt = s4.log_dt.exp()
    assert (dt >= 1e-3).all() and (dt <= 1e-1).all()


# -----------------------------------------------------------------------------
# DDPM algebra
# -----------------------------------------------------------------------------
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


# -----------------------------------------------------------------------------
# Losses and models
# -----------------------------------------------------------------------------
def test_ldns_masked_poisson_nll_counts_only_masked_entries():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(2, 5, 9) * 2)
    M = (torch.rand_like(x) > 0.3).float()                    # 1 = kept, 0 = dropped
    rates = torch.rand_like(x) + 0.1
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


def test_ldns_lorenz_data_recipe():
    d = ldns.make_lorenz_data(20, 64, 16, np.random.default_rng(0))
    assert d["spikes"].shape == (20, 16, 64) and d["latents"].shape == (20, 3, 64)
    assert np.allclose(d["latents"].mean(-1), 0, atol=1e-5) and np.allclose(d["latents"].std(-1), 1, atol=1e-4)
    assert 0.05 < d["spikes"].mean() < 0.4 and d["spikes"].dtype.kind == "i"


def test_ldns_isi_stats_small_example():
    s = np.zeros((1, 1, 10), dtype=np.int64)
    s[0, 0, [1, 4]] = 1
    s[0, 0, 7] = 2                                             # spikes at 1.5, 4.5, 7+1/3, 7+2/3
    mean, std = ldns.isi_stats(s)
    isi = np.diff([1.5, 4.5, 7 + 1 / 3, 7 + 2 / 3])
    assert np.isclose(mean[0], isi.mean()) and np.isclose(std[0], isi.std())


# -----------------------------------------------------------------------------
# End to end: output contract, determinism, bad input
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ldns_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "run"
    r = run_cli([os.path.join(ROOT, "ldns_minimal.py"), *LDNS_TINY, "--out", str(out)], cwd=out.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_ldns_quick_writes_the_output_contract(ldns_quick_run):
    out = ldns_quick_run
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz", "ae.pt", "denoiser.pt"):
        assert (out / f).exists(), f
    assert len(list((out / "figures").glob("*.png"))) == 5
    timing = json.loads((out / "timing.json").read_text())
    assert timing["total"] < 30, timing
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("gen_vs_real/r_psc", "gen_vs_real/kl_psc", "gen_vs_real/r_corr", "gen_vs_real/r_mean_isi",
              "gen_vs_real/r_std_isi", "real_vs_real/r_std_isi", "ae/test_rate_mse", "ae/latent_r2"):
        assert k in metrics, k
    with np.load(out / "samples.npz") as f:
        assert f["real"].shape[1:] == f["generated"].shape[1:] and f["real"].dtype.kind == "i"
        assert len(f["real"]) == metrics["data/n_real"] and len(f["generated"]) == metrics["data/n_generated"]
    for f in ("ae.pt", "denoiser.pt"):
        assert isinstance(torch.load(out / f, weights_only=True), dict)


def test_ldns_same_seed_gives_identical_metrics(ldns_quick_run, tmp_path):
    ldns.main(LDNS_TINY + ["--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "metrics.json").read_text() == (ldns_quick_run / "metrics.json").read_text()


def _save(path, arr, key="spikes"):
    if str(path).endswith(".npz"):
        np.savez(path, **{key: arr})
    else:
        np.save(path, arr)
    return str(path)


GOOD = np.random.default_rng(0).poisson(0.3, (12, 8, 32))


@pytest.mark.parametrize("name,arr,fname,match", [
    ("dims", GOOD[0], "a.npy", "3 dims"),
    ("dtype", GOOD.astype(str), "a.npy", "dtype"),
    ("negative", GOOD - 1, "a.npy", "non-negative"),
    ("nan", np.where(GOOD > 1, np.nan, GOOD), "a.npy", "NaN"),
    ("non-integer", GOOD + 0.5, "a.npy", "integer"),
    ("few trials", GOOD[:9], "a.npy", "10 trials"),
    ("few bins", GOOD[..., :15], "a.npy", "16 time bins"),
    ("npz key", GOOD, "a.npz", "'spikes'"),
    ("missing file", None, "none.npy", "existing"),
])
def test_ldns_bad_data_raises_before_training(tmp_path, name, arr, fname, match):
    key = "x" if name == "npz key" else "spikes"
    path = str(tmp_path / fname) if arr is None else _save(tmp_path / fname, arr, key)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        ldns.main(["--data", path, "--out", str(out), "--quick"])
    assert not out.exists(), "output written before validation"


def test_ldns_own_data_runs_without_latent_metrics(tmp_path):
    path = _save(tmp_path / "s.npz", GOOD)
    res = ldns.main(["--data", path, "--out", str(tmp_path / "o"), "--quick", "--ae-steps", "3", "--dn-steps", "3"])
    assert "ae/latent_r2" not in res and np.isfinite(res["gen_vs_real/r_rate"])


def test_ldns_cli_rejects_indivisible_latent_groups(capsys):
    with pytest.raises(SystemExit) as e:
        ldns.main(["--ae-channels", "30", "--d-latent", "8"])
    assert e.value.code == 2 and "--d-latent" in capsys.readouterr().err


# =====================================================================================================================
# GNOCCHI: MMD, AdaGN, schedule/DDIM, held-out hygiene, --quick, bad input
# =====================================================================================================================

def test_gn_mmd_zero_symmetric_positive():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 8, generator=g), torch.randn(128, 8, generator=g)
    assert gn.mmd(x, x).abs() < 1e-6                                   # biased V-statistic: exactly 0 on one set
    assert torch.allclose(gn.mmd(x, y), gn.mmd(y, x), rtol=0, atol=1e-6)        # up to float32 summation order
    assert gn.mmd(x, y + 1.5) > 10 * gn.mmd(x, y) > 0                   # shifted set is far, two draws are close


def test_gn_adagn_uses_code_and_output_layer_is_zero():
    torch.manual_seed(0)
    blk = gn.AuxResBlock(16, 32, 64, dropout=0.0)
    x, temb = torch.randn(4, 16, 12), torch.randn(4, 64)
    assert not torch.allclose(blk(x, temb, torch.randn(4, 64)), blk(x, temb, torch.randn(4, 64)))
    net = gn.UNet1D(N=10, C=16, L=4, T_diff=20, dropout=0.0)
    eps_hat = net(torch.randn(3, 10, 12), torch.tensor([0, 5, 19]), torch.randn(3, 4))
    assert eps_hat.shape == (3, 10, 12) and (eps_hat == 0).all()     # zero-initialised output conv
    nn_tail = net.tail[-1]
    torch.nn.init.normal_(nn_tail.weight)                             # once trained, the code changes eps_hat
    x, i = torch.randn(2, 10, 13), torch.tensor([3, 3])              # odd T is padded and cropped back
    assert not torch.allclose(net(x, i, torch.zeros(2, 4)), net(x, i, torch.ones(2, 4)))


def test_gn_schedule_ends_near_zero_and_ddim_oracle_recovers_x0():
    model = gn.GNOCCHI(gn.Config(), N=6, T=10)
    ab = model.alpha_bar
    assert (ab[1:] < ab[:-1]).all() and ab[0] < 1 and ab[-1] < 0.01    # abar_T ~ 0: x_T is almost white noise
    ref = torch.cumprod(1 - torch.linspace(1e-5, 1e-2, 1000, dtype=torch.float64), 0)[-1]  # InfoDiffusion's
    assert abs(ab[-1].item() - ref.item()) < 1e-3                        # 1000-step schedule ends at the same abar
    x0, x_T = torch.randn(5, 6, 10), torch.randn(5, 6, 10)
    oracle = lambda x, i: (x - ab[i].sqrt()[:, None, None] * x0) / (1 - ab[i]).sqrt()[:, None, None]
    assert torch.allclose(gn.ddim_sample(oracle, x_T, ab, steps=7), x0, atol=1e-4)
    q = model.q_sample(x0, torch.full((5,), 10), x_T)                 # forward process closed form
    assert torch.allclose(oracle(q, torch.full((5,), 10)), x_T, atol=1e-5)


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


def test_gn_bad_data_raises_value_error(tmp_path):
    good = np.random.default_rng(0).poisson(2.0, (20, 5, 12))
    cases = {"nofile": None, "nokey": dict(counts=good), "both": dict(rates=good * 1.0, spikes=good),
             "2d": dict(rates=good[0] * 1.0), "nan": dict(rates=np.full((20, 5, 12), np.nan)),
             "neg": dict(spikes=-good), "tlen": dict(spikes=good, targets=np.zeros((19, 2))),
             "hobool": dict(spikes=good, targets=np.zeros((20, 2)), heldout=np.zeros(20)),
             "honotargets": dict(spikes=good, heldout=np.ones(20, bool))}
    for name, arrays in cases.items():
        path = str(tmp_path / f"{name}.npz")
        if arrays is not None:
            np.savez(path, **arrays)
        out = tmp_path / f"out_{name}"
        with pytest.raises(ValueError):
            gn.main(["--data", path, "--quick", "--out", str(out)])
        assert not out.exists(), "outputs written before validation"


def test_gn_lfads_baseline_kl_matches_torch_and_generator_is_autonomous():
    torch.manual_seed(0)
    vae, x = gn.SeqVAE(N=6, L=3, H=8, n_fac=4), torch.randn(5, 6, 9)
    mu, logvar = vae.posterior(x)
    _, kl = vae.loss(x)                                                # the posterior is deterministic given x
    q, p = torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    assert abs(kl - torch.distributions.kl_divergence(q, p).sum(1).mean().item()) < 1e-5   # oracle: closed form
    g0 = torch.randn(2, 3)
    assert torch.equal(vae.decode(g0, 9), vae.decode(g0, 9))          # the output depends on g0 only (no inputs)
    assert vae.decode(g0, 9).shape == (2, 6, 9) and not torch.allclose(vae.decode(g0, 9), vae.decode(-g0, 9))


GN_TINY = ["--quick", "--threads", "1"]  # fixed thread count: float sums must run in the same order in both runs


@pytest.fixture(scope="module")
def gn_quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gnocchi_quick")
    t0 = time.time()
    r = run_cli([os.path.join(ROOT, "gnocchi_minimal.py"), *GN_TINY, "--out", str(out)], cwd=out)
    return r, time.time() - t0, out


def test_gn_quick_end_to_end(gn_quick_run):
    r, elapsed, out = gn_quick_run
    assert r.returncode == 0, r.stderr
    assert elapsed < 30, f"--quick took {elapsed:.1f}s"
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz", "codes.npz", "gnocchi.pt"):
        assert (out / f).exists(), f
    assert len(list((out / "figures").glob("*.png"))) >= 5
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"gnocchi_heldout_r2", "pca_heldout_r2", "lfads_heldout_r2", "gnocchi_psth_r2", "gnocchi_cos_wx_wy",
            "gnocchi_snr_train", "pca_snr_train", "lfads_snr_train"} <= set(metrics)
    with np.load(out / "codes.npz") as c, np.load(out / "samples.npz") as s:
        M = len(c["codes"])
        assert c["baseline_codes"].shape == c["lfads_codes"].shape == c["codes"].shape and c["targets"].shape == (M, 2)
        assert c["heldout"].dtype == bool and c["heldout"].shape == (M,)
        assert s["real"].ndim == 3 and s["generated"].shape[1:] == s["real"].shape[1:]
    sd = torch.load(out / "gnocchi.pt", weights_only=True)
    assert any(k.startswith("encoder.") for k in sd)


def test_gn_same_seed_same_metrics(gn_quick_run, tmp_path):
    _, _, out = gn_quick_run
    gn.main([*GN_TINY, "--out", str(tmp_path)])                         # in-process rerun, same seed
    assert (tmp_path / "metrics.json").read_text() == (out / "metrics.json").read_text()


# =====================================================================================================================
# Spike-GAN: gradient penalty, nets, data, DG, importance, --quick, bad input
# =====================================================================================================================

SG_TINY = ["--n-train", "256", "--n-test", "128", "--n-gen", "256", "--iters", "4", "--eval-every", "2",
        "--d-features", "4", "--g-features", "4", "--window", "16", "--neurons", "8"]


class Linear(torch.nn.Module):
    """A linear critic D(x) = <w, x> that records its inputs."""

    def __init__(self, w):
        super().__init__()
        self.w, self.seen = w, []

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
    x_hat = D.seen[-1]
    assert torch.allclose(x_hat, x + alpha * (xf - x))     # one alpha per sample
    sg.gradient_penalty(D, x, xf)                           # random alpha: still between x and x_fake
    t = (D.seen[-1] - x) / (xf - x)                        # (B, N, T), constant within a sample
    assert torch.allclose(t, t[:, :1, :1].expand_as(t), atol=1e-4) and (t >= 0).all() and (t <= 1).all()


# -----------------------------------------------------------------------------
# Model and training
# -----------------------------------------------------------------------------
def test_sg_fused_critic_pass_equals_separate_passes():
    torch.manual_seed(0)
    D = sg.init_weights(sg.Critic(N=8, T=16, F_=4))
    x, x_fake = (torch.rand(6, 8, 16) < 0.2).float(), torch.rand(6, 8, 16)
    torch.manual_seed(1)                                               # same interpolation weights alpha in both
    fused = sg.critic_loss(D, x, x_fake)
    torch.manual_seed(1)
    separate = D(x_fake).mean() - D(x).mean() + 10.0 * sg.gradient_penalty(D, x, x_fake)
    assert torch.allclose(fused, separate, atol=1e-6)


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
    torch.manual_seed(0)
    cfg = sg.Config(iters=1, d_features=4, g_features=4, batch=16)
    x = np.random.default_rng(0).random((64, 8, 16)) < 0.2
    torch.manual_seed(0)
    G0 = sg.init_weights(sg.Generator(8, 16, 4))
    D0 = sg.init_weights(sg.Critic(8, 16, 4))
    torch.manual_seed(0)
    G, D, _ = sg.train(cfg, x, torch.device("cpu"))
    for a, b in ((G0, G), (D0, D)):                        # same init (same seed), then one iteration of updates
        assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# -----------------------------------------------------------------------------
# Data generators
# -----------------------------------------------------------------------------
def test_sg_uniform_data_rates_correlations_and_refractory_dip():
    cfg = sg.Config()
    rng = np.random.default_rng(0)
    prm = sg.make_params(cfg, rng)
    x = sg.make_uniform(cfg, 2048, prm, rng)
    st = sg.spike_stats(x)
    assert x.shape == (2048, 16, 32) and 0.08 < x.mean() < 0.15     # spec Sec. 1.2: ~0.119 at T 32
    p = x.mean()
    ratio = st["acg"][11:14] / p                                      # lags 1, 2, 3
    assert ratio[0] < 0.2 and ratio[0] < ratio[1] < ratio[2] < 1.0   # spec: .12 .37 .64
    r = np.corrcoef(x.transpose(1, 0, 2).reshape(16, -1))
    pairs = [np.where(prm["perm"] == 2 * g)[0][0] for g in range(8)], [np.where(prm["perm"] == 2 * g + 1)[0][0]
                                                                        for g in range(8)]
    r_pair = r[pairs[0], pairs[1]]
    assert r_pair.min() > 0.03 and np.abs(r[np.triu_indices(16, 1)]).sum() - r_pair.sum() < 0.02 * 112


def test_sg_refractory_rules():
    rng = np.random.default_rng(0)
    x = rng.random((4000, 30)) < 0.3
    h = sg.refractory_hard(x.copy(), 0.3, 3, rng)
    t = [np.flatnonzero(row) for row in h]
    assert all((np.diff(s) > 3).all() for s in t) and h.sum() > 0
    s = sg.refractory_soft(x.copy(), np.full(4000, 0.3), 2.0, rng)
    assert (s <= x).all()                                             # only deletes spikes
    assert (s[:, :-1] & s[:, 1:]).mean() < 0.2 * s.mean() ** 2       # strong lag-1 suppression


def test_sg_packet_test_set_onsets_in_window():
    cfg = sg.Config(demo="packets", rate=1e-9, group=8, neurons=16, window=32)
    rng = np.random.default_rng(0)
    prm = sg.make_params(cfg, rng)
    x = sg.make_packets(cfg, 200, prm, rng, test=True)[:, np.argsort(prm["perm"])]   # undo the permutation
    assert x[:, 8:].sum() == 0                                         # only group 0 carries packets
    on = x[:, 0]                                                       # neuron 0 fires at the onsets
    assert on[:, :8].sum() == 0 and on[:, 17:].sum() == 0 and on.sum() > 50
    assert (x[:, 3, 3:] == on[:, :-3]).all()                           # neuron k fires at t0 + k


# -----------------------------------------------------------------------------
# Baseline, evaluation, importance
# -----------------------------------------------------------------------------
def test_sg_phi2_matches_closed_form():
    rho = torch.tensor([-0.9, -0.3, 0.0, 0.5, 0.95], dtype=torch.float64)
    z = torch.zeros_like(rho)
    assert torch.allclose(sg.Phi2(z, z, rho), 0.25 + torch.arcsin(rho) / (2 * math.pi), atol=1e-6)


def test_sg_dg_fit_reproduces_rates_and_covariances():
    rng = np.random.default_rng(0)
    N, T, S = 3, 4, 20000                                              # a true DG with lag-0 and lag-1 structure
    u = rng.standard_normal((S, N, T + 1))
    u = u[..., 1:] + 0.6 * u[..., :-1] + 0.5 * u[:, :1, 1:]            # temporal + shared input
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
    x[0, 0, [0, 2, 4]] = True                                          # period-2 train: lag-1 never, lag-2 often
    st = sg.spike_stats(x, 3)
    assert np.allclose(st["acg"], [0, 2 / 3, 0, 0, 0, 2 / 3, 0]) and st["lag1_ratio"] == 0
    assert np.allclose(st["k_probs"], [5 / 8, 3 / 8, 0]) and np.allclose(st["mean"], [3, 0])


# -----------------------------------------------------------------------------
# CLI: --quick end to end, own data, determinism
# -----------------------------------------------------------------------------
def test_sg_quick_end_to_end(tmp_path):
    t = time.time()
    metrics = sg.main(["--quick", "--out", str(tmp_path)])
    assert time.time() - t < 30
    for f in ("config.json", "metrics.json", "timing.json", "samples.npz", "generator.pt", "critic.pt",
              "figures/rasters.png", "figures/statistics.png", "figures/training.png"):
        assert (tmp_path / f).exists(), f
    with np.load(tmp_path / "samples.npz") as z:
        assert z["real"].shape == (512, 16, 32) and z["generated"].shape == (1024, 16, 32)
        assert set(np.unique(z["generated"])) <= {0, 1}
    assert metrics["DG"]["mean_r"] > 0.9 and len(metrics["history"]) == 2
    torch.load(tmp_path / "generator.pt", weights_only=True)


@pytest.mark.parametrize("make, msg", [
    (lambda: np.full((300, 4, 8), 2), "binary"),
    (lambda: np.where(np.eye(8)[None].repeat(300, 0) > 0, np.nan, 0.0), "NaN"),
    (lambda: np.zeros((10, 4, 8, 2)), "array"),
    (lambda: np.zeros((20, 4, 8)), "too few"),
    (lambda: np.zeros((300, 4, 6)), "multiple"),
])
def test_sg_bad_data_raises_value_error_before_output(tmp_path, make, msg):
    np.save(tmp_path / "x.npy", make())
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=msg):
        sg.main(["--data", str(tmp_path / "x.npy"), "--out", str(out), "--quick"])
    assert not out.exists()
    np.savez(tmp_path / "y.npz", counts=np.zeros((300, 4, 8)))
    with pytest.raises(ValueError, match="spikes"):
        sg.main(["--data", str(tmp_path / "y.npz"), "--out", str(out), "--quick"])
    with pytest.raises(ValueError, match=".npy or .npz"):
        sg.main(["--data", str(tmp_path / "x.txt"), "--out", str(out), "--quick"])


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


# =====================================================================================================================
# Tutorial: every code cell of tutorial.ipynb runs, in order, in a fresh interpreter (no Jupyter needed)
# =====================================================================================================================
def test_tutorial_notebook_executes(tmp_path):
    nb = json.loads(open(os.path.join(ROOT, "tutorial.ipynb")).read())
    assert nb["nbformat"] == 4
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 10
    script = tmp_path / "tutorial_cells.py"
    script.write_text("\n\n".join(f"# --- cell {i}\n{src}" for i, src in enumerate(cells)))
    r = run_cli([str(script)], cwd=tmp_path, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "max |conv - recurrence|" in r.stdout and "Spike-GAN" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tutorial_cells.py"], "the notebook wrote outside OUT"
