"""Temporary part of test_minimal.py (gnocchi); merged back into test_minimal.py by the lead.
GNOCCHI: the formulas against values written out in the test (MMD, AdaGN, attention, the U-Net's time table, the
loss with fixed eps and i, DDIM with exact eps-predictors, the lr schedule, the training loop with a stub model), the
simulator (golden values) and the split, the held-out statistics on hand-worked arrays, PCA and the LFADS-like
baseline written out, own-data checks, --paper at full size for one step, one --quick run's own outputs."""
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
import gnocchi_minimal as gn  # noqa: E402

Normal = torch.distributions.Normal

def test_gn_mmd_is_the_kernel_formula_pair_by_pair():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g), torch.randn(9, 3, generator=g) + 0.5

    def k(a, b):  # utils.py compute_kernel pair by pair: exp(-||u - v||^2 / L^2) with L = 3
        return np.mean([[math.exp(-sum((p - q) ** 2 for p, q in zip(u, v)) / 9) for v in b.tolist()]
                        for u in a.tolist()])
    assert abs(gn.mmd(x, y).item() - (k(x, x) + k(y, y) - 2 * k(x, y))) < 1e-6 and gn.mmd(x, x).abs() < 1e-6

def test_gn_adagn_res_block_and_attention_written_out():
    torch.manual_seed(0)
    blk, x, temb, cemb = gn.AuxResBlock(8, 16, 12, 0.0, groups=4), torch.randn(3, 8, 10), *torch.randn(2, 3, 12)
    s_t, b_t = (F.silu(temb) @ blk.temb_proj[1].weight.T)[..., None].chunk(2, 1)  # biases are zero at init
    s_c, b_c = (F.silu(cemb) @ blk.cemb_proj[1].weight.T)[..., None].chunk(2, 1)
    conv = lambda h, m: F.conv1d(h, m.weight, padding=1)                        # noqa: E731
    h = F.group_norm(conv(F.silu(F.group_norm(x, 4)), blk.block1[2]), 4) * (1 + s_t) + b_t  # GN(h)(1 + s_t) + b_t
    h = h * (1 + s_c) + b_c                                                     # then h (1 + s_c) + b_c
    h = conv(F.silu(F.group_norm(conv(F.silu(h), blk.block2[2]), 4)), blk.block3[3]) + F.conv1d(x, blk.shortcut.weight)
    assert torch.allclose(blk(x, temb, cemb), h, atol=1e-5) and gn.AuxResBlock(8, 8, 4, 0.0).norm2.num_groups == 8
    att, x = gn.AttnBlock(16, groups=8), torch.randn(3, 16, 11)
    q, k, v = (p(att.norm(x)).transpose(1, 2) for p in (att.proj_q, att.proj_k, att.proj_v))  # (B, T, C)
    assert torch.allclose(att(x), x + att.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2)), atol=1e-5)

def test_gn_unet_layouts_time_table_and_any_length():
    net = gn.UNet1D(N=5, C=32, L=3, T_diff=10, dropout=0.1, ch_mult=(1, 2, 2, 2), res_blocks=2, attention=True,
                    skip_all=True, groups=32)
    assert sum(isinstance(m, gn.AuxResBlock) for m in net.modules()) == 4 * 2 + 2 + 4 * 3  # 2 down, 3 up per level
    assert sum(isinstance(m, gn.AttnBlock) for m in net.modules()) == 2 + 1 + 3  # level 2 down, middle, level 2 up
    assert [isinstance(b.attn, gn.AttnBlock) for b in (*net.down[2], *net.down[3], *net.mid)] == [1, 1, 0, 0, 1, 0]
    assert sum(p.numel() for p in gn.UNet1D(5, 16, 3, 10, 0.0).parameters()) == 101013  # the defaults' layout
    f = 1e4 ** (-torch.arange(16) / 16)                                         # sin(i f_k), cos(i f_k)
    assert torch.allclose(net.sin_table[7], torch.cat([torch.sin(7 * f), torch.cos(7 * f)]), atol=1e-5)
    x, i = torch.randn(2, 5, 13), torch.tensor([0, 9])                          # T = 13 is padded to 16 and cropped
    assert (net(x, i, torch.randn(2, 3)) == 0).all()                            # zero-initialised output conv
    torch.nn.init.normal_(net.tail[-1].weight)
    net.eval()
    out = net(x, i, torch.randn(2, 3))
    assert out.shape == (2, 5, 13) and not torch.allclose(out, net(x, i, torch.zeros(2, 3)))  # the code matters
    assert sum(p.numel() for p in gn.GNOCCHI(gn.Config(), 48, 36).parameters()) == 431540  # the default model
    enc, x = gn.Encoder(4, 13, 8, 3), torch.randn(2, 4, 13)                    # an odd T
    h = x
    for conv, stride in zip(enc.net[::2], (1, 2, 2)):                           # Conv-SiLU, stride 2 on two
        h = F.silu(F.conv1d(h, conv.weight, conv.bias, stride=stride, padding=1))
    assert torch.allclose(enc(x), enc.fc(h.flatten(1)), atol=1e-6)

