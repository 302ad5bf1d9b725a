"""GNOCCHI: diffusion-generated neural activity from disentangled info codes, in one file (torch + numpy only).

McCart, Sedler, Versteeg, Mifsud, Rigotti-Thompson, Pandarinath, "Diffusion-Based Generation of Neural Activity from
Disentangled Latent Codes" (2024), https://arxiv.org/abs/2407.21195, built on InfoDiffusion (Wang et al., ICML 2023;
github.com/isjakewong/InfoDiffusion). Only GNOCCHI's abstract could be read, so the method follows InfoDiffusion's
code, cited by file: models.py, modules.py, sampling.py, utils.py, run.py.
Pipeline: trials x0 -> code c = f_phi(x0) -> diffusion on x0 given c -> navigate c* = c_bar + W b* to held-out targets
-> DDIM samples -> held-out evaluation. Sections (paper -> code):
  Part I   Data: minimum-jerk reaches on a 5x5 grid, 3 targets held out ........ make_reach_data, split_and_zscore
           Model: info-code encoder, AdaGN 1-D U-Net (models.py, modules.py) ... Encoder, AuxResBlock, UNet1D
           Objective: L_score + L_rec / T_diff + lambda MMD^2(c, N(0, I)) .......... mmd, GNOCCHI.loss
           Training: AdamW, clipping, warmup to 2 lr then cosine (run.py) ......... lr_factor, train
           Sampling and navigation: DDIM (sampling.py), c* = c_bar + W b* ...... ddim_sample, fit_navigation, navigate
           Evaluation: code SNR, held-out R^2, |cos(w_x, w_y)|, PSTH R^2, unwanted movement ... code_metrics, run_reach
  Part II  Baselines with the same code size: PCA of the rates, an LFADS-like sequential VAE ... pca_latent, SeqVAE
  Part III Figures, own data (load_data), the block shared by the three files (CLI, outputs, main)
Left out: the biomechanical arm (a random rate-RNN driven by minimum-jerk reaches instead), the monkey data, LFADS's
inferred inputs and hyperparameter search, reverse-DDIM editing.
  python gnocchi_minimal.py                     # ~5 min on a CPU: GNOCCHI, PCA and the LFADS-like baseline
  python gnocchi_minimal.py --quick             # ~10 s: every stage on a toy problem (numbers meaningless)
  python gnocchi_minimal.py --paper             # InfoDiffusion's scale (6.9M parameters, 20,000 steps): a GPU job
  python gnocchi_minimal.py --data trials.npz   # your own trials, see load_data
Shapes: B batch, N neurons, T time bins, C channels, L code dims, K samples, M trials; tensors are channels-first
(B, N, T): neurons are the U-Net's input channels, convolutions run over time. Markers: NOTE (deviation) differs
from InfoDiffusion's code or the paper (mostly CPU scale), NOTE (choice) a detail both leave open. Every random draw
is made on the CPU, then moved: one seed gives the same draws on every device.
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

# =====================================================================================================================
# Part I: GNOCCHI on the reach grid, evaluated on held-out targets (reads alone, in paper order)
# =====================================================================================================================
@dataclass
class Config:
    demo: str = "reach"          # experiment: reach (GNOCCHI and its baselines on the simulated reach grid)
    preset: str = ""             # set by --quick / --paper
    seed: int = 0                # random seed of the data, the split, the models and the samples
    device: str = "auto"         # auto | cpu | cuda | mps
    out: str = ""                # output folder; "" -> runs/gnocchi_minimal-<demo> (or -data)
    data: str = ""               # your own trials (.npz / .npy, see load_data); "" -> the simulated reaches
    threads: int = 0             # torch CPU threads; 0 -> torch's default
    n_neurons: int = 48          # N simulated neurons
    trials_per_target: int = 80  # simulated trials per grid target (25 targets)
    smooth_bins: float = 1.5     # Gaussian sd (bins) that smooths --data spikes (30 ms at 20 ms bins)
    code_dim: int = 4            # L, info-code size. NOTE (choice): 2 x the 2 behavioural factors (InfoDiffusion: 32)
    # NOTE (deviation): a CPU-sized U-Net (models.py AuxiliaryUNet: C 64, ch_mult (1,2,2,2), 2 res-blocks, GN(32),
    # every skip, attention at level 2 and in the middle; --paper builds that)
    channels: int = 32           # C, U-Net base channels (run.py --unets_channels)
    ch_mult: str = "1,2"         # channel multiplier per U-Net level (models.py ch_mult)
    res_blocks: int = 1          # AuxResBlocks per level on the way down (models.py num_res_blocks)
    attention: bool = False      # self-attention in the level-2 blocks and the first middle block (attn=[2])
    skip_all: bool = False       # AuxiliaryUNet's skips: head, every block and downsample; res_blocks + 1 up-blocks
    groups: int = 8              # GroupNorm groups (InfoDiffusion: 32, which needs >= 32 channels)
    dropout: float = 0.0         # res-block dropout. NOTE (choice): none for the short CPU run (InfoDiffusion: 0.1)
    # NOTE (deviation): T_diff 200 instead of 1000, with the linear betas rescaled to the same sum(beta) = 5 and
    # abar_T = 0.0067 as InfoDiffusion's 1e-5..1e-2 over 1000 steps (run.py --beta1, --betaT)
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
    # NOTE (choice): many samples, as the true PSTH is noise-free and the noise of a K-sample mean lowers R^2
    n_gen: int = 200             # K samples per navigated code, averaged into PSTHs
    eval_every: int = 400        # steps between validation code -> target R^2 checks

DEMOS = {"reach": {}}            # the reach demo's own field (the LFADS-like baseline's steps) is added in Part II
# --paper: AuxiliaryUNet, run.py's defaults and sampling.py's DDIM, with a_dim 32. NOTE (deviation): still different:
# 1-D convolutions over time, the conv encoder, the input skip of eps_theta, per-step schedules, T padded to a multiple
# of 8, the simulated data, the CPU-size LFADS-like baseline. NOTE (choice): 20,000 steps (InfoDiffusion's 20 MNIST
# epochs at batch 64 are ~19,000) with 1,000 of warmup (run.py: 1 of 20 epochs).
PRESETS = {
    "quick": (dict(n_neurons=24, trials_per_target=12, channels=16, diff_steps=50, ddim_steps=10, steps=40, warmup=5,
                   n_gen=4, eval_every=20, lfads_steps=20), "tiny smoke test of every stage (numbers meaningless)"),
    "paper": (dict(code_dim=32, channels=64, ch_mult="1,2,2,2", res_blocks=2, attention=True, skip_all=True,
                   groups=32, dropout=0.1, diff_steps=1000, beta_1=1e-5, beta_T=1e-2, ddim_steps=1000, ddim_eta=0.01,
                   lr=1e-4, steps=20000, warmup=1000, eval_every=2000), "InfoDiffusion's scale, for a GPU"),
}
CHOICES = {}
ZERO_OK = ("seed", "threads", "dropout", "ddim_eta", "mmd_weight", "weight_decay", "lfads_steps")

def check_config(cfg):
    check(all(m.strip().isdigit() and int(m) > 0 for m in cfg.ch_mult.split(",")),
          f"--ch-mult must be comma-separated positive integers such as 1,2,2,2, got {cfg.ch_mult!r}")
    check(cfg.channels % cfg.groups == 0 and cfg.channels % 2 == 0,
          f"--channels must be even and a multiple of --groups {cfg.groups} (GroupNorm), got {cfg.channels}")
    check(cfg.ddim_steps <= cfg.diff_steps, f"--ddim-steps must be <= --diff-steps {cfg.diff_steps}, got "
          f"{cfg.ddim_steps}")

# ---- Data: minimum-jerk reaches -> random rate-RNN "controller" -> Poisson spikes -> smoothed rates; the split ------
HELDOUT = ((-1, 1), (1, 0), (0, -1))  # interior, non-collinear grid targets held out of everything

def smooth_matrix(T, sigma):
    """(T, T) acausal Gaussian smoothing matrix (sigma in bins), columns renormalised at the edges: x @ K smooths the
    last axis of x."""
    lag = np.arange(T)[:, None] - np.arange(T)[None, :]
    K = np.exp(-0.5 * (lag / sigma) ** 2)
    return K / K.sum(0, keepdims=True)

def make_reach_data(cfg):
    """Synthetic reaching from its own seeded generator. Returns rates/true_rates (M, N, T) in Hz, targets (M, 2) cm,
    heldout (M,) bool, hand (M, T, 2), t_ms (T,). Start and duration are drawn independently of the target."""
    rng = np.random.default_rng(cfg.seed)
    spacing, dt, tau = 2.0, 10.0, 50.0  # grid spacing (cm), simulation step and RNN time constant (ms)
    grid = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3)])
    goal = np.repeat(grid * spacing, cfg.trials_per_target, axis=0)  # (25, 2) -> (M, 2) target per trial
    heldout = np.array([tuple(ij) in HELDOUT for ij in np.repeat(grid, cfg.trials_per_target, axis=0)])
    M = len(goal)
    start = rng.normal(0.0, 0.3 * spacing, (M, 2))  # start jitter, independent of target
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
    true_rates = lam @ K                       # = E[rates]: the noise-free ground truth
    return dict(rates=rates, true_rates=true_rates, targets=goal, heldout=heldout, hand=pos[:, keep][:, ::2],
                t_ms=t[keep][::2] + 10.0)      # hand (M, 36, 2): position per 20 ms bin (figures only)

def split_and_zscore(data, seed):
    """Split trials (held-out targets / 15% validation / train) and z-score every neuron with TRAINING statistics only,
    so held-out trials never touch training or normalisation. Adds x, truth (z units) and the masks."""
    M = len(data["rates"])
    data["val"] = ~data["heldout"] & (np.random.default_rng(seed + 1).random(M) < 0.15)
    data["train"] = ~data["heldout"] & ~data["val"]
    data["mu"] = data["rates"][data["train"]].mean((0, 2), keepdims=True)  # (1, N, 1)
    data["sd"] = data["rates"][data["train"]].std((0, 2), keepdims=True) + 1e-6
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
    -> L; the Linear sees the whole window, as models.py Encoder's flatten + fc_a does. NOTE (choice): a 3-layer conv
    stack instead of InfoDiffusion's U-Net encoder, and no GroupNorm in it: GN rescales each trial by its own feature
    statistics, which erases the overall rate level that carries the target."""

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
    """Self-attention over time bins with a residual (modules.py AttnBlock in 1-D): q, k, v = 1x1 convs of GN(x)."""

    def __init__(self, C, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, C)
        self.proj_q, self.proj_k, self.proj_v, self.proj = (nn.Conv1d(C, C, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.proj_q(h), self.proj_k(h), self.proj_v(h)  # (B, C, T) each
        # w_st = softmax_t(q_s . k_t / sqrt(C)); h_s = sum_t w_st v_t
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(x.shape[1]), dim=-1)  # (B, T, C) @ (B, C, T) -> (B, T, T)
        return x + self.proj(v @ w.transpose(1, 2))                 # (B, C, T) @ (B, T, T) -> (B, C, T)

class AuxResBlock(nn.Module):
    """modules.py AuxResBlock in 1-D: GN-SiLU-Conv; AdaGN h = GN(h)(1 + s_t) + b_t, then h = h(1 + s_c) + b_c (time
    FiLM first, then code FiLM); SiLU-Dropout-Conv; GN-SiLU-Dropout-Conv; residual shortcut; optional attention."""

    def __init__(self, c_in, c_out, tdim, dropout, attn=False, groups=8):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(groups, c_in), nn.SiLU(), nn.Conv1d(c_in, c_out, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, 2 * c_out))
        self.cemb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, 2 * c_out))
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
    up-block per level, as AuxiliaryUNet does), nearest upsampling + conv; tail GN-SiLU-Conv(C -> N), zero at init."""
    ATTN_LEVEL = 2  # the level (0-based) whose blocks have self-attention (models.py AuxiliaryUNet attn=[2])

    def __init__(self, N, C, L, T_diff, dropout, ch_mult=(1, 2), res_blocks=1, attention=False, skip_all=False,
                 groups=8):
        super().__init__()
        tdim = 4 * C
        half = C // 2  # sinusoidal table of width C -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C) (TimeEmbedding)
        ang = torch.arange(T_diff)[:, None] * torch.exp(-math.log(1e4) * torch.arange(half) / half)[None]
        self.register_buffer("sin_table", torch.cat([ang.sin(), ang.cos()], dim=1))  # (T_diff, C)
        self.time_mlp = nn.Sequential(nn.Linear(C, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.code_fc = nn.Linear(L, tdim)  # a_emb = Linear(L -> tdim)(c), computed once (AuxiliaryUNet fc_a)
        self.head = nn.Conv1d(N, C, 3, padding=1)
        self.skip_all = skip_all
        block = partial(AuxResBlock, tdim=tdim, dropout=dropout, groups=groups)
        skips, ch, down, downsample = ([C] if skip_all else []), C, [], []  # skips: channels of the stored outputs
        for lvl, mult in enumerate(ch_mult):
            level = []
            for _ in range(res_blocks):
                level.append(block(ch, C * mult, attn=attention and lvl == self.ATTN_LEVEL))
                ch = C * mult
                skips.append(ch)
            down.append(nn.ModuleList(level))
            if lvl < len(ch_mult) - 1:
                downsample.append(nn.Conv1d(ch, ch, 3, stride=2, padding=1))
                skips += [ch] if skip_all else []
        self.down, self.downsample = nn.ModuleList(down), nn.ModuleList(downsample)
        self.mid = nn.ModuleList([block(ch, ch, attn=attention), block(ch, ch)])
        up, upsample = [], []
        for lvl in reversed(range(len(ch_mult))):
            level = []
            for _ in range(res_blocks + skip_all):
                level.append(block(skips.pop() + ch, C * ch_mult[lvl], attn=attention and lvl == self.ATTN_LEVEL))
                ch = C * ch_mult[lvl]
            up.append(nn.ModuleList(level))
            if lvl > 0:
                upsample.append(nn.Conv1d(ch, ch, 3, padding=1))
        self.up, self.upsample = nn.ModuleList(up), nn.ModuleList(upsample)
        self.tail = nn.Sequential(nn.GroupNorm(groups, C), nn.SiLU(), nn.Conv1d(C, N, 3, padding=1))
        xavier_init(self)
        nn.init.zeros_(self.tail[-1].weight)  # NOTE (choice): exact zeros (models.py: xavier with gain 1e-5, ~zero)

    def forward(self, x, i, c):
        T = x.shape[-1]
        x = F.pad(x, (0, -T % 2 ** len(self.downsample)), mode="replicate")  # NOTE (choice): pad T to fit the levels
        temb = self.time_mlp(self.sin_table[i])                 # (B,) -> (B, 4C)
        cemb = self.code_fc(c)                                  # (B, L) -> (B, 4C)
        h = self.head(x)                                        # (B, N, T) -> (B, C, T)
        hs = [h] if self.skip_all else []
        for lvl, level in enumerate(self.down):
            for blk in level:
                h = blk(h, temb, cemb)                          # (B, C_in, T') -> (B, C * ch_mult[lvl], T')
                hs.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)                     # (B, C', T') -> (B, C', T'/2)
                hs += [h] if self.skip_all else []
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
    L = x.shape[1]
    k_xx = torch.exp(-torch.cdist(x, x).pow(2) / L**2)  # (B, L), (B', L) -> (B, B')
    k_yy = torch.exp(-torch.cdist(y, y).pow(2) / L**2)
    k_xy = torch.exp(-torch.cdist(x, y).pow(2) / L**2)
    return k_xx.mean() + k_yy.mean() - 2 * k_xy.mean()

class GNOCCHI(nn.Module):
    """Auxiliary-variable diffusion model: prior p(c) = N(0, I_L), encoder c = f_phi(x0), decoder = DDPM reverse chain
    p_theta(x_{i-1} | x_i, c) with noise predictor eps_theta(x_i, i, c) (models.py InfoDiff)."""

    def __init__(self, cfg: Config, N, T):
        super().__init__()
        self.cfg, self.N, self.T = cfg, N, T
        self.encoder = Encoder(N, T, cfg.channels, cfg.code_dim)
        self.eps_model = UNet1D(N, cfg.channels, cfg.code_dim, cfg.diff_steps, cfg.dropout,
                                ch_mult=[int(m) for m in cfg.ch_mult.split(",")], res_blocks=cfg.res_blocks,
                                attention=cfg.attention, skip_all=cfg.skip_all, groups=cfg.groups)
        beta = torch.linspace(cfg.beta_1, cfg.beta_T, cfg.diff_steps)  # linear schedule (models.py InfoDiff)
        self.register_buffer("beta", beta)
        self.register_buffer("alpha_bar", torch.cumprod(1 - beta, 0))  # abar_i = prod_{j<=i} (1 - beta_j)

    def eps_theta(self, x_i, i, c):
        """eps_theta(x_i, i, c) = sqrt(1 - abar_i) x_i + sqrt(abar_i) UNet(x_i, i, c).
        NOTE (deviation): an input skip (EDM-style preconditioning; equivalently the U-Net predicts v). The loss is
        still the eps-MSE, but eps_hat ~ x_i at high noise no longer has to pass through the U-Net: with neurons as
        channels and C < 2N, the GN-SiLU-Conv tail cannot represent that identity, and DDIM's first steps amplify the
        residual error by 1/sqrt(abar_i). At init (zero output conv) eps_hat is the Bayes-optimal denoiser for
        unit-Gaussian data."""
        ab = self.alpha_bar[i][:, None, None]  # (B,) -> (B, 1, 1)
        return (1 - ab).sqrt() * x_i + ab.sqrt() * self.eps_model(x_i, i, c)

    def q_sample(self, x0, i, eps):
        """Forward process x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps (GNOCCHI abstract; DDPM Eq. 4)."""
        ab = self.alpha_bar[i][:, None, None]  # (B,) -> (B, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, x0, i=None, eps=None):
        """One minibatch of models.py InfoDiff.loss_fn (MMD path, no KL); i and eps are drawn unless given. Returns
        (total, dict of float parts)."""
        i = torch.randint(0, self.cfg.diff_steps, (len(x0),)).to(x0.device) if i is None else i  # i ~ U{0..T-1}
        eps = torch.randn(x0.shape).to(x0.device) if eps is None else eps
        c = self.encoder(x0)                                  # code from the clean x0, deterministic
        eps_hat = self.eps_theta(self.q_sample(x0, i, eps), i, c)
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
        """Generate one trial per code c (K, L) from x_T ~ N(0, I) (drawn from the CPU generator gen) with DDIM.
        Returns (K, N, T)."""
        x_T = torch.randn((len(c), self.N, self.T), generator=gen).to(c.device)
        return ddim_sample(partial(self.eps_theta, c=c), x_T, self.alpha_bar, steps or self.cfg.ddim_steps,
                           self.cfg.ddim_eta, gen)

# ---- Training: AdamW, gradient clipping, gradual warmup then cosine (run.py). Standard PyTorch. -------------------
def lr_factor(step, cfg):
    """Learning rate / cfg.lr after `step` optimiser steps: run.py's GradualWarmupScheduler (utils.py, multiplier 2)
    then CosineAnnealingLR, per step instead of per epoch:
    1 + s / w for s < w (lr -> 2 lr), then 1 + cos(pi (s - w) / (S - w)) = 2 (1 + cos) / 2 (2 lr -> 0)."""
    if step < cfg.warmup:
        return 1 + step / cfg.warmup
    return 1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))

def train(model, x, data, cfg):
    """AdamW + grad-norm clip 1.0 + lr_factor (run.py train) on the training trials of x (M, N, T). Every eval_every
    steps, the validation code -> target R^2 (the earliest sign that codes carry target information). Returns the
    per-step history of the loss parts."""
    x_train = x[torch.from_numpy(data["train"]).to(x.device)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    progress, hist, val_r2 = Progress("GNOCCHI", cfg.steps), [], float("nan")
    for step in range(1, cfg.steps + 1):
        model.train()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step - 1, cfg)
        idx = torch.randint(0, len(x_train), (cfg.batch,)).to(x.device)
        loss, parts = model.loss(x_train[idx])
        value = loss.item()
        check(math.isfinite(value), f"GNOCCHI: the training loss became {value} at step {step}; likely cause: a "
              "learning rate too high for this data (lower --lr) or extreme inputs", FloatingPointError)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        parts["step"] = step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_r2 = parts["val_code_r2"] = val_code_r2(model, x, data)
        hist.append(parts)
        progress(step, loss=value, mmd=parts["mmd"], val_code_r2=val_r2)
    return hist

# ---- Sampling and navigation: DDIM from a code; c* = c_bar + W b* ----------------------------------------------------
def ddim_sample(eps_fn, x_T, alpha_bar, steps, eta=0.0, gen=None):
    """DDIM (Song et al. 2021, Eq. 12) on a strided subsequence of the T_diff steps; eta = 0 is deterministic, and
    eta = 0.01 over every step is sampling.py's "deterministic" sampler. Noise z comes from the CPU generator gen.
    NOTE (choice): textbook indexing (sampling.py uses abar_{i-1} where abar_i is meant)."""
    seq = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long().tolist()
    x = x_T
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

def fit_navigation(C, Y):
    """Navigation directions from training trials: C ~ 1 c_bar^T + Y W^T by least squares. C (M, L) codes, Y (M, 2)
    targets. Returns c_bar (L,) and W (L, 2), whose columns w_x, w_y are the code displacement per cm."""
    A = np.linalg.lstsq(np.c_[np.ones(len(Y)), Y], C, rcond=None)[0]  # (1 + 2, L)
    return A[0], A[1:].T

def navigate(c_bar, W, b):
    """The code of behaviour b* (K, 2): c* = c_bar + W b*. Returns (K, L)."""
    return c_bar + b @ W.T

def encode(model, x):
    """Codes c = f_phi(x0) of the trials x (M, N, T) -> (M, L), float64 numpy (on the CPU: MPS has no float64)."""
    model.eval()
    with torch.no_grad():
        return model.encoder(x).cpu().numpy().astype(np.float64)

def gnocchi_latent(model, x, seed):
    """GNOCCHI as a latent: (codes (M, L), generate: codes (K, L) -> DDIM samples (K, N, T) in z units). The x_T (and
    DDIM noise) draws of the whole evaluation come from one seeded CPU generator, in chunks of 256 codes."""
    codes, gen = encode(model, x), torch.Generator().manual_seed(seed + 2)

    def generate(c):
        chunks = np.split(c, np.arange(256, len(c), 256))
        samples = [model.sample(torch.tensor(cb, dtype=torch.float32).to(x.device), gen) for cb in chunks]
        return np.concatenate([s.cpu().numpy().astype(np.float64) for s in samples])
    return codes, generate

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

def mean_error(y, y_hat):
    """Mean Euclidean distance between the rows of y and y_hat (cm for targets)."""
    return float(np.linalg.norm(y - y_hat, axis=1).mean())

def code_snr(C, labels):
    """Between-condition over within-condition code variance: tr Cov_k(mu_k) / mean_k tr(Sigma_k)."""
    ks = np.unique(labels)
    mu = np.stack([C[labels == k].mean(0) for k in ks])
    within = np.mean([((C[labels == k] - mu[j]) ** 2).sum(1).mean() for j, k in enumerate(ks)])
    return float(((mu - mu.mean(0)) ** 2).sum(1).mean() / within)

def fit_decoder(data):
    """Linear trial-level decoder of the target from the flattened z-scored rates, fit on real training trials; it
    reads out generated trials. NOTE (choice): ridge with lam 1. Returns decode: (K, N, T) -> (K, 2)."""
    x_train = data["x"][data["train"]]
    f = ridge(x_train.reshape(len(x_train), -1), data["targets"][data["train"]], lam=1.0)  # (M, N, T) -> (M, N*T)
    return lambda x: f(x.reshape(len(x), -1))                        # (K, N, T) -> (K, N*T) -> (K, 2)

def val_code_r2(model, x, data):
    """Validation R^2 of a code -> target regression fit on training trials (0 without targets)."""
    if "targets" not in data:
        return 0.0
    C, Y = encode(model, x), data["targets"]
    return float(r2(Y[data["val"]], ridge(C[data["train"]], Y[data["train"]])(C[data["val"]])).mean())

def code_metrics(C, data):
    """Codes alone: code SNR, the code -> target regression on validation and held-out trials, the navigation
    directions and their |cos(w_x, w_y)|. C (M, L). Returns (metrics, arrays for figures)."""
    tr, va, ho, Y = data["train"], data["val"], data["heldout"], data["targets"]
    lab = np.unique(Y, axis=0, return_inverse=True)[1].ravel()      # (M,) target index
    m = dict(snr_train=code_snr(C[tr], lab[tr]), snr_heldout=code_snr(C[ho], lab[ho]))
    f = ridge(C[tr], Y[tr])                                         # code -> target regression, training trials only
    m["val_r2"] = float(r2(Y[va], f(C[va])).mean())
    pred = f(C[ho])
    r = r2(Y[ho], pred)
    m.update(heldout_r2_x=float(r[0]), heldout_r2_y=float(r[1]), heldout_r2=float(r.mean()),
             heldout_err_cm=mean_error(Y[ho], pred))
    c_bar, W = fit_navigation(C[tr], Y[tr])
    # |cos(w_x, w_y)| = |w_x . w_y| / (|w_x| |w_y|)
    m["cos_wx_wy"] = float(abs(W[:, 0] @ W[:, 1]) / np.linalg.norm(W[:, 0]) / np.linalg.norm(W[:, 1]))
    for a, ax in enumerate("xy"):                                   # per-axis SNR along the unit navigation direction
        m[f"snr_{ax}"] = code_snr((C[tr] @ (W[:, a] / np.linalg.norm(W[:, a])))[:, None], lab[tr])
    return m, dict(codes=C, pred=pred, c_bar=c_bar, W=W)

def generation_metrics(c_bar, W, generate, data, decode, K):
    """Navigated samples: PSTH R^2 against the noise-free truth for each held-out target, the decoded end points, and
    the unwanted movement of a traversal along w_x or w_y. generate: codes (K, L) -> z-scored trials (K, N, T)."""
    Y, m = data["targets"], {}
    b_star = np.unique(Y[data["heldout"]], axis=0)                  # (n_ho, 2) held-out targets
    gen = generate(np.repeat(navigate(c_bar, W, b_star), K, axis=0))  # (n_ho * K, N, T)
    psth_g = gen.reshape(len(b_star), K, *gen.shape[1:]).mean(1)    # (n_ho, K, N, T) -> (n_ho, N, T)
    psth_t = np.stack([data["truth"][(Y == b).all(1)].mean(0) for b in b_star])  # noise-free condition average
    # NOTE (choice): R^2 per neuron pooled over held-out targets x time, then the mean over neurons
    pg, pt = (p.transpose(1, 0, 2).reshape(p.shape[1], -1) for p in (psth_g, psth_t))  # (n_ho, N, T) -> (N, n_ho T)
    r_n = r2(pt, pg, axis=1)                                        # (N,) per neuron
    m["psth_r2"], m["psth_r2_median"] = float(r_n.mean()), float(np.median(r_n))
    # read generated trials with the decoder fit on real training trials: end point vs intended target
    m["gen_endpoint_err_cm"] = mean_error(decode(gen), np.repeat(b_star, K, axis=0))
    # unwanted movement: traverse c(delta) = c_bar + delta w_a, decode, |off-axis slope| / |on-axis slope|
    deltas, Kt, trav = np.linspace(-4.0, 4.0, 5), max(2, K // 5), []  # cm (the grid's extent); samples per step
    for a, ax in enumerate("xy"):
        yt = decode(generate(np.repeat(navigate(c_bar, W, deltas[:, None] * np.eye(2)[a]), Kt, axis=0)))  # (5 Kt, 2)
        slope = np.polyfit(np.repeat(deltas, Kt), yt, 1)[0]         # (2,) slope of decoded x and y on delta
        m[f"unwanted_{ax}"] = float(abs(slope[1 - a]) / abs(slope[a]))
        trav.append(yt)
    m["unwanted"] = (m["unwanted_x"] + m["unwanted_y"]) / 2
    return m, dict(gen=gen, psth_g=psth_g, psth_t=psth_t, psth_r2_neurons=r_n, b_star=b_star, trav=trav)

def evaluate(cfg, data, latents, metrics):
    """The behaviour decoder's ceiling on real trials, then code_metrics and generation_metrics of every latent
    (name -> (codes, generate)) when there are held-out targets. Adds to metrics; returns name -> arrays."""
    Y, va, ho, results = data.get("targets"), data["val"], data["heldout"], {}
    if Y is None:
        return results
    decode = fit_decoder(data)
    metrics["sanity_decode_val_r2"] = float(r2(Y[va], decode(data["x"][va])).mean())
    if not ho.any():
        return results
    y_real = decode(data["x"][ho])                                  # the ceiling for decoding generated trials
    metrics.update(decoder_real_heldout_r2=float(r2(Y[ho], y_real).mean()),
                   decoder_real_heldout_err_cm=mean_error(y_real, Y[ho]))
    for name, (C, generate) in latents.items():
        m, results[name] = code_metrics(C, data)
        m_gen, arrays = generation_metrics(results[name]["c_bar"], results[name]["W"], generate, data, decode,
                                           cfg.n_gen)
        results[name].update(arrays, metrics={**m, **m_gen})
        metrics.update({f"{name.split('-')[0].lower()}_{k}": v for k, v in results[name]["metrics"].items()})
    return results

def run_reach(cfg, data):
    """Train GNOCCHI on the training targets, then evaluate its codes and navigated samples on the held-out targets,
    next to the baselines of Part II at the same code size. Returns (metrics, files)."""
    data = split_and_zscore(data, cfg.seed)
    M, N, T = data["x"].shape
    print(f"data: {M} trials, {N} neurons, {T} bins; {data['train'].sum()} train / {data['val'].sum()} val / "
          f"{data['heldout'].sum()} held-out trials; median rate {np.median(data['rates']):.3g}")
    model = GNOCCHI(cfg, N, T).to(cfg.device)
    n_par = sum(p.numel() for p in model.parameters())
    print(f"GNOCCHI: {n_par / 1e6:.2f}M parameters on {cfg.device}" + (" -- WARNING: --paper is InfoDiffusion's "
          "scale, a GPU job (a day or more on a CPU)" if cfg.preset == "paper" and cfg.device == "cpu" else ""))
    x, t0 = torch.tensor(data["x"], dtype=torch.float32).to(cfg.device), time.time()
    hist = train(model, x, data, cfg)
    tail = hist[-50:]
    metrics = dict(final_score_loss=float(np.mean([h["score"] for h in tail])),
                   final_mmd=float(np.mean([h["mmd"] for h in tail])), val_code_r2=hist[-1]["val_code_r2"])
    latents = {"GNOCCHI": gnocchi_latent(model, x, cfg.seed), **baseline_latents(cfg, data, metrics)}  # Part II
    timing = dict(train=round(time.time() - t0, 2))
    # conditional generation from the codes of real trials: how much of x0 does c pin down?
    n = min(M, 100)
    recon = latents["GNOCCHI"][1](latents["GNOCCHI"][0][:n])
    metrics["recon_r2"] = float(1 - ((recon - data["x"][:n]) ** 2).sum() / (data["x"][:n] ** 2).sum())
    results = evaluate(cfg, data, latents, metrics)
    timing["evaluate"] = round(time.time() - t0 - timing["train"], 2)
    print("\n".join(f"  {k:<38} {v:.4g}" for k, v in metrics.items()))
    # samples.npz: the navigated held-out samples next to the real held-out trials (else the reconstructions)
    real, gen = (data["rates"][data["heldout"]], results["GNOCCHI"]["gen"]) if results else (data["rates"][:n], recon)
    files = {**task_figure(data), **latent_figures(data, results), **psth_figures(results, hist)} if results else {}
    files["samples.npz"] = dict(real=real.astype(np.float32),
                                generated=(gen * data["sd"] + data["mu"]).astype(np.float32))  # z -> data units
    codes = dict(codes=latents["GNOCCHI"][0], baseline_codes=latents["PCA"][0], heldout=data["heldout"],
                 targets=data.get("targets"), lfads_codes=latents.get("LFADS-like", (None,))[0])
    files["codes.npz"] = {k: v for k, v in codes.items() if v is not None}
    return metrics, {**files, "gnocchi.pt": model.state_dict(), "timing.json": timing}

EXPERIMENTS = {"reach": (make_reach_data, run_reach)}

# =====================================================================================================================
# Part II: the baselines at the same code size L, each a latent (codes, generator) scored by the same evaluation
# =====================================================================================================================
DEMOS["reach"].update(
    lfads_steps=800,             # training steps of the LFADS-like baseline (0: skip it; PCA always runs)
)

def pca_latent(data, L):
    """PCA (fit on training trials) of the flattened z-scored rates with the same L. Its generator is the linear
    reconstruction mean + V c."""
    M, N, T = data["x"].shape
    X = data["x"].reshape(M, -1)                                    # (M, N, T) -> (M, N*T)
    mean = X[data["train"]].mean(0)
    V = np.linalg.svd(X[data["train"]] - mean, full_matrices=False)[2][:L].T  # (N*T, L) top principal axes

    def generate(c):
        return (mean + c @ V.T).reshape(len(c), N, T)               # (K, N*T) -> (K, N, T)
    return (X - mean) @ V, generate

class SeqVAE(nn.Module):
    """LFADS-like sequential VAE (Pandarinath et al. 2018; lfads-torch): a bidirectional GRU reads the trial and gives
    the posterior q(g0 | x) = N(mu, diag sigma^2) of the initial condition g0 in R^L; an autonomous generator GRU
    starts from h_0 = tanh(W g0 + b) (NOTE (choice): tanh keeps h_0 in the GRU's state range) and unrolls T steps;
    factors f_t = W_f h_t (no bias, as in LFADS) are read out linearly. The code of a trial is mu, as GNOCCHI's is
    f_phi(x0).
    NOTE (deviation): no controller (inferred inputs), no coordinated dropout, a Gaussian (MSE) likelihood on the
    z-scored smoothed rates instead of Poisson on counts (this data set's model input), prior N(0, I), CPU widths."""

    def __init__(self, N, L, H=64, n_fac=16):
        super().__init__()
        self.encoder = nn.GRU(N, H, batch_first=True, bidirectional=True)
        self.to_post = nn.Linear(2 * H, 2 * L)                      # [h_fwd(T), h_bwd(0)] -> (mu, log sigma^2)
        self.to_h0 = nn.Linear(L, H)
        self.generator = nn.GRU(1, H, batch_first=True)             # autonomous: its input is a constant zero
        self.to_fac = nn.Linear(H, n_fac, bias=False)
        self.readout = nn.Linear(n_fac, N)

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
        return (rec + kl_weight * kl).mean() / x[0].numel(), kl.mean().item()

def lfads_latent(data, cfg):
    """Train SeqVAE with L = code_dim on the training trials (Adam lr 3e-3, KL weight ramped 0 -> 1 over the first
    half, as LFADS ramps its KL weight). Returns (codes mu (M, L), generator c (K, L) -> (K, N, T), final KL)."""
    N, T = data["x"].shape[1:]
    vae = SeqVAE(N, cfg.code_dim).to(cfg.device)
    x = torch.tensor(data["x"], dtype=torch.float32).to(cfg.device)
    x_tr = x[torch.from_numpy(data["train"]).to(cfg.device)]
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    progress, kl = Progress("LFADS-like", cfg.lfads_steps), float("nan")
    for step in range(1, cfg.lfads_steps + 1):
        idx = torch.randint(0, len(x_tr), (cfg.batch,)).to(cfg.device)
        loss, kl = vae.loss(x_tr[idx], min(1.0, 2 * step / cfg.lfads_steps))
        value = loss.item()
        check(math.isfinite(value), f"LFADS-like: the training loss became {value} at step {step}; likely cause: "
              "extreme inputs or an unstable GRU (check the data's scale)", FloatingPointError)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress(step, loss=value, kl=kl)
    vae.eval()
    with torch.no_grad():
        codes = vae.posterior(x)[0].cpu().numpy().astype(np.float64)  # (M, L) posterior means

    def generate(c):                                                 # the generator's mean output for codes c
        with torch.no_grad():
            return vae.decode(torch.tensor(c, dtype=torch.float32).to(cfg.device), T).cpu().numpy().astype(np.float64)
    return codes, generate, kl

def baseline_latents(cfg, data, metrics):
    """The baselines that run_reach evaluates next to GNOCCHI: PCA, and the LFADS-like VAE unless lfads_steps is 0
    (its final KL goes into metrics). Returns name -> (codes (M, L), generate)."""
    latents = {"PCA": pca_latent(data, cfg.code_dim)}
    if cfg.lfads_steps:
        codes, generate, metrics["lfads_final_kl"] = lfads_latent(data, cfg)
        latents["LFADS-like"] = (codes, generate)
    return latents

# =====================================================================================================================
# Part III: figures (matplotlib is imported inside them only) and own data; then the block shared by the three files
# =====================================================================================================================
def task_figure(data):
    """figures/task.png (simulated data only): grid and held-out targets with hand paths, neuron 0's PSTH by target,
    one trial."""
    from matplotlib.figure import Figure
    if "hand" not in data:
        return {}
    Y, ho, fig = data["targets"], data["heldout"], Figure(figsize=(10, 3.2))
    a, span = fig.subplots(1, 3), Y.max() - Y.min() + 1e-9
    for k in np.unique(Y, axis=0):
        sel = np.flatnonzero((Y == k).all(1))[:3]
        a[0].plot(*data["hand"][sel].transpose(2, 1, 0), color="k" if ho[sel[0]] else "0.6", lw=0.8)
        colour = ((k[0] - Y.min()) / span, 0.3, (k[1] - Y.min()) / span)
        a[1].plot(data["t_ms"], data["rates"][(Y == k).all(1), 0].mean(0), color=colour)
    a[0].scatter(*Y[~ho].T, c="tab:blue", label="train target")
    a[0].scatter(*Y[ho].T, c="tab:red", marker="*", s=120, label="held out")
    a[0].legend(fontsize=7)
    a[0].set_title("targets and hand paths (cm)")
    a[1].set(title="neuron 0 PSTH by target", xlabel="ms from onset", ylabel="Hz")
    a[2].imshow(data["rates"][0], aspect="auto", cmap="viridis")
    a[2].set(title="one trial", xlabel="bin", ylabel="neuron")
    return {"figures/task.png": fig}

def latent_figures(data, results):
    """One column (or row) per latent: codes on (w_x, w_y) coloured by target (held-out trials outlined), predicted
    held-out targets, and the decoded end points of the traversals along w_x and w_y."""
    from matplotlib.figure import Figure
    Y, ho, R = data["targets"], data["heldout"], len(results)
    latents, pred, trav = Figure(figsize=(9, 4 * R)), Figure(figsize=(4 * R, 3.5)), Figure(figsize=(4 * R, 3.5))
    for r, (name, res) in enumerate(results.items()):
        P = (res["codes"] - res["c_bar"]) @ np.linalg.pinv(res["W"]).T  # (M, L) -> (M, 2) coordinates in (w_x, w_y)
        for a in range(2):
            ax = latents.add_subplot(R, 2, 2 * r + a + 1)
            ax.scatter(*P[~ho].T, c=Y[~ho, a], s=4, cmap="coolwarm")
            ax.scatter(*P[ho].T, c=Y[ho, a], s=18, cmap="coolwarm", edgecolors="k", linewidths=0.5)
            ax.set(title=f"{name}: colour = target {'xy'[a]}", xlabel="w_x", ylabel="w_y")
        ax = pred.add_subplot(1, R, r + 1)
        ax.scatter(*res["pred"].T, s=6, c=np.unique(Y[ho], axis=0, return_inverse=True)[1].ravel(), cmap="tab10")
        ax.scatter(*res["b_star"].T, marker="*", s=200, c="k")
        ax.set(title=f"{name}: predicted held-out targets")
        ax = trav.add_subplot(1, R, r + 1)
        for a, marker in enumerate("ox"):
            ax.scatter(*res["trav"][a].T, c=np.repeat(np.arange(5), len(res["trav"][a]) // 5), cmap="viridis",
                       marker=marker, s=12, label=f"sweep along w_{'xy'[a]}")
        ax.legend(fontsize=7)
        ax.set(title=f"{name}: decoded endpoints", xlabel="x (cm)", ylabel="y (cm)")
    return {"figures/latents.png": latents, "figures/heldout_prediction.png": pred, "figures/traversal.png": trav}

def psth_figures(results, hist):
    """GNOCCHI's generated vs true PSTHs of held-out targets (z units) with the per-neuron R^2 histogram, and a summary:
    bars of the main metrics per latent and the training curve of L_score."""
    from matplotlib.figure import Figure
    res, psth, summary = results["GNOCCHI"], Figure(figsize=(12, 3)), Figure(figsize=(12, 3))
    for n in range(4):
        ax = psth.add_subplot(1, 5, n + 1)
        for k in range(len(res["b_star"])):
            ax.plot(res["psth_t"][k, n], color=f"C{k}")
            ax.plot(res["psth_g"][k, n], "--", color=f"C{k}")
        ax.set(title=f"neuron {n}: true -, generated --", xlabel="bin")
    ax = psth.add_subplot(1, 5, 5)
    ax.hist(res["psth_r2_neurons"], bins=20)
    ax.set(title="per-neuron PSTH R^2")
    keys = ["snr_train", "heldout_r2", "psth_r2", "cos_wx_wy", "unwanted"]
    for j, k in enumerate(keys):
        ax = summary.add_subplot(1, len(keys) + 1, j + 1)
        ax.bar(list(results), [r["metrics"][k] for r in results.values()], color=["C1", "C7", "C2"][:len(results)])
        ax.set(title=k)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    ax = summary.add_subplot(1, len(keys) + 1, len(keys) + 1)
    ax.semilogy([h["step"] for h in hist], [h["score"] for h in hist], lw=0.5)
    ax.set(title="L_score", xlabel="step")
    return {"figures/psth.png": psth, "figures/summary.png": summary}

MAX_COUNT = 500   # spikes per neuron per bin: a neuron fires at most ~500 spikes/s (refractory period ~2 ms)
MAX_RATE = 1e4    # |rates|: 10x the fastest firing rates in spikes/s; larger means wrong units or a wrong array

def load_data(cfg):
    """--data: 'rates' (real-valued) or 'spikes' (non-negative integer counts, also a plain .npy), both (trials,
    neurons, bins); optional 'targets' (trials, 2) and 'heldout' (trials,) bool. Spikes are smoothed with a Gaussian
    of cfg.smooth_bins bins. Each problem is a ValueError naming the file, the expectation and the finding."""
    arrays = load_arrays(cfg.data)

    def need(ok, expected, found):
        check(ok, f"--data {cfg.data}: expected {expected}, found {found}")
    need(("rates" in arrays) != ("spikes" in arrays), "exactly one of the arrays 'rates' or 'spikes'",
         f"the arrays {sorted(arrays)}")
    key = "rates" if "rates" in arrays else "spikes"
    x = arrays[key]
    need(x.ndim == 3 and x.shape[0] >= 8 and x.shape[1] >= 1 and x.shape[2] >= 4,
         f"'{key}' shaped (trials >= 8, neurons, bins >= 4)", f"the shape {x.shape}")
    x = x.astype(np.float64)
    need(np.isfinite(x).all(), f"finite '{key}'", f"{np.isnan(x).sum()} NaN and {np.isinf(x).sum()} infinite values")
    if key == "spikes":
        bad = x[(x < 0) | (x != np.round(x))]
        need(len(bad) == 0, "non-negative integer spike counts in 'spikes' (a .npy file is read as spikes; save "
             "real-valued activity with np.savez(path, rates=...))", f"values such as {bad[:3].tolist()}")
        need(x.max() <= MAX_COUNT, f"at most {MAX_COUNT} spikes per neuron per bin (a neuron fires at most ~500 "
             "spikes/s): re-bin to shorter bins, or check that the array holds counts", f"a count of {x.max():.0f}")
    else:
        need(np.abs(x).max() <= MAX_RATE, f"|rates| <= {MAX_RATE:.0f} (firing rates stay below ~1000 spikes/s; far "
             "larger values are other units or another array, and near 1e19 their squares overflow float32): rescale "
             "them, e.g. to spikes/s", f"a value of {np.abs(x).max():.3g}")
    M, data = len(x), dict(rates=x @ smooth_matrix(x.shape[2], cfg.smooth_bins) if key == "spikes" else x)
    if "targets" in arrays:
        y = arrays["targets"]
        need(y.shape == (M, 2) and y.dtype != bool and np.isfinite(y).all(),
             f"finite numeric 'targets' (x, y) shaped ({M}, 2), one row per trial", f"{y.dtype} shaped {y.shape}")
        data["targets"] = y.astype(float)
    ho = data["heldout"] = arrays.get("heldout", np.zeros(M, bool))
    need(ho.dtype == bool and ho.shape == (M,), f"'heldout' as a bool array shaped ({M},)", f"{ho.dtype} {ho.shape}")
    need(not ho.any() or "targets" in arrays, "'targets' with 'heldout' (held-out metrics need targets)", "none")
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
