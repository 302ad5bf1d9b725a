"""Temporary part of test_minimal.py (ldns); merged back into test_minimal.py by the lead."""
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