def test_gn_loss_is_score_plus_rec_over_T_plus_mmd_with_fixed_eps_and_i():
    torch.manual_seed(0)
    cfg = gn.Config(channels=16, diff_steps=20, code_dim=3, beta_1=0.1, beta_T=0.3, mmd_weight=0.3)
    model = gn.GNOCCHI(cfg, 4, 8)
    torch.nn.init.normal_(model.eps_model.tail[-1].weight)                     # a U-Net output that is not zero
    x0, eps, i = torch.randn(5, 4, 8), torch.randn(5, 4, 8), torch.tensor([0, 3, 7, 12, 19])
    torch.manual_seed(1)
    total, parts = model.loss(x0, i, eps)
    torch.manual_seed(1)
    beta, z = torch.linspace(0.1, 0.3, 20), torch.randn(5, 3)                  # z: the MMD's prior sample
    ab, c = torch.cumprod(1 - beta, 0)[i][:, None, None], model.encoder(x0)    # the code of the CLEAN x0
    x_i = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    eps_hat = (1 - ab).sqrt() * x_i + ab.sqrt() * model.eps_model(x_i, i, c)   # the input skip
    alpha_1 = abar_1 = 1 - beta[0]            # x0_hat = (x0 - beta_1 / sqrt(1 - abar_1) eps_hat) / sqrt(alpha_1)
    x0_hat = (x0 - beta[0] / (1 - abar_1).sqrt() * eps_hat) / alpha_1.sqrt()
    ref = dict(score=((eps_hat - eps) ** 2).mean(), rec=((x0_hat - x0) ** 2).mean(), mmd=gn.mmd(c, z))
    assert all(math.isclose(parts[k], ref[k].item(), rel_tol=1e-4) for k in ref), (parts, ref)
    assert math.isclose(total.item(), (ref["score"] + ref["rec"] / 20 + 0.3 * ref["mmd"]).item(), rel_tol=1e-5)
    seen = []
    model.q_sample = lambda x0, i, eps: seen.append((i, eps)) or x0            # records the drawn step and noise
    model.loss(torch.randn(400, 4, 8))
    assert seen[0][0].min() == 0 and seen[0][0].max() == 19 and abs(seen[0][1].std() - 1) + abs(seen[0][1].mean()) < .02

