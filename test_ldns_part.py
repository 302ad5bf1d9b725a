"""Temporary part of test_minimal.py (ldns); merged back into test_minimal.py by the lead.
LDNS: oracles and identities of the core (S4 discretisation and convolution, HiPPO, blocks, AE loss, DDPM, sampler,
EMA, lr schedule and training loop, simulators, evaluation statistics), of Part II (spike-history GLM, variable
length, reach conditioning), the LDNS-specific flag and data checks, and one tiny end-to-end run per demo."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import ldns_minimal as ldns  # noqa: E402

TINY = ["--quick", "--threads", "1", "--ae-steps", "5", "--dn-steps", "5", "--sample-steps", "3"]
GOOD = np.random.default_rng(0).poisson(0.3, (12, 8, 32))
IN = lambda a, eps=1e-5: (a - a.mean(-1, True)) / (a.var(-1, unbiased=False, keepdim=True) + eps).sqrt()  # noqa: E731

@torch.no_grad()
def _perturbed(model, scale=0.1):                              # non-zero adaLN etc., so every path acts
    return [p.add_(scale * torch.randn(p.shape)) for p in model.parameters()] and model

def _rows(a):                                                  # (K,c,T) -> (K*T, c), written out in the test
    return np.concatenate([a[k].T for k in range(len(a))])

def test_ldns_s4_bilinear_discretisation_of_scalar_systems_by_hand():
    s4 = ldns.S4D(1, 2)
    for dt, a, b, A_bar, B_bar in [(0.5, -2 + 0j, 3 - 1j, 1 / 3, (3 - 1j) / 3),   # (1 - 1/2)/(1 + 1/2), 0.5 b/1.5
                                   (1.0, 2j, 1 + 0j, 1j, (1 + 1j) / 2),           # (1 + i)/(1 - i) = i, b/(1 - i)
                                   (1e-2, -0.5 + 3j, 1 + 0j, np.exp((-0.5 + 3j) * 1e-2), None)]:  # exp(a dt) + O(dt^3)
        with torch.no_grad():
            s4.log_dt.fill_(math.log(dt)), s4.log_A_real.fill_(math.log(-a.real) if a.real else -40.0)
            s4.A_imag.fill_(a.imag), s4.B.copy_(torch.tensor([[[b.real, b.imag]]]))
        got = [complex(v.item()) for v in s4.discretise()]
        assert abs(got[0] - A_bar) < 1e-6 + abs(a * dt) ** 3 / 12 and (B_bar is None or abs(got[1] - B_bar) < 1e-6)

def test_ldns_s4_fft_equals_brute_force_convolution_recurrence_and_init():
    """Both sides built in the test from the parameters (own bilinear discretisation, numpy, float64)."""
    for bi in (False, True):
        torch.manual_seed(0)
        s4, u, L = ldns.S4D(3, 8, bi), torch.randn(2, 3, 20), 20
        with torch.no_grad():
            s4.log_dt.fill_(np.log(0.05))                      # a visible impulse response within 20 steps
        p = {k: v.detach().double().numpy() for k, v in s4.named_parameters()}
        dt, A = np.exp(p["log_dt"])[:, None], -np.exp(p["log_A_real"]) + 1j * p["A_imag"]
        A_bar, B_bar = (1 + dt * A / 2) / (1 - dt * A / 2), dt * (p["B"] @ [1, 1j]) / (1 - dt * A / 2)
        C, D, un, zero = p["C"] @ [1, 1j], p["D"], u.double().numpy(), np.zeros((2, 3))
        K = np.stack([2 * (C * B_bar * A_bar ** l).sum(-1).real for l in range(L)], -1)  # (ch,H,L)
        fwd = np.stack([sum(K[0][:, s] * un[..., t - s] for s in range(t + 1)) + D * un[..., t] for t in range(L)], -1)
        bwd = np.stack([sum((K[-1][:, m - 1] * un[..., t + m] for m in range(1, L - t)), zero) for t in range(L)], -1)
        assert np.allclose(s4(u).detach(), fwd + bi * bwd, atol=1e-4) and np.allclose(s4.kernel(L).detach(), K, 0, 1e-5)
        assert torch.allclose(s4.kernel(2 * L)[..., :L], s4.kernel(L), atol=1e-5)
    x, ys = np.zeros((2, *A_bar.shape), complex), []
    for t in range(L):                                         # x_t = A_bar x_{t-1} + B_bar u_t, y = 2 Re(C x) + D u
        x = A_bar * x + B_bar * un[..., t, None]
        ys.append(2 * (C[0] * x).sum(-1).real + D * un[..., t])
    log_dt = ldns.S4D(20000, 2).log_dt.detach().numpy()        # init: dt ~ LogUniform[1e-3, 1e-1]
    assert np.allclose(np.quantile(log_dt, [0, 0.5, 1]), [math.log(1e-3), math.log(1e-2), math.log(0.1)], atol=0.05)
    assert np.allclose(np.stack(ys, -1), fwd) and ldns.S4D(3, 8).C.shape[0] == 2  # bidirectional by default

def test_ldns_hippo_legs_eigenvalues_against_an_independent_solver():
    N, s4 = 64, ldns.S4D(5, 64)
    w, B = ldns.hippo_legs(N)
    # the normal part of HiPPO-LegS entry by entry: -1/2 on the diagonal, -+sqrt((2n+1)(2k+1))/2 below / above
    S = np.array([[-0.5 if n == k else np.sign(k - n) * np.sqrt((2 * n + 1) * (2 * k + 1)) / 2 for k in range(N)]
                  for n in range(N)])
    lam = np.linalg.eigvals(S)
    assert np.allclose(lam.real, -0.5, atol=1e-6) and np.allclose(np.sort(w), np.sort(lam.imag[lam.imag > 0]))
    V = np.linalg.eig(S)[1][:, [np.argmin(abs(lam - (-0.5 + 1j * wk))) for wk in w]]  # B = V^H sqrt(2k+1), |.| only
    ok = abs(B.imag) < 2                                       # the imaginary part is clipped to [-2, 2]
    assert np.allclose(abs(B[ok]), abs(V.conj().T @ np.sqrt(2 * np.arange(N) + 1))[ok]) and B.imag.min() == -2
    assert ldns.S4D(3).A_imag.shape == (3, 32) and w.shape == B.shape == (N // 2,) and np.abs(B.imag).max() == 2
    assert torch.equal(s4.A_imag[3], torch.tensor(w, dtype=torch.float32)) and torch.allclose(-s4.log_A_real.exp(),
                                                                                             torch.tensor(-0.5))

def test_ldns_blocks_autoencoder_and_denoiser_wiring():
    torch.manual_seed(0)
    h, e, blk, dblk = torch.randn(2, 8, 10), torch.randn(2, 2), _perturbed(ldns.AEBlock(8, 4)), _perturbed(
        ldns.DenoiserBlock(8, 4))
    assert torch.allclose(ldns.instance_norm(h * 1e-3), IN(h * 1e-3), atol=1e-5) and blk.s4.bidirectional
    sh1, sc1, _, sh2, sc2, _ = blk.ada[0, :, 0].reshape(6, 8, 1)
    h1 = h + blk.post_tm_scale(F.gelu(blk.s4(IN(h) * (1 + sc1) + sh1)))
    assert torch.allclose(blk(h), h1 + blk.mlp(IN(h1) * (1 + sc2) + sh2), atol=1e-5)
    for conv in (blk.mlp[0], dblk.mlp[0]):                     # Conv1x1 = the 1x1 convolution, with or without bias
        assert torch.allclose(conv(h), F.conv1d(h, conv.weight, conv.bias), atol=1e-5)
    sh1, sc1, g1, sh2, sc2, g2 = (F.gelu(e) @ dblk.ada.weight.T + dblk.ada.bias).reshape(2, 6, 8, 1).unbind(1)
    h1 = h + g1 * F.gelu(dblk.s4(IN(h) * (1 + sc1) + sh1))
    assert torch.allclose(dblk(h, e), h1 + g2 * dblk.mlp(IN(h1) * (1 + sc2) + sh2), atol=1e-5)
    ae, x = _perturbed(ldns.AutoEncoder(6, 8, 2, 2, 4)), torch.poisson(torch.rand(2, 6, 10) * 2)
    z = ae.bottleneck(ae.blocks[1](ae.blocks[0](ae.conv_in(x))))
    rates, z2 = ae(x)
    assert torch.allclose(z, z2, atol=1e-5) and torch.equal(rates, F.softplus(ae.decoder[2](F.gelu(ae.decoder[0](z2)))))
    dn, t, f = _perturbed(ldns.Denoiser(2, 8, 1, 4)), torch.tensor([0, 7]), 10000 ** (-torch.arange(128) / 128.0)
    emb = torch.cat([torch.cos(t[:, None] * f), torch.sin(t[:, None] * f)], -1)  # sinusoidal embedding of the raw t
    sh, sc = (dn.ada_out(F.gelu(dn.t_mlp(emb)))[..., None]).chunk(2, 1)
    assert torch.allclose(ldns.timestep_embedding(t), emb, atol=1e-5) and dn.conv_in.groups == 2
    assert torch.allclose(dn(z, t), dn.conv_out(dn.blocks[0](dn.conv_in(z), dn.t_mlp(emb)) * (1 + sc) + sh), atol=1e-5)
    assert ldns.Denoiser(4, 4, 1, 4).conv_in.groups == ldns.Denoiser(3, 8, 1, 4).conv_in.groups == 1  # grouped if d | C

class _StubAE(torch.nn.Module):                                # records its input; rates 0.7 (0 in bin 0), z = (c+1) t
    def forward(self, x):
        self.seen, T = x, x.shape[2]
        return torch.full(x.shape, 0.7) * (torch.arange(T) > 0), torch.arange(T) * torch.tensor([[1.0], [2.0]])

@pytest.mark.parametrize("masked", [False, True])
def test_ldns_ae_loss_with_a_stub_autoencoder_by_hand(masked):
    cfg, ae, x = ldns.Config(mask_p=0.25, beta_lat=0.1, beta_td=0.2), _StubAE(), torch.poisson(torch.rand(3, 4, 8) * 3)
    m = ldns.valid_mask(torch.tensor([8, 2, 5]), 8)
    torch.manual_seed(5)
    loss = ldns.masked_ae_loss(ae, x, cfg, m) if masked else ldns.ae_loss(ae, x, cfg)
    torch.manual_seed(5)
    M, total = (torch.rand(x.shape) >= 0.25).float(), 0.0
    assert torch.equal(ae.seen, x * M / 0.75) and 0.6 < M.mean() < 0.9
    for b, n, t in np.ndindex(3, 4, 8):                        # Poisson NLL r - k log(r + 1e-8) + Stirling for k > 1
        k, w, r = x[b, n, t].item(), (1 - M[b, n, t].item()) * (m[b, 0, t].item() if masked else 1), 0.7 * (t > 0)
        stirling = k * math.log(k) - k + math.log(2 * math.pi * k) / 2 if k > 1 else 0
        total += w * (r - k * math.log(r + 1e-8) + stirling)
    z2 = sum(((c + 1) * t) ** 2 for c in range(2) for t in range(8))        # sum z^2 and the TD penalty (K = 5)
    td = sum((c + 1) ** 2 * i ** 2 * (8 - i) / (1 + i) for c in range(2) for i in range(1, 6))
    assert math.isclose(loss.item(), total / 96 + (0.1 * z2 + 0.2 * td) / 96, rel_tol=1e-5)

def test_ldns_ddpm_closed_forms_and_algorithm_1():
    ddpm, x0, eps, seen = ldns.DDPM(1000), torch.randn(6, 2, 7), torch.randn(6, 2, 7), {}
    beta = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    for t, t_prev in [(500, 499), (1, 0), (999, 949), (300, 299)]:   # plain and respaced steps
        ab, ab_prev = [float(torch.prod(1 - beta[:k + 1])) for k in (t, t_prev)]
        xt = ddpm.q_sample(x0, torch.full((6,), t), eps)
        mean, var = ddpm.p_step(xt, eps, ddpm.alpha_bar[t], ddpm.alpha_bar[t_prev], 1.0)
        var_eta = ddpm.p_step(xt, eps, ddpm.alpha_bar[t], ddpm.alpha_bar[t_prev], 0.5)[1]
        b = 1 - ab / ab_prev                                   # Eq. 7 in x0-form, beta_t of the (respaced) step
        post = math.sqrt(ab_prev) * b / (1 - ab) * x0 + math.sqrt(1 - b) * (1 - ab_prev) / (1 - ab) * xt
        assert torch.allclose(xt, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps, atol=1e-5)
        assert torch.allclose(mean, post, atol=1e-4) and torch.allclose(var_eta * 4, var) and math.isclose(
            var.item(), (1 - ab_prev) / (1 - ab) * b, rel_tol=1e-4 if t > 1 else 0.02)  # float32 abar near 1
    for n in (1000, 200):
        ts, ab = ldns.DDPM(n).respaced(50)
        assert ts.tolist() == [round(i * (n - 1) / 49) for i in range(50)] and torch.allclose(ab, torch.cumprod(
            1 - torch.linspace(1e-4 * 1000 / n, 0.02 * 1000 / n, n, dtype=torch.float64), 0)[ts].float())
    torch.manual_seed(2)
    loss = ddpm.loss(lambda xt, t, c: seen.update(xt=xt, t=t, c=c) or xt * 0.5, x0, c="cond")
    torch.manual_seed(2)
    t, eps = torch.randint(0, 1000, (6,)), torch.randn(x0.shape)
    ab = ddpm.alpha_bar[t][:, None, None]
    assert torch.equal(seen["t"], t) and seen["c"] == "cond" and torch.allclose(seen["xt"], ab.sqrt() * x0
                                                                                  + (1 - ab).sqrt() * eps)
    assert math.isclose(loss.item(), ((seen["xt"] * 0.5 - eps) ** 2).mean().item(), rel_tol=1e-6)

@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ldns_sampler_with_the_exact_eps_reproduces_gaussian_data(eta):
    """Data N(0, s^2): the exact eps-predictor E[eps | x_t] = sqrt(1-abar) x_t / (abar s^2 + 1 - abar); 1000 steps of
    the ancestral sampler (eta 1) or DDIM (eta 0) give samples of variance s^2. One known x0: every DDIM step stays
    on the path sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_T, and both samplers end on x0."""
    ddpm, seen, x0 = ldns.DDPM(1000), [], torch.tensor(0.7)
    ab = lambda t: ddpm.alpha_bar[t][:, None, None]  # noqa: E731
    for s in (0.5, 2.0):
        torch.manual_seed(1)
        x = ddpm.sample(lambda x, t: (1 - ab(t)).sqrt() * x / (ab(t) * s ** 2 + 1 - ab(t)), (20000, 1, 1), 1000, eta)
        assert abs(x.var().item() / s ** 2 - 1) < 0.04 and abs(x.mean().item()) < 0.03 * s, (s, x.var())
    out = ddpm.sample(lambda x, t: seen.append((x, t)) or (x - ab(t).sqrt() * x0) / (1 - ab(t)).sqrt(), (20000, 1, 1),
                      5, eta)
    eps = (seen[0][0] - ab(seen[0][1]).sqrt() * x0) / (1 - ab(seen[0][1])).sqrt()
    assert torch.allclose(out, x0.expand(out.shape), atol=1e-3) and [t[0].item() for _, t in seen] == [999, 749, 500,
                                                                                                     250, 0]
    for x, t in seen:                                          # every step: the marginal q(x_t | x0)
        assert abs(x.mean() - ab(t)[0].sqrt() * x0) < 0.03 and abs(x.var() / (1 - ab(t)[0]) - 1) < 0.05
    assert eta or all(torch.allclose(x, ab(t).sqrt() * x0 + (1 - ab(t)).sqrt() * eps, atol=1e-4) for x, t in seen)

def test_ldns_ema_lr_schedule_and_training_loop(monkeypatch):
    lin, e, log, seen = torch.nn.Linear(1, 1), 1.0, [], []
    lin.register_buffer("b", torch.zeros(1))
    ema = ldns.EMA(lin)
    for k in range(1, 8):                                      # decay_k = min(0.9999, 1 - k^(-2/3)); decay_1 = 0
        with torch.no_grad():
            lin.weight.fill_(float(k ** 2)), lin.b.fill_(float(k))
        ema.update(lin)
        e = e if k == 1 else min(0.9999, 1 - k ** (-2 / 3)) * e + (1 - min(0.9999, 1 - k ** (-2 / 3))) * k ** 2
    assert math.isclose(ema.model.weight.item(), e, rel_tol=1e-6) and ema.model.b.item() == 7.0
    assert [ldns.warmup_cosine(k, 100) for k in (0, 1, 4)] == [0.0, 0.2, 0.8] and ldns.warmup_cosine(1, 10) == 1.0
    for k in (5, 50, 99):                                      # cosine with the horizon at 130 steps
        assert math.isclose(ldns.warmup_cosine(k, 100), 0.5 * (1 + math.cos(math.pi * (k - 5) / 125)))
    monkeypatch.setattr(ldns, "Progress", lambda name, total: lambda step, **v: log.append((v["lr"], v["loss"])))
    w, w_ref, ema = torch.nn.Parameter(torch.tensor([3.0])), torch.nn.Parameter(torch.tensor([3.0])), ldns.EMA(lin)
    torch.manual_seed(0)
    ldns.train_loop(torch.nn.ParameterList([w]), lambda idx: seen.append(idx.tolist()) or (idx.float().mean() + 1) * w
                    ** 2, 6, steps=6, batch=3, lr=0.1, clip=1.0, name="t", ema=ema)
    assert [len(b) for b in seen] == [3] * 6 and all(len(set(seen[i] + seen[i + 1])) == 6 for i in (0, 2, 4))
    assert [lr for lr, _ in log] == pytest.approx([0.1 * ldns.warmup_cosine(k, 6) for k in range(6)]) and ema.k == 6
    opt = torch.optim.AdamW([w_ref], lr=0.1, weight_decay=0.01)   # the same steps, written out
    for k, idx in enumerate(seen):
        opt.param_groups[0]["lr"] = 0.1 * ldns.warmup_cosine(k, 6)
        opt.zero_grad()
        ((torch.tensor(idx).float().mean() + 1) * w_ref ** 2).backward()
        torch.nn.utils.clip_grad_norm_([w_ref], 1.0), opt.step()
    assert math.isclose(w.item(), w_ref.item(), rel_tol=1e-6) and math.isclose(log[0][1], (np.mean(seen[0]) + 1) * 9,
                                                                               rel_tol=1e-6)
    with pytest.raises(FloatingPointError, match="at step 1"):
        ldns.train_loop(lin, lambda idx: torch.tensor(float("nan"), requires_grad=True), 6, steps=2, batch=3, lr=0.1,
                        clip=1.0, name="t")

def test_ldns_lorenz_data_recipe_vector_field_readout_and_refractory_dip():
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
    err = [np.abs(ldns.lorenz_rk4(x[:1], 2, 0.1, n_sub=k) - ldns.lorenz_rk4(x[:1], 2, 0.1, n_sub=512)).max() for k in
           (8, 16)]
    assert 12 < err[0] / err[1] < 20                           # fourth order: halving the step divides the error by 16
    s = ldns.refractory_poisson(np.full((20000, 2, 2), 2.0), np.random.default_rng(0))  # no history: log(1 + lam)
    assert abs(s[:, :, 0].mean() - math.log(3)) < 0.03 and abs(s[:, :, 1][s[:, :, 0] == 0].mean() - math.log(3)) < 0.05
    r = ldns.simulate_lorenz(100, 64, 32, np.random.default_rng(0), ldns.refractory_poisson)
    assert np.array_equal(r["rates"], ldns.simulate_lorenz(100, 64, 32, np.random.default_rng(0))["rates"])
    assert ldns.lag_ratios(r["spikes"], 2)[0] <= 0.5 < ldns.lag_ratios(d["spikes"], 2)[0]

def test_ldns_normalisation_and_sampling_helpers():
    z = torch.randn(6, 3, 16) * 4 + 1
    z[0, 0, 0], z[0, 0, 1] = 100.0, -100.0                     # outliers: clamped at 5 sigma
    (mu, sigma, zn), flat = ldns.normalise_latents(z), z.permute(1, 0, 2).reshape(3, -1)  # (d,K,T) -> (d, K T)
    assert torch.allclose(mu[0, :, 0], flat.mean(1)) and torch.allclose(sigma[0, :, 0], flat.std(1, unbiased=True))
    assert zn[0, 0, 0] == 5 and zn[0, 0, 1] == -5 and torch.allclose(zn[1:], ((z[1:] - mu) / sigma).clamp(-5, 5))

    class StubDDPM:                                            # returns the condition it was given, as latents
        def sample(self, model, shape, K, eta, m):
            assert (K, eta) == (7, 0.5)
            return m.expand(shape) + 0.0
    m, cfg, ae = torch.arange(5.0)[:, None, None].expand(5, 1, 4), ldns.Config(d_latent=2, sample_steps=7, eta=0.5), \
        ldns.AutoEncoder(3, 4, 2, 1, 4)
    assert torch.equal(ldns.sample_latents(cfg, StubDDPM(), 0, 1.0, 3.0, 5, 4, chunk=2, m=m), 3 * m.expand(5, 2, 4) + 1)
    with torch.no_grad():
        ae.decoder[2].weight.zero_(), ae.decoder[2].bias.fill_(math.log(math.e ** 2.0 - 1))  # rates = 2 everywhere
    out = ldns.sample_trials(cfg, StubDDPM(), None, ae, 0.0, 1.0, 4000, 4, m=torch.ones(4000, 1, 4))
    assert torch.allclose(out["rates"], torch.full((4000, 3, 4), 2.0)) and abs(out["spikes"].mean() - 2) < 0.05
    assert abs(out["spikes"].var() - 2) < 0.1 and out["z"].shape == (4000, 2, 4)  # Poisson(2)

def test_ldns_isi_lag_ratios_group_acg_by_hand():
    s = np.zeros((2, 2, 10), dtype=np.int64)
    s[0, 0, [1, 4]], s[0, 0, 7], s[1, 1, 3] = 1, 2, 3          # spikes at 1.5, 4.5, 7+1/3, 7+2/3; 3 in one bin
    isi = np.diff([1.5, 4.5, 7 + 1 / 3, 7 + 2 / 3])
    assert np.allclose(ldns.isi_stats(s), [[isi.mean(), 0.25], [isi.std(), 0.0]])
    s = np.zeros((1, 1, 8), dtype=np.int64)
    s[0, 0, [0, 2, 4, 6]] = 1                                  # period 2: never at lag 1, always at lag 2
    assert np.allclose(ldns.lag_ratios(s, 2), [0.0, (3 / 3) / 0.5])
    assert np.allclose(ldns.lag_ratios(np.ones((1, 1, 12))), [1] * 10)  # the default: lags 1..10
    s, groups, acg = np.random.default_rng(0).poisson(0.8, (3, 4, 9)).astype(float), [[0, 2], [1, 3]], np.zeros((2, 3))
    rho = [sum(s[k, n, t] * s[k, n, t + l] for k, n, t in np.ndindex(3, 4, 9 - l)) /
           sum(s[:, n].mean() * s[k, n, t] for k, n, t in np.ndindex(3, 4, 9 - l)) for l in (1, 2, 3)]
    assert np.allclose(ldns.lag_ratios(s, 3), rho)
    for g, l, k, i in np.ndindex(2, 3, 3, 2):                  # per trial and neuron: mean removed, sum x_t x_t+l / T
        xx = s[k, groups[g][i]] - s[k, groups[g][i]].mean()
        acg[g, l] += (xx[:9 - l - 1] * xx[l + 1:]).sum() / 9 / (3 * 2)
    assert np.allclose(ldns.group_acg(s, [np.array(g) for g in groups], 3), acg)
    corr = np.eye(4) + np.array([[0, -.8, .9, 0], [-.8, 0, 0, np.nan], [.9, 0, 0, .5], [0, np.nan, .5, 0]])
    res, rho_sh = ldns.autocorrelogram_metrics(s, s[::-1].copy(), s * 0 + 1, corr, 3), ldns.lag_ratios(s * 0 + 1, 3)
    assert math.isclose(res["acg/data/lag2_ratio"], rho[1]) and math.isclose(res["acg/ldns_sh/lag1_rel_error"], abs(
        rho_sh[0] - rho[0]) / rho[0]) and res["acg/ldns/lag_ratio"] == ldns.lag_ratios(s[::-1].copy(), 3).tolist()
    assert res["acg/data/group_acg"] == ldns.group_acg(s, [[0], [2], [1], [3]], 3).tolist()  # groups by sum_j c_ij^2

def test_ldns_spike_stats_kde_compare_and_latent_r2_by_hand():
    rng = np.random.default_rng(1)
    a, b = rng.poisson(0.6, (5, 4, 7)), rng.poisson(0.9, (6, 4, 7))
    st_a, st_b = ldns.spike_stats(a), ldns.spike_stats(b)
    assert np.array_equal(st_a["psc"], [a[k, :, t].sum() for k in range(5) for t in range(7)])
    assert np.allclose(st_a["corr"], np.corrcoef(a.transpose(1, 0, 2).reshape(4, -1)))
    assert np.allclose(st_a["rate"], [a[:, n].mean() for n in range(4)])
    x, grid = np.array([0, 0, 1, 3, 5]), np.arange(7)
    dens = np.array([sum(math.exp(-0.5 * ((g - xi) / (np.std(x, ddof=1) * 5 ** -0.2)) ** 2) for xi in x) for g in grid])
    assert np.allclose(ldns.kde_on_grid(x, grid), dens / dens.sum())  # Scott's bandwidth std n^(-1/5)
    out, g = ldns.compare(st_a, st_b), np.arange(max(st_a["psc"].max(), st_b["psc"].max()) + 1)
    p, q = ldns.kde_on_grid(st_a["psc"], g), ldns.kde_on_grid(st_b["psc"], g)
    assert math.isclose(out["kl_psc"], sum(pi * math.log(max(pi, 1e-12) / max(qi, 1e-12)) for pi, qi in zip(p, q)))
    il = [(i, j) for i in range(4) for j in range(i)]
    ca, cb = [st_a["corr"][i, j] for i, j in il], [st_b["corr"][i, j] for i, j in il]
    assert math.isclose(out["r_corr"], np.corrcoef(ca, cb)[0, 1])
    assert math.isclose(out["r_psc"], np.corrcoef(p, q)[0, 1])
    assert math.isclose(out["rmse_corr"], math.sqrt(np.mean((np.array(ca) - cb) ** 2)))
    for k in ("rate", "mean_isi", "std_isi"):
        assert math.isclose(out[f"r_{k}"], np.corrcoef(st_a[k], st_b[k])[0, 1]) and math.isclose(
            out[f"rmse_{k}"], math.sqrt(np.mean((st_a[k] - st_b[k]) ** 2)))
    assert np.isfinite(ldns.compare(ldns.spike_stats(a[:, :3]), ldns.spike_stats(b[:, :3]))["r_corr"])  # 3 pairs: a r
    assert math.isnan(ldns.compare(ldns.spike_stats(a[:, :2]), ldns.spike_stats(b[:, :2]))["r_rate"])  # 2: none
    far = ldns.spike_stats(a + 30 * (np.arange(7) == 0))       # counts far beyond the data's: its KDE is floored
    p, q = ldns.kde_on_grid(far["psc"], np.arange(far["psc"].max() + 1)), ldns.kde_on_grid(st_b["psc"], np.arange(
        far["psc"].max() + 1))
    assert math.isclose(ldns.compare(far, st_b)["kl_psc"], sum(pi * math.log(max(pi, 1e-12) / max(qi, 1e-12))
                                                               for pi, qi in zip(p, q)))
    lengths = np.array([7, 3, 5, 7, 2])
    st = ldns.spike_stats(a * (np.arange(7) < lengths[:, None, None]), lengths)  # valid bins only
    valid = np.concatenate([a[k][:, :l] for k, l in enumerate(lengths)], 1)     # (N, sum l)
    assert np.allclose(st["corr"], np.corrcoef(valid)) and np.allclose(st["rate"], valid.mean(1))
    assert len(st["psc"]) == 24
    rows, st_r, _ = ldns.comparison_rows(b, a, b + 1)          # the halves: real[:3] vs real[3:]
    assert rows["real_vs_real/kl_psc"] == ldns.compare(ldns.spike_stats(b[:3]), ldns.spike_stats(b[3:]))["kl_psc"]
    assert rows["gen_vs_real_half/kl_psc"] == ldns.compare(ldns.spike_stats(a[:3]), ldns.spike_stats(b[3:]))["kl_psc"]
    assert rows["ae_vs_real/kl_psc"] == ldns.compare(ldns.spike_stats(b + 1), st_r)["kl_psc"]
    Z, E = rng.standard_normal((200, 3)), rng.standard_normal((200, 2))
    X = Z @ rng.standard_normal((3, 2)) + 0.5 + 0.3 * E        # R^2 of the affine fit, held-out half, by hand
    W = np.linalg.lstsq(np.c_[Z[:100], np.ones(100)], X[:100], rcond=None)[0]
    r2 = 1 - ((X[100:] - np.c_[Z[100:], np.ones(100)] @ W) ** 2).sum() / ((X[100:] - X[100:].mean(0)) ** 2).sum()
    assert math.isclose(ldns.latent_r2(Z[:100], X[:100], Z[100:], X[100:]), r2) and 0.5 < r2 < 0.99

def test_ldns_spike_history_glm_refits_known_weights():
    """Spikes from a GLM with known weights; the fit recovers them (3 neurons x 60,000 bins: standard errors about
    0.02-0.05, so 0.15 is a >3-sigma tolerance)."""
    torch.manual_seed(0)
    true, cfg = ldns.SpikeHistoryGLM(3, 4), ldns.Config()
    with torch.no_grad():
        true.w.copy_(torch.tensor([[-2.0, -1.0, -0.3, 0.0, 1.0, 0.0], [-1.0, 0.0, 0.0, 0.0, 0.8, 0.3],
                                   [-3.0, -1.5, -0.5, -0.2, 1.2, -0.2]]))
    lam = 0.3 * torch.exp(torch.sin(torch.arange(104.0) / 8 + torch.rand(600, 3, 1) * 6))  # (600, 3, 104)
    vars(cfg).update(sh_bins=4, sh_epochs=400, sh_trials=600, sh_lr=0.1, sh_cap=5)
    assert (ldns.fit_spike_history(cfg, true.sample(lam, cap=5), lam).w - true.w).abs().max().item() < 0.15

def test_ldns_spike_history_design_fit_and_sampler_by_hand():
    torch.manual_seed(0)
    glm, H, s, log_lam = ldns.SpikeHistoryGLM(2, 3), 3, torch.poisson(torch.rand(2, 2, 9) * 2), torch.randn(2, 2, 9)
    X = glm.design(s, log_lam)                                 # (N, B(T-H), H+2)
    for n, b, t in np.ndindex(2, 2, 6):                        # row of bin H + t: s_{t-1..t-H}, log lambda_t, 1
        row = [s[b, n, H + t - k].item() for k in range(1, H + 1)] + [log_lam[b, n, H + t].item(), 1.0]
        assert torch.allclose(X[n, b * 6 + t], torch.tensor(row))
    assert torch.allclose(glm(X), F.softplus((X * glm.w[:, None]).sum(-1)))
    cfg, s, lam = ldns.Config(), torch.poisson(torch.rand(5, 3, 12) * 2), torch.rand(5, 3, 12) + 0.1
    vars(cfg).update(sh_bins=2, sh_epochs=3, sh_trials=4, sh_lr=0.1, sh_cap=1)
    torch.manual_seed(1)
    fit = ldns.fit_spike_history(cfg, s, lam)                  # the official recipe, written out: N(0,1) init, capped
    torch.manual_seed(1)                                       # targets of 4 trials, full-batch AdamW(0.1, wd 0.01)
    w, y = torch.nn.Parameter(torch.randn(3, 4)), s[:4, :, 2:].clamp(max=1).permute(1, 0, 2).reshape(3, -1)  # (N, M)
    X, opt = ldns.SpikeHistoryGLM(3, 2).design(s[:4].clamp(max=1), lam[:4].log()), torch.optim.AdamW([w], 0.1,
                                                                                                      weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad(), F.poisson_nll_loss(F.softplus((X * w[:, None]).sum(-1)), y, False).backward(), opt.step()
    assert torch.allclose(fit.w, w, atol=1e-6)
    with torch.no_grad():                                      # neuron 0: bias 40, a spike silences the next bin
        glm.w.copy_(torch.tensor([[-50.0, 0.0, 0.0, 1.0, 40.0], [0.0, 0.0, -50.0, 2.0, 0.0]]))
    out = glm.sample(torch.full((4000, 2, 6), 2.0), cap=3)     # neuron 1: softplus(2 log 2) = log 5, silent at t+3
    capped = sum(min(k, 3) * math.exp(-math.log(5)) * math.log(5) ** k / math.factorial(k) for k in range(40))
    assert (out[:, 0, 0::2] == 3).all() and (out[:, 0, 1::2] == 0).all() and (out[:, 1, 3][out[:, 1, 0] > 0] == 0).all()
    assert abs(out[:, 1, :3].mean() - capped) < 0.05 and glm.sample(torch.full((9, 2, 3), 1e-30)).max() <= 5

def test_ldns_varlen_causal_autoencoder_ignores_later_inputs():
    g, t = torch.Generator().manual_seed(1), 17
    x = torch.poisson(torch.rand((3, 8, 40), generator=g, dtype=torch.float64) * 2)
    x2 = torch.cat([x[..., :t + 1], torch.poisson(torch.rand((3, 8, 22), generator=g, dtype=torch.float64) * 5)], -1)
    for AE in (ldns.CausalAutoEncoder, ldns.AutoEncoder):      # the bidirectional AE does see them
        torch.manual_seed(0)
        ae = _perturbed(AE(8, 16, 4, 2, 8)).double().eval()
        with torch.no_grad():
            (r1, z1), (r2, z2) = ae(x), ae(x2)
        early = max((z1 - z2)[..., :t + 1].abs().max(), (r1 - r2)[..., :t + 1].abs().max()).item()
        assert (early < 1e-10) == (AE is ldns.CausalAutoEncoder) and (z1 - z2)[..., t + 1:].abs().max() > 1e-3
    h = torch.randn(2, 3, 25, dtype=torch.float64)             # causal norm: the statistics of bins <= t
    assert all(torch.allclose(ldns.causal_instance_norm(h)[..., t], IN(h[..., :t + 1])[..., -1]) for t in (0, 7, 24))
    assert list(ae.state_dict()) == list(ldns.CausalAutoEncoder(8, 16, 4, 2, 8).state_dict())

def test_ldns_varlen_data_masks_moments_centre_pad_and_crop():
    T, lengths = 17, torch.tensor([17, 16, 1, 8, 9, 2])
    m, mc = ldns.valid_mask(lengths, T), ldns.valid_mask(lengths, T, centred=True)
    z = torch.randn(6, 3, T, dtype=torch.float64) * m + 100 * (1 - m)  # padding far off
    mu, var = ldns.masked_moments(z, m, (0, 2))
    valid = np.concatenate([z[i, :, :l].numpy() for i, l in enumerate(lengths.tolist())], axis=1)  # (3, sum l)
    assert np.allclose(mu[0, :, 0], valid.mean(1)) and np.allclose(var[0, :, 0], valid.var(1))
    zc, mc2 = ldns.centre_pad(z * m, lengths)
    assert torch.equal(mc, mc2) and torch.equal(ldns.crop_centred(zc, lengths), z * m)  # crop o pad = identity
    for i, l in enumerate(lengths.tolist()):
        left = (T - l) // 2
        assert m[i, 0].nonzero().ravel().tolist() == list(range(l)) and mc[i, 0].nonzero().ravel().tolist() == list(
            range(left, left + l)) and torch.equal(zc[i, :, left:left + l], z[i, :, :l])
        assert (zc[i, :, :left] == z[i, :, :1]).all() and (zc[i, :, left + l:] == z[i, :, l - 1:l]).all()
    d = ldns.make_varlen_data(ldns.parse_args(["--demo", "lorenz-varlen", "--quick"]))
    assert d["lengths"].min() >= 10 and d["lengths"].max() <= 32 and all(
        d["spikes"][k, :, l:].sum() == 0 and d["rates"][k, :, l - 1].min() > 0 for k, l in enumerate(d["lengths"]))

def test_ldns_varlen_masked_denoiser_loss_and_sampling_at_lengths():
    torch.manual_seed(0)
    dn, ddpm, lengths = _perturbed(ldns.MaskedDenoiser(4, 16, 2, 8)).eval(), ldns.DDPM(), torch.tensor([30, 12, 7])
    zc, mc = ldns.centre_pad(torch.randn(3, 4, 30), lengths)
    zc2, t, ones, losses = zc + 5 * torch.randn(zc.shape) * (1 - mc), torch.tensor([10, 500, 990]), mc * 0 + 1, []
    with torch.no_grad():
        e1, e2 = dn(zc, t, m=mc), dn(zc2, t, m=mc)
        assert ((e1 - e2) * mc).abs().max() < 1e-5 and ((e1 - e2) * (1 - mc)).abs().max() > 1e-3
        assert torch.allclose(dn(zc, t, m=ones), dn.backbone(torch.cat([zc, ones], 1), dn.t_mlp(
            ldns.timestep_embedding(t))), atol=1e-5)           # with nothing padded: the plain instance norm
        for x0 in (zc, zc2, zc):
            torch.manual_seed(3)
            losses.append(ldns.masked_diffusion_loss(ddpm, dn, x0, mc))
        torch.manual_seed(3)
        eps_hat, eps = ddpm.predict_noise(dn, zc, m=mc)
        assert abs(losses[0] - losses[1]) < 1e-6 and torch.allclose(losses[2], (mc * (eps_hat - eps) ** 2).sum() / 196)
    ae, dn = ldns.CausalAutoEncoder(6, 8, 2, 1, 8).eval(), ldns.MaskedDenoiser(2, 8, 1, 8).eval()
    lengths = torch.tensor([3, 10, 24, 17])
    out = ldns.sample_at_lengths(ldns.Config(d_latent=2, sample_steps=5), ddpm, dn, ae, torch.zeros(1, 2, 1),
                                 torch.ones(1, 2, 1), lengths, 24)
    valid, left = ldns.valid_mask(lengths, 24), (24 - lengths) // 2
    assert (out["rates"] * (1 - valid) == 0).all() and (out["spikes"] * (1 - valid) == 0).all()
    assert torch.equal(out["lengths_generated"], lengths) and ldns.length_buckets(48, 160, 3) == [(48, 85), (86, 122),
                                                                                                 (123, 160)]
    with torch.no_grad():                                      # the decoded centred window, cropped
        assert all(torch.equal(out["rates"][i, :, :l], ae.decode(out["z"])[i, :, left[i]:left[i] + l])
                   for i, l in enumerate(lengths))
    assert dn.conv_in.in_channels == dn.conv_out.out_channels == 3 and not ldns.CausalAEBlock(4, 4).s4.bidirectional

def test_ldns_reach_data_tuning_minimum_jerk_and_angle_error():
    T, d = 128, ldns.simulate_reach(40, 128, 64, np.random.default_rng(0))
    assert ldns.reach_angle_bins(T) == (39, 57)                # floor(0.3 T) + 1, ceil(0.45 T) - 1
    for b in ldns.reach_angle_bins(T):                         # inside every reach: the generating angle
        c = ldns.reach_condition(torch.tensor(d["velocity"]), b).numpy()
        assert np.allclose(np.arctan2(c[:, 1], c[:, 0]), d["angle"], atol=1e-5)
    speed = np.hypot(*d["velocity"].transpose(1, 0, 2))        # (K,T); its integral is the reach distance
    assert ((speed.sum(1) / 100 > 0.08 - 1e-3) & (speed.sum(1) / 100 < 0.12 + 1e-3)).all() and speed[:, -19:].max() == 0
    assert speed[:, :19].max() == 0 and np.allclose(speed.max(1) / (speed.sum(1) / 100), 1.875 / (speed > 0).sum(1)
                                                    * 100, rtol=0.1)  # min-jerk peak speed: 15/8 distance/duration
    reg = np.concatenate([_rows(d["velocity"]), _rows(d["shared"]), np.ones((40 * T, 1))], 1)  # log-rates: linear
    coef = np.linalg.lstsq(reg, _rows(np.log(d["rates"])), rcond=None)[0]                       # in v and x
    assert np.abs(reg @ coef - _rows(np.log(d["rates"]))).max() < 1e-3 and np.allclose(np.angle(np.exp(1j * (
        np.arctan2(coef[1], coef[0]) - d["pref_dir"]))), 0, atol=1e-3)  # cosine tuning: the preferred directions
    hz = np.exp(coef[-1]) / 0.01                               # baselines U[10, 30] Hz; rotation amplitude U[0.5, 1.5]
    assert 10 < hz.min() < 13 and 27 < hz.max() < 30 and 0.5 < np.hypot(*d["shared"][:, :2].transpose(1, 0, 2)).min()
    step = np.angle(np.exp(1j * np.diff(np.arctan2(d["shared"][:, 1], d["shared"][:, 0]), axis=1)))  # 2 pi f dt
    assert 2 * np.pi * 1.5 * 0.01 - 1e-4 < step.min() and step.max() < 2 * np.pi * 2.5 * 0.01 + 1e-4  # f 1.5-2.5 Hz
    assert np.ptp(d["pref_dir"]) > 5 and 0.3 < coef[2:5].std() < 0.5  # directions U[-pi, pi), w ~ N(0, 0.4^2)
    g = d["shared"][:, 2]                                      # squared-exponential GP, 15 bins: unit variance
    amplitude = np.hypot(*d["shared"][:, :2].transpose(1, 0, 2))
    assert abs(g.var() - 1) < 0.2 and abs((g[:, :-45] * g[:, 45:]).mean()) < 0.35 and amplitude.max() < 1.5
    v = np.ones((2, 2, 3)) * np.array([[1, -1], [0, 1]])[..., None]  # directions -45 and 90 degrees
    assert np.allclose(ldns.angular_error_deg(v, np.radians([170.0, 10.0])), [145.0, 80.0])
    assert np.allclose(ldns.trajectory(v)[0, 0], [0.01, 0.02, 0.03])

def test_ldns_reach_conditional_denoisers():
    """adaLN-Zero: before training two angles give identical outputs, after one step they differ. The velocity
    model's two extra output channels get no gradient and do not change the loss."""
    torch.manual_seed(0)
    dn, ddpm, z, t = ldns.ConditionalDenoiser(4, 16, 1, 8, 2), ldns.DDPM(), torch.randn(2, 4, 24), torch.tensor([5, 9])
    c1, c2, opt = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.optim.AdamW(
        dn.parameters(), lr=1e-2)
    assert torch.equal(dn(z, t, c=c1), dn(z, t, c=c2))
    ddpm.loss(dn, torch.randn(8, 4, 24), c=torch.randn(8, 2)).backward(), opt.step()
    assert (dn(z, t, c=c1) - dn(z, t, c=c2)).abs().max() > 1e-6  # e = e_t + e_c
    assert torch.allclose(dn(z, t, c=c2), dn.backbone(z, dn.t_mlp(ldns.timestep_embedding(t)) + dn.c_mlp(c2)))
    vdn, x0, v = _perturbed(ldns.VelocityDenoiser(4, 16, 1, 8)), torch.randn(2, 4, 24), torch.randn(2, 2, 24)
    torch.manual_seed(1)
    (base := ddpm.loss(vdn, x0, v=v)).backward()
    assert vdn.conv_out.weight.grad[4:].abs().max() == 0 and vdn.conv_out.bias.grad[4:].abs().max() == 0
    assert torch.allclose(vdn(x0, t, v=v), vdn.backbone(torch.cat([x0, v], 1), vdn.t_mlp(ldns.timestep_embedding(t))))
    with torch.no_grad():
        vdn.conv_out.weight[4:].normal_(0, 10.0)
        torch.manual_seed(1)
        assert ddpm.loss(vdn, x0, v=v) == base

