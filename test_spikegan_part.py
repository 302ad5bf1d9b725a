"""Spike-GAN tests (merged into test_minimal.py by the lead). Every expected value is computed here, independently of
the file: the WGAN-GP objective in closed form, training against Alg. 1 written out, the layers written out, the
simulators against their defining probabilities, the statistics and importance maps by loops, the DG by identities,
own data, bad input."""
import copy
import dataclasses
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import spikegan_minimal as sg  # noqa: E402


def test_sg_wgan_gp_objective_in_closed_form():
    torch.manual_seed(0)
    w, x, xf, alpha = torch.randn(3, 5, requires_grad=True), torch.rand(4, 3, 5), torch.rand(4, 3, 5), torch.rand(4, 1, 1)
    linear, quadratic = (lambda y: (y * w).flatten(1).sum(1)), (lambda y: (y * w).pow(2).flatten(1).sum(1) / 2)
    gp = sg.gradient_penalty(linear, x, xf, alpha)                       # grad <w, x> = w: the norm of the whole sample
    assert torch.allclose(gp, (w.norm() - 1) ** 2)
    gp.backward()                                                        # the penalty's gradient reaches the critic
    assert torch.allclose(w.grad, 2 * (w.norm() - 1) * w / w.norm())
    g = (w ** 2 * (x + alpha * (xf - x))).flatten(1).norm(dim=1)         # grad |w x|^2 / 2 = w^2 x_hat, per sample
    assert torch.allclose(sg.gradient_penalty(quadratic, x, xf, alpha), ((g - 1) ** 2).mean())
    torch.manual_seed(1)
    drawn = sg.gradient_penalty(quadratic, x, xf)
    torch.manual_seed(1)                                                 # alpha ~ U(0, 1), one per sample
    assert torch.allclose(drawn, sg.gradient_penalty(quadratic, x, xf, torch.rand(4, 1, 1)))
    mean_D = (xf * w).sum() / 4 - (x * w).sum() / 4                      # E[D(x_fake)] - E[D(x)]
    assert torch.allclose(sg.critic_loss(linear, x, xf), mean_D + 10 * (w.norm() - 1) ** 2)   # lambda 10
    assert torch.allclose(sg.generator_loss(linear, xf), -(xf * w).sum() / 4)


def test_sg_train_is_alg1_written_out():
    cfg = sg.Config(device="cpu", iters=3, critic_iters=2, batch=4, lr=0.01, lambd=3.0, eval_every=2, z_dim=5)
    x = np.random.default_rng(0).random((11, 3, 4)) < 0.3                # 2 batches per epoch, 3 samples left over
    torch.manual_seed(0)
    G, D = sg.init_weights(sg.Generator(3, 4, 2, z_dim=5)), sg.init_weights(sg.Critic(3, 4, 2))
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    torch.manual_seed(1)
    history = sg.train(cfg, G, D, x, monitor=lambda G, D: dict(lag1_ratio=0.0))
    torch.manual_seed(1)                                                 # the same draws, in the same order
    opt_G, opt_D = (torch.optim.Adam(m.parameters(), betas=(0.0, 0.9)) for m in (G0, D0))
    data, queue = torch.as_tensor(x).float(), []
    for it in range(3):
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = 0.01 * (1 - it / 3)                           # linear decay to 0
        for _ in range(2):                                               # critic steps, a reshuffle every epoch
            queue = queue or list(torch.randperm(11)[:8].view(2, 4))
            xr, xf = data[queue.pop(0)], G0(torch.randn(4, 5)).detach()
            xh = (xr + torch.rand(4, 1, 1) * (xf - xr)).requires_grad_()
            g, = torch.autograd.grad(D0(xh).sum(), xh, create_graph=True)
            loss_D = D0(xf).mean() - D0(xr).mean() + 3.0 * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
            opt_D.zero_grad()
            loss_D.backward()
            opt_D.step()
        loss_G = -D0(G0(torch.randn(4, 5))).mean()                       # then one generator step
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
    batches = sg.real_batches(torch.arange(8.).view(8, 1, 1), 4)        # an epoch: every sample once
    assert sorted(torch.cat([next(batches), next(batches)]).flatten().tolist()) == list(range(8))
    for a, b in zip([*G.parameters(), *D.parameters()], [*G0.parameters(), *D0.parameters()]):
        assert torch.allclose(a, b, atol=1e-5)
    assert [h["iter"] for h in history] == [2, 3] and history[-1]["loss_G"] == pytest.approx(loss_G.item(), abs=1e-5)