def test_gn_ddim_with_exact_eps_predictors_and_the_sampler_of_the_model():
    ab = gn.GNOCCHI(gn.Config(), N=2, T=3).alpha_bar.double()
    assert len(ab) == 200 and abs(ab[-1] - torch.cumprod(1 - torch.linspace(1e-5, 1e-2, 1000), 0)[-1]) < 1e-3
    x0, x_T = torch.randn(5, 6, 10, dtype=torch.float64), torch.randn(5, 6, 10, dtype=torch.float64)
    point = lambda x, i: (x - ab[i].sqrt()[:, None, None] * x0) / (1 - ab[i]).sqrt()[:, None, None]  # noqa: E731
    assert torch.allclose(gn.ddim_sample(point, x_T, ab, steps=7), x0)        # data = one point: DDIM lands on it
    # data N(0, 4): eps_hat = e x with e = sqrt(1 - abar) / (4 abar + 1 - abar), so each eta = 1 step is x' = A x + s z
    # and the variance follows v' = A^2 v + s^2 over the strided steps 199, 133, 66, 0 (DDIM Eq. 12, 16 written out)
    e = lambda a: (1 - a).sqrt() / (4 * a + 1 - a)                              # noqa: E731
    v, seq = 1.0, [199, 133, 66, 0]
    for a, p in zip(ab[seq], [*ab[seq[1:]], torch.tensor(1.0)]):
        s2 = (1 - p) / (1 - a) * (1 - a / p)
        v = ((p / a).sqrt() * (1 - (1 - a).sqrt() * e(a)) + (1 - p - s2).sqrt() * e(a)) ** 2 * v + s2
    x_T = torch.randn(200000, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = gn.ddim_sample(lambda x, i: e(ab[i])[:, None, None] * x, x_T, ab, 4, 1.0, torch.Generator().manual_seed(1))
    assert abs(x.var() / v - 1) < 0.02                                          # (v = 1.40; eta = 0 gives 1.93)
    model = gn.GNOCCHI(gn.Config(diff_steps=20, ddim_steps=5), 2, 3)          # at init eps_hat = sqrt(1 - abar) x
    gain = math.prod((ab_p * a).sqrt() + ((1 - ab_p) * (1 - a)).sqrt() for a, ab_p in zip(
        model.alpha_bar[[19, 14, 10, 5, 0]], [*model.alpha_bar[[14, 10, 5, 0]], torch.tensor(1.0)]))
    out = model.sample(torch.zeros(4, 4), torch.Generator().manual_seed(3))
    assert torch.allclose(out, gain * torch.randn((4, 2, 3), generator=torch.Generator().manual_seed(3)), atol=1e-5)

def test_gn_lr_factor_is_warmup_to_two_then_cosine_to_zero():
    f = [gn.lr_factor(s, gn.Config(steps=100, warmup=10)) for s in range(101)]
    assert f[0] == 1 and f[5] == 1.5 and f[10] == 2 and abs(f[55] - 1) < 1e-12 and abs(f[100]) < 1e-12

class StubModel(torch.nn.Module):
    """loss = k_t p, so the gradient at step t is k_t; records the batches and p."""
    def __init__(self, ks):
        super().__init__()
        self.p, self.ks, self.seen = torch.nn.Parameter(torch.zeros(())), ks, []

    def loss(self, xb):
        self.seen.append((xb[:, 0, 0].tolist(), self.p.item()))
        return self.p * self.ks[len(self.seen) - 1], dict(score=0.0, mmd=0.0)

def test_gn_train_loop_lr_batches_checkpoints_and_divergence():
    torch.manual_seed(0)
    cfg, ks = gn.Config(steps=5, warmup=2, eval_every=2, batch=8, lr=0.1, weight_decay=0.5), [3.0, 0.5, 3.0, 0.5, 3.0]
    model, data = StubModel(ks), dict(train=np.arange(10) % 3 > 0)            # no targets: val_code_r2 is 0
    hist = gn.train(model, torch.arange(10.0)[:, None, None], data, cfg)
    p, m, v = [0.0], 0.0, 0.0                                   # AdamW by hand on gradients clipped to norm 1
    for t, (lr, g) in enumerate(zip(0.1 * np.array([1, 1.5, 2, 1.5, 0.5]), np.minimum(ks, 1.0)), 1):  # lr_factor
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        p.append(p[-1] * (1 - lr * 0.5) - lr * m / (1 - 0.9 ** t) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8))
    assert np.allclose([s[1] for s in model.seen] + [model.p.item()], p, atol=1e-6)
    assert {b for s in model.seen for b in s[0]} == {1, 2, 4, 5, 7, 8} and len(model.seen[0][0]) == 8  # training
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5] and [h["step"] for h in hist if "val_code_r2" in h] == [2, 4, 5]
    with pytest.raises(FloatingPointError, match=r"GNOCCHI: the training loss became nan at step 1; likely cause"):
        gn.train(StubModel([float("nan")]), torch.zeros(4, 1, 1), dict(train=np.ones(4, bool)), cfg)

