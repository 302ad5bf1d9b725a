"""Spike-GAN: minimal single-file reference for Molano-Mazon, Onken, Piasini & Panzeri, "Synthesizing realistic
neural population activity patterns using Generative Adversarial Networks", ICLR 2018 (arXiv:1803.00338).
Pipeline: binary spike patterns x in {0,1}^(N x T) -> WGAN-GP with a critic and a generator of 1-D convolutions over
time, neurons as channels (the paper's "semi-convolutional" design) -> the generator's spike probabilities,
Bernoulli-sampled -> the paper's statistics against held-out data, next to a baseline and the real-vs-real floor.
Paper / official code (github.com/manuelmolano/Spike-GAN) -> code:
  I   Fig 2 data           refractory_soft, make_uniform                         (tflib/sim_pop_activity.py)
      Fig 1 model          Critic, Generator, init_weights                       (model_conv.py)
      WGAN-GP, training    gradient_penalty, critic_loss, generator_loss, train  (Gulrajani et al. 2017, Alg. 1)
      Fig 2/S5 statistics  sample, binarize, spike_stats, compare, memorisation  (tflib/analysis.py)
  II  Fig 4 packets        make_packets, importance_map, packet_template   (tflib/spike_relevance_analysis.py)
      DG baseline, Fig 3   Phi2, fit_dg, sample_dg   (Macke et al. 2009; spatio-temporal: Lyamzin et al. 2010)
  III figures, own data (load_data), the command line
Run (a 2-core CPU):
  python spikegan_minimal.py                  # ~5 min: the Fig 2 data, 3000 generator iterations
  python spikegan_minimal.py --long           # ~19 min: 15000 generator iterations
  python spikegan_minimal.py --demo packets   # ~8 min: importance maps (Fig 4)
  python spikegan_minimal.py --quick          # ~10 s smoke test (numbers meaningless)
  python spikegan_minimal.py --paper          # the paper's Fig 2 job (T 128, F 128, 300000 iterations), for a GPU
  python spikegan_minimal.py --data my.npz    # own binary spikes: (trials, N, T), or a long (time, N) series
Left out: the MLP-GAN comparison (Fig 2), k-pairwise MaxEnt samples (Fig 3), the pattern-probability check (Fig S1).
Shapes: S samples, B batch, N neurons, T time bins, C channels, F width multiplier, Z = 128 latent dims.
Markers: "NOTE (deviation)": where this file differs from the paper or the official code, and why; "NOTE (choice)":
a detail both leave open. Every random draw is made on the CPU, then moved: same seed and --threads, same numbers.
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
    # data: the paper's Fig 2 parameters (f 0.25, c 0.3, groups of 2, refractory 2, 2^13 training samples)
    # NOTE (deviation): T 32 bins instead of 128 (CPU size; --paper: 128). The refractory statistics of the data
    # depend on T: the dip in P(spike t+1 | spike t) is deeper in longer samples.
    neurons: int = 16          # N neurons
    window: int = 32           # T bins per sample; also the window cut from a long --data series
    stride: int = 0            # stride between the windows of a long --data series; 0 -> window (no overlap)
    n_train: int = 8192        # training samples (paper 2^13)
    n_test: int = 4096         # held-out samples (the repo's dev set has 2048; more lowers the noise floor)
    rate: float = 0.25         # f: spike probability per bin before the refractory rule
    corr: float = 0.3          # c: within-group correlation parameter (copy probability q = sqrt(c))
    group: int = 2             # neurons per correlated group (per packet in the packets demo)
    refr: float = 2.0          # rho: soft refractory period (bins)
    # model. NOTE (deviation): CPU widths; the paper uses F 128 for both nets (--paper). The critic's
    # double-backward gradient penalty runs critic_iters times per iteration, so the critic is the narrower one.
    d_features: int = 16       # critic F: channels 2F, 4F (paper Fig 1: F 128 -> 256 and 512 channels)
    g_features: int = 48       # generator F: channels 4F, 2F, N
    layers: int = 2            # L conv layers in critic and generator
    kernel: int = 5            # kernel width k (odd)
    z_dim: int = 128           # Z latent dims (fixed at 128 in the repo)
    # training: WGAN-GP with lambda 10, 5 critic steps per generator step, Adam betas (0, 0.9), batch 64
    # NOTE (deviation): lr 4e-3 decayed linearly to 0 (lr_at) instead of the paper's constant 1e-4: with ~1% of the
    # paper's iterations a constant 1e-4 is too slow; the decay (as in Gulrajani et al.'s CIFAR code) lets the last
    # snapshot settle. --paper: 1e-4, constant.
    iters: int = 3000          # generator iterations (repo default 300000)
    batch: int = 64            # B real and B fake samples per step
    lr: float = 4e-3           # Adam learning rate of both nets
    lr_decay: bool = True      # 1: linear decay to 0 over iters; 0: constant (paper)
    critic_iters: int = 5      # critic steps per generator step
    lambd: float = 10.0        # lambda: gradient-penalty weight
    eval_every: int = 250      # log statistics of fresh samples every this many generator iterations
    n_gen: int = 8192          # generated (and baseline) samples scored against the held-out set (repo: 8192)


DEMOS = {"uniform": {}}
# --paper: the paper's Fig 2 run (with --demo packets --neurons 32 --window 64: the Fig 4 sizes). NOTE (choice): the
# repo's default 300000 iterations (the paper does not state its count), logged every 20000 as main_conv.py does; a
# held-out set of the repo's dev-set size, num_samples / 4.
PRESETS = {
    "quick": (dict(n_train=1024, n_test=512, n_gen=1024, iters=60, d_features=8, g_features=8, eval_every=30,
                   importance=32), "tiny end-to-end smoke test (numbers meaningless)"),
    "long": (dict(iters=15000, eval_every=500), "15000 generator iterations"),
    "paper": (dict(window=128, n_train=8192, n_test=2048, d_features=128, g_features=128, lr=1e-4, lr_decay=False,
                   batch=64, critic_iters=5, iters=300000, eval_every=20000, n_gen=8192),
              "the paper's Fig 2 configuration (T 128, critic 256/512 channels, generator F 128, lr 1e-4 constant, "
              "300000 iterations): a GPU job"),
}
CHOICES = {}
ZERO_OK = ("seed", "threads", "stride", "corr", "lambd")


def check_config(cfg):
    """Spike-GAN's own checks (parse_args has checked that every number is > 0, or >= 0 where ZERO_OK says so)."""
    check(cfg.kernel % 2 == 1, f"--kernel must be odd, got {cfg.kernel}")
    check(cfg.rate <= 2 / 3 and cfg.corr <= 2 / 3, f"--rate and --corr must be <= 2/3 (they are drawn up to 1.5x), "
          f"got {cfg.rate} and {cfg.corr}")
    check(cfg.data or (cfg.window % 2 ** cfg.layers == 0 and cfg.group <= cfg.neurons and 2 * cfg.group <= cfg.window),
          "--window must be a multiple of 2^layers, --group <= --neurons and 2 * --group <= --window")
    check(getattr(cfg, "packet_prob", 0) < 1, f"--packet-prob must be < 1, got {getattr(cfg, 'packet_prob', 0)}")


