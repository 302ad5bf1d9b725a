"""LDNS minimal: Latent Diffusion for Neural Spiking data, the whole pipeline in one file.

Kapoor, Schulz, Vetter, Pei, Gao, Macke, "Latent Diffusion for Neural Spiking Data", NeurIPS 2024,
https://arxiv.org/abs/2407.08751 (official code: github.com/mackelab/LDNS). Self-contained: torch + numpy
(matplotlib only inside the figure function).

  spikes x (B,N,T) --S4 autoencoder--> smooth latents z (B,d,T) --latent DDPM with an S4 denoiser--> new z
  --pointwise decoder--> rates (B,N,T) --Poisson--> new spikes

Section map (paper / project spec ldns.md -> code):
  Lorenz data (paper Sec. 4.1, Fig. 2; spec 1) ............ make_lorenz_data, load_spikes
  S4 layer (paper Sec. 3.1; spec 2.1) ...................... hippo_legs, S4D
  Autoencoder, CD mask, regulariser (spec 2.2-2.4) ......... AEBlock, AutoEncoder, ae_loss
  Latent diffusion: denoiser, DDPM, EMA (spec 3) ........... DenoiserBlock, Denoiser, DDPM, EMA
  Training loop (AdamW, clip, warmup + cosine) ............. fit
  Generation: noise -> z -> un-normalise -> decode -> Poisson  generate
  Evaluation (spec 7) ...................................... spike_stats, compare, latent_r2 (main, step 5)
  Figures (spec 12, items 1-5) ............................. make_figures
Left out: conditional generation, variable length masks and the spike-history GLM (spec 4-6).

Run (2-core CPU, --device cpu):
  python ldns_minimal.py --demo lorenz          # ~4 min; r(PSC, corr, mean ISI, std ISI) ~0.99/0.99/0.99/0.97,
                                                # latent R^2 ~0.97 (targets: r >= 0.95, R^2 >= 0.9)
  python ldns_minimal.py --demo lorenz --long   # ~17-26 min; r 0.998/0.999/0.999/0.995, R^2 0.99; PSC KL 2.0x
                                                # the data-vs-data floor (2.8x size-matched; target <= 3x)
  python ldns_minimal.py --sample-steps 1000 --eta 1   # the official 1000-step ancestral DDPM sampler
  python ldns_minimal.py --quick                # ~10 s smoke run of every stage (numbers meaningless)
  python ldns_minimal.py --data spikes.npz      # your own counts (trials, neurons, bins), npz key 'spikes'
Outputs (README "Running"): config.json, metrics.json, timing.json, samples.npz, figures/*.png, ae.pt, denoiser.pt.
Shapes: B batch/trials, N neurons, T time bins, C hidden channels, d latent channels, H SSM channels,
n complex SSM modes. Everything is channels-first (B, C, T).
"""
import argparse
import copy
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
    demo: str = "lorenz"        # the synthetic experiment (only one: Lorenz, paper Fig. 2)
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda | mps
    out: str = ""               # output folder; "" -> runs/ldns_minimal-<demo>
    data: str = ""              # your own spikes (.npy or .npz key 'spikes'); "" -> Lorenz demo
    threads: int = 0            # torch CPU threads; 0 -> torch default
    # data (spec 1). NOTE (deviation): official 5000 trials x 256 bins; CPU scale uses fewer, shorter trials
    n_trials: int = 1500        # 70/10/20 split -> 1050 train trials = the "real" set of the evaluation
    n_bins: int = 128
    n_neurons: int = 128        # official 128
    # autoencoder (spec 2). NOTE (deviation): official C=256, 4 blocks, 1400 steps of batch 512
    ae_channels: int = 64
    ae_blocks: int = 2
    d_latent: int = 8           # official 8
    d_state: int = 64           # S4 state size (d_state/2 complex modes), official 64
    ae_steps: int = 250
    ae_batch: int = 64
    ae_lr: float = 2e-3         # NOTE (deviation): official 1e-3; larger for the short run
    mask_p: float = 0.2         # coordinated-dropout probability, official 0.2
    beta_lat: float = 0.01      # L2 latent penalty, official 0.01
    beta_td: float = 0.01       # temporal-difference penalty, official 0.01
    # diffusion (spec 3). NOTE (deviation): official 7000 steps of batch 512
    dn_channels: int = 64       # official 64
    dn_blocks: int = 4          # official 4
    dn_steps: int = 550
    dn_batch: int = 64
    dn_lr: float = 2e-3         # NOTE (deviation): official 1e-3; larger for the short run
    n_diffusion: int = 1000     # training diffusion steps, official 1000
    sample_steps: int = 40      # sampler steps; 1000 with --eta 1 is the official ancestral DDPM sampler
    eta: float = 1.0            # 1: (respaced) ancestral DDPM, 0: deterministic DDIM
    n_gen: int = 525            # NOTE (deviation): generated trials for evaluation; official: as many as train
    n_long: int = 2             # trials sampled at 16x length for the length-generalisation figure