def test_ldns_reach_ridge_decoder_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    rates, W, b = rng.gamma(2.0, 0.5, (30, 12, 40)), rng.standard_normal((12, 2)), np.array([0.3, -0.2])
    v = np.einsum("knt,nc->kct", rates, W) + b[None, :, None]  # (K,2,T)
    W_hat, b_hat = ldns.fit_ridge(_rows(rates), _rows(v), 1e-8)
    assert np.allclose(W_hat, W, atol=1e-6) and np.allclose(b_hat, b, atol=1e-6)
    assert np.allclose(ldns.decode_velocity(rates, W, b), v) and np.array_equal(ldns.bins_as_rows(v), _rows(v))
    noisy = v + rng.standard_normal(v.shape)                   # R^2 = 1 - SSE/SST per output, averaged
    r2 = np.mean([1 - ((v[:, c] - noisy[:, c]) ** 2).sum() / ((v[:, c] - v[:, c].mean()) ** 2).sum() for c in (0, 1)])
    Xc, Yc = _rows(rates) - _rows(rates).mean(0), _rows(noisy) - _rows(noisy).mean(0)
    W50 = np.linalg.solve(Xc.T @ Xc + 50 * np.eye(12), Xc.T @ Yc)  # the ridge normal equations
    W_hat, b_hat = ldns.fit_ridge(_rows(rates), _rows(noisy), 50.0)
    assert math.isclose(ldns.r2_score(v, noisy), r2) and np.allclose(W_hat, W50) and np.allclose(
        b_hat, _rows(noisy).mean(0) - _rows(rates).mean(0) @ W50)

