"""GNOCCHI: diffusion-generated neural activity from disentangled info codes, in one file (torch + numpy only).

McCart, Sedler, Versteeg, Mifsud, Rigotti-Thompson, Pandarinath, "Diffusion-Based Generation of Neural Activity from
Disentangled Latent Codes" (2024), https://arxiv.org/abs/2407.21195, built on InfoDiffusion (Wang et al., ICML 2023;
code github.com/isjakewong/InfoDiffusion). Only GNOCCHI's abstract could be read, so the method follows InfoDiffusion's
code, cited by file: `models.py` (AuxiliaryUNet, Encoder, InfoDiff.loss_fn), `modules.py` (AuxResBlock, AttnBlock),
`sampling.py` (DiffusionProcess), `utils.py` (compute_mmd, GradualWarmupScheduler) and `run.py` (defaults).

Sections (paper -> code):
  Data: centre-out reaches on a 5x5 grid, 3 interior targets held out; --data ....... make_data, load_data, prepare
  Model: info-code encoder and AdaGN 1-D U-Net (models.py, modules.py) ............. Encoder, AuxResBlock, UNet1D
  Diffusion and objective: L_score + L_rec / T_diff + 0.1 MMD^2(c, N(0, I)) ........ mmd, GNOCCHI, ddim_sample
  Training: AdamW, clipping, gradual warmup to 2 lr then cosine (run.py) .......... lr_factor, train
  Evaluation: code SNR, held-out R^2, navigation c* = c_bar + W b*, PSTH R^2, ... . latent_metrics, evaluate
  Baselines with the same code size: PCA of the rates, an LFADS-like sequential VAE . pca_baseline, SeqVAE
  Figures, outputs and the pipeline ............................................. make_figures, write_outputs, main
Left out: the paper's RNN-controlled biomechanical arm (replaced by a random rate-RNN driven by minimum-jerk reaches),
the monkey dataset, LFADS's inferred inputs and hyperparameter search, reverse-DDIM editing.

Run (seed 0, measured on a 2-core x86-64 VM, CPU):
  python gnocchi_minimal.py           # --demo reach, ~4.5 min: held-out target R^2 from codes 0.867 (PCA 0.830,
                                      # LFADS-like 0.896), |cos(w_x, w_y)| 0.045, generated held-out PSTH R^2 0.728
  python gnocchi_minimal.py --quick   # ~10 s: every stage on a toy problem (numbers meaningless)
  python gnocchi_minimal.py --paper   # InfoDiffusion's scale (6.9M parameters, 20,000 steps): a GPU job
  python gnocchi_minimal.py --data trials.npz   # your own trials, see load_data
Outputs: config.json, metrics.json (last, atomic), timing.json, samples.npz, codes.npz, gnocchi.pt, figures/*.png.
Shapes: B batch, N neurons, T time bins, C channels, L code dims, K samples, M trials. Tensors are channels-first
(B, N, T): neurons are the U-Net's input channels, convolutions run over time.
Markers: `NOTE (deviation)` differs from InfoDiffusion's code or the GNOCCHI paper (mostly CPU scale); `NOTE (choice)`
a detail both leave open.
Randomness: every random draw is made on the CPU (torch's global generator seeded by set_seed, a seeded CPU
torch.Generator, or numpy's default_rng) and then moved to the device, so one seed gives the same draws on CPU, CUDA
and MPS. Models are built on the CPU, then moved.
"""
import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from functools import partial

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
    preset: str = ""             # set by parse_args to the named preset used (quick, paper)
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | mps
    out: str = ""                # output folder; "" -> runs/gnocchi_minimal-<demo> (or -data)
    data: str = ""               # your own .npz / .npy (see load_data); "" -> synthetic demo
    threads: int = 0             # torch CPU threads; 0 -> torch default
    n_neurons: int = 48          # N
    trials_per_target: int = 80  # 25 targets x 80 = 2000 trials
    smooth_bins: float = 1.5     # Gaussian sd (bins) used to smooth --data spikes (30 ms at 20 ms bins)
    code_dim: int = 4            # L. NOTE (choice): 2 x the 2 behavioural factors (InfoDiffusion's a_dim 32: --paper)
    # NOTE (deviation): a CPU-sized U-Net: 2 levels (C, 2C) with C 32, one res-block per level, skips from the
    # res-blocks only, GN(8), no attention (models.py AuxiliaryUNet: C 64, ch_mult (1,2,2,2), 2 res-blocks, GN(32),
    # attention at level 2 and in the middle; --paper builds that)
    channels: int = 32           # C (run.py --unets_channels)
    ch_mult: str = "1,2"         # channel multiplier per U-Net level (models.py ch_mult)
    res_blocks: int = 1          # AuxResBlocks per level on the way down (models.py num_res_blocks)
    attention: bool = False      # self-attention in the level-2 blocks and the first middle block (attn=[2])
    skip_all: bool = False       # AuxiliaryUNet's skips: head, every block and downsample; res_blocks + 1 up-blocks
    groups: int = 8              # GroupNorm groups (InfoDiffusion: 32, which needs >= 32 channels)
    dropout: float = 0.0         # NOTE (choice): none for the short CPU run (InfoDiffusion: 0.1, --paper)
    # NOTE (deviation): T_diff 200 instead of 1000, with the linear betas rescaled so that sum(beta) = 5 and
    # abar_T = 0.0067, the end point of InfoDiffusion's 1e-5..1e-2 over 1000 steps (run.py --beta1, --betaT)
    diff_steps: int = 200        # T_diff
    beta_1: float = 1e-4
    beta_T: float = 0.05
    # NOTE (deviation): 50 strided deterministic DDIM steps (sampling.py: every step, eta 0.01; --paper)
    ddim_steps: int = 50
    ddim_eta: float = 0.0        # DDIM noise scale eta
    mmd_weight: float = 0.1      # lambda_2 (run.py --mmd_weight)
    rec: str = "infodiff"        # reconstruction term: "infodiff" (models.py InfoDiff.loss_fn) or "x0" (see loss)
    steps: int = 2400            # NOTE (deviation): optimiser steps for a few-minute CPU run
    batch: int = 64              # run.py --batch_size
    lr: float = 1e-3             # NOTE (deviation): 1e-3 for the short CPU run (run.py: 1e-4, --paper)
    weight_decay: float = 1e-5   # run.py AdamW
    warmup: int = 100            # steps of gradual warmup to 2 lr, then cosine to 0 (run.py: 1 epoch)
    n_gen: int = 200             # K samples per navigated code, averaged into PSTHs. NOTE (choice): many, as the
    #                              true PSTH is noise-free and the Monte-Carlo noise of a K-sample mean lowers R^2
    eval_every: int = 400        # steps between code -> target R^2 checks on validation trials
    lfads_steps: int = 800       # training steps of the LFADS-like baseline (0: skip it; PCA is always run)