DEMOS = ("lorenz",)
PRESETS = {
    "quick": dict(n_trials=60, n_bins=32, n_neurons=32, ae_channels=16, ae_blocks=1, d_state=16, ae_steps=100,
                  dn_channels=16, dn_blocks=1, dn_steps=300, sample_steps=10, n_gen=20, n_long=1),
    # the AE already reconstructs at the noise floor after 1000 steps; the rest of the budget goes to the denoiser
    "long": dict(n_trials=2000, ae_steps=1000, dn_steps=5000, sample_steps=50, n_gen=1400),
}
POSITIVE_FIELDS = ("n_trials", "n_bins", "n_neurons", "ae_channels", "ae_blocks", "d_latent", "d_state", "ae_steps",
                   "ae_batch", "ae_lr", "dn_channels", "dn_blocks", "dn_steps", "dn_batch", "dn_lr", "n_diffusion",
                   "sample_steps", "n_gen", "n_long")


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

    def __init__(self, name: str, total: int, every: int = 10):
        self.name, self.total, self.every, self.t0 = name, total, max(1, every), time.time()

    def __call__(self, step: int, **vals) -> None:
        if step % self.every and step != self.total:
            return
        el = time.time() - self.t0
        eta = el / max(step, 1) * (self.total - step)
        msg = " ".join(f"{k} {v:.4g}" for k, v in vals.items())
        end = "\n" if step == self.total else ""
        print(f"\r  [{self.name}] step {step}/{self.total} {msg} | {el:.0f}s elapsed, ETA {eta:.0f}s", end=end,
              flush=True)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temp file in the same folder, then rename: no half-written file on failure."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# -----------------------------------------------------------------------------
# Data: Lorenz latents -> softplus rates -> Poisson spikes (spec 1), or your own counts
# -----------------------------------------------------------------------------
LORENZ_IC = np.array([-9.7869288, -15.03852, 20.533978])  # dysts default initial condition


def lorenz_rk4(x, n_out, dt, n_sub=10, sigma=10.0, rho=28.0, beta=2.667):
    """Integrate K Lorenz systems at once with fixed-step RK4. x (K,3) -> trajectory (K, n_out, 3), spacing dt.
    NOTE (deviation): official integrates each trial with scipy Radau (rtol 1e-3) via dysts; RK4 with 10 substeps
    per sample is more accurate and takes about a second for all trials."""
    def f(x):  # dx/dt = sigma(y-x), dy/dt = x(rho-z)-y, dz/dt = xy - beta z; beta = 2.667 as in dysts
        return np.stack([sigma * (x[:, 1] - x[:, 0]), x[:, 0] * (rho - x[:, 2]) - x[:, 1],
                         x[:, 0] * x[:, 1] - beta * x[:, 2]], 1)
    h, out = dt / n_sub, np.empty((len(x), n_out, 3))
    out[:, 0] = x
    for i in range(1, n_out):
        for _ in range(n_sub):
            k1 = f(x); k2 = f(x + h / 2 * k1); k3 = f(x + h / 2 * k2); k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out[:, i] = x
    return out


def make_lorenz_data(n_trials, T, N, rng):
    """Spec 1: returns spikes (K,N,T) int64, rates (K,N,T), latents (K,3,T) (per-trial z-scored)."""
    C = rng.standard_normal((N, 3))
    C = C / np.linalg.norm(C, axis=1, keepdims=True)          # unit-norm readout rows
    C = C[np.argsort(C[:, 0])]                                # sorted by their first column
    ic = LORENZ_IC + 2.0 * rng.standard_normal((n_trials, 3))  # ICs = default + 2 N(0, I)
    n = T + 100                                               # 100 burn-in samples are discarded
    dt = 1.5008 * n / 100 / (n - 1)                           # dysts: 100 points per period 1.5008 -> ~0.015
    traj = lorenz_rk4(ic, n, dt)[:, 100:]                     # (K, T, 3)
    traj = (traj - traj.mean(1, keepdims=True)) / traj.std(1, keepdims=True)  # per-trial z-score (ddof 0)
    latents = traj.transpose(0, 2, 1)                          # (K,T,3) -> (K,3,T)
    u = np.einsum("nk,bkt->bnt", C, latents) + np.log(0.3)    # (K,N,T); bias log(0.3), "mean_rate 0.3"
    rates = 0.5 * np.logaddexp(0.0, 2.0 * u)                  # softplus with beta 2: log(1+e^{2u})/2
    return dict(spikes=rng.poisson(rates), rates=rates.astype(np.float32), latents=latents.astype(np.float32))


def load_spikes(path):
    """Your own data: (trials, neurons, bins) non-negative integer counts in .npy or .npz (key 'spikes').
    Raises ValueError (expected vs found) before anything is trained or written."""
    if not os.path.exists(path):
        raise ValueError(f"--data: expected an existing .npy/.npz file, found no file at {path!r}")
    obj = np.load(path, allow_pickle=False)
    if isinstance(obj, np.lib.npyio.NpzFile):
        if "spikes" not in obj.files:
            raise ValueError(f"--data: expected key 'spikes' in the .npz, found keys {obj.files}")
        obj = obj["spikes"]
    s = np.asarray(obj)
    if s.ndim != 3:
        raise ValueError(f"--data: expected 3 dims (trials, neurons, bins), found shape {s.shape}")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating) or s.dtype == bool):
        raise ValueError(f"--data: expected a numeric (integer count) dtype, found {s.dtype}")
    s = s.astype(np.float64)
    if np.isnan(s).any() or np.isinf(s).any():
        raise ValueError(f"--data: expected finite counts, found {int((~np.isfinite(s)).sum())} NaN/inf entries")
    if (s < 0).any():
        raise ValueError(f"--data: expected non-negative counts, found minimum {s.min()}")
    if (s != np.round(s)).any():
        raise ValueError(f"--data: expected integer counts, found non-integer values, e.g. {s[s != np.round(s)][0]}")
    if s.shape[0] < 10:
        raise ValueError(f"--data: expected at least 10 trials, found {s.shape[0]}")
    if s.shape[2] < 16:
        raise ValueError(f"--data: expected at least 16 time bins, found {s.shape[2]}")
    return dict(spikes=s.astype(np.int64))


