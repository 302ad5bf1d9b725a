"""LDNS minimal: Latent Diffusion for Neural Spiking data, the whole pipeline in one file.

Kapoor, Schulz, Vetter, Pei, Gao, Macke, NeurIPS 2024, https://arxiv.org/abs/2407.08751; official code
github.com/mackelab/LDNS (the files named below are in that repository).
  spikes x (B,N,T) --S4 autoencoder--> latents z (B,d,T) --latent DDPM with an S4 denoiser--> new z --pointwise
  decoder--> rates (B,N,T) --Poisson (or the spike-history model)--> new spikes
Part I, Lorenz (Sec. 4.1, Fig. 2): data (ldns/data/latent_attractor.py) simulate_lorenz | S4 layer (Sec. 3.1;
  ldns/networks/s4.py) hippo_legs, S4D | autoencoder, coordinated dropout (Sec. 3.1; blocks.py, losses.py)
  AutoEncoder, ae_loss | latent diffusion (Sec. 3.2; blocks.Denoiser, diffusers DDPMScheduler, EMAModel) Denoiser,
  DDPM, EMA | training warmup_cosine, train_loop | sampling generate | evaluation (eval_utils.py) spike_stats, compare
Part II: spike history (Sec. 3.3) SpikeHistoryGLM | variable length (Sec. 4.2) CausalAutoEncoder, MaskedDenoiser |
  reach conditioning (Sec. 4.4) ConditionalDenoiser, VelocityDenoiser, fit_ridge.  Part III: figures, --data, CLI.
Run (2-core CPU, --device cpu):
  python ldns_minimal.py                           # ~4 min: Lorenz, the Fig. 2 statistics and latents
  python ldns_minimal.py --long                    # ~25 min: longer training
  python ldns_minimal.py --demo lorenz-refractory  # ~6 min: the spike-history model restores a refractory dip
  python ldns_minimal.py --demo lorenz-varlen      # ~5 min: trials of 48-160 bins, sampled at requested lengths
  python ldns_minimal.py --demo reach              # ~5 min: spikes conditioned on a reach angle or velocity trace
  python ldns_minimal.py --quick                   # ~10 s: every stage on a toy problem (numbers meaningless)
  python ldns_minimal.py --paper                   # the official Lorenz scale: a GPU job
  python ldns_minimal.py --data spikes.npz         # own counts (trials, neurons, bins), npz key 'spikes'
Shapes: B batch/trials, N neurons, T time bins, C hidden channels, d latent channels, H SSM channels (or history
bins), n complex SSM modes; channels first (B, C, T). Markers: `NOTE (deviation)` differs from the paper / official
code (mostly CPU scale); `NOTE (choice)` a detail they leave open. Every random draw is made on the CPU (torch's
global generator or numpy's default_rng), then moved, so one seed gives the same draws on every device.
"""
import argparse
import copy
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ==== Part I: the Lorenz experiment (Sec. 4.1, Fig. 2), in the order of the paper =====================================
@dataclass
class Config:
    demo: str = "lorenz"        # the experiment: lorenz | lorenz-refractory | lorenz-varlen | reach
    preset: str = ""            # set by --quick / --long / --paper
    seed: int = 0               # random seed of the data, the models and the sampler
    device: str = "auto"        # auto | cpu | cuda | mps
    out: str = ""               # output folder; "" -> runs/ldns_minimal-<demo>
    data: str = ""              # own spike counts (.npy, or .npz key 'spikes'); "" -> the demo's data
    threads: int = 0            # torch CPU threads; 0 -> torch's default
    # NOTE (deviation): official 5000 trials x 256 bins; the CPU scale uses fewer, shorter trials (--paper: official)
    n_trials: int = 1500        # trials simulated (70/10/20 train/val/test split)
    n_bins: int = 128           # time bins per trial
    n_neurons: int = 128        # neurons, official 128
    # NOTE (deviation): official AE C 256, 4 blocks, 1400 steps of batch 512, lr 1e-3
    ae_channels: int = 64       # AE hidden channels C
    ae_blocks: int = 2          # AE residual S4 blocks
    d_latent: int = 8           # latent channels d, official 8
    d_state: int = 64           # S4 state size (d_state/2 complex modes), official 64
    ae_steps: int = 250         # AE optimiser steps
    ae_batch: int = 64          # AE batch size
    ae_lr: float = 2e-3         # AE peak learning rate (official 1e-3; larger for the short run)
    mask_p: float = 0.2         # coordinated-dropout probability, official 0.2
    beta_lat: float = 0.01      # L2 latent penalty, official 0.01
    beta_td: float = 0.01       # temporal-difference latent penalty, official 0.01
    # NOTE (deviation): official denoiser 7000 steps of batch 512, lr 1e-3, 1000-step ancestral sampler
    dn_channels: int = 64       # denoiser hidden channels, official 64
    dn_blocks: int = 4          # denoiser blocks, official 4
    dn_steps: int = 550         # denoiser optimiser steps
    dn_batch: int = 64          # denoiser batch size
    dn_lr: float = 2e-3         # denoiser peak learning rate (official 1e-3; larger for the short run)
    n_diffusion: int = 1000     # training diffusion steps, official 1000
    sample_steps: int = 40      # sampler steps; 1000 with --eta 1 is the official ancestral DDPM sampler
    eta: float = 1.0            # sampler noise: 1 (respaced) ancestral DDPM, 0 deterministic DDIM
    n_gen: int = 525            # generated trials. NOTE (deviation): official as many as the training trials
    n_long: int = 2             # trials sampled at 16x the training length (length generalisation)

DEMOS = {"lorenz": {}}
PRESETS = {
    "quick": (dict(n_trials=60, n_bins=32, n_neurons=32, ae_channels=16, ae_blocks=1, d_state=16, ae_steps=100,
                   dn_channels=16, dn_blocks=1, dn_steps=300, sample_steps=10, n_gen=20, n_long=1, sh_bins=8,
                   sh_epochs=50, angle_bin=12, n_per_angle=2, n_vel=8),
              "tiny sizes: every stage end to end in seconds (numbers meaningless)"),
    "long": (dict(n_trials=2000, ae_steps=1000, dn_steps=5000, sample_steps=50, n_gen=1400), "longer training"),
    "paper": (dict(n_trials=5000, n_bins=256, ae_channels=256, ae_blocks=4, ae_steps=1400, ae_batch=512, ae_lr=1e-3,
                   dn_steps=7000, dn_batch=512, dn_lr=1e-3, sample_steps=1000, eta=1.0, n_gen=3500),
              "the official Lorenz configuration (a GPU job)"),
}
CHOICES = {}
ZERO_OK = ("seed", "threads", "mask_p", "beta_lat", "beta_td", "eta", "len_min", "ridge_alpha")
DEMO_CHECKS = {}                # {demo: check(cfg)} of the Part II experiments

def check_config(cfg):
    """The core's settings, then the demo's own (DEMO_CHECKS); a ValueError names the flag."""
    check(cfg.mask_p < 1, f"--mask-p must be in [0, 1), got {cfg.mask_p}")
    check(cfg.ae_channels % cfg.d_latent == 0, f"--ae-channels must be divisible by --d-latent, got {cfg.ae_channels}")
    check(cfg.sample_steps <= cfg.n_diffusion, f"--sample-steps must be <= --n-diffusion, got {cfg.sample_steps}")
    DEMO_CHECKS.get(cfg.demo, lambda cfg: None)(cfg)

# ---- Data: Lorenz latents -> softplus rates -> Poisson spikes (Sec. 4.1; ldns/data/latent_attractor.py) -------------
LORENZ_IC = np.array([-9.7869288, -15.03852, 20.533978])  # dysts' default initial condition of the Lorenz flow

def lorenz_rk4(x, n_out, dt, n_sub=10, sigma=10.0, rho=28.0, beta=2.667):
    """Integrate K Lorenz systems at once with fixed-step RK4. x (K,3) -> trajectory (K, n_out, 3), spacing dt.
    NOTE (deviation): official integrates each trial with scipy Radau (rtol 1e-3) via dysts; here 10 RK4 substeps."""
    def f(x):
        # dx/dt = sigma (y - x), dy/dt = x (rho - z) - y, dz/dt = x y - beta z (beta = 2.667 as in dysts)
        return np.stack([sigma * (x[:, 1] - x[:, 0]), x[:, 0] * (rho - x[:, 2]) - x[:, 1],
                         x[:, 0] * x[:, 1] - beta * x[:, 2]], 1)
    h, out = dt / n_sub, np.empty((len(x), n_out, 3))
    out[:, 0] = x
    for i in range(1, n_out):
        for _ in range(n_sub):
            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[:, i] = x
    return out

def simulate_lorenz(n_trials, T, N, rng, draw_spikes=None):
    """Lorenz data (latent_attractor.py): spikes (K,N,T) int64, true rates (K,N,T), latents (K,3,T) z-scored per
    trial. Spikes ~ Poisson(rates), or draw_spikes(rates, rng) (Part II: refractory spikes from the same rates)."""
    C = rng.standard_normal((N, 3))
    C = C / np.linalg.norm(C, axis=1, keepdims=True)          # unit-norm readout rows
    C = C[np.argsort(C[:, 0])]                                # sorted by their first column
    ic = LORENZ_IC + 2.0 * rng.standard_normal((n_trials, 3))  # ICs = default + 2 N(0, I)
    n = T + 100                                               # 100 burn-in samples are discarded
    dt = 1.5008 * n / 100 / (n - 1)                           # dysts: 100 points per period 1.5008 -> ~0.015
    traj = lorenz_rk4(ic, n, dt)[:, 100:]                     # (K, T, 3)
    traj = (traj - traj.mean(1, keepdims=True)) / traj.std(1, keepdims=True)  # per-trial z-score (ddof 0)
    latents = traj.transpose(0, 2, 1)                          # (K,T,3) -> (K,3,T)
    # lambda = softplus_2(C x + b) = log(1 + e^{2u}) / 2 with b = log 0.3 ("mean_rate 0.3" is this bias)
    u = np.einsum("nk,bkt->bnt", C, latents) + np.log(0.3)    # (K,N,T)
    rates = 0.5 * np.logaddexp(0.0, 2.0 * u)
    spikes = rng.poisson(rates) if draw_spikes is None else draw_spikes(rates, rng)
    return dict(spikes=spikes, rates=rates.astype(np.float32), latents=latents.astype(np.float32))

def split_trials(data, rng):
    """70/10/20 train/val/test split of the trials (official random_split): adds index arrays to data."""
    K = len(data["spikes"])
    perm, n_tr, n_va = rng.permutation(K), int(0.7 * K), int(0.1 * K)
    data.update(train=perm[:n_tr], val=perm[n_tr:n_tr + n_va], test=perm[n_tr + n_va:])
    print(f"[data] {K} trials x {data['spikes'].shape[1]} neurons x {data['spikes'].shape[2]} bins; train/val/test "
          f"{n_tr}/{n_va}/{K - n_tr - n_va}; mean count {data['spikes'].mean():.3f} per bin")
    return data

def simulated(simulate, *args):
    """make_data(cfg) of a demo: simulate(n_trials, n_bins, n_neurons, rng, *args), then the split (one seeded rng)."""
    def make_data(cfg):
        rng = np.random.default_rng(cfg.seed)
        return split_trials(simulate(cfg.n_trials, cfg.n_bins, cfg.n_neurons, rng, *args), rng)
    return make_data