DEMOS = {"reach": {}}
# --paper: InfoDiffusion's configuration (models.py AuxiliaryUNet with ch_mult (1,2,2,2) and attn=[2], run.py defaults,
# sampling.py's DDIM with eta 0.01 over all 1000 steps) with GNOCCHI's unknown code size replaced by a_dim 32.
# NOTE (deviation): what stays different at this scale: 1-D convolutions over time with neurons as channels (the
# GNOCCHI adaptation), the conv-stack encoder instead of InfoDiffusion's U-Net encoder, the input skip of
# GNOCCHI.eps_theta, the per-step schedule, T padded to a multiple of 8 bins, the simulated reaching data, and the
# LFADS-like baseline at its CPU size. NOTE (choice): 20,000 steps (GNOCCHI's count is unknown; InfoDiffusion's 20
# epochs of MNIST at batch 64 are ~19,000) with 1,000 of warmup (run.py: 1 of 20 epochs).
PRESETS = {
    "quick": (dict(n_neurons=24, trials_per_target=12, channels=16, diff_steps=50, ddim_steps=10, steps=40, warmup=5,
                   n_gen=4, eval_every=20, lfads_steps=20), "tiny smoke test, end to end in ~10 s on 2 CPU cores"),
    "paper": (dict(code_dim=32, channels=64, ch_mult="1,2,2,2", res_blocks=2, attention=True, skip_all=True,
                   groups=32, dropout=0.1, diff_steps=1000, beta_1=1e-5, beta_T=1e-2, ddim_steps=1000, ddim_eta=0.01,
                   lr=1e-4, steps=20000, warmup=1000, eval_every=2000), "InfoDiffusion's scale, for a GPU"),
}
CHOICES = dict(demo=tuple(DEMOS), device=("auto", "cpu", "cuda", "mps"), preset=("", *PRESETS), rec=("infodiff", "x0"))
POSITIVE_FIELDS = ("n_neurons", "trials_per_target", "code_dim", "channels", "res_blocks", "groups", "diff_steps",
                   "ddim_steps", "steps", "batch", "warmup", "n_gen", "eval_every")
HELDOUT = ((-1, 1), (1, 0), (0, -1))  # interior, non-collinear grid targets held out of everything
LATENTS = {"GNOCCHI": "gnocchi", "PCA": "pca", "LFADS-like": "lfads"}  # latent name -> metrics.json key prefix
MAX_COUNT = 500      # spikes per neuron per bin: a neuron fires at most ~500 spikes/s (refractory period ~2 ms)
MAX_RATE = 1e4       # |rates|: 10x the fastest firing rates in spikes/s; larger means wrong units or a wrong array


def check_config(cfg: Config):
    """CLI checks of this file (an error message naming the flag, or None)."""
    if not all(m.strip().isdigit() and int(m) > 0 for m in cfg.ch_mult.split(",")):
        return f"--ch-mult must be comma-separated positive integers such as 1,2,2,2, got {cfg.ch_mult!r}"
    if cfg.channels % cfg.groups or cfg.channels % 2:
        return f"--channels must be even and a multiple of --groups {cfg.groups} (GroupNorm), got {cfg.channels}"
    if cfg.ddim_steps > cfg.diff_steps:
        return f"--ddim-steps must be <= --diff-steps {cfg.diff_steps}, got {cfg.ddim_steps}"
    if cfg.ddim_eta < 0:
        return f"--ddim-eta must be >= 0, got {cfg.ddim_eta}"
    return None


# -----------------------------------------------------------------------------
# Utilities (the same code in the three files of this project)
# -----------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch's global CPU generator (every random draw is made on the CPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda, then mps, then cpu. Every accelerator query is gated."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not has_mps):
        raise ValueError(f"--device {name}: expected an available device, found none of that kind")
    return torch.device(name)