def split_trials(K, rng):
    """70/10/20 train/val/test split of K trials (spec 1)."""
    perm = rng.permutation(K)
    n_tr, n_va = int(0.7 * K), int(0.1 * K)
    return perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]


# -----------------------------------------------------------------------------
# S4 layer: diagonal state-space model, HiPPO-LegS init, FFT convolution (spec 2.1)
# -----------------------------------------------------------------------------
def hippo_legs(N):
    """HiPPO-LegS A = S - P P^T with S normal (Gu et al. 2022, S4 Sec. 3). Diagonalise S = -1/2 I + skew in float64
    and keep the N/2 eigenvalues with Im > 0 (their conjugates are implied). Returns (Im lambda (n,), B (n,))
    with B = V^H B_legs, B_legs = sqrt(2k+1); the imaginary part of B is clipped to [-2, 2] as in the spec."""
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
        # 2 Re(CB A_bar^l) in real arithmetic (2x faster on CPU than complex exp)
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
    """Pointwise (kernel-size 1) convolution over (B,C,T), computed as a matmul (faster than the conv on CPU)."""

    def __init__(self, c_in, c_out, bias=True):
        super().__init__(c_in, c_out, 1, bias=bias)

    def forward(self, x):                                      # (B,C_in,T) -> (B,C_out,T)
        y = torch.einsum("oc,bct->bot", self.weight[..., 0], x)
        return y if self.bias is None else y + self.bias[:, None]


def instance_norm(h):
    """Normalise each (sample, channel) over time, no affine (InstanceNorm1d, eps 1e-5). (B,C,T) -> (B,C,T)."""
    return F.instance_norm(h, eps=1e-5)


# -----------------------------------------------------------------------------
# Autoencoder (spec 2.2-2.4): S4 encoder -> grouped bottleneck z -> pointwise decoder -> softplus rates
# -----------------------------------------------------------------------------
class AEBlock(nn.Module):
    """Pre-norm residual block: h += s * GELU(S4(IN(h)(1+g1)+b1)) + c;  h += W2 GELU(W1 (IN(h)(1+g2)+b2))."""

    def __init__(self, C, d_state, bidirectional=True):
        super().__init__()
        self.ada = nn.Parameter(torch.zeros(1, 6 * C, 1))      # (shift, scale, gate) x 2, zero init; gates unused
        self.s4 = S4D(C, d_state, bidirectional)
        self.post_tm_scale = nn.Conv1d(C, C, 1, groups=C)      # depthwise per-channel scale s and bias c
        self.mlp = nn.Sequential(Conv1x1(C, 2 * C, bias=False), nn.GELU(), Conv1x1(2 * C, C, bias=False))

    def forward(self, h):                                      # h (B,C,T)
        sh1, sc1, _, sh2, sc2, _ = self.ada.chunk(6, dim=1)    # each (1,C,1)
        h = h + self.post_tm_scale(F.gelu(self.s4(instance_norm(h) * (1 + sc1) + sh1)))
        return h + self.mlp(instance_norm(h) * (1 + sc2) + sh2)


class AutoEncoder(nn.Module):
    """Encoder: Conv1x1(N->C) -> blocks -> grouped Conv1x1(C->d, groups=d). Decoder (pointwise in time, so all
    temporal structure lives in z): grouped Conv1x1(d->C) -> GELU -> Conv1x1(C->N) -> softplus = rates."""

    def __init__(self, N, C, d, n_blocks, d_state, bidirectional=True):
        super().__init__()
        self.conv_in = Conv1x1(N, C)
        self.blocks = nn.ModuleList([AEBlock(C, d_state, bidirectional) for _ in range(n_blocks)])
        self.bottleneck = nn.Conv1d(C, d, 1, groups=d)         # each latent reads its own C/d channels
        self.decoder = nn.Sequential(nn.Conv1d(d, C, 1, groups=d), nn.GELU(), Conv1x1(C, N), nn.Softplus())

    def encode(self, x):                                       # x (B,N,T) -> z (B,d,T)
        h = self.conv_in(x)                                    # (B,C,T)
        for blk in self.blocks:
            h = blk(h)
        return self.bottleneck(h)

    def decode(self, z):                                       # z (B,d,T) -> rates (B,N,T)
        return self.decoder(z)

    def forward(self, x):
        z = self.encode(x)
        return self.decode(z), z


def masked_poisson_nll(rates, x, M):
    """Poisson NLL (full, with Stirling term) on the DROPPED entries only (M == 0), averaged over ALL entries."""
    nll = F.poisson_nll_loss(rates, x, log_input=False, full=True, eps=1e-8, reduction="none")  # (B,N,T)
    return ((1 - M) * nll).mean()


def latent_regulariser(z, beta_lat, beta_td, n_spike_entries, K=5):
    """beta_lat sum z^2 + beta_td sum_{i=1..K} 1/(1+i) sum (z_t - z_{t+i})^2, divided by B*N*T (spike entries)."""
    td = sum((z[..., i:] - z[..., :-i]).pow(2).sum() / (1 + i) for i in range(1, K + 1))
    return (beta_lat * z.pow(2).sum() + beta_td * td) / n_spike_entries