# ---- S4 layer (Sec. 3.1; ldns/networks/s4.py): diagonal state-space model, HiPPO-LegS init, FFT convolution ---------
def hippo_legs(N):
    """HiPPO-LegS A = S - P P^T with S normal (Gu et al. 2022, S4 Sec. 3). Diagonalise S = -1/2 I + skew in float64
    and keep the N/2 eigenvalues with Im > 0 (their conjugates are implied). Returns (Im lambda (n,), B (n,))
    with B = V^H B_legs, B_legs = sqrt(2k+1); the imaginary part of B is clipped to [-2, 2] (ldns/networks/s4.py)."""
    k = np.arange(N, dtype=np.float64)
    q = np.sqrt(2 * k + 1)
    A = -np.tril(np.outer(q, q), -1) - np.diag(k + 1)          # HiPPO-LegS matrix
    P = np.sqrt(k + 0.5)
    S = A + np.outer(P, P)                                     # normal part: -1/2 I + skew-symmetric
    w, V = np.linalg.eigh(-1j * (S + 0.5 * np.eye(N)))         # skew -> Hermitian; eigenvalues of S: -1/2 + i w
    keep = np.argsort(w)[N // 2:]                              # the half with Im lambda > 0
    B = V[:, keep].conj().T @ q                                # V^H B_legs
    return w[keep], B.real + 1j * np.clip(B.imag, -2, 2)

class S4D(nn.Module):
    """Per-channel diagonal SSM x' = A x + B u, y = 2 Re(C x) + D u, bilinear discretisation, kernel by Vandermonde.
    NOTE (deviation): official LDNS runs the DPLR kernel (A = Lambda - P P^*, Cauchy + Woodbury); this is its diagonal
    (S4D-LegS) form: same Lambda and B initialisation, P dropped. The kernel K[l] = 2 Re sum_n C_n B_bar_n A_bar_n^l
    is computed directly for any L, so a kernel of length 2L starts with the kernel of length L (official: C~ rewrite).
    All SSM parameters train with the same lr / weight decay as the rest, as in LDNS (no S4 optimiser hook)."""
    def __init__(self, H, d_state=64, bidirectional=True):
        super().__init__()
        n, ch = d_state // 2, 2 if bidirectional else 1
        w, B = hippo_legs(d_state)
        self.bidirectional = bidirectional
        log_dt = torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)  # dt ~ LogUniform[1e-3, 1e-1]
        self.log_dt = nn.Parameter(log_dt)                                              # (H,)
        self.log_A_real = nn.Parameter(torch.full((H, n), math.log(0.5)))               # Re lambda = -exp(.) = -0.5
        self.A_imag = nn.Parameter(torch.tensor(w, dtype=torch.float32).repeat(H, 1))  # (H,n) LegS Im lambda
        B = torch.tensor(B, dtype=torch.complex64).repeat(H, 1)                         # (H,n)
        self.B = nn.Parameter(torch.view_as_real(B).contiguous())                       # (H,n,2) real view
        self.C = nn.Parameter(torch.view_as_real(torch.randn(ch, H, n, dtype=torch.complex64)))  # (ch,H,n,2)
        self.D = nn.Parameter(torch.randn(H))                                           # skip term

    def discretise(self):
        """Bilinear: A_bar = (1 + dt A/2) / (1 - dt A/2), B_bar = dt B / (1 - dt A/2). Returns (H,n) each."""
        dt = self.log_dt.exp()[:, None]                                                 # (H,1)
        dtA = dt * torch.complex(-self.log_A_real.exp(), self.A_imag)                   # (H,n)
        return (1 + dtA / 2) / (1 - dtA / 2), dt * torch.view_as_complex(self.B) / (1 - dtA / 2)

    def kernel(self, L):
        """K (ch,H,L): K[c,h,l] = 2 Re sum_n C[c,h,n] B_bar[h,n] A_bar[h,n]^l (ch 0 forward, ch 1 backward)."""
        A_bar, B_bar = self.discretise()
        log_A = torch.log(A_bar)                                                        # (H,n) log|A_bar| + i arg
        l = torch.arange(L, device=A_bar.device)
        r_l, phi = torch.exp(log_A.real[..., None] * l), log_A.imag[..., None] * l  # (H,n,L): A_bar^l=r_l e^{i phi}
        CB = torch.view_as_complex(self.C) * B_bar                                      # (ch,H,n)
        # 2 Re(CB A_bar^l) in real arithmetic (on CPU cheaper than a complex exp)
        return 2 * (torch.einsum("chn,hnl->chl", CB.real, r_l * torch.cos(phi))
                    - torch.einsum("chn,hnl->chl", CB.imag, r_l * torch.sin(phi)))       # (ch,H,L)

    def forward(self, u):
        """u (B,H,L) -> y (B,H,L). Causal: y[t] = sum_{s>=0} K_f[s] u[t-s] + D u[t]; bidirectional adds
        sum_{m>=1} K_b[m-1] u[t+m] (S4's convention). FFT with zero padding to 2L, so nothing wraps around."""
        L = u.shape[-1]
        K = self.kernel(L)
        k = F.pad(K[0], (0, L)) + F.pad(K[1].flip(-1), (L, 0)) if self.bidirectional else K[0]  # (H,2L) | (H,L)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return y + self.D[:, None] * u

class Conv1x1(nn.Conv1d):
    """Conv1d(c_in, c_out, 1) over (B,C,T), computed as a matmul (faster than the conv on CPU)."""
    def forward(self, x):                                      # (B,C_in,T) -> (B,C_out,T)
        y = torch.einsum("oc,bct->bot", self.weight[..., 0], x)
        return y if self.bias is None else y + self.bias[:, None]

instance_norm = F.instance_norm  # each (sample, channel) over time, no affine (InstanceNorm1d, eps 1e-5). (B,C,T)

# ---- Autoencoder (Sec. 3.1; blocks.AutoEncoder, losses.py): S4 encoder -> z -> pointwise decoder -> rates -----------
class AEBlock(nn.Module):
    """Pre-norm residual block: h += s * GELU(S4(IN(h)(1+g1)+b1)) + c;  h += W2 GELU(W1 (IN(h)(1+g2)+b2))."""
    bidirectional, norm = True, staticmethod(instance_norm)

    def __init__(self, C, d_state):
        super().__init__()
        self.ada = nn.Parameter(torch.zeros(1, 6 * C, 1))      # (shift, scale, gate) x 2, zero init; gates unused
        self.s4 = S4D(C, d_state, self.bidirectional)
        self.post_tm_scale = nn.Conv1d(C, C, 1, groups=C)      # depthwise per-channel scale s and bias c
        self.mlp = nn.Sequential(Conv1x1(C, 2 * C, 1, bias=False), nn.GELU(), Conv1x1(2 * C, C, 1, bias=False))

    def forward(self, h):                                      # h (B,C,T)
        sh1, sc1, _, sh2, sc2, _ = self.ada.chunk(6, dim=1)    # each (1,C,1)
        h = h + self.post_tm_scale(F.gelu(self.s4(self.norm(h) * (1 + sc1) + sh1)))
        return h + self.mlp(self.norm(h) * (1 + sc2) + sh2)

class AutoEncoder(nn.Module):
    """Encoder: Conv1x1(N->C) -> blocks -> grouped Conv1x1(C->d, groups=d). Decoder (pointwise in time, so all
    temporal structure lives in z): grouped Conv1x1(d->C) -> GELU -> Conv1x1(C->N) -> softplus = rates."""
    block = AEBlock

    def __init__(self, N, C, d, n_blocks, d_state):
        super().__init__()
        self.conv_in = Conv1x1(N, C, 1)
        self.blocks = nn.ModuleList([self.block(C, d_state) for _ in range(n_blocks)])
        self.bottleneck = nn.Conv1d(C, d, 1, groups=d)         # each latent reads its own C/d channels
        self.decoder = nn.Sequential(nn.Conv1d(d, C, 1, groups=d), nn.GELU(), Conv1x1(C, N, 1), nn.Softplus())

    def encode(self, x):                                       # x (B,N,T) -> z (B,d,T)
        h = self.conv_in(x)                                    # (B,C,T)
        for blk in self.blocks:
            h = blk(h)
        return self.bottleneck(h)

    def forward(self, x):                                      # x (B,N,T) -> rates (B,N,T), z (B,d,T)
        z = self.encode(x)
        return self.decoder(z), z

def latent_regulariser(z, beta_lat, beta_td, n_spike_entries, K=5):
    """beta_lat sum z^2 + beta_td sum_{i=1..K} 1/(1+i) sum (z_t - z_{t+i})^2, divided by B*N*T (spike entries)."""
    td = sum((z[..., i:] - z[..., :-i]).pow(2).sum() / (1 + i) for i in range(1, K + 1))
    return (beta_lat * z.pow(2).sum() + beta_td * td) / n_spike_entries

def coordinated_dropout(x, p):
    """Element-wise keep mask M ~ Bernoulli(1-p) (1 = kept); the AE sees x M / (1-p). -> (input, M), each (B,N,T)."""
    M = (torch.rand(x.shape).to(x.device) >= p).float()
    return x * M / (1 - p), M

def ae_loss(ae, x, cfg, m=1.0):
    """Coordinated dropout (train_autoencoder_Lorenz.ipynb, ldns/losses.py): the full Poisson NLL on the dropped
    entries only, averaged over ALL B*N*T entries, plus the latent regulariser. Part II: the NLL times the padding
    mask m (B,1,T) of variable-length trials (train_autoencoder_human.ipynb; the regulariser sees the whole window)."""
    x_in, M = coordinated_dropout(x, cfg.mask_p)
    rates, z = ae(x_in)
    nll = F.poisson_nll_loss(rates, x, log_input=False, full=True, eps=1e-8, reduction="none")  # (B,N,T)
    return ((1 - M) * m * nll).mean() + latent_regulariser(z, cfg.beta_lat, cfg.beta_td, x.numel())