class Progress:
    """One live line per training loop: step, values, elapsed time and ETA."""

    def __init__(self, name: str, total: int, every: int = 0):
        self.name, self.total, self.every, self.t0 = name, total, every or max(1, total // 20), time.time()

    def __call__(self, step: int, **vals) -> None:
        if step % self.every and step != self.total:
            return
        el = time.time() - self.t0
        msg = " ".join(f"{k} {v:.4g}" for k, v in vals.items())
        print(f"\r  [{self.name}] step {step}/{self.total} {msg} | {el:.0f}s elapsed, "
              f"ETA {el / step * (self.total - step):.0f}s", end="\n" if step == self.total else "", flush=True)


class Stopwatch:
    """Wall-clock seconds per pipeline stage, for timing.json."""

    def __init__(self):
        self.t, self.times = time.time(), {}

    def lap(self, stage: str) -> None:
        now = time.time()
        self.times[stage] = round(now - self.t, 2)
        self.t = now


def check_finite(loss: float, model: str, step: int, cause: str) -> None:
    """Stop the run at once when a training loss is NaN or inf (nothing after training is written)."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"{model}: the training loss became {loss} at step {step}; likely cause: {cause}")


def str2bool(s: str) -> bool:
    """Command-line booleans: 1/0, true/false, yes/no, on/off."""
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {s!r}")


def parse_args(argv=None) -> "Config":
    """Command line -> Config: the demo's defaults (DEMOS), then one named preset (PRESETS: --quick, --paper, ...),
    then explicit flags. Bad values exit with status 2 and a message that names the flag."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        if f.name == "preset":                                 # set by the preset flags below
            continue
        kw = dict(type=str2bool, nargs="?", const=True) if isinstance(f.default, bool) else dict(type=type(f.default))
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, choices=CHOICES.get(f.name),
                       help=f"(default: {f.default!r})", **kw)
    for name, (_, text) in PRESETS.items():
        p.add_argument("--" + name, action="store_true", help=text)
    a = vars(p.parse_args(argv))
    named = [name for name in PRESETS if a.pop(name)]
    if len(named) > 1:
        p.error(f"--{' and --'.join(named)} exclude each other")
    cfg = dataclasses.replace(Config(), **DEMOS[a["demo"] or Config.demo])
    cfg = dataclasses.replace(cfg, preset=named[0] if named else "", **(PRESETS[named[0]][0] if named else {}))
    cfg = dataclasses.replace(cfg, **{k: v for k, v in a.items() if v is not None})
    for name in POSITIVE_FIELDS:
        if getattr(cfg, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    problem = check_config(cfg)
    if problem:
        p.error(problem)
    cfg.out = cfg.out or os.path.join("runs", f"{os.path.basename(__file__)[:-3]}-{'data' if cfg.data else cfg.demo}")
    return cfg


def load_arrays(path: str) -> dict:
    """The one loading path for --data: a .npy file (its array is named 'spikes') or a .npz archive (every array by
    name), never unpickled. Any failure to open or parse is a ValueError naming the file, what was expected and
    what was found."""
    want = "a .npy file or a .npz archive of numeric arrays (np.save / np.savez)"
    if not os.path.isfile(path) or not path.endswith((".npy", ".npz")):
        found = ("a directory" if os.path.isdir(path) else "no such file" if not os.path.exists(path)
                 else f"a file with the extension {os.path.splitext(path)[1] or '(none)'!r}")
        raise ValueError(f"--data {path}: expected {want}, found {found}")
    try:
        with open(path, "rb") as f:
            obj = np.load(f, allow_pickle=False)
            arrays = {k: obj[k] for k in obj.files} if isinstance(obj, np.lib.npyio.NpzFile) else {"spikes": obj}
    except Exception as e:
        found = ("an object array, which would need unpickling" if "Object arrays" in str(e) else
                 "content that is not a .npy or .npz file" if "pickle" in str(e) else
                 f"a corrupt or truncated file ({type(e).__name__}: {e})")
        raise ValueError(f"--data {path}: expected {want}, found {found}") from None
    for k, a in arrays.items():
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ValueError(f"--data {path}: expected numeric arrays, found {k!r} with dtype {a.dtype}")
    return arrays


def prepare_out(out: str) -> None:
    """Create the output folder (and figures/) and check that it is writable, before any training. A metrics.json
    left there by an earlier run is removed, so an interrupted run never leaves one that looks like its own."""
    try:
        os.makedirs(os.path.join(out, "figures"), exist_ok=True)
        probe = os.path.join(out, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
        if os.path.exists(os.path.join(out, "metrics.json")):
            os.remove(os.path.join(out, "metrics.json"))
    except OSError as e:
        raise ValueError(f"--out {out}: expected a writable folder, found {e.strerror or e}") from None


def save_atomic(path: str, write) -> None:
    """write(f) into a temporary file beside `path`, then rename it: no half-written output if the run dies.
    Permissions follow the umask, like every other file the run writes (0644 under the usual 022)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj) -> None:
    save_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True).encode()))


def run_info(cfg: "Config", device: torch.device) -> dict:
    """config.json: every setting, the seed, the versions and the device."""
    return dict(config=dataclasses.asdict(cfg), seed=cfg.seed, device=str(device), python=platform.python_version(),
                torch=torch.__version__, numpy=np.__version__, platform=platform.platform(),
                threads=torch.get_num_threads())


def save_figure(fig, path: str, dpi: int = 90) -> None:
    fig.tight_layout()
    save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


# -----------------------------------------------------------------------------
# Data: minimum-jerk reaches -> random rate-RNN "controller" -> Poisson spikes -> smoothed rates; --data; split
# -----------------------------------------------------------------------------
def smooth_matrix(T: int, sigma: float) -> np.ndarray:
    """(T, T) acausal Gaussian smoothing matrix (sigma in bins), columns renormalised at the edges: x @ K smooths
    the last axis of x."""
    lag = np.arange(T)[:, None] - np.arange(T)[None, :]
    K = np.exp(-0.5 * (lag / sigma) ** 2)
    return K / K.sum(0, keepdims=True)


def make_data(cfg: Config) -> dict:
    """Synthetic reaching from its own seeded generator. Returns rates/true_rates (M, N, T) in Hz, targets (M, 2) cm,
    heldout (M,) bool, hand (M, T, 2), start (M, 2), duration (M,). Nuisances are drawn independently of the target."""
    rng = np.random.default_rng(cfg.seed)
    d, dt, tau = 2.0, 10.0, 50.0  # grid spacing (cm), simulation step and RNN time constant (ms)
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
    """Own data through load_arrays: 'rates' (real-valued) or 'spikes' (non-negative integer counts, also a plain .npy),
    both (trials, neurons, bins); optional 'targets' (trials, 2) and 'heldout' (trials,) bool. Spikes are smoothed
    with a Gaussian of cfg.smooth_bins bins. Each problem is a ValueError naming the file, the expectation and the
    finding."""
    arrays = load_arrays(path)

    def need(ok, expected, found):
        if not ok:
            raise ValueError(f"--data {path}: expected {expected}, found {found}")
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
    M = len(x)
    out = dict(rates=x @ smooth_matrix(x.shape[2], cfg.smooth_bins) if key == "spikes" else x)
    if "targets" in arrays:
        y = arrays["targets"]
        need(y.shape == (M, 2) and y.dtype != bool and np.isfinite(y).all(),
             f"finite numeric 'targets' (x, y) shaped ({M}, 2), one row per trial", f"{y.dtype} shaped {y.shape}")
        out["targets"] = y.astype(float)
    ho = out["heldout"] = arrays.get("heldout", np.zeros(M, bool))
    need(ho.dtype == bool and ho.shape == (M,), f"'heldout' as a bool array shaped ({M},)", f"{ho.dtype} {ho.shape}")
    need(not ho.any() or "targets" in arrays, "'targets' with 'heldout' (held-out metrics need targets)", "none")
    need((~ho).sum() >= 8, ">= 8 training (not held-out) trials", f"{(~ho).sum()}")
    return out


def prepare(d: dict, seed: int) -> dict:
    """Split trials (held-out targets / 15% validation / train) and z-score every neuron with TRAINING statistics
    only, so held-out trials never touch training or normalisation. Adds x, truth (z units) and the masks."""
    M = len(d["rates"])
    d["val"] = ~d["heldout"] & (np.random.default_rng(seed + 1).random(M) < 0.15)
    d["train"] = ~d["heldout"] & ~d["val"]
    d["mu"] = d["rates"][d["train"]].mean((0, 2), keepdims=True)   # (1, N, 1)
    d["sd"] = d["rates"][d["train"]].std((0, 2), keepdims=True) + 1e-6
    d["x"] = (d["rates"] - d["mu"]) / d["sd"]                        # (M, N, T) model input
    d["truth"] = (d.get("true_rates", d["rates"]) - d["mu"]) / d["sd"]  # noise-free rates when simulated
    return d


# -----------------------------------------------------------------------------
# Model: info-code encoder f_phi and AdaGN-conditioned 1-D U-Net eps_theta (models.py, modules.py)
# -----------------------------------------------------------------------------
def xavier_init(module: nn.Module) -> None:
    """InfoDiffusion initialises every conv/linear with xavier_uniform and zero bias (modules.py initialize)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """Deterministic info code c = f_phi(x0) from the CLEAN trial: 3 x (Conv-SiLU, stride 2 on two) -> flatten ->
    Linear -> L. The flatten + Linear sees the whole window, as models.py Encoder's flatten + fc_a does.
    NOTE (choice): a 3-layer conv stack instead of InfoDiffusion's full U-Net encoder, and no GroupNorm in it: GN
    rescales each trial by its own feature statistics, which erases the overall rate level that carries the target."""

    def __init__(self, N: int, T: int, C: int, L: int):
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

    def __init__(self, C: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, C)
        self.proj_q = nn.Conv1d(C, C, 1)
        self.proj_k = nn.Conv1d(C, C, 1)
        self.proj_v = nn.Conv1d(C, C, 1)
        self.proj = nn.Conv1d(C, C, 1)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.proj_q(h), self.proj_k(h), self.proj_v(h)  # (B, C, T) each
        # w_st = softmax_t(q_s . k_t / sqrt(C)); h_s = sum_t w_st v_t
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(x.shape[1]), dim=-1)  # (B, T, C) @ (B, C, T) -> (B, T, T)
        return x + self.proj(v @ w.transpose(1, 2))                 # (B, C, T) @ (B, T, T) -> (B, C, T)


class AuxResBlock(nn.Module):
    """modules.py AuxResBlock in 1-D: GN-SiLU-Conv; AdaGN h = GN(h)(1 + s_t) + b_t, then h = h(1 + s_c) + b_c (time
    FiLM first, then code FiLM); SiLU-Dropout-Conv; GN-SiLU-Dropout-Conv; residual shortcut; optional attention."""

    def __init__(self, c_in: int, c_out: int, tdim: int, dropout: float, attn: bool = False, groups: int = 8):
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
    """eps_theta(x_i, i, c), models.py AuxiliaryUNet over time: head Conv(N -> C); per level res_blocks AuxResBlocks
    at C * ch_mult[level] channels, a stride-2 conv between levels; two middle blocks; a mirrored decoder whose blocks
    concatenate the stored skips, nearest-neighbour upsampling + conv; tail GN-SiLU-Conv(C -> N) initialised to zero.
    Skips: every res-block output (skip_all adds the head and downsample outputs and one more up-block per level, as
    AuxiliaryUNet does)."""
    ATTN_LEVEL = 2  # the level (0-based) whose blocks have self-attention (models.py AuxiliaryUNet attn=[2])

    def __init__(self, N: int, C: int, L: int, T_diff: int, dropout: float, ch_mult=(1, 2), res_blocks: int = 1,
                 attention: bool = False, skip_all: bool = False, groups: int = 8):
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
                if skip_all:
                    skips.append(ch)
        self.down = nn.ModuleList(down)
        self.downsample = nn.ModuleList(downsample)
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
        self.up = nn.ModuleList(up)
        self.upsample = nn.ModuleList(upsample)
        self.tail = nn.Sequential(nn.GroupNorm(groups, C), nn.SiLU(), nn.Conv1d(C, N, 3, padding=1))
        xavier_init(self)
        # NOTE (choice): exact zeros for the output conv (models.py: xavier with gain 1e-5, i.e. ~zero).
        nn.init.zeros_(self.tail[-1].weight)

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
                if self.skip_all:
                    hs.append(h)
        for blk in self.mid:
            h = blk(h, temb, cemb)
        for k, level in enumerate(self.up):                     # deepest level first
            for blk in level:
                h = blk(torch.cat([h, hs.pop()], 1), temb, cemb)  # (B, C' + C_skip, T') -> (B, C'', T')
            if k < len(self.upsample):
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C', T') -> (B, C', 2T')
        return self.tail(h)[..., :T]                            # (B, C, T) -> (B, N, T)


