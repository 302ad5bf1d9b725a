"""Spike-GAN: minimal single-file reference for Molano-Mazon, Onken, Piasini & Panzeri, "Synthesizing realistic
neural population activity patterns using Generative Adversarial Networks", ICLR 2018 (arXiv:1803.00338).
Pipeline: binary spike patterns x in {0,1}^(N x T) -> WGAN-GP with a critic and a generator of 1-D convolutions over
time, neurons as channels (the paper's "semi-convolutional" design) -> the generator's spike probabilities,
Bernoulli-sampled -> the paper's statistics on held-out data, next to the paper's baselines and the real-vs-real floor.
Paper / official code (github.com/manuelmolano/Spike-GAN) -> code:
  I   Fig 2 data           refractory_soft, make_uniform_data                    (tflib/sim_pop_activity.py)
      Fig 1 model          Critic, Generator, init_weights                       (model_conv.py)
      WGAN-GP, training    gradient_penalty, critic_loss, train                  (Gulrajani et al. 2017, Alg. 1)
      Fig 2/S5 statistics  sample, spike_stats, compare, memorisation            (tflib/analysis.py)
      Fig 2/S6 baselines   baselines: independent; Phi2, fit_dg, sample_dg (Macke et al. 2009, Lyamzin et al. 2010)
  II  Fig 4 packets        make_packets, importance_map, packet_template         (tflib/spike_relevance_analysis.py)
  III figures, own data (load_data), the command line
Run (a 2-core CPU):
  python spikegan_minimal.py                  # ~5 min: the Fig 2 data, Spike-GAN against the paper's baselines
  python spikegan_minimal.py --long           # ~25 min: the same, trained longer
  python spikegan_minimal.py --demo packets   # ~6 min: importance maps (Fig 4)
  python spikegan_minimal.py --quick          # ~10 s smoke test (numbers meaningless)
  python spikegan_minimal.py --paper          # the paper's Fig 2 job (T 128, F 256, 300000 iterations), for a GPU
  python spikegan_minimal.py --data my.npz    # own binary spikes: (trials, N, T), or a long (time, N) series
Left out: the MLP-GAN comparison (Fig 2), k-pairwise MaxEnt samples (Fig S6), the pattern-probability check (Fig S1).
Shapes: S samples, B batch, N neurons, T time bins, C channels, F width, Z = 128 latent dims. Markers: "NOTE
(deviation)": where this file differs from the paper or the official code, and why; "NOTE (choice)": a detail both
leave open. Every random draw is made on the CPU, then moved: same seed and --threads, same numbers.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ==== Part I: the paper's core experiment, Fig 2: correlated groups with refractoriness (reads alone) ===============
@dataclasses.dataclass
class Config:
    demo: str = "uniform"      # the experiment: uniform (Fig 2) | packets (Fig 4)
    preset: str = ""           # set by --quick / --long / --paper
    seed: int = 0              # random seed
    device: str = "auto"       # auto | cpu | cuda | mps
    out: str = ""              # output folder; "" -> runs/spikegan_minimal-<demo>
    data: str = ""             # own data: .npy or .npz (key "spikes"), binary (trials, N, T) or (time, N)
    threads: int = 0           # torch CPU threads; 0 -> torch's default
    # data: the paper's Fig 2 parameters. NOTE (deviation): T 32 bins, not 128 (CPU size; --paper: 128); the data's
    # refractory dip depends on T (deeper in longer samples).
    neurons: int = 16          # N neurons
    window: int = 32           # T bins per sample; also the window cut from a long --data series
    n_train: int = 8192        # training samples (paper 2^13)
    n_test: int = 4096         # held-out samples (the repo's dev set has 2048; more lowers the noise floor)
    rate: float = 0.25         # f: spike probability per bin before the refractory rule
    corr: float = 0.3          # c: within-group correlation parameter (copy probability q = sqrt(c))
    group: int = 2             # neurons per correlated group (per packet in the packets demo)
    refr: float = 2.0          # rho: soft refractory period (bins)
    # model: one width F for both nets, L 2 layers, kernel 5, Z 128 latent dims (Fig 1, model_conv.py).
    # NOTE (deviation): F 64 on a CPU, the paper's 256 (--paper).
    features: int = 64         # F: critic channels F, 2F (F 2^l in layer l); the generator mirrors them: 2F, F, N
    # training: WGAN-GP (Alg. 1) with the repo's settings. NOTE (deviation): lr 4e-3 decayed linearly to 0, not a
    # constant 1e-4: with <= 5% of the paper's iterations 1e-4 is too slow, and the decay (as in Gulrajani et al.'s
    # CIFAR code) lets the last snapshot settle. --paper: 1e-4, constant.
    iters: int = 3500          # generator iterations (repo default 300000)
    batch: int = 64            # B real and B fake samples per step
    lr: float = 4e-3           # Adam learning rate of both nets
    lr_decay: bool = True      # 1: linear decay to 0 over iters; 0: constant (paper)
    critic_iters: int = 5      # critic steps per generator step
    lambd: float = 10.0        # lambda: gradient-penalty weight
    eval_every: int = 500      # record the lag-1 ratio and the critic's estimates every this many iterations
    n_gen: int = 8192          # generated (and baseline) samples scored against the held-out set (repo: 8192)


DEMOS = {"uniform": {}}
# --paper: the Fig 2 run (with --demo packets --neurons 32 --window 64: the Fig 4 sizes). NOTE (choice): the repo's
# default 300000 iterations (the paper does not state its count), logged every 20000 as main_conv.py does.
PRESETS = {"quick": (dict(n_train=1024, n_test=512, n_gen=1024, iters=60, features=8, eval_every=30, importance=32),
                     "tiny end-to-end smoke test (numbers meaningless)"),
           "long": (dict(iters=15000), "15000 generator iterations"),
           "paper": (dict(window=128, n_test=2048, features=256, lr=1e-4, lr_decay=False, iters=300000,
                          eval_every=20000), "the paper's Fig 2 job (T 128, F 256, lr 1e-4 constant): a GPU job")}
CHOICES = {}
ZERO_OK = ("seed", "threads", "corr", "lambd")


def check_config(cfg):
    """Spike-GAN's own checks (parse_args has checked that every number is > 0, or >= 0 where ZERO_OK says so)."""
    check(max(cfg.rate, cfg.corr) <= 2 / 3 and (cfg.data or cfg.window % 4 == 0 and 2 * cfg.group <= cfg.window and
          cfg.group <= cfg.neurons), "expected --rate, --corr <= 2/3 (drawn up to 1.5x), --window a multiple of 4 (2^L,"
          f" L 2 layers), --group <= --neurons, --window / 2; found {cfg.rate, cfg.corr, cfg.window, cfg.group}")


