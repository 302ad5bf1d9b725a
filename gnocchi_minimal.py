"""GNOCCHI: diffusion-generated neural activity from disentangled info codes, in one file (torch + numpy only).

McCart, Sedler, Versteeg, Mifsud, Rigotti-Thompson, Pandarinath, "Diffusion-Based Generation of Neural Activity from
Disentangled Latent Codes" (2024), https://arxiv.org/abs/2407.21195, built on InfoDiffusion (Wang et al., ICML 2023,
code: isjakewong/InfoDiffusion). Only GNOCCHI's abstract could be read: everything GNOCCHI-specific below is either
InfoDiffusion's code (marked [C]) or a reasoned choice (`# NOTE (choice)`); CPU changes are `# NOTE (deviation)`.

Sections (paper / spec map):
  Data         synthetic centre-out reaching on a 5x5 target grid, 3 interior targets held out (spec s3)
  Model        info-code encoder c = f_phi(x0); 1-D temporal U-Net eps_theta(x_i, i, c) with AdaGN (spec s1.4-1.5)
  Diffusion    x_i = sqrt(abar_i) x0 + sqrt(1-abar_i) eps; eps-prediction; DDIM sampler (spec s1.3, s1.6)
  Objective    L = L_score + L_rec / T_diff + 0.1 MMD^2(c, N(0,I)), no per-sample KL (InfoDiffusion, zeta=1; s1.2)
  Evaluation   code SNR, held-out target R^2, navigation c* = c_bar + W b*, generated PSTH R^2, decoded endpoints,
               |cos(w_x, w_y)|, unwanted movement (spec s4)
  Baselines    the same metrics for two latents with the same L: PCA of the rates, and an LFADS-like sequential VAE
               whose code is its initial condition g0 (the paper's baseline, without LFADS's controller)
Left out: the paper's RNN-controlled biomechanical arm (replaced by a random rate-RNN driven by minimum-jerk reaches),
the monkey dataset, LFADS's inferred inputs and hyperparameter search, self-attention, reverse-DDIM editing.

Run:  python gnocchi_minimal.py               # --demo reach, 3:01-3:34 on 2 CPU cores (4:38-4:57 in slow VM periods)
      python gnocchi_minimal.py --quick       # ~10 s smoke test
Measured (seed 0, 2-core CPU; README table), GNOCCHI / PCA / LFADS-like: held-out target R^2 from codes
0.867 / 0.830 / 0.896; |cos(w_x, w_y)| 0.045 / 0.247 / 0.008; generated held-out PSTH R^2 0.728 / 0.581 / 0.749;
code SNR 1.9 / 23.5 / 3.7 (GNOCCHI's within-target code spread follows each trial's Poisson noise: R^2 0.62).
Shapes: B batch, N neurons, T time bins, C channels, L code dims, K samples, M trials. Tensors are channels-first
(B, N, T): neurons are the U-Net's input channels, convolutions run over time.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Config: one dataclass, named presets
# -----------------------------------------------------------------------------
@dataclass
class Config:
    demo: str = "reach"          # synthetic experiment
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | mps
    out: str = ""                # output folder; "" -> runs/gnocchi_minimal-<demo>
    data: str = ""               # your own .npz (see load_data); "" -> synthetic demo
    threads: int = 0             # torch CPU threads; 0 -> torch default
    n_neurons: int = 48          # N (spec s3.2 [I])
    trials_per_target: int = 80  # 25 targets x 80 = 2000 trials (spec s3.2 [I])
    smooth_bins: float = 1.5     # Gaussian sd (bins) used to smooth --data spikes (30 ms at 20 ms bins, spec s2)
    # NOTE (choice): L 4 = 2 x the 2 behavioural factors (spec s5: L >= 2 x factors, proposes 8; InfoDiffusion 32).
    # Measured (seed 0, 200 samples per PSTH): L 8 gives held-out R^2 0.860 (PCA-8 0.859) and PSTH R^2 0.64;
    # L 4 gives 0.867 (PCA-4 0.830) and 0.73. Extra code dims mostly store nuisance (start, duration).
    code_dim: int = 4            # L
    # NOTE (deviation): CPU-sized U-Net, 2 levels of (C, 2C) channels with C 32 (InfoDiffusion: 64 base, 4 levels)
    channels: int = 32           # C (spec s5)
    dropout: float = 0.0         # NOTE (choice): InfoDiffusion uses 0.1 [C]; 0 gave better held-out codes here
    # NOTE (deviation): T_diff 200 instead of InfoDiffusion's 1000 [C], with the linear betas rescaled so that
    # sum(beta) = 5 and abar_T = 0.0067, the same end point as InfoDiffusion's 1e-5..1e-2 over 1000 steps (spec s1.3)
    diff_steps: int = 200        # T_diff
    beta_1: float = 1e-4
    beta_T: float = 0.05
    ddim_steps: int = 50         # strided deterministic DDIM steps at evaluation (spec s1.6 [I])
    mmd_weight: float = 0.1      # lambda_2 = mmd_weight [C: --mmd_weight 0.1]
    rec: str = "infodiff"        # reconstruction term: "infodiff" (InfoDiffusion code) or "x0" (spec s1.2)
    steps: int = 2400            # NOTE (deviation): optimiser steps sized to the 6-min CPU budget (spec s5: 1.5k-3k)
    batch: int = 64              # [C]
    lr: float = 1e-3             # NOTE (deviation): InfoDiffusion uses 1e-4; 1e-3 for a short CPU run (spec s5)
    weight_decay: float = 1e-5   # [C]
    warmup: int = 100            # steps of "gradual warmup" to 2 x lr, then cosine to 0 [C: 1 epoch, multiplier 2]
    # NOTE (choice): K 200 samples per navigated code (spec s1.6: ~20 [I]). The true PSTH is noise-free, so the
    # Monte-Carlo noise of a K-sample mean lowers R^2 (seed 0, L 8: 0.52 at K 50, 0.64 at K 200).
    n_gen: int = 200             # K samples per navigated code, averaged into PSTHs
    eval_every: int = 400        # steps between code -> target R^2 checks on validation trials
    lfads_steps: int = 800       # training steps of the LFADS-like baseline (0: skip it; PCA is always run)


DEMOS = ("reach",)
PRESETS = {"quick": dict(n_neurons=24, trials_per_target=12, channels=16, diff_steps=50, ddim_steps=10, steps=40,
                         warmup=5, n_gen=4, eval_every=20, lfads_steps=20)}
POSITIVE_FIELDS = ("n_neurons", "trials_per_target", "code_dim", "channels", "diff_steps", "ddim_steps", "steps",
                   "batch", "warmup", "n_gen", "eval_every")
HELDOUT = ((-1, 1), (1, 0), (0, -1))  # interior, non-collinear grid targets held out of everything (spec s3.2)
LATENTS = {"GNOCCHI": "gnocchi", "PCA": "pca", "LFADS-like": "lfads"}  # latent name -> metrics.json key prefix


# -----------------------------------------------------------------------------
# Utilities
# -----------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu. Every accelerator query is gated."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not has_mps):
        raise ValueError(f"--device {name} requested but it is not available")
    return torch.device(name)


class Progress:
    """Live one-line progress for a training loop: step, loss, ETA."""

    def __init__(self, name: str, total: int, every: int = 20):
        self.name, self.total, self.every, self.t0 = name, total, every, time.time()

    def __call__(self, step: int, **vals) -> None:
        if step % self.every and step != self.total:
            return
        el = time.time() - self.t0
        msg = " ".join(f"{k} {v:.4g}" for k, v in vals.items())
        print(f"\r  [{self.name}] step {step}/{self.total} {msg} | {el:.0f}s, ETA {el / step * (self.total - step):.0f}s",
              end="\n" if step == self.total else "", flush=True)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temp file in the same folder, then rename: no half-written file on failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp) if os.path.exists(tmp) else None
        raise


def smooth_matrix(T: int, sigma: float) -> np.ndarray:
    """(T, T) acausal Gaussian smoothing matrix (sigma in bins), columns renormalised at the edges: x @ K smooths
    the last axis of x."""
    lag = np.arange(T)[:, None] - np.arange(T)[None, :]
    K = np.exp(-0.5 * (lag / sigma) ** 2)
    return K / K.sum(0, keepdims=True)


# -----------------------------------------------------------------------------
# Data: minimum-jerk reaches -> random rate-RNN "controller" -> Poisson spikes -> smoothed, z-scored rates (spec s3)
# -----------------------------------------------------------------------------
def make_data(cfg: Config) -> dict:
    """Synthetic reaching from its own seeded generator. Returns rates/true_rates (M, N, T) in Hz, targets (M, 2) cm,
    heldout (M,) bool, hand (M, T, 2), start (M, 2), duration (M,). Nuisances are drawn independently of the target."""
    rng = np.random.default_rng(cfg.seed)
    d, dt, tau = 2.0, 10.0, 50.0  # grid spacing (cm), simulation step and RNN time constant (ms) (spec s3.2 [I])
    grid = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3)])
    g = np.repeat(grid * d, cfg.trials_per_target, axis=0)  # (25, 2) -> (M, 2) target per trial
    heldout = np.array([tuple(ij) in HELDOUT for ij in np.repeat(grid, cfg.trials_per_target, axis=0)])
    M = len(g)
    s = rng.normal(0.0, 0.3 * d, (M, 2))       # start jitter, independent of target
    D = rng.uniform(350.0, 550.0, M)           # reach duration (ms), independent of target
    t = np.arange(-600.0, 640.0, dt)           # movement onset at t = 0; burn-in before -200, margin after 520
    tau_ = np.clip(t[None] / D[:, None], 0, 1)  # (M, S) normalised time of the minimum-jerk profile
    pos = s[:, None] + (g - s)[:, None] * (10 * tau_**3 - 15 * tau_**4 + 6 * tau_**5)[..., None]  # (M, S, 2)
    vel = (g - s)[:, None] * ((30 * tau_**2 - 60 * tau_**3 + 30 * tau_**4) * 1e3 / D[:, None])[..., None]  # cm/s
    on = (t >= -200)[None, :, None]            # target shown from -200 ms (preparatory activity)
    u = np.concatenate([on * g[:, None] / 4, np.broadcast_to((t >= -100)[None, :, None], (M, len(t), 1)),
                        on * (pos - g[:, None]) / 4, vel / 20], axis=2)  # (M, S, 7) task inputs, O(1) scale
    H = 64                                     # rate-RNN h' = (1 - dt/tau) h + dt/tau tanh(W h + U u + b)
    W = rng.normal(0, 0.9 / math.sqrt(H), (H, H))  # spectral radius ~0.9
    U, b = rng.normal(0, 1.0, (H, u.shape[2])), rng.normal(0, 0.1, H)
    h, hs = np.zeros((M, H)), []
    for k in range(len(t)):
        h = (1 - dt / tau) * h + dt / tau * np.tanh(h @ W.T + u[:, k] @ U.T + b)
        hs.append(h)
    hs = np.stack(hs, axis=2)                   # (M, H, S)
    w_out = rng.normal(0, 1.0, (cfg.n_neurons, H)) / math.sqrt(H)  # dense readout: mixed selectivity
    log_r0 = rng.uniform(math.log(4.0), math.log(20.0), (cfg.n_neurons, 1))  # baseline 4-20 spikes/s
    lam = np.exp(log_r0 + w_out @ hs)           # (N, H) @ (M, H, S) -> (M, N, S) noise-free rates, Hz
    spikes = rng.poisson(lam * dt / 1e3)        # Poisson counts in 10 ms bins
    keep = (t >= -200) & (t < 520)              # window [-200, 520) ms -> 72 x 10 ms -> 36 x 20 ms bins
    K = smooth_matrix(len(t), 30.0 / dt)[:, keep].reshape(len(t), -1, 2).mean(-1)  # smooth, crop, bin: (S, 36)
    rates = spikes * (1e3 / dt) @ K             # (M, N, S) -> (M, N, 36) smoothed spikes (sigma 30 ms), Hz
    true_rates = lam @ K                        # = E[rates]: the noise-free ground truth
    hand = pos[:, keep][:, ::2]                 # (M, 36, 2) hand position per 20 ms bin (figures only)
    return dict(rates=rates, true_rates=true_rates, targets=g, heldout=heldout, hand=hand, start=s, duration=D,
                t_ms=t[keep][::2] + 10.0)


def load_data(path: str, cfg: Config) -> dict:
    """Own data: .npz with 'rates' (float) or 'spikes' (counts), both (trials, neurons, bins); optional 'targets'
    (trials, 2) and 'heldout' (trials,) bool. Spikes are Gaussian-smoothed with cfg.smooth_bins. ValueError if bad."""
    def need(ok, msg):
        if not ok:
            raise ValueError(f"--data {path}: expected {msg}")
    need(os.path.isfile(path), "an existing .npz file, found no file")
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except Exception as e:
        raise ValueError(f"--data {path}: expected an .npz archive (np.savez), could not read it: {e}") from e
    need(("rates" in d) != ("spikes" in d), f"exactly one of the keys 'rates' or 'spikes', found keys {sorted(d)}")
    x = d.get("rates", d.get("spikes"))
    need(x.ndim == 3 and x.shape[0] >= 8 and x.shape[1] >= 1 and x.shape[2] >= 4,
         f"rates/spikes shaped (trials >= 8, neurons, bins >= 4), found {x.shape}")
    need(np.issubdtype(x.dtype, np.number) and np.isfinite(x).all(), f"finite numbers, found dtype {x.dtype} / NaN / inf")
    need("rates" in d or (x >= 0).all(), "non-negative spike counts, found negative values")
    M, x = len(x), x.astype(float)
    out = dict(rates=x @ smooth_matrix(x.shape[2], cfg.smooth_bins) if "spikes" in d else x)
    if "targets" in d:
        y = d["targets"]
        need(y.shape == (M, 2) and np.issubdtype(y.dtype, np.number) and np.isfinite(y).all(),
             f"finite 'targets' (x, y) shaped ({M}, 2), found {y.dtype} {y.shape}")
        out["targets"] = y.astype(float)
    ho = out["heldout"] = d.get("heldout", np.zeros(M, bool))
    need(ho.dtype == bool and ho.shape == (M,), f"'heldout' as a bool array shaped ({M},), found {ho.dtype} {ho.shape}")
    need(not ho.any() or "targets" in d, "'targets' with 'heldout' (held-out metrics need targets), found none")
    need((~ho).sum() >= 8, f">= 8 training (not held-out) trials, found {(~ho).sum()}")
    return out


# -----------------------------------------------------------------------------
# Model: info-code encoder f_phi and AdaGN-conditioned 1-D U-Net eps_theta (spec s1.4, s1.5)
# -----------------------------------------------------------------------------
def xavier_init(module: nn.Module) -> None:
    """InfoDiffusion initialises every conv/linear with xavier_uniform and zero bias [C]."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """Deterministic info code c = f_phi(x0) from the CLEAN trial: 3 x (Conv-SiLU, stride 2 on two) -> flatten ->
    Linear -> L (spec s5). The flatten + Linear sees the whole window, as InfoDiffusion's flatten + Linear does."""

    def __init__(self, N: int, T: int, C: int, L: int):
        super().__init__()
        # NOTE (choice): a 3-layer conv stack instead of InfoDiffusion's full U-Net encoder (spec s1.5, CPU size), and
        # no GroupNorm in it: GN rescales each trial by its own feature statistics, which erases the overall rate
        # level that carries the target; with GN, codes of held-out targets fell off the line between neighbours
        # (held-out R^2 ~0.6 instead of ~0.85, seed 0).
        self.net = nn.Sequential(nn.Conv1d(N, C, 3, padding=1), nn.SiLU(),
                                 nn.Conv1d(C, 2 * C, 3, stride=2, padding=1), nn.SiLU(),
                                 nn.Conv1d(2 * C, 2 * C, 3, stride=2, padding=1), nn.SiLU())
        self.fc = nn.Linear(2 * C * (((T + 1) // 2 + 1) // 2), L)
        xavier_init(self)

    def forward(self, x0):
        return self.fc(self.net(x0).flatten(1))  # (B, N, T) -> (B, 2C, ~T/4) -> (B, 2C*T/4) -> (B, L)


class AuxResBlock(nn.Module):
    """InfoDiffusion's AuxResBlock in 1-D: GN-SiLU-Conv; AdaGN h = GN(h)(1 + s_t) + b_t, then h = h(1 + s_c) + b_c
    (time FiLM first, then code FiLM, spec s1.4); SiLU-Dropout-Conv; GN-SiLU-Dropout-Conv; residual shortcut."""

    def __init__(self, c_in: int, c_out: int, tdim: int, dropout: float):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv1d(c_in, c_out, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, 2 * c_out))
        self.cemb_proj = nn.Sequential(nn.SiLU(), nn.Linear(tdim, 2 * c_out))
        self.norm2 = nn.GroupNorm(8, c_out)  # GN(8): InfoDiffusion's GN(32) needs >= 32 channels (spec s1.5)
        self.block2 = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv1d(c_out, c_out, 3, padding=1))
        self.block3 = nn.Sequential(nn.GroupNorm(8, c_out), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv1d(c_out, c_out, 3, padding=1))
        self.shortcut = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        xavier_init(self)

    def forward(self, x, temb, cemb):
        h = self.block1(x)                                          # (B, C_in, T) -> (B, C_out, T)
        s_t, b_t = self.temb_proj(temb)[:, :, None].chunk(2, dim=1)  # (B, 2 C_out) -> 2 x (B, C_out, 1)
        s_c, b_c = self.cemb_proj(cemb)[:, :, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + s_t) + b_t                         # time scale/shift
        h = h * (1 + s_c) + b_c                                     # code scale/shift (AdaGN)
        return self.block3(self.block2(h)) + self.shortcut(x)


class UNet1D(nn.Module):
    """eps_theta(x_i, i, c): head Conv(N -> C); levels C (T bins) and 2C (T/2 bins), one AuxResBlock each; two middle
    blocks; mirrored decoder with skip concatenation; tail GN-SiLU-Conv(C -> N) initialised to zero (spec s1.5)."""

    def __init__(self, N: int, C: int, L: int, T_diff: int, dropout: float):
        super().__init__()
        tdim = 4 * C
        half = C // 2  # sinusoidal table of width C -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C) (spec s1.3)
        ang = torch.arange(T_diff)[:, None] * torch.exp(-math.log(1e4) * torch.arange(half) / half)[None]
        self.register_buffer("sin_table", torch.cat([ang.sin(), ang.cos()], dim=1))  # (T_diff, C)
        self.time_mlp = nn.Sequential(nn.Linear(C, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.code_fc = nn.Linear(L, tdim)  # a_emb = Linear(L -> tdim)(c), computed once [C]
        self.head = nn.Conv1d(N, C, 3, padding=1)
        self.down1, self.down2 = AuxResBlock(C, C, tdim, dropout), AuxResBlock(C, 2 * C, tdim, dropout)
        self.downsample = nn.Conv1d(C, C, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([AuxResBlock(2 * C, 2 * C, tdim, dropout) for _ in range(2)])
        self.up2, self.up1 = AuxResBlock(4 * C, 2 * C, tdim, dropout), AuxResBlock(3 * C, C, tdim, dropout)
        self.upsample = nn.Conv1d(2 * C, 2 * C, 3, padding=1)
        self.tail = nn.Sequential(nn.GroupNorm(8, C), nn.SiLU(), nn.Conv1d(C, N, 3, padding=1))
        xavier_init(self)
        # NOTE (choice): exact zeros for the output conv (InfoDiffusion: xavier with gain 1e-5, i.e. ~zero) [C].
        nn.init.zeros_(self.tail[-1].weight)

    def forward(self, x, i, c):
        T = x.shape[-1]
        x = F.pad(x, (0, T % 2), mode="replicate")            # odd T: pad one bin so one downsample fits
        temb, cemb = self.time_mlp(self.sin_table[i]), self.code_fc(c)  # (B,) -> (B, 4C); (B, L) -> (B, 4C)
        h1 = self.down1(self.head(x), temb, cemb)             # (B, N, T) -> (B, C, T)
        h2 = self.down2(self.downsample(h1), temb, cemb)      # (B, C, T) -> (B, C, T/2) -> (B, 2C, T/2)
        h = h2
        for blk in self.mid:
            h = blk(h, temb, cemb)                            # (B, 2C, T/2)
        h = self.up2(torch.cat([h, h2], 1), temb, cemb)      # (B, 4C, T/2) -> (B, 2C, T/2)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, 2C, T/2) -> (B, 2C, T)
        h = self.up1(torch.cat([h, h1], 1), temb, cemb)      # (B, 3C, T) -> (B, C, T)
        return self.tail(h)[..., :T]                          # (B, C, T) -> (B, N, T)


# -----------------------------------------------------------------------------
# Objective: DDPM forward process, score + reconstruction + MMD loss (spec s1.2; InfoDiffusion with zeta = 1)
# -----------------------------------------------------------------------------
def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Biased (V-statistic) MMD^2 with the InfoVAE kernel k(u, v) = exp(-||u - v||^2 / L^2) [C: compute_mmd]."""
    L = x.shape[1]
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / L**2)  # (B, L), (B', L) -> (B, B')
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


class GNOCCHI(nn.Module):
    """Auxiliary-variable diffusion model: prior p(c) = N(0, I_L), encoder c = f_phi(x0), decoder = DDPM reverse chain
    p_theta(x_{i-1} | x_i, c) with noise predictor eps_theta(x_i, i, c) (spec s1.1)."""

    def __init__(self, cfg: Config, N: int, T: int):
        super().__init__()
        self.cfg, self.N, self.T = cfg, N, T
        self.encoder = Encoder(N, T, cfg.channels, cfg.code_dim)
        self.eps_model = UNet1D(N, cfg.channels, cfg.code_dim, cfg.diff_steps, cfg.dropout)
        beta = torch.linspace(cfg.beta_1, cfg.beta_T, cfg.diff_steps)  # linear schedule [C], rescaled for T_diff
        self.register_buffer("beta", beta)
        self.register_buffer("alpha_bar", torch.cumprod(1 - beta, 0))  # abar_i = prod_{j<=i} (1 - beta_j)

    def eps_theta(self, x_i, i, c):
        """eps_theta(x_i, i, c) = sqrt(1 - abar_i) x_i + sqrt(abar_i) UNet(x_i, i, c).
        NOTE (deviation): an input skip (EDM-style preconditioning; equivalently the U-Net predicts v). The loss is
        still the eps-MSE, but eps_hat ~ x_i at high noise no longer has to pass through the U-Net: with neurons as
        channels and C < 2N, the GN-SiLU-Conv tail cannot represent that identity, and the residual error, amplified
        by 1/sqrt(abar_i) in DDIM's first steps, ruined the samples. At init (zero output conv) eps_hat is the
        Bayes-optimal denoiser for unit-Gaussian data."""
        ab = self.alpha_bar[i][:, None, None]  # (B,) -> (B, 1, 1)
        return (1 - ab).sqrt() * x_i + ab.sqrt() * self.eps_model(x_i, i, c)

    def q_sample(self, x0, i, eps):
        """Forward process x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps (GNOCCHI abstract; DDPM Eq. 4)."""
        ab = self.alpha_bar[i][:, None, None]  # (B,) -> (B, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def loss(self, x0):
        """One minibatch of Alg. 1 with InfoDiffusion's extra terms. Returns (total, dict of parts)."""
        B = len(x0)
        i = torch.randint(0, self.cfg.diff_steps, (B,), device=x0.device)  # i ~ U{0..T_diff-1}
        eps = torch.randn_like(x0)
        c = self.encoder(x0)                                  # code from the clean x0, deterministic [C]
        x_i = self.q_sample(x0, i, eps)
        eps_hat = self.eps_theta(x_i, i, c)
        l_score = F.mse_loss(eps_hat, eps)                    # "simple" DDPM loss, mean over B x N x T
        if self.cfg.rec == "infodiff":  # [C] step-1 posterior-mean update applied to the clean x0 (a stand-in for L_0)
            x0_hat = (x0 - self.beta[0] / (1 - self.alpha_bar[0]).sqrt() * eps_hat) / (1 - self.beta[0]).sqrt()
        else:  # "x0": the brief's form x0_hat = (x_i - sqrt(1-abar_i) eps_hat) / sqrt(abar_i) (spec s1.2 [I]); its
            ab = self.alpha_bar[i][:, None, None]  # weight (1-abar)/abar on the eps error is <= 150 (abar_T = 0.0067)
            x0_hat = (x_i - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        l_rec = F.mse_loss(x0_hat, x0)
        l_mmd = mmd(c, torch.randn_like(c))                   # aggregate q(c) vs p(c) = N(0, I); no per-sample KL
        total = l_score + l_rec / self.cfg.diff_steps + self.cfg.mmd_weight * l_mmd
        return total, dict(score=l_score.item(), rec=l_rec.item(), mmd=l_mmd.item())

    @torch.no_grad()
    def sample(self, c, gen: torch.Generator, steps: int = 0):
        """Generate one trial per code c (K, L) from x_T ~ N(0, I) with deterministic DDIM. Returns (K, N, T)."""
        x_T = torch.randn((len(c), self.N, self.T), generator=gen, device=c.device)
        return ddim_sample(lambda x, i: self.eps_theta(x, i, c), x_T, self.alpha_bar, steps or self.cfg.ddim_steps)


def ddim_sample(eps_fn, x_T: torch.Tensor, alpha_bar: torch.Tensor, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta = 0; Song et al. Eq. 12) on a strided subsequence of the T_diff steps:
    x0_hat = (x_i - sqrt(1-abar_i) eps_hat) / sqrt(abar_i);  x_prev = sqrt(abar_prev) x0_hat + sqrt(1-abar_prev) eps_hat.
    NOTE (choice): textbook DDIM with eta = 0 and `steps` strided steps (InfoDiffusion: eta = 0.01, all 1000 steps)."""
    seq = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long().tolist()
    x = x_T
    for k, i in enumerate(seq):
        ab = alpha_bar[i]
        ab_prev = alpha_bar[seq[k + 1]] if k + 1 < len(seq) else torch.ones_like(ab)  # abar_{-1} = 1: end at x0
        eps_hat = eps_fn(x, torch.full((len(x),), i, device=x.device, dtype=torch.long))
        x0_hat = (x - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        x = ab_prev.sqrt() * x0_hat + (1 - ab_prev).sqrt() * eps_hat
    return x


# -----------------------------------------------------------------------------
# Training. Everything in this section is standard PyTorch.
# -----------------------------------------------------------------------------
def train(model: GNOCCHI, x: torch.Tensor, cfg: Config, monitor) -> list:
    """AdamW + grad-norm clip 1.0 + gradual warmup (lr -> 2 lr) then cosine to 0 [C]. Returns the loss history."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    w, S = cfg.warmup, cfg.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 + s / w if s < w else
                                              1 + math.cos(math.pi * (s - w) / max(1, S - w)))  # 2 lr * (1+cos)/2
    prog, hist, val_r2 = Progress("train", S), [], float("nan")
    for step in range(1, S + 1):
        model.train()
        idx = torch.randint(0, len(x), (cfg.batch,), device=x.device)
        loss, parts = model.loss(x[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        parts["step"] = step
        if step % cfg.eval_every == 0 or step == S:
            val_r2 = parts["val_code_r2"] = monitor(model)  # earliest sign that codes carry target info (spec s5)
        hist.append(parts)
        prog(step, loss=loss.item(), mmd=parts["mmd"], val_code_r2=val_r2)
    return hist


# -----------------------------------------------------------------------------
# Evaluation (spec s4): small numpy helpers, then every metric for one latent (GNOCCHI codes or the PCA baseline)
# -----------------------------------------------------------------------------
def ridge(X, Y, lam=1e-6):
    """Ridge regression with unpenalised intercept; lam relative to the mean feature variance. Returns predict fn."""
    mx, my = X.mean(0), Y.mean(0)
    G = (X - mx).T @ (X - mx)
    A = np.linalg.solve(G + lam * np.trace(G) / len(G) * np.eye(len(G)), (X - mx).T @ (Y - my))
    return lambda Z: (Z - mx) @ A + my


def r2(y, y_hat):
    """Coefficient of determination per column: 1 - SS_res / SS_tot."""
    return 1 - ((y - y_hat) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def code_snr(C, labels):
    """Between-condition over within-condition code variance: tr Cov_k(mu_k) / mean_k tr(Sigma_k) (spec s4.1 [I])."""
    ks = np.unique(labels)
    mu = np.stack([C[labels == k].mean(0) for k in ks])
    within = np.mean([((C[labels == k] - mu[j]) ** 2).sum(1).mean() for j, k in enumerate(ks)])
    return float(((mu - mu.mean(0)) ** 2).sum(1).mean() / within)


def latent_metrics(C, gen, d, decode, K):
    """All spec s4 metrics for one latent. C (M, L) codes; gen(codes (K, L)) -> z-scored trials (K, N, T);
    d: data dict with z-scored 'x', 'truth', 'targets', masks; decode: real-trial behaviour decoder. Returns
    (metrics, extras for figures)."""
    tr, va, ho, Y = d["train"], d["val"], d["heldout"], d["targets"]
    m, ex = {}, {}
    lab = np.unique(Y, axis=0, return_inverse=True)[1].ravel()
    m["snr_train"], m["snr_heldout"] = code_snr(C[tr], lab[tr]), code_snr(C[ho], lab[ho])
    f = ridge(C[tr], Y[tr])                                         # code -> target regression, train trials only
    m["val_r2"] = float(r2(Y[va], f(C[va])).mean())
    r = r2(Y[ho], ex.setdefault("pred", f(C[ho])))
    m["heldout_r2_x"], m["heldout_r2_y"] = float(r[0]), float(r[1])
    m["heldout_r2"], m["heldout_err_cm"] = float(r.mean()), float(np.linalg.norm(Y[ho] - ex["pred"], axis=1).mean())
    # Navigation directions: C ~ 1 c_bar^T + Y W^T by least squares over training trials (spec s4.3 [I])
    A = np.linalg.lstsq(np.c_[np.ones(tr.sum()), Y[tr]], C[tr], rcond=None)[0]  # (1 + 2, L)
    c_bar, W = A[0], A[1:].T                                        # (L,), (L, 2): W[:, 0] = w_x, W[:, 1] = w_y
    ex["c_bar"], ex["W"] = c_bar, W
    m["cos_wx_wy"] = float(abs(W[:, 0] @ W[:, 1]) / np.linalg.norm(W[:, 0]) / np.linalg.norm(W[:, 1]))
    for a, ax in enumerate("xy"):                                   # per-axis SNR along the unit navigation direction
        u = W[:, a] / np.linalg.norm(W[:, a])
        m[f"snr_{ax}"] = code_snr((C[tr] @ u)[:, None], lab[tr])
    if "true_rates" in d:  # simulation only: is the within-target code spread the trial's own Poisson noise?
        res = lambda A: A - np.stack([A[lab == k].mean(0) for k in range(lab.max() + 1)])[lab]  # minus target mean
        noise = res((d["x"] - d["truth"]).reshape(len(C), -1))[tr]  # (M_tr, N*T): x minus its noise-free rates
        a, b = np.arange(tr.sum()) % 2 == 0, np.arange(tr.sum()) % 2 == 1  # fit on half the trials, score the rest
        m["within_from_noise_r2"] = float(r2(res(C)[tr][b], ridge(noise[a], res(C)[tr][a], lam=1.0)(noise[b])).mean())
    # Navigate to each held-out target: c* = c_bar + W b*; K samples; PSTH vs ground truth (spec s4.4)
    ho_targets = np.unique(Y[ho], axis=0)
    g_all = gen(np.repeat(c_bar + ho_targets @ W.T, K, axis=0))     # (n_ho * K, N, T)
    psth_g = g_all.reshape(len(ho_targets), K, *g_all.shape[1:]).mean(1)  # (n_ho, N, T)
    psth_t = np.stack([d["truth"][(Y == b).all(1)].mean(0) for b in ho_targets])  # noise-free condition average
    # NOTE (choice): R^2 per neuron pooled over held-out targets x time, then mean over neurons (spec s4.4 TO VERIFY)
    pg = psth_g.transpose(1, 0, 2).reshape(psth_g.shape[1], -1)    # (n_ho, N, T) -> (N, n_ho * T)
    pt = psth_t.transpose(1, 0, 2).reshape(psth_t.shape[1], -1)
    r_n = 1 - ((pg - pt) ** 2).sum(1) / ((pt - pt.mean(1, keepdims=True)) ** 2).sum(1)
    m["psth_r2"], m["psth_r2_median"] = float(r_n.mean()), float(np.median(r_n))
    ex.update(psth_g=psth_g, psth_t=psth_t, psth_r2_neurons=r_n, ho_targets=ho_targets, gen=g_all)
    # Read generated trials with the decoder fit on real training trials: endpoint error vs intended target
    yg = decode(g_all)
    m["gen_endpoint_err_cm"] = float(np.linalg.norm(yg - np.repeat(ho_targets, K, axis=0), axis=1).mean())
    # Unwanted movement: traverse c(delta) = c_bar + delta w_a, decode, |off-axis slope| / |on-axis slope| (s4.6)
    deltas, Kt = np.linspace(-4.0, 4.0, 5), max(2, K // 5)          # cm (the grid's extent); samples per step
    ex["trav"] = []
    for a, ax in enumerate("xy"):
        yt = decode(gen(np.repeat(c_bar + deltas[:, None] * W[:, a], Kt, axis=0)))  # (5 Kt, 2) decoded endpoints
        slope = np.polyfit(np.repeat(deltas, Kt), yt, 1)[0]         # (2,) slope of decoded x and y on delta
        m[f"unwanted_{ax}"] = float(abs(slope[1 - a]) / abs(slope[a]))
        ex["trav"].append(yt)
    m["unwanted"] = (m["unwanted_x"] + m["unwanted_y"]) / 2
    return m, ex


# -----------------------------------------------------------------------------
# Figures (spec s8); matplotlib is imported here only
# -----------------------------------------------------------------------------
def make_figures(out, d, res, hist, metrics):
    from matplotlib.figure import Figure
    figs, Y, ho = {}, d["targets"], d["heldout"]
    col = lambda t: (t - Y.min()) / (Y.max() - Y.min() + 1e-9)
    if "hand" in d:  # 1) task: grid + held-out targets, example hand paths, one neuron's PSTH by target
        fig = figs["task"] = Figure(figsize=(10, 3.2))
        a = fig.subplots(1, 3)
        for k in np.unique(Y, axis=0):
            sel = np.flatnonzero((Y == k).all(1))[:3]
            a[0].plot(*d["hand"][sel].transpose(2, 1, 0), color="k" if ho[sel[0]] else "0.6", lw=0.8)
        a[0].scatter(*Y[~ho].T, c="tab:blue", label="train target")
        a[0].scatter(*Y[ho].T, c="tab:red", marker="*", s=120, label="held out")
        a[0].legend(fontsize=7), a[0].set_title("targets and hand paths (cm)")
        for k in np.unique(Y, axis=0):
            sel = (Y == k).all(1)
            a[1].plot(d["t_ms"], d["rates"][sel, 0].mean(0), color=(col(k[0]), 0.3, col(k[1])))
        a[1].set(title="neuron 0 PSTH by target", xlabel="ms from onset", ylabel="Hz")
        a[2].imshow(d["rates"][0], aspect="auto", cmap="viridis"), a[2].set(title="one trial", xlabel="bin",
                                                                               ylabel="neuron")
    R = len(res)  # GNOCCHI and the baselines
    fig = figs["latents"] = Figure(figsize=(9, 4 * R))  # 3) codes on (w_x, w_y) coloured by target, held-out overlaid
    for r, (name, (C, ex)) in enumerate(res.items()):
        P = (C - ex["c_bar"]) @ np.linalg.pinv(ex["W"]).T           # (M, L) -> (M, 2) coordinates in (w_x, w_y)
        for a in range(2):
            ax = fig.add_subplot(R, 2, 2 * r + a + 1)
            ax.scatter(*P[~ho].T, c=Y[~ho, a], s=4, cmap="coolwarm")
            ax.scatter(*P[ho].T, c=Y[ho, a], s=18, cmap="coolwarm", edgecolors="k", linewidths=0.5)
            ax.set(title=f"{name}: colour = target {'xy'[a]} (held out: black edge)", xlabel="w_x", ylabel="w_y")
    fig = figs["heldout_prediction"] = Figure(figsize=(4 * R, 3.5))  # 4) predicted vs true held-out targets
    for j, (name, (C, ex)) in enumerate(res.items()):
        ax = fig.add_subplot(1, R, j + 1)
        ax.scatter(*ex["pred"].T, s=6, c=np.unique(Y[ho], axis=0, return_inverse=True)[1].ravel(), cmap="tab10")
        ax.scatter(*ex["ho_targets"].T, marker="*", s=200, c="k"), ax.set(title=f"{name}: predicted held-out targets")
    fig = figs["traversal"] = Figure(figsize=(4 * R, 3.5))  # 5) decoded endpoints along w_x and w_y sweeps
    for j, (name, (C, ex)) in enumerate(res.items()):
        ax = fig.add_subplot(1, R, j + 1)
        for a, mk in enumerate("ox"):
            ax.scatter(*ex["trav"][a].T, c=np.repeat(np.arange(5), len(ex["trav"][a]) // 5), cmap="viridis",
                       marker=mk, s=12, label=f"sweep along w_{'xy'[a]}")
        ax.legend(fontsize=7), ax.set(title=f"{name}: decoded endpoints", xlabel="x (cm)", ylabel="y (cm)")
    ex = res["GNOCCHI"][1]  # 6) generated vs true PSTHs for held-out targets (z units), per-neuron R^2 histogram
    fig = figs["psth"] = Figure(figsize=(12, 3))
    for n in range(4):
        ax = fig.add_subplot(1, 5, n + 1)
        for k in range(len(ex["ho_targets"])):
            ax.plot(ex["psth_t"][k, n], color=f"C{k}"), ax.plot(ex["psth_g"][k, n], "--", color=f"C{k}")
        ax.set(title=f"neuron {n}: true -, generated --", xlabel="bin")
    ax = fig.add_subplot(1, 5, 5)
    ax.hist(ex["psth_r2_neurons"], bins=20), ax.set(title="per-neuron PSTH R^2")
    fig = figs["summary"] = Figure(figsize=(12, 3))  # 7) summary bars + 8) training curve
    keys = ["snr_train", "heldout_r2", "psth_r2", "cos_wx_wy", "unwanted"]
    for j, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys) + 1, j + 1)
        ax.bar(list(res), [metrics[f"{LATENTS[n]}_{k}"] for n in res], color=["C1", "C7", "C2"][:R])
        ax.set(title=k), ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    ax = fig.add_subplot(1, len(keys) + 1, len(keys) + 1)
    ax.semilogy([h["step"] for h in hist], [h["score"] for h in hist], lw=0.5), ax.set(title="L_score", xlabel="step")
    for name, fig in figs.items():
        fig.tight_layout()
        fig.savefig(os.path.join(out, "figures", f"{name}.png"), dpi=80)


# -----------------------------------------------------------------------------
# CLI: parse -> seed -> device -> data (validated) -> train -> evaluate -> save
# -----------------------------------------------------------------------------
def parse_args(argv=None) -> Config:
    """argparse built from the Config fields; --quick applied first, explicit flags override it."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = dict(demo=DEMOS, device=("auto", "cpu", "cuda", "mps"), rec=("infodiff", "x0"))
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default), default=None,
                       choices=choices.get(f.name), help=f"(default: {f.default!r})")
    p.add_argument("--quick", action="store_true", help="tiny preset, end to end in < 30 s on 2 CPU cores")
    a = p.parse_args(argv)
    cfg = dataclasses.replace(Config(), **(PRESETS["quick"] if a.quick else {}))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in vars(a).items() if k != "quick" and v is not None})
    for name in POSITIVE_FIELDS:
        if getattr(cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if cfg.channels % 8:
        p.error(f"--channels must be a multiple of 8 (GroupNorm with 8 groups), got {cfg.channels}")
    cfg.out = cfg.out or os.path.join("runs", f"gnocchi_minimal-{cfg.demo}")
    return cfg


def prepare(d: dict, seed: int) -> dict:
    """Split trials (held-out targets / 15% validation / train) and z-score every neuron with TRAINING statistics
    only, so held-out trials never touch training or normalisation (spec s3.3). Adds x, truth (z units), masks."""
    M = len(d["rates"])
    d["val"] = ~d["heldout"] & (np.random.default_rng(seed + 1).random(M) < 0.15)
    d["train"] = ~d["heldout"] & ~d["val"]
    d["mu"] = d["rates"][d["train"]].mean((0, 2), keepdims=True)   # (1, N, 1)
    d["sd"] = d["rates"][d["train"]].std((0, 2), keepdims=True) + 1e-6
    d["x"] = (d["rates"] - d["mu"]) / d["sd"]                        # (M, N, T) model input
    d["truth"] = (d.get("true_rates", d["rates"]) - d["mu"]) / d["sd"]  # noise-free rates when simulated
    return d


# -----------------------------------------------------------------------------
# Baselines with the same code size L: PCA of the rates (required) and an LFADS-like sequential VAE (the paper's)
# -----------------------------------------------------------------------------
def pca_baseline(d: dict, L: int):
    """Baseline latent: PCA (fit on training trials) of the flattened z-scored rates with the same L. Its generator is
    the linear reconstruction mean + V c."""
    M, N, T = d["x"].shape
    X = d["x"].reshape(M, -1)                                        # (M, N, T) -> (M, N*T)
    mean = X[d["train"]].mean(0)
    V = np.linalg.svd(X[d["train"]] - mean, full_matrices=False)[2][:L].T  # (N*T, L) top principal axes
    return (X - mean) @ V, lambda c: (mean + c @ V.T).reshape(len(c), N, T)


class SeqVAE(nn.Module):
    """LFADS-like sequential VAE (Pandarinath et al. 2018; spec s4 "LFADS as the paper likely used it"): a
    bidirectional GRU reads the trial and gives the posterior q(g0 | x) = N(mu, diag sigma^2) of the initial condition
    g0 in R^L; an autonomous generator GRU starts from h_0 = tanh(W g0 + b) (NOTE (choice): tanh keeps h_0 in the
    GRU's state range) and unrolls T steps; factors f_t = W_f h_t (no bias, as in LFADS) are read out linearly.
    The code of a trial is mu, as GNOCCHI's is f_phi(x0).
    NOTE (deviation): no controller (inferred inputs), no coordinated dropout, a Gaussian (MSE) likelihood on the
    z-scored smoothed rates instead of Poisson on counts (this data set's model input), prior N(0, I), CPU widths."""

    def __init__(self, N: int, L: int, H: int = 64, n_fac: int = 16):
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

    def decode(self, g0, T: int):                                    # (B, L) -> (B, N, T)
        h, _ = self.generator(g0.new_zeros(len(g0), T, 1), torch.tanh(self.to_h0(g0))[None])  # (B, T, H)
        return self.readout(self.to_fac(h)).transpose(1, 2)         # (B, T, F) -> (B, T, N) -> (B, N, T)

    def loss(self, x, kl_weight: float = 1.0):
        """Negative ELBO per trial / (N T): Gaussian reconstruction (unit variance) + KL(q(g0 | x) || N(0, I))."""
        mu, logvar = self.posterior(x)
        g0 = mu + (0.5 * logvar).exp() * torch.randn_like(mu)      # reparameterised sample
        rec = 0.5 * ((self.decode(g0, x.shape[2]) - x) ** 2).sum((1, 2))
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)     # closed-form Gaussian KL
        return (rec + kl_weight * kl).mean() / x[0].numel(), kl.mean().item()


def lfads_baseline(d: dict, L: int, steps: int, device, batch: int = 64):
    """Train SeqVAE on the training trials (Adam lr 3e-3, KL weight ramped 0 -> 1 over the first half, as LFADS ramps
    its KL weight). Returns (codes mu (M, L), generator c (K, L) -> (K, N, T), final KL per trial)."""
    N, T = d["x"].shape[1:]
    vae = SeqVAE(N, L).to(device)
    x = torch.tensor(d["x"], dtype=torch.float32, device=device)
    x_tr = x[torch.from_numpy(d["train"]).to(device)]
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    prog, kl = Progress("LFADS-like", steps, every=max(1, steps // 20)), float("nan")
    for step in range(1, steps + 1):
        loss, kl = vae.loss(x_tr[torch.randint(0, len(x_tr), (batch,), device=device)], min(1.0, 2 * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        prog(step, loss=loss.item(), kl=kl)
    vae.eval()
    with torch.no_grad():
        codes = vae.posterior(x)[0].double().cpu().numpy()             # (M, L) posterior means

    def gen(c):                                                         # the generator's mean output for codes c
        with torch.no_grad():
            return vae.decode(torch.tensor(c, dtype=torch.float32, device=device), T).double().cpu().numpy()
    return codes, gen, kl


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    t0 = time.time()
    d = prepare(load_data(cfg.data, cfg) if cfg.data else make_data(cfg), cfg.seed)  # ValueError before any output
    (M, N, T), Y, has_y = d["x"].shape, d.get("targets"), "targets" in d
    print(f"data: {M} trials, {N} neurons, {T} bins; {d['train'].sum()} train / {d['val'].sum()} val / "
          f"{d['heldout'].sum()} held-out trials; median rate {np.median(d['rates']):.3g}")
    metrics = {}
    if has_y:  # behaviour decoder (real training trials, flattened rates -> target); doubles as the sanity decode
        dec = ridge(d["x"][d["train"]].reshape(-1, N * T), Y[d["train"]], lam=1.0)  # NOTE (choice): ridge, lam 1
        decode = lambda x: dec(x.reshape(len(x), -1))                # (K, N, T) -> (K, 2)
        metrics["sanity_decode_val_r2"] = float(r2(Y[d["val"]], decode(d["x"][d["val"]])).mean())
        if d["heldout"].any():  # the ceiling for decoding generated held-out trials
            yh = decode(d["x"][d["heldout"]])
            metrics["decoder_real_heldout_r2"] = float(r2(Y[d["heldout"]], yh).mean())
            metrics["decoder_real_heldout_err_cm"] = float(np.linalg.norm(yh - Y[d["heldout"]], axis=1).mean())
        print(f"sanity decode (linear, rates -> target): validation R^2 {metrics['sanity_decode_val_r2']:.3f}")
    os.makedirs(os.path.join(cfg.out, "figures"), exist_ok=True)
    write_json_atomic(os.path.join(cfg.out, "config.json"), dict(
        config=dataclasses.asdict(cfg), seed=cfg.seed, device=str(device), python=platform.python_version(),
        torch=torch.__version__, numpy=np.__version__, threads=torch.get_num_threads()))
    timing = dict(data=time.time() - t0)

    model = GNOCCHI(cfg, N, T).to(device)
    print(f"GNOCCHI: {sum(p.numel() for p in model.parameters()) / 1e3:.1f}k parameters on {device}")
    x_all = torch.tensor(d["x"], dtype=torch.float32, device=device)

    def encode(model):
        model.eval()
        with torch.no_grad():
            return model.encoder(x_all).double().cpu().numpy()     # (M, N, T) -> (M, L)

    def monitor(model):
        C = encode(model)
        return float(r2(Y[d["val"]], ridge(C[d["train"]], Y[d["train"]])(C[d["val"]])).mean()) if has_y else 0.0

    t1 = time.time()
    hist = train(model, x_all[torch.from_numpy(d["train"]).to(device)], cfg, monitor)
    timing["train"], t1 = time.time() - t1, time.time()
    codes, gen_x = encode(model), torch.Generator(device=device).manual_seed(cfg.seed + 2)  # fixed x_T draws

    def gen(c):  # codes (K, L) -> generated z-scored trials (K, N, T), in chunks of 256
        return np.concatenate([model.sample(torch.tensor(cb, dtype=torch.float32, device=device), gen_x)
                               .double().cpu().numpy() for cb in np.split(c, np.arange(256, len(c), 256))])

    latents = {"GNOCCHI": (codes, gen), "PCA": pca_baseline(d, cfg.code_dim)}
    if cfg.lfads_steps:
        t2 = time.time()
        *latents["LFADS-like"], metrics["lfads_final_kl"] = lfads_baseline(d, cfg.code_dim, cfg.lfads_steps, device)
        timing["lfads_train"] = time.time() - t2
    n = min(M, 100)  # conditional generation from the codes of real trials: how much of x0 does c pin down?
    recon = gen(codes[:n])
    metrics["recon_r2"] = float(1 - ((recon - d["x"][:n]) ** 2).sum() / (d["x"][:n] ** 2).sum())
    metrics.update(final_score_loss=float(np.mean([h["score"] for h in hist[-50:]])),
                   final_mmd=float(np.mean([h["mmd"] for h in hist[-50:]])), val_code_r2=hist[-1]["val_code_r2"])
    real, generated, res = d["rates"][:n], recon, {}
    if has_y and d["heldout"].any():
        for name, (C, g) in latents.items():
            m, ex = latent_metrics(C, g, d, decode, cfg.n_gen)
            metrics.update({f"{LATENTS[name]}_{k}": v for k, v in m.items()})
            res[name] = (C, ex)
        real, generated = d["rates"][d["heldout"]], res["GNOCCHI"][1]["gen"]
    timing["eval"], t1 = time.time() - t1 - timing.get("lfads_train", 0.0), time.time()  # sampling and metrics
    if res:
        make_figures(cfg.out, d, res, hist, metrics)
    timing["figures"] = time.time() - t1
    np.savez(os.path.join(cfg.out, "samples.npz"), real=real.astype(np.float32),  # rates in the data's units (Hz)
             generated=(generated * d["sd"] + d["mu"]).astype(np.float32))
    extra = dict(targets=Y) if has_y else {}
    if cfg.lfads_steps:
        extra["lfads_codes"] = latents["LFADS-like"][0]
    np.savez(os.path.join(cfg.out, "codes.npz"), codes=codes, baseline_codes=latents["PCA"][0], heldout=d["heldout"],
             **extra)
    torch.save(model.state_dict(), os.path.join(cfg.out, "gnocchi.pt"))
    timing["total"] = time.time() - t0
    write_json_atomic(os.path.join(cfg.out, "timing.json"), timing)
    write_json_atomic(os.path.join(cfg.out, "metrics.json"), metrics)  # last, atomic
    print("\nmetric" + " " * 34 + "value")
    for k, v in metrics.items():
        print(f"  {k:<38} {v:.4g}")
    print(f"outputs in {cfg.out}; total {timing['total']:.0f}s")
    return metrics


if __name__ == "__main__":
    main()