def test_sg_critic_and_generator_are_the_layers_written_out():
    torch.manual_seed(0)
    D, G = sg.init_weights(sg.Critic(3, 8, 2)), sg.init_weights(sg.Generator(3, 8, 2, z_dim=5))
    W = [*D.parameters(), *G.parameters()]                               # critic channels 2F, 4F; generator 4F, 2F, N
    assert [tuple(p.shape) for p in W] == [(4, 3, 5), (4,), (8, 4, 5), (8,), (1, 16), (1,), (16, 5), (16,),
                                           (4, 8, 5), (4,), (3, 4, 5), (3,)]
    assert [c.out_channels for c in [*sg.Critic(3, 16, 2, L=3).convs, *sg.Generator(3, 16, 2, L=3).convs]] == [
        4, 8, 16, 8, 4, 3]                                               # L 3: 2F, 4F, 8F and 8F -> 4F, 2F, N
    weights = torch.cat([p.flatten() for p in W if p.dim() > 1])         # U(-0.02 sqrt 3, 0.02 sqrt 3): std 0.02
    assert all((p == 0).all() for p in W if p.dim() == 1) and weights.abs().max() <= 0.02 * math.sqrt(3)
    assert 0.018 < weights.std() < 0.022
    with torch.no_grad():
        for p in W:
            p.normal_(0, 0.5)
        leaky, x, z = (lambda h: torch.where(h > 0, h, 0.2 * h)), torch.rand(2, 3, 8), torch.randn(2, 5)
        h = leaky(F.conv1d(leaky(F.conv1d(x, W[0], W[1], stride=2, padding=2)), W[2], W[3], stride=2, padding=2))
        assert torch.allclose(D(x), h.flatten(1) @ W[4][0] + W[5], atol=1e-5)
        h = leaky((z @ W[6].T + W[7]).view(2, 8, 2))
        for w, b in ((W[8], W[9]), (W[10], W[11])):
            h = leaky(F.conv1d(h.repeat_interleave(2, -1), w, b, padding=2))   # nearest x2, then a 'same' conv
        assert torch.allclose(G(z), torch.sigmoid(h), atol=1e-6)