# ---- Data: the repo's simulators (tflib/sim_pop_activity.py), vectorised over rows; datasets are (S, N, T) bool ----
def refractory_soft(x, f, rho, rng):
    """The repo's soft refractory rule on rows x (R, T), rates f (R,): after a 2T-bin margin of spikes w.p. 1 - e^-f,
    each pass flags every inter-spike interval d w.p. exp(-d / sigma^2), sigma = rho / 1.5, and deletes the later
    spikes of the flagged ones, until a pass flags none. NOTE (deviation): the repo's first pass deletes the wrong
    spike (an indexing bug, nearly always in the margin); we apply every pass as intended (a negligible effect)."""
    R, T = x.shape
    s = np.concatenate([rng.random((R, 2 * T)) < 1 - np.exp(-f)[:, None], x], axis=1)  # (R, 3T)
    t, rows = np.arange(3 * T), np.arange(R)                      # rows: those still being processed
    while rows.size:
        r = s[rows]
        last = np.maximum.accumulate(np.where(r, t, -1), axis=1)  # last spike at or before t
        prev = np.concatenate([np.full((rows.size, 1), -1), last[:, :-1]], axis=1)  # last spike before t
        # P(flag the interval d = t - prev) = exp(-d / sigma^2)
        flag = r & (prev >= 0) & (rng.random(r.shape) < np.exp(-(t - prev) / (rho / 1.5) ** 2))
        s[rows] = r & ~flag
        rows = rows[flag.any(1)]                                  # stop after the first clean pass
    return s[:, 2 * T:]


def make_uniform_data(cfg):
    """Correlated groups with refractoriness (repo spike_trains_corr, Fig 2): f_g, c_g ~ U[0.5 x, 1.5 x] per group of
    s neurons. Members ~ Bernoulli(f_g); a Bernoulli(f_g) reference train made refractory; each member bin copies the
    reference bin (0 or 1) w.p. q = sqrt(c_g), so two members correlate at ~c_g; each member made refractory; a
    neuron permutation hides the groups. n_train + n_test samples (S, N, T) bool, split into training and held-out."""
    rng, N, T, s, G = np.random.default_rng(cfg.seed), cfg.neurons, cfg.window, cfg.group, cfg.neurons // cfg.group
    f, c = (rng.uniform(0.5 * v, 1.5 * v, G) for v in (cfg.rate, cfg.corr))
    perm, S = rng.permutation(N), cfg.n_train + cfg.n_test
    Rf, Bf = np.broadcast_to(f, (S, G)).ravel(), np.broadcast_to(f[:, None], (S, G, s)).ravel()   # rates per row
    ref = refractory_soft(rng.random((S * G, T)) < Rf[:, None], Rf, cfg.refr, rng).reshape(S, G, 1, T)
    B = np.where(rng.random((S, G, s, T)) < np.sqrt(c)[:, None, None], ref, rng.random((S, G, s, T)) < f[:, None, None])
    x = np.zeros((S, N, T), bool)                                              # leftover neurons stay silent
    x[:, :G * s] = refractory_soft(B.reshape(-1, T), Bf, cfg.refr, rng).reshape(S, G * s, T)  # (S G s, T) -> (S, Gs, T)
    return dict(train=x[:cfg.n_train, perm], test=x[cfg.n_train:, perm], params=dict(f=f, c=c, perm=perm), rng=rng)