# ---- Latent diffusion (Sec. 3.2; blocks.Denoiser, diffusers DDPMScheduler and EMAModel) ----------------------------
def timestep_embedding(t, dim=256):
    """Sinusoidal features of the raw integer t: [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/(dim/2)). (B,) -> (B,dim)"""
    f = torch.exp(-math.log(1e4) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    arg = t.float()[:, None] * f                               # (B, dim/2)
    return torch.cat([torch.cos(arg), torch.sin(arg)], -1)

class DenoiserBlock(nn.Module):
    """adaLN-Zero (DiT) block: (sh1,sc1,g1,sh2,sc2,g2) = Linear(GELU(e)), zero-init so the block starts as identity.
    h += g1 GELU(S4_bi(norm(h)(1+sc1)+sh1));  h += g2 MLP(norm(h)(1+sc2)+sh2), MLP with biases."""
    def __init__(self, C, d_state):
        super().__init__()
        self.ada = nn.Linear(C // 4, 6 * C)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.s4 = S4D(C, d_state, bidirectional=True)           # official denoisers are always bidirectional
        self.mlp = nn.Sequential(Conv1x1(C, 2 * C, 1), nn.GELU(), Conv1x1(2 * C, C, 1))

    def forward(self, h, e, norm=instance_norm):               # h (B,C,T), e (B,C/4)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.gelu(e))[..., None].chunk(6, dim=1)  # (B,6C,1) -> 6 x (B,C,1)
        h = h + g1 * F.gelu(self.s4(norm(h) * (1 + sc1) + sh1))
        return h + g2 * self.mlp(norm(h) * (1 + sc2) + sh2)

class Denoiser(nn.Module):
    """eps_theta(z_t, t) (blocks.Denoiser): Conv1x1(C_in -> C) -> adaLN-Zero blocks -> Conv1x1(C -> C_in), first d
    outputs kept; no U-Net, no attention. e = Linear(SiLU(Linear(sinusoidal_256(t)))), C/4 wide. C_in = d + d_extra
    (Part II: mask or velocity channels); the 1x1 convs are grouped by input channel when C_in divides C (official)."""
    d_extra = 0

    def __init__(self, d, C, n_blocks, d_state):
        super().__init__()
        self.d, C_in = d, d + self.d_extra
        g = C_in if (C % C_in == 0 and C > C_in) else 1
        self.conv_in = nn.Conv1d(C_in, C, 1, groups=g)
        self.t_mlp = nn.Sequential(nn.Linear(256, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))
        self.blocks = nn.ModuleList([DenoiserBlock(C, d_state) for _ in range(n_blocks)])
        # NOTE (deviation): DiT's final adaLN modulation (no norm), zero-init: h (1 + sc_f(t)) + sh_f(t) before
        # conv_out. The InstanceNorm blocks hide a channel's per-trial time-mean; official LDNS passes it only via
        # conv_in -> conv_out, t-independently; its error at high noise (x 1/sqrt(abar)) freezes into per-trial offsets.
        self.ada_out = nn.Linear(C // 4, 2 * C)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.conv_out = nn.Conv1d(C, C_in, 1, groups=g)

    def forward(self, z, t):                                   # z (B,d,T), t (B,) int -> eps_hat (B,d,T)
        return self.backbone(z, self.t_mlp(timestep_embedding(t)))

    def backbone(self, x, e, norm=instance_norm):
        """x (B,C_in,T), embedding e (B,C/4) -> (B,d,T); norm: the blocks' normalisation."""
        h = self.conv_in(x)                                    # (B,C_in,T) -> (B,C,T)
        for blk in self.blocks:
            h = blk(h, e, norm)
        sh, sc = self.ada_out(F.gelu(e))[..., None].chunk(2, dim=1)  # (B,2C,1) -> 2 x (B,C,1)
        return self.conv_out(h * (1 + sc) + sh)[:, :self.d]   # (B,C,T) -> (B,C_in,T) -> (B,d,T)

class DDPM(nn.Module):
    """Ho et al. 2020: beta_t linear in [1e-4, 0.02] over 1000 steps, eps-prediction, MSE loss (Alg. 1), ancestral
    sampling (Alg. 2) with sigma_t^2 = beta_tilde_t ("fixed_small"). Schedules are buffers (move with .to(device))."""
    def __init__(self, n_steps=1000):
        super().__init__()
        s = 1000 / n_steps  # NOTE (deviation) if n_steps != 1000: linear schedule rescaled as in Nichol & Dhariwal
        beta = torch.linspace(1e-4 * s, 0.02 * s, n_steps, dtype=torch.float64)
        self.register_buffer("beta", beta.float())
        self.register_buffer("alpha_bar", torch.cumprod(1 - beta, 0).float())  # abar_t = prod_{s<=t} (1 - beta_s)

    def q_sample(self, x0, t, eps):
        """q(x_t | x_0): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4). x0, eps (B,d,T), t (B,)."""
        ab = self.alpha_bar[t][:, None, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def predict_noise(self, model, x0, **cond):
        """Alg. 1, lines 2-4: t ~ U{0..T-1}, eps ~ N(0,I), x_t = q_sample(x0, t, eps) -> (eps_theta(x_t, t), eps)."""
        t = torch.randint(0, len(self.beta), (len(x0),)).to(x0.device)
        eps = torch.randn(x0.shape).to(x0.device)
        return model(self.q_sample(x0, t, eps), t, **cond), eps

    def loss(self, model, x0, **cond):
        """Alg. 1: || eps - eps_theta(x_t, t) ||^2, averaged over the latent entries."""
        return F.mse_loss(*self.predict_noise(model, x0, **cond))  # (eps_hat, eps)

    @staticmethod
    def p_step(xt, eps_hat, ab, ab_prev, eta):
        """One reverse step from the predicted noise (eps form). x0_hat = (x_t - sqrt(1-abar) eps_hat)/sqrt(abar);
        mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps_hat, s^2 = eta^2 beta_tilde (Song et al. DDIM
        Eq. 12). For eta = 1 the mean equals Eq. 7 and s^2 = beta_tilde: ancestral DDPM; eta = 0 is DDIM."""
        x0_hat = (xt - (1 - ab).sqrt() * eps_hat) / ab.sqrt()  # not clipped (official)
        var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        return ab_prev.sqrt() * x0_hat + (1 - ab_prev - var).clamp(min=0).sqrt() * eps_hat, var

    @torch.no_grad()
    def sample(self, model, shape, K, eta, **cond):
        """From x_T ~ N(0,I) through the K respaced timesteps (K = 1000, eta = 1: official), cond (Part II) at every
        step. NOTE (deviation, demo default): fewer steps, correctly respaced (diffusers 0.3.0's strided is wrong)."""
        ts = torch.linspace(0, len(self.beta) - 1, K).round().long().unique()  # respacing (Nichol & Dhariwal 2021)
        abar, x = self.alpha_bar[ts], torch.randn(shape).to(self.beta.device)
        for i in reversed(range(len(ts))):
            ab, ab_prev = abar[i], abar[i - 1] if i > 0 else torch.ones((), device=x.device)
            mean, var = self.p_step(x, model(x, ts[i].expand(shape[0]).to(x.device), **cond), ab, ab_prev, eta)
            x = mean + var.sqrt() * torch.randn(x.shape).to(x.device) if i > 0 else mean  # no noise at the end
        return x

class EMA:
    """Exponential moving average of the weights (diffusers EMAModel defaults): decay_k = 0 for k <= 1, else
    min(0.9999, 1 - k^(-2/3)); the averaged copy is used for sampling. Buffers are copied from the live model."""
    def __init__(self, model):
        self.model, self.k = copy.deepcopy(model).eval().requires_grad_(False), 0

    @torch.no_grad()
    def update(self, model):
        self.k += 1
        decay = 0.0 if self.k <= 1 else min(0.9999, 1 - self.k ** (-2 / 3))
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)                          # p_ema = decay p_ema + (1 - decay) p
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

# ---- Training: AdamW, gradient clipping, linear warmup + cosine ----------------------------------------------------
def warmup_cosine(k, steps):
    """lr multiplier at optimiser step k = 0, 1, ... (diffusers get_cosine_schedule_with_warmup as LDNS calls it):
    linear warmup over the first 5% of the steps (official: 10 of 200 AE epochs, 50 of 1000 denoiser epochs), then
    0.5 (1 + cos(pi progress)) with the horizon at 1.3x the real step count, so the lr ends at ~13% of its peak."""
    warm, horizon = max(1, steps // 20), 1.3 * steps
    return k / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / (horizon - warm)))

def train_loop(model, loss_fn, n_items, *, steps, batch, lr, clip, name, ema=None):
    """AdamW(lr, weight decay 0.01), grad-norm clipping, warmup_cosine, shuffled epochs over n_items training items.
    loss_fn(idx) returns the loss of the items idx; the EMA, if given, is updated after every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    progress, perm, pos, batch = Progress(name, steps), torch.randperm(n_items), 0, min(batch, n_items)
    for step in range(1, steps + 1):
        opt.param_groups[0]["lr"] = lr * warmup_cosine(step - 1, steps)  # the one parameter group
        if pos + batch > n_items:
            perm, pos = torch.randperm(n_items), 0
        loss = loss_fn(perm[pos:pos + batch])
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        v = loss.item()
        check(math.isfinite(v), f"{name}: the training loss became {v} at step {step}; likely cause: a learning rate "
              "too high for this data, or counts far outside the demo's range (re-bin your spikes)", FloatingPointError)
        progress(step, loss=v, lr=opt.param_groups[0]["lr"])
    return model

@torch.no_grad()
def batched(fn, x, bs=256):
    """Apply fn to x in chunks along dim 0 (bounded memory)."""
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])

def train_autoencoder(cfg, data, AE=AutoEncoder, **loss_args):
    """Stage 1 (train_autoencoder_Lorenz.ipynb): the AE on the training trials, clip 2.0, ae_loss with loss_args per
    trial (Part II); then every trial encoded and decoded. -> spikes x, AE (eval), latents z (K,d,T), rates (K,N,T)."""
    x = torch.tensor(data["spikes"], dtype=torch.float32).to(cfg.device)  # (K,N,T)
    x_tr = x[data["train"]]
    ae = AE(x.shape[1], cfg.ae_channels, cfg.d_latent, cfg.ae_blocks, cfg.d_state).to(cfg.device)
    print(f"[autoencoder] {type(ae).__name__}, {sum(p.numel() for p in ae.parameters()):,} parameters")
    train_loop(ae, lambda idx: ae_loss(ae, x_tr[idx], cfg, **{k: v[idx] for k, v in loss_args.items()}), len(x_tr),
               steps=cfg.ae_steps, batch=cfg.ae_batch, lr=cfg.ae_lr, clip=2.0, name="AE")
    ae.eval()
    z = batched(ae.encode, x)                                  # (K,d,T)
    return x, ae, z, batched(ae.decoder, z)

def normalise_latents(z_tr):
    """Latent normalisation (official LatentDataset): per-channel mean and unbiased std over training trials and
    time, z~ = clamp((z - mu)/sigma, -5, 5). z_tr (K,d,T) -> mu, sigma (1,d,1), z~ (K,d,T)."""
    mu, sigma = z_tr.mean((0, 2), keepdim=True), z_tr.std((0, 2), keepdim=True)
    return mu, sigma, ((z_tr - mu) / sigma).clamp(-5, 5)

def train_denoiser(cfg, zn_tr, dn, loss=DDPM.loss, name="DDPM", **cond_tr):
    """Stage 2 (train_diffusion_Lorenz.ipynb): the denoiser dn on the normalised training latents zn_tr (K,d,T), clip
    1.0, EMA; loss(ddpm, dn, x0, **cond): Alg. 1 or a Part II variant, cond_tr per trial. -> (ddpm, EMA denoiser)."""
    ddpm, ema = DDPM(cfg.n_diffusion).to(zn_tr.device), EMA(dn)
    print(f"[diffusion] {name}: denoiser {sum(p.numel() for p in dn.parameters()):,} parameters")
    train_loop(dn, lambda idx: loss(ddpm, dn, zn_tr[idx], **{k: v[idx] for k, v in cond_tr.items()}), len(zn_tr),
               steps=cfg.dn_steps, batch=cfg.dn_batch, lr=cfg.dn_lr, clip=1.0, name=name, ema=ema)
    return ddpm, ema.model

# ---- Sampling: noise -> DDPM -> un-normalise -> decode -> Poisson ---------------------------------------------------
@torch.no_grad()
def sample_latents(cfg, ddpm, dn, mu, sigma, n, T, chunk=700, **cond):
    """n latent trials (n,d,T) of T bins, z = z~ sigma + mu, z~ from the sampler in chunks (cond (n,...) alike)."""
    z = torch.cat([ddpm.sample(dn, (min(chunk, n - i), cfg.d_latent, T), cfg.sample_steps, cfg.eta,
                               **{k: v[i:i + chunk] for k, v in cond.items()}) for i in range(0, n, chunk)])
    return z * sigma + mu

@torch.no_grad()
def sample_trials(cfg, ddpm, dn, ae, mu, sigma, n, T, **cond):
    """n trials: latents (sample_latents), rates = decode(z), spikes ~ Poisson(rates). -> z (n,d,T), rates, spikes."""
    z = sample_latents(cfg, ddpm, dn, mu, sigma, n, T, **cond)
    rates = batched(ae.decoder, z)                              # (n,N,T)
    return dict(z=z, rates=rates, spikes=torch.poisson(rates.cpu()))

def generate(cfg, ddpm, dn, ae, mu, sigma, T):
    """cfg.n_gen new trials of T bins, plus cfg.n_long latent trials at 16x the training length (z_long)."""
    print(f"[sampling] {cfg.n_gen} trials, {cfg.sample_steps} steps (eta {cfg.eta}) + {cfg.n_long} at {16 * T} bins")
    return {**sample_trials(cfg, ddpm, dn, ae, mu, sigma, cfg.n_gen, T),
            "z_long": sample_latents(cfg, ddpm, dn, mu, sigma, cfg.n_long, 16 * T)}

# ---- Evaluation (eval_utils.py, plotting_diffusion_Lorenz.ipynb): PSC, correlations, ISIs, latents -----------------
def isi_stats(s):
    """Per-neuron mean and std of inter-spike intervals (bins), pooled over trials, within trials only. c spikes in
    bin k sit at linspace(k, k+1, c+2)[1:-1] (official counts_to_spike_trains, fps 1). s (B,N,T) -> 2 x (N,)."""
    sn = s.transpose(1, 0, 2)                                 # (N,B,T): spikes sorted by neuron, trial, time
    n, b, k = np.nonzero(sn)
    c = sn[n, b, k]
    rep = np.repeat(np.arange(len(c)), c)                     # one entry per spike
    j = np.arange(len(rep)) - np.repeat(np.cumsum(c) - c, c)  # rank of the spike inside its bin
    t = k[rep] + (j + 1) / (c[rep] + 1)                       # spike time
    same = (n[rep][1:] == n[rep][:-1]) & (b[rep][1:] == b[rep][:-1])  # consecutive spikes of one neuron & trial
    isi, who = np.diff(t)[same], n[rep][1:][same]
    cnt = np.bincount(who, minlength=s.shape[1]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(who, isi, s.shape[1]) / cnt         # NaN for neurons without an ISI
        std = np.sqrt(np.maximum(np.bincount(who, isi ** 2, s.shape[1]) / cnt - mean ** 2, 0))
    return mean, std

def bins_as_rows(a, lengths=None):
    """Every time bin of every trial as one row, trials concatenated: a (K,c,T) -> (K*T, c); with lengths (K,)
    only the first lengths[i] bins of trial i (end-padded trials, Part II) -> (sum lengths, c)."""
    if lengths is None:
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1])   # (K,c,T) -> (K,T,c) -> (K*T, c)
    return a.transpose(0, 2, 1)[np.arange(a.shape[2])[None] < lengths[:, None]]  # (K,T,c)[(K,T) mask] -> rows

def spike_stats(s, lengths=None):
    """Summary statistics of counts s (B,N,T) on its valid bins (all, or the first lengths[i] of trial i): PSC per
    (trial, bin), correlation matrix and mean rate over those bins pooled, mean / std ISI within trials."""
    X = bins_as_rows(s, lengths).astype(np.float64)            # (bins, N)
    rate = X.mean(0)
    Xc = X - rate
    sd = np.sqrt((Xc ** 2).mean(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (Xc.T @ Xc / len(Xc)) / np.outer(sd, sd)        # np.corrcoef, NaN for silent neurons
    mean_isi, std_isi = isi_stats(s)                           # the padding holds no spikes: exact for padded trials
    return dict(psc=X.sum(1).astype(np.int64), corr=corr, rate=rate, mean_isi=mean_isi, std_isi=std_isi)

def kde_on_grid(x, grid):
    """Gaussian KDE with Scott's bandwidth h = std n^(-1/5) (scipy gaussian_kde default) on an integer grid,
    normalised to sum 1. Exact and fast for integer data: one kernel per distinct value, weighted by its count."""
    h = max(x.std(ddof=1) * len(x) ** -0.2, 1e-3)
    vals, cnt = np.unique(x, return_counts=True)
    dens = (cnt * np.exp(-0.5 * ((grid[:, None] - vals) / h) ** 2)).sum(1)
    return dens / dens.sum()

def compare(model, data):
    """Model vs data statistics (eval_utils.py): KL(model||data) of the PSC KDEs on the shared grid 0..max, Pearson r
    of the KDE densities; r and RMSE over unique neuron pairs of the correlations and over neurons of the mean rate,
    mean ISI and std ISI. NOTE (choice): KDE densities floored at 1e-12 (a finite KL when counts leave the data's
    range); correlation RMSE over unique pairs (official divides by all N^2 entries incl. the zeroed upper triangle)."""
    def r_rmse(a, b):                                          # Pearson r and RMSE over the finite entries
        ok = np.isfinite(a) & np.isfinite(b)
        return (float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan"),
                float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2))))
    grid = np.arange(max(model["psc"].max(), data["psc"].max()) + 1)
    p, q = kde_on_grid(model["psc"], grid), kde_on_grid(data["psc"], grid)
    il = np.tril_indices(len(data["rate"]), -1)               # unique pairs i > j
    out = dict(kl_psc=float(np.sum(p * np.log(np.maximum(p, 1e-12) / np.maximum(q, 1e-12)))), r_psc=r_rmse(p, q)[0])
    for k in ("corr", "rate", "mean_isi", "std_isi"):          # correlations: over the unique pairs only
        out[f"r_{k}"], out[f"rmse_{k}"] = r_rmse(*(st[k][il] if k == "corr" else st[k] for st in (model, data)))
    return out

def compare_rows(rows):
    """{row: (model stats, data stats)} -> {row/statistic: value}."""
    return {f"{row}/{k}": v for row, (a, b) in rows.items() for k, v in compare(a, b).items()}

def comparison_rows(real, gen, ae_rec, len_real=None, len_gen=None):
    """The rows of the evaluation: generated, AE reconstruction (Poisson draw of its rates) and real trials of one
    half (the noise floor) against the real trials, and generated trials of that size against the other half.
    Counts (K,N,T), with their lengths for end-padded trials. -> (metrics, stats of real, stats of generated)."""
    h = len(real) // 2
    len_real = np.full(len(real), real.shape[-1]) if len_real is None else len_real
    len_gen = np.full(len(gen), gen.shape[-1]) if len_gen is None else len_gen
    st_real, st_gen, st_half = (spike_stats(s, ln) for s, ln in ((real, len_real), (gen, len_gen),
                                                                   (real[h:], len_real[h:])))
    rows = {"gen_vs_real": (st_gen, st_real), "ae_vs_real": (spike_stats(ae_rec, len_real), st_real),
            "real_vs_real": (spike_stats(real[:h], len_real[:h]), st_half),     # noise floor: two disjoint halves
            "gen_vs_real_half": (spike_stats(gen[:h], len_gen[:h]), st_half)}   # same sizes as the floor
    return compare_rows(rows), st_real, st_gen

def affine_lstsq(Z, X):
    """Least squares with an intercept, [Z 1] W = X. Z (M,d), X (M,c) -> W (d+1, c), the intercept last."""
    return np.linalg.lstsq(np.c_[Z, np.ones(len(Z))], X, rcond=None)[0]

def latent_r2(Z_tr, X_tr, Z_te, X_te):
    """Latent recovery: the affine map latents -> true Lorenz states fit on training bins Z_tr (M,d), X_tr (M,3);
    R^2 = 1 - SSE/SST on held-out bins, pooled over the 3 states."""
    W = affine_lstsq(Z_tr, X_tr)                               # (d+1, 3)
    return float(1 - ((X_te - np.c_[Z_te, np.ones(len(Z_te))] @ W) ** 2).sum() / ((X_te - X_te.mean(0)) ** 2).sum())

def as_counts(s):
    """Sampled spikes (a torch tensor on any device) -> int64 numpy counts."""
    return s.cpu().numpy().astype(np.int64)

def evaluate(data, x, z_all, rates_hat, gen):
    """The comparison rows vs the real (training) trials, the AE on test trials, latent recovery. -> (metrics, stats)"""
    print("[evaluation]")
    tr, te = data["train"], data["test"]
    real, gen_s = data["spikes"][tr], as_counts(gen["spikes"])
    rows, st_real, st_gen = comparison_rows(real, gen_s, as_counts(torch.poisson(rates_hat[tr].cpu())))
    res = {"data/n_real": len(real), "data/n_generated": len(gen_s), "data/mean_count": float(real.mean()), **rows,
           "ae/test_poisson_nll": float(F.poisson_nll_loss(rates_hat[te], x[te], log_input=False, full=True))}
    if "latents" in data:                                      # simulated data: true rates and latents are known
        res["ae/test_rate_mse"] = float(((rates_hat[te].cpu().numpy() - data["rates"][te]) ** 2).mean())
        z, lat = z_all.cpu().numpy(), data["latents"]
        res["ae/latent_r2"] = latent_r2(*(bins_as_rows(a) for a in (z[tr], lat[tr], z[te], lat[te])))
    return res, st_real, st_gen

# ---- The experiment: run_lorenz(cfg, data) -> (metrics, files) -----------------------------------------------------
def lorenz_models(cfg, data):
    """Stages 1-2 of every fixed-length run: the AE, the latent normalisation and the denoiser (EMA)."""
    x, ae, z_all, rates_hat = train_autoencoder(cfg, data)     # 1) autoencoder with coordinated dropout
    mu, sigma, zn_tr = normalise_latents(z_all[data["train"]])
    dn = Denoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state).to(cfg.device)
    return (x, ae, z_all, rates_hat, mu, sigma, *train_denoiser(cfg, zn_tr, dn))  # 2) latent DDPM -> ddpm, dn

def run_lorenz(cfg, data):
    """Fig. 2: the AE, the latent DDPM, cfg.n_gen new trials, their statistics against the real trials."""
    x, ae, z_all, rates_hat, mu, sigma, ddpm, dn = lorenz_models(cfg, data)
    gen = generate(cfg, ddpm, dn, ae, mu, sigma, x.shape[-1])  # 3) new trials
    res, st_real, st_gen = evaluate(data, x, z_all, rates_hat, gen)  # 4) statistics vs the real trials
    return res, run_files(data, gen, ae, dn, mu, sigma, lorenz_figures(data, gen, z_all, res, st_real, st_gen))

def run_files(data, gen, ae, dn, mu, sigma, figures, **samples):
    """The figures, samples.npz (real = training trials, generated, ...), ae.pt, denoiser.pt (with mu, sigma)."""
    return {**figures, "samples.npz": dict(real=data["spikes"][data["train"]], generated=as_counts(gen["spikes"]),
                                           **samples),
            "ae.pt": ae.state_dict(), "denoiser.pt": {**dn.state_dict(), "latent_mu": mu, "latent_sigma": sigma}}

EXPERIMENTS = {"lorenz": (simulated(simulate_lorenz), run_lorenz)}

# ==== Part II: the paper's other experiments, one section each ========================================================
# ---- Spike history (Sec. 3.3; train_spike_history_monkey.ipynb): --demo lorenz-refractory --------------------------
DEMOS["lorenz-refractory"] = dict(
    ae_steps=400,               # (override) the GLM needs accurate AE rates
    sh_bins=20,                 # H spike-history bins of the GLM, official 20
    sh_epochs=700,              # full-batch GLM epochs. NOTE (deviation): official 3000
    sh_trials=96,               # training trials the GLM is fitted on (official: all of them)
    sh_lr=0.1,                  # GLM AdamW learning rate (weight decay 0.01), official 0.1
    sh_cap=5,                   # spike counts are capped at this for fitting and sampling, official 5
)
DEMO_CHECKS["lorenz-refractory"] = lambda cfg: check(
    cfg.data or cfg.sh_bins < cfg.n_bins, f"--sh-bins ({cfg.sh_bins}) must be smaller than --n-bins ({cfg.n_bins})")

def refractory_poisson(lam, rng, K=4):
    """Spikes with refractoriness in the spike-history model's own form (not in the paper; the role of the monkey
    data's single-neuron dynamics): s_{n,t} ~ Poisson(softplus(log lam_{n,t} + sum_k h_{n,k} s_{n,t-k})), history
    filter h_{n,k} = -a_n exp(-(k-1)/tau_n), k = 1..K, a_n ~ U[1.5, 3], tau_n ~ U[0.5, 1.5] bins. lam (B,N,T)."""
    B, N, T = lam.shape
    a, tau = rng.uniform(1.5, 3.0, N), rng.uniform(0.5, 1.5, N)
    h = -a[:, None] * np.exp(-np.arange(K) / tau[:, None])    # (N, K); column k-1 acts on s_{t-k}
    s = np.zeros((B, N, T), np.int64)
    for t in range(T):
        past = s[:, :, max(0, t - K):t][..., ::-1]             # (B, N, <=K): s_{t-1}, s_{t-2}, ...
        drive = np.log(lam[:, :, t]) + (past * h[:, :past.shape[-1]]).sum(-1)  # (B, N)
        s[:, :, t] = rng.poisson(np.logaddexp(0.0, drive))     # softplus(drive)
    return s

class SpikeHistoryGLM(nn.Module):
    """Per-neuron autoregressive Poisson GLM with a softplus link, no coupling between neurons:
    r_{n,t} = softplus( sum_{k=1..H} w_{n,k} s_{n,t-k} + w_{n,H+1} log lambda_{n,t} + w_{n,H+2} ), lambda the latent
    model's rate. LDNS's decoder is pointwise in time, so this adds single-neuron dynamics such as refractoriness."""
    def __init__(self, N, H=20):
        super().__init__()
        self.H, self.w = H, nn.Parameter(torch.randn(N, H + 2))  # w (N, H+2): history, log-rate gain, bias; N(0,1)

    def design(self, s, log_lam):
        """Regressors of bins t = H..T-1: s, log_lam (B,N,T) -> X (N, B(T-H), H+2), rows [s_{t-1..t-H}, log lam_t, 1]"""
        past = s.unfold(-1, self.H, 1)[..., :-1, :].flip(-1)   # (B,N,T-H,H): [..., k-1] = s_{t-k}
        X = torch.cat([past, log_lam[..., self.H:, None], torch.ones_like(past[..., :1])], -1)  # (B,N,T-H,H+2)
        return X.permute(1, 0, 2, 3).reshape(s.shape[1], -1, self.H + 2)  # (N,B,T-H,H+2) -> (N, B(T-H), H+2)

    def forward(self, X):
        """Teacher-forced rates r = softplus(X w) per neuron: X (N,M,H+2) -> (N,M)."""
        return F.softplus(torch.bmm(X, self.w[:, :, None])[..., 0])

    @torch.no_grad()
    def sample(self, lam, cap=5):
        """From a zero history, bin by bin: r_t = softplus(hist . w_:H + w_H log lambda_t + w_H+1),
        s_t = min(Poisson(r_t), cap). lam (B,N,T) -> spikes (B,N,T); one loop over time."""
        H, log_lam = self.H, lam.clamp(min=1e-8).log()        # NOTE (choice): floor so that log(0) stays finite
        hist, out = lam.new_zeros(*lam.shape[:2], H), []       # (B,N,H): hist[..., k-1] = s_{t-k}
        for t in range(lam.shape[-1]):
            r = F.softplus((hist * self.w[:, :H]).sum(-1) + self.w[:, H] * log_lam[..., t] + self.w[:, H + 1])
            s_t = torch.poisson(r.cpu()).clamp(max=cap).to(lam.device)  # (B,N)
            hist = torch.cat([s_t[..., None], hist[..., :-1]], -1)  # s_t becomes s_{(t+1)-1}
            out.append(s_t)
        return torch.stack(out, -1)                            # T x (B,N) -> (B,N,T)

def fit_spike_history(cfg, s_tr, lam_tr):
    """Stage 3, after the AE and the denoiser (both frozen): targets are training spikes capped at sh_cap, lambda
    the AE rates of the same trials; the first H bins serve only as history. Full-batch AdamW on the Poisson NLL.
    s_tr, lam_tr (K,N,T). NOTE (deviation): fitted on at most sh_trials training trials (official: all of them)."""
    H, s, lam = cfg.sh_bins, s_tr[:cfg.sh_trials].clamp(max=cfg.sh_cap), lam_tr[:cfg.sh_trials]
    glm = SpikeHistoryGLM(s.shape[1], H).to(s.device)
    X = glm.design(s, lam.clamp(min=1e-8).log())               # (N, M, H+2)
    y = s[..., H:].permute(1, 0, 2).reshape(s.shape[1], -1)    # (B,N,T-H) -> (N,B,T-H) -> (N, M) targets
    opt, progress = torch.optim.AdamW(glm.parameters(), lr=cfg.sh_lr, weight_decay=0.01), Progress("GLM", cfg.sh_epochs)
    for epoch in range(1, cfg.sh_epochs + 1):
        loss = F.poisson_nll_loss(glm(X), y, log_input=False, full=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check(math.isfinite(loss.item()), f"spike-history GLM: the training loss became {loss.item()} at step {epoch}; "
              "likely cause: a learning rate too high (--sh-lr)", FloatingPointError)
        progress(epoch, loss=loss.item())
    return glm.eval()

def lag_ratios(s, L=10):
    """rho_l = P(spike at t+l | spike at t) / P(spike) = sum_n sum_{k,t} s_{n,t} s_{n,t+l} / sum_n p_n sum_{k,t} s_{n,t}
    for l = 1..L, p_n the neuron's mean count per bin (1: Poisson, constant rate; < 1: refractory). s (K,N,T) -> (L,)"""
    s = s.astype(np.float64)
    p = s.mean((0, 2))                                         # (N,)
    return np.array([(s[..., :-l] * s[..., l:]).sum() / (p * s[..., :-l].sum((0, 2))).sum() for l in range(1, L + 1)])

def group_acg(s, groups, L=10):
    """Group auto-correlograms (official plotting notebooks): per trial and neuron the temporal mean is removed,
    c_l = sum_t x_t x_{t+l} / T, averaged over trials and over the neurons of each group. -> (n_groups, L)"""
    x = s - s.mean(-1, keepdims=True)                          # (K,N,T)
    c = np.stack([(x[..., :-l] * x[..., l:]).sum(-1).mean(0) for l in range(1, L + 1)], -1) / s.shape[-1]  # (N,L)
    return np.stack([c[g].mean(0) for g in groups])

def autocorrelogram_metrics(real, plain, sh, corr, L=10):
    """Lag ratios and group autocorrelograms of the data, LDNS alone and LDNS + spike history; relative errors of
    rho_1, rho_2. Groups (official): neurons sorted by sum_j corr_ij^2 of the data (diagonal zeroed), cut into 4.
    NOTE (choice): descending order, most correlated neurons first."""
    c2 = np.nan_to_num(corr) ** 2
    np.fill_diagonal(c2, 0)
    groups, res = np.array_split(np.argsort(-c2.sum(1)), 4), {}
    for name, s in (("data", real), ("ldns", plain), ("ldns_sh", sh)):
        rho, p = lag_ratios(s, L), f"acg/{name}/"
        res.update({p + "lag_ratio": rho.tolist(), p + "lag1_ratio": float(rho[0]), p + "lag2_ratio": float(rho[1]),
                    p + "group_acg": group_acg(s.astype(np.float64), groups, L).tolist()})
        for lag in (1, 2) if name != "data" else ():           # |rho_l - rho_l(data)| / rho_l(data)
            ref = res[f"acg/data/lag{lag}_ratio"]
            res[f"{p}lag{lag}_rel_error"] = abs(res[f"{p}lag{lag}_ratio"] - ref) / ref
    return res

def run_refractory(cfg, data):
    """LDNS rates, spike-history GLM spikes (fit after the denoiser); scored also as LDNS alone; autocorrelograms."""
    x, ae, z_all, rates_hat, mu, sigma, ddpm, dn = lorenz_models(cfg, data)
    tr = data["train"]
    glm = fit_spike_history(cfg, x[tr], rates_hat[tr])         # 3) the spike-history observation model
    gen = generate(cfg, ddpm, dn, ae, mu, sigma, x.shape[-1])
    gen["spikes_plain"], gen["spikes"] = gen["spikes"], glm.sample(gen["rates"], cfg.sh_cap).cpu()
    res, st_real, st_gen = evaluate(data, x, z_all, rates_hat, gen)
    plain = as_counts(gen["spikes_plain"])
    res.update(compare_rows({"plain_vs_real": (spike_stats(plain), st_real)}))
    res.update(autocorrelogram_metrics(data["spikes"][tr], plain, as_counts(gen["spikes"]), st_real["corr"]))
    figures = {**lorenz_figures(data, gen, z_all, res, st_real, st_gen, "LDNS + spike history"), **acg_figure(res)}
    return res, run_files(data, gen, ae, dn, mu, sigma, figures, generated_plain=plain)

EXPERIMENTS["lorenz-refractory"] = (simulated(simulate_lorenz, refractory_poisson), run_refractory)  # Lorenz rates

# ---- Variable-length trials (Sec. 4.2; train_autoencoder_human.ipynb, train_diffusion_human.ipynb) -----------------
DEMOS["lorenz-varlen"] = dict(
    n_bins=160,                 # (override) the window: the longest trial
    len_min=0,                  # shortest trial length (lengths uniform in len_min..n_bins); 0 -> 0.3 n_bins
    n_buckets=3,                # trial-length buckets of the evaluation
)

def check_varlen(cfg):
    check(not cfg.data, "--demo lorenz-varlen simulates its own trials of different lengths: drop --data")
    cfg.len_min = cfg.len_min or max(2, round(0.3 * cfg.n_bins))
    check(2 <= cfg.len_min <= cfg.n_bins, f"--len-min must be between 2 and --n-bins ({cfg.n_bins}), got {cfg.len_min}")
    check(cfg.n_buckets <= cfg.n_bins - cfg.len_min + 1, "--n-buckets must be at most the number of trial lengths "
          f"(--n-bins - --len-min + 1 = {cfg.n_bins - cfg.len_min + 1}), got {cfg.n_buckets}")

DEMO_CHECKS["lorenz-varlen"] = check_varlen

def make_varlen_data(cfg):
    """Lorenz trials of n_bins bins, each cut to a length l ~ U{len_min..n_bins} and zero-padded at the END
    (official ldns/data/human.py); adds lengths (K,). NOTE (choice): each trial is z-scored over all n_bins
    simulated bins before the cut, so a bin has the same distribution whatever the trial length."""
    rng, T = np.random.default_rng(cfg.seed), cfg.n_bins
    data = simulate_lorenz(cfg.n_trials, T, cfg.n_neurons, rng)
    lengths = rng.integers(cfg.len_min, T + 1, cfg.n_trials)   # uniform over len_min..T
    m = (np.arange(T)[None] < lengths[:, None])[:, None]       # (K,T) -> (K,1,T) bool
    return split_trials({**{k: a * m for k, a in data.items()}, "lengths": lengths}, rng)

def valid_mask(lengths, T, centred=False):
    """Padding mask, m_t = 1 on the valid bins of each trial: t < l_i for end-padded trials, (T - l_i)//2 <= t <
    (T - l_i)//2 + l_i for centred ones (official sample_spikes_with_mask). lengths (B,) int -> (B,1,T) float."""
    left = (T - lengths) // 2 if centred else 0 * lengths
    t = torch.arange(T, device=lengths.device)
    return ((t[None] >= left[:, None]) & (t[None] < (left + lengths)[:, None])).float()[:, None]  # (B,T)->(B,1,T)

def causal_instance_norm(h, eps=1e-5):
    """Bin t normalised with the statistics of bins 0..t of its (sample, channel), no affine: mu_t = mean_{s<=t} h_s,
    var_t = mean_{s<=t} h_s^2 - mu_t^2, out_t = (h_t - mu_t) / sqrt(var_t + eps). (B,C,T) -> (B,C,T).
    NOTE (deviation): the official causal AE keeps InstanceNorm1d over the whole window, padding included, so a valid
    bin still depends on the padding after it; running statistics make the AE causal."""
    n = torch.arange(1, h.shape[-1] + 1, device=h.device, dtype=h.dtype)  # (T,) = t + 1
    mu = h.cumsum(-1) / n
    var = (h.pow(2).cumsum(-1) / n - mu.pow(2)).clamp(min=0)
    return (h - mu) / (var + eps).sqrt()

class CausalAEBlock(AEBlock):
    """AEBlock with a causal S4 kernel and causal_instance_norm: the output at bin t sees inputs at bins <= t."""
    bidirectional, norm = False, staticmethod(causal_instance_norm)

class CausalAutoEncoder(AutoEncoder):
    """The official variable-length AE: causal blocks, a pointwise decoder; the end padding cannot reach valid bins."""
    block = CausalAEBlock

def masked_moments(h, m, dims):
    """Mean and (biased) variance of h over the valid bins (m = 1) along dims: mu = sum m h / sum m,
    var = sum m (h - mu)^2 / sum m (official LatentHumanDataset for the latent statistics). -> each keepdim."""
    n = m.sum(dims, keepdim=True)
    mu = (h * m).sum(dims, keepdim=True) / n
    return mu, ((h - mu).pow(2) * m).sum(dims, keepdim=True) / n

def centre_pad(z, lengths):
    """Each trial's valid segment z[..., :l] moved to the centre of the window, left = (T - l)//2, both sides filled
    with its edge values (official symmetrically_pad_latent). z (B,d,T) end-padded -> centred z, centred mask."""
    B, d, T = z.shape
    t, left = torch.arange(T, device=z.device), (T - lengths) // 2
    src = torch.minimum((t[None] - left[:, None]).clamp(min=0), lengths[:, None] - 1)  # (B,T) source bin
    return z.gather(-1, src[:, None].expand(B, d, T)), valid_mask(lengths, T, centred=True)  # (B,T)->(B,1,T)->(B,d,T)

def crop_centred(x, lengths):
    """Inverse of centre_pad: the centred valid segment of x moved to the front, zeros after. x (B,C,T) -> (B,C,T)."""
    T = x.shape[-1]
    src = (torch.arange(T, device=x.device)[None] + ((T - lengths) // 2)[:, None]).clamp(max=T - 1)  # (B,T) source
    return x.gather(-1, src[:, None].expand(x.shape)) * valid_mask(lengths, T)  # (B,T) -> (B,1,T) -> (B,C,T)

class MaskedDenoiser(Denoiser):
    """The centred padding mask m (B,1,T) as an extra input channel (train_diffusion_human.ipynb, C_in = d + 1), and
    blocks that normalise over its valid bins only: m (h - mu) / sqrt(var + 1e-5), mu, var = masked_moments.
    NOTE (deviation): official feeds the mask channel only and normalises over the whole window; the loss ignores
    the padding, so the sampler leaves unconstrained values there, which a whole-window norm carries inside."""
    d_extra = 1

    def forward(self, z, t, m):
        def masked_instance_norm(h):                           # (B,C,T), padded bins set to 0
            mu, var = masked_moments(h, m, -1)                 # (B,C,1) each
            return m * (h - mu) / (var + 1e-5).sqrt()
        return self.backbone(torch.cat([z, m], 1), self.t_mlp(timestep_embedding(t)), masked_instance_norm)

def masked_diffusion_loss(ddpm, model, x0, m):
    """Alg. 1 on the valid bins of the centred mask m (B,1,T) only: sum m (eps - eps_theta)^2 / (sum m * d).
    NOTE (deviation): train_diffusion_human.ipynb uses SmoothL1(beta 0.04) x mask; here the eps-MSE of the Lorenz
    recipe, whose minimiser is the posterior mean of eps that the ancestral sampler assumes."""
    eps_hat, eps = ddpm.predict_noise(model, x0, m=m)
    return ((eps_hat - eps) ** 2 * m).sum() / (m.sum() * x0.shape[1])

@torch.no_grad()
def sample_at_lengths(cfg, ddpm, dn, ae, mu, sigma, lengths, T):
    """Trials of the requested lengths (n,) (official sample_spikes_with_mask): the sampler with the centred mask at
    every step, z~ sigma + mu, decode the window, crop. -> z (n,d,T) centred, rates and spikes (n,N,T) end-padded."""
    z = sample_latents(cfg, ddpm, dn, mu, sigma, len(lengths), T, m=valid_mask(lengths, T, centred=True))
    rates = crop_centred(batched(ae.decoder, z), lengths)       # (n,N,T): l_i valid bins, zeros after
    return dict(z=z, rates=rates, spikes=torch.poisson(rates.cpu()), lengths=lengths)

def length_buckets(len_min, len_max, n_buckets):
    """n_buckets contiguous integer length ranges [lo, hi] of (nearly) equal width covering len_min..len_max."""
    edges = np.linspace(len_min, len_max + 1, n_buckets + 1).round().astype(int)
    return [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:])]

def evaluate_varlen(cfg, data, rates_hat, gen, m):
    """The comparison rows on the valid bins (mask m (K,1,T)) only, for all lengths pooled and per length bucket
    (prefix len_<lo>-<hi>/, trials assigned by their length). -> (metrics, stats of the real and generated trials)"""
    tr, T = data["train"], m.shape[-1]
    len_r, len_g = data["lengths"][tr], gen["lengths"].cpu().numpy()
    real, gen_s = data["spikes"][tr], as_counts(gen["spikes"])
    ae_rec = as_counts(torch.poisson((rates_hat[tr] * m[tr]).cpu()))
    res, st_real, st_gen = comparison_rows(real, gen_s, ae_rec, len_r, len_g)  # all lengths pooled
    res.update({"data/n_real": len(real), "data/n_generated": len(gen_s),
                "data/mean_count": float(bins_as_rows(real, len_r).mean())})
    for lo, hi in length_buckets(cfg.len_min, T, cfg.n_buckets):  # the trials of lengths lo..hi
        r, g = np.nonzero((len_r >= lo) & (len_r <= hi))[0], np.nonzero((len_g >= lo) & (len_g <= hi))[0]
        rows = comparison_rows(real[r], gen_s[g], ae_rec[r], len_r[r], len_g[g])[0]
        res.update({f"len_{lo}-{hi}/{k}": v for k, v in {"n_real": len(r), "n_generated": len(g), **rows}.items()})
    return res, st_real, st_gen

def run_varlen(cfg, data):
    """Variable-length trials: the causal AE with the masked loss, masked latent statistics and centred padding, the
    masked-norm denoiser with the masked loss, sampling at requested lengths, evaluation per length bucket."""
    tr, T = data["train"], data["spikes"].shape[-1]
    lengths = torch.tensor(data["lengths"]).to(cfg.device)     # (K,)
    m = valid_mask(lengths, T)                                 # (K,1,T)
    x, ae, z_all, rates_hat = train_autoencoder(cfg, data, CausalAutoEncoder, m=m[tr])
    mu, var = masked_moments(z_all[tr], m[tr], (0, 2))         # (1,d,1): per channel over all valid bins
    sigma = var.sqrt()
    zn_tr, mc_tr = centre_pad((z_all[tr] - mu) / sigma, lengths[tr])  # the denoiser's training set, centred
    dn = MaskedDenoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state).to(cfg.device)
    ddpm, dn = train_denoiser(cfg, zn_tr, dn, masked_diffusion_loss, m=mc_tr)
    req = lengths[tr][torch.randint(len(tr), (cfg.n_gen,)).to(cfg.device)]  # (n,) from the training lengths
    fixed = torch.linspace(cfg.len_min, T, 4).round().long().to(cfg.device)  # four lengths for the figure
    print(f"[sampling] {cfg.n_gen} + 4 trials at requested lengths, {cfg.sample_steps} steps (eta {cfg.eta})")
    gen = sample_at_lengths(cfg, ddpm, dn, ae, mu, sigma, req, T)
    fixed_spikes = sample_at_lengths(cfg, ddpm, dn, ae, mu, sigma, fixed, T)["spikes"].cpu().numpy()
    res, st_real, st_gen = evaluate_varlen(cfg, data, rates_hat, gen, m)
    te, z, lat = data["test"], z_all.cpu().numpy(), data["latents"]  # the AE on the valid bins of the test trials
    len_tr, len_te = data["lengths"][tr], data["lengths"][te]
    nll = F.poisson_nll_loss(rates_hat[te], x[te], log_input=False, full=True, reduction="none")  # (K_te,N,T)
    err = bins_as_rows(rates_hat.cpu().numpy()[te], len_te) - bins_as_rows(data["rates"][te], len_te)  # (bins, N)
    rows = [bins_as_rows(a, n) for a, n in ((z[tr], len_tr), (lat[tr], len_tr), (z[te], len_te), (lat[te], len_te))]
    res.update({"ae/test_poisson_nll": float((nll * m[te]).sum() / (m[te].sum() * x.shape[1])),
                "ae/test_rate_mse": float((err ** 2).mean()), "ae/latent_r2": latent_r2(*rows)})
    figures = {**stats_figure(st_real, st_gen, res, "LDNS"), **varlen_figure(fixed_spikes, fixed.cpu().numpy())}
    return res, run_files(data, gen, ae, dn, mu, sigma, figures, lengths_real=len_tr,
                          lengths_generated=req.cpu().numpy())

EXPERIMENTS["lorenz-varlen"] = (make_varlen_data, run_varlen)

# ---- Conditional generation on synthetic reaches (Sec. 4.4; train_and_plot_diffusion_monkey_*_conditioned) ---------
# NOTE (deviation): the monkey recipes train a causal AE (d 16, p 0.5, beta_lat 0.001, beta_td 0.2) and denoisers of
# 256 channels x 6 blocks, 2000 epochs of batch 512; here the Lorenz AE and 64 x 2 denoisers, 1000 steps of batch 64.
DEMOS["reach"] = dict(
    ae_steps=400, dn_blocks=2, dn_steps=1000,  # (overrides of core settings)
    dn_smooth_l1=0.05,          # SmoothL1 beta of the conditional denoisers' loss, official monkey 0.05
    angle_bin=50,               # bin at which the reach angle theta = atan2(v_y, v_x) is read, official 50
    n_angles=8,                 # requested reach directions in the evaluation, evenly spaced in [-pi, pi)
    n_per_angle=32,             # samples per requested direction
    n_vel=128,                  # held-out velocity traces to condition on (at most the test trials)
    ridge_alpha=1e-6,           # ridge penalty of the behaviour decoder, official Ridge(alpha=1e-6)
)
REACH_BIN_S, REACH_V_REF = 0.01, 0.35  # bin width in s (velocities in m/s, positions in m); m/s, the tuning's unit
REACH_ONSET, REACH_DURATION = (0.15, 0.30), (0.30, 0.55)  # movement onset and duration, fractions of the trial length
REACH_DISTANCE = (0.08, 0.12)   # reach distance in m; onset, duration and distance are uniform in these ranges

def check_reach(cfg):
    T, n_test = cfg.n_bins, cfg.n_trials - int(0.7 * cfg.n_trials) - int(0.1 * cfg.n_trials)
    lo, hi = math.floor(REACH_ONSET[1] * T) + 1, math.ceil((REACH_ONSET[0] + REACH_DURATION[0]) * T) - 1  # moving
    check(not cfg.data, "--demo reach simulates its own reaching data (it needs the velocity): drop --data")
    check(lo <= cfg.angle_bin <= hi, f"--angle-bin must be in [{lo}, {hi}] for --n-bins {cfg.n_bins} (a bin inside "
          f"every reach), got {cfg.angle_bin}")
    check(cfg.n_vel <= n_test, f"--n-vel must be at most the {n_test} held-out trials, got {cfg.n_vel}")

DEMO_CHECKS["reach"] = check_reach

def simulate_reach(K, T, N, rng, n_shared=3):
    """Centre-out reaches. Per trial: angle theta ~ U[-pi, pi) (NOTE (choice): continuous, not a few targets), distance,
    onset, duration uniform in the REACH_* ranges, v(t) = distance s'(t) [cos theta, sin theta], s the minimum-jerk
    profile (Flash & Hogan 1985). Per neuron: cosine velocity tuning (Moran & Schwartz 1999), preferred direction u_n,
    depth k_n ~ U[0.7, 1.4], baseline 10-30 Hz, weights w_n ~ N(0, 0.4^2 I) on n_shared latents x(t) not explained by
    velocity (a 2-d rotation at 1.5-2.5 Hz, n_shared - 2 squared-exponential GPs of 15 bins); Poisson counts.
    NOTE (deviation): the paper uses monkey MC_Maze (182 neurons, 140 bins of 5 ms), which cannot be downloaded here.
    -> spikes (K,N,T), rates, velocity (K,2,T) m/s, angle (K,), shared latents (K,n_shared,T), pref. directions (N,)"""
    t = np.arange(T)                                           # time bins
    theta, distance = rng.uniform(-np.pi, np.pi, K), rng.uniform(*REACH_DISTANCE, K)
    onset, duration = rng.uniform(*REACH_ONSET, K) * T, rng.uniform(*REACH_DURATION, K) * T
    tau = np.clip((t[None] - onset[:, None]) / duration[:, None], 0.0, 1.0)  # (K,T) movement phase
    # s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5: speed ds/dt = 30 tau^2 (1 - tau)^2 / (duration * bin width) in m/s
    speed = distance[:, None] * (30 * tau ** 2 * (1 - tau) ** 2 / (duration[:, None] * REACH_BIN_S))  # (K,T)
    velocity = np.stack([np.cos(theta), np.sin(theta)], 1)[:, :, None] * speed[:, None, :]  # (K,2,1)(K,1,T)->(K,2,T)
    f, psi, a = rng.uniform(1.5, 2.5, K), rng.uniform(-np.pi, np.pi, K), rng.uniform(0.5, 1.5, K)
    arg = 2 * np.pi * f[:, None] * (t * REACH_BIN_S)[None] + psi[:, None]  # (K,T)
    rotation = a[:, None, None] * np.stack([np.cos(arg), np.sin(arg)], 1)    # (K,2,T)
    L_chol = np.linalg.cholesky(np.exp(-0.5 * ((t[:, None] - t[None]) / 15.0) ** 2) + 1e-6 * np.eye(T))  # (T,T)
    gp = np.einsum("ts,ks->kt", L_chol, rng.standard_normal((K * (n_shared - 2), T)))  # (K(n_shared-2), T)
    x = np.concatenate([rotation, gp.reshape(K, n_shared - 2, T)], 1)        # (K(n_shared-2),T) -> (K,n_shared,T)
    phi = rng.uniform(-np.pi, np.pi, N)
    u, k = np.stack([np.cos(phi), np.sin(phi)], 1), rng.uniform(0.7, 1.4, N)  # (N,2), (N,)
    b = np.log(rng.uniform(10.0, 30.0, N) * REACH_BIN_S)                       # log(rate in Hz x bin width)
    w = 0.4 * rng.standard_normal((N, n_shared))
    # log lambda_n(t) = b_n + k_n (u_n . v(t)) / v_ref + w_n . x(t)
    rates = np.exp(b[None, :, None] + k[None, :, None] * np.einsum("nc,kct->knt", u, velocity) / REACH_V_REF
                   + np.einsum("nj,kjt->knt", w, x))                          # (K,N,T)
    return dict(spikes=rng.poisson(rates), rates=rates.astype(np.float32), velocity=velocity.astype(np.float32),
                angle=theta.astype(np.float32), shared=x.astype(np.float32), pref_dir=phi.astype(np.float32))

def reach_condition(velocity, angle_bin):
    """The angle condition of the official monkey recipe (ldns/data/monkey.py): theta = atan2(v_y, v_x) at the
    fixed bin angle_bin, c = [cos theta, sin theta]. velocity (K,2,T) -> c (K,2)."""
    theta = torch.atan2(velocity[:, 1, angle_bin], velocity[:, 0, angle_bin])
    return torch.stack([torch.cos(theta), torch.sin(theta)], 1)

class ConditionalDenoiser(Denoiser):
    """Official ConditionalDenoiser: a condition c (B, d_cond) passes Linear(d_cond, C/4) -> SiLU -> Linear(C/4, C/4)
    and is ADDED to the time embedding, e = e_t + e_c, reaching every block through the zero-initialised adaLN."""
    def __init__(self, d, C, n_blocks, d_state, d_cond):
        super().__init__(d, C, n_blocks, d_state)
        self.c_mlp = nn.Sequential(nn.Linear(d_cond, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))

    def forward(self, z, t, c):
        return self.backbone(z, self.t_mlp(timestep_embedding(t)) + self.c_mlp(c))

class VelocityDenoiser(Denoiser):
    """The velocity-conditioned monkey model: velocity traces v (B,2,T) as two extra input channels (C_in = d + 2)."""
    d_extra = 2

    def forward(self, z, t, v):
        return self.backbone(torch.cat([z, v], 1), self.t_mlp(timestep_embedding(t)))

def train_reach_denoiser(cfg, zn_tr, dn, name, **cond_tr):
    """A monkey-recipe denoiser: conv_out x 0.1 at init, Alg. 1 with SmoothL1(beta) per entry. -> (ddpm, EMA model)"""
    dn = dn.to(cfg.device)
    with torch.no_grad():
        dn.conv_out.weight.mul_(0.1)
        dn.conv_out.bias.mul_(0.1)
    def smooth_l1_loss(ddpm, model, x0, **cond):
        return F.smooth_l1_loss(*ddpm.predict_noise(model, x0, **cond), beta=cfg.dn_smooth_l1, reduction="none").mean()
    return train_denoiser(cfg, zn_tr, dn, smooth_l1_loss, name, **cond_tr)

def fit_ridge(X, Y, alpha):
    """Ridge regression with an intercept (sklearn Ridge, fit_intercept=True): with centred Xc, Yc,
    W = (Xc^T Xc + alpha I)^-1 Xc^T Yc and b = mean(Y) - mean(X) W. X (M,N), Y (M,c) -> W (N,c), b (c,)."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return W, y_mean - x_mean @ W

def r2_score(Y, Y_hat):
    """R^2 = 1 - SSE/SST per output over all trials and bins, averaged over outputs (sklearn r2_score). (K,c,T)."""
    Y, Y_hat = bins_as_rows(Y.astype(np.float64)), bins_as_rows(Y_hat.astype(np.float64))
    return float(np.mean(1 - ((Y - Y_hat) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)))

def trajectory(velocity):
    """Hand position from the velocity, p(t) = sum_{s<=t} v(s) dt (the official plots cumsum it). (K,2,T) -> m."""
    return np.cumsum(velocity, -1) * REACH_BIN_S

def angular_error_deg(velocity, angle):
    """|direction - angle| wrapped to [0, 180] degrees, direction = the angle of the end point p(T-1). NOTE (choice):
    the paper compares reaches by eye; the end point is a decoded trajectory's least noisy direction. (K,2,T), (K,)"""
    end = trajectory(velocity)[:, :, -1]                       # (K,2)
    return np.abs(np.degrees(np.angle(np.exp(1j * (np.arctan2(end[:, 1], end[:, 0]) - angle)))))

def evaluate_reach(cfg, data, rates_hat, gen_angle, gen_vel, v_req):
    """Behaviour evaluation (paper): a ridge decoder (official alpha) from the AE rates of the real training trials to
    their velocity (ceiling: its R^2 on held-out trials), applied to the angle- (angular error) and velocity-conditioned
    samples (R^2 to the requested traces v_req); spike statistics vs real trials. -> (metrics, decoded v (n,2,T))"""
    tr, te, v, real = data["train"], data["test"], data["velocity"], data["spikes"][data["train"]]
    W, b = fit_ridge(bins_as_rows(rates_hat[tr].astype(np.float64)), bins_as_rows(v[tr]), cfg.ridge_alpha)
    # the per-bin linear decoder v_hat(t) = W^T lambda(t) + b: (K*T, 2) -> (K,T,2) -> (K,2,T)
    v_dec_te, v_dec_angle, v_dec_vel = ((bins_as_rows(r.astype(np.float64)) @ W + b).reshape(len(r), r.shape[2], 2)
                                        .transpose(0, 2, 1) for r in (rates_hat[te], gen_angle["rates"].cpu().numpy(),
                                                                      gen_vel["rates"].cpu().numpy()))
    err, r2_real = angular_error_deg(v_dec_angle, gen_angle["theta"].cpu().numpy()), r2_score(v[te], v_dec_te)
    r2, s, s_vel = r2_score(v[v_req], v_dec_vel), as_counts(gen_angle["spikes"]), as_counts(gen_vel["spikes"])
    res = {"behaviour/decoder_r2_real_test": r2_real, "behaviour/real_test_angle_error_median_deg": float(np.median(
           angular_error_deg(v_dec_te, data["angle"][te]))), "angle/n_directions": cfg.n_angles,
           "angle/n_samples": len(err), "angle/error_median_deg": float(np.median(err)),
           "angle/error_p90_deg": float(np.percentile(err, 90)), "velocity/n_traces": len(v_req),
           "velocity/r2_decoded_vs_requested": r2, "velocity/r2_fraction_of_real_decoder": r2 / r2_real}
    rows = dict(angle_gen_vs_real=(spike_stats(s), spike_stats(real)),
                real_vs_real_size_matched=(spike_stats(real[:len(s)]), spike_stats(real[len(s):2 * len(s)])),
                velocity_gen_vs_real_test=(spike_stats(s_vel), spike_stats(data["spikes"][v_req])))
    return {**res, **compare_rows(rows)}, v_dec_angle, v_dec_vel

def run_reach(cfg, data):
    """Sec. 4.4 on one AE and latent normalisation: an angle- and a velocity-conditioned denoiser, trials at requested
    angles and at held-out velocity traces never used in training, the behaviour evaluation."""
    tr = data["train"]
    x, ae, z_all, rates_hat = train_autoencoder(cfg, data)
    mu, sigma, _ = normalise_latents(z_all[tr])
    zn_tr, T = (z_all[tr] - mu) / sigma, x.shape[-1]           # the monkey recipes do not clamp
    v = torch.tensor(data["velocity"]).to(cfg.device)          # (K,2,T) m/s
    v_scale = v[tr].std()  # NOTE (choice): velocity channels in units of its std (official: m/s, a similar scale)
    size, v_req = (cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state), data["test"][:cfg.n_vel]
    ddpm, dn_angle = train_reach_denoiser(cfg, zn_tr, ConditionalDenoiser(*size, d_cond=2), "DDPM-angle",
                                          c=reach_condition(v[tr], cfg.angle_bin))
    ddpm, dn_vel = train_reach_denoiser(cfg, zn_tr, VelocityDenoiser(*size), "DDPM-velocity", v=v[tr] / v_scale)
    theta = torch.tensor(np.repeat(-np.pi + 2 * np.pi * np.arange(cfg.n_angles) / cfg.n_angles,  # evenly spaced
                                   cfg.n_per_angle).astype(np.float32))                         # in [-pi, pi)
    c = torch.stack([torch.cos(theta), torch.sin(theta)], 1).to(cfg.device)  # (n,2)
    gen_angle = dict(sample_trials(cfg, ddpm, dn_angle, ae, mu, sigma, len(c), T, c=c), theta=theta)
    gen_vel = sample_trials(cfg, ddpm, dn_vel, ae, mu, sigma, len(v_req), T, v=v[v_req] / v_scale)  # held out
    res, v_dec_angle, v_dec_vel = evaluate_reach(cfg, data, rates_hat.cpu().numpy(), gen_angle, gen_vel, v_req)
    samples = dict(real=data["spikes"][tr], generated=as_counts(gen_angle["spikes"]), velocity_requested_trials=v_req,
                   generated_velocity=as_counts(gen_vel["spikes"]), velocity_requested=data["velocity"][v_req],
                   angle_requested=theta.cpu().numpy())
    weights = {f"denoiser_{k}.pt": {**dn.state_dict(), "latent_mu": mu, "latent_sigma": sigma, "velocity_scale":
                                    v_scale.reshape(1)} for k, dn in (("angle", dn_angle), ("velocity", dn_vel))}
    figures = reach_figures(data, theta.cpu().numpy(), v_dec_angle, v_req, v_dec_vel)
    return res, {**figures, "ae.pt": ae.state_dict(), "samples.npz": samples, **weights}

EXPERIMENTS["reach"] = (simulated(simulate_reach), run_reach)

# ==== Part III: figures (paper Figs. 2-5, official plotting notebooks; matplotlib is imported only here), own data ==
def stats_figure(st_real, st_gen, res, label):
    """2_stats: population spike count histogram + KDE, pairwise correlations, mean and std ISI, with Pearson r."""
    from matplotlib.figure import Figure
    fig, il = Figure(figsize=(9, 8)), np.tril_indices(len(st_real["rate"]), -1)
    grid = np.arange(max(st_real["psc"].max(), st_gen["psc"].max()) + 1)
    ax = fig.add_subplot(2, 2, 1, title=f"PSC, r={res['gen_vs_real/r_psc']:.4f}", xlabel="population spike count")
    for st, col, lab in ((st_real, "k", "data"), (st_gen, "C3", label)):
        ax.hist(st["psc"], bins=50, density=True, color=col, alpha=0.25)
        ax.plot(grid, kde_on_grid(st["psc"], grid), col, label=lab)
    ax.legend()
    for i, k in enumerate(("corr", "mean_isi", "std_isi")):
        a, b = (st_real[k][il], st_gen[k][il]) if k == "corr" else (st_real[k], st_gen[k])
        ax = fig.add_subplot(2, 2, i + 2, title=f"{k}, r={res['gen_vs_real/r_' + k]:.4f}", xlabel="data", ylabel=label)
        ax.scatter(a, b, s=4, alpha=0.5)
        ax.plot(*[[np.nanmin([a, b]), np.nanmax([a, b])]] * 2, "k--", lw=0.8)   # the identity line
    return {"figures/2_stats.png": fig}

def lorenz_figures(data, gen, z_all, res, st_real, st_gen, label="LDNS"):
    """Fig. 2: 1_latents_3d (AE latents of test trials, samples and a 16x-length sample in Lorenz coordinates through
    the latent-recovery map; own data: latent channels [1, 5, 3] as official), 2_stats."""
    from matplotlib.figure import Figure
    z_np, z_long, fig = z_all.cpu().numpy(), gen["z_long"].cpu().numpy(), Figure(figsize=(13, 4.3))
    d, tr = z_np.shape[1], data["train"]
    W, names = np.eye(d + 1)[:, [1, 5, 3] if d >= 6 else [i % d for i in range(3)]], ("latent",) * 3  # (d+1, 3)
    if "latents" in data:                                      # the latent-recovery map fit on the training trials
        W, names = affine_lstsq(bins_as_rows(z_np[tr]), bins_as_rows(data["latents"][tr])), "xyz"
    for i, (z, head) in enumerate([(z_np[data["test"][:8]], "AE latents"), (gen["z"][:8].cpu().numpy(),
                                   "diffusion samples"), (z_long[:1], f"diffusion, {z_long.shape[-1]} bins")]):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d", title=head, **{f"{c}label": n for c, n in zip("xyz", names)})
        for p in np.einsum("kdt,de->ket", z, W[:-1]) + W[-1][None, :, None]:  # (K,d,T) -> (K,3,T)
            ax.plot(*p, lw=0.6)
    return {"figures/1_latents_3d.png": fig, **stats_figure(st_real, st_gen, res, label)}

def acg_figure(res):
    """3_autocorrelograms: lag ratios and group auto-correlograms of the data, LDNS, LDNS + spike history."""
    from matplotlib.figure import Figure
    G = len(res["acg/data/group_acg"])
    fig = Figure(figsize=(3.2 * (G + 1), 3.2))
    for g in range(G + 1):
        ax = fig.add_subplot(1, G + 1, g + 1, xlabel="lag", title="lag ratio P(s_t+l | s_t) / P(s)" if g == 0 else
                             f"group {g} auto-correlogram")
        for name, col in (("data", "k"), ("ldns", "C0"), ("ldns_sh", "C3")):
            c = res[f"acg/{name}/lag_ratio"] if g == 0 else res[f"acg/{name}/group_acg"][g - 1]
            ax.plot(range(1, len(c) + 1), c, col, marker=".", label=name)
    ax.legend(fontsize=7)
    return {"figures/3_autocorrelograms.png": fig}

def varlen_figure(s, lengths):
    """3_varlen: generated trials s (K,N,T) at four requested lengths (K,), the padding shaded."""
    from matplotlib.figure import Figure
    fig, T = Figure(figsize=(14, 3.5)), s.shape[-1]
    for i in range(len(s)):
        ax = fig.add_subplot(1, len(s), i + 1, title=f"generated, length {lengths[i]}", xlabel="time bin")
        ax.imshow(s[i], aspect="auto", cmap="Greys", interpolation="nearest", vmax=3)
        ax.axvspan(lengths[i] - 0.5, T - 0.5, color="C0", alpha=0.15)
    return {"figures/3_varlen.png": fig}

def reach_figures(data, theta, v_dec_angle, v_req, v_dec_vel):
    """Paper Fig. 5: 1_reach_angle_fan (real held-out reaches and the decoded angle-conditioned samples, coloured by
    angle), 2_reach_velocity (requested vs decoded trajectories and speeds of six held-out traces)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    te, fan, fig_v = data["test"], Figure(figsize=(10, 4.6)), Figure(figsize=(10, 4.6))
    for i, (v, angle, title) in enumerate([(data["velocity"][te], data["angle"][te], "real held-out reaches"),
                                           (v_dec_angle, theta, "decoded, angle-conditioned samples")]):
        ax = fan.add_subplot(1, 2, i + 1, title=f"{title} (colour: angle)", xlabel="x (m)", ylabel="y (m)",
                             aspect="equal")
        for p, a in zip(trajectory(v), angle):
            ax.plot(p[0], p[1], color=colormaps["hsv"]((a + np.pi) / (2 * np.pi)), lw=0.7, alpha=0.6)
    ax1 = fig_v.add_subplot(1, 2, 1, title="held-out: requested (thick), decoded (dashed)", xlabel="x (m)",
                            ylabel="y (m)", aspect="equal")
    ax2 = fig_v.add_subplot(1, 2, 2, title="speed: requested vs decoded", xlabel="time bin", ylabel="speed (m/s)")
    for i, (v_r, v_d) in enumerate(zip(data["velocity"][v_req[:6]], v_dec_vel[:6])):
        for v, style in ((v_r, dict(lw=2.5, alpha=0.5)), (v_d, dict(lw=1, ls="--"))):
            ax1.plot(*trajectory(v), color=f"C{i}", **style)
            ax2.plot(np.hypot(*v), color=f"C{i}", **style)
    return {"figures/1_reach_angle_fan.png": fan, "figures/2_reach_velocity.png": fig_v}

MAX_COUNT = 500                 # largest plausible spike count in one bin of --data (about 100 kHz at 5 ms bins)

def load_data(cfg):
    """--data: non-negative integer counts (trials, neurons, bins) in a .npy file or under the key 'spikes' of a
    .npz, checked before anything is trained or written; the same 70/10/20 split as the demos."""
    path, arrays = cfg.data, load_arrays(cfg.data)
    check("spikes" in arrays, f"--data {path}: expected an array named 'spikes' in the .npz, found {sorted(arrays)}")
    s = arrays["spikes"]
    check(s.ndim == 3, f"--data {path}: expected 3 dims (trials, neurons, bins), found shape {s.shape}")
    s, T_min = s.astype(np.float64), max(16, getattr(cfg, "sh_bins", 0) + 1)  # the spike-history GLM needs > H bins
    check(s.shape[0] >= 10 and s.shape[1] >= 1 and s.shape[2] >= T_min, f"--data {path}: expected at least 10 "
          f"trials, 1 neuron and {T_min} time bins, found {s.shape}")
    bad = s[np.isfinite(s) & (s != np.round(s))]
    for ok, found in ((np.isfinite(s).all(), f"finite counts, found {int((~np.isfinite(s)).sum())} NaN/inf entries"),
                      ((s >= 0).all(), f"non-negative counts, found minimum {s.min()}"),
                      (bad.size == 0, f"integer counts, found non-integer values, e.g. {bad[:1]}"),
                      (s.max() <= MAX_COUNT, f"at most {MAX_COUNT} spikes per neuron and bin, found {s.max():.4g}; "
                                             "re-bin the spike times into shorter bins"),
                      (s.sum() > 0, "some spikes, found only zeros")):
        check(ok, f"--data {path}: expected {found}")
    return split_trials(dict(spikes=s.astype(np.int64)), np.random.default_rng(cfg.seed))


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
