"""GNOCCHI: diffusion-generated neural activity from disentangled info codes, in one file (torch + numpy only).

McCart, Sedler, Versteeg, Mifsud, Rigotti-Thompson, Pandarinath, "Diffusion-Based Generation of Neural Activity from
Disentangled Latent Codes" (2024), https://arxiv.org/abs/2407.21195, built on InfoDiffusion (Wang et al., ICML 2023;
github.com/isjakewong/InfoDiffusion). Only GNOCCHI's abstract could be read, so the method follows InfoDiffusion's
code, cited by file: models.py, modules.py, sampling.py, utils.py, run.py.
Pipeline: LFADS-inferred rates x0 -> code c = f_phi(x0) -> diffusion on x0 given c -> navigate c* = c_bar + W b* to
held-out targets -> DDIM samples -> held-out evaluation, next to PCA and an LFADS-like model. Sections:
  Part I   Data: minimum-jerk reaches on a 5x5 grid, 3 targets held out ........ make_reach_data, split_and_zscore
           Model: info-code encoder, AdaGN 1-D U-Net (models.py, modules.py) ... Encoder, AuxResBlock, UNet1D
           Objective and training: L_score + L_rec / T_diff + lambda MMD^2(c, N(0, I)) ... GNOCCHI.loss, train
           Sampling and navigation: DDIM (sampling.py), c* = c_bar + W b* ...... ddim_sample, fit_navigation
           Evaluation: code SNRs, held-out R^2, |cos(w_x, w_y)|, PSTH R^2; unintended movement (Fig. 3D), samples from
           the prior (Fig. 1C) ... code_metrics, generation_metrics, unintended_movement, sample_statistics, evaluate
           GNOCCHI's input (Fig. 5), the experiment over seeds ................ gnocchi_input, run_reach, run_seeds
  Part II  Baselines with the same code size: PCA of the rates, an LFADS-like sequential VAE ... pca_latent, SeqVAE
  Part III Figures, own data (load_data), the block shared by the three files (CLI, outputs, main)
Left out: the biomechanical arm (a rate-RNN driven by minimum-jerk reaches instead), the monkey data, reverse DDIM.
  python gnocchi_minimal.py                     # ~5 min on a CPU: GNOCCHI, PCA and the LFADS-like baseline
  python gnocchi_minimal.py --seeds 3           # ~15 min: three seeds, with each metric's mean and sd
  python gnocchi_minimal.py --quick             # ~10 s: every stage on a toy problem (numbers meaningless)
  python gnocchi_minimal.py --paper             # InfoDiffusion's scale (6.9M parameters, 20,000 steps): a GPU job
  python gnocchi_minimal.py --data trials.npz   # your own trials, see load_data
Shapes: B batch, N neurons, T bins ((B, N, T): convolutions over time), C channels, L code dims, K samples, M trials,
V behavioural variables. NOTE (deviation): differs from InfoDiffusion or the paper; NOTE (choice): both leave it open.
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
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== Part I: GNOCCHI on the reach grid, evaluated on held-out targets (reads alone, in paper order) ==================
@dataclass
class Config:
    demo: str = "reach"          # experiment: reach (GNOCCHI and its baselines on the simulated reach grid)
    preset: str = ""             # set by --quick / --paper
    seed: int = 0                # random seed of the data, the split, the models and the samples
    seeds: int = 1               # run the seeds seed .. seed + seeds - 1 and add each metric's mean and sd
    device: str = "auto"         # auto | cpu | cuda | mps
    out: str = ""                # output folder; "" -> runs/gnocchi_minimal-<demo> (or -data)
    data: str = ""               # your own trials (.npz / .npy, see load_data); "" -> the simulated reaches
    threads: int = 0             # torch CPU threads; 0 -> torch's default
    n_neurons: int = 48          # N simulated neurons
    trials_per_target: int = 80  # simulated trials per grid target (25 targets)
    start_pull: float = 0.0      # simulated start = start_pull x target + jitter (0: independent of the target)
    smooth_bins: float = 1.5     # Gaussian sd (bins) that smooths --data spikes (30 ms at 20 ms bins)
    input: str = "lfads"         # GNOCCHI's trials: lfads (LFADS-like rates) | smooth (smoothed spikes) | rates (true)
    lfads_steps: int = 800       # training steps of the LFADS-like model (0: skip it; PCA always runs)
    code_dim: int = 4            # L, info-code size. NOTE (choice): 2 x the 2 behavioural factors (InfoDiffusion: 32)
    # NOTE (deviation): a CPU-size U-Net (AuxiliaryUNet: C 64, ch_mult (1,2,2,2), 2 res-blocks, GN(32), every skip,
    # attention: --paper), T_diff 200 with betas rescaled to InfoDiffusion's sum(beta) = 5 (run.py --beta1, --betaT)
    channels: int = 32           # C, U-Net base channels (run.py --unets_channels)
    ch_mult: str = "1,2"         # channel multiplier per U-Net level (models.py ch_mult)
    res_blocks: int = 1          # AuxResBlocks per level on the way down (models.py num_res_blocks)
    attention: bool = False      # self-attention in the level-2 blocks and the first middle block (attn=[2])
    skip_all: bool = False       # AuxiliaryUNet's skips: head, every block and downsample; res_blocks + 1 up-blocks
    groups: int = 8              # GroupNorm groups (InfoDiffusion: 32, which needs >= 32 channels)
    dropout: float = 0.0         # res-block dropout. NOTE (choice): none for the short CPU run (InfoDiffusion: 0.1)
    diff_steps: int = 200        # T_diff, diffusion steps
    beta_1: float = 1e-4         # first beta of the linear schedule
    beta_T: float = 0.05         # last beta of the linear schedule
    ddim_steps: int = 50         # DDIM steps. NOTE (deviation): strided (sampling.py: every step, eta 0.01; --paper)
    ddim_eta: float = 0.0        # DDIM noise scale eta (0: deterministic)
    mmd_weight: float = 0.1      # lambda_2, the weight of MMD^2(c, N(0, I)) (run.py --mmd_weight)
    steps: int = 2400            # optimiser steps. NOTE (deviation): a few-minute CPU run
    batch: int = 64              # trials per step (run.py --batch_size)
    lr: float = 1e-3             # base learning rate. NOTE (deviation): for the short CPU run (run.py: 1e-4)
    weight_decay: float = 1e-5   # AdamW weight decay (run.py)
    warmup: int = 100            # steps of gradual warmup to 2 lr, then cosine to 0 (run.py: 1 epoch)
    n_gen: int = 200             # K samples per navigated code and per sample set (K / 10 per traversal step)

DEMOS = {"reach": {}}
# --paper: AuxiliaryUNet, run.py's defaults and sampling.py's DDIM, a_dim 32. NOTE (deviation): still 1-D convolutions,
# the conv encoder, eps_theta's input skip, per-step schedules, T padded to a multiple of 8, the CPU-size LFADS-like
# model. NOTE (choice): 20,000 steps (~InfoDiffusion's 20 MNIST epochs at batch 64), 1,000 of warmup (1 of 20 epochs).
PRESETS = {
    "quick": (dict(n_neurons=24, trials_per_target=12, channels=16, diff_steps=50, ddim_steps=10, steps=40, warmup=5,
                   n_gen=20, lfads_steps=20), "tiny smoke test of every stage (numbers meaningless)"),
    "paper": (dict(code_dim=32, channels=64, ch_mult="1,2,2,2", res_blocks=2, attention=True, skip_all=True,
                   groups=32, dropout=0.1, diff_steps=1000, beta_1=1e-5, beta_T=1e-2, ddim_steps=1000, ddim_eta=0.01,
                   lr=1e-4, steps=20000, warmup=1000), "InfoDiffusion's scale, for a GPU"),
}
CHOICES = {"input": ["lfads", "smooth", "rates"]}
ZERO_OK = ("seed", "threads", "start_pull", "dropout", "ddim_eta", "mmd_weight", "weight_decay", "lfads_steps")

def check_config(cfg):
    check(all(m.strip().isdigit() and int(m) > 0 for m in cfg.ch_mult.split(",")),
          f"--ch-mult must be comma-separated positive integers such as 1,2,2,2, got {cfg.ch_mult!r}")
    check(cfg.channels % cfg.groups == 0 and cfg.channels % 2 == 0,
          f"--channels must be even and a multiple of --groups {cfg.groups} (GroupNorm), got {cfg.channels}")
    check(cfg.ddim_steps <= cfg.diff_steps, f"--ddim-steps must be <= --diff-steps {cfg.diff_steps}, got "
          f"{cfg.ddim_steps}")
    check(cfg.input != "lfads" or cfg.lfads_steps > 0, "--input lfads needs --lfads-steps > 0 (or --input smooth)")
    check(cfg.input != "rates" or not cfg.data, f"--input rates needs the simulated true rates, not --data {cfg.data}")

# ---- Data: minimum-jerk reaches -> random rate-RNN "controller" -> Poisson spikes -> smoothed rates; the split ------
HELDOUT = ((-1, 1), (1, 0), (0, -1))  # interior, non-collinear grid targets held out of everything

def smooth_matrix(T, sigma):
    """(T, T) acausal Gaussian smoothing (sigma in bins), columns renormalised at the edges: x @ K smooths over T."""
    K = np.exp(-0.5 * (np.subtract.outer(np.arange(T), np.arange(T)) / sigma) ** 2)  # (T, T): lag t - t'
    return K / K.sum(0, keepdims=True)

def make_reach_data(cfg):
    """Synthetic reaching from its own seeded generator. Returns rates/true_rates (M, N, T) in Hz, targets (M, 2) cm,
    behaviour (M, 5): end point x, y (= target, cm), start x, y (cm), duration (ms), and heldout (M,) bool."""
    rng = np.random.default_rng(cfg.seed)
    spacing, dt, tau = 2.0, 10.0, 50.0  # grid spacing (cm), simulation step and RNN time constant (ms)
    grid = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3)])
    goal = np.repeat(grid * spacing, cfg.trials_per_target, axis=0)  # (25, 2) -> (M, 2) target per trial
    heldout, M = np.array([tuple(ij) in HELDOUT for ij in np.repeat(grid, cfg.trials_per_target, axis=0)]), len(goal)
    # NOTE (choice): start = start_pull x target + jitter: by default (0) independent of the target, so that no nuisance
    # correlates with it; with a pull the start depends on the target (a reach from near the last one), as in Fig. 3D
    start = cfg.start_pull * goal + rng.normal(0.0, 0.3 * spacing, (M, 2))
    D = rng.uniform(350.0, 550.0, M)           # reach duration (ms), independent of target
    t = np.arange(-600.0, 640.0, dt)           # movement onset at t = 0; burn-in before -200, margin after 520
    s = np.clip(t[None] / D[:, None], 0, 1)    # (M, S) normalised time of the minimum-jerk profile
    # minimum jerk: pos = start + (goal - start)(10 s^3 - 15 s^4 + 6 s^5), and its time derivative
    pos = start[:, None] + (goal - start)[:, None] * (10 * s**3 - 15 * s**4 + 6 * s**5)[..., None]  # (M, S, 2)
    vel = (goal - start)[:, None] * ((30 * s**2 - 60 * s**3 + 30 * s**4) * 1e3 / D[:, None])[..., None]  # cm/s
    on = (t >= -200)[None, :, None]            # target shown from -200 ms (preparatory activity)
    u = np.concatenate([on * goal[:, None] / 4, np.broadcast_to((t >= -100)[None, :, None], (M, len(t), 1)),
                        on * (pos - goal[:, None]) / 4, vel / 20], axis=2)  # (M, S, 7) task inputs, O(1) scale
    H = 64                                     # rate-RNN h' = (1 - dt/tau) h + dt/tau tanh(W h + U u + b)
    W = rng.normal(0, 0.9 / math.sqrt(H), (H, H))  # spectral radius ~0.9
    U, b = rng.normal(0, 1.0, (H, u.shape[2])), rng.normal(0, 0.1, H)
    h, hs = np.zeros((M, H)), []
    for k in range(len(t)):
        h = (1 - dt / tau) * h + dt / tau * np.tanh(h @ W.T + u[:, k] @ U.T + b)
        hs.append(h)
    hs = np.stack(hs, axis=2)                  # (M, H, S)
    w_out = rng.normal(0, 1.0, (cfg.n_neurons, H)) / math.sqrt(H)  # dense readout: mixed selectivity
    log_r0 = rng.uniform(math.log(4.0), math.log(20.0), (cfg.n_neurons, 1))  # baseline 4-20 spikes/s
    lam = np.exp(log_r0 + w_out @ hs)          # (N, H) @ (M, H, S) -> (M, N, S) noise-free rates, Hz
    spikes = rng.poisson(lam * dt / 1e3)       # Poisson counts in 10 ms bins
    keep = (t >= -200) & (t < 520)             # window [-200, 520) ms -> 72 x 10 ms -> 36 x 20 ms bins
    K = smooth_matrix(len(t), 30.0 / dt)[:, keep].reshape(len(t), -1, 2).mean(-1)  # smooth, crop, bin: (S, 36)
    rates = spikes * (1e3 / dt) @ K            # (M, N, S) -> (M, N, 36) smoothed spikes (sigma 30 ms), Hz
    # true_rates = lam @ K = E[rates], the noise-free ground truth
    return dict(rates=rates, true_rates=lam @ K, targets=goal, heldout=heldout, behaviour=np.c_[goal, start, D])

def split_and_zscore(data, seed):
    """Split (held-out targets / 15% validation / train), z-score every neuron with TRAINING statistics: x, truth."""
    M = len(data["rates"])
    data["val"] = ~data["heldout"] & (np.random.default_rng(seed + 1).random(M) < 0.15)
    data["train"] = ~data["heldout"] & ~data["val"]
    r = data["rates"][data["train"]]
    data["mu"], data["sd"] = r.mean((0, 2), keepdims=True), r.std((0, 2), keepdims=True) + 1e-6  # (1, N, 1) each
    data["x"] = (data["rates"] - data["mu"]) / data["sd"]           # (M, N, T) model input
    data["truth"] = (data.get("true_rates", data["rates"]) - data["mu"]) / data["sd"]  # noise-free when simulated
    return data

# ---- Model: info-code encoder f_phi and AdaGN-conditioned 1-D U-Net eps_theta (models.py, modules.py) --------------
def xavier_init(module):
    """InfoDiffusion initialises every conv/linear with xavier_uniform and zero bias (modules.py initialize)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