# ---- Model (paper Fig 1, model_conv.py): neurons are channels, convolutions run over time -------------------------
class Critic(nn.Module):
    """L x [Conv1d(stride 2, 'same') -> LeakyReLU(0.2)], channels F, 2F, .. -> flatten -> Linear -> scalar. No
    normalisation layers (they would couple the samples of a batch, breaking the per-sample gradient penalty), no
    output nonlinearity."""

    def __init__(self, N, T, features, L=2, k=5):
        super().__init__()
        ch = [N] + [features * 2 ** l for l in range(L)]                   # N, F, 2F
        # NOTE (choice): padding k//2 gives TF 'SAME' output lengths; TF pads 1 left / 2 right, a 1-bin shift.
        self.convs = nn.ModuleList(nn.Conv1d(ch[l], ch[l + 1], k, stride=2, padding=k // 2) for l in range(L))
        self.out = nn.Linear(ch[-1] * (T >> L), 1)                          # 2F * T/4 = F T / 2 inputs

    def forward(self, x):                                                   # (B, N, T) -> (B,)
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.2)                                  # (B, C_l, T / 2^(l+1))
        return self.out(x.flatten(1)).squeeze(1)                            # (B, 2F * T/4), channel-major


class Generator(nn.Module):
    """The critic mirrored: z -> Linear -> (2F, T/4) -> LeakyReLU -> L x [nearest x2 upsample -> Conv1d -> LeakyReLU],
    channels F, N -> sigmoid: each (neuron, bin)'s spike probability. Resize-convolutions, not transposed ones, and a
    LeakyReLU before the sigmoid (probabilities near 0 need 5x more negative inputs), as in the repo."""

    def __init__(self, N, T, features, L=2, k=5, z_dim=128):
        super().__init__()
        ch = [features * 2 ** l for l in range(L - 1, -1, -1)] + [N]       # 2F, F, N
        self.fc, self.T0 = nn.Linear(z_dim, ch[0] * (T >> L)), T >> L
        self.convs = nn.ModuleList(nn.Conv1d(ch[l], ch[l + 1], k, padding=k // 2) for l in range(L))

    def forward(self, z):                                                   # (B, Z) -> (B, N, T)
        h = F.leaky_relu(self.fc(z).view(len(z), -1, self.T0), 0.2)         # (B, 2F * T/4) -> (B, 2F, T/4)
        for conv in self.convs:
            h = F.interpolate(h, scale_factor=2, mode="nearest")            # (B, C, 2 T_l): bins duplicated
            h = F.leaky_relu(conv(h), 0.2)                                  # (B, C_next, 2 T_l)
        return torch.sigmoid(h)


def init_weights(net):
    """Every weight ~ U(-0.02 sqrt 3, +0.02 sqrt 3) (std 0.02), every bias 0, as in the repo."""
    for m in (m for m in net.modules() if isinstance(m, (nn.Conv1d, nn.Linear))):
        nn.init.uniform_(m.weight, -0.02 * math.sqrt(3), 0.02 * math.sqrt(3))
        nn.init.zeros_(m.bias)
    return net


# ---- Objective: WGAN-GP (Gulrajani et al. 2017, Alg. 1) ------------------------------------------------------------
def gradient_penalty(D, x, x_fake, alpha=None):
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = x + alpha (x_fake - x), alpha ~ U(0,1) per sample; the norm is
    taken over all non-batch dims (the whole N x T sample), not per neuron or per bin."""
    alpha = torch.rand(len(x), 1, 1).to(x.device) if alpha is None else alpha   # (B, 1, 1), broadcast over N, T
    # x_hat = x + alpha (x_fake - x)
    x_hat = (x + alpha * (x_fake - x)).requires_grad_(True)
    g, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)     # (B, N, T)
    # GP = E[(||g||_2 - 1)^2]
    return ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()                    # (B, N*T) -> (B,) -> scalar


def critic_loss(D, x, x_fake, lambd=10.0):
    """The fakes are the continuous sigmoid outputs: binarising them would cut the gradient, so the critic compares
    binary reals with continuous fakes and pushes the generator to saturate (intended)."""
    d_real, d_fake = D(torch.cat([x, x_fake])).chunk(2)                    # one pass over (2B, N, T) -> 2 x (B,)
    # L_D = E[D(x_fake)] - E[D(x)] + lambda GP
    return d_fake.mean() - d_real.mean() + lambd * gradient_penalty(D, x, x_fake)


# ---- Training: Alg. 1 with the repo's settings (main_conv.py) ------------------------------------------------------
def real_batches(data, B):
    """Endless minibatches (B, N, T) float of the training set, reshuffled every epoch.
    NOTE (deviation): the repo reads batches in a fixed order; we reshuffle every epoch."""
    while True:
        shuffled = data[torch.randperm(len(data)).to(data.device)]         # one gather per epoch
        for i in range(0, len(data) - B + 1, B):
            yield shuffled[i:i + B].float()


def train(cfg, G, D, data):
    """Alg. 1: per generator iteration, critic_iters critic steps on fresh real and fake batches, then one generator
    step; Adam (0, 0.9); G and D trained in place. Every eval_every iterations: the losses, the lag-1 ratio of 2048
    fresh samples, the critic's Wasserstein estimate E[D(x)] - E[D(G(z))] on 1024 training and 1024 held-out
    samples (a gap: the critic overfits; the repo's check) -> that history.
    NOTE (choice): the z of an iteration's critic steps are drawn at once, before its real batches and alphas: G is
    fixed during these steps, so one generator pass makes all their fakes (the same distribution)."""
    G.to(cfg.device), D.to(cfg.device)
    opt_G, opt_D = (torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.0, 0.9)) for net in (G, D))
    batches = real_batches(torch.as_tensor(data["train"], dtype=torch.uint8, device=cfg.device), cfg.batch)  # compact
    real = [torch.as_tensor(data[k][:1024], dtype=torch.float32, device=cfg.device) for k in ("train", "test")]
    history, progress, gen, B = [], Progress("train", cfg.iters), torch.Generator().manual_seed(cfg.seed + 1), cfg.batch
    for it in range(1, cfg.iters + 1):
        for group in opt_G.param_groups + opt_D.param_groups:
            # lr_t = lr (1 - t / iters), t = it - 1, or constant
            group["lr"] = cfg.lr * (1 - (it - 1) / cfg.iters) if cfg.lr_decay else cfg.lr
        # NOTE (choice): 5 critic steps, then 1 generator step. The repo runs the generator step first and skips it
        # on iteration 0: the same sequence, shifted by one step.
        with torch.no_grad():
            fakes = G(torch.randn(cfg.critic_iters * B, G.fc.in_features).to(cfg.device)).split(B)  # n_critic (B, N, T)
        for x_fake in fakes:
            loss_D = critic_loss(D, next(batches), x_fake, cfg.lambd)
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()
        D.requires_grad_(False)                         # the generator step needs no gradient of D's weights
        # L_G = -E[D(G(z))]
        loss_G = -D(G(torch.randn(B, G.fc.in_features).to(cfg.device))).mean()
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        D.requires_grad_(True)
        loss_D, loss_G = loss_D.item(), loss_G.item()
        check(math.isfinite(loss_D + loss_G), f"Spike-GAN: the training loss became {loss_D} (critic), {loss_G} (G) at "
              f"iteration {it}; likely cause: a learning rate too high (try a smaller --lr)", FloatingPointError)
        if it % cfg.eval_every == 0 or it == cfg.iters:
            p, x = sample(G, 2048, gen)                                    # (2048, N, T) probabilities, spikes
            train_w, dev_w = (D(r).mean().item() - D(p[:1024]).mean().item() for r in real)
            history.append(dict(iter=it, loss_D=loss_D, loss_G=loss_G, lag1_ratio=float(spike_stats(x)["lag1_ratio"]),
                                train_w=train_w, dev_w=dev_w))
        progress(it, loss_D=loss_D, **({"lag1_ratio": history[-1]["lag1_ratio"]} if history else {}))
    return history


# ---- Sampling and evaluation: the repo's statistics (tflib/analysis.py) on binary (S, N, T) arrays ----------------
@torch.no_grad()
def sample(G, n, gen):
    """n generator outputs p (spike probabilities), z drawn on the CPU from `gen`, and Bernoulli spikes: x = 1 iff
    p > u, u ~ U(0,1) per entry (not a 0.5 threshold; evaluation only) -> p (n, N, T) on G's device, x bool numpy."""
    p = G(torch.randn(n, G.fc.in_features, generator=gen).to(G.fc.weight.device))     # z: (n, Z)
    return p, (p > torch.rand(p.shape, generator=gen).to(p.device)).cpu().numpy()


def spike_stats(x, max_lag=10):
    """The repo's statistics, plus the refractory ratio P(spike t+1 | spike t) / P(spike) = acg[+1] / mean(x):
    mean spike count per neuron; covariances of the samples laid end to end (off-diagonal and variances);
    P(k neurons fire in a bin); within-sample auto-correlogram; PSTH (the average time course, per neuron and bin);
    lag-1 cross-covariance (whose end-to-end concatenation includes artificial sample-boundary pairs, as in the
    repo, for every model alike)."""
    x = x.astype(np.float64)
    S, N, T = x.shape
    xs = x.transpose(1, 0, 2).reshape(N, S * T)                            # (N, S*T) samples laid end to end
    cov, eye = np.cov(xs), np.eye(N, dtype=bool)                           # (N, N), ddof 1
    # auto-correlogram within samples: c_l = sum_{s,n,t} x(t) x(t+l) / sum x = P(spike at t+l | spike at t)
    c = np.array([(x[:, :, :T - l] * x[:, :, l:]).sum() for l in range(1, min(max_lag, T - 1) + 1)]) / x.sum()
    K = x.sum(1).astype(int).ravel()                                       # (S*T,) population count per bin
    return dict(mean=x.sum(2).mean(0), cov=cov[~eye], var=cov[eye], k_probs=np.bincount(K, minlength=N + 1) / K.size,
                acg=np.concatenate([c[::-1], [0.0], c]), psth=x.mean(0).ravel(), lag1_ratio=c[0] / x.mean(),
                lag_cov=np.cov(xs[:, :-1], xs[:, 1:])[:N, N:].ravel())   # (N, N): cov(x_i(t), x_j(t+1))


def compare(st, ref):
    """Pearson r (nan if either is constant) and unnormalised L1 error (the repo's error sums) of every statistic
    against a reference set."""
    out = {"lag1_ratio": float(st["lag1_ratio"])}
    for k in ("mean", "cov", "var", "k_probs", "acg", "psth", "lag_cov"):
        r = np.corrcoef(st[k], ref[k])[0, 1] if st[k].std() > 0 and ref[k].std() > 0 else np.nan
        out[f"{k}_r"], out[f"{k}_l1"] = float(r), float(np.abs(st[k] - ref[k]).sum())
    return out


def memorisation(x, train, n_near=512):
    """The Hamming distance of (up to n_near) samples to their nearest training sample: its mean (Fig S5), and the
    fraction at distance 0, i.e. copies of a training sample (Fig S1)."""
    q = torch.as_tensor(x[:n_near].reshape(min(n_near, len(x)), -1), dtype=torch.float32)   # (n, N*T)
    # Hamming(a, b) = |a| + |b| - 2 a.b, the minimum over chunks t (<= 8192, N*T) of the training set
    best = torch.stack([(q.sum(1, keepdim=True) + t.sum(1) - 2 * q @ t.T).min(1).values for t in (
        c.float() for c in torch.as_tensor(train.reshape(len(train), -1)).split(8192))]).min(0).values
    return dict(memorised_frac=float((best == 0).float().mean()), nearest_hamming=float(best.mean()))


# ---- Baselines (Fig 2 / S6): models fitted to the training set -----------------------------------------------------
def Phi2(a, b, rho):
    """Bivariate normal CDF P(u < a, v < b; corr rho) by Plackett's identity,
    Phi(a) Phi(b) + int_0^rho phi2(a, b; r) dr, with 40-point Gauss-Legendre quadrature on [0, rho]."""
    u, w = (torch.tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(40))   # nodes on [-1, 1]
    r = rho[..., None] * (u + 1) / 2                                       # (..., 40) nodes on [0, rho]
    a_, b_ = a[..., None], b[..., None]
    phi2 = torch.exp(-(a_ ** 2 - 2 * r * a_ * b_ + b_ ** 2) / (2 * (1 - r ** 2))) / (2 * math.pi * (1 - r ** 2).sqrt())
    return torch.special.ndtr(a) * torch.special.ndtr(b) + rho / 2 * (phi2 * w).sum(-1)


def fit_dg(x, temporal=True, steps=60):
    """The dichotomized Gaussian x = 1[u > 0], u ~ N(gamma, Lambda), diag Lambda = 1, stationary in time, by moment
    matching: gamma_n = Phi^-1(p_n); rho_ij(tau) solves Phi2(gamma_i, gamma_j; rho) = E[x_i(t) x_j(t + tau)] by
    bisection (Phi2 increases with rho), for every lag tau (Lyamzin et al.'s spatio-temporal DG) or, temporal=False,
    for tau = 0 alone, rho(tau > 0) = 0 (Macke et al.'s spatial DG: bins independent). Lambda is the block-Toeplitz
    (NT x NT) matrix of rho, made positive semi-definite by clipping eigenvalues at 1e-6 and rescaled to unit
    diagonal. Returns (gamma (N,), A (NT, NT)), Lambda = A A^T."""
    X = torch.as_tensor(x, dtype=torch.float64)
    S, N, T = X.shape
    gamma = torch.special.ndtri(X.mean((0, 2)).clamp(1e-4, 1 - 1e-4))     # (N,)
    M = torch.stack([torch.einsum("sit,sjt->ij", X[:, :, :T - tau], X[:, :, tau:]) / (S * (T - tau))
                     for tau in range(T if temporal else 1)], -1)          # (N, N, lags) second moments per lag
    lo, hi = torch.full_like(M, -0.999), torch.full_like(M, 0.999)
    for _ in range(steps):
        mid = (lo + hi) / 2
        low = Phi2(gamma[:, None, None], gamma[None, :, None], mid) < M     # gamma_i, gamma_j broadcast to (N, N, lags)
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    rho = F.pad((lo + hi) / 2, (0, T - M.shape[-1]))                       # (N, N, T): 0 beyond the fitted lags
    rho[range(N), range(N), 0] = 1.0
    tau = torch.arange(T)[None, :] - torch.arange(T)[:, None]             # (T, T): t' - t
    Lam = torch.where(tau >= 0, rho[:, :, tau.abs()], rho.transpose(0, 1)[:, :, tau.abs()])  # (N, N, T, T)
    Lam = Lam.permute(0, 2, 1, 3).reshape(N * T, N * T)                    # neuron-major index n*T + t
    eigval, V = torch.linalg.eigh(Lam)
    # NOTE (choice): we sample with this eigen square root rather than a Cholesky factor (same distribution).
    A = V * eigval.clamp(min=1e-6).sqrt()                                  # clipped Lambda = A A^T
    return gamma, A / (A ** 2).sum(1, keepdim=True).sqrt()                 # rows rescaled: unit diagonal


def sample_dg(gamma, A, n, gen):
    """x = 1[gamma + A eps > 0], eps ~ N(0, I), as (n, N, T)."""
    u = gamma.repeat_interleave(len(A) // len(gamma)) + torch.randn(n, len(A), generator=gen, dtype=torch.float64) @ A.T
    return (u > 0).reshape(n, len(gamma), -1).cpu().numpy()                 # (n, N*T) -> (n, N, T)


def baselines(cfg, train):
    """n_gen samples (S, N, T) of each comparison model fitted to the training set: (a) independent Bernoulli neurons
    and (b) the spatial DG (Fig S6) match one bin's pattern and cannot make a refractory dip; (c) the spatio-temporal
    DG knows every lagged covariance: a moment-matching upper bound, not one of the paper's baselines."""
    gen, p = torch.Generator().manual_seed(cfg.seed + 3), torch.as_tensor(train.mean((0, 2)))   # p: (N,)
    return {"independent": (torch.rand(cfg.n_gen, *train.shape[1:], generator=gen, dtype=torch.float64)
                            < p[:, None]).cpu().numpy(),
            "spatial DG": sample_dg(*fit_dg(train, temporal=False), cfg.n_gen, gen),
            "spatiotemporal DG": sample_dg(*fit_dg(train), cfg.n_gen, gen)}


def evaluate(cfg, data, G, D, history):
    """Fig 2 / S6: n_gen samples of Spike-GAN, of each baseline and of the training set ('real-vs-real': the floor),
    scored against the held-out set ('real') and for memorisation -> (metrics, files).
    NOTE (deviation): scored against held-out data; the repo's analysis.py scores against the training set."""
    p, x = sample(G, cfg.n_gen, torch.Generator().manual_seed(cfg.seed + 2))                 # (n_gen, N, T) each
    sets = {"real": data["test"], "Spike-GAN": x, **baselines(cfg, data["train"]),
            "real-vs-real": data["train"][data["rng"].permutation(len(data["train"]))[:cfg.n_gen]]}
    st = {name: spike_stats(x) for name, x in sets.items()}
    metrics = dict(iterations=cfg.iters, history=history, data=dict(shape=list(data["train"].shape),
                   spike_prob=float(data["test"].mean()), lag1_ratio=float(st["real"]["lag1_ratio"])))
    models = list(sets)[1:]                                              # real-vs-real: the held-out set memorised?
    metrics.update({m: {**compare(st[m], st["real"]), **memorisation(sets["real" if m == "real-vs-real" else m],
                                                                     data["train"])} for m in models})
    for k in ("vs held-out data", "mean_r", "cov_r", "k_probs_l1", "acg_l1", "lag1_ratio", "lag_cov_r", "lag_cov_l1",
              "psth_r", "psth_l1", "nearest_hamming"):                  # the table: a header row, one per statistic
        print(f"  {k:<16}" + "".join(f"{format(metrics[m][k], '.4g') if k in metrics[m] else m:>18}" for m in models))
    samples = {k.replace("Spike-GAN", "generated").replace(" ", "_").lower(): v for k, v in list(sets.items())[:5]}
    return metrics, {"figures/statistics.png": figure_uniform(st), "generator.pt": G.state_dict(),
                     "critic.pt": D.state_dict(), "samples.npz": dict(samples, generated_probs=p.cpu().numpy())}


def run_uniform(cfg, data):
    """Fig 2: Spike-GAN (G and D initialised on the CPU, the generator's draws first) trained, then its samples, the
    baselines' and the real-vs-real floor scored."""
    N, T = data["train"].shape[1:]
    G, D = init_weights(Generator(N, T, cfg.features)), init_weights(Critic(N, T, cfg.features))
    return evaluate(cfg, data, G, D, train(cfg, G, D, data))


EXPERIMENTS = {"uniform": (make_uniform_data, run_uniform)}


# ==== Part II, Fig 4: sequential packets and the critic's importance maps (spike_relevance_analysis.py) =============
DEMOS["packets"] = dict(
    rate=0.1,              # Fig 4: f 0.1
    group=8,               # Fig 4: packets of 8 neurons
    packet_prob=0.1,       # packets demo: packet onset probability per bin
    importance=512,        # packets demo: samples whose importance maps are taken (the Fig 4 test set)
)


def make_packets_data(cfg):
    """The Fig 4 data (repo spike_train_packets, one mode): f_n ~ U[0.5 f, 1.5 f] per neuron, a refractory Bernoulli
    background, and packets: at each onset t0 neuron k of a group fires at t0 + k. Onsets ~ Bernoulli(p_on), then the
    repo's hard refractory rule: after the same 2T margin, keep an onset iff it comes more than `group` bins after the
    last kept one. A neuron permutation hides the groups. Training and held-out sets, and the importance-map test set
    (repo spike_train_transient_packets): group 0 only, p_on 0.2, onsets in [T/4, T/2] (paper: [16, 32] at T 64)."""
    check(cfg.packet_prob < 1, f"--packet-prob must be < 1, got {cfg.packet_prob}")
    rng, N, T, s = np.random.default_rng(cfg.seed), cfg.neurons, cfg.window, cfg.group
    f, perm = rng.uniform(0.5 * cfg.rate, 1.5 * cfg.rate, N), rng.permutation(N)

    def simulate(S, G, p_on, first, last_onset):                            # G groups, onsets in [first, last_onset]
        fs = np.tile(f, S)
        x = refractory_soft(rng.random((S * N, T)) < fs[:, None], fs, cfg.refr, rng).reshape(S, N, T)  # background
        on = np.concatenate([rng.random((S * G, 2 * T)) < 1 - np.exp(-p_on), rng.random((S * G, T)) < p_on], 1)
        last = np.full(S * G, -10 ** 9)
        for t in range(3 * T):                                                # last: the last kept onset
            on[:, t] &= t - last > s
            last = np.where(on[:, t], t, last)
        on = on[:, 2 * T:].reshape(S, G, T)                                   # (S G, 3T) -> (S, G, T)
        on[:, :, :first] = on[:, :, last_onset + 1:] = False                # the packet must fit: onsets <= T - s - 1
        for k in range(s):                                                    # neuron g*s+k fires at t0 + k, OR-ed
            x[:, k:G * s:s, k:] |= on[:, :, :T - k]                           # on the background
        return x[:, perm]
    x = simulate(cfg.n_train + cfg.n_test, N // s, cfg.packet_prob, 0, T - s - 1)
    return dict(train=x[:cfg.n_train], test=x[cfg.n_train:], fig4=simulate(cfg.importance, 1, 0.2, T // 4, T // 2),
                packet=np.isin(np.arange(N), np.argsort(perm)[:s]), rng=rng)   # packet: where group 0's neurons went


@torch.no_grad()
def importance_map(D, x, P=8, reps=5, gen=None):
    """I (S, N, T). For every window [tau, tau + P) (step 1; Fig 4: P 8, 5 reps) and neuron n, shuffle n's bins inside
    the window (its spike count is kept, its timing moved) and take g = mean over reps of |D(x) - D(x')|. A spike's
    importance is the mean g over the windows containing it; bins without a spike get 0."""
    S, N, T = x.shape
    n, s0, total, count = torch.arange(N), D(x), torch.zeros_like(x), torch.zeros(T, device=x.device)   # s0: (S,)
    for tau in range(T - P + 1):
        for _ in range(reps):
            xp = x[:, None].repeat(1, N, 1, 1)                             # (S, N copies, N, T): copy n shuffles n
            order = torch.rand(S, N, P, generator=gen).to(x.device).argsort(-1)
            xp[:, n, n, tau:tau + P] = xp[:, n, n, tau:tau + P].gather(-1, order)
            # g_{tau,n} = mean over reps of |D(x') - D(x)|, added to every bin t of the window
            total[:, :, tau:tau + P] += (D(xp.view(S * N, N, T)).view(S, N, 1) - s0[:, None, None]).abs() / reps
        count[tau:tau + P] += 1                                            # (S*N,) -> (S, N, 1) above
    return (x * total / count).cpu().numpy()                               # I = x * mean g over covering windows


def run_packets(cfg, data):
    """Fig 4: Part I's pipeline on the packets data, then the critic's importance maps of the Fig 4 test set (with
    --data: of held-out samples), and how much more importance the packet region (its neurons, onsets in [T/4, T/2]
    plus the packet's length) gets than the rest (Fig 4D/E: the time and neuron profiles of the mean map)."""
    metrics, files = run_uniform(cfg, data)
    x, (S, N, T) = data.get("fig4", data["test"][:cfg.importance]), data["train"].shape
    D = Critic(N, T, cfg.features).to(cfg.device)
    D.load_state_dict(files["critic.pt"])                                 # the trained critic
    I = importance_map(D, torch.as_tensor(x, dtype=torch.float32, device=cfg.device),
                       gen=torch.Generator().manual_seed(cfg.seed + 4)).mean(0)   # (S, N, T) -> (N, T) mean map
    packet = data.get("packet", np.zeros(N, bool))
    inside = packet[:, None] & (np.arange(T) >= T // 4) & (np.arange(T) < T // 2 + cfg.group)      # (N, T)
    metrics["importance"] = dict(inside_over_outside=float(I[inside].mean() / I[~inside].mean()) if inside.any()
                                 else None, time_profile=I.mean(0).tolist(), neuron_profile=I.mean(1).tolist())
    print(f"  importance inside / outside the packets {metrics['importance']['inside_over_outside']}")
    return metrics, {"figures/importance.png": figure_importance(I, packet), **files}


EXPERIMENTS["packets"] = (make_packets_data, run_packets)


# ==== Part III: figures (matplotlib imported inside; Figure objects, no pyplot) and own data ==========================
def figure_uniform(st):
    """statistics.png (Fig 2): each statistic of every model (y) against the held-out data (x); the auto-correlogram."""
    from matplotlib.figure import Figure
    fig, models = Figure(figsize=(18, 3.5)), list(st)[1:-1]
    for i, (k, title) in enumerate([("mean", "spikes / sample"), ("cov", "covariance (off-diagonal)"),
                                    ("k_probs", "P(k synchronous spikes)"), ("lag_cov", "lag-1 cross-covariance"),
                                    ("psth", "average time course (neuron, bin)")]):
        ax = fig.add_subplot(1, 6, i + 1, title=title, xlabel="data (held-out)")
        for name in models:
            ax.scatter(st["real"][k], st[name][k], s=6, alpha=0.6, label=name)
        ax.plot(*[[min(st["real"][k].min(), 0), st["real"][k].max()]] * 2, "k--", lw=0.8)
    ax = fig.add_subplot(1, 6, 6, title="P(spike at t+l | spike at t)", xlabel="lag l (bins)")
    for name, acg in ((name, st[name]["acg"]) for name in ("real", *models)):    # lags -L..L
        ax.plot(np.arange(len(acg)) - len(acg) // 2, acg, color="k" if name == "real" else None, marker=".", label=name)
    ax.legend(fontsize=7)
    return fig


def figure_importance(I, packet):
    """importance.png (Fig 4): the mean importance map I (N, T), its time and neuron profiles (red: packet neurons)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 3))
    fig.add_subplot(131, title="mean importance (neuron x bin)", xlabel="bin").imshow(I, aspect="auto")
    fig.add_subplot(132, title="time profile", xlabel="bin").plot(I.mean(0))
    ax = fig.add_subplot(133, title="neuron profile", xlabel="neuron")
    ax.bar(range(len(I)), I.mean(1), color=np.where(packet, "C3", "C0"))
    return fig


def load_data(cfg):
    """--data (key 'spikes'): binary trials (trials, N, T), a random 20% held out, or a long binary series (time, N),
    its last 20% held out, each part cut into windows of --window bins. Anything Spike-GAN cannot train on is a
    ValueError naming the file."""
    arrays, want = load_arrays(cfg.data), f"--data {cfg.data}: expected"
    x, W, rng = arrays.get("spikes", np.zeros(0)), cfg.window, np.random.default_rng(cfg.seed)
    check(x.ndim in (2, 3) and x.size > 0 and np.isin(x, (0, 1)).all(), f"{want} a non-empty binary array 'spikes' "
          "(trials, neurons, bins) or (time, neurons) (binarise counts first, e.g. counts > 0), found the arrays "
          f"{sorted(arrays)}, 'spikes' of shape {x.shape} with the values {np.unique(x)[:8]}")
    if x.ndim == 3:                                                         # trials: a random 20% held out
        train, test = np.split(x[rng.permutation(len(x))].astype(bool), [len(x) - len(x) // 5])
    else:                                                                   # a series: windows (S, W, N) -> (S, N, W)
        train, test = (part[np.arange(0, len(part) - W + 1, W)[:, None] + np.arange(W)].transpose(0, 2, 1)
                       .astype(bool) for part in np.split(x, [int(len(x) * 0.8)]))
    check(train.shape[2] % 4 == 0 and len(train) >= 2 * cfg.batch and len(test) >= 16 and train.any(),
          f"{want} bins per sample a multiple of 4 (2^L, L = 2 layers), at least {2 * cfg.batch} training and "
          f"16 held-out samples, and spikes in the training part; found {train.shape[2]} bins, {len(train)} and "
          f"{len(test)} samples, {int(train.sum())} spikes (a smaller --window, more data, time first?)")
    return dict(train=train, test=test, params=None, rng=rng)


# =====================================================================================================================
# Part III, plumbing: the same block in the three files (checks, CLI, seed, device, --data files, outputs, main)
# =====================================================================================================================
def check(ok, message, error=ValueError):
    """The one validator: raise error(message) unless ok (ValueError: bad input; FloatingPointError: divergence)."""
    if not ok:
        raise error(message)


class Progress:
    """One live line per training loop: step, values, elapsed seconds and the time left."""

    def __init__(self, name, total):
        self.name, self.total, self.t0 = name, total, time.time()

    def __call__(self, step, **values):
        if step % max(1, self.total // 20) == 0 or step == self.total:
            s, vals = time.time() - self.t0, " ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"\r  [{self.name}] step {step}/{self.total} {vals} | {s:.0f} s, {s / step * (self.total - step):.0f}"
                  " s left", end="\n" if step == self.total else "", flush=True)


def parse_args(argv=None):
    """Flags -> Config: defaults, then the demo's DEMOS entry (which may add fields of its own), one preset, the flags
    given. A flag's help is the comment beside its field; a bad value exits with status 2, naming the flag."""
    core = {f.name: f.default for f in dataclasses.fields(Config) if f.name != "preset"}
    every = {**core, **{k: v for entry in DEMOS.values() for k, v in entry.items() if k not in core}}
    notes = dict(reversed(re.findall(r"^ +(\w+)(?:: \w+ = |=)[^#\n]*# *(.*)$", open(__file__).read(), re.M)))
    choices = dict(demo=list(DEMOS), device=["auto", "cpu", "cuda", "mps"], **CHOICES)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in every.items():
        kind = dict(type=int, choices=(0, 1), nargs="?", const=1) if type(v) is bool else dict(type=type(v))
        p.add_argument("--" + k.replace("_", "-"), help=f"{notes.get(k, '')} (default {v!r})",
                       **{**kind, **({"choices": choices[k]} if k in choices else {})})
    group = p.add_mutually_exclusive_group()
    for name, (_, text) in PRESETS.items():
        group.add_argument("--" + name, dest="preset", action="store_const", const=name, help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    fields = {**core, **DEMOS[given.get("demo", core["demo"])]}
    values = {**fields, **PRESETS.get(given.get("preset"), ({},))[0], **given}
    stray = sorted(k.replace("_", "-") for k in set(given) - {*fields, "preset"})
    try:
        check(not stray, f"--{stray[0] if stray else ''} is not a setting of --demo {fields['demo']}")
        cfg = Config(preset=given.get("preset", ""), **{k: type(every[k])(values[k]) for k in core})
        vars(cfg).update({k: type(every[k])(values[k]) for k in fields if k not in core})
        for k, v in vars(cfg).items():                    # every number > 0, or >= 0 where ZERO_OK allows it
            check(type(v) not in (int, float) or v > 0 or v == 0 and k in ZERO_OK,
                  f"--{k.replace('_', '-')} must be {'>= 0' if k in ZERO_OK else '> 0'}, got {v}")
        check_config(cfg)
    except ValueError as e:
        p.error(str(e))
    cfg.out = cfg.out or os.path.join("runs", f"{os.path.basename(__file__)[:-3]}-{'data' if cfg.data else cfg.demo}")
    return cfg


def set_seed(seed):
    """Seed python, numpy and torch's CPU generator (every random draw is made on the CPU, then moved)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name="auto"):
    """'auto' -> cuda, else mps, else cpu (every accelerator query gated) -> the device's name."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    auto = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    check(name in ("auto", "cpu", auto), f"--device {name}: expected an available device, found none of that kind")
    return auto if name == "auto" else name


def load_arrays(path):
    """--data: a .npy file (its array named 'spikes') or a .npz archive of numeric arrays, never unpickled."""
    want = f"--data {path}: expected a .npy file or a .npz archive of numeric arrays (np.save / np.savez), found"
    check(os.path.isfile(path) and path.endswith((".npy", ".npz")), f"{want} " + (
        "a directory" if os.path.isdir(path) else "no such file" if not os.path.exists(path) else "another extension"))
    try:
        obj = np.load(path, allow_pickle=False)
        arrays = {k: obj[k] for k in obj.files} if path.endswith(".npz") else {"spikes": obj}
    except Exception as e:
        raise ValueError(f"{want} an unreadable file ({type(e).__name__}: {e})") from None
    bad = [f"{k!r} of dtype {a.dtype}" for k, a in arrays.items() if a.dtype.kind not in "biuf"]
    check(not bad, f"{want} {', '.join(bad)}")
    return arrays


def write_outputs(out, files):
    """{path under out: content} -> files, in order, each written to a temporary file and renamed when complete:
    a dict of arrays -> .npz, a state dict -> .pt, a matplotlib Figure -> .png, anything else -> .json."""
    for name, obj in files.items():
        path = os.path.join(out, name)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                if name.endswith(".npz"):
                    np.savez_compressed(f, **obj)
                elif name.endswith(".pt"):
                    torch.save({k: v.cpu() for k, v in obj.items()}, f)
                elif name.endswith(".png"):
                    obj.tight_layout()
                    obj.savefig(f, format="png", dpi=90)
                else:
                    f.write(json.dumps(obj, indent=2, sort_keys=True).encode())
            os.replace(tmp, path)
        except OSError as e:
            raise ValueError(f"--out {out}: expected a writable folder, found {e.strerror or e}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def main(argv=None):
    """Flags -> seed -> the experiment's data (bad data stops here, before any output) -> run -> outputs, metrics.json
    last (an earlier run's is removed first). Returns the metrics."""
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    set_seed(cfg.seed)
    cfg.device, (make_data, run), t0 = get_device(cfg.device), EXPERIMENTS[cfg.demo], time.time()
    data = load_data(cfg) if cfg.data else make_data(cfg)
    write_outputs(cfg.out, {"config.json": dict(config=vars(cfg), torch=torch.__version__, numpy=np.__version__,
                                                python=platform.python_version(), threads=torch.get_num_threads())})
    if os.path.exists(os.path.join(cfg.out, "metrics.json")):
        os.remove(os.path.join(cfg.out, "metrics.json"))
    metrics, files = run(cfg, data)
    timing = {**files.pop("timing.json", {}), "total": round(time.time() - t0, 2)}   # a run may time its stages
    write_outputs(cfg.out, {**files, "timing.json": timing, "metrics.json": metrics})
    print(f"outputs in {cfg.out} ({time.time() - t0:.0f} s)")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:                  # bad input or a diverged run: one line, status 1
        sys.exit(f"error: {e}")