# ---- Data: the repo's simulators (tflib/sim_pop_activity.py), vectorised over rows; datasets are (S, N, T) bool ----
def refractory_soft(x, f, rho, rng):
    """The repo's soft refractory rule on rows x (R, T) with per-row rate f (R,). After a 2T-bin margin (each bin a
    spike with prob 1 - e^-f: the rule acts across the sample start), passes flag every inter-spike interval d with
    prob exp(-d / sigma^2), sigma = rho / 1.5, and delete the later spikes of all flagged intervals, until a pass flags
    nothing; redrawn every pass, the suppression at d = 1 (0.57 per pass for rho 2) compounds into a deep dip.
    NOTE (deviation): the repo's first pass deletes the wrong spike (an indexing bug, nearly always inside the
    margin); we apply every pass as intended. The effect on the statistics is negligible."""
    R, T = x.shape
    sigma2 = (rho / 1.5) ** 2
    s = np.concatenate([rng.random((R, 2 * T)) < 1 - np.exp(-f)[:, None], x], axis=1)  # (R, 3T)
    t = np.arange(3 * T)
    rows = np.arange(R)                                           # rows still being processed
    while rows.size:
        r = s[rows]
        last = np.maximum.accumulate(np.where(r, t, -1), axis=1)  # last spike at or before t
        prev = np.concatenate([np.full((rows.size, 1), -1), last[:, :-1]], axis=1)  # last spike before t
        # P(flag the interval d = t - prev) = exp(-d / sigma^2)
        flag = r & (prev >= 0) & (rng.random(r.shape) < np.exp(-(t - prev) / sigma2))
        s[rows] = r & ~flag
        rows = rows[flag.any(1)]                                  # stop after the first clean pass
    return s[:, 2 * T:]


def make_uniform(cfg, S, params, rng):
    """Correlated groups with refractoriness (repo spike_trains_corr, Fig 2 data). For each group of s neurons:
    Bernoulli(f_g) members; a Bernoulli(f_g) reference train made refractory; each member bin copies the reference
    bin (0 or 1) with prob q = sqrt(c_g), so two members correlate at ~c_g; then each member is made refractory."""
    N, T, s, G = cfg.neurons, cfg.window, cfg.group, cfg.neurons // cfg.group
    f = params["f"]
    B = rng.random((S, G, s, T)) < f[:, None, None]                           # members ~ Bernoulli(f_g)
    Rf = np.broadcast_to(f, (S, G)).ravel()
    Ref = refractory_soft(rng.random((S * G, T)) < Rf[:, None], Rf, cfg.refr, rng).reshape(S, G, 1, T)
    M = rng.random((S, G, s, T)) < np.sqrt(params["c"])[:, None, None]        # copy mask, q = sqrt(c_g)
    B = np.where(M, Ref, B)                                                   # (S, G, s, T)
    Bf = np.broadcast_to(f[:, None], (S, G, s)).ravel()
    B = refractory_soft(B.reshape(-1, T), Bf, cfg.refr, rng)                  # (S*G*s, T)
    x = np.zeros((S, N, T), bool)
    x[:, :G * s] = B.reshape(S, G * s, T)                                     # leftover neurons stay silent
    return x[:, params["perm"]]


def make_uniform_data(cfg):
    """The Fig 2 data: f_g, c_g ~ U[0.5 x, 1.5 x] per group and a neuron permutation hiding the groups, then training
    and held-out sets (S, N, T) bool."""
    rng = np.random.default_rng(cfg.seed)
    G = cfg.neurons // cfg.group
    params = dict(f=rng.uniform(0.5 * cfg.rate, 1.5 * cfg.rate, G), c=rng.uniform(0.5 * cfg.corr, 1.5 * cfg.corr, G),
                  perm=rng.permutation(cfg.neurons))
    return dict(train=make_uniform(cfg, cfg.n_train, params, rng), test=make_uniform(cfg, cfg.n_test, params, rng),
                params=params, rng=rng)