def test_sg_paper_preset_full_size_and_its_first_adam_step(capsys):
    cfg = dataclasses.replace(sg.parse_args(["--paper"]), iters=1, critic_iters=1, batch=2, device="cpu")
    assert (cfg.window, cfg.d_features, cfg.g_features, cfg.lr, cfg.lr_decay, cfg.n_test) == (128, 128, 128, 1e-4,
                                                                                             False, 2048)
    assert sg.parse_args(["--paper"]).iters == 300000 and sg.parse_args(["--quick", "--demo", "packets"]).importance == 32
    torch.manual_seed(0)
    G, D = sg.init_weights(sg.Generator(16, 128, 128)), sg.init_weights(sg.Critic(16, 128, 128))
    N, T, Fc = 16, 128, 128                                              # paper Fig 1: critic channels 256, 512
    assert sum(p.numel() for p in D.parameters()) == (N * 2 * Fc * 5 + 2 * Fc) + (2 * Fc * 4 * Fc * 5 + 4 * Fc) + (
        4 * Fc * T // 4 + 1) == 692993
    assert sum(p.numel() for p in G.parameters()) == (128 * 4 * Fc * T // 4 + 4 * Fc * T // 4) + (
        4 * Fc * 2 * Fc * 5 + 2 * Fc) + (2 * Fc * N * 5 + N) == 2789648
    before = [p.detach().clone() for p in G.parameters()]
    sg.train(cfg, G, D, np.random.default_rng(0).random((4, N, T)) < 0.1)
    step = torch.cat([(p - b).abs().flatten() for p, b in zip(G.parameters(), before)])
    assert (step - 1e-4).abs().median() < 1e-6                          # Adam, beta1 0, step 1: lr * sign(gradient)
    assert "WARNING: --paper on a CPU" in capsys.readouterr().err


def test_sg_simulators():
    rng = np.random.default_rng(0)
    for d in (1, 3):                      # two spikes d bins apart: one pass, the later survives w.p. 1 - e^(-d/s^2)
        x = np.zeros((20000, 8), bool)
        x[:, [2, 2 + d]] = True
        s = sg.refractory_soft(x, np.zeros(20000), 2.0, rng)
        assert s[:, 2].all() and abs(s[:, 2 + d].mean() - 1 + math.exp(-d / (2 / 1.5) ** 2)) < 0.015
    x = rng.random((100, 30)) < 0.4
    margin = copy.deepcopy(rng).random((100, 60)) < 1 - math.exp(-0.2)  # the 2T-bin margin it draws first
    for row, out in zip(np.concatenate([margin, x], 1), sg.refractory_hard(x.copy(), 0.2, 6, rng)):
        keep, last = np.zeros(90, bool), -9                              # a greedy scan keeps ISIs > 6
        for t in np.flatnonzero(row):
            keep[t], last = (True, t) if t - last > 6 else (False, last)
        assert (out == keep[60:]).all()
    x = sg.make_uniform_data(sg.Config(n_train=2048, n_test=1))["train"]     # Fig 2 data, T 32: spec 0.119, .12 .37 .64
    ratio = [(x[..., :-l] & x[..., l:]).sum() / x.sum() / x.mean() for l in (1, 2, 3)]
    assert 0.1 < x.mean() < 0.14 and ratio[0] < 0.2 and ratio[0] < ratio[1] < ratio[2] < 1
    cfg = sg.Config(neurons=5, window=16, refr=1e-3, rate=0.2, corr=0.4)     # refr ~0: no refractory deletions
    params = dict(f=np.array([0.2, 0.4]), c=np.array([0.25, 0.64]), perm=np.array([2, 3, 4, 0, 1]))
    x = sg.make_uniform(cfg, 4000, params, rng)[:, np.argsort(params["perm"])]          # back to the group order
    r = np.corrcoef(x.transpose(1, 0, 2).reshape(5, -1)[:4])                         # (N, S*T) -> (4, 4)
    assert np.allclose(x.mean((0, 2)), [0.2, 0.2, 0.4, 0.4, 0], atol=0.01) and np.abs(r[:2, 2:]).max() < 0.03
    assert np.allclose([r[0, 1], r[2, 3]], [0.25, 0.64], atol=0.03)     # copies of one reference: correlation c
    data = sg.make_uniform_data(dataclasses.replace(cfg, neurons=40, n_train=5, n_test=3))    # 20 groups
    assert data["train"].shape == (5, 40, 16) and data["test"].shape == (3, 40, 16)
    for k, v in (("f", 0.2), ("c", 0.4)):                               # f_g, c_g ~ U[0.5 v, 1.5 v]
        assert 0.5 * v <= data["params"][k].min() < 0.6 * v and 1.4 * v < data["params"][k].max() <= 1.5 * v
    cfg = dataclasses.replace(cfg, neurons=6, group=3)
    cfg.packet_prob = 0.3                                               # the packets demo's own setting
    params = dict(f=np.full(6, 1e-9), perm=np.arange(6)[::-1])
    for test in (False, True):
        x = sg.make_packets(cfg, 1000, params, rng, **({"test": True} if test else {}))[:, np.argsort(params["perm"])]
        on = x[:, ::3]                                                  # (S, 2 groups, T): neuron 0 fires at onsets
        assert (x[:, [1, 4], 1:] == on[..., :-1]).all() and (x[:, [2, 5], 2:] == on[..., :-2]).all()  # a sweep
        assert all((np.diff(np.flatnonzero(row)) > 3).all() for row in on.reshape(-1, 16)) and not on[..., 13:].any()
        assert (on[:, 1].sum() == 0) == test and (on[:, 0, 4:9].sum() == on[:, 0].sum() > 30) == test
        assert on[:, 0, 4].any() and on[:, 0, 8].any() and x.sum() == 3 * on.sum()   # 3 spikes per onset, no more
        p = 0.2 if test else 0.3                                        # onsets: Bernoulli(p), then 3 bins dead time
        assert abs(on[:, :1 if test else 2, 4:9].mean() - p / (1 + 3 * p)) < 0.012


def test_sg_statistics_against_loops():
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
                     {k: np.array([1., 2, 4]) for k in keys})
    for i, k in enumerate(keys):                                        # r = 1 / sqrt(2 * 42 / 9) by hand
        assert out[f"{k}_r"] == pytest.approx(3 / math.sqrt(84)) and out[f"{k}_l1"] == pytest.approx(
            sum(abs(a * (i + 1) - b) for a, b in ((1, 1), (3, 2), (2, 4))))
    assert out["lag1_ratio"] == 0.5 and math.isnan(sg.compare(dict(out, **{k: np.ones(3) for k in keys}),
                                                               {k: np.arange(3.) for k in keys})["cov_r"])
    train = np.random.default_rng(1).random((8200, 2, 8)) < 0.5         # more than one chunk of 8192
    train[1:8192] = False                                               # the nearest patterns: first and last chunk
    x = np.stack([train[8192], train[0] ^ np.eye(2, 8, dtype=bool)[0], train[8198] ^ np.eye(2, 8, dtype=bool)])
    near = [min((a != b).sum() for b in train) for a in x]              # Hamming distance by brute force
    m = sg.memorisation(x, train, n_near=2)
    assert m == dict(memorised_frac=pytest.approx(1 / 3), nearest_hamming=pytest.approx(np.mean(near[:2])))