def ae_loss(ae, x, cfg):
    """Coordinated dropout (spec 2.4): element-wise mask M ~ Bernoulli(1-p), input x M / (1-p), loss on dropped."""
    M = (torch.rand_like(x) >= cfg.mask_p).float()            # (B,N,T), 1 = kept
    rates, z = ae(x * M / (1 - cfg.mask_p))
    return masked_poisson_nll(rates, x, M) + latent_regulariser(z, cfg.beta_lat, cfg.beta_td, x.numel())


# -----------------------------------------------------------------------------
# Latent diffusion (spec 3): adaLN-Zero S4 denoiser, DDPM (linear betas, eps-prediction), EMA
# -----------------------------------------------------------------------------
def timestep_embedding(t, dim=256):
    """Sinusoidal features of the raw integer t: [cos(t f_k), sin(t f_k)], f_k = 10000^(-k/(dim/2)). (B,) -> (B,dim)"""
    f = torch.exp(-math.log(1e4) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    arg = t.float()[:, None] * f                               # (B, dim/2)
    return torch.cat([torch.cos(arg), torch.sin(arg)], -1)


class DenoiserBlock(nn.Module):
    """adaLN-Zero (DiT) block: (sh1,sc1,g1,sh2,sc2,g2) = Linear(GELU(e)), zero-init so the block starts as identity.
    h += g1 GELU(S4_bi(IN(h)(1+sc1)+sh1));  h += g2 MLP(IN(h)(1+sc2)+sh2), MLP with biases."""

    def __init__(self, C, d_state):
        super().__init__()
        self.ada = nn.Linear(C // 4, 6 * C)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.s4 = S4D(C, d_state, bidirectional=True)           # official denoisers are always bidirectional
        self.mlp = nn.Sequential(Conv1x1(C, 2 * C), nn.GELU(), Conv1x1(2 * C, C))

    def forward(self, h, e):                                   # h (B,C,T), e (B,C/4)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.gelu(e))[..., None].chunk(6, dim=1)  # (B,6C,1) -> 6 x (B,C,1)
        h = h + g1 * F.gelu(self.s4(instance_norm(h) * (1 + sc1) + sh1))
        return h + g2 * self.mlp(instance_norm(h) * (1 + sc2) + sh2)


class Denoiser(nn.Module):
    """eps_theta(z_t, t): grouped Conv1x1(d->C) -> adaLN-Zero blocks -> grouped Conv1x1(C->d); no U-Net, no attention.
    Time: sinusoidal(256) -> Linear(256, C/4) -> SiLU -> Linear(C/4, C/4) = e."""

    def __init__(self, d, C, n_blocks, d_state):
        super().__init__()
        g = d if (C % d == 0 and C > d) else 1                 # each latent feeds its own C/d channels
        self.conv_in = nn.Conv1d(d, C, 1, groups=g)
        self.t_mlp = nn.Sequential(nn.Linear(256, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))
        self.blocks = nn.ModuleList([DenoiserBlock(C, d_state) for _ in range(n_blocks)])
        # NOTE (deviation): DiT's final adaLN modulation (no norm), zero-init: h (1 + sc_f(t)) + sh_f(t) before
        # conv_out. The InstanceNorm blocks cannot see a channel's per-trial time-mean, so it only reaches the
        # output through the conv_in -> conv_out skip; official LDNS gives that path a t-independent gain, whose
        # error at high noise is amplified by 1/sqrt(abar) and froze into per-trial latent offsets of ~7 std
        # in short CPU runs. A t-dependent gain removes this failure.
        self.ada_out = nn.Linear(C // 4, 2 * C)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.conv_out = nn.Conv1d(C, d, 1, groups=g)

    def forward(self, z, t):                                   # z (B,d,T), t (B,) int -> eps_hat (B,d,T)
        e = self.t_mlp(timestep_embedding(t))                  # (B,C/4)
        h = self.conv_in(z)                                    # (B,C,T)
        for blk in self.blocks:
            h = blk(h, e)
        sh, sc = self.ada_out(F.gelu(e))[..., None].chunk(2, dim=1)  # (B,2C,1) -> 2 x (B,C,1)
        return self.conv_out(h * (1 + sc) + sh)


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

    def loss(self, model, x0):
        """Alg. 1: t ~ U{0..T-1} per sample, eps ~ N(0,I), || eps - eps_theta(x_t, t) ||^2 (mean)."""
        t = torch.randint(0, len(self.beta), (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        return F.mse_loss(model(self.q_sample(x0, t, eps), t), eps)

    @staticmethod
    def q_posterior_mean(x0, xt, ab, ab_prev):
        """x0-form posterior mean of q(x_{t-1} | x_t, x_0) (Eq. 7), with beta_t = 1 - abar_t / abar_prev so the
        same formula serves a respaced schedule."""
        beta = 1 - ab / ab_prev
        return (ab_prev.sqrt() * beta / (1 - ab)) * x0 + ((1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)) * xt

    @staticmethod
    def p_step(xt, eps_hat, ab, ab_prev, eta):
        """One reverse step from the predicted noise (eps form). x0_hat = (x_t - sqrt(1-abar) eps_hat)/sqrt(abar);
        mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps_hat, s^2 = eta^2 beta_tilde (Song et al. DDIM
        Eq. 12). For eta = 1 the mean equals Eq. 7 and s^2 = beta_tilde: ancestral DDPM; eta = 0 is DDIM."""
        x0_hat = (xt - (1 - ab).sqrt() * eps_hat) / ab.sqrt()  # not clipped (official)
        var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        return ab_prev.sqrt() * x0_hat + (1 - ab_prev - var).clamp(min=0).sqrt() * eps_hat, var

    def respaced(self, K):
        """K evenly spaced timesteps from 0 to T-1 and their abar (Nichol & Dhariwal 2021, respacing). K = T: all."""
        ts = torch.linspace(0, len(self.beta) - 1, K).round().long().unique()
        return ts, self.alpha_bar[ts]

    @torch.no_grad()
    def sample(self, model, shape, K, eta):
        """Start from x_T ~ N(0,I) and step through the K respaced timesteps (K = 1000, eta = 1: official sampler).
        NOTE (deviation, demo default): fewer steps than 1000, correctly respaced (diffusers 0.3.0's strided
        sampler is wrong, spec 3.3)."""
        ts, abar = self.respaced(K)
        x = torch.randn(shape, device=self.beta.device)
        for i in reversed(range(len(ts))):
            ab, ab_prev = abar[i], abar[i - 1] if i > 0 else torch.ones((), device=x.device)
            mean, var = self.p_step(x, model(x, ts[i].expand(shape[0])), ab, ab_prev, eta)
            x = mean + var.sqrt() * torch.randn_like(x) if i > 0 else mean  # no noise at the last step
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


# -----------------------------------------------------------------------------
# Training: AdamW, gradient clipping, linear warmup + cosine (standard PyTorch from here)
# -----------------------------------------------------------------------------
def fit(model, loss_fn, n_items, batch, steps, lr, clip, name, ema=None):
    """AdamW(lr, wd 0.01), clip grad-norm, warmup 5% then cosine with the horizon at 1.3x the real step count
    (diffusers get_cosine_schedule_with_warmup as used by LDNS: lr ends at ~13% of peak). Shuffled epochs."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm, horizon = max(1, steps // 20), 1.3 * steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: k / warm if k < warm else
                                              0.5 * (1 + math.cos(math.pi * (k - warm) / (horizon - warm))))
    prog, perm, pos = Progress(name, steps, every=max(1, steps // 20)), torch.randperm(n_items), 0
    batch = min(batch, n_items)
    for step in range(1, steps + 1):
        if pos + batch > n_items:
            perm, pos = torch.randperm(n_items), 0
        loss = loss_fn(perm[pos:pos + batch])
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(model)
        prog(step, loss=loss.item(), lr=sched.get_last_lr()[0])
    return model


@torch.no_grad()
def batched(fn, x, bs=256):
    """Apply fn to x in chunks along dim 0 (bounded memory)."""
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


@torch.no_grad()
def generate(ddpm, model, ae, mu, sigma, n, d, T, K, eta, chunk=700):
    """Generation: noise -> DDPM -> un-normalise z = z~ sigma + mu -> decode -> rates -> Poisson spikes."""
    z = torch.cat([ddpm.sample(model, (min(chunk, n - i), d, T), K, eta) for i in range(0, n, chunk)])
    z = z * sigma + mu                                         # (n,d,T)
    rates = batched(ae.decode, z)                              # (n,N,T)
    return z, rates, torch.poisson(rates)


# -----------------------------------------------------------------------------
# Evaluation (spec 7): population spike count, pairwise correlations, ISI statistics, AE and latent quality
# -----------------------------------------------------------------------------
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


def spike_stats(s):
    """Summary statistics of counts s (B,N,T): PSC per (trial, bin), corr matrix, mean rate, mean / std ISI."""
    X = s.transpose(0, 2, 1).reshape(-1, s.shape[1]).astype(np.float64)  # (B*T, N), trials concatenated
    X = X - X.mean(0)
    sd = np.sqrt((X ** 2).mean(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (X.T @ X / len(X)) / np.outer(sd, sd)           # np.corrcoef, NaN for silent neurons
    mean_isi, std_isi = isi_stats(s)
    return dict(psc=s.sum(1).ravel(), corr=corr, rate=s.mean((0, 2)), mean_isi=mean_isi, std_isi=std_isi)


def kde_on_grid(x, grid):
    """Gaussian KDE with Scott's bandwidth h = std n^(-1/5) (scipy gaussian_kde default) on an integer grid,
    normalised to sum 1. Exact and fast for integer data: one kernel per distinct value, weighted by its count."""
    h = max(x.std(ddof=1) * len(x) ** -0.2, 1e-3)
    vals, cnt = np.unique(x, return_counts=True)
    dens = (cnt * np.exp(-0.5 * ((grid[:, None] - vals) / h) ** 2)).sum(1)
    return dens / dens.sum()


def pearson(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")


def rmse(a, b):
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.sqrt(np.mean((a[ok] - b[ok]) ** 2)))


def compare(model, data):
    """Model vs data statistics (spec 7): KL(model||data) of the PSC KDEs on the shared grid 0..max, Pearson r of
    the KDE densities; r and RMSE over unique neuron pairs of the correlations and over neurons of the mean rate,
    mean ISI and std ISI. NOTE (choice): KDE densities floored at 1e-12 so the KL stays finite (spec pitfall 14);
    correlation RMSE over unique pairs (official divides by all N^2 entries incl. the zeroed upper triangle)."""
    grid = np.arange(max(model["psc"].max(), data["psc"].max()) + 1)
    p, q = kde_on_grid(model["psc"], grid), kde_on_grid(data["psc"], grid)
    il = np.tril_indices(len(data["rate"]), -1)               # unique pairs i > j
    out = dict(kl_psc=float(np.sum(p * np.log(np.maximum(p, 1e-12) / np.maximum(q, 1e-12)))), r_psc=pearson(p, q),
               r_corr=pearson(model["corr"][il], data["corr"][il]), rmse_corr=rmse(model["corr"][il], data["corr"][il]))
    for k in ("rate", "mean_isi", "std_isi"):
        out[f"r_{k}"], out[f"rmse_{k}"] = pearson(model[k], data[k]), rmse(model[k], data[k])
    return out


def latent_r2(z_tr, x_tr, z_te, x_te):
    """Latent recovery: least-squares linear map (with intercept) from AE latents z (K,d,T) to the true Lorenz
    states x (K,3,T), fit on train trials; R^2 = 1 - SSE/SST on held-out trials (pooled over the 3 states)."""
    def rows(a):
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1])   # (K,c,T) -> (K*T, c)
    Z_tr, Z_te = (np.c_[rows(z), np.ones(z.shape[0] * z.shape[2])] for z in (z_tr, z_te))
    W = np.linalg.lstsq(Z_tr, rows(x_tr), rcond=None)[0]      # (d+1, 3)
    X_te = rows(x_te)
    return float(1 - ((X_te - Z_te @ W) ** 2).sum() / ((X_te - X_te.mean(0)) ** 2).sum())


def latent_psd(z):
    """Hann-windowed periodogram per trial and channel, z (K,d,T) -> (K,d,T//2+1). NOTE (choice): numpy stand-in for
    scipy.signal.csd(x, x, nperseg=T) used by the official plots."""
    w = np.hanning(z.shape[-1])
    return np.abs(np.fft.rfft((z - z.mean(-1, keepdims=True)) * w, axis=-1)) ** 2 / (w ** 2).sum()


# -----------------------------------------------------------------------------
# Figures (spec 12, items 1-5); matplotlib is imported here only
# -----------------------------------------------------------------------------
def make_figures(fig_dir, data, ex, rates_hat, z_ae, z_gen, z_long, st_real, st_gen, res, dims):
    from matplotlib.figure import Figure
    s, N = data["spikes"][ex], data["spikes"].shape[1]
    # 1. data panel: true latents, true rates, spike raster of one held-out trial
    panels = [k for k in ("latents", "rates") if k in data] + ["spikes"]
    fig = Figure(figsize=(10, 2.6 * len(panels)))
    for i, k in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        if k == "latents":
            ax.plot(data["latents"][ex].T)
        else:
            ax.imshow(data[k][ex], aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_title({"latents": "Lorenz latents (z-scored)", "rates": "true rates", "spikes": "spikes"}[k])
    fig.tight_layout(); fig.savefig(os.path.join(fig_dir, "1_data.png"), dpi=90)
    # 2. AE fit: predicted rates over the spikes for 4 neurons
    fig = Figure(figsize=(10, 6))
    for i, n in enumerate(sorted({0, N // 4, N // 2, N - 1})):
        ax = fig.add_subplot(4, 1, i + 1)
        ax.vlines(np.nonzero(s[n])[0], 0, s[n][s[n] > 0], color="0.6", label="spikes")
        ax.plot(rates_hat[ex, n], "C1", label="AE rate")
        if "rates" in data:
            ax.plot(data["rates"][ex, n], "k--", lw=1, label="true rate")
        ax.set_ylabel(f"neuron {n}")
    ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"AE on a held-out trial; test rate MSE {res.get('ae/test_rate_mse', float('nan')):.4f}")
    fig.tight_layout(); fig.savefig(os.path.join(fig_dir, "2_ae_fit.png"), dpi=90)
    # 3. 3-d latent trajectories: AE vs diffusion, and one 16x-length diffusion sample
    fig = Figure(figsize=(13, 4.3))
    for i, (z, title) in enumerate([(z_ae[:8], "AE latents"), (z_gen[:8], "diffusion latents"),
                                    (z_long[:1], f"diffusion, 16x length ({z_long.shape[-1]} bins)")]):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        for zz in z:
            ax.plot(*zz[list(dims)], lw=0.6)
        ax.set_title(title + f", channels {dims}")
    fig.tight_layout(); fig.savefig(os.path.join(fig_dir, "3_latents_3d.png"), dpi=90)
    # 4. latent power spectra per channel: median and 25-75% band, AE vs diffusion
    d = z_ae.shape[1]
    fig = Figure(figsize=(3 * min(d, 4), 2.5 * math.ceil(d / 4)))
    for c in range(d):
        ax = fig.add_subplot(math.ceil(d / 4), min(d, 4), c + 1)
        for z, col, lab in ((z_ae, "k", "AE"), (z_gen, "C3", "LDNS")):
            P = latent_psd(z[:, c])[:, 1:]                  # (K, F) without the DC bin
            lo, med, hi = np.percentile(P, [25, 50, 75], axis=0)
            f = np.arange(1, P.shape[1] + 1) / z.shape[-1]
            ax.loglog(f, med, col, label=lab); ax.fill_between(f, lo, hi, color=col, alpha=0.2)
        ax.set_title(f"latent {c}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout(); fig.savefig(os.path.join(fig_dir, "4_latent_psd.png"), dpi=90)
    # 5. 2x2 statistics panel: data vs LDNS with Pearson r
    fig, il = Figure(figsize=(9, 8)), np.tril_indices(N, -1)
    grid = np.arange(max(st_real["psc"].max(), st_gen["psc"].max()) + 1)
    ax = fig.add_subplot(2, 2, 1)
    for st, col, lab in ((st_real, "k", "data"), (st_gen, "C3", "LDNS")):
        ax.hist(st["psc"], bins=50, density=True, color=col, alpha=0.25)
        ax.plot(grid, kde_on_grid(st["psc"], grid), col, label=lab)
    ax.set(title=f"population spike count, r={res['gen_vs_real/r_psc']:.4f}", xlabel="spikes per bin")
    ax.legend()
    for i, (k, name) in enumerate((("corr", "pairwise correlation"), ("mean_isi", "mean ISI (bins)"),
                                   ("std_isi", "std ISI (bins)"))):
        ax = fig.add_subplot(2, 2, i + 2)
        a, b = (st_real[k][il], st_gen[k][il]) if k == "corr" else (st_real[k], st_gen[k])
        ax.scatter(a, b, s=4, alpha=0.5)
        lim = [np.nanmin([a, b]), np.nanmax([a, b])]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(title=f"{name}, r={res['gen_vs_real/r_' + k]:.4f}", xlabel="data", ylabel="LDNS")
    fig.tight_layout(); fig.savefig(os.path.join(fig_dir, "5_stats.png"), dpi=90)


# -----------------------------------------------------------------------------
# CLI: parse -> data (validated) -> AE -> latents -> diffusion -> generate -> evaluate -> figures -> outputs
# -----------------------------------------------------------------------------
def parse_args(argv=None) -> Config:
    """argparse built from the Config fields; presets first, explicit flags override them."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        kw = dict(type=type(f.default), default=None, help=f"(default: {f.default!r})")
        if f.name in ("demo", "device"):
            kw["choices"] = DEMOS if f.name == "demo" else ("auto", "cpu", "cuda", "mps")
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)
    p.add_argument("--quick", action="store_true", help="tiny preset, end to end in < 30 s on 2 CPU cores")
    p.add_argument("--long", action="store_true", help="longer preset (~17-25 min on 2 cores), paper-level numbers")
    a = p.parse_args(argv)
    if a.quick and a.long:
        p.error("--quick and --long exclude each other")
    cfg = Config()
    for name in ("quick", "long"):
        if getattr(a, name):
            cfg = dataclasses.replace(cfg, **PRESETS[name])
    cfg = dataclasses.replace(cfg, **{k: v for k, v in vars(a).items() if k not in PRESETS and v is not None})
    for name in POSITIVE_FIELDS:
        if getattr(cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    if not 0 <= cfg.mask_p < 1 or cfg.eta < 0 or cfg.beta_lat < 0 or cfg.beta_td < 0:
        p.error("--mask-p must be in [0, 1); --eta, --beta-lat and --beta-td must be >= 0")
    if cfg.ae_channels % cfg.d_latent:
        p.error(f"--ae-channels ({cfg.ae_channels}) must be divisible by --d-latent ({cfg.d_latent})")
    if cfg.sample_steps > cfg.n_diffusion:
        p.error(f"--sample-steps must be <= --n-diffusion ({cfg.n_diffusion}), got {cfg.sample_steps}")
    cfg.out = cfg.out or os.path.join("runs", f"ldns_minimal-{'data' if cfg.data else cfg.demo}")
    return cfg


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    timing, t0 = {}, time.time()

    def lap(stage):
        nonlocal t0
        timing[stage], t0 = round(time.time() - t0, 2), time.time()

    # 1) data: simulated with its own generator, or loaded and validated BEFORE anything is written or trained
    rng = np.random.default_rng(cfg.seed)
    print(f"[data] {'loading ' + cfg.data if cfg.data else 'simulating the Lorenz system'}")
    data = load_spikes(cfg.data) if cfg.data else make_lorenz_data(cfg.n_trials, cfg.n_bins, cfg.n_neurons, rng)
    K, N, T = data["spikes"].shape
    tr, va, te = split_trials(K, rng)
    print(f"  {K} trials x {N} neurons x {T} bins; train/val/test {len(tr)}/{len(va)}/{len(te)}; "
          f"mean count {data['spikes'].mean():.3f} per bin")
    os.makedirs(os.path.join(cfg.out, "figures"), exist_ok=True)
    write_json_atomic(os.path.join(cfg.out, "config.json"), dict(
        config=dataclasses.asdict(cfg), seed=cfg.seed, device=str(device), python=platform.python_version(),
        torch=torch.__version__, numpy=np.__version__, platform=platform.platform(), threads=torch.get_num_threads()))
    x = torch.tensor(data["spikes"], dtype=torch.float32, device=device)  # (K,N,T)
    x_tr = x[tr]
    lap("data")

    # 2) autoencoder with coordinated dropout
    ae = AutoEncoder(N, cfg.ae_channels, cfg.d_latent, cfg.ae_blocks, cfg.d_state).to(device)
    print(f"[autoencoder] {sum(p.numel() for p in ae.parameters()):,} parameters")
    fit(ae, lambda idx: ae_loss(ae, x_tr[idx], cfg), len(tr), cfg.ae_batch, cfg.ae_steps, cfg.ae_lr, 2.0, "AE")
    ae.eval()
    z_all = batched(ae.encode, x)                              # (K,d,T), raw spikes in, no mask
    rates_hat = batched(ae.decode, z_all)                      # (K,N,T)
    lap("autoencoder")

    # 3) latent diffusion on train latents normalised with train statistics, clamped to [-5, 5] (spec 3.1)
    z_tr = z_all[tr]
    mu, sigma = z_tr.mean((0, 2), keepdim=True), z_tr.std((0, 2), keepdim=True)  # (1,d,1) each, unbiased std
    zn_tr = ((z_tr - mu) / sigma).clamp(-5, 5)
    ddpm = DDPM(cfg.n_diffusion).to(device)
    dn = Denoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state).to(device)
    ema = EMA(dn)
    print(f"[diffusion] denoiser {sum(p.numel() for p in dn.parameters()):,} parameters")
    fit(dn, lambda idx: ddpm.loss(dn, zn_tr[idx]), len(tr), cfg.dn_batch, cfg.dn_steps, cfg.dn_lr, 1.0, "DDPM", ema)
    lap("diffusion_train")

    # 4) generation with the EMA weights (n_gen trials), plus a few 16x-length samples
    n_gen = cfg.n_gen
    print(f"[sampling] {n_gen} trials, {cfg.sample_steps} steps (eta {cfg.eta}) + {cfg.n_long} at {16 * T} bins")
    z_gen, rates_gen, s_gen = generate(ddpm, ema.model, ae, mu, sigma, n_gen, cfg.d_latent, T, cfg.sample_steps,
                                       cfg.eta)
    z_long = ddpm.sample(ema.model, (cfg.n_long, cfg.d_latent, 16 * T), cfg.sample_steps, cfg.eta) * sigma + mu
    lap("sampling")

    # 5) evaluation: generated vs real (train) trials; AE reconstruction vs real; real vs real (two halves)
    print("[evaluation]")
    npy = lambda t: t.cpu().numpy()
    real, gen = data["spikes"][tr], npy(s_gen).astype(np.int64)
    ae_rec = npy(torch.poisson(rates_hat[tr])).astype(np.int64)
    st_real, st_gen = spike_stats(real), spike_stats(gen)
    h = len(tr) // 2
    res = {"data/n_real": len(real), "data/n_generated": len(gen), "data/mean_count": float(real.mean())}
    st_half = spike_stats(real[h:])                            # reference half for the size-matched rows
    for row, (a, b) in {"gen_vs_real": (st_gen, st_real), "ae_vs_real": (spike_stats(ae_rec), st_real),
                        "real_vs_real": (spike_stats(real[:h]), st_half),     # noise floor: two disjoint halves
                        "gen_vs_real_half": (spike_stats(gen[:h]), st_half)}.items():  # same sizes as the floor
        res.update({f"{row}/{k}": v for k, v in compare(a, b).items()})
    res["ae/test_poisson_nll"] = float(F.poisson_nll_loss(rates_hat[te], x[te], log_input=False, full=True))
    if "rates" in data:
        res["ae/test_rate_mse"] = float(((npy(rates_hat[te]) - data["rates"][te]) ** 2).mean())
    if "latents" in data:
        res["ae/latent_r2"] = latent_r2(npy(z_all[tr]), data["latents"][tr], npy(z_all[te]), data["latents"][te])
    zn_gen = npy((z_gen - mu) / sigma)
    res["diffusion/sampled_latent_std_max"] = float(zn_gen.std((0, 2)).max())  # ~1 if sampling is stable
    res["diffusion/sampled_latent_std_min"] = float(zn_gen.std((0, 2)).min())
    res["diffusion/mean_rate_generated"] = float(rates_gen.mean())
    res["data/mean_rate_true"] = float(data["rates"][tr].mean()) if "rates" in data else float(real.mean())
    lap("evaluation")

    dims = (1, 5, 3) if cfg.d_latent >= 6 else tuple(range(min(3, cfg.d_latent)))
    make_figures(os.path.join(cfg.out, "figures"), {k: v for k, v in data.items()}, te[0], npy(rates_hat),
                 npy(z_all[te]), npy(z_gen), npy(z_long), st_real, st_gen, res, dims)
    torch.save(ae.state_dict(), os.path.join(cfg.out, "ae.pt"))
    torch.save({**ema.model.state_dict(), "latent_mu": mu, "latent_sigma": sigma}, os.path.join(cfg.out, "denoiser.pt"))
    dt = np.int16 if max(real.max(), gen.max()) < 2 ** 15 else np.int64
    np.savez_compressed(os.path.join(cfg.out, "samples.npz"), real=real.astype(dt), generated=gen.astype(dt))
    lap("figures_and_outputs")
    timing["total"] = round(sum(timing.values()), 2)
    write_json_atomic(os.path.join(cfg.out, "timing.json"), timing)
    write_json_atomic(os.path.join(cfg.out, "metrics.json"), res)  # last, atomically
    print("\nmetric" + " " * 36 + "value")
    for k, v in res.items():
        print(f"  {k:<40} {v:.4g}" if isinstance(v, float) else f"  {k:<40} {v}")
    print(f"time per stage (s): {timing}\noutputs in {cfg.out}")
    return res


if __name__ == "__main__":
    main()