class Encoder(nn.Module):
    """Deterministic info code c = f_phi(x0) of the CLEAN trial: 3 x (Conv-SiLU, stride 2 on two) -> flatten -> Linear
    -> L, which sees the whole window (models.py Encoder: flatten + fc_a). NOTE (choice): not InfoDiffusion's U-Net
    encoder, and no GroupNorm: GN rescales each trial by its own statistics, erasing the rate level (the target)."""

    def __init__(self, N, T, C, L):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(N, C, 3, padding=1), nn.SiLU(),
                                 nn.Conv1d(C, 2 * C, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv1d(2 * C, 2 * C, 3, stride=2, padding=1), nn.SiLU())
        self.fc = nn.Linear(2 * C * (((T + 1) // 2 + 1) // 2), L)
        xavier_init(self)

    def forward(self, x0):
        return self.fc(self.net(x0).flatten(1))  # (B, N, T) -> (B, 2C, ~T/4) -> (B, 2C*T/4) -> (B, L)

class AttnBlock(nn.Module):
    """Self-attention over time with a residual (modules.py AttnBlock in 1-D): q, k, v = a 1x1 conv of GN(x)."""

    def __init__(self, C, groups):
        super().__init__()
        self.norm, self.qkv, self.proj = nn.GroupNorm(groups, C), nn.Conv1d(C, 3 * C, 1), nn.Conv1d(C, C, 1)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)          # (B, 3C, T) -> 3 x (B, C, T)
        # w_st = softmax_t(q_s . k_t / sqrt(C)); h_s = sum_t w_st v_t
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(x.shape[1]), dim=-1)  # (B, T, C) @ (B, C, T) -> (B, T, T)
        return x + self.proj(v @ w.transpose(1, 2))                 # (B, C, T) @ (B, T, T) -> (B, C, T)

class AuxResBlock(nn.Module):
    """modules.py AuxResBlock in 1-D: GN-SiLU-Conv; AdaGN h = GN(h)(1 + s_t) + b_t, then h = h(1 + s_c) + b_c (time
    FiLM first, then code FiLM); SiLU-Dropout-Conv; GN-SiLU-Dropout-Conv; residual shortcut; optional attention."""

    def __init__(self, c_in, c_out, tdim, dropout, attn=False, groups=8):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv1d(c_in, c_out, 3, padding=1))
        self.temb_proj, self.cemb_proj = (nn.Sequential(nn.SiLU(), nn.Linear(tdim, 2 * c_out)) for _ in range(2))
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.block2 = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv1d(c_out, c_out, 3, padding=1))
        self.block3 = nn.Sequential(nn.GroupNorm(groups, c_out), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv1d(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.attn = AttnBlock(c_out, groups) if attn else nn.Identity()
        xavier_init(self)

    def forward(self, x, temb, cemb):
        h = self.block1(x)                                          # (B, C_in, T) -> (B, C_out, T)
        s_t, b_t = self.temb_proj(temb)[:, :, None].chunk(2, dim=1)  # (B, 2 C_out) -> 2 x (B, C_out, 1)
        s_c, b_c = self.cemb_proj(cemb)[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + s_t) + b_t                         # time scale/shift
        h = h * (1 + s_c) + b_c                                     # code scale/shift (AdaGN)
        return self.attn(self.block3(self.block2(h)) + self.shortcut(x))

class UNet1D(nn.Module):
    """eps_theta's network, models.py AuxiliaryUNet over time: head Conv(N -> C); per level res_blocks AuxResBlocks at
    C * ch_mult[level] channels, a stride-2 conv between levels; two middle blocks; a mirrored decoder whose blocks
    take the stored skips (every res-block output; skip_all adds the head and downsample outputs and one more
    up-block per level, as AuxiliaryUNet does), nearest upsampling + conv; tail GN-SiLU-Conv(C -> N), zero at init;
    attention in the blocks of level 2 (0-based) and the first middle block (AuxiliaryUNet attn=[2])."""

    def __init__(self, N, C, L, T_diff, dropout, ch_mult=(1, 2), res_blocks=1, attention=False, skip_all=False,
                 groups=8):
        super().__init__()
        tdim, half = 4 * C, C // 2  # sinusoidal table of width C -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)
        ang = torch.arange(T_diff)[:, None] * torch.exp(-math.log(1e4) * torch.arange(half) / half)[None]
        self.register_buffer("sin_table", torch.cat([ang.sin(), ang.cos()], dim=1))  # (T_diff, C)
        self.time_mlp = nn.Sequential(nn.Linear(C, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.code_fc = nn.Linear(L, tdim)  # a_emb = Linear(L -> tdim)(c), computed once (AuxiliaryUNet fc_a)
        self.head, self.skip_all = nn.Conv1d(N, C, 3, padding=1), skip_all
        block = partial(AuxResBlock, tdim=tdim, dropout=dropout, groups=groups)
        self.down, self.downsample, self.up, self.upsample = (nn.ModuleList() for _ in range(4))
        skips, ch = [C] * skip_all, C                               # channels of the stored outputs
        for lvl, mult in enumerate(ch_mult):
            self.down.append(nn.ModuleList())
            for _ in range(res_blocks):
                self.down[-1].append(block(ch, C * mult, attn=attention and lvl == 2))
                ch = C * mult
                skips.append(ch)
            if lvl < len(ch_mult) - 1:
                self.downsample.append(nn.Conv1d(ch, ch, 3, stride=2, padding=1))
                skips += [ch] * skip_all
        self.mid = nn.ModuleList([block(ch, ch, attn=attention), block(ch, ch)])
        for lvl in reversed(range(len(ch_mult))):
            self.up.append(nn.ModuleList())
            for _ in range(res_blocks + skip_all):
                self.up[-1].append(block(skips.pop() + ch, C * ch_mult[lvl], attn=attention and lvl == 2))
                ch = C * ch_mult[lvl]
            if lvl > 0:
                self.upsample.append(nn.Conv1d(ch, ch, 3, padding=1))
        self.tail = nn.Sequential(nn.GroupNorm(groups, C), nn.SiLU(), nn.Conv1d(C, N, 3, padding=1))
        xavier_init(self)
        nn.init.zeros_(self.tail[-1].weight)  # NOTE (choice): exact zeros (models.py: xavier with gain 1e-5, ~zero)

    def forward(self, x, i, c):
        T = x.shape[-1]
        x = F.pad(x, (0, -T % 2 ** len(self.downsample)), mode="replicate")  # NOTE (choice): pad T to fit the levels
        temb, cemb = self.time_mlp(self.sin_table[i]), self.code_fc(c)  # (B,) -> (B, 4C); (B, L) -> (B, 4C)
        h = self.head(x)                                        # (B, N, T) -> (B, C, T)
        hs = [h] * self.skip_all
        for lvl, level in enumerate(self.down):
            for blk in level:
                h = blk(h, temb, cemb)                          # (B, C_in, T') -> (B, C * ch_mult[lvl], T')
                hs.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)                     # (B, C', T') -> (B, C', T'/2)
                hs += [h] * self.skip_all
        for blk in self.mid:
            h = blk(h, temb, cemb)
        for k, level in enumerate(self.up):                     # deepest level first
            for blk in level:
                h = blk(torch.cat([h, hs.pop()], 1), temb, cemb)  # (B, C' + C_skip, T') -> (B, C'', T')
            if k < len(self.upsample):
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C', T') -> (B, C', 2T')
        return self.tail(h)[..., :T]                            # (B, C, T) -> (B, N, T)

# ---- Objective: DDPM forward process, score + reconstruction + MMD loss (InfoDiffusion with zeta = 1) ---------------
def mmd(x, y):
    """Biased (V-statistic) MMD^2 with the InfoVAE kernel k(u, v) = exp(-||u - v||^2 / L^2) (utils.py compute_mmd):
    MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y)."""
    k = [torch.exp(-torch.cdist(a, b).pow(2) / x.shape[1] ** 2).mean() for a, b in ((x, x), (y, y), (x, y))]  # (B, B')
    return k[0] + k[1] - 2 * k[2]

class GNOCCHI(nn.Module):
    """models.py InfoDiff: prior p(c) = N(0, I_L), encoder c = f_phi(x0), reverse chain p_theta(x_{i-1} | x_i, c)."""

    def __init__(self, cfg: Config, N, T):
        super().__init__()
        self.cfg, self.N, self.T = cfg, N, T
        self.encoder = Encoder(N, T, cfg.channels, cfg.code_dim)
        self.eps_model = UNet1D(N, cfg.channels, cfg.code_dim, cfg.diff_steps, cfg.dropout,
                                ch_mult=[int(m) for m in cfg.ch_mult.split(",")], res_blocks=cfg.res_blocks,
                                attention=cfg.attention, skip_all=cfg.skip_all, groups=cfg.groups)
        self.register_buffer("beta", torch.linspace(cfg.beta_1, cfg.beta_T, cfg.diff_steps))  # linear (models.py)
        self.register_buffer("alpha_bar", torch.cumprod(1 - self.beta, 0))  # abar_i = prod_{j<=i} (1 - beta_j)

    def eps_theta(self, x_i, i, c):
        """eps_theta(x_i, i, c) = sqrt(1 - abar_i) x_i + sqrt(abar_i) UNet(x_i, i, c). NOTE (deviation): an input skip
        (EDM-style preconditioning; the U-Net predicts v), so eps_hat ~ x_i at high noise need not pass through the
        U-Net, whose GN-SiLU-Conv tail cannot represent that identity for C < 2N (DDIM's first steps would amplify the
        error by 1/sqrt(abar_i)). At init (zero output conv) eps_hat is the Bayes-optimal denoiser of N(0, I) data."""
        ab = self.alpha_bar[i][:, None, None]  # (B,) -> (B, 1, 1)
        return (1 - ab).sqrt() * x_i + ab.sqrt() * self.eps_model(x_i, i, c)

    def loss(self, x0, i=None, eps=None):
        """models.py InfoDiff.loss_fn (MMD path, no KL); i and eps drawn unless given. Returns (total, float parts)."""
        i = torch.randint(0, self.cfg.diff_steps, (len(x0),)).to(x0.device) if i is None else i  # i ~ U{0..T-1}
        eps = torch.randn(x0.shape).to(x0.device) if eps is None else eps
        c, ab = self.encoder(x0), self.alpha_bar[i][:, None, None]  # code from the clean x0; abar_i (B, 1, 1)
        # forward process x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps (GNOCCHI abstract; DDPM Eq. 4)
        eps_hat = self.eps_theta(ab.sqrt() * x0 + (1 - ab).sqrt() * eps, i, c)
        # L_score = mean (eps_hat - eps)^2 over B x N x T ("simple" DDPM loss)
        l_score = F.mse_loss(eps_hat, eps)
        # InfoDiff.loss_fn's reconstruction: the step-1 posterior-mean update applied to the clean x0 (for L_0)
        # x0_hat = (x0 - beta_1 / sqrt(1 - abar_1) eps_hat) / sqrt(alpha_1)
        x0_hat = (x0 - self.beta[0] / (1 - self.alpha_bar[0]).sqrt() * eps_hat) / (1 - self.beta[0]).sqrt()
        l_rec = F.mse_loss(x0_hat, x0)
        l_mmd = mmd(c, torch.randn(c.shape).to(c.device))     # aggregate q(c) vs p(c) = N(0, I); no per-sample KL
        # L = L_score + L_rec / T_diff + lambda_2 MMD^2
        total = l_score + l_rec / self.cfg.diff_steps + self.cfg.mmd_weight * l_mmd
        return total, dict(score=l_score.item(), rec=l_rec.item(), mmd=l_mmd.item())

    @torch.no_grad()
    def sample(self, c, gen, steps=0):
        """One trial (K, N, T) per code c (K, L): DDIM from x_T ~ N(0, I) drawn from the CPU generator gen."""
        x_T = torch.randn((len(c), self.N, self.T), generator=gen).to(c.device)
        return ddim_sample(partial(self.eps_theta, c=c), x_T, self.alpha_bar, steps or self.cfg.ddim_steps,
                           self.cfg.ddim_eta, gen)

# ---- Training: AdamW, gradient clipping, gradual warmup then cosine (run.py). Standard PyTorch. -------------------
def lr_factor(step, cfg):
    """Learning rate / cfg.lr after `step` steps: run.py's GradualWarmupScheduler (utils.py, multiplier 2), then
    CosineAnnealingLR, per step: 1 + s / w for s < w (lr -> 2 lr), then 1 + cos(pi (s - w) / (S - w)) (2 lr -> 0)."""
    return 1 + (step / cfg.warmup if step < cfg.warmup else math.cos(math.pi * (step - cfg.warmup) / max(
        1, cfg.steps - cfg.warmup)))

def train(model, x_train, cfg, steps, lr_at, loss_at, name):
    """AdamW + grad-norm clip 1.0 (run.py train; lfads-torch uses AdamW too) on minibatches of the trials x_train (M, N,
    T); lr_at(step) -> learning rate, loss_at(batch, step) -> (loss, float parts). Returns the history of the parts."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr_at(0), weight_decay=cfg.weight_decay)
    progress, hist = Progress(name, steps), []
    model.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        loss, parts = loss_at(x_train[torch.randint(0, len(x_train), (cfg.batch,)).to(x_train.device)], step)
        value = loss.item()
        check(math.isfinite(value), f"{name}: the training loss became {value} at step {step}; likely cause: a "
              "learning rate too high for this data (lower --lr) or extreme inputs", FloatingPointError)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        hist.append(parts)
        progress(step, loss=value, **parts)
    return hist

# ---- Sampling and navigation: DDIM from a code; c* = c_bar + W b* ----------------------------------------------------
def ddim_sample(eps_fn, x, alpha_bar, steps, eta=0.0, gen=None):
    """DDIM (Song et al. 2021, Eq. 12) from x = x_T (B, N, T) over strided steps; eta = 0.01 over every step is
    sampling.py's sampler; z from the CPU generator gen. NOTE (choice): textbook indexing (sampling.py: abar_{i-1})."""
    seq = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long().tolist()
    for k, i in enumerate(seq):
        ab = alpha_bar[i]
        ab_prev = alpha_bar[seq[k + 1]] if k + 1 < len(seq) else torch.ones_like(ab)  # abar_{-1} = 1: end at x0
        eps_hat = eps_fn(x, torch.full((len(x),), i, device=x.device, dtype=torch.long))
        # x0_hat = (x_i - sqrt(1 - abar_i) eps_hat) / sqrt(abar_i)
        x0_hat = (x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        # sigma = eta sqrt((1 - abar_prev) / (1 - abar_i)) sqrt(1 - abar_i / abar_prev)   (DDIM Eq. 16)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        # x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev - sigma**2).sqrt() * eps_hat
        if eta > 0:
            x = x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
    return x

def fit_navigation(C, B):
    """Least squares C ~ 1 c_bar^T + B W^T, codes C (M, L), behaviour B (M, V): c_bar (L,), W (L, V) (code per unit)."""
    A = np.linalg.lstsq(np.c_[np.ones(len(B)), B], C, rcond=None)[0]  # (1 + V, L)
    return A[0], A[1:].T

def gnocchi_latent(model, x, seed):
    """GNOCCHI as a latent: the codes c = f_phi(x0) of the trials x (M, N, T) -> (M, L), and generate: codes (K, L) ->
    DDIM samples (K, N, T) in z units, every x_T (and DDIM noise) from one seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        codes = model.eval().encoder(x).cpu().numpy().astype(np.float64)  # float64 on the CPU (MPS has none)
    return codes, lambda c: model.sample(torch.tensor(c, dtype=torch.float32).to(x.device), gen).cpu().double().numpy()

# ---- Evaluation: the paper's held-out statistics of one latent (codes and a generator) -----------------------------
def ridge(X, Y, lam=1e-6):
    """Ridge regression with unpenalised intercept; lam relative to the mean feature variance. Returns predict fn."""
    mx, my = X.mean(0), Y.mean(0)
    G = (X - mx).T @ (X - mx)
    A = np.linalg.solve(G + lam * np.trace(G) / len(G) * np.eye(len(G)), (X - mx).T @ (Y - my))
    return lambda Z: (Z - mx) @ A + my

def r2(y, y_hat, axis=0):
    """Coefficient of determination along axis (per column by default): 1 - SS_res / SS_tot."""
    return 1 - ((y - y_hat) ** 2).sum(axis) / ((y - y.mean(axis, keepdims=True)) ** 2).sum(axis)

def code_snr(C, labels):
    """Code SNR of codes C (M, L) over conditions (labels (M,) or (M, 2)): tr S_b / tr S_w, and the total SNR that no
    invertible linear map of the code changes, tr(S_w^-1 S_b); S_b = Cov_k(mu_k), S_w = mean_k Sigma_k (within)."""
    k = np.unique(labels, axis=0, return_inverse=True)[1].ravel()  # (M,) condition index
    mu = np.stack([C[k == j].mean(0) for j in range(k.max() + 1)])  # (n_k, L) condition means
    D, E = mu - mu.mean(0), C - mu[k]                               # between and within deviations
    S_b, S_w = D.T @ D / len(mu), np.mean([E[k == j].T @ E[k == j] / (k == j).sum() for j in range(len(mu))], axis=0)
    return float(np.trace(S_b) / np.trace(S_w)), float(np.trace(np.linalg.pinv(S_w) @ S_b))  # pinv: S_w may be singular

def code_metrics(C, data):
    """Codes C (M, L) alone: the code SNRs, also along the unit navigation directions u_x, u_y, |cos(w_x, w_y)| =
    |u_x . u_y|, and the R^2 of a code -> target regression on validation and held-out trials. Returns (metrics, W)."""
    tr, va, ho, Y = data["train"], data["val"], data["heldout"], data["targets"]
    c_bar, W = fit_navigation(C[tr], Y[tr])
    u, f = W / np.linalg.norm(W, axis=0), ridge(C[tr], Y[tr])      # (L, 2); the regression on training trials only
    m = dict(zip(("snr_train", "snr_total"), code_snr(C[tr], Y[tr])), snr_heldout=code_snr(C[ho], Y[ho])[0],
             snr_x=code_snr(C[tr] @ u[:, :1], Y[tr])[0], snr_y=code_snr(C[tr] @ u[:, 1:], Y[tr])[0],
             cos_wx_wy=float(abs(u[:, 0] @ u[:, 1])), val_r2=float(r2(Y[va], f(C[va])).mean()))
    r = r2(Y[ho], f(C[ho]))
    return dict(m, heldout_r2_x=r[0], heldout_r2_y=r[1], heldout_r2=r.mean()), dict(codes=C, c_bar=c_bar, W=W)

def generation_metrics(c_bar, W, generate, data, decode, K):
    """Navigated samples, K per held-out target b*: the PSTH R^2 against the noise-free truth and the decoded end
    points. generate: codes (K, L) -> z-scored trials (K, N, T); decode: trials -> behaviour, end point first."""
    Y = data["targets"]
    b_star = np.unique(Y[data["heldout"]], axis=0)                  # (n_ho, 2) held-out targets
    gen = generate(np.repeat(c_bar + b_star @ W.T, K, axis=0))      # c* = c_bar + W b*: (n_ho K, N, T)
    psth_g = gen.reshape(len(b_star), K, *gen.shape[1:]).mean(1)    # (n_ho, K, N, T) -> (n_ho, N, T)
    psth_t = np.stack([data["truth"][(Y == b).all(1)].mean(0) for b in b_star])  # noise-free condition average
    # NOTE (choice): R^2 per neuron pooled over held-out targets x time, then the mean over neurons
    pg, pt = (p.transpose(1, 0, 2).reshape(p.shape[1], -1) for p in (psth_g, psth_t))  # (n_ho, N, T) -> (N, n_ho T)
    r_n = r2(pt, pg, axis=1)                                        # (N,) per neuron
    return dict(psth_r2=float(r_n.mean()), psth_r2_median=float(np.median(r_n)), gen_endpoint_err_cm=float(
        np.linalg.norm(decode(gen)[:, :2] - np.repeat(b_star, K, 0), axis=1).mean()))

def unintended_movement(C, B, train, generate, decode, K, steps=9):
    """Fig. 3D. Directions C ~ 1 c_bar^T + B W^T over every recorded variable (end point x, y; simulated: start x, y,
    duration), so w_x moves the end point x with the rest at its mean. Step along w_x, w_y over the training range
    (steps x K samples), decode every variable: its change = |slope of the step means| x range. U = the summed change
    of the positions that should stay fixed (cm); u_rel = U / the intended change. Returns (metrics, step means)."""
    c_bar, W = fit_navigation(C[train], B[train])
    u, means = [], []
    for a in range(2):
        b = np.tile(B[train].mean(0), (steps, 1))                  # (steps, V): the mean behaviour, stepped along a
        b[:, a] = np.linspace(B[train, a].min(), B[train, a].max(), steps)
        means.append(decode(generate(np.repeat(c_bar + b @ W.T, K, axis=0))).reshape(steps, K, -1).mean(1))
        change = np.abs(np.polyfit(b[:, a], means[-1], 1)[0]) * np.ptp(b[:, a])  # (V,) change over the range
        U = change[:4].sum() - change[a]                            # positions: end x, end y (, start x, start y)
        u.append([U, U / change[a], *change[4:]])
    return dict(zip(("u_cm", "u_rel", "u_duration_ms"), map(float, np.mean(u, 0)))), np.stack(means)

def sample_statistics(gen, data, decode):
    """Fig. 1C: generated trials gen (K, N, T) against the real training trials: R^2 of the mean PSTH over all trials
    (vs the truth's), r between the neuron-by-neuron correlations of trial-mean rates, and the decoded end points'
    spread over the training targets' spread and fraction inside the targets' range."""
    x, Y = data["x"][data["train"]], data["targets"][data["train"]]
    corr = [np.corrcoef(z.mean(2).T)[np.triu_indices(x.shape[1], 1)] for z in (x, gen)]  # (K, N) -> pairs i < j
    end = decode(gen)[:, :2]                                        # (K, 2) decoded end points
    return dict(psth_r2=float(r2(data["truth"][data["train"]].mean(0).ravel(), gen.mean(0).ravel())),
                corr_r=float(np.corrcoef(*corr)[0, 1]), end_spread=float(end.std(0).mean() / Y.std(0).mean()),
                end_in_range=float(((end >= Y.min(0)) & (end <= Y.max(0))).all(1).mean()))

def evaluate(cfg, data, latents, metrics):
    """Behaviour decoders fit on real training trials (ridge, lam 1, on the flattened rates), then for every latent
    (name -> (codes, generate)) code_metrics, generation_metrics, unintended_movement and, where the prior is N(0, I),
    sample_statistics of codes drawn from it and of training trials' codes. Adds to metrics; returns figure arrays."""
    Y, tr, va, ho, results = data.get("targets"), data["train"], data["val"], data["heldout"], {}
    if Y is None or not ho.any():
        return results
    B, X, rng = data.get("behaviour", Y), data["x"].reshape(len(Y), -1), np.random.default_rng(cfg.seed + 3)
    f = ridge(X[tr], B[tr], lam=1.0)                                # B (M, V): the end point first
    decode = lambda z: f(z.reshape(len(z), -1))                     # noqa: E731  (K, N, T) -> (K, N*T) -> (K, V)
    metrics.update(decoder_val_r2=r2(B[va], f(X[va])).tolist(), decoder_heldout_r2=r2(Y[ho], f(X[ho])[:, :2]).mean())
    for name, (C, generate) in latents.items():
        m, results[name] = code_metrics(C, data)
        m.update(generation_metrics(results[name]["c_bar"], results[name]["W"], generate, data, decode, cfg.n_gen))
        m_u, results[name]["steps"] = unintended_movement(C, B, tr, generate, decode, max(2, cfg.n_gen // 10))
        if name in ("GNOCCHI", "LFADS-like"):          # Fig. 1C: codes z ~ p(c) = N(0, I) next to real trials' codes
            z, real = rng.standard_normal((cfg.n_gen, C.shape[1])), C[rng.choice(np.flatnonzero(tr), cfg.n_gen)]
            m.update({f"{kind}_{k}": v for kind, c in (("uncond", z), ("cond", real))
                      for k, v in sample_statistics(generate(c), data, decode).items()})
        results[name]["metrics"] = {**m, **m_u}
        metrics.update({f"{name.split('-')[0].lower()}_{k}": v for k, v in results[name]["metrics"].items()})
    return results

def gnocchi_input(cfg, data, baselines):
    """GNOCCHI's trials x0 (M, N, T), z units. NOTE (choice): --input lfads, the default, is the paper's route (Fig. 5
    sets GNOCCHI on AutoLFADS-inferred rates against GNOCCHI on smoothed spikes): the LFADS-like model, trained first,
    infers each trial's rates (its generator at the posterior mean). On smoothed spikes (smooth) the code also keeps
    the trial's Poisson noise, which helps to denoise it; rates: the simulation's noise-free rates, an oracle.
    NOTE (deviation): AutoLFADS infers rates with a 100-d initial condition and inferred inputs tuned by population-
    based training; here they come from the baseline itself, a function of its L-d code."""
    if cfg.input == "lfads":
        codes, generate = baselines["LFADS-like"]
        return generate(codes)
    return data["truth"] if cfg.input == "rates" else data["x"]

def run_reach(cfg, data):
    """Train the baselines of Part II (the LFADS-like model first: its rates are GNOCCHI's input), then GNOCCHI on the
    training trials; evaluate every latent's codes and samples on the held-out targets. Returns (metrics, files)."""
    data, metrics = split_and_zscore(data, cfg.seed), {}
    M, N, T = data["x"].shape
    print(f"data: {M} trials, {N} neurons, {T} bins, {data['heldout'].sum()} held-out trials; on --input {cfg.input}")
    baselines = baseline_latents(cfg, data, metrics)                # Part II
    x = torch.tensor(gnocchi_input(cfg, data, baselines), dtype=torch.float32).to(cfg.device)
    model = GNOCCHI(cfg, N, T).to(cfg.device)
    print(f"GNOCCHI: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {cfg.device}" + (
        " -- WARNING: --paper is a GPU job (days on a CPU)" if (cfg.preset, cfg.device) == ("paper", "cpu") else ""))
    hist = train(model, x[torch.from_numpy(data["train"]).to(cfg.device)], cfg, cfg.steps,
                 lambda s: cfg.lr * lr_factor(s, cfg), lambda xb, s: model.loss(xb), "GNOCCHI")
    metrics.update({f"final_{k}": float(np.mean([h[k] for h in hist[-50:]])) for k in ("score", "mmd")})
    latents = {"GNOCCHI": gnocchi_latent(model, x, cfg.seed), **baselines}
    results = evaluate(cfg, data, latents, metrics)
    print("\n".join(f"  {k:<38} {np.round(v, 4)}" for k, v in metrics.items()))
    n = min(M, cfg.n_gen)                                           # samples.npz: the first n trials and samples of
    gen = latents["GNOCCHI"][1](latents["GNOCCHI"][0][:n]) * data["sd"] + data["mu"]  # their codes (z -> data units)
    return metrics, {**(figures(data, results) if results else {}), "gnocchi.pt": model.state_dict(),
                     "samples.npz": dict(real=data["rates"][:n].astype(np.float32), generated=gen.astype(np.float32))}

def run_seeds(cfg, data):
    """run_reach at the seeds seed .. seed + seeds - 1, each on data simulated at its seed (or the same --data file).
    Returns the first seed's files and metrics, plus <key>_mean and <key>_sd over the seeds of each number, and
    each seed's seconds in timing.json."""
    runs, first, timing = [], cfg.seed, {}
    for cfg.seed in range(first, first + cfg.seeds):                # each seed's data, split, models and samples
        set_seed(cfg.seed)
        t0 = time.time()
        runs.append(run_reach(cfg, data if cfg.seed == first or cfg.data else make_reach_data(cfg)))
        timing[f"seed_{cfg.seed}"] = round(time.time() - t0, 2)
    cfg.seed, (metrics, files) = first, runs[0]
    for k in [k for k, v in metrics.items() if isinstance(v, float) and cfg.seeds > 1]:
        values = [m[k] for m, _ in runs]
        metrics[f"{k}_mean"], metrics[f"{k}_sd"] = float(np.mean(values)), float(np.std(values, ddof=1))
        print(f"  {k:<38} {metrics[k + '_mean']:.4g} +- {metrics[k + '_sd']:.2g} over {cfg.seeds} seeds")
    return metrics, {**files, "timing.json": timing}

EXPERIMENTS = {"reach": (make_reach_data, run_seeds)}

# ==== Part II: the baselines at the same code size L, each a latent (codes, generator) scored by the same evaluation ==
def pca_latent(data, L):
    """PCA (fit on training trials) of the flattened z-scored rates, L axes V; its generator is mean + V c."""
    M, N, T = data["x"].shape
    X = data["x"].reshape(M, -1)                                    # (M, N, T) -> (M, N*T)
    mean = X[data["train"]].mean(0)
    V = np.linalg.svd(X[data["train"]] - mean, full_matrices=False)[2][:L].T  # (N*T, L) top principal axes
    return (X - mean) @ V, lambda c: (mean + c @ V.T).reshape(len(c), N, T)  # (K, N*T) -> (K, N, T)

class SeqVAE(nn.Module):
    """LFADS-like sequential VAE (Pandarinath et al. 2018; lfads-torch): a bidirectional GRU gives the posterior
    q(g0 | x) = N(mu, diag sigma^2) of the initial condition g0 in R^L; an autonomous generator GRU starts from
    h_0 = tanh(W g0 + b) (NOTE (choice): in the GRU's state range), unrolls T steps, and factors f_t = W_f h_t (no
    bias, as in LFADS) are read out linearly. A trial's code is mu. NOTE (deviation): no controller (inferred inputs),
    no coordinated dropout, a Gaussian (MSE) likelihood on the z-scored rates (not Poisson), prior N(0, I), CPU size."""

    def __init__(self, N, L, H=64, n_fac=16):
        super().__init__()
        self.encoder = nn.GRU(N, H, batch_first=True, bidirectional=True)
        self.to_post = nn.Linear(2 * H, 2 * L)                      # [h_fwd(T), h_bwd(0)] -> (mu, log sigma^2)
        self.to_h0, self.generator = nn.Linear(L, H), nn.GRU(1, H, batch_first=True)  # autonomous: input 0
        self.to_fac, self.readout = nn.Linear(H, n_fac, bias=False), nn.Linear(n_fac, N)

    def posterior(self, x):                                          # (B, N, T) -> 2 x (B, L)
        _, h = self.encoder(x.transpose(1, 2))                      # (B, T, N) in; h (2, B, H): final fwd, bwd states
        return self.to_post(torch.cat([h[0], h[1]], 1)).chunk(2, dim=1)

    def decode(self, g0, T):                                         # (B, L) -> (B, N, T)
        h, _ = self.generator(g0.new_zeros(len(g0), T, 1), torch.tanh(self.to_h0(g0))[None])  # (B, T, H)
        return self.readout(self.to_fac(h)).transpose(1, 2)         # (B, T, F) -> (B, T, N) -> (B, N, T)

    def loss(self, x, kl_weight=1.0):
        """Negative ELBO per trial / (N T): Gaussian reconstruction (unit variance) + KL(q(g0 | x) || N(0, I))."""
        mu, logvar = self.posterior(x)
        # g0 = mu + sigma * z (reparameterised sample)
        g0 = mu + (0.5 * logvar).exp() * torch.randn(mu.shape).to(mu.device)
        rec = 0.5 * ((self.decode(g0, x.shape[2]) - x) ** 2).sum((1, 2))
        # KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)   (closed-form Gaussian KL)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
        return (rec + kl_weight * kl).mean() / x[0].numel(), dict(kl=kl.mean().item())

def baseline_latents(cfg, data, metrics):
    """PCA, and unless lfads_steps is 0 the LFADS-like SeqVAE (lr 3e-3, KL weight ramped 0 -> 1 over the first half,
    as LFADS does); adds its KL per code dimension to metrics (~0 nats: switched off). Returns {name: (C, generate)}."""
    latents, (N, T) = {"PCA": pca_latent(data, cfg.code_dim)}, data["x"].shape[1:]
    if cfg.lfads_steps:
        vae, x = SeqVAE(N, cfg.code_dim).to(cfg.device), torch.tensor(data["x"], dtype=torch.float32).to(cfg.device)
        train(vae, x[torch.from_numpy(data["train"]).to(cfg.device)], cfg, cfg.lfads_steps, lambda s: 3e-3,
              lambda xb, s: vae.loss(xb, min(1.0, 2 * s / cfg.lfads_steps)), "LFADS-like")
        with torch.no_grad():
            mu, logvar = (v.cpu().double() for v in vae.eval().posterior(x))  # (M, L) each
        # KL_l = 1/2 (mu_l^2 + sigma_l^2 - 1 - log sigma_l^2), averaged over the training trials
        metrics["lfads_kl_per_dim"] = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar))[data["train"]].mean(0).tolist()
        latents["LFADS-like"] = (mu.cpu().numpy(), torch.no_grad()(  # generate: the mean output for codes c
            lambda c: vae.decode(torch.tensor(c, dtype=torch.float32).to(cfg.device), T).cpu().double().numpy()))
    return latents

# ==== Part III: figures (matplotlib imported inside them only), own data, then the block shared by the three files ====
def figures(data, results):
    """figures/latents.png, a row per latent: its codes on (w_x, w_y) coloured by target x (held-out trials outlined),
    and the decoded variables along the steps in w_x and in w_y (Fig. 3D)."""
    from matplotlib.figure import Figure
    Y, ho, fig = data["targets"], data["heldout"], Figure(figsize=(12, 3.5 * len(results)))
    for (name, res), (ax, *steps) in zip(results.items(), fig.subplots(len(results), 3, squeeze=False)):
        P = (res["codes"] - res["c_bar"]) @ np.linalg.pinv(res["W"]).T  # (M, L) -> (M, 2) coordinates in (w_x, w_y)
        ax.scatter(*P[~ho].T, c=Y[~ho, 0], s=4, cmap="coolwarm")
        ax.scatter(*P[ho].T, c=Y[ho, 0], s=18, cmap="coolwarm", edgecolors="k", linewidths=0.5)
        ax.set(title=f"{name}: codes, colour = target x", xlabel="w_x", ylabel="w_y")
        for a, ax in enumerate(steps):
            ax.plot(res["steps"][a][:, :4], label=["end x", "end y", "start x", "start y"][:res["steps"].shape[2]])
            ax.set(title=f"{name}: steps along w_{'xy'[a]}", xlabel="step", ylabel="decoded (cm)")
        ax.legend(fontsize=7)
    return {"figures/latents.png": fig}

def load_data(cfg):
    """--data: 'rates' (real-valued) or 'spikes' (integer counts >= 0, also a plain .npy; smoothed), both (trials,
    neurons, bins); optional 'targets' (trials, 2) and 'heldout' (trials,) bool. A problem is a ValueError naming the
    file, expectation and finding; > 500 spikes per bin (~2 ms refractory) or |rates| > 1e4 mean wrong units."""
    arrays = load_arrays(cfg.data)

    def need(ok, expected, found):
        check(ok, f"--data {cfg.data}: expected {expected}, found {found}")
    need(("rates" in arrays) != ("spikes" in arrays), "exactly one of the arrays 'rates' or 'spikes'",
         f"the arrays {sorted(arrays)}")
    key = "rates" if "rates" in arrays else "spikes"
    x = arrays[key].astype(np.float64)
    need(x.ndim == 3 and x.shape[0] >= 8 and x.shape[1] >= 1 and x.shape[2] >= 4,
         f"'{key}' shaped (trials >= 8, neurons, bins >= 4)", f"the shape {x.shape}")
    need(np.isfinite(x).all(), f"finite '{key}'", f"{np.isnan(x).sum()} NaN and {np.isinf(x).sum()} infinite values")
    bad = x[(x < 0) | (x != np.round(x))] if key == "spikes" else x[:0]
    need(len(bad) == 0, "non-negative integer spike counts in 'spikes' (a .npy file is read as spikes; save "
         "real-valued activity with np.savez(path, rates=...))", f"values such as {bad[:3].tolist()}")
    need(key == "rates" or x.max() <= 500, "at most 500 spikes per neuron per bin (a neuron fires at most ~500 "
         "spikes/s): re-bin to shorter bins, or check that the array holds counts", f"a count of {x.max():.0f}")
    need(key == "spikes" or np.abs(x).max() <= 1e4, "|rates| <= 10000 (firing rates stay below ~1000 "
         "spikes/s; far larger values are other units or another array, and near 1e19 their squares overflow "
         "float32): rescale them, e.g. to spikes/s", f"a value of {np.abs(x).max():.3g}")
    M, data, y = len(x), dict(rates=x @ smooth_matrix(x.shape[2], cfg.smooth_bins) if key == "spikes" else x), None
    if "targets" in arrays:
        y = data["targets"] = arrays["targets"]
        need(y.shape == (M, 2) and y.dtype != bool and np.isfinite(y).all(),
             f"finite numeric 'targets' (x, y) shaped ({M}, 2), one row per trial", f"{y.dtype} shaped {y.shape}")
    ho = data["heldout"] = arrays.get("heldout", np.zeros(M, bool))
    need(ho.dtype == bool and ho.shape == (M,), f"'heldout' as a bool array shaped ({M},)", f"{ho.dtype} {ho.shape}")
    need(not ho.any() or y is not None, "'targets' with 'heldout' (held-out metrics need targets)", "none")
    need((~ho).sum() >= 8, ">= 8 training (not held-out) trials", f"{(~ho).sum()}")
    return data


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