def test_sg_sample_and_binarize_draw_on_the_cpu_from_their_generator():
    torch.manual_seed(0)
    G = sg.init_weights(sg.Generator(4, 8, 2))
    p = sg.sample(G, 5, 128, torch.Generator().manual_seed(7), chunk=2)
    with torch.no_grad():
        assert torch.equal(p, G(torch.randn(5, 128, generator=torch.Generator().manual_seed(7))))
    x = sg.binarize(p, torch.Generator().manual_seed(1))
    assert x.dtype == bool and (x == (p > torch.rand(p.shape, generator=torch.Generator().manual_seed(1))).numpy()).all()


def test_sg_importance_map_and_packet_template_by_hand():
    torch.manual_seed(0)
    w, x = torch.randn(2, 6), (torch.rand(2, 2, 6) < 0.5).float()      # S 2, N 2, T 6
    I = sg.importance_map(lambda y: (y * w).flatten(1).sum(1), x, 3, 2, torch.Generator().manual_seed(0))  # P 3
    gen, g = torch.Generator().manual_seed(0), torch.zeros(2, 4, 2)      # g: (S, T - P + 1 windows, N)
    for _ in range(2):                                                   # 2 shuffles per window, in the same draws
        for tau in range(4):
            order = torch.rand(2, 2, 3, generator=gen).argsort(-1)
            for s, n in np.ndindex(2, 2):
                xp = x[s].clone()
                xp[n, tau:tau + 3] = x[s, n, tau:tau + 3][order[s, n]]
                g[s, tau, n] += ((xp - x[s]) * w).sum().abs() / 2      # |D(x') - D(x)| of the linear critic
    for s, n, t in np.ndindex(2, 2, 6):                                  # a spike's mean over the windows holding it
        assert I[s, n, t] == pytest.approx(x[s, n, t] * g[s, [u for u in range(4) if u <= t < u + 3], n].mean())
    I = np.zeros((3, 2, 6))                                              # sample 2: no important spike
    I[0, 0, 1], I[0, 1, 3], I[0, 1, 5] = 1, 1, 0.01                     # packet at bins 1, 3; a weak spike (< q)
    I[1, 0, 3], I[1, 1, 4], I[1, 0, 5] = 2, 2, 2                        # onset 3; bins past the end stay empty
    assert np.allclose(sg.packet_template(I, q=40), np.array([[3, 0, 2, 0, 0, 0], [0, 2, 1, 0, 0, 0]]) / 3)