def test_gn_simulator_golden_values_and_the_split():
    d = gn.make_reach_data(gn.Config(n_neurons=3, trials_per_target=2))
    golden = dict(rates=(38125.55462570417, 718244.382326731), true_rates=(39059.51006634041, 398346.09305014374),
                  hand=(158.26164927103167, 10091.119815337504), t_ms=(5760.0, 2475600.0))
    for k, sums in golden.items():  # this implementation's simulation at seed 0 (a reference state, as llm.c keeps)
        assert np.allclose([d[k].sum(), (d[k] ** 2).sum()], sums, rtol=1e-9), k
    assert {tuple(t) for t in d["targets"][d["heldout"]]} == {(-2, 2), (2, 0), (0, -2)} and d["heldout"].sum() == 6
    s = gn.split_and_zscore(dict(d), 0)
    val = ~d["heldout"] & (np.random.default_rng(1).random(50) < 0.15)         # 15 % validation, seed + 1
    assert np.array_equal(s["val"], val) and np.array_equal(s["train"], ~d["heldout"] & ~val)
    x_tr = s["x"][s["train"]]                                                   # z-scored with TRAINING statistics
    assert np.allclose(x_tr.mean((0, 2)), 0) and np.allclose(x_tr.std((0, 2)), 1, atol=1e-6)
    assert np.allclose(s["x"] * s["sd"] + s["mu"], d["rates"]) and np.allclose(s["truth"] * s["sd"] + s["mu"],
                                                                                d["true_rates"])
    d["rates"][:, 0] = 0.0                                                      # a silent neuron: z = 0, not NaN
    assert (gn.split_and_zscore(d, 0)["x"][:, 0] == 0).all()

def test_gn_ridge_r2_snr_error_on_hand_worked_arrays():
    assert np.allclose(gn.r2(np.array([[1., 0], [2, 1], [3, 5]]), np.array([[1., 1], [2, 1], [4, 5]])), [0.5, 13 / 14])
    assert np.allclose(gn.r2(np.array([[1., 2, 3]]), np.array([[1., 2, 4]]), axis=1), [0.5])
    C = np.array([[0., 0], [2, 0], [10, 1], [10, 3], [10, 2]])                # means (1, 0), (10, 2)
    assert np.isclose(gn.code_snr(C, np.array([0, 0, 1, 1, 1])), 21.25 / (5 / 6))  # between 21.25, within (1 + 2/3)/2
    assert gn.mean_error(np.array([[0., 0], [1, 1]]), np.array([[3., 4], [1, 1]])) == 2.5
    X, Y = np.random.default_rng(0).normal(size=(20, 3)), np.random.default_rng(1).normal(size=(20, 2))
    Xc, lam = X - X.mean(0), 2.0 * (X - X.mean(0)).var(0).sum() * 20 / 3        # lam 2 x tr(Xc'Xc) / 3
    A = np.linalg.lstsq(np.r_[Xc, math.sqrt(lam) * np.eye(3)], np.r_[Y - Y.mean(0), np.zeros((3, 2))], rcond=None)[0]
    assert np.allclose(gn.ridge(X, Y, lam=2.0)(X[:4] + 1), (X[:4] + 1 - X.mean(0)) @ A + Y.mean(0))
    X2 = np.c_[X, X[:, 0]]                                                      # a repeated feature: a singular X'X,
    assert np.allclose(gn.ridge(X2, Y)(X2), gn.ridge(X, Y)(X), atol=1e-5)      # which the default lam 1e-6 handles
    decode = gn.fit_decoder(dict(x=X.reshape(20, 3, 1), targets=Y, train=np.arange(20) < 15))  # lam 1, training trials
    assert np.allclose(decode(X[:4].reshape(4, 1, 3)), gn.ridge(X[:15], Y[:15], lam=1.0)(X[:4]))