# -----------------------------------------------------------------------------
# Diffusion and objective: DDPM forward process, score + reconstruction + MMD loss (InfoDiffusion with zeta = 1)
# -----------------------------------------------------------------------------
def mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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

    def __init__(self, cfg: Config, N: int, T: int):
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

    def loss(self, x0):
        """One minibatch of models.py InfoDiff.loss_fn (MMD path, no KL). Returns (total, dict of float parts)."""
        B = len(x0)
        i = torch.randint(0, self.cfg.diff_steps, (B,)).to(x0.device)  # i ~ U{0..T_diff-1}
        eps = torch.randn(x0.shape).to(x0.device)
        c = self.encoder(x0)                                  # code from the clean x0, deterministic
        x_i = self.q_sample(x0, i, eps)
        eps_hat = self.eps_theta(x_i, i, c)
        # L_score = mean (eps_hat - eps)^2 over B x N x T ("simple" DDPM loss)
        l_score = F.mse_loss(eps_hat, eps)
        if self.cfg.rec == "infodiff":
            # InfoDiff.loss_fn: the step-1 posterior-mean update applied to the clean x0 (a stand-in for L_0)
            # x0_hat = (x0 - beta_1 / sqrt(1 - abar_1) eps_hat) / sqrt(alpha_1)
            x0_hat = (x0 - self.beta[0] / (1 - self.alpha_bar[0]).sqrt() * eps_hat) / (1 - self.beta[0]).sqrt()
        else:
            # "x0": x0 predicted from x_i; its weight (1 - abar_i) / abar_i on the eps error is <= 1 / abar_T
            # x0_hat = (x_i - sqrt(1 - abar_i) eps_hat) / sqrt(abar_i)
            ab = self.alpha_bar[i][:, None, None]  # (B,) -> (B, 1, 1)
            x0_hat = (x_i - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
        l_rec = F.mse_loss(x0_hat, x0)
        l_mmd = mmd(c, torch.randn(c.shape).to(c.device))     # aggregate q(c) vs p(c) = N(0, I); no per-sample KL
        # L = L_score + L_rec / T_diff + lambda_2 MMD^2
        total = l_score + l_rec / self.cfg.diff_steps + self.cfg.mmd_weight * l_mmd
        return total, dict(score=l_score.item(), rec=l_rec.item(), mmd=l_mmd.item())

    @torch.no_grad()
    def sample(self, c, gen: torch.Generator, steps: int = 0):
        """Generate one trial per code c (K, L) from x_T ~ N(0, I) (drawn from the CPU generator gen) with DDIM.
        Returns (K, N, T)."""
        x_T = torch.randn((len(c), self.N, self.T), generator=gen).to(c.device)
        return ddim_sample(partial(self.eps_theta, c=c), x_T, self.alpha_bar, steps or self.cfg.ddim_steps,
                           self.cfg.ddim_eta, gen)


def ddim_sample(eps_fn, x_T, alpha_bar, steps: int, eta: float = 0.0, gen: torch.Generator = None) -> torch.Tensor:
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


# -----------------------------------------------------------------------------
# Training. Everything in this section is standard PyTorch.
# -----------------------------------------------------------------------------
def lr_factor(step: int, cfg: Config) -> float:
    """Learning rate / cfg.lr after `step` optimiser steps: run.py's GradualWarmupScheduler (utils.py, multiplier 2)
    then CosineAnnealingLR, per step instead of per epoch:
    1 + s / w for s < w (lr -> 2 lr), then 1 + cos(pi (s - w) / (S - w)) = 2 (1 + cos) / 2 (2 lr -> 0)."""
    if step < cfg.warmup:
        return 1 + step / cfg.warmup
    return 1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))