def test_sg_dichotomized_gaussian():
    a, b, rho = (torch.tensor(v, dtype=torch.float64) for v in ([0.3, -1.2, 0.5], [-0.5, 0.8, 0.5], [-0.7, 0.95, 0.5]))
    assert torch.allclose(sg.Phi2(a * 0, b * 0, rho), 0.25 + torch.asin(rho) / (2 * math.pi), atol=1e-6)
    u = -9 + (a[:, None] + 9) * torch.linspace(0, 1, 20001, dtype=torch.float64)     # (3, 20001) grid up to a
    density = torch.exp(-u ** 2 / 2) / math.sqrt(2 * math.pi) * torch.special.ndtr((b[:, None] - rho[:, None] * u) /
                                                                                 (1 - rho[:, None] ** 2).sqrt())
    assert torch.allclose(sg.Phi2(a, b, rho), torch.trapezoid(density, u), atol=1e-6)   # int phi(u) P(v < b | u)
    A = torch.eye(4, dtype=torch.float64)
    A[1, :2] = torch.tensor([0.5, 0.75 ** 0.5])                          # corr 0.5 between bins 0, 1 of neuron 0
    y = sg.sample_dg(torch.tensor([0.0, -1.0], dtype=torch.float64), A, 40000, torch.Generator().manual_seed(0))
    assert np.allclose([y[:, 0].mean(), y[:, 1].mean(), (y[:, 0, 0] & y[:, 0, 1]).mean()], [0.5, 0.1587, 1 / 3],
                       atol=0.01)                                        # Phi(0), Phi(-1), 1/4 + asin(0.5) / 2 pi
    x = np.zeros((50, 2, 4), bool)
    x[:, 1] = True                                                       # a silent and an always-on neuron: clipped,
    gamma, A = sg.fit_dg(x)                                              # and a Lambda far from positive definite
    assert torch.allclose(gamma, torch.special.ndtri(torch.tensor([1e-4, 1 - 1e-4], dtype=torch.float64)))
    assert torch.allclose((A ** 2).sum(1), torch.ones(8, dtype=torch.float64))          # unit diagonal after clipping
    u = np.random.default_rng(0).standard_normal((20000, 3, 5))
    u = u[..., 1:] + 0.6 * u[..., :-1] + np.array([[0.5], [0.5], [-1.5]]) * u[:, :1, 1:]   # a DG, lags 0 and 1, rho < 0
    x = u > np.array([1.0, 0.5, 1.2])[:, None] * u.std()
    gamma, A = sg.fit_dg(x)
    y = sg.sample_dg(gamma, A, 40000, torch.Generator().manual_seed(0))

    def moments(z, lag):                                                # E[x_i(t) x_j(t + lag)], (N, N)
        z = z.astype(float)
        return np.einsum("sit,sjt->ij", z[..., :4 - lag], z[..., lag:]) / (len(z) * (4 - lag))
    assert torch.allclose(gamma, torch.special.ndtri(torch.tensor(x.mean((0, 2))))) and torch.allclose(
        (A ** 2).sum(1), torch.ones(12, dtype=torch.float64))
    assert max(np.abs(moments(x, lag) - moments(y, lag)).max() for lag in (0, 1, 3)) < 0.005