def test_ldns_paper_denoiser_size_and_demo_settings():
    """The official Lorenz denoiser has 179,432 parameters; the diagonal S4D has no low-rank P (2 n real numbers
    per channel and block), and the final adaLN modulation adds Linear(C/4, 2C)."""
    cfg = ldns.parse_args(["--paper"])
    n_dn = sum(p.numel() for p in ldns.Denoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state).parameters())
    C, n = cfg.dn_channels, cfg.d_state // 2
    assert n_dn == 179_432 - cfg.dn_blocks * C * 2 * n + (C // 4 * 2 * C + 2 * C)
    assert (cfg.n_trials, cfg.n_bins, cfg.ae_channels, cfg.ae_blocks, cfg.sample_steps) == (5000, 256, 256, 4, 1000)
    cfg = ldns.parse_args(["--demo", "reach", "--quick"])
    assert (cfg.ae_steps, cfg.dn_blocks, cfg.dn_smooth_l1, cfg.angle_bin, cfg.n_vel) == (100, 1, 0.05, 12, 8)
    assert ldns.parse_args(["--demo", "lorenz-varlen"]).len_min == 48 and not hasattr(ldns.parse_args([]), "sh_bins")

@pytest.mark.parametrize("argv,flag", [
    (["--demo", "lorenz-refractory", "--sh-bins", "200"], "--sh-bins"), (["--sh-bins", "5"], "--sh-bins"),
    (["--demo", "lorenz-refractory", "--sh-cap", "0"], "--sh-cap"), (["--ae-channels", "30"], "--ae-channels"),
    (["--demo", "lorenz-varlen", "--len-min", "500"], "--len-min"), (["--len-min", "40"], "--len-min"),
    (["--demo", "lorenz-varlen", "--len-min", "150", "--n-buckets", "20"], "--n-buckets"),
    (["--demo", "lorenz-varlen", "--data", "x.npz"], "--data"), (["--demo", "reach", "--data", "x.npz"], "--data"),
    (["--demo", "reach", "--angle-bin", "20"], "--angle-bin"), (["--demo", "reach", "--n-vel", "400"], "--n-vel"),
    (["--demo", "reach", "--condition", "speed"], "--condition"), (["--mask-p", "1"], "--mask-p"),
    (["--demo", "reach", "--ridge-alpha", "-1"], "--ridge-alpha"), (["--sample-steps", "2000"], "--sample-steps")])
def test_ldns_bad_settings_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        ldns.parse_args(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err

@pytest.mark.parametrize("arr,match", [(GOOD[0], "3 dims"), (GOOD - 1, "non-negative"), (GOOD + 0.5, "integer"),
                                       (np.where(GOOD > 1, np.nan, GOOD), "finite"), (GOOD * 10 ** 12, "re-bin"),
                                       (GOOD[:9], "10 trials"), (GOOD[..., :15], "16 time"), (GOOD * 0, "only zeros"),
                                       (GOOD[..., :20], "21 time")])
def test_ldns_bad_counts_raise_before_anything_is_written(tmp_path, arr, match):
    np.savez(tmp_path / "a.npz", spikes=arr)
    with pytest.raises(ValueError, match=match):
        ldns.main(["--data", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o"), "--quick"] + (
            ["--demo", "lorenz-refractory", "--sh-bins", "20"] if match == "21 time" else []))
    assert not (tmp_path / "o").exists()

@pytest.mark.parametrize("argv,files,keys", [
    (["--demo", "lorenz-refractory", "--data", "GOOD"], ["figures/6_autocorrelograms.png"], ["acg/ldns_sh/lag1_ratio"]),
    (["--demo", "lorenz-varlen"], ["figures/6_varlen.png"], ["lengths/n_wrong_length", "len_10-17/gen_vs_real/r_psc",
                                                            "len_25-32/real_vs_real/r_corr", "ae/latent_r2"]),
    (["--demo", "reach"], ["denoiser_angle.pt", "figures/6_reach_angle_fan.png", "figures/8_reach_raster.png",
                           "figures/7_reach_velocity.png"], ["angle/error_p90_deg", "velocity/n_traces"]),
    (["--demo", "reach", "--condition", "velocity"], ["denoiser_velocity.pt"], ["velocity_gen_vs_real_test/r_rate"])])
def test_ldns_tiny_end_to_end_runs(tmp_path, argv, files, keys):
    np.save(tmp_path / "good.npy", GOOD)
    res = ldns.main([a if a != "GOOD" else str(tmp_path / "good.npy") for a in argv] + TINY + ["--out", str(tmp_path)])
    assert all((tmp_path / f).is_file() for f in ["samples.npz", "ae.pt", "figures/1_data.png", *files])
    assert all(k in res for k in keys) and ("--data" not in argv or "ae/latent_r2" not in res)
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(res))
    with np.load(tmp_path / "samples.npz") as s:
        T, n_real = s["real"].shape[-1], int(0.7 * (12 if "--data" in argv else 60))
        assert s["real"].shape[1:] == s["generated"].shape[1:] and len(s["real"]) == n_real
        assert "generated_plain" not in s or s["generated"].max() <= 5 and s["generated_plain"].shape == s[
            "generated"].shape
        assert "lengths_generated" not in s or all(   # end-padded: no spike after a trial's length
            (s[k] * (np.arange(T) >= s["lengths_" + k][:, None, None])).sum() == 0 for k in ("real", "generated"))
        assert "velocity_requested" not in s or s["velocity_requested"].shape == (8, 2, T) and s[
            "generated_velocity"].shape == (8, 32, T) and len(set(s.get("angle_requested", range(8)))) == 8
    if "reach" in argv:
        w = torch.load(tmp_path / "denoiser_velocity.pt", weights_only=True)
        assert w["conv_in.weight"].shape[1] == 8 + 2 and {"latent_mu", "latent_sigma", "velocity_scale"} <= set(w)