def test_gn_code_metrics_on_codes_linear_in_the_target():
    grid = np.array([[x, y] for x in (-2., 0, 2) for y in (-2., 0, 2)])
    Y, s, k = np.repeat(grid, 4, 0), np.tile([1., -1], 18), np.arange(36) // 4  # s = +-1 in each target: no effect
    ho, va = np.isin(k, [5, 7]), np.isin(k, [2, 6])                             # on the least-squares fit of W
    c_bar, W = np.array([1., -1, 0]), np.array([[1., 0], [1, 1], [0, 2]])
    v = W @ [0.5, -0.25]                                       # trial noise s v inside the plane: targets blur
    C = c_bar + Y @ W.T + s[:, None] * v
    m, res = gn.code_metrics(C, dict(targets=Y, heldout=ho, val=va, train=~ho & ~va))
    assert np.allclose(res["c_bar"], c_bar) and np.allclose(res["W"], W) and np.isclose(m["cos_wx_wy"], 10 ** -0.5)
    mus, u = [c_bar + W @ y for y in grid[[0, 1, 3, 4, 8]]], W[:, 0] / math.sqrt(2)  # training targets' mean codes
    assert np.isclose(m["snr_train"], np.mean([np.sum((mu - np.mean(mus, 0)) ** 2) for mu in mus]) / (v @ v))
    assert np.isclose(m["snr_x"], np.var([mu @ u for mu in mus]) / (v @ u) ** 2)
    assert np.isclose(m["snr_heldout"], 5 / (v @ v))                           # held out: (0, 2, 4), (2, 2, 0)
    B = np.linalg.lstsq(np.c_[np.ones(20), C[~ho & ~va]], Y[~ho & ~va], rcond=None)[0]  # least squares on the plane:
    pred = {k: np.c_[np.ones(8), C[idx]] @ B for k, idx in (("ho", ho), ("va", va))}  # its predictions are unique
    r = {k: 1 - ((Y[idx] - pred[k]) ** 2).sum(0) / ((Y[idx] - Y[idx].mean(0)) ** 2).sum(0) for k, idx in (("ho", ho),
                                                                                                       ("va", va))}
    assert np.allclose(res["pred"], pred["ho"], atol=1e-4) and abs(r["ho"][0] - r["ho"][1]) > 0.01
    assert np.allclose([m["heldout_r2_x"], m["heldout_r2_y"], m["heldout_r2"], m["val_r2"]],
                       [*r["ho"], r["ho"].mean(), r["va"].mean()], atol=1e-4)
    assert np.isclose(m["heldout_err_cm"], np.mean(np.hypot(*(Y[ho] - pred["ho"]).T)), atol=1e-4)

def test_gn_generation_metrics_with_a_linear_generator():
    Y, ho = np.repeat(np.array([[0., 2], [2, 0], [1, 1]]), 2, 0), np.arange(6) < 4
    c_bar, W = np.array([1., -1, 0]), np.array([[1., 0], [1, 1], [0, 2]])

    def generate(c):  # in each of 4 bins: neurons 2 b_x, b_y + 0.1 b_x, 2 b_x - b_y + 1, for b = W^+ (c - c_bar)
        b = (c - c_bar) @ np.linalg.pinv(W).T
        neurons = [2 * b[:, 0], b[:, 1] + 0.1 * b[:, 0], 2 * b[:, 0] - b[:, 1] + 1]
        return np.repeat(np.stack(neurons, 1)[..., None], 4, 2)                # (K, 3) -> (K, 3, 4)
    truth = np.repeat(np.c_[Y, 2 * Y[:, 0] - Y[:, 1]][:, :, None], 4, 2)       # the true PSTHs, without the errors
    decode = lambda x: x[:, :2, 0]                                              # noqa: E731  (K, N, T) -> (K, 2)
    m, res = gn.generation_metrics(c_bar, W, generate, dict(targets=Y, heldout=ho, truth=truth), decode, 15)
    assert np.allclose([m["unwanted_x"], m["unwanted_y"], m["unwanted"]], [0.1 / 2, 0, 0.1 / 4])  # off / on slope
    assert np.isclose(m["gen_endpoint_err_cm"], (0 + math.hypot(4 - 2, 0.2)) / 2)  # decoded (0, 2) and (4, 0.2)
    r_n = [1 - 16 / 8, 1 - 4 * 0.2 ** 2 / 8, 1 - 8 / 72]  # truth pooled over 2 held-out targets x 4 bins, per neuron:
    assert np.allclose(res["psth_r2_neurons"], r_n)     # (0 0 0 0 2 2 2 2), (2 2 2 2 0 0 0 0), (-2 -2 -2 -2 4 4 4 4)
    assert np.allclose([m["psth_r2"], m["psth_r2_median"]], [np.mean(r_n), np.median(r_n)])
    assert np.allclose(res["trav"][0][:, 0], np.repeat(2 * np.linspace(-4, 4, 5), 3)) and res["gen"].shape == (30, 3, 4)