def train(model: GNOCCHI, x: torch.Tensor, d: dict, cfg: Config) -> list:
    """AdamW + grad-norm clip 1.0 + lr_factor (run.py train) on the training trials of x (M, N, T). Every eval_every
    steps, the validation code -> target R^2 (the earliest sign that codes carry target information). Returns the
    per-step loss history."""
    x_train = x[torch.from_numpy(d["train"]).to(x.device)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prog, hist, val_r2 = Progress("GNOCCHI", cfg.steps), [], float("nan")
    for step in range(1, cfg.steps + 1):
        model.train()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(step - 1, cfg)
        idx = torch.randint(0, len(x_train), (cfg.batch,)).to(x.device)
        loss, parts = model.loss(x_train[idx])
        value = loss.item()
        check_finite(value, "GNOCCHI", step, "a learning rate too high for this data (lower --lr) or extreme inputs")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        parts["step"] = step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_r2 = parts["val_code_r2"] = val_code_r2(model, x, d)
        hist.append(parts)
        prog(step, loss=value, mmd=parts["mmd"], val_code_r2=val_r2)
    return hist


def report_size(model: nn.Module, cfg: Config, device: torch.device) -> None:
    """Print the model size; --paper on a CPU also warns with the size of the job."""
    n = sum(p.numel() for p in model.parameters())
    print(f"GNOCCHI: {n / 1e3:.1f}k parameters on {device}")
    if cfg.preset == "paper" and device.type == "cpu":
        print(f"WARNING: --paper is InfoDiffusion's scale, meant for a GPU: {n / 1e6:.2f}M parameters, {cfg.steps} "
              f"training steps at batch {cfg.batch}, then {cfg.ddim_steps} DDIM steps for each of ~"
              f"{5 * cfg.n_gen + 100} generated trials (reach demo). On a CPU this takes a day or more: use "
              "--device cuda, or run without --paper.", flush=True)


# -----------------------------------------------------------------------------
# Evaluation: small numpy helpers, the behaviour decoder, every metric for one latent, then all of them
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
    """Between-condition over within-condition code variance: tr Cov_k(mu_k) / mean_k tr(Sigma_k)."""
    ks = np.unique(labels)
    mu = np.stack([C[labels == k].mean(0) for k in ks])
    within = np.mean([((C[labels == k] - mu[j]) ** 2).sum(1).mean() for j, k in enumerate(ks)])
    return float(((mu - mu.mean(0)) ** 2).sum(1).mean() / within)


def latent_metrics(C, gen, d, decode, K):
    """Every metric for one latent. C (M, L) codes; gen(codes (K, L)) -> z-scored trials (K, N, T);
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
    # Navigation directions: C ~ 1 c_bar^T + Y W^T by least squares over training trials
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
    # Navigate to each held-out target: c* = c_bar + W b*; K samples; PSTH vs ground truth
    ho_targets = np.unique(Y[ho], axis=0)
    g_all = gen(np.repeat(c_bar + ho_targets @ W.T, K, axis=0))     # (n_ho * K, N, T)
    psth_g = g_all.reshape(len(ho_targets), K, *g_all.shape[1:]).mean(1)  # (n_ho, N, T)
    psth_t = np.stack([d["truth"][(Y == b).all(1)].mean(0) for b in ho_targets])  # noise-free condition average
    # NOTE (choice): R^2 per neuron pooled over held-out targets x time, then mean over neurons
    pg = psth_g.transpose(1, 0, 2).reshape(psth_g.shape[1], -1)    # (n_ho, N, T) -> (N, n_ho * T)
    pt = psth_t.transpose(1, 0, 2).reshape(psth_t.shape[1], -1)
    r_n = 1 - ((pg - pt) ** 2).sum(1) / ((pt - pt.mean(1, keepdims=True)) ** 2).sum(1)
    m["psth_r2"], m["psth_r2_median"] = float(r_n.mean()), float(np.median(r_n))
    ex.update(psth_g=psth_g, psth_t=psth_t, psth_r2_neurons=r_n, ho_targets=ho_targets, gen=g_all)
    # Read generated trials with the decoder fit on real training trials: endpoint error vs intended target
    yg = decode(g_all)
    m["gen_endpoint_err_cm"] = float(np.linalg.norm(yg - np.repeat(ho_targets, K, axis=0), axis=1).mean())
    # Unwanted movement: traverse c(delta) = c_bar + delta w_a, decode, |off-axis slope| / |on-axis slope|
    deltas, Kt = np.linspace(-4.0, 4.0, 5), max(2, K // 5)          # cm (the grid's extent); samples per step
    ex["trav"] = []
    for a, ax in enumerate("xy"):
        yt = decode(gen(np.repeat(c_bar + deltas[:, None] * W[:, a], Kt, axis=0)))  # (5 Kt, 2) decoded endpoints
        slope = np.polyfit(np.repeat(deltas, Kt), yt, 1)[0]         # (2,) slope of decoded x and y on delta
        m[f"unwanted_{ax}"] = float(abs(slope[1 - a]) / abs(slope[a]))
        ex["trav"].append(yt)
    m["unwanted"] = (m["unwanted_x"] + m["unwanted_y"]) / 2
    return m, ex


def encode(model: GNOCCHI, x: torch.Tensor) -> np.ndarray:
    """Codes c = f_phi(x0) of the trials x (M, N, T) -> (M, L), float64 numpy (on the CPU: MPS has no float64)."""
    model.eval()
    with torch.no_grad():
        return model.encoder(x).cpu().numpy().astype(np.float64)


def val_code_r2(model: GNOCCHI, x: torch.Tensor, d: dict) -> float:
    """Validation R^2 of a code -> target regression fit on training trials (0 without targets)."""
    if "targets" not in d:
        return 0.0
    C, Y = encode(model, x), d["targets"]
    return float(r2(Y[d["val"]], ridge(C[d["train"]], Y[d["train"]])(C[d["val"]])).mean())


def gnocchi_latent(model: GNOCCHI, x: torch.Tensor, seed: int):
    """GNOCCHI as a latent: (codes (M, L), generator codes (K, L) -> DDIM samples (K, N, T) in z units). The x_T (and
    DDIM noise) draws of the whole evaluation come from one seeded CPU generator, in chunks of 256 codes."""
    codes, g = encode(model, x), torch.Generator().manual_seed(seed + 2)

    def gen(c):
        chunks = np.split(c, np.arange(256, len(c), 256))
        samples = [model.sample(torch.tensor(cb, dtype=torch.float32).to(x.device), g) for cb in chunks]
        return np.concatenate([s.cpu().numpy().astype(np.float64) for s in samples])
    return codes, gen


def fit_behaviour_decoder(d: dict):
    """Linear trial-level decoder of the target from the flattened z-scored rates, fit on real training trials, used
    to read out generated trials (and, on validation trials, the sanity check that the target is in the data).
    NOTE (choice): ridge with lam 1. Returns decode: (K, N, T) -> (K, 2)."""
    N, T = d["x"].shape[1:]
    f = ridge(d["x"][d["train"]].reshape(-1, N * T), d["targets"][d["train"]], lam=1.0)  # (M_tr, N, T) -> (M_tr, N*T)

    def decode(x):
        return f(x.reshape(len(x), -1))                              # (K, N, T) -> (K, N*T) -> (K, 2)
    val_r2 = r2(d["targets"][d["val"]], decode(d["x"][d["val"]])).mean()
    print(f"sanity decode (linear, rates -> target): validation R^2 {val_r2:.3f}")
    return decode


def evaluate(cfg: Config, d: dict, latents: dict, hist: list, decode, lfads_kl=None) -> dict:
    """metrics.json and what the outputs need: training summaries, the behaviour decoder's ceiling on real held-out
    trials, conditional reconstruction from the codes of real trials, and latent_metrics of every latent (when
    there are held-out targets). Returns dict(metrics, res (name -> (codes, extras)), real, generated, hist, codes)."""
    tail = hist[-50:]
    m = dict(final_score_loss=float(np.mean([h["score"] for h in tail])),
             final_mmd=float(np.mean([h["mmd"] for h in tail])), val_code_r2=hist[-1]["val_code_r2"])
    if lfads_kl is not None:
        m["lfads_final_kl"] = lfads_kl
    Y, va, ho = d.get("targets"), d["val"], d["heldout"]
    if decode is not None:
        m["sanity_decode_val_r2"] = float(r2(Y[va], decode(d["x"][va])).mean())
        if ho.any():  # the ceiling for decoding generated held-out trials
            yh = decode(d["x"][ho])
            m["decoder_real_heldout_r2"] = float(r2(Y[ho], yh).mean())
            m["decoder_real_heldout_err_cm"] = float(np.linalg.norm(yh - Y[ho], axis=1).mean())
    n = min(len(d["x"]), 100)  # conditional generation from the codes of real trials: how much of x0 does c pin down?
    codes, gen = latents["GNOCCHI"]
    recon = gen(codes[:n])
    m["recon_r2"] = float(1 - ((recon - d["x"][:n]) ** 2).sum() / (d["x"][:n] ** 2).sum())
    ev = dict(metrics=m, res={}, real=d["rates"][:n], generated=recon, hist=hist,
              codes={name: C for name, (C, _) in latents.items()})
    if decode is not None and ho.any():
        for name, (C, g) in latents.items():
            lm, ex = latent_metrics(C, g, d, decode, cfg.n_gen)
            m.update({f"{LATENTS[name]}_{k}": v for k, v in lm.items()})
            ev["res"][name] = (C, ex)
        ev["real"], ev["generated"] = d["rates"][ho], ev["res"]["GNOCCHI"][1]["gen"]
    return ev


# -----------------------------------------------------------------------------
# Baselines with the same code size L: PCA of the rates and an LFADS-like sequential VAE (the paper's baseline)
# -----------------------------------------------------------------------------
def pca_baseline(d: dict, L: int):
    """Baseline latent: PCA (fit on training trials) of the flattened z-scored rates with the same L. Its generator is
    the linear reconstruction mean + V c."""
    M, N, T = d["x"].shape
    X = d["x"].reshape(M, -1)                                        # (M, N, T) -> (M, N*T)
    mean = X[d["train"]].mean(0)
    V = np.linalg.svd(X[d["train"]] - mean, full_matrices=False)[2][:L].T  # (N*T, L) top principal axes

    def gen(c):
        return (mean + c @ V.T).reshape(len(c), N, T)               # (K, N*T) -> (K, N, T)
    return (X - mean) @ V, gen


class SeqVAE(nn.Module):
    """LFADS-like sequential VAE (Pandarinath et al. 2018; lfads-torch): a bidirectional GRU reads the trial and gives
    the posterior q(g0 | x) = N(mu, diag sigma^2) of the initial condition g0 in R^L; an autonomous generator GRU
    starts from h_0 = tanh(W g0 + b) (NOTE (choice): tanh keeps h_0 in the GRU's state range) and unrolls T steps;
    factors f_t = W_f h_t (no bias, as in LFADS) are read out linearly. The code of a trial is mu, as GNOCCHI's is
    f_phi(x0).
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
        # g0 = mu + sigma * z (reparameterised sample)
        g0 = mu + (0.5 * logvar).exp() * torch.randn(mu.shape).to(mu.device)
        rec = 0.5 * ((self.decode(g0, x.shape[2]) - x) ** 2).sum((1, 2))
        # KL = 1/2 sum (mu^2 + sigma^2 - 1 - log sigma^2)   (closed-form Gaussian KL)
        kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
        return (rec + kl_weight * kl).mean() / x[0].numel(), kl.mean().item()


def lfads_baseline(d: dict, cfg: Config, device: torch.device):
    """Train SeqVAE with L = code_dim on the training trials (Adam lr 3e-3, KL weight ramped 0 -> 1 over the first
    half, as LFADS ramps its KL weight). Returns (codes mu (M, L), generator c (K, L) -> (K, N, T), final KL)."""
    N, T = d["x"].shape[1:]
    vae = SeqVAE(N, cfg.code_dim).to(device)
    x = torch.tensor(d["x"], dtype=torch.float32).to(device)
    x_tr = x[torch.from_numpy(d["train"]).to(device)]
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    prog, kl = Progress("LFADS-like", cfg.lfads_steps), float("nan")
    for step in range(1, cfg.lfads_steps + 1):
        idx = torch.randint(0, len(x_tr), (cfg.batch,)).to(device)
        loss, kl = vae.loss(x_tr[idx], min(1.0, 2 * step / cfg.lfads_steps))
        value = loss.item()
        check_finite(value, "LFADS-like", step, "extreme inputs or an unstable GRU (check the data's scale)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        prog(step, loss=value, kl=kl)
    vae.eval()
    with torch.no_grad():
        codes = vae.posterior(x)[0].cpu().numpy().astype(np.float64)  # (M, L) posterior means

    def gen(c):                                                         # the generator's mean output for codes c
        with torch.no_grad():
            return vae.decode(torch.tensor(c, dtype=torch.float32).to(device), T).cpu().numpy().astype(np.float64)
    return codes, gen, kl


# -----------------------------------------------------------------------------
# Figures (matplotlib is imported here only), outputs, and the pipeline
# -----------------------------------------------------------------------------
def make_figures(d: dict, ev: dict) -> dict:
    """name -> matplotlib Figure: task, latents, held-out prediction, traversal, PSTHs, summary."""
    from matplotlib.figure import Figure
    figs, Y, ho, res = {}, d["targets"], d["heldout"], ev["res"]
    span = Y.max() - Y.min() + 1e-9
    if "hand" in d:  # 1) task: grid + held-out targets, example hand paths, one neuron's PSTH by target
        fig = figs["task"] = Figure(figsize=(10, 3.2))
        a = fig.subplots(1, 3)
        for k in np.unique(Y, axis=0):
            sel = np.flatnonzero((Y == k).all(1))[:3]
            a[0].plot(*d["hand"][sel].transpose(2, 1, 0), color="k" if ho[sel[0]] else "0.6", lw=0.8)
        a[0].scatter(*Y[~ho].T, c="tab:blue", label="train target")
        a[0].scatter(*Y[ho].T, c="tab:red", marker="*", s=120, label="held out")
        a[0].legend(fontsize=7)
        a[0].set_title("targets and hand paths (cm)")
        for k in np.unique(Y, axis=0):
            sel = (Y == k).all(1)
            colour = ((k[0] - Y.min()) / span, 0.3, (k[1] - Y.min()) / span)
            a[1].plot(d["t_ms"], d["rates"][sel, 0].mean(0), color=colour)
        a[1].set(title="neuron 0 PSTH by target", xlabel="ms from onset", ylabel="Hz")
        a[2].imshow(d["rates"][0], aspect="auto", cmap="viridis")
        a[2].set(title="one trial", xlabel="bin", ylabel="neuron")
    R = len(res)  # GNOCCHI and the baselines
    fig = figs["latents"] = Figure(figsize=(9, 4 * R))  # 3) codes on (w_x, w_y) coloured by target, held-out overlaid
    for r, (name, (C, ex)) in enumerate(res.items()):
        P = (C - ex["c_bar"]) @ np.linalg.pinv(ex["W"]).T           # (M, L) -> (M, 2) coordinates in (w_x, w_y)
        for a in range(2):
            ax = fig.add_subplot(R, 2, 2 * r + a + 1)
            ax.scatter(*P[~ho].T, c=Y[~ho, a], s=4, cmap="coolwarm")
            ax.scatter(*P[ho].T, c=Y[ho, a], s=18, cmap="coolwarm", edgecolors="k", linewidths=0.5)
            ax.set(title=f"{name}: colour = target {'xy'[a]}", xlabel="w_x", ylabel="w_y")
    fig = figs["heldout_prediction"] = Figure(figsize=(4 * R, 3.5))  # 4) predicted vs true held-out targets
    for j, (name, (C, ex)) in enumerate(res.items()):
        ax = fig.add_subplot(1, R, j + 1)
        ax.scatter(*ex["pred"].T, s=6, c=np.unique(Y[ho], axis=0, return_inverse=True)[1].ravel(), cmap="tab10")
        ax.scatter(*ex["ho_targets"].T, marker="*", s=200, c="k")
        ax.set(title=f"{name}: predicted held-out targets")
    fig = figs["traversal"] = Figure(figsize=(4 * R, 3.5))  # 5) decoded endpoints along w_x and w_y sweeps
    for j, (name, (C, ex)) in enumerate(res.items()):
        ax = fig.add_subplot(1, R, j + 1)
        for a, mk in enumerate("ox"):
            ax.scatter(*ex["trav"][a].T, c=np.repeat(np.arange(5), len(ex["trav"][a]) // 5), cmap="viridis",
                       marker=mk, s=12, label=f"sweep along w_{'xy'[a]}")
        ax.legend(fontsize=7)
        ax.set(title=f"{name}: decoded endpoints", xlabel="x (cm)", ylabel="y (cm)")
    ex = res["GNOCCHI"][1]  # 6) generated vs true PSTHs for held-out targets (z units), per-neuron R^2 histogram
    fig = figs["psth"] = Figure(figsize=(12, 3))
    for n in range(4):
        ax = fig.add_subplot(1, 5, n + 1)
        for k in range(len(ex["ho_targets"])):
            ax.plot(ex["psth_t"][k, n], color=f"C{k}")
            ax.plot(ex["psth_g"][k, n], "--", color=f"C{k}")
        ax.set(title=f"neuron {n}: true -, generated --", xlabel="bin")
    ax = fig.add_subplot(1, 5, 5)
    ax.hist(ex["psth_r2_neurons"], bins=20)
    ax.set(title="per-neuron PSTH R^2")
    fig = figs["summary"] = Figure(figsize=(12, 3))  # 7) summary bars + 8) training curve
    keys = ["snr_train", "heldout_r2", "psth_r2", "cos_wx_wy", "unwanted"]
    for j, k in enumerate(keys):
        ax = fig.add_subplot(1, len(keys) + 1, j + 1)
        ax.bar(list(res), [ev["metrics"][f"{LATENTS[n]}_{k}"] for n in res], color=["C1", "C7", "C2"][:R])
        ax.set(title=k)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
    ax = fig.add_subplot(1, len(keys) + 1, len(keys) + 1)
    ax.semilogy([h["step"] for h in ev["hist"]], [h["score"] for h in ev["hist"]], lw=0.5)
    ax.set(title="L_score", xlabel="step")
    return figs


def write_outputs(cfg: Config, d: dict, model: GNOCCHI, ev: dict, sw: Stopwatch) -> None:
    """Figures, samples.npz (real and generated rates in the data's units), codes.npz, gnocchi.pt, timing.json, then
    metrics.json last; prints the metrics table."""
    if ev["res"]:
        for name, fig in make_figures(d, ev).items():
            save_figure(fig, os.path.join(cfg.out, "figures", f"{name}.png"))
    sw.lap("figures")
    real = ev["real"].astype(np.float32)
    generated = (ev["generated"] * d["sd"] + d["mu"]).astype(np.float32)  # z units -> the data's units
    save_atomic(os.path.join(cfg.out, "samples.npz"), lambda f: np.savez_compressed(f, real=real, generated=generated))
    codes = dict(codes=ev["codes"]["GNOCCHI"], baseline_codes=ev["codes"]["PCA"], heldout=d["heldout"])
    if "targets" in d:
        codes["targets"] = d["targets"]
    if "LFADS-like" in ev["codes"]:
        codes["lfads_codes"] = ev["codes"]["LFADS-like"]
    save_atomic(os.path.join(cfg.out, "codes.npz"), lambda f: np.savez_compressed(f, **codes))
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_atomic(os.path.join(cfg.out, "gnocchi.pt"), lambda f: torch.save(state, f))
    sw.lap("save")
    write_json(os.path.join(cfg.out, "timing.json"), dict(sw.times, total=round(sum(sw.times.values()), 2)))
    write_json(os.path.join(cfg.out, "metrics.json"), ev["metrics"])  # last, atomic
    print("\nmetric" + " " * 34 + "value")
    for k, v in ev["metrics"].items():
        print(f"  {k:<38} {v:.4g}")
    print(f"outputs in {cfg.out}; total {sum(sw.times.values()):.0f}s")


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    sw = Stopwatch()
    # Data: simulated reaches or --data (ValueError before any output), split, z-scored with training statistics
    d = prepare(load_data(cfg.data, cfg) if cfg.data else make_data(cfg), cfg.seed)
    M, N, T = d["x"].shape
    print(f"data: {M} trials, {N} neurons, {T} bins; {d['train'].sum()} train / {d['val'].sum()} val / "
          f"{d['heldout'].sum()} held-out trials; median rate {np.median(d['rates']):.3g}")
    prepare_out(cfg.out)
    write_json(os.path.join(cfg.out, "config.json"), run_info(cfg, device))
    decode = fit_behaviour_decoder(d) if "targets" in d else None
    sw.lap("data")
    # Model and training: encoder + AdaGN U-Net, score + reconstruction + MMD loss
    model = GNOCCHI(cfg, N, T).to(device)
    report_size(model, cfg, device)
    x = torch.tensor(d["x"], dtype=torch.float32).to(device)
    hist = train(model, x, d, cfg)
    sw.lap("train")
    # Latents to compare at the same code size: GNOCCHI's codes, PCA and the LFADS-like sequential VAE
    latents = {"GNOCCHI": gnocchi_latent(model, x, cfg.seed), "PCA": pca_baseline(d, cfg.code_dim)}
    lfads_kl = None
    if cfg.lfads_steps:
        codes, gen, lfads_kl = lfads_baseline(d, cfg, device)
        latents["LFADS-like"] = (codes, gen)
        sw.lap("lfads_train")
    # Sampling and evaluation: reconstruction, navigation to held-out targets, disentanglement metrics
    ev = evaluate(cfg, d, latents, hist, decode, lfads_kl)
    sw.lap("eval")
    write_outputs(cfg, d, model, ev, sw)
    return ev["metrics"]


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # bad input or a diverged run: one sentence, exit status 1
        sys.exit(f"error: {e}")