def test_sg_own_data_windows_held_out_split_and_a_run(tmp_path):
    x = (np.random.default_rng(0).random((1000, 5)) < 0.1).astype(np.uint8)
    np.savez(tmp_path / "s.npz", spikes=x)
    data = sg.load_data(sg.Config(data=str(tmp_path / "s.npz"), window=16, stride=8, batch=8))
    assert data["train"].shape == ((800 - 16) // 8 + 1, 5, 16) and data["test"].shape == ((200 - 16) // 8 + 1, 5, 16)
    assert (data["train"][1] == x[8:24].T).all() and (data["test"][0] == x[800:816].T).all()
    x = np.random.default_rng(0).random((400, 8, 16)) < 0.1
    np.save(tmp_path / "t.npy", x)                                       # trials: a random 20% held out
    data = sg.load_data(sg.Config(data=str(tmp_path / "t.npy")))
    assert len(data["test"]) == 80 and sorted(map(bytes, np.concatenate([data["train"], data["test"]]))) == sorted(
        map(bytes, x))
    metrics = sg.main(["--data", str(tmp_path / "t.npy"), "--out", str(tmp_path / "run"), "--n-gen", "256", "--iters",
                       "4", "--eval-every", "2", "--d-features", "4", "--g-features", "4", "--threads", "1"])
    z = {k: v.astype(float) for k, v in np.load(tmp_path / "run" / "samples.npz").items()}
    assert z["real"].shape == (80, 8, 16) and z["generated"].shape == z["dg"].shape == (256, 8, 16)
    for name, y in (("Spike-GAN", z["generated"]), ("DG", z["dg"])):    # the metrics recomputed here, by hand
        k_probs = [[np.mean(v.sum(1) == k) for k in range(9)] for v in (y, z["real"])]
        assert metrics[name]["mean_l1"] == pytest.approx(np.abs(y.sum(2).mean(0) - z["real"].sum(2).mean(0)).sum())
        assert metrics[name]["k_probs_l1"] == pytest.approx(np.abs(np.subtract(*k_probs)).sum())
        assert metrics[name]["lag1_ratio"] == pytest.approx((y[..., :-1] * y[..., 1:]).sum() / y.sum() / y.mean())
    assert abs(z["generated"].mean() - z["generated_probs"].mean()) < 0.02 and 0 < z["generated_probs"].min()
    assert [h["iter"] for h in metrics["history"]] == [2, 4] and metrics["data"]["shape"] == [320, 8, 16]


def test_sg_packets_demo_scores_its_importance_maps(tmp_path):
    metrics = sg.main(["--demo", "packets", "--out", str(tmp_path), "--n-train", "256", "--n-test", "64", "--n-gen",
                       "128", "--iters", "2", "--d-features", "4", "--g-features", "4", "--neurons", "8", "--window",
                       "16", "--group", "4", "--importance", "16", "--pattern", "4", "--shuffles", "1", "--threads", "1"])
    scores = metrics["importance"]
    assert len(scores["time_profile"]) == 16 and len(scores["neuron_profile"]) == 8 and (tmp_path / "figures" /
                                                                                          "importance.png").exists()
    assert all(math.isfinite(scores[k]) for k in ("inside_over_outside", "per_spike_inside_over_outside", "template_r"))


BAD = [  # bad --data content (file, array, message), or bad settings (flags, None, message): one clear line, no output
    ("counts.npy", np.full((300, 4, 8), 2), r"binary spikes \(0 or 1 in every bin\), found the values \[2\]"),
    ("nan.npy", np.where(np.eye(8)[None].repeat(300, 0) > 0, np.nan, 0.0), "found 2400 NaN or inf values"),
    ("4d.npy", np.zeros((10, 4, 8, 2)), r"\(trials, neurons, bins\) or \(time, neurons\) array, found shape"),
    ("empty.npy", np.zeros((0, 4, 8)), r"non-empty .* found shape \(0, 4, 8\)"),
    ("silent.npy", np.zeros((300, 4, 8)), r"expected some spikes, found none"),
    ("always.npy", (np.arange(4)[:, None] == 2) | (np.arange(300 * 4 * 8).reshape(300, 4, 8) % 3 == 0),
     r"found neurons \[2\] spiking in every bin"),
    ("few.npy", np.arange(20 * 4 * 8).reshape(20, 4, 8) % 3 == 0, r"at least 128 training and 16 .* found 16 and 4"),
    ("odd.npy", np.arange(300 * 4 * 6).reshape(300, 4, 6) % 3 == 0, r"multiple of 2\^layers = 4, found 6"),
    ("wide.npy", np.arange(8 * 5000).reshape(8, 5000) % 3 == 0, r"transpose it"),
    ("late.npy", np.arange(6000 * 4).reshape(6000, 4) % 3 * np.arange(6000)[:, None] > 10 ** 4, "training part"),
    ("key.npz", None, r"expected an array named 'spikes', found \['counts'\]"),
    (["--kernel", "4"], None, "--kernel must be odd"), (["--rate", "0.7"], None, "must be <= 2/3"),
    (["--window", "30"], None, r"multiple of 2\^layers"), (["--importance", "3"], None, "not a setting of --demo"),
    (["--demo", "packets", "--packet-prob", "1"], None, "--packet-prob must be < 1"),
]


@pytest.mark.parametrize("name, content, match", BAD, ids=[str(b[0]) for b in BAD])
def test_sg_bad_input_stops_with_one_clear_line_before_any_output(tmp_path, capsys, name, content, match):
    out, path = tmp_path / "out", str(tmp_path / str(name))
    if isinstance(name, list):
        with pytest.raises(SystemExit) as e:
            sg.main([*name, "--out", str(out)])
        assert e.value.code == 2 and re.search(match, capsys.readouterr().err)
    else:
        np.savez(path, counts=np.ones(3)) if content is None else np.save(path, content)
        with pytest.raises(ValueError, match=match) as e:
            sg.main(["--data", path, "--out", str(out), "--quick", "--window", "32"])
        assert path in str(e.value)
    assert not out.exists()