def test_gn_pca_latent_is_the_top_principal_subspace():
    x = np.random.default_rng(0).normal(size=(30, 2, 3)) * np.array([3., 2, 1.5, 1, .7, .5]).reshape(1, 2, 3)
    codes, generate = gn.pca_latent(dict(x=x, train=np.arange(30) < 20), 2)
    X = x.reshape(30, 6)
    V = np.linalg.eigh(np.cov(X[:20].T))[1][:, ::-1][:, :2]                     # the top 2 covariance eigenvectors
    assert np.allclose(np.abs(codes), np.abs((X - X[:20].mean(0)) @ V))        # up to the sign of each axis
    assert np.allclose(generate(codes).reshape(30, 6), X[:20].mean(0) + (X - X[:20].mean(0)) @ V @ V.T)

def test_gn_seqvae_posterior_generator_and_loss_written_out():
    torch.manual_seed(0)
    assert sum(p.numel() for p in gn.SeqVAE(6, 3).parameters()) == 42668        # the defaults: H 64, 16 factors
    vae, x = gn.SeqVAE(N=6, L=3, H=8, n_fac=4), torch.randn(5, 6, 9)
    states = vae.encoder(x.transpose(1, 2))[0]                                  # (B, T, 2H): forward | backward
    mu, logvar = vae.to_post(torch.cat([states[:, -1, :8], states[:, 0, 8:]], 1)).chunk(2, 1)
    torch.manual_seed(1)
    loss, kl = vae.loss(x, kl_weight=0.3)
    torch.manual_seed(1)
    g0 = mu + (0.5 * logvar).exp() * torch.randn(5, 3)
    W_hh, b_ih, b_hh = vae.generator.weight_hh_l0, vae.generator.bias_ih_l0, vae.generator.bias_hh_l0
    h, out = torch.tanh(vae.to_h0(g0)), []                                      # the GRU unrolled, zero inputs
    for _ in range(9):
        a_i, a_h = b_ih.chunk(3), (h @ W_hh.T + b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(a_i[0] + a_h[0]), torch.sigmoid(a_i[1] + a_h[1])
        h = (1 - z) * torch.tanh(a_i[2] + r * a_h[2]) + z * h
        out.append(vae.readout(h @ vae.to_fac.weight.T))                        # factors: no bias, as in LFADS
    kl_ref = torch.distributions.kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1)
    rec = 0.5 * ((torch.stack(out, 2) - x) ** 2).sum((1, 2))
    assert abs(kl - kl_ref.mean().item()) < 1e-5 and torch.isclose(loss, (rec + 0.3 * kl_ref).mean() / 54, rtol=1e-5)
    torch.manual_seed(1)                                                        # the same z: by default the ELBO
    assert torch.isclose(vae.loss(x)[0], (rec + kl_ref).mean() / 54, rtol=1e-5)
    data = gn.split_and_zscore(gn.make_reach_data(gn.Config(n_neurons=6, trials_per_target=2)), 0)
    data["x"] *= 1e30
    with pytest.raises(FloatingPointError, match="LFADS-like: the training loss became inf at step 1"):
        gn.lfads_latent(data, gn.parse_args(["--lfads-steps", "3", "--device", "cpu"]))