# ---- Model (paper Fig 1, model_conv.py): neurons are channels, convolutions run over time -------------------------
class Critic(nn.Module):
    """L x [Conv1d(stride 2, 'same') -> LeakyReLU(0.2)] -> flatten -> Linear -> scalar. No normalisation layers
    (they would couple the samples of a batch and break the per-sample gradient penalty), no output nonlinearity."""

    def __init__(self, N, T, features, L=2, k=5):
        super().__init__()
        ch = [N] + [features * 2 ** l for l in range(1, L + 1)]             # N, 2F, 4F
        # NOTE (choice): padding k//2 gives TF 'SAME' output lengths; TF pads 1 left / 2 right, a 1-bin shift.
        self.convs = nn.ModuleList(nn.Conv1d(ch[l], ch[l + 1], k, stride=2, padding=k // 2) for l in range(L))
        self.out = nn.Linear(ch[-1] * (T >> L), 1)                           # 4F * T/4 = F*T inputs

    def forward(self, x):                                                    # (B, N, T) -> (B,)
        h = x
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)                                   # (B, C_l, T / 2^l)
        return self.out(h.flatten(1)).squeeze(1)                             # (B, 4F * T/4), channel-major


class Generator(nn.Module):
    """The critic run backwards: z -> Linear -> (4F, T/4) -> LeakyReLU -> L x [nearest x2 upsample -> Conv1d ->
    LeakyReLU] -> sigmoid: the spike probability of each (neuron, bin). Resize-convolutions, not transposed ones, and
    the last LeakyReLU before the sigmoid (probabilities near 0 need 5x more negative inputs), as in the repo."""

    def __init__(self, N, T, features, L=2, k=5, z_dim=128):
        super().__init__()
        ch = [features * 2 ** l for l in range(L, 0, -1)] + [N]             # 4F, 2F, N
        self.T0 = T >> L
        self.fc = nn.Linear(z_dim, ch[0] * self.T0)
        self.convs = nn.ModuleList(nn.Conv1d(ch[l], ch[l + 1], k, padding=k // 2) for l in range(L))

    def forward(self, z):                                                    # (B, Z) -> (B, N, T)
        h = F.leaky_relu(self.fc(z).view(len(z), -1, self.T0), 0.2)          # (B, 4F * T/4) -> (B, 4F, T/4)
        for conv in self.convs:
            h = F.interpolate(h, scale_factor=2, mode="nearest")             # (B, C, 2 T_l): bins duplicated
            h = F.leaky_relu(conv(h), 0.2)                                   # (B, C_next, 2 T_l)
        return torch.sigmoid(h)


def init_weights(net):
    """Every weight ~ U(-0.02 sqrt 3, +0.02 sqrt 3) (std 0.02), every bias 0, as in the repo."""
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.uniform_(m.weight, -0.02 * math.sqrt(3), 0.02 * math.sqrt(3))
            nn.init.zeros_(m.bias)
    return net


# ---- Objective: WGAN-GP (Gulrajani et al. 2017, Alg. 1) ------------------------------------------------------------
def gradient_penalty(D, x, x_fake, alpha=None):
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = x + alpha (x_fake - x), alpha ~ U(0,1) per sample; the norm is
    taken over all non-batch dims (the whole N x T sample), not per neuron or per bin."""
    if alpha is None:
        alpha = torch.rand(len(x), 1, 1).to(x.device)                      # (B, 1, 1), broadcast over N, T
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


def generator_loss(D, x_fake):
    # L_G = -E[D(G(z))]
    return -D(x_fake).mean()


# ---- Training: Alg. 1 with the repo's settings (main_conv.py) ------------------------------------------------------
def lr_at(cfg, step):
    """Learning rate of both nets at generator iteration `step` (0-based): linear decay to 0, or constant."""
    # lr_t = lr (1 - t / iters)
    return cfg.lr * (1 - step / cfg.iters) if cfg.lr_decay else cfg.lr


def real_batches(data, B):
    """Endless minibatches (B, N, T) float of the training set, reshuffled every epoch.
    NOTE (deviation): the repo reads batches in a fixed order; we reshuffle every epoch."""
    while True:
        order = torch.randperm(len(data)).to(data.device)
        for i in range(0, len(data) - B + 1, B):
            yield data[order[i:i + B]].float()


def optimiser_step(opt, loss, name, it):
    """Stop at a non-finite loss, else one optimiser step on it."""
    check(math.isfinite(loss.item()), f"Spike-GAN {name}: the training loss became {loss.item()} at step {it}; "
          "likely cause: a learning rate too high for this data (try a smaller --lr), or a degenerate --data file",
          FloatingPointError)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train(cfg, G, D, x_train, monitor=None):
    """Alg. 1: per generator iteration, critic_iters critic steps on fresh real and fake batches, then one generator
    step; Adam (0, 0.9). Trains G and D in place on cfg.device; returns losses and monitor(G, D) every eval_every."""
    G.to(cfg.device)
    D.to(cfg.device)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    batches = real_batches(torch.as_tensor(x_train, dtype=torch.uint8, device=cfg.device), cfg.batch)  # compact
    history, progress = [], Progress("train", cfg.iters)
    if cfg.preset == "paper" and cfg.device == "cpu":
        print(f"WARNING: --paper on a CPU is the paper's full job, {cfg.iters} generator iterations of "
              f"{cfg.critic_iters} critic steps each: weeks; run it on a GPU (--device cuda)", file=sys.stderr)
    for it in range(1, cfg.iters + 1):
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"] = lr_at(cfg, it - 1)
        # NOTE (choice): 5 critic steps, then 1 generator step. The repo runs the generator step first and skips it
        # on iteration 0: the same sequence, shifted by one step.
        for _ in range(cfg.critic_iters):
            x = next(batches)
            with torch.no_grad():
                x_fake = G(torch.randn(cfg.batch, cfg.z_dim).to(cfg.device))
            loss_D = critic_loss(D, x, x_fake, cfg.lambd)
            optimiser_step(opt_D, loss_D, "critic", it)
        loss_G = generator_loss(D, G(torch.randn(cfg.batch, cfg.z_dim).to(cfg.device)))
        optimiser_step(opt_G, loss_G, "generator", it)
        if monitor and (it % cfg.eval_every == 0 or it == cfg.iters):
            history.append(dict(iter=it, loss_D=loss_D.item(), loss_G=loss_G.item(), **monitor(G, D)))
        progress(it, loss_D=loss_D.item(), **({"lag1_ratio": history[-1]["lag1_ratio"]} if history else {}))
    return history


def make_monitor(cfg, data):
    """monitor(G, D): statistics of 2048 fresh binarised samples against the held-out set, and the critic's estimate
    E[D(x)] - E[D(G(z))] on 1024 training and 1024 held-out samples (a gap: the critic overfits; the repo's check)."""
    st_test, gen = spike_stats(data["test"]), torch.Generator().manual_seed(cfg.seed + 1)
    real = {k: torch.as_tensor(data[k][:1024], dtype=torch.float32, device=cfg.device) for k in ("train", "test")}

    @torch.no_grad()
    def monitor(G, D):
        p = sample(G, min(2048, cfg.n_gen), cfg.z_dim, gen)
        c = compare(spike_stats(binarize(p, gen)), st_test)
        d_fake = D(p[:1024]).mean()
        return dict(train_w=(D(real["train"]).mean() - d_fake).item(), dev_w=(D(real["test"]).mean() - d_fake).item(),
                    **{k: c[k] for k in ("lag1_ratio", "mean_r", "mean_l1", "cov_r", "k_probs_l1", "acg_l1")})
    return monitor


def train_spikegan(cfg, data):
    """G and D, initialised on the CPU (the generator's draws first), trained with a monitor -> G, D, history."""
    N, T = data["train"].shape[1:]
    G = init_weights(Generator(N, T, cfg.g_features, cfg.layers, cfg.kernel, cfg.z_dim))
    D = init_weights(Critic(N, T, cfg.d_features, cfg.layers, cfg.kernel))
    return G, D, train(cfg, G, D, data["train"], make_monitor(cfg, data))


# ---- Sampling: generator probabilities, binarised by Bernoulli draws ----------------------------------------------
@torch.no_grad()
def sample(G, n, z_dim, gen, chunk=4096):
    """n generator outputs (spike probabilities), (n, N, T) on G's device, z drawn on the CPU from `gen`."""
    device = next(G.parameters()).device
    return torch.cat([G(torch.randn(min(chunk, n - i), z_dim, generator=gen).to(device))
                      for i in range(0, n, chunk)])


def binarize(p, gen):
    """Spike iff p > u, u ~ U(0,1) per entry: Bernoulli sampling, not a 0.5 threshold (evaluation only)."""
    u = torch.rand(p.shape, generator=gen).to(p.device)                    # (n, N, T)
    return (p > u).cpu().numpy()


# ---- Evaluation: the repo's statistics (tflib/analysis.py) on binary (S, N, T) arrays -----------------------------
def spike_stats(x, max_lag=10):
    """The repo's statistics, plus the refractory ratio P(spike t+1 | spike t) / P(spike) = acg[+1] / mean(x):
    mean spike count per neuron; covariances of the samples laid end to end (off-diagonal and variances);
    P(k neurons fire in a bin); within-sample auto-correlogram; PSTH; lag-1 cross-covariance (whose end-to-end
    concatenation includes artificial sample-boundary pairs, as in the repo, for every model alike)."""
    x = x.astype(np.float64)
    S, N, T = x.shape
    xs = x.transpose(1, 0, 2).reshape(N, S * T)                            # (N, S*T) samples laid end to end
    cov = np.cov(xs)                                                       # (N, N), ddof 1
    a, b = xs[:, :-1] - xs[:, :-1].mean(1, keepdims=True), xs[:, 1:] - xs[:, 1:].mean(1, keepdims=True)
    lag1 = a @ b.T / (S * T - 2)                                           # (N, N): cov(x_i(t), x_j(t+1))
    K = x.sum(1).astype(int).ravel()                                       # (S*T,) population count per bin
    # auto-correlogram within samples: c_l = sum_{s,n,t} x(t) x(t+l) / sum x = P(spike at t+l | spike at t)
    c = np.array([(x[:, :, :T - l] * x[:, :, l:]).sum() for l in range(1, min(max_lag, T - 1) + 1)]) / x.sum()
    eye = np.eye(N, dtype=bool)
    return dict(mean=x.sum(2).mean(0), cov=cov[~eye], var=cov[eye], k_probs=np.bincount(K, minlength=N + 1) / K.size,
                acg=np.concatenate([c[::-1], [0.0], c]), psth=x.mean(0).ravel(), lag_cov=lag1.ravel(),
                lag1_ratio=c[0] / x.mean())


def pearson_r(a, b):
    """Pearson correlation of two flat arrays; nan if either is constant."""
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def compare(st, ref):
    """Pearson r and unnormalised L1 error (the repo's error sums) of every statistic against a reference set."""
    out = {"lag1_ratio": float(st["lag1_ratio"])}
    for k in ("mean", "cov", "var", "k_probs", "acg", "psth", "lag_cov"):
        out[f"{k}_r"], out[f"{k}_l1"] = pearson_r(st[k], ref[k]), float(np.abs(st[k] - ref[k]).sum())
    return out


def memorisation(x, train, n_near=512):
    """Fraction of samples identical to a training sample (Fig S1), and the mean Hamming distance of (up to n_near
    of) them to their nearest training sample (Fig S5)."""
    seen = {row.tobytes() for row in np.packbits(train.reshape(len(train), -1), axis=1)}
    same = np.mean([row.tobytes() in seen for row in np.packbits(x.reshape(len(x), -1), axis=1)])
    q = torch.as_tensor(x[:n_near].reshape(min(n_near, len(x)), -1), dtype=torch.float32)   # (n, N*T)
    best = torch.full((len(q),), float("inf"))
    for i in range(0, len(train), 8192):
        t = torch.as_tensor(train[i:i + 8192].reshape(-1, q.shape[1]), dtype=torch.float32)  # (<= 8192, N*T)
        # Hamming(a, b) = |a| + |b| - 2 a.b
        best = torch.minimum(best, (q.sum(1, keepdim=True) + t.sum(1) - 2 * q @ t.T).min(1).values)
    return dict(memorised_frac=float(same), nearest_hamming=float(best.mean()))


BASELINES = {}     # name -> draw(cfg, data): n_gen samples (S, N, T) bool of a baseline model, scored by evaluate


def evaluate(cfg, data, G, D, history):
    """Fig 2: n_gen samples of Spike-GAN ('Spike-GAN p': probabilities), of each baseline and of the training set
    ('real-vs-real': the floor), scored against the held-out set ('real') and for memorisation -> (metrics, files).
    NOTE (deviation): scored against held-out data; the repo's analysis.py scores against the training set."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    p = sample(G, cfg.n_gen, cfg.z_dim, gen)                                # (n_gen, N, T) on G's device
    sets = {"real": data["test"], "Spike-GAN p": p.cpu().numpy(), "Spike-GAN": binarize(p, gen)}
    sets.update({name: draw(cfg, data) for name, draw in BASELINES.items()})
    sets["real-vs-real"] = data["train"][data["rng"].permutation(len(data["train"]))[:cfg.n_gen]]
    st = {name: spike_stats(x) for name, x in sets.items() if name != "Spike-GAN p"}
    metrics = dict(iterations=cfg.iters, history=history, data=dict(shape=list(data["train"].shape),
                   spike_prob=float(data["test"].mean()), lag1_ratio=float(st["real"]["lag1_ratio"])))
    models = ("Spike-GAN", *BASELINES, "real-vs-real")
    for name in models:
        own = data["test"] if name == "real-vs-real" else sets[name]
        metrics[name] = {**compare(st[name], st["real"]), **memorisation(own, data["train"])}
    print(f"  {'statistic vs held-out':<22}" + "".join(f"{m:>14}" for m in models))
    for k in ("mean_r", "cov_r", "k_probs_l1", "acg_l1", "lag_cov_r", "lag1_ratio", "nearest_hamming"):
        print(f"  {k:<22}" + "".join(f"{metrics[m][k]:>14.4g}" for m in models))
    samples = dict(real=data["test"], generated=sets["Spike-GAN"], **{m.lower(): sets[m] for m in BASELINES})
    return metrics, {**figures_uniform(sets, st, history), "generator.pt": G.state_dict(), "critic.pt": D.state_dict(),
                     "samples.npz": dict({k: v.astype(np.uint8) for k, v in samples.items()},
                                         generated_probs=sets["Spike-GAN p"])}


def run_uniform(cfg, data):
    """Fig 2: train Spike-GAN, then score its samples, the baselines' and the real-vs-real floor."""
    return evaluate(cfg, data, *train_spikegan(cfg, data))


EXPERIMENTS = {"uniform": (make_uniform_data, run_uniform)}


# ==== Part II (a), Fig 4: sequential packets and the critic's importance maps (spike_relevance_analysis.py) =========
# NOTE (choice): the packets demo (Fig 4: f 0.1, groups of 8) trains 6000 iterations.
DEMOS["packets"] = dict(
    rate=0.1,              # Fig 4: f 0.1
    group=8,               # Fig 4: packets of 8 neurons
    iters=6000,
    packet_prob=0.1,       # packets demo: packet onset probability per bin
    importance=512,        # packets demo: samples whose importance maps are taken (the Fig 4 test set)
    pattern=8,             # packets demo: P, width of the shuffled window (paper Fig 4: 8, step 1)
    shuffles=5,            # packets demo: shuffles per window
)


def refractory_hard(x, f, rho_h, rng):
    """The repo's hard refractory rule (used for packet onsets): with the same 2T margin, delete the later spike of
    the first interval <= rho_h until none is left. That equals keeping a spike iff it comes more than rho_h bins
    after the last kept one, which this left-to-right scan does for all rows at once."""
    R, T = x.shape
    s = np.concatenate([rng.random((R, 2 * T)) < 1 - np.exp(-f), x], axis=1)  # (R, 3T)
    last = np.full(R, -10 ** 9)
    for t in range(3 * T):
        s[:, t] &= t - last > rho_h
        last = np.where(s[:, t], t, last)
    return s[:, 2 * T:]


def make_packets(cfg, S, params, rng, test=False):
    """Refractory Bernoulli background plus packets (repo spike_train_packets, one mode): at each onset t0 neuron k of
    a group fires at t0 + k, onsets more than `group` bins apart. test=True: the importance-map test set (repo
    spike_train_transient_packets): group 0 only, onset prob 0.2, onsets in [T/4, T/2] (paper: [16, 32] at T 64)."""
    N, T, s = cfg.neurons, cfg.window, cfg.group
    f = np.tile(params["f"], S)
    x = refractory_soft(rng.random((S * N, T)) < f[:, None], f, cfg.refr, rng).reshape(S, N, T)   # background
    G, p_on = (1, 0.2) if test else (N // s, cfg.packet_prob)
    on = rng.random((S * G, T)) < p_on
    on[:, T - s:] = False                                                     # the packet must fit
    on = refractory_hard(on, p_on, s, rng).reshape(S, G, T)
    if test:
        on[:, :, :T // 4] = on[:, :, T // 2 + 1:] = False
    packets = np.zeros((S, G, s, T), bool)
    for k in range(s):
        packets[:, :, k, k:] = on[:, :, :T - k]                               # neuron g*s+k fires at t0 + k
    x[:, :G * s] |= packets.reshape(S, G * s, T)                              # packet spikes OR-ed on the background
    return x[:, params["perm"]]


def make_packets_data(cfg):
    """The Fig 4 data: f_n ~ U[0.5 f, 1.5 f] per neuron and a neuron permutation, then training and held-out sets."""
    rng = np.random.default_rng(cfg.seed)
    params = dict(f=rng.uniform(0.5 * cfg.rate, 1.5 * cfg.rate, cfg.neurons), perm=rng.permutation(cfg.neurons))
    return dict(train=make_packets(cfg, cfg.n_train, params, rng), test=make_packets(cfg, cfg.n_test, params, rng),
                params=params, rng=rng)


@torch.no_grad()
def importance_map(D, x, P, reps, gen=None, chunk=256):
    """I (S, N, T). For every window [tau, tau + P) (step 1) and neuron n, shuffle n's bins inside the window (its
    spike count is kept, its timing moved) and take g = mean over reps of |D(x) - D(x')|. A spike's importance is
    the mean g over the windows containing it; bins without a spike get 0."""
    S, N, T = x.shape
    starts, t = torch.arange(T - P + 1, device=x.device), torch.arange(T, device=x.device)
    cover = ((t >= starts[:, None]) & (t < starts[:, None] + P)).float()   # (W, T): window w covers bin t
    I, n = [], torch.arange(N)
    for xb in x.split(chunk):
        B = len(xb)
        s0 = D(xb)                                                         # (B,)
        g = torch.zeros(B, len(starts), N, device=x.device)
        for _ in range(reps):
            for w, tau in enumerate(starts.tolist()):
                xp = xb[:, None].repeat(1, N, 1, 1)                        # (B, N copies, N, T): copy n shuffles n
                order = torch.rand(B, N, P, generator=gen).to(x.device).argsort(-1)
                xp[:, n, n, tau:tau + P] = xp[:, n, n, tau:tau + P].gather(-1, order)
                # g_{tau,n} = mean over reps of |D(x') - D(x)|
                scores = D(xp.view(B * N, N, T)).view(B, N)                # (B*N, N, T) -> (B*N,) -> (B, N)
                g[:, w] += (scores - s0[:, None]).abs() / reps
        # I_{n,t} = x_{n,t} sum_{tau covers t} g_{tau,n} / (number of windows covering t)
        I.append(xb * torch.einsum("bwn,wt->bnt", g, cover) / cover.sum(0))  # (B, N, T)
    return torch.cat(I).cpu().numpy()


def packet_template(I, q=95.0):
    """The repo's find_packets: keep importance above the q-th percentile of all spikes' importance, left-align each
    sample at its first important bin and average -> (N, T) template, normalised to max 1."""
    S, N, T = I.shape
    J = np.where(I >= np.percentile(I[I > 0], q), I, 0.0)
    first = (J.sum(1) > 0).argmax(1)                                      # (S,) first important bin
    idx = np.arange(T) + first[:, None]                                   # (S, T) shifted time index
    A = np.take_along_axis(J, np.minimum(idx, T - 1)[:, None, :].repeat(N, 1), 2) * (idx < T)[:, None, :]
    template = A[J.sum((1, 2)) > 0].mean(0)
    return template / max(template.max(), 1e-12)


def importance_analysis(cfg, D, data):
    """Importance maps of the Fig 4 test set (with --data: held-out samples), scored by how much more importance the
    packet region gets than the rest (per bin and per spike) and by the recovered template's r with the truth."""
    S, N, T = data["train"].shape
    params = data["params"]
    x = data["test"][:cfg.importance] if params is None else make_packets(cfg, cfg.importance, params, data["rng"],
                                                                            test=True)
    x_t = torch.as_tensor(x, dtype=torch.float32, device=cfg.device)
    I = importance_map(D, x_t, cfg.pattern, cfg.shuffles, torch.Generator().manual_seed(cfg.seed + 4))  # (S, N, T)
    maps = dict(mean_map=I.mean(0))                                          # (N, T)
    maps["metrics"] = dict(time_profile=maps["mean_map"].mean(0).tolist(),
                           neuron_profile=maps["mean_map"].mean(1).tolist())
    if params is not None:
        pos = np.argsort(params["perm"])[:cfg.group]                        # where group-0 neurons were permuted to
        maps["mask_n"] = np.isin(np.arange(N), pos)
        inside = maps["mask_n"][:, None] & (np.arange(T) >= T // 4) & (np.arange(T) < T // 2 + cfg.group)  # (N, T)
        maps["truth"] = np.zeros((N, T))
        maps["truth"][pos, np.arange(cfg.group)] = 1.0                       # neuron k of the packet fires at bin k
        maps["template"] = packet_template(I)
        per_spike = I.sum(0) / np.maximum(x.sum(0), 1)                      # (N, T) importance per spike
        maps["metrics"].update(
            inside_over_outside=float(maps["mean_map"][inside].mean() / maps["mean_map"][~inside].mean()),
            per_spike_inside_over_outside=float(per_spike[inside].mean() / per_spike[~inside].mean()),
            template_r=pearson_r(maps["template"].ravel(), maps["truth"].ravel()))
    return maps


def run_packets(cfg, data):
    """Fig 4: Part I's pipeline on the packets data, then the critic's importance maps."""
    G, D, history = train_spikegan(cfg, data)
    metrics, files = evaluate(cfg, data, G, D, history)
    maps = importance_analysis(cfg, D, data)
    metrics["importance"] = maps["metrics"]
    print(f"  importance inside / outside the packets {maps['metrics'].get('inside_over_outside', float('nan')):.2f}")
    return metrics, {"figures/importance.png": figure_importance(maps), **files}


EXPERIMENTS["packets"] = (make_packets_data, run_packets)


# ==== Part II (b): the dichotomized Gaussian baseline (Macke et al. 2009), spatio-temporal (Lyamzin et al. 2010) ===
_GL_U, _GL_W = (torch.tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(40))


def Phi2(a, b, rho):
    """Bivariate normal CDF P(u < a, v < b; corr rho) by Plackett's identity,
    Phi(a) Phi(b) + int_0^rho phi2(a, b; r) dr, with 40-point Gauss-Legendre quadrature on [0, rho]."""
    r = rho[..., None] * (_GL_U + 1) / 2                                   # (..., 40) nodes on [0, rho]
    a_, b_ = a[..., None], b[..., None]
    phi2 = torch.exp(-(a_ ** 2 - 2 * r * a_ * b_ + b_ ** 2) / (2 * (1 - r ** 2))) / (2 * math.pi * (1 - r ** 2).sqrt())
    return torch.special.ndtr(a) * torch.special.ndtr(b) + rho / 2 * (phi2 * _GL_W).sum(-1)


def fit_dg(x, steps=60):
    """Moment matching for x = 1[u > 0], u ~ N(gamma, Lambda), diag Lambda = 1, stationary in time:
    gamma_n = Phi^-1(p_n); rho_ij(tau) solves Phi2(gamma_i, gamma_j; rho) = E[x_i(t) x_j(t + tau)] by bisection
    (Phi2 increases with rho); Lambda is the block-Toeplitz (NT x NT) matrix of rho, made positive semi-definite by
    clipping eigenvalues at 1e-6 and rescaled to unit diagonal. Returns (gamma (N,), A (NT, NT)), Lambda = A A^T."""
    X = torch.as_tensor(x, dtype=torch.float64)
    S, N, T = X.shape
    gamma = torch.special.ndtri(X.mean((0, 2)).clamp(1e-4, 1 - 1e-4))     # (N,)
    M = torch.stack([torch.einsum("sit,sjt->ij", X[:, :, :T - tau], X[:, :, tau:]) / (S * (T - tau))
                     for tau in range(T)], -1)                             # (N, N, T) second moments per lag
    a, b = gamma[:, None, None].expand_as(M), gamma[None, :, None].expand_as(M)
    lo, hi = torch.full_like(M, -0.999), torch.full_like(M, 0.999)
    for _ in range(steps):
        mid = (lo + hi) / 2
        low = Phi2(a, b, mid) < M
        lo, hi = torch.where(low, mid, lo), torch.where(low, hi, mid)
    rho = (lo + hi) / 2
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
    N, T = len(gamma), len(A) // len(gamma)
    u = gamma.repeat_interleave(T) + torch.randn(n, len(A), generator=gen, dtype=torch.float64) @ A.T  # (n, N*T)
    return (u > 0).reshape(n, N, T).cpu().numpy()                            # (n, N*T) -> (n, N, T)


# the DG fitted to the training set, scored in Part I's table next to Spike-GAN
BASELINES["DG"] = lambda cfg, data: sample_dg(*fit_dg(data["train"]), cfg.n_gen,
                                              torch.Generator().manual_seed(cfg.seed + 3))


# ==== Part III: figures (matplotlib imported inside; Figure objects, no pyplot) and own data ==========================
def figures_uniform(sets, st, history):
    """rasters.png (4 samples of each set), statistics.png (the Fig 2 panels: data against each model),
    training.png (the monitored statistics against the generator iteration)."""
    from matplotlib.figure import Figure
    models = [name for name in st if name not in ("real", "real-vs-real")]
    figs = {"figures/rasters.png": Figure(figsize=(12, 6)), "figures/statistics.png": Figure(figsize=(16, 3.2))}
    rows = [name for name in sets if name != "real-vs-real"]
    for i, name in enumerate(rows):
        for j in range(4):
            ax = figs["figures/rasters.png"].add_subplot(len(rows), 4, 4 * i + j + 1, xticks=[], yticks=[])
            ax.imshow(sets[name][j], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_ylabel(name if j == 0 else "", fontsize=8)
    fig = figs["figures/statistics.png"]
    for i, (k, title) in enumerate([("mean", "spikes / sample"), ("cov", "covariance (off-diagonal)"),
                                    ("k_probs", "P(k synchronous spikes)"), ("lag_cov", "lag-1 cross-covariance")]):
        ax = fig.add_subplot(1, 5, i + 1, title=title, xlabel="data (held-out)")
        for name in models:
            ax.scatter(st["real"][k], st[name][k], s=6, alpha=0.7, label=name)
        lim = [min(st["real"][k].min(), 0), st["real"][k].max()]
        ax.plot(lim, lim, "k--", lw=0.8)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 5, 5, title="P(spike at t+l | spike at t)", xlabel="lag l (bins)")
    for name in ("real", *models):
        L = len(st[name]["acg"]) // 2
        ax.plot(range(-L, L + 1), st[name]["acg"], color="k" if name == "real" else None, marker=".", label=name)
    ax.legend(fontsize=7)
    if history:
        fig = figs["figures/training.png"] = Figure(figsize=(16, 3))
        it = [h["iter"] for h in history]
        for i, (k, title) in enumerate([("lag1_ratio", "lag-1 ratio (dashed: data)"), ("mean_r", "rate r"),
                                        ("cov_r", "covariance r"), ("k_probs_l1", "k-statistics L1"),
                                        ("dev_w", "critic W estimate: dev, train")]):
            ax = fig.add_subplot(1, 5, i + 1, title=title, xlabel="generator iteration")
            ax.plot(it, [h[k] for h in history], marker=".")
        ax.plot(it, [h["train_w"] for h in history], marker=".")
        fig.axes[0].axhline(st["real"]["lag1_ratio"], color="k", ls="--")
    return figs


def figure_importance(maps):
    """importance.png (Fig 4): the mean importance map, the recovered and the true packet, time and neuron profiles."""
    from matplotlib.figure import Figure
    fig, mean_map = Figure(figsize=(16, 3)), maps["mean_map"]
    panels = [("mean_map", "mean importance (neuron x bin)"), ("template", "recovered packet template"),
              ("truth", "true packet (permuted neurons)")]
    for i, (k, title) in enumerate(p for p in panels if p[0] in maps):
        fig.add_subplot(1, 5, i + 1, title=title, xlabel="bin").imshow(maps[k], aspect="auto", interpolation="nearest")
    fig.add_subplot(1, 5, 4, title="time profile", xlabel="bin").plot(mean_map.mean(0))
    ax = fig.add_subplot(1, 5, 5, title="neuron profile (red: packet neurons)", xlabel="neuron")
    mask = maps.get("mask_n", np.zeros(len(mean_map), bool))                 # the packet neurons, if known
    ax.bar(range(len(mean_map)), mean_map.mean(1), color=np.where(mask, "C3", "C0"))
    return fig


def load_data(cfg):
    """--data (key 'spikes'): binary trials (trials, N, T), a random 20% held out, or a long binary series (time, N),
    its last 20% held out, cut into windows. Anything Spike-GAN cannot train on is a ValueError naming the file."""
    arrays, want = load_arrays(cfg.data), f"--data {cfg.data}: expected"
    check("spikes" in arrays, f"{want} an array named 'spikes', found {sorted(arrays)}")
    x = arrays["spikes"]
    check(x.ndim in (2, 3) and x.size > 0, f"{want} a non-empty (trials, neurons, bins) or (time, neurons) array, "
          f"found shape {x.shape}")
    check(np.isfinite(x).all(), f"{want} binary spikes, found {int((~np.isfinite(x)).sum())} NaN or inf values")
    check(np.isin(x, (0, 1)).all(), f"{want} binary spikes (0 or 1 in every bin), found the values "
          f"{np.unique(x)[:8]}; binarise counts first, e.g. (counts > 0)")
    x = x.astype(bool)
    check(x.any(), f"{want} some spikes, found none (every bin is 0)")
    always = np.flatnonzero(x.all(axis=(0, 2) if x.ndim == 3 else 0))       # neurons that spike in every bin
    check(always.size == 0, f"{want} spike trains with silent bins, found neurons {always[:8].tolist()} spiking in "
          "every bin (a constant channel such as a marker, or an inverted raster?)")
    rng = np.random.default_rng(cfg.seed)
    if x.ndim == 3:                                                         # trials: a random 20% held out
        x = x[rng.permutation(len(x))]
        train, test = x[len(x) // 5:], x[:len(x) // 5]
    else:                                                                   # a series: its last 20% held out
        W, cut = cfg.window, int(len(x) * 0.8)
        # windows of W bins, one every `stride` bins, cut after the split (no window is shared)
        train, test = (part[np.arange(0, len(part) - W + 1, cfg.stride or W)[:, None] + np.arange(W)]  # (S, W, N)
                       .transpose(0, 2, 1) for part in (x[:cut], x[cut:]))                          # -> (S, N, W)
    check(train.shape[2] % 2 ** cfg.layers == 0, f"{want} bins per sample a multiple of 2^layers = {2 ** cfg.layers}, "
          f"found {train.shape[2]} (choose --window, or cut the trials)")
    hint = (f"; a (time, neurons) array has time first, and this one has {x.shape[0]} bins of {x.shape[1]} neurons: "
            "transpose it?" if x.ndim == 2 and x.shape[1] > x.shape[0] else "")
    check(len(train) >= 2 * cfg.batch and len(test) >= 16, f"{want} at least {2 * cfg.batch} training and 16 held-out "
          f"samples, found {len(train)} and {len(test)} (use a smaller --window or --stride, or more data){hint}")
    check(train.any(), f"{want} spikes in the training part (the first 80%), found none")
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
