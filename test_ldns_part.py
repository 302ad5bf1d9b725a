"""Tests for ldns_minimal.py (part file; the lead merges it into test_minimal.py). Identity and oracle tests of the S4
layer, DDPM algebra and losses, plus one --quick end-to-end run, determinism and bad-input checks. ~40 s on CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import ldns_minimal as m  # noqa: E402

TINY = ["--quick", "--threads", "1", "--seed", "3"]


# -----------------------------------------------------------------------------
# S4: FFT convolution == explicit convolution == recurrence; kernels extend exactly
# -----------------------------------------------------------------------------
def _s4(bidirectional, H=3, d_state=8, L=20):
    torch.manual_seed(0)
    s4 = m.S4D(H, d_state, bidirectional)
    with torch.no_grad():
        s4.log_dt.fill_(np.log(0.05))                          # a visible impulse response within L steps
    return s4, torch.randn(2, H, L)


def test_s4_fft_equals_causal_conv_and_recurrence():
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


def test_s4_bidirectional_equals_explicit_two_sided_conv():
    s4, u = _s4(bidirectional=True)
    L = u.shape[-1]
    with torch.no_grad():
        Kf, Kb = s4.kernel(L)
        y = torch.stack([sum(Kf[:, s] * u[..., t - s] for s in range(t + 1))
                         + sum((Kb[:, mm - 1] * u[..., t + mm] for mm in range(1, L - t)), torch.zeros(2, 3))
                         for t in range(L)], -1) + s4.D[:, None] * u
        assert torch.allclose(s4(u), y, atol=1e-4)


def test_s4_kernel_of_length_2L_starts_with_kernel_of_length_L():
    s4, _ = _s4(bidirectional=True, H=4, d_state=16)
    with torch.no_grad():
        assert torch.allclose(s4.kernel(64)[..., :32], s4.kernel(32), atol=1e-5)


def test_hippo_legs_init():
    w, B = m.hippo_legs(64)
    assert w.shape == (32,) and (w > 0).all() and np.abs(B.imag).max() <= 2
    s4 = m.S4D(5, 64)
    assert torch.allclose(-s4.log_A_real.exp(), torch.full((5, 32), -0.5))
    dt = s4.log_dt.exp()
    assert (dt >= 1e-3).all() and (dt <= 1e-1).all()


# -----------------------------------------------------------------------------
# DDPM algebra
# -----------------------------------------------------------------------------
def test_q_sample_closed_form():
    ddpm = m.DDPM(1000)
    x0, eps, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.tensor([0, 10, 500, 999])
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ab = torch.tensor([float(torch.prod(1 - beta[:k + 1])) for k in t])[:, None, None].float()
    assert torch.allclose(ddpm.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-5)


def test_eps_form_posterior_mean_equals_x0_form_with_true_noise():
    ddpm = m.DDPM(1000)
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


def test_respaced_schedule():
    for n in (1000, 200):
        ddpm = m.DDPM(n)
        ts, ab = ddpm.respaced(50)
        assert len(ts) == 50 and ts[0] == 0 and ts[-1] == n - 1
        assert ab[-1] < 1e-3 and (ab[1:] < ab[:-1]).all()      # ends near alpha_bar = 0, decreasing
        ts, ab = ddpm.respaced(n)
        assert torch.equal(ts, torch.arange(n)) and torch.equal(ab, ddpm.alpha_bar)


def test_sampler_with_oracle_eps_recovers_x0():
    """Deterministic DDIM driven by the exact noise of a single known x0 lands on x0."""
    ddpm, x0 = m.DDPM(1000), torch.randn(1, 2, 8)

    def oracle(x, t):
        ab = ddpm.alpha_bar[t][:, None, None]
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    assert torch.allclose(ddpm.sample(oracle, (1, 2, 8), 20, eta=0.0), x0, atol=1e-3)


# -----------------------------------------------------------------------------
# Losses and models
# -----------------------------------------------------------------------------
def test_masked_poisson_nll_counts_only_masked_entries():
    torch.manual_seed(0)
    x = torch.poisson(torch.rand(2, 5, 9) * 2)
    M = (torch.rand_like(x) > 0.3).float()                    # 1 = kept, 0 = dropped
    rates = torch.rand_like(x) + 0.1
    loss = m.masked_poisson_nll(rates, x, M)
    rates2 = torch.where(M.bool(), rates * 7.0, rates)         # change only kept entries
    assert torch.allclose(loss, m.masked_poisson_nll(rates2, x, M))
    full = torch.nn.functional.poisson_nll_loss(rates, x, log_input=False, full=True, reduction="none")
    assert torch.allclose(loss, (full * (1 - M)).sum() / x.numel())


def test_ae_and_denoiser_run_at_T_and_4T():
    torch.manual_seed(0)
    ae, dn = m.AutoEncoder(12, 16, 4, 1, 16), m.Denoiser(4, 16, 1, 16)
    for T in (32, 128):
        rates, z = ae(torch.poisson(torch.rand(2, 12, T)))
        assert rates.shape == (2, 12, T) and z.shape == (2, 4, T) and (rates >= 0).all()
        eps = dn(torch.randn(2, 4, T), torch.tensor([0, 999]))
        assert eps.shape == (2, 4, T) and torch.isfinite(eps).all()


def test_lorenz_data_recipe():
    d = m.make_lorenz_data(20, 64, 16, np.random.default_rng(0))
    assert d["spikes"].shape == (20, 16, 64) and d["latents"].shape == (20, 3, 64)
    assert np.allclose(d["latents"].mean(-1), 0, atol=1e-5) and np.allclose(d["latents"].std(-1), 1, atol=1e-4)
    assert 0.05 < d["spikes"].mean() < 0.4 and d["spikes"].dtype.kind == "i"


def test_isi_stats_small_example():
    s = np.zeros((1, 1, 10), dtype=np.int64)
    s[0, 0, [1, 4]] = 1
    s[0, 0, 7] = 2                                             # spikes at 1.5, 4.5, 7+1/3, 7+2/3
    mean, std = m.isi_stats(s)
    isi = np.diff([1.5, 4.5, 7 + 1 / 3, 7 + 2 / 3])
    assert np.isclose(mean[0], isi.mean()) and np.isclose(std[0], isi.std())


# -----------------------------------------------------------------------------
# End to end: output contract, determinism, bad input
# -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "run"
    env = dict(os.environ, PYTHONPATH=ROOT, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "ldns_minimal.py"), *TINY, "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_quick_writes_the_output_contract(quick_run):
    out = quick_run
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


def test_same_seed_gives_identical_metrics(quick_run, tmp_path):
    m.main(TINY + ["--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "metrics.json").read_text() == (quick_run / "metrics.json").read_text()


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
def test_bad_data_raises_before_training(tmp_path, name, arr, fname, match):
    key = "x" if name == "npz key" else "spikes"
    path = str(tmp_path / fname) if arr is None else _save(tmp_path / fname, arr, key)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        m.main(["--data", path, "--out", str(out), "--quick"])
    assert not out.exists(), "output written before validation"


def test_own_data_runs_without_latent_metrics(tmp_path):
    path = _save(tmp_path / "s.npz", GOOD)
    res = m.main(["--data", path, "--out", str(tmp_path / "o"), "--quick", "--ae-steps", "3", "--dn-steps", "3"])
    assert "ae/latent_r2" not in res and np.isfinite(res["gen_vs_real/r_rate"])


def test_cli_rejects_indivisible_latent_groups(capsys):
    with pytest.raises(SystemExit) as e:
        m.main(["--ae-channels", "30", "--d-latent", "8"])
    assert e.value.code == 2 and "--d-latent" in capsys.readouterr().err