GOOD = np.random.default_rng(0).poisson(2.0, (20, 5, 12))
BAD_DATA = [  # arrays saved with np.savez, the message expected
    (dict(counts=GOOD), r"exactly one of the arrays 'rates' or 'spikes'.*\['counts'\]"),
    (dict(rates=GOOD * 1.0, spikes=GOOD), "exactly one of the arrays"),
    (dict(spikes=GOOD[:5]), r"shaped \(trials >= 8, neurons, bins >= 4\), found the shape \(5, 5, 12\)"),
    (dict(spikes=-GOOD), r"non-negative integer spike counts.*found values such as \[-"),
    (dict(spikes=GOOD + 0.5), r"integer spike counts.*found values such as \[\d+\.5"),
    (dict(spikes=np.where(GOOD > 5, 501, GOOD)), r"at most 500 spikes per neuron per bin.*re-bin.*501"),
    (dict(rates=np.full((20, 5, 12), 1e200)), r"\|rates\| <= 10000.*overflow float32.*1e\+200"),
    (dict(spikes=GOOD, targets=np.zeros((19, 2))), r"'targets' \(x, y\) shaped \(20, 2\).*\(19, 2\)"),
    (dict(spikes=GOOD, targets=np.zeros((20, 2)), heldout=np.zeros(20)), r"'heldout' as a bool.*float64"),
    (dict(spikes=GOOD, heldout=np.ones(20, bool)), r"'targets' with 'heldout'"),
    (dict(spikes=GOOD, targets=np.zeros((20, 2)), heldout=np.arange(20) > 2), r">= 8 training.*found 3"),
]

@pytest.mark.parametrize("arrays,match", BAD_DATA)
def test_gn_own_data_checks(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        gn.load_data(gn.Config(data=str(tmp_path / "d.npz")))

def test_gn_own_data_spikes_are_smoothed_counts_and_rates_pass_through(tmp_path):
    np.save(tmp_path / "s.npy", GOOD.astype(np.float32))                       # integer-valued floats are counts too
    d = gn.load_data(gn.Config(data=str(tmp_path / "s.npy"), smooth_bins=1.5))
    lag = np.subtract.outer(np.arange(12), np.arange(12))
    K = np.exp(-lag ** 2 / 4.5) / np.exp(-lag ** 2 / 4.5).sum(0)               # Gaussian, sd 1.5 bins, columns sum to 1
    assert np.allclose(d["rates"], GOOD @ K) and not d["heldout"].any() and "targets" not in d
    np.savez(tmp_path / "r.npz", rates=-GOOD * 1.0, targets=np.ones((20, 2)), heldout=np.arange(20) < 4)
    d = gn.load_data(gn.Config(data=str(tmp_path / "r.npz")))
    assert np.array_equal(d["rates"], -GOOD) and d["heldout"].sum() == 4 and d["targets"].shape == (20, 2)

def test_gn_paper_preset_is_infodiffusions_scale_and_takes_one_step():
    cfg = gn.parse_args(["--paper", "--device", "cpu"])
    assert (cfg.channels, cfg.ch_mult, cfg.res_blocks, cfg.code_dim, cfg.diff_steps, cfg.lr, cfg.ddim_eta) == (
        64, "1,2,2,2", 2, 32, 1000, 1e-4, 0.01)
    torch.manual_seed(0)
    model = gn.GNOCCHI(cfg, 48, 36)
    assert sum(p.numel() for p in model.parameters()) == 6935696
    opt, before = torch.optim.AdamW(model.parameters(), lr=cfg.lr), [p.detach().clone() for p in model.parameters()]
    for _ in range(2):                                 # the zero output conv moves first, then every layer
        opt.zero_grad()
        model.loss(torch.randn(2, 48, 36))[0].backward()
        opt.step()
    assert sum(not torch.equal(a, p) for a, p in zip(before, model.parameters())) > 0.9 * len(before)
    assert torch.isfinite(model.eval().sample(torch.randn(2, 32), torch.Generator().manual_seed(0), steps=3)).all()

def test_gn_quick_run_outputs(tmp_path):
    metrics = gn.main(["--quick", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)])
    assert metrics["val_code_r2"] == metrics["gnocchi_val_r2"]                 # the last check is the evaluation's
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} == {
        "task.png", "latents.png", "heldout_prediction.png", "traversal.png", "psth.png", "summary.png"}
    with np.load(tmp_path / "codes.npz") as c, np.load(tmp_path / "samples.npz") as s:
        assert c["codes"].shape == c["baseline_codes"].shape == c["lfads_codes"].shape == (300, 4)
        assert c["targets"].shape == (300, 2) and c["heldout"].sum() == 36 == len(s["real"])
        assert s["generated"].shape == (3 * 4, 24, 36) and s["real"].min() >= 0   # in Hz, not z units
    assert any(k.startswith("eps_model.down.") for k in torch.load(tmp_path / "gnocchi.pt", weights_only=True))
