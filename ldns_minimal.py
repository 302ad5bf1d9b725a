"""LDNS minimal: Latent Diffusion for Neural Spiking data, the whole pipeline in one file.

Kapoor, Schulz, Vetter, Pei, Gao, Macke, "Latent Diffusion for Neural Spiking Data", NeurIPS 2024,
https://arxiv.org/abs/2407.08751. Official code: github.com/mackelab/LDNS (the files named below are in that repo).
Self-contained: torch + numpy (matplotlib only inside the figure function).

  spikes x (B,N,T) --S4 autoencoder--> smooth latents z (B,d,T) --latent DDPM with an S4 denoiser--> new z
  --pointwise decoder--> rates (B,N,T) --Poisson, or the spike-history model--> new spikes

Sections (paper -> code):
  Data: Lorenz system (Sec. 4.1, Fig. 2; ldns/data/latent_attractor.py) ........ make_lorenz_data, load_spikes
  S4 layer (Sec. 3.1; ldns/networks/s4.py) ...................................... hippo_legs, S4D
  Autoencoder, coordinated dropout, regulariser (Sec. 3.1; ldns/networks/blocks.py,
    ldns/losses.py, train_autoencoder_Lorenz.ipynb) ............................. AEBlock, AutoEncoder, ae_loss
  Latent diffusion (Sec. 3.2; blocks.Denoiser, diffusers DDPMScheduler / EMAModel) .. Denoiser, DDPM, EMA
  Training (AdamW, clipping, warmup + cosine) .................................. warmup_cosine, fit
  Spike-history observation model (Sec. 3.3; train_spike_history_monkey.ipynb) ... SpikeHistoryGLM
  Generation: noise -> z -> un-normalise -> decode -> spikes ...................... generate
  Evaluation (ldns/utils/eval_utils.py, plotting_diffusion_Lorenz.ipynb) .......... spike_stats, compare, evaluate
  Variable-length trials (Sec. 4.2 recipe; train_autoencoder_human.ipynb, train_diffusion_human.ipynb,
    ldns/data/human.py): end padding, causal AE, masked statistics, centred re-padding,
    mask channel, sampling at requested lengths, per-length-bucket evaluation ....... make_lorenz_varlen, end_mask,
    causal_instance_norm, masked_latent_stats, centre_pad, crop_centred, sample_at_lengths, evaluate_varlen
  Conditional generation (Sec. 4.4 recipes; train_and_plot_diffusion_monkey_*_conditioned notebooks,
    ldns/data/monkey.py) on synthetic reaches: angle-conditioned denoiser (ConditionalDenoiser), velocity-
    conditioned denoiser (extra input channels), ridge behaviour decoder ........... make_reach_data, reach_condition,
    train_reach_denoisers, generate_reach, fit_ridge, evaluate_reach, reach_figures, run_reach
  Figures, outputs and the pipeline ............................................. make_figures, write_outputs, main

Run (2-core x86-64 CPU, --device cpu):
  python ldns_minimal.py --demo lorenz             # ~4 min: r(PSC, corr, mean ISI, std ISI) 0.996/0.992/0.995/0.972
  python ldns_minimal.py --demo lorenz --long      # ~25 min: r 0.998/0.999/0.999/0.995, latent R^2 0.99
  python ldns_minimal.py --demo lorenz-refractory  # ~5.5 min: lag-1 ratio 0.381 with spike history vs the
                                                   #   data's 0.368 (LDNS alone 2.21); every r >= 0.95
  python ldns_minimal.py --demo lorenz-varlen      # ~5 min: trials of 48-160 bins; r(rate, corr, mean ISI) >= 0.9
                                                   #   in every length bucket, each trial of its requested length
  python ldns_minimal.py --demo reach              # ~4.5 min: spikes conditioned on a reach angle (decoded
                                                   #   direction off by 7.8 deg, median) or a held-out velocity
                                                   #   trace (decoded R^2 0.95)
  python ldns_minimal.py --quick                   # ~10 s: every stage on a toy problem (numbers meaningless)
  python ldns_minimal.py --paper                   # the official scale (5000 x 256 trials, 1000-step sampler): a GPU job
  python ldns_minimal.py --data spikes.npz         # your own counts (trials, neurons, bins), npz key 'spikes'
Outputs: config.json, metrics.json (last, atomic), timing.json, samples.npz, figures/*.png, ae.pt, denoiser.pt.
lorenz-varlen: samples.npz arrays are padded at the end (valid bins first, zeros after), with lengths_real and
lengths_generated; metrics per length bucket under len_<lo>-<hi>/. reach: denoiser_angle.pt, denoiser_velocity.pt;
samples.npz adds generated_velocity, angle_requested, velocity_requested (m/s) and velocity_requested_trials.
Shapes: B batch/trials, N neurons, T time bins, C hidden channels, d latent channels, H SSM channels (or history
bins), n complex SSM modes. Everything is channels-first (B, C, T).
Markers: `NOTE (deviation)` differs from the paper / official code (mostly CPU scale); `NOTE (choice)` a detail the
paper and code leave open, or an implementation choice that does not change the method.
Randomness: every random draw is made on the CPU (torch's global generator seeded by set_seed, a seeded CPU
torch.Generator, or numpy's default_rng) and then moved to the device, so one seed gives the same draws on CPU, CUDA
and MPS. Models are built on the CPU, then moved.
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Config: one dataclass, named demos and presets
# -----------------------------------------------------------------------------
@dataclass
class Config:
    demo: str = "lorenz"        # lorenz (Fig. 2) | lorenz-refractory (spike history) | lorenz-varlen (trial lengths)
    #                             | reach (conditional generation, Sec. 4.4)
    preset: str = ""            # set by --quick / --long / --paper
    seed: int = 0
    device: str = "auto"        # auto | cpu | cuda | mps
    out: str = ""               # output folder; "" -> runs/ldns_minimal-<demo>
    data: str = ""              # your own spikes (.npy or .npz key 'spikes'); "" -> the demo's data
    threads: int = 0            # torch CPU threads; 0 -> torch default
    # data. NOTE (deviation): official 5000 trials x 256 bins; CPU scale uses fewer, shorter trials (--paper: official)
    n_trials: int = 1500        # 70/10/20 split -> 1050 train trials = the "real" set of the evaluation
    n_bins: int = 128
    n_neurons: int = 128        # official 128
    # autoencoder. NOTE (deviation): official C 256, 4 blocks, 1400 steps of batch 512, lr 1e-3
    ae_channels: int = 64
    ae_blocks: int = 2
    d_latent: int = 8           # official 8
    d_state: int = 64           # S4 state size (d_state/2 complex modes), official 64
    ae_steps: int = 250
    ae_batch: int = 64
    ae_lr: float = 2e-3         # larger than the official 1e-3 for the short run
    mask_p: float = 0.2         # coordinated-dropout probability, official 0.2
    beta_lat: float = 0.01      # L2 latent penalty, official 0.01
    beta_td: float = 0.01       # temporal-difference penalty, official 0.01
    # diffusion. NOTE (deviation): official 7000 steps of batch 512, lr 1e-3, 1000-step ancestral sampler
    dn_channels: int = 64       # official 64
    dn_blocks: int = 4          # official 4
    dn_steps: int = 550
    dn_batch: int = 64
    dn_lr: float = 2e-3         # larger than the official 1e-3 for the short run
    dn_smooth_l1: float = 0.0   # 0: eps-MSE (Lorenz recipe); beta > 0: SmoothL1(beta), official monkey 0.05 (reach)
    n_diffusion: int = 1000     # training diffusion steps, official 1000
    sample_steps: int = 40      # sampler steps; 1000 with --eta 1 is the official ancestral DDPM sampler
    eta: float = 1.0            # 1: (respaced) ancestral DDPM, 0: deterministic DDIM
    n_gen: int = 525            # NOTE (deviation): generated trials; official: as many as training trials
    n_long: int = 2             # trials sampled at 16x length for the length-generalisation figure
    # spike-history observation model (Sec. 3.3), fitted after the AE and the denoiser
    spike_history: bool = False
    sh_bins: int = 20           # H history bins, official 20
    sh_epochs: int = 700        # NOTE (deviation): official 3000 full-batch epochs; fewer for a CPU run
    sh_trials: int = 96         # training trials the GLM is fitted on (official: all of them)
    sh_lr: float = 0.1          # official AdamW lr 0.1, weight decay 0.01
    sh_cap: int = 5             # spike counts are capped at 5 for fitting and sampling, as official
    # variable-length trials (--demo lorenz-varlen; the human-speech recipe, Sec. 4.2)
    ae_causal: bool = False     # causal AE (forward S4 kernel, causal_instance_norm); official for padded trials
    len_min: int = 0            # shortest trial length (lengths uniform in len_min..n_bins); 0 -> 0.3 n_bins
    n_buckets: int = 3          # length buckets of the evaluation
    # conditional generation on a synthetic reaching task (--demo reach; the monkey recipes, Sec. 4.4)
    condition: str = "both"     # angle | velocity | both: which conditional denoisers are trained
    angle_bin: int = 50         # bin at which the reach angle theta = atan2(v_y, v_x) is read, official 50
    n_angles: int = 8           # requested reach directions in the evaluation, evenly spaced in [-pi, pi)
    n_per_angle: int = 32       # samples per requested direction
    n_vel: int = 128            # held-out velocity traces to condition on (at most the test trials)
    ridge_alpha: float = 1e-6   # ridge penalty of the behaviour decoder, official Ridge(alpha=1e-6)


DEMOS = {"lorenz": {}, "lorenz-refractory": dict(spike_history=True, ae_steps=400),
         "lorenz-varlen": dict(n_bins=160, ae_causal=True),
         # NOTE (deviation): the monkey recipes train a causal AE (d 16, p 0.5, beta_lat 0.001, beta_td 0.2) and
         # denoisers of 256 channels x 6 blocks for 2000 epochs of batch 512; here the Lorenz AE recipe and
         # denoisers of 64 channels x 2 blocks for 1000 steps of batch 64
         "reach": dict(ae_steps=400, dn_blocks=2, dn_steps=1000, dn_smooth_l1=0.05)}
PRESETS = {
    "quick": (dict(n_trials=60, n_bins=32, n_neurons=32, ae_channels=16, ae_blocks=1, d_state=16, ae_steps=100,
                   dn_channels=16, dn_blocks=1, dn_steps=300, sample_steps=10, n_gen=20, n_long=1, sh_bins=8,
                   sh_epochs=50, angle_bin=12, n_per_angle=2, n_vel=8),
              "tiny sizes: every stage end to end in about 10 s on 2 CPU cores"),
    "long": (dict(n_trials=2000, ae_steps=1000, dn_steps=5000, sample_steps=50, n_gen=1400),
             "longer training (about 25 min on 2 CPU cores): the paper's statistics"),
    "paper": (dict(n_trials=5000, n_bins=256, ae_channels=256, ae_blocks=4, ae_steps=1400, ae_batch=512, ae_lr=1e-3,
                   dn_steps=7000, dn_batch=512, dn_lr=1e-3, sample_steps=1000, eta=1.0, n_gen=3500),
              "the official Lorenz configuration (a GPU job: hours on a CPU)"),
}
CHOICES = dict(demo=tuple(DEMOS), device=("auto", "cpu", "cuda", "mps"), preset=("", *PRESETS),
               condition=("angle", "velocity", "both"))
POSITIVE_FIELDS = ("n_trials", "n_bins", "n_neurons", "ae_channels", "ae_blocks", "d_latent", "d_state", "ae_steps",
                   "ae_batch", "ae_lr", "dn_channels", "dn_blocks", "dn_steps", "dn_batch", "dn_lr", "n_diffusion",
                   "sample_steps", "n_gen", "n_long", "sh_bins", "sh_epochs", "sh_trials", "sh_lr", "sh_cap",
                   "n_buckets", "angle_bin", "n_angles", "n_per_angle", "n_vel")
MAX_COUNT = 500                 # largest plausible spike count in one bin of --data (about 100 kHz at 5 ms bins)


def check_config(cfg):
    """File-specific CLI checks; returns an error message naming the flag, or None."""
    if not 0 <= cfg.mask_p < 1 or min(cfg.eta, cfg.beta_lat, cfg.beta_td, cfg.dn_smooth_l1) < 0:
        return "--mask-p must be in [0, 1); --eta, --beta-lat, --beta-td and --dn-smooth-l1 must be >= 0"
    if cfg.ae_channels % cfg.d_latent:
        return f"--ae-channels ({cfg.ae_channels}) must be divisible by --d-latent ({cfg.d_latent})"
    if cfg.sample_steps > cfg.n_diffusion:
        return f"--sample-steps must be <= --n-diffusion ({cfg.n_diffusion}), got {cfg.sample_steps}"
    if cfg.spike_history and cfg.sh_bins >= cfg.n_bins and not cfg.data:
        return f"--sh-bins ({cfg.sh_bins}) must be smaller than --n-bins ({cfg.n_bins})"
    if cfg.ridge_alpha < 0:
        return f"--ridge-alpha must be >= 0, got {cfg.ridge_alpha}"
    if cfg.demo == "reach":
        if cfg.data or cfg.spike_history or cfg.ae_causal:
            return ("--demo reach simulates its own reaching data (it needs the velocity) and has no spike-history "
                    "model: drop --data, --spike-history, --ae-causal")
        lo, hi = reach_angle_bins(cfg.n_bins)
        if not lo <= cfg.angle_bin <= hi:
            return (f"--angle-bin must be in [{lo}, {hi}] for --n-bins {cfg.n_bins} (a bin inside every reach), "
                    f"got {cfg.angle_bin}")
        n_test = cfg.n_trials - int(0.7 * cfg.n_trials) - int(0.1 * cfg.n_trials)
        if cfg.n_vel > n_test:
            return f"--n-vel must be at most the {n_test} held-out trials, got {cfg.n_vel}"
    if cfg.demo != "lorenz-varlen":
        return f"--len-min is used only by --demo lorenz-varlen, got {cfg.len_min}" if cfg.len_min else None
    if cfg.data or cfg.spike_history:
        return "--demo lorenz-varlen simulates its own trials and has no spike-history model: drop --data, --spike-history"
    if not cfg.ae_causal:
        return "--demo lorenz-varlen needs --ae-causal 1 (a bidirectional AE lets the end padding reach valid bins)"
    cfg.len_min = cfg.len_min or max(2, round(0.3 * cfg.n_bins))
    if not 2 <= cfg.len_min <= cfg.n_bins:
        return f"--len-min must be between 2 and --n-bins ({cfg.n_bins}), got {cfg.len_min}"
    if cfg.n_buckets > cfg.n_bins - cfg.len_min + 1:
        return (f"--n-buckets must be at most the number of trial lengths (--n-bins - --len-min + 1 = "
                f"{cfg.n_bins - cfg.len_min + 1}), got {cfg.n_buckets}")
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
# Data: Lorenz latents -> softplus rates -> Poisson spikes (Sec. 4.1), or your own counts
# -----------------------------------------------------------------------------
LORENZ_IC = np.array([-9.7869288, -15.03852, 20.533978])  # dysts' default initial condition of the Lorenz flow


def lorenz_rk4(x, n_out, dt, n_sub=10, sigma=10.0, rho=28.0, beta=2.667):
    """Integrate K Lorenz systems at once with fixed-step RK4. x (K,3) -> trajectory (K, n_out, 3), spacing dt.
    NOTE (deviation): official integrates each trial with scipy Radau (rtol 1e-3) via dysts; RK4 with 10 substeps
    per sample is more accurate and takes about a second for all trials."""
    def f(x):
        # dx/dt = sigma (y - x), dy/dt = x (rho - z) - y, dz/dt = x y - beta z (beta = 2.667 as in dysts)
        return np.stack([sigma * (x[:, 1] - x[:, 0]), x[:, 0] * (rho - x[:, 2]) - x[:, 1],
                         x[:, 0] * x[:, 1] - beta * x[:, 2]], 1)
    h = dt / n_sub
    out = np.empty((len(x), n_out, 3))
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


def refractory_poisson(lam, rng, K=4):
    """Spikes with refractoriness, for the lorenz-refractory demo (not in the paper; it plays the role of the
    monkey data's single-neuron dynamics). Each neuron n has a self-inhibiting history filter
    h_{n,k} = -a_n exp(-(k-1)/tau_n), k = 1..K, with a_n ~ U[1.5, 3] and tau_n ~ U[0.5, 1.5] bins, and
    s_{n,t} ~ Poisson(softplus(log lam_{n,t} + sum_k h_{n,k} s_{n,t-k})): without recent spikes the rate is
    softplus(log lam) = log(1 + lam), close to the Lorenz rate lam where it is small; a spike pushes it towards 0
    for a few bins. This is the spike-history model's own form, with known weights. lam (B,N,T) -> counts."""
    B, N, T = lam.shape
    a, tau = rng.uniform(1.5, 3.0, N), rng.uniform(0.5, 1.5, N)
    h = -a[:, None] * np.exp(-np.arange(K) / tau[:, None])    # (N, K); column k-1 acts on s_{t-k}
    s = np.zeros((B, N, T), np.int64)
    for t in range(T):
        past = s[:, :, max(0, t - K):t][..., ::-1]             # (B, N, <=K): s_{t-1}, s_{t-2}, ...
        drive = np.log(lam[:, :, t]) + (past * h[:, :past.shape[-1]]).sum(-1)  # (B, N)
        s[:, :, t] = rng.poisson(np.logaddexp(0.0, drive))     # softplus(drive)
    return s


def make_lorenz_data(n_trials, T, N, rng, refractory=False):
    """Lorenz data (ldns/data/latent_attractor.py): returns spikes (K,N,T) int64, true rates (K,N,T) and latents
    (K,3,T), per-trial z-scored. refractory=True draws the spikes through refractory_poisson from the same rates."""
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
    spikes = refractory_poisson(rates, rng) if refractory else rng.poisson(rates)
    return dict(spikes=spikes, rates=rates.astype(np.float32), latents=latents.astype(np.float32))


def make_lorenz_varlen(n_trials, T, N, len_min, rng):
    """Variable-length Lorenz trials (lorenz-varlen): make_lorenz_data with T bins, each trial cut to a length
    l ~ U{len_min..T} and zero-padded at the END (official ldns/data/human.py pads every trial at its end).
    NOTE (choice): each trial is z-scored over its T simulated bins before the cut, so a bin has the same
    distribution whatever the trial length; only the length varies across trials.
    Returns spikes, rates (K,N,T) and latents (K,3,T), all zero after l_i, and lengths (K,) int64."""
    data = make_lorenz_data(n_trials, T, N, rng)
    lengths = rng.integers(len_min, T + 1, n_trials)           # uniform over len_min..T
    m = (np.arange(T)[None] < lengths[:, None])[:, None]       # (K,T) -> (K,1,T) bool
    return dict(spikes=data["spikes"] * m, rates=data["rates"] * m, latents=data["latents"] * m, lengths=lengths)


def end_mask(lengths, T):
    """Padding mask of end-padded trials: m_t = 1 on the valid bins t < l_i. lengths (B,) int -> (B,1,T) float."""
    t = torch.arange(T, device=lengths.device)
    return (t[None] < lengths[:, None]).float()[:, None]       # (B,T) -> (B,1,T)


def load_spikes(path):
    """Your own data: non-negative integer counts (trials, neurons, bins) in a .npy file or under the key 'spikes'
    of a .npz. Raises ValueError (file, expected, found) before anything is trained or written."""
    arrays = load_arrays(path)
    if "spikes" not in arrays:
        raise ValueError(f"--data {path}: expected an array named 'spikes' in the .npz, found keys {sorted(arrays)}")
    s = arrays["spikes"]
    if s.ndim != 3:
        raise ValueError(f"--data {path}: expected 3 dims (trials, neurons, bins), found shape {s.shape}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"--data {path}: expected finite counts, found {int((~np.isfinite(s)).sum())} NaN/inf entries")
    if (s < 0).any():
        raise ValueError(f"--data {path}: expected non-negative counts, found minimum {s.min()}")
    if (s != np.round(s)).any():
        raise ValueError(f"--data {path}: expected integer counts, found non-integer values, "
                         f"e.g. {s[s != np.round(s)][0]}")
    if s.max() > MAX_COUNT:
        raise ValueError(f"--data {path}: expected at most {MAX_COUNT} spikes per neuron and bin, found {s.max():.4g}; "
                         "re-bin the spike times into shorter bins")
    if s.shape[0] < 10 or s.shape[2] < 16 or s.shape[1] < 1:
        raise ValueError(f"--data {path}: expected at least 10 trials, 1 neuron and 16 time bins, found {s.shape}")
    if s.sum() == 0:
        raise ValueError(f"--data {path}: expected some spikes, found only zeros")
    return dict(spikes=s.astype(np.int64))


def split_trials(K, rng):
    """70/10/20 train/val/test split of K trials (official random_split)."""
    perm = rng.permutation(K)
    n_tr, n_va = int(0.7 * K), int(0.1 * K)
    return perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]


def make_data(cfg):
    """The demo's data from its own seeded generator, or --data (validated); plus the train/val/test split."""
    rng = np.random.default_rng(cfg.seed)
    print(f"[data] {'loading ' + cfg.data if cfg.data else 'simulating the ' + cfg.demo + ' demo'}")
    if cfg.data:
        data = load_spikes(cfg.data)
    elif cfg.demo == "reach":
        data = make_reach_data(cfg.n_trials, cfg.n_bins, cfg.n_neurons, rng)
    elif cfg.demo == "lorenz-varlen":
        data = make_lorenz_varlen(cfg.n_trials, cfg.n_bins, cfg.n_neurons, cfg.len_min, rng)
    else:
        data = make_lorenz_data(cfg.n_trials, cfg.n_bins, cfg.n_neurons, rng, cfg.demo == "lorenz-refractory")
    data["train"], data["val"], data["test"] = split_trials(len(data["spikes"]), rng)
    K, N, T = data["spikes"].shape
    print(f"  {K} trials x {N} neurons x {T} bins; train/val/test {len(data['train'])}/{len(data['val'])}/"
          f"{len(data['test'])}; mean count {data['spikes'].mean():.3f} per bin")
    if "lengths" in data:
        print(f"  trial lengths {data['lengths'].min()}-{data['lengths'].max()} bins, zero-padded at the end to {T}")
    return data


# -----------------------------------------------------------------------------
# Reaching data (--demo reach): a synthetic stand-in for monkey MC_Maze (Sec. 4.4), made by the file itself
# -----------------------------------------------------------------------------
REACH_BIN_S = 0.01                 # bin width in seconds: velocities in m/s, positions in m
REACH_ONSET = (0.15, 0.30)         # movement onset, a fraction of the trial length, uniform in this range
REACH_DURATION = (0.30, 0.55)      # movement duration, a fraction of the trial length, uniform in this range
REACH_DISTANCE = (0.08, 0.12)      # reach distance in m, uniform in this range
REACH_V_REF = 0.35                 # m/s, a typical peak speed: the unit of the velocity tuning


def min_jerk_speed(T, onset, duration):
    """Speed of a unit-distance minimum-jerk reach (Flash & Hogan 1985) on bins 0..T-1, per second:
    s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5 with tau = (t - onset) / duration clipped to [0, 1], so
    ds/dt = 30 tau^2 (1 - tau)^2 / duration is bell-shaped and zero outside the movement. onset, duration (K,) in
    bins -> (K,T)."""
    tau = np.clip((np.arange(T)[None] - onset[:, None]) / duration[:, None], 0.0, 1.0)  # (K,T)
    # ds/dt = 30 tau^2 (1 - tau)^2 / (duration * bin width)
    return 30 * tau ** 2 * (1 - tau) ** 2 / (duration[:, None] * REACH_BIN_S)


def make_reach_data(n_trials, T, N, rng, n_shared=3):
    """Centre-out reaching population from its own generator rng. Per trial: reach angle theta ~ U[-pi, pi)
    (NOTE (choice): continuous directions, not a few targets), distance, onset and duration uniform in the REACH_*
    ranges, velocity v(t) = distance speed(t) [cos theta, sin theta] (a straight minimum-jerk reach). Per neuron:
    preferred direction u_n (angle ~ U[-pi, pi)), depth k_n ~ U[0.7, 1.4], baseline 10-30 Hz, weights
    w_n ~ N(0, 0.4^2 I) on n_shared latents x(t) not explained by velocity: a 2-d rotation at 1.5-2.5 Hz with
    random phase and amplitude, and (n_shared - 2) Gaussian-process latents (squared-exponential, 15 bins).
    Log-rates mix cosine velocity tuning (Moran & Schwartz 1999) with the shared dynamics; counts are Poisson.
    NOTE (deviation): the paper uses monkey MC_Maze (182 neurons, 140 bins of 5 ms), which cannot be downloaded here.
    Returns spikes (K,N,T) int64, rates (K,N,T), velocity (K,2,T) m/s, angle (K,), shared latents (K,n_shared,T)
    and preferred directions (N,)."""
    K = n_trials
    theta = rng.uniform(-np.pi, np.pi, K)
    distance = rng.uniform(*REACH_DISTANCE, K)
    onset = rng.uniform(*REACH_ONSET, K) * T
    duration = rng.uniform(*REACH_DURATION, K) * T
    speed = distance[:, None] * min_jerk_speed(T, onset, duration)          # (K,T) m/s
    direction = np.stack([np.cos(theta), np.sin(theta)], 1)                  # (K,2)
    velocity = direction[:, :, None] * speed[:, None, :]                      # (K,2,1) * (K,1,T) -> (K,2,T)
    f = rng.uniform(1.5, 2.5, K)                                              # shared dynamics, reach-independent
    psi = rng.uniform(-np.pi, np.pi, K)
    a = rng.uniform(0.5, 1.5, K)
    arg = 2 * np.pi * f[:, None] * (np.arange(T) * REACH_BIN_S)[None] + psi[:, None]  # (K,T)
    rotation = a[:, None, None] * np.stack([np.cos(arg), np.sin(arg)], 1)    # (K,2,T)
    lag = np.arange(T)
    cov = np.exp(-0.5 * ((lag[:, None] - lag[None]) / 15.0) ** 2)            # (T,T) squared-exponential kernel
    L_chol = np.linalg.cholesky(cov + 1e-6 * np.eye(T))
    gp = np.einsum("ts,ks->kt", L_chol, rng.standard_normal((K * (n_shared - 2), T)))  # (K(n_shared-2), T)
    x = np.concatenate([rotation, gp.reshape(K, n_shared - 2, T)], 1)        # (K(n_shared-2),T) -> (K,n_shared,T)
    phi = rng.uniform(-np.pi, np.pi, N)
    u = np.stack([np.cos(phi), np.sin(phi)], 1)                               # (N,2)
    k = rng.uniform(0.7, 1.4, N)
    b = np.log(rng.uniform(10.0, 30.0, N) * REACH_BIN_S)                       # log(rate in Hz x bin width)
    w = 0.4 * rng.standard_normal((N, n_shared))
    # log lambda_n(t) = b_n + k_n (u_n . v(t)) / v_ref + w_n . x(t)
    log_rates = (b[None, :, None] + k[None, :, None] * np.einsum("nc,kct->knt", u, velocity) / REACH_V_REF
                 + np.einsum("nj,kjt->knt", w, x))                            # (K,N,T)
    rates = np.exp(log_rates)
    return dict(spikes=rng.poisson(rates), rates=rates.astype(np.float32), velocity=velocity.astype(np.float32),
                angle=theta.astype(np.float32), shared=x.astype(np.float32), pref_dir=phi.astype(np.float32))


def reach_angle_bins(T):
    """The bins at which every reach is moving (onset at most 0.30 T, end at least 0.45 T): [lo, hi]."""
    return math.floor(REACH_ONSET[1] * T) + 1, math.ceil((REACH_ONSET[0] + REACH_DURATION[0]) * T) - 1


def reach_condition(velocity, angle_bin):
    """The angle condition of the official monkey recipe (ldns/data/monkey.py): theta = atan2(v_y, v_x) at the
    fixed bin angle_bin, c = [cos theta, sin theta]. velocity (K,2,T) -> c (K,2)."""
    theta = torch.atan2(velocity[:, 1, angle_bin], velocity[:, 0, angle_bin])
    return torch.stack([torch.cos(theta), torch.sin(theta)], 1)


# -----------------------------------------------------------------------------
# S4 layer (Sec. 3.1; ldns/networks/s4.py): diagonal state-space model, HiPPO-LegS init, FFT convolution
# -----------------------------------------------------------------------------
def hippo_legs(N):
    """HiPPO-LegS A = S - P P^T with S normal (Gu et al. 2022, S4 Sec. 3). Diagonalise S = -1/2 I + skew in float64
    and keep the N/2 eigenvalues with Im > 0 (their conjugates are implied). Returns (Im lambda (n,), B (n,))
    with B = V^H B_legs, B_legs = sqrt(2k+1); the imaginary part of B is clipped to [-2, 2]
    (ldns/networks/s4.py)."""
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


def instance_norm(h, m=None):
    """Normalise each (sample, channel) over time, no affine (InstanceNorm1d, eps 1e-5). (B,C,T) -> (B,C,T).
    With a padding mask m (B,1,T): mean and (biased) variance over the valid bins only, padded bins set to 0,
    mu = sum_t m_t h_t / sum_t m_t,  var = sum_t m_t (h_t - mu)^2 / sum_t m_t,  out = m (h - mu) / sqrt(var + eps)."""
    if m is None:
        return F.instance_norm(h, eps=1e-5)
    n = m.sum(-1, keepdim=True)                                # (B,1,1) valid bins per trial
    mu = (h * m).sum(-1, keepdim=True) / n                     # (B,C,1)
    var = ((h - mu).pow(2) * m).sum(-1, keepdim=True) / n
    return m * (h - mu) / (var + 1e-5).sqrt()


def causal_instance_norm(h, eps=1e-5):
    """Bin t normalised with the mean and variance of bins 0..t of its (sample, channel), no affine:
    mu_t = (1/(t+1)) sum_{s<=t} h_s,  var_t = (1/(t+1)) sum_{s<=t} h_s^2 - mu_t^2,
    out_t = (h_t - mu_t) / sqrt(var_t + eps).
    (B,C,T) -> (B,C,T).
    NOTE (deviation): the official causal AE (train_autoencoder_human.ipynb) keeps InstanceNorm1d, which normalises
    over the whole window, padding included, so a valid bin still depends on how much padding follows it. Running
    statistics over bins <= t make the AE strictly causal, so the end padding cannot reach a valid bin."""
    n = torch.arange(1, h.shape[-1] + 1, device=h.device, dtype=h.dtype)  # (T,) = t + 1
    mu = h.cumsum(-1) / n
    var = (h.pow(2).cumsum(-1) / n - mu.pow(2)).clamp(min=0)
    return (h - mu) / (var + eps).sqrt()


# -----------------------------------------------------------------------------
# Autoencoder (Sec. 3.1; blocks.AutoEncoder, losses.py): S4 encoder -> grouped bottleneck z -> pointwise decoder -> softplus rates
# -----------------------------------------------------------------------------
class AEBlock(nn.Module):
    """Pre-norm residual block: h += s * GELU(S4(IN(h)(1+g1)+b1)) + c;  h += W2 GELU(W1 (IN(h)(1+g2)+b2)).
    bidirectional False (the official variable-length AE): a causal S4 kernel and causal_instance_norm, so the
    output at bin t depends on inputs at bins <= t only."""

    def __init__(self, C, d_state, bidirectional=True):
        super().__init__()
        self.ada = nn.Parameter(torch.zeros(1, 6 * C, 1))      # (shift, scale, gate) x 2, zero init; gates unused
        self.s4 = S4D(C, d_state, bidirectional)
        self.post_tm_scale = nn.Conv1d(C, C, 1, groups=C)      # depthwise per-channel scale s and bias c
        self.mlp = nn.Sequential(Conv1x1(C, 2 * C, bias=False), nn.GELU(), Conv1x1(2 * C, C, bias=False))
        self.norm = instance_norm if bidirectional else causal_instance_norm

    def forward(self, h):                                      # h (B,C,T)
        sh1, sc1, _, sh2, sc2, _ = self.ada.chunk(6, dim=1)    # each (1,C,1)
        h = h + self.post_tm_scale(F.gelu(self.s4(self.norm(h) * (1 + sc1) + sh1)))
        return h + self.mlp(self.norm(h) * (1 + sc2) + sh2)


class AutoEncoder(nn.Module):
    """Encoder: Conv1x1(N->C) -> blocks -> grouped Conv1x1(C->d, groups=d). Decoder (pointwise in time, so all
    temporal structure lives in z): grouped Conv1x1(d->C) -> GELU -> Conv1x1(C->N) -> softplus = rates.
    bidirectional False: every block is causal and the decoder is pointwise, so the whole AE is causal."""

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


def masked_poisson_nll(rates, x, M, m=None):
    """Poisson NLL (full, with Stirling term) on the DROPPED entries only (M == 0), averaged over ALL entries.
    With a padding mask m (B,1,T) also times m, still averaged over all B*N*T entries, padding included, as in
    train_autoencoder_human.ipynb (Poisson loss x dropout mask x signal mask, then the mean)."""
    nll = F.poisson_nll_loss(rates, x, log_input=False, full=True, eps=1e-8, reduction="none")  # (B,N,T)
    if m is None:
        return ((1 - M) * nll).mean()
    return ((1 - M) * m * nll).mean()


def latent_regulariser(z, beta_lat, beta_td, n_spike_entries, K=5):
    """beta_lat sum z^2 + beta_td sum_{i=1..K} 1/(1+i) sum (z_t - z_{t+i})^2, divided by B*N*T (spike entries)."""
    td = sum((z[..., i:] - z[..., :-i]).pow(2).sum() / (1 + i) for i in range(1, K + 1))
    return (beta_lat * z.pow(2).sum() + beta_td * td) / n_spike_entries


def ae_loss(ae, x, cfg, m=None):
    """Coordinated dropout (train_autoencoder_Lorenz.ipynb): element-wise mask M ~ Bernoulli(1-p), input x M / (1-p),
    Poisson loss on the dropped entries (times the padding mask m (B,1,T) if given), plus the latent regulariser.
    The regulariser covers the whole window, padding included: train_autoencoder_human.ipynb does not mask it."""
    M = (torch.rand(x.shape).to(x.device) >= cfg.mask_p).float()  # (B,N,T), 1 = kept
    rates, z = ae(x * M / (1 - cfg.mask_p))
    return masked_poisson_nll(rates, x, M, m) + latent_regulariser(z, cfg.beta_lat, cfg.beta_td, x.numel())


# -----------------------------------------------------------------------------
# Latent diffusion (Sec. 3.2; blocks.Denoiser, diffusers DDPMScheduler and EMAModel)
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

    def forward(self, h, e, m=None):                           # h (B,C,T), e (B,C/4), padding mask m (B,1,T)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.gelu(e))[..., None].chunk(6, dim=1)  # (B,6C,1) -> 6 x (B,C,1)
        h = h + g1 * F.gelu(self.s4(instance_norm(h, m) * (1 + sc1) + sh1))
        return h + g2 * self.mlp(instance_norm(h, m) * (1 + sc2) + sh2)


class Denoiser(nn.Module):
    """eps_theta(z_t, t [, c] [, extra]) (blocks.Denoiser): Conv1x1(d + d_extra -> C) -> adaLN-Zero blocks ->
    Conv1x1(C -> d + d_extra), the extra output channels dropped; no U-Net, no attention. Time: sinusoidal(256) ->
    Linear(256, C/4) -> SiLU -> Linear(C/4, C/4) = e. The 1x1 convolutions are grouped (each input channel feeds its
    own C/C_in hidden channels) when C_in = d + d_extra divides C, as official.
    Conditioning as in the official monkey models: extra (B, d_extra, T) channels (velocity traces, a padding mask)
    are concatenated to z_t; a vector c (B, d_cond) passes Linear(d_cond, C/4) -> SiLU -> Linear(C/4, C/4) and is
    ADDED to e (ConditionalDenoiser), reaching every block through the zero-initialised adaLN.
    mask_norm True (lorenz-varlen): extra[:, :1] is the centred padding mask m, and the blocks normalise over its
    valid bins (instance_norm(h, m)), so the output on valid bins does not depend on what the padding holds."""

    def __init__(self, d, C, n_blocks, d_state, d_extra=0, d_cond=0, mask_norm=False):
        super().__init__()
        self.d, C_in = d, d + d_extra
        # NOTE (deviation): official (train_diffusion_human.ipynb) feeds the mask channel only and normalises over
        # the whole window. The loss ignores the padding, so the sampler leaves unconstrained values there, which a
        # whole-window norm and the S4 kernels carry into the valid bins; masked norms keep the padding out.
        self.mask_norm = mask_norm
        g = C_in if (C % C_in == 0 and C > C_in) else 1
        self.conv_in = nn.Conv1d(C_in, C, 1, groups=g)
        self.t_mlp = nn.Sequential(nn.Linear(256, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))
        self.blocks = nn.ModuleList([DenoiserBlock(C, d_state) for _ in range(n_blocks)])
        # NOTE (deviation): DiT's final adaLN modulation (no norm), zero-init: h (1 + sc_f(t)) + sh_f(t) before
        # conv_out. The InstanceNorm blocks cannot see a channel's per-trial time-mean, so it reaches the output
        # only through the conv_in -> conv_out path, which official LDNS gives a t-independent gain; its error at
        # high noise is amplified by 1/sqrt(abar) in sampling and freezes into per-trial latent offsets in short
        # training runs. A t-dependent gain removes this failure.
        self.ada_out = nn.Linear(C // 4, 2 * C)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.conv_out = nn.Conv1d(C, C_in, 1, groups=g)
        if d_cond:
            self.c_mlp = nn.Sequential(nn.Linear(d_cond, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))

    def forward(self, z, t, c=None, extra=None):               # z (B,d,T), t (B,) int -> eps_hat (B,d,T)
        e = self.t_mlp(timestep_embedding(t))                  # (B,C/4)
        if c is not None:
            e = e + self.c_mlp(c)                              # e = e_t + e_c
        h = self.conv_in(z if extra is None else torch.cat([z, extra], 1))  # (B,d+d_extra,T) -> (B,C,T)
        m = extra[:, :1] if self.mask_norm else None           # (B,1,T) padding mask
        for blk in self.blocks:
            h = blk(h, e, m)
        sh, sc = self.ada_out(F.gelu(e))[..., None].chunk(2, dim=1)  # (B,2C,1) -> 2 x (B,C,1)
        return self.conv_out(h * (1 + sc) + sh)[:, :self.d]   # (B,C,T) -> (B,d+d_extra,T) -> (B,d,T)


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

    def loss(self, model, x0, mask=None, smooth_l1=0.0, **cond):
        """Alg. 1: t ~ U{0..T-1} per sample, eps ~ N(0,I), loss || eps - eps_theta(x_t, t, cond) ||^2, averaged
        over the latent entries (only over valid bins, mask (B,1,T) = 1, when a padding mask is given).
        smooth_l1 = beta > 0: SmoothL1(beta) per entry instead of the squared error (the monkey recipes, beta 0.05).
        NOTE (deviation): with a mask, train_diffusion_human.ipynb uses SmoothL1(beta 0.04) x mask; here the eps-MSE
        of the Lorenz recipe, whose minimiser is the posterior mean of eps that the ancestral sampler assumes."""
        t = torch.randint(0, len(self.beta), (len(x0),)).to(x0.device)
        eps = torch.randn(x0.shape).to(x0.device)
        eps_hat = model(self.q_sample(x0, t, eps), t, **cond)
        if mask is None and not smooth_l1:
            return F.mse_loss(eps_hat, eps)
        if smooth_l1:
            err = F.smooth_l1_loss(eps_hat, eps, beta=smooth_l1, reduction="none")  # (B,d,T)
        else:
            err = (eps_hat - eps) ** 2
        return err.mean() if mask is None else (err * mask).sum() / (mask.sum() * x0.shape[1])

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
    def sample(self, model, shape, K, eta, **cond):
        """Start from x_T ~ N(0,I) and step through the K respaced timesteps (K = 1000, eta = 1: official sampler);
        cond (c=..., extra=...) is given to the model at every step.
        NOTE (deviation, demo default): fewer steps than 1000, correctly respaced (diffusers 0.3.0's strided
        sampler is wrong)."""
        ts, abar = self.respaced(K)
        x = torch.randn(shape).to(self.beta.device)
        for i in reversed(range(len(ts))):
            ab, ab_prev = abar[i], abar[i - 1] if i > 0 else torch.ones((), device=x.device)
            eps_hat = model(x, ts[i].expand(shape[0]).to(x.device), **cond)
            mean, var = self.p_step(x, eps_hat, ab, ab_prev, eta)
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


# -----------------------------------------------------------------------------
# Training: AdamW, gradient clipping, linear warmup + cosine (standard PyTorch from here)
# -----------------------------------------------------------------------------
def warmup_cosine(k, steps):
    """lr multiplier at optimiser step k = 0, 1, ... (diffusers get_cosine_schedule_with_warmup as LDNS calls it):
    linear warmup over the first 5% of the steps (official: 10 of 200 AE epochs, 50 of 1000 denoiser epochs), then
    0.5 (1 + cos(pi progress)) with the horizon at 1.3x the real step count, so the lr ends at ~13% of its peak."""
    warm, horizon = max(1, steps // 20), 1.3 * steps
    if k < warm:
        return k / warm
    return 0.5 * (1 + math.cos(math.pi * (k - warm) / (horizon - warm)))


def fit(model, loss_fn, n_items, *, steps, batch, lr, clip, name, ema=None):
    """AdamW(lr, weight decay 0.01), grad-norm clipping, warmup_cosine, shuffled epochs over n_items training items.
    loss_fn(idx) returns the loss of the items idx; the EMA, if given, is updated after every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    prog, perm, pos = Progress(name, steps), torch.randperm(n_items), 0
    batch = min(batch, n_items)
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step - 1, steps)
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
        check_finite(loss.item(), name, step, "a learning rate too high for this data, or counts far outside the "
                     "demo's range (re-bin your spikes)")
        prog(step, loss=loss.item(), lr=opt.param_groups[0]["lr"])
    return model


@torch.no_grad()
def batched(fn, x, bs=256):
    """Apply fn to x in chunks along dim 0 (bounded memory)."""
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def train_autoencoder(cfg, x_tr, lengths=None):
    """Stage 1 (train_autoencoder_Lorenz.ipynb): the S4 autoencoder with coordinated dropout, clip 2.0; causal
    with --ae-causal. x_tr (K,N,T) training spikes; lengths (K,) of end-padded trials: the loss is masked
    (train_autoencoder_human.ipynb). Returns the trained AE in eval mode."""
    ae = AutoEncoder(x_tr.shape[1], cfg.ae_channels, cfg.d_latent, cfg.ae_blocks, cfg.d_state,
                     bidirectional=not cfg.ae_causal).to(x_tr.device)
    m = None if lengths is None else end_mask(lengths, x_tr.shape[-1])  # (K,1,T)
    print(f"[autoencoder] {'causal, ' if cfg.ae_causal else ''}{sum(p.numel() for p in ae.parameters()):,} parameters")
    fit(ae, lambda idx: ae_loss(ae, x_tr[idx], cfg, None if m is None else m[idx]), len(x_tr), steps=cfg.ae_steps,
        batch=cfg.ae_batch, lr=cfg.ae_lr, clip=2.0, name="AE")
    return ae.eval()


def latent_stats(z_tr):
    """Latent normalisation (official LatentDataset): per-channel mean and unbiased std over training trials and
    time. z_tr (K,d,T) -> mu, sigma, each (1,d,1)."""
    return z_tr.mean((0, 2), keepdim=True), z_tr.std((0, 2), keepdim=True)


def masked_latent_stats(z, m):
    """Per-channel mean and std over the valid bins of all trials (official LatentHumanDataset):
    mu = sum m z / sum m,  sigma^2 = sum m (z - mu)^2 / sum m (biased, as official). z (K,d,T), m (K,1,T) ->
    mu, sigma (1,d,1)."""
    n = m.sum()
    mu = (z * m).sum((0, 2), keepdim=True) / n
    var = ((z - mu).pow(2) * m).sum((0, 2), keepdim=True) / n
    return mu, var.sqrt()


def centre_mask(lengths, T):
    """Centred mask: 1 on bins (T - l)//2 .. (T - l)//2 + l - 1 (official sample_spikes_with_mask). -> (B,1,T)"""
    left = (T - lengths) // 2
    t = torch.arange(T, device=lengths.device)
    return ((t[None] >= left[:, None]) & (t[None] < (left + lengths)[:, None])).float()[:, None]  # (B,T)->(B,1,T)


def centre_pad(z, lengths):
    """Each trial's valid segment z[..., :l] moved to the centre of the window, left = (T - l)//2, and both sides
    filled with its edge values (F.pad mode 'replicate'; official symmetrically_pad_latent), as one gather.
    z (B,d,T) end-padded, lengths (B,) -> centred z (B,d,T) and the centred mask (B,1,T)."""
    B, d, T = z.shape
    left = (T - lengths) // 2                                  # (B,)
    t = torch.arange(T, device=z.device)
    src = torch.minimum((t[None] - left[:, None]).clamp(min=0), lengths[:, None] - 1)  # (B,T) source bin
    return z.gather(-1, src[:, None].expand(B, d, T)), centre_mask(lengths, T)  # (B,T) -> (B,1,T) -> (B,d,T)


def crop_centred(x, lengths):
    """Inverse of centre_pad: the centred valid segment of x moved to the front, zeros after (end-padded, like the
    data). x (B,C,T), lengths (B,) -> (B,C,T)."""
    B, C, T = x.shape
    left = (T - lengths) // 2
    t = torch.arange(T, device=x.device)
    src = (t[None] + left[:, None]).clamp(max=T - 1)           # (B,T) source bin
    return x.gather(-1, src[:, None].expand(B, C, T)) * end_mask(lengths, T)  # (B,T) -> (B,1,T) -> (B,C,T)


def latents_for_diffusion(z_tr, lengths=None, clip=True):
    """The denoiser's training set from the AE latents z_tr (K,d,T) of the training trials. Fixed length (official
    LatentDataset): z~ = clamp((z - mu)/sigma, -5, 5) (the Lorenz default; clip=False: not clamped, as in the
    monkey recipes). End-padded trials of lengths (K,) (official LatentHumanDataset, not clamped): masked mu, sigma
    over the valid bins, then centre_pad.
    Returns mu, sigma (1,d,1), z~ (K,d,T) and the centred padding mask (K,1,T), or None for fixed length."""
    if lengths is None:
        mu, sigma = latent_stats(z_tr)
        zn = (z_tr - mu) / sigma
        return mu, sigma, zn.clamp(-5, 5) if clip else zn, None
    mu, sigma = masked_latent_stats(z_tr, end_mask(lengths, z_tr.shape[-1]))
    return (mu, sigma, *centre_pad((z_tr - mu) / sigma, lengths))


def train_denoiser(cfg, zn_tr, m_tr=None, c_tr=None, v_tr=None, name="DDPM"):
    """Stage 2 (train_diffusion_Lorenz.ipynb): DDPM on the normalised training latents zn_tr (K,d,T); clip 1.0, EMA
    of the weights. With a padding mask m_tr (K,1,T) (train_diffusion_human.ipynb): the mask is the denoiser's extra
    input channel (C_in = d + 1) and the loss is averaged over valid bins. The monkey recipes (Sec. 4.4): an angle
    condition c_tr (K,2) enters through the time embedding (ConditionalDenoiser, condition_dim 2); velocity traces
    v_tr (K,2,T) are extra input channels (Denoiser, C_in = d + 2). Returns (ddpm, EMA denoiser)."""
    ddpm = DDPM(cfg.n_diffusion).to(zn_tr.device)
    masked = m_tr is not None
    extra = m_tr if masked else v_tr                           # (K,d_extra,T) or None
    dn = Denoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state, d_extra=0 if extra is None else
                  extra.shape[1], d_cond=0 if c_tr is None else c_tr.shape[1], mask_norm=masked).to(zn_tr.device)
    if c_tr is not None or v_tr is not None:
        with torch.no_grad():                                  # monkey recipes: conv_out x 0.1 at init
            dn.conv_out.weight.mul_(0.1)
            dn.conv_out.bias.mul_(0.1)
    ema = EMA(dn)
    print(f"[diffusion] {name}: denoiser {sum(p.numel() for p in dn.parameters()):,} parameters")

    def loss(idx):
        cond = {} if extra is None else dict(extra=extra[idx])
        if c_tr is not None:
            cond["c"] = c_tr[idx]
        return ddpm.loss(dn, zn_tr[idx], mask=m_tr[idx] if masked else None, smooth_l1=cfg.dn_smooth_l1, **cond)
    fit(dn, loss, len(zn_tr), steps=cfg.dn_steps, batch=cfg.dn_batch, lr=cfg.dn_lr, clip=1.0, name=name, ema=ema)
    return ddpm, ema.model


def train_reach_denoisers(cfg, zn_tr, v_tr, lap):
    """--demo reach: the conditional denoisers --condition asks for, on the latents zn_tr (K,d,T) of one AE and one
    latent normalisation, with the training velocities v_tr (K,2,T) in m/s. Angle: c = [cos theta, sin theta], theta
    read at cfg.angle_bin. Velocity: v / v_scale as two extra input channels.
    NOTE (choice): velocity channels in units of the training velocity's std (official: m/s, a similar scale).
    lap(stage) is called after each model (Stopwatch.lap).
    Returns ddpm, {"angle" | "velocity": EMA denoiser}, v_scale."""
    v_scale, models, ddpm = v_tr.std(), {}, None
    if cfg.condition in ("angle", "both"):
        ddpm, models["angle"] = train_denoiser(cfg, zn_tr, c_tr=reach_condition(v_tr, cfg.angle_bin), name="DDPM-angle")
        lap("diffusion_train_angle")
    if cfg.condition in ("velocity", "both"):
        ddpm, models["velocity"] = train_denoiser(cfg, zn_tr, v_tr=v_tr / v_scale, name="DDPM-velocity")
        lap("diffusion_train_velocity")
    return ddpm, models, v_scale


# -----------------------------------------------------------------------------
# Spike-history observation model (Sec. 3.3; train_spike_history_monkey.ipynb)
# -----------------------------------------------------------------------------
class SpikeHistoryGLM(nn.Module):
    """Per-neuron autoregressive Poisson GLM with a softplus link, no coupling between neurons:
    r_{n,t} = softplus( sum_{k=1..H} w_{n,k} s_{n,t-k} + w_{n,H+1} log lambda_{n,t} + w_{n,H+2} ),
    lambda the latent model's rate. The decoder of LDNS is pointwise in time, so this is what adds single-neuron
    dynamics such as refractoriness. Weights ~ N(0, 1) as official."""

    def __init__(self, N, H=20):
        super().__init__()
        self.H = H
        self.w = nn.Parameter(torch.randn(N, H + 2))           # (N, H+2): history, log-rate gain, bias

    def design(self, s, log_lam):
        """Regressors of bins t = H..T-1 from the observed history: s, log_lam (B,N,T) -> X (N, B(T-H), H+2), rows
        [s_{t-1}, ..., s_{t-H}, log lambda_t, 1]."""
        B, N, T = s.shape
        past = s.unfold(-1, self.H, 1)[..., :-1, :].flip(-1)   # (B,N,T-H,H): [..., k-1] = s_{t-k}
        X = torch.cat([past, log_lam[..., self.H:, None], torch.ones_like(past[..., :1])], -1)  # (B,N,T-H,H+2)
        return X.permute(1, 0, 2, 3).reshape(N, -1, self.H + 2)  # (N,B,T-H,H+2) -> (N, B(T-H), H+2)

    def forward(self, X):
        """Teacher-forced rates r = softplus(X w) per neuron: X (N,M,H+2) -> (N,M)."""
        return F.softplus(torch.bmm(X, self.w[:, :, None])[..., 0])

    def rate(self, hist, log_lam):
        """One bin: hist (B,N,H) with hist[..., k-1] = s_{t-k}, log_lam (B,N) -> r (B,N)."""
        H = self.H
        return F.softplus((hist * self.w[:, :H]).sum(-1) + self.w[:, H] * log_lam + self.w[:, H + 1])

    @torch.no_grad()
    def sample(self, lam, cap=5):
        """From a zero history, bin by bin: r_t = rate(history, log lambda_t), s_t = min(Poisson(r_t), cap).
        lam (B,N,T) -> spikes (B,N,T); vectorised over trials and neurons, one loop over time."""
        B, N, T = lam.shape
        log_lam = lam.clamp(min=1e-8).log()                    # NOTE (choice): floor so that log(0) stays finite
        hist, out = torch.zeros(B, N, self.H, device=lam.device), []
        for t in range(T):
            s_t = torch.poisson(self.rate(hist, log_lam[..., t]).cpu()).clamp(max=cap).to(lam.device)  # (B,N)
            hist = torch.cat([s_t[..., None], hist[..., :-1]], -1)  # s_t becomes s_{(t+1)-1}
            out.append(s_t)
        return torch.stack(out, -1)                            # T x (B,N) -> (B,N,T)


def fit_spike_history(cfg, s_tr, lam_tr):
    """Stage 3, after the AE and the denoiser (both frozen): targets are training spikes capped at sh_cap, lambda
    the AE-reconstructed rates of the same trials; the first H bins serve only as history. Full-batch
    AdamW(lr 0.1, weight decay 0.01), Poisson NLL (log_input=False, full=True). s_tr, lam_tr (K,N,T).
    NOTE (deviation): fitted on at most sh_trials training trials (official: all), so that the CPU fit takes
    seconds; that still leaves over ten thousand bins per neuron for its H + 2 weights."""
    H = cfg.sh_bins
    if s_tr.shape[-1] <= H:
        raise ValueError(f"--sh-bins: expected fewer history bins than the {s_tr.shape[-1]} bins per trial, found {H}")
    s, lam = s_tr[:cfg.sh_trials].clamp(max=cfg.sh_cap), lam_tr[:cfg.sh_trials]
    glm = SpikeHistoryGLM(s.shape[1], H).to(s.device)
    X = glm.design(s, lam.clamp(min=1e-8).log())               # (N, M, H+2)
    y = s[..., H:].permute(1, 0, 2).reshape(s.shape[1], -1)    # (B,N,T-H) -> (N, M) targets
    opt = torch.optim.AdamW(glm.parameters(), lr=cfg.sh_lr, weight_decay=0.01)
    prog = Progress("spike history", cfg.sh_epochs)
    for epoch in range(1, cfg.sh_epochs + 1):
        loss = F.poisson_nll_loss(glm(X), y, log_input=False, full=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        check_finite(loss.item(), "spike-history GLM", epoch, "a learning rate too high (--sh-lr)")
        prog(epoch, loss=loss.item())
    return glm.eval()


# -----------------------------------------------------------------------------
# Generation: noise -> DDPM -> un-normalise -> decode -> Poisson (or spike history)
# -----------------------------------------------------------------------------
@torch.no_grad()
def sample_trials(cfg, ddpm, dn, ae, mu, sigma, n, T, chunk=700, **cond):
    """n trials of T bins: z~ from the sampler (in chunks; every conditioning tensor in cond is split with them),
    z = z~ sigma + mu, rates = decode(z), spikes ~ Poisson(rates). -> z (n,d,T), rates and spikes (n,N,T)."""
    z = torch.cat([ddpm.sample(dn, (min(chunk, n - i), cfg.d_latent, T), cfg.sample_steps, cfg.eta,
                               **{k: v[i:i + chunk] for k, v in cond.items()}) for i in range(0, n, chunk)])
    z = z * sigma + mu                                         # (n,d,T)
    rates = batched(ae.decode, z)                              # (n,N,T)
    return dict(z=z, rates=rates, spikes=torch.poisson(rates.cpu()))


@torch.no_grad()
def sample_at_lengths(cfg, ddpm, dn, ae, mu, sigma, lengths, T, chunk=700):
    """Trials of exactly the requested lengths (official sample_spikes_with_mask): centred masks m_c -> sampler with
    m_c as the extra channel at every step -> z = z~ sigma + mu -> decode the whole window (the decoder is pointwise
    in time) -> crop to m_c -> Poisson. lengths (n,) -> z (n,d,T) centred, rates and spikes (n,N,T) end-padded."""
    m_c = centre_mask(lengths, T)                              # (n,1,T)
    z = torch.cat([ddpm.sample(dn, (len(m), cfg.d_latent, T), cfg.sample_steps, cfg.eta, extra=m)
                   for m in m_c.split(chunk)])
    z = z * sigma + mu                                         # (n,d,T)
    rates = crop_centred(batched(ae.decode, z), lengths)       # (n,N,T): l_i valid bins, zeros after
    return dict(z=z, rates=rates, spikes=torch.poisson(rates.cpu()))


def support_length(rates):
    """Length of each generated trial read off its rates: 1 + the last bin where some neuron has a rate > 0
    (softplus rates are > 0 on every valid bin, the crop leaves exact zeros after). (n,N,T) -> (n,) int64."""
    t = torch.arange(1, rates.shape[-1] + 1, device=rates.device)
    return torch.where((rates > 0).any(1), t, 0).max(1).values  # (n,T) -> (n,)


@torch.no_grad()
def generate(cfg, ddpm, dn, ae, mu, sigma, T, glm=None, lengths=None, chunk=700):
    """cfg.n_gen trials: z~ from the sampler, z = z~ sigma + mu, rates = decode(z), spikes ~ Poisson(rates); with the
    spike-history model also its spikes from the same rates. Plus cfg.n_long latents at 16x the training length.
    lengths (K,) of the training trials (lorenz-varlen): the cfg.n_gen requested lengths are drawn from them, plus
    four fixed lengths from len_min to T for the figure; no 16x-length samples."""
    n, d = cfg.n_gen, cfg.d_latent
    if lengths is not None:
        req = lengths[torch.randint(len(lengths), (n,)).to(lengths.device)]  # (n,) the training length distribution
        fixed = torch.linspace(cfg.len_min, T, 4).round().long().to(lengths.device)
        print(f"[sampling] {n} + 4 trials at requested lengths, {cfg.sample_steps} steps (eta {cfg.eta})")
        out = sample_at_lengths(cfg, ddpm, dn, ae, mu, sigma, req, T, chunk)
        out.update(lengths=req, lengths_generated=support_length(out["rates"]), lengths_fixed=fixed,
                   spikes_fixed=sample_at_lengths(cfg, ddpm, dn, ae, mu, sigma, fixed, T)["spikes"])
        return out
    print(f"[sampling] {n} trials, {cfg.sample_steps} steps (eta {cfg.eta}) + {cfg.n_long} at {16 * T} bins")
    out = sample_trials(cfg, ddpm, dn, ae, mu, sigma, n, T, chunk)
    out["z_long"] = ddpm.sample(dn, (cfg.n_long, d, 16 * T), cfg.sample_steps, cfg.eta) * sigma + mu
    if glm is not None:
        out["spikes_plain"] = out["spikes"]
        out["spikes"] = glm.sample(out["rates"], cfg.sh_cap).cpu()
    return out


def requested_angles(n_angles, n_per_angle):
    """The evaluation grid of reach directions: n_angles evenly spaced in [-pi, pi), each n_per_angle times. (n,)"""
    return np.repeat(-np.pi + 2 * np.pi * np.arange(n_angles) / n_angles, n_per_angle).astype(np.float32)


@torch.no_grad()
def generate_reach(cfg, ddpm, models, ae, mu, sigma, T, v_req, lap):
    """Conditioned trials (official sample_conditioned_on_angle / sample_with_velocity): the angle model at the
    requested directions, c = [cos theta, sin theta] at every sampler step; the velocity model with the held-out
    velocity traces v_req (n,2,T) (already divided by v_scale) as its extra channels at every step; lap(stage)
    after each."""
    gen = {}
    if "angle" in models:
        theta = torch.tensor(requested_angles(cfg.n_angles, cfg.n_per_angle))
        c = torch.stack([torch.cos(theta), torch.sin(theta)], 1).to(mu.device)  # (n,2)
        print(f"[sampling] {len(c)} angle-conditioned trials ({cfg.n_angles} directions), {cfg.sample_steps} steps")
        gen["angle"] = dict(sample_trials(cfg, ddpm, models["angle"], ae, mu, sigma, len(c), T, c=c), theta=theta)
        lap("sampling_angle")
    if "velocity" in models:
        print(f"[sampling] {len(v_req)} trials conditioned on held-out velocity traces, {cfg.sample_steps} steps")
        gen["velocity"] = sample_trials(cfg, ddpm, models["velocity"], ae, mu, sigma, len(v_req), T, extra=v_req)
        lap("sampling_velocity")
    return gen


# -----------------------------------------------------------------------------
# Evaluation (eval_utils.py, plotting notebooks): population spike count, correlations, ISIs, autocorrelograms
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
    """Model vs data statistics (eval_utils.py): KL(model||data) of the PSC KDEs on the shared grid 0..max, Pearson r of
    the KDE densities; r and RMSE over unique neuron pairs of the correlations and over neurons of the mean rate,
    mean ISI and std ISI. NOTE (choice): KDE densities floored at 1e-12 so the KL stays finite when a sample's
    counts leave the data's range;
    correlation RMSE over unique pairs (official divides by all N^2 entries incl. the zeroed upper triangle)."""
    grid = np.arange(max(model["psc"].max(), data["psc"].max()) + 1)
    p, q = kde_on_grid(model["psc"], grid), kde_on_grid(data["psc"], grid)
    il = np.tril_indices(len(data["rate"]), -1)               # unique pairs i > j
    out = dict(kl_psc=float(np.sum(p * np.log(np.maximum(p, 1e-12) / np.maximum(q, 1e-12)))), r_psc=pearson(p, q),
               r_corr=pearson(model["corr"][il], data["corr"][il]), rmse_corr=rmse(model["corr"][il], data["corr"][il]))
    for k in ("rate", "mean_isi", "std_isi"):
        out[f"r_{k}"], out[f"rmse_{k}"] = pearson(model[k], data[k]), rmse(model[k], data[k])
    return out


def latent_map(z, x):
    """Least-squares linear map (with intercept) from latents z (K,d,T) to the true Lorenz states x (K,3,T).
    Returns project(z') -> (K',3,T'), the latents written in Lorenz coordinates."""
    def rows(a):
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1])   # (K,c,T) -> (K*T, c)
    W = np.linalg.lstsq(np.c_[rows(z), np.ones(z.shape[0] * z.shape[2])], rows(x), rcond=None)[0]  # (d+1, 3)

    def project(zz):
        return (np.einsum("kdt,de->ket", zz, W[:-1]) + W[-1][None, :, None]).astype(np.float32)
    return project


def latent_r2(z_tr, x_tr, z_te, x_te):
    """Latent recovery: the linear map fit on training trials; R^2 = 1 - SSE/SST on held-out trials (pooled over
    the 3 states)."""
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


def lag_ratios(s, L=10):
    """rho_l = P(spike at t+l | spike at t) / P(spike), l = 1..L, pooled over neurons and trials:
    rho_l = sum_n sum_{k,t} s_{n,t} s_{n,t+l} / sum_n p_n sum_{k,t} s_{n,t}, with p_n the neuron's mean count per bin
    (1 for a Poisson process with a constant rate, < 1 for refractoriness). s (K,N,T) -> (L,)"""
    s = s.astype(np.float64)
    p = s.mean((0, 2))                                         # (N,)
    return np.array([(s[..., :-l] * s[..., l:]).sum() / (p * s[..., :-l].sum((0, 2))).sum() for l in range(1, L + 1)])


def group_acg(s, groups, L=10):
    """Group auto-correlograms (official plotting notebooks): per trial and neuron the temporal mean is removed,
    c_l = sum_t x_t x_{t+l} / T, averaged over trials and over the neurons of each group. -> (n_groups, L)"""
    x = s - s.mean(-1, keepdims=True)                          # (K,N,T)
    c = np.stack([(x[..., :-l] * x[..., l:]).sum(-1).mean(0) for l in range(1, L + 1)], -1) / s.shape[-1]  # (N,L)
    return np.stack([c[g].mean(0) for g in groups])


def acg_groups(corr, n_groups=4):
    """Neurons sorted by sum_j corr_ij^2 of the data (diagonal zeroed), cut into n_groups groups (official).
    NOTE (choice): descending order, most correlated neurons first."""
    c2 = np.nan_to_num(corr) ** 2
    np.fill_diagonal(c2, 0)
    return np.array_split(np.argsort(-c2.sum(1)), n_groups)


def evaluate(cfg, data, x, z_all, rates_hat, mu, sigma, gen):
    """Every metric of the run, computed from the samples it generated: generated vs real (training) trials, the AE
    reconstruction vs real, real vs real (two disjoint halves: the noise floor), the AE on test trials, latent
    recovery, sampling diagnostics; with spike history also LDNS alone and the autocorrelograms.
    Returns the metrics and the arrays the figures need."""
    if "lengths" in data:
        return evaluate_varlen(cfg, data, x, z_all, rates_hat, mu, sigma, gen)
    print("[evaluation]")
    tr, te = data["train"], data["test"]
    real, gen_s = data["spikes"][tr], gen["spikes"].cpu().numpy().astype(np.int64)
    ae_rec = torch.poisson(rates_hat[tr].cpu()).numpy().astype(np.int64)
    st_real, st_gen = spike_stats(real), spike_stats(gen_s)
    h = len(tr) // 2
    res = {"data/n_real": len(real), "data/n_generated": len(gen_s), "data/mean_count": float(real.mean())}
    st_half = spike_stats(real[h:])                            # reference half for the size-matched rows
    rows = {"gen_vs_real": (st_gen, st_real), "ae_vs_real": (spike_stats(ae_rec), st_real),
            "real_vs_real": (spike_stats(real[:h]), st_half),          # noise floor: two disjoint halves
            "gen_vs_real_half": (spike_stats(gen_s[:h]), st_half)}     # same sizes as the floor
    if "spikes_plain" in gen:
        rows["plain_vs_real"] = (spike_stats(gen["spikes_plain"].cpu().numpy().astype(np.int64)), st_real)
    for row, (a, b) in rows.items():
        res.update({f"{row}/{k}": v for k, v in compare(a, b).items()})
    res["ae/test_poisson_nll"] = float(F.poisson_nll_loss(rates_hat[te], x[te], log_input=False, full=True))
    if "rates" in data:
        res["ae/test_rate_mse"] = float(((rates_hat[te].cpu().numpy() - data["rates"][te]) ** 2).mean())
    z_np = z_all.cpu().numpy()
    if "latents" in data:
        res["ae/latent_r2"] = latent_r2(z_np[tr], data["latents"][tr], z_np[te], data["latents"][te])
    zn_gen = ((gen["z"] - mu) / sigma).cpu().numpy()
    res["diffusion/sampled_latent_std_max"] = float(zn_gen.std((0, 2)).max())  # ~1 if sampling is stable
    res["diffusion/sampled_latent_std_min"] = float(zn_gen.std((0, 2)).min())
    res["diffusion/mean_rate_generated"] = float(gen["rates"].mean())
    res["data/mean_rate_true"] = float(data["rates"][tr].mean()) if "rates" in data else float(real.mean())
    if "spikes_plain" in gen:
        res.update(autocorrelogram_metrics(real, gen["spikes_plain"].cpu().numpy(), gen_s, st_real["corr"]))
    return res, dict(st_real=st_real, st_gen=st_gen, z_gen=gen["z"].cpu().numpy(), z_long=gen["z_long"].cpu().numpy())


def valid_rows(a, lengths):
    """The valid bins of end-padded trials, trials concatenated: a (K,c,T), lengths (K,) -> (sum l, c)."""
    valid = np.arange(a.shape[2])[None] < lengths[:, None]      # (K,T)
    return a.transpose(0, 2, 1)[valid]                         # (K,c,T) -> (K,T,c) -> (sum l, c)


def masked_spike_stats(s, lengths):
    """spike_stats on the valid bins of end-padded trials s (B,N,T) with lengths (B,): PSC per valid (trial, bin),
    correlations and mean rates over the valid bins of all trials concatenated; ISI statistics within trials (the
    padding holds no spikes, so isi_stats of the padded array is already exact)."""
    X = valid_rows(s, lengths).astype(np.float64)              # (sum l, N)
    rate = X.mean(0)
    Xc = X - rate
    sd = np.sqrt((Xc ** 2).mean(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (Xc.T @ Xc / len(Xc)) / np.outer(sd, sd)        # np.corrcoef, NaN for silent neurons
    mean_isi, std_isi = isi_stats(s)
    return dict(psc=X.sum(1).astype(np.int64), corr=corr, rate=rate, mean_isi=mean_isi, std_isi=std_isi)


def length_buckets(len_min, len_max, n_buckets):
    """n_buckets contiguous integer length ranges [lo, hi] of (nearly) equal width covering len_min..len_max."""
    edges = np.linspace(len_min, len_max + 1, n_buckets + 1).round().astype(int)
    return [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:])]


def trial_mean_spread(zn, m):
    """Largest per-channel std over trials of the per-trial mean over valid bins (per-trial latent offsets).
    zn (K,d,T) normalised latents, m (K,1,T) their mask -> float."""
    tm = (zn * m).sum(-1) / m.sum(-1)                          # (K,d)
    return float(tm.std(0).max())


def length_rows(real, len_r, gen, len_g, ae_rec, lo, hi):
    """The rows of evaluate for the trials with lengths in lo..hi, on valid bins: generated, AE reconstruction and
    real-vs-real halves (the noise floor) against the real trials. End-padded counts (K,N,T) with lengths (K,) ->
    (metrics, dict(st_real, st_gen))."""
    r, g = np.nonzero((len_r >= lo) & (len_r <= hi))[0], np.nonzero((len_g >= lo) & (len_g <= hi))[0]
    h = len(r) // 2
    st_real, st_half = masked_spike_stats(real[r], len_r[r]), masked_spike_stats(real[r[h:]], len_r[r[h:]])
    st_gen = masked_spike_stats(gen[g], len_g[g])
    rows = {"gen_vs_real": (st_gen, st_real), "ae_vs_real": (masked_spike_stats(ae_rec[r], len_r[r]), st_real),
            "real_vs_real": (masked_spike_stats(real[r[:h]], len_r[r[:h]]), st_half),
            "gen_vs_real_half": (masked_spike_stats(gen[g[:h]], len_g[g[:h]]), st_half)}
    res = {"n_real": len(r), "n_generated": len(g)}
    for row, (a, b) in rows.items():
        res.update({f"{row}/{k}": v for k, v in compare(a, b).items()})
    return res, dict(st_real=st_real, st_gen=st_gen)


def evaluate_varlen(cfg, data, x, z_all, rates_hat, mu, sigma, gen):
    """evaluate for end-padded trials of different lengths (lorenz-varlen), on valid bins only: the rows of
    evaluate (generated, AE reconstruction and real-vs-real halves against the real training trials) for all
    lengths pooled and per length bucket (key prefix len_<lo>-<hi>/), trials assigned to a bucket by their length;
    the number of generated trials whose length differs from the requested one; AE, latent and sampling metrics."""
    print("[evaluation] per length bucket")
    tr, te, T = data["train"], data["test"], x.shape[-1]
    len_r, len_te, len_g = data["lengths"][tr], data["lengths"][te], gen["lengths_generated"].cpu().numpy()
    m = end_mask(torch.tensor(data["lengths"]).to(x.device), T)  # (K,1,T)
    real, gen_s = data["spikes"][tr], gen["spikes"].cpu().numpy().astype(np.int64)
    ae_rec = torch.poisson((rates_hat[tr] * m[tr]).cpu()).numpy().astype(np.int64)
    res = {"data/n_real": len(real), "data/n_generated": len(gen_s),
           "data/mean_count": float(valid_rows(real, len_r).mean()),
           "lengths/n_wrong_length": int((len_g != gen["lengths"].cpu().numpy()).sum())}  # requested vs generated
    pooled, run = length_rows(real, len_r, gen_s, len_g, ae_rec, cfg.len_min, T)  # all lengths
    res.update({k: v for k, v in pooled.items() if "/" in k})
    buckets = length_buckets(cfg.len_min, T, cfg.n_buckets)
    for lo, hi in buckets:
        rows = length_rows(real, len_r, gen_s, len_g, ae_rec, lo, hi)[0]
        res.update({f"len_{lo}-{hi}/{k}": v for k, v in rows.items()})
    nll = F.poisson_nll_loss(rates_hat[te], x[te], log_input=False, full=True, reduction="none")  # (K_te,N,T)
    res["ae/test_poisson_nll"] = float((nll * m[te]).sum() / (m[te].sum() * x.shape[1]))
    rates_np = rates_hat.cpu().numpy()
    err = valid_rows(rates_np[te], len_te) - valid_rows(data["rates"][te], len_te)  # (sum l, N)
    res["ae/test_rate_mse"] = float((err ** 2).mean())
    z_np = z_all.cpu().numpy()
    zv_tr, xv_tr = valid_rows(z_np[tr], len_r).T[None], valid_rows(data["latents"][tr], len_r).T[None]  # (1,c,sum l)
    zv_te, xv_te = valid_rows(z_np[te], len_te).T[None], valid_rows(data["latents"][te], len_te).T[None]
    res["ae/latent_r2"] = latent_r2(zv_tr, xv_tr, zv_te, xv_te)
    m_c = centre_mask(gen["lengths"], T)                       # (n,1,T)
    zn_gen = (gen["z"] - mu) / sigma                           # (n,d,T) centred
    zn_valid = zn_gen.permute(0, 2, 1)[m_c[:, 0] > 0].cpu().numpy()  # (n,d,T) -> (n,T,d) -> (sum l, d)
    res["diffusion/sampled_latent_std_max"] = float(zn_valid.std(0).max())  # ~1 if sampling is stable
    res["diffusion/sampled_latent_std_min"] = float(zn_valid.std(0).min())
    res["diffusion/trial_mean_std_max"] = trial_mean_spread(zn_gen, m_c)
    res["ae/trial_mean_std_max"] = trial_mean_spread((z_all[tr] - mu) / sigma, m[tr])
    res["diffusion/mean_rate_generated"] = float(valid_rows(gen["rates"].cpu().numpy(), len_g).mean())
    res["data/mean_rate_true"] = float(valid_rows(data["rates"][tr], len_r).mean())
    run.update(buckets=buckets, lengths_train=len_r, lengths_requested=gen["lengths"].cpu().numpy(),
               lengths_generated=len_g, spikes_fixed=gen["spikes_fixed"].cpu().numpy(),
               lengths_fixed=gen["lengths_fixed"].cpu().numpy())
    return res, run


def autocorrelogram_metrics(real, plain, sh, corr, L=10):
    """Lag ratios rho_1..rho_L and group autocorrelograms of the data, LDNS alone and LDNS + spike history, with
    the relative error of rho_1 and rho_2 against the data."""
    groups, res = acg_groups(corr), {}
    for name, s in (("data", real), ("ldns", plain), ("ldns_sh", sh)):
        rho = lag_ratios(s, L)
        res[f"acg/{name}/lag_ratio"] = rho.tolist()
        res[f"acg/{name}/group_acg"] = group_acg(s.astype(np.float64), groups, L).tolist()
        res[f"acg/{name}/lag1_ratio"], res[f"acg/{name}/lag2_ratio"] = float(rho[0]), float(rho[1])
    for name in ("ldns", "ldns_sh"):
        for lag in (1, 2):
            d = res[f"acg/data/lag{lag}_ratio"]
            res[f"acg/{name}/lag{lag}_rel_error"] = abs(res[f"acg/{name}/lag{lag}_ratio"] - d) / d
    return res


# -----------------------------------------------------------------------------
# Behaviour evaluation of --demo reach (official train_and_plot_diffusion_monkey_*_conditioned notebooks)
# -----------------------------------------------------------------------------
def bins_as_rows(a):
    """(K,C,T) -> (K*T, C): every time bin of every trial is one sample."""
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def fit_ridge(X, Y, alpha):
    """Ridge regression with an intercept (sklearn Ridge, fit_intercept=True): with centred Xc, Yc,
    W = (Xc^T Xc + alpha I)^-1 Xc^T Yc and b = mean(Y) - mean(X) W. X (M,N), Y (M,c) -> W (N,c), b (c,)."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return W, y_mean - x_mean @ W


def decode_velocity(rates, W, b):
    """The per-bin linear decoder v_hat(t) = W^T lambda(t) + b. rates (K,N,T) -> velocity (K,c,T)."""
    V = bins_as_rows(rates.astype(np.float64)) @ W + b         # (K*T, c)
    return V.reshape(rates.shape[0], rates.shape[2], -1).transpose(0, 2, 1)  # (K*T,c) -> (K,T,c) -> (K,c,T)


def r2_score(Y, Y_hat):
    """R^2 = 1 - SSE/SST per output over all trials and bins, averaged over outputs (sklearn r2_score). (K,c,T)."""
    Y, Y_hat = bins_as_rows(Y.astype(np.float64)), bins_as_rows(Y_hat.astype(np.float64))
    return float(np.mean(1 - ((Y - Y_hat) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)))


def trajectory(velocity):
    """Hand position from the velocity, p(t) = sum_{s<=t} v(s) dt (the official plots cumsum it). (K,2,T) -> m."""
    return np.cumsum(velocity, -1) * REACH_BIN_S


def reach_direction(velocity):
    """Direction of a (decoded) reach: the angle of its end point p(T-1).
    NOTE (choice): the paper compares decoded and requested reaches by eye; the end point is the least noisy single
    direction of a decoded trajectory. (K,2,T) -> (K,) radians."""
    end = trajectory(velocity)[:, :, -1]                       # (K,2)
    return np.arctan2(end[:, 1], end[:, 0])


def angular_error_deg(a, b):
    """|a - b| wrapped to [0, 180] degrees."""
    return np.abs(np.degrees(np.angle(np.exp(1j * (a - b)))))


def evaluate_reach(cfg, data, rates_hat, gen, v_req_trials):
    """--demo reach, the paper's behaviour evaluation: a ridge decoder (official alpha) from the AE-reconstructed
    rates of the real training trials to their velocity; its R^2 on the real held-out trials is the ceiling. Applied
    to the angle-conditioned samples (angular error of the decoded reach direction against the requested one) and
    to the velocity-conditioned samples (R^2 against the requested held-out traces). Spike statistics: angle-
    conditioned samples (their directions cover the circle evenly) vs the real training trials, a size-matched
    real-vs-real floor, and velocity-conditioned samples vs the held-out trials whose velocities they were given."""
    print("[evaluation]")
    tr, te, v = data["train"], data["test"], data["velocity"]
    dec = fit_ridge(bins_as_rows(rates_hat[tr].astype(np.float64)), bins_as_rows(v[tr]), cfg.ridge_alpha)
    v_dec_te = decode_velocity(rates_hat[te], *dec)
    res = {"behaviour/decoder_r2_real_test": r2_score(v[te], v_dec_te),
           "behaviour/real_test_angle_error_median_deg": float(np.median(angular_error_deg(
               reach_direction(v_dec_te), data["angle"][te])))}
    real = data["spikes"][tr]
    st_real, rows, run = spike_stats(real), {}, dict(v_req_trials=v_req_trials)
    if "angle" in gen:
        g = gen["angle"]
        v_dec = decode_velocity(g["rates"].cpu().numpy(), *dec)  # (n,2,T)
        err = angular_error_deg(reach_direction(v_dec), g["theta"].cpu().numpy())
        res.update({"angle/n_directions": cfg.n_angles, "angle/n_samples": len(err),
                    "angle/error_median_deg": float(np.median(err)),
                    "angle/error_p90_deg": float(np.percentile(err, 90))})
        s = g["spikes"].cpu().numpy().astype(np.int64)
        rows.update(angle_gen_vs_real=(spike_stats(s), st_real),
                    real_vs_real_size_matched=(spike_stats(real[:len(s)]), spike_stats(real[len(s):2 * len(s)])))
        run.update(st_gen=rows["angle_gen_vs_real"][0], v_dec_angle=v_dec)
    if "velocity" in gen:
        run["v_dec_velocity"] = decode_velocity(gen["velocity"]["rates"].cpu().numpy(), *dec)  # (n,2,T)
        r2 = r2_score(v[v_req_trials], run["v_dec_velocity"])
        res.update({"velocity/n_traces": len(v_req_trials), "velocity/r2_decoded_vs_requested": r2,
                    "velocity/r2_fraction_of_real_decoder": r2 / res["behaviour/decoder_r2_real_test"]})
        rows["velocity_gen_vs_real_test"] = (spike_stats(gen["velocity"]["spikes"].cpu().numpy().astype(np.int64)),
                                             spike_stats(data["spikes"][v_req_trials]))
    for row, (a, b) in rows.items():
        res.update({f"{row}/{k}": val for k, val in compare(a, b).items()})
    return res, run


# -----------------------------------------------------------------------------
# Figures (plotting_diffusion_Lorenz.ipynb, paper Fig. 2); matplotlib is imported here only
# -----------------------------------------------------------------------------
def make_figures(fig_dir, data, run, res):
    """1_data, 2_ae_fit, 3_latents_3d, 4_latent_psd, 5_stats (and 6_autocorrelograms with spike history; for
    lorenz-varlen 1, 2, 5 on all lengths pooled and 6_varlen).
    run: numpy arrays of the run (rates_hat, z_ae of test trials, z_gen, z_long, project, st_real, st_gen, ...)."""
    from matplotlib.figure import Figure
    ex, N = data["test"][0], data["spikes"].shape[1]
    s = data["spikes"][ex]
    # 1. data panel: true latents, true rates, spike raster of one held-out trial
    panels = [k for k in ("latents", "rates") if k in data] + ["spikes"]
    titles = {"latents": "Lorenz latents (z-scored)", "rates": "true rates", "spikes": "spikes"}
    fig = Figure(figsize=(10, 2.6 * len(panels)))
    for i, k in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        if k == "latents":
            ax.plot(data["latents"][ex].T)
        else:
            ax.imshow(data[k][ex], aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set(title=titles[k], xlabel="time bin", ylabel="state" if k == "latents" else "neuron")
    save_figure(fig, os.path.join(fig_dir, "1_data.png"))
    # 2. AE fit: predicted rates over the spikes for 4 neurons
    fig = Figure(figsize=(10, 6))
    for i, n in enumerate(sorted({0, N // 4, N // 2, N - 1})):
        ax = fig.add_subplot(4, 1, i + 1)
        ax.vlines(np.nonzero(s[n])[0], 0, s[n][s[n] > 0], color="0.6", label="spikes")
        ax.plot(run["rates_hat"][ex, n], "C1", label="AE rate")
        if "rates" in data:
            ax.plot(data["rates"][ex, n], "k--", lw=1, label="true rate")
        ax.set_ylabel(f"neuron {n}")
    ax.set_xlabel("time bin")
    ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"AE on a held-out trial; test rate MSE {res.get('ae/test_rate_mse', float('nan')):.4f}")
    save_figure(fig, os.path.join(fig_dir, "2_ae_fit.png"))
    if "buckets" in run:                                       # lorenz-varlen: no figures of fixed-length latents
        stats_panel(fig_dir, run["st_real"], run["st_gen"], res, "LDNS")
        varlen_figure(fig_dir, run, res)
        return
    if "reach" in run:                                         # --demo reach: the behaviour figures
        reach_figures(fig_dir, data, run, run["reach"])
        return
    # 3. latent trajectories in Lorenz coordinates (the latent-recovery map; raw channels for own data)
    fig = Figure(figsize=(13, 4.3))
    sets = [(run["z_ae"][:8], "AE latents"), (run["z_gen"][:8], "diffusion samples"),
            (run["z_long"][:1], f"diffusion, 16x length ({run['z_long'].shape[-1]} bins)")]
    for i, (z, title) in enumerate(sets):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        for zz in run["project"](z):
            ax.plot(zz[0], zz[1], zz[2], lw=0.6)
        ax.set(title=title, xlabel=run["axes"][0], ylabel=run["axes"][1], zlabel=run["axes"][2])
    save_figure(fig, os.path.join(fig_dir, "3_latents_3d.png"))
    # 4. latent power spectra per channel: median and 25-75% band, AE vs diffusion
    d = run["z_ae"].shape[1]
    fig = Figure(figsize=(3 * min(d, 4), 2.5 * math.ceil(d / 4)))
    for c in range(d):
        ax = fig.add_subplot(math.ceil(d / 4), min(d, 4), c + 1)
        for z, col, lab in ((run["z_ae"], "k", "AE"), (run["z_gen"], "C3", "LDNS")):
            P = latent_psd(z[:, c])[:, 1:]                      # (K, F) without the DC bin
            lo, med, hi = np.percentile(P, [25, 50, 75], axis=0)
            f = np.arange(1, P.shape[1] + 1) / z.shape[-1]
            ax.loglog(f, med, col, label=lab)
            ax.fill_between(f, lo, hi, color=col, alpha=0.2)
        ax.set(title=f"latent {c}", xlabel="cycles per bin")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(fig_dir, "4_latent_psd.png"))
    # 5. 2x2 statistics panel: data vs generated, with Pearson r
    stats_panel(fig_dir, run["st_real"], run["st_gen"], res, "LDNS + spike history" if "acg/data/lag1_ratio" in res
                else "LDNS")
    if "acg/data/lag1_ratio" in res:
        acg_figure(fig_dir, res)


def stats_panel(fig_dir, st_real, st_gen, res, label):
    """Paper Fig. 2 statistics: population spike count histogram + KDE, pairwise correlations, mean and std ISI."""
    from matplotlib.figure import Figure
    fig, il = Figure(figsize=(9, 8)), np.tril_indices(len(st_real["rate"]), -1)
    grid = np.arange(max(st_real["psc"].max(), st_gen["psc"].max()) + 1)
    ax = fig.add_subplot(2, 2, 1)
    for st, col, lab in ((st_real, "k", "data"), (st_gen, "C3", label)):
        ax.hist(st["psc"], bins=50, density=True, color=col, alpha=0.25)
        ax.plot(grid, kde_on_grid(st["psc"], grid), col, label=lab)
    ax.set(title=f"population spike count, r={res['gen_vs_real/r_psc']:.4f}", xlabel="spikes per bin",
           ylabel="density")
    ax.legend()
    for i, (k, name) in enumerate((("corr", "pairwise correlation"), ("mean_isi", "mean ISI (bins)"),
                                   ("std_isi", "std ISI (bins)"))):
        ax = fig.add_subplot(2, 2, i + 2)
        a, b = (st_real[k][il], st_gen[k][il]) if k == "corr" else (st_real[k], st_gen[k])
        ax.scatter(a, b, s=4, alpha=0.5)
        lim = [np.nanmin([a, b]), np.nanmax([a, b])]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(title=f"{name}, r={res['gen_vs_real/r_' + k]:.4f}", xlabel="data", ylabel=label)
    save_figure(fig, os.path.join(fig_dir, "5_stats.png"))


VARLEN_STATS = (("r_rate", "mean rate"), ("r_corr", "pairwise corr."), ("r_mean_isi", "mean ISI"),
                ("r_std_isi", "std ISI"), ("r_psc", "PSC density"))


def varlen_figure(fig_dir, run, res):
    """lorenz-varlen: rasters of generated trials of four lengths (padding shaded); Pearson r per length bucket,
    generated vs real (solid) and real vs real (dashed); histograms of training, requested and generated lengths."""
    from matplotlib.figure import Figure
    s, lengths = run["spikes_fixed"], run["lengths_fixed"]
    fig, T = Figure(figsize=(14, 7)), s.shape[-1]
    for i in range(len(s)):
        ax = fig.add_subplot(2, len(s), i + 1)
        ax.imshow(s[i], aspect="auto", cmap="Greys", interpolation="nearest", vmax=3)
        ax.axvspan(lengths[i] - 0.5, T - 0.5, color="C0", alpha=0.15)
        ax.set(title=f"generated, length {lengths[i]}", xlabel="time bin", ylabel="neuron" if i == 0 else None)
    ax = fig.add_subplot(2, 2, 3)
    pos = np.arange(len(run["buckets"]))
    for j, (k, name) in enumerate(VARLEN_STATS):
        ax.plot(pos, [res[f"len_{lo}-{hi}/gen_vs_real/{k}"] for lo, hi in run["buckets"]], "o-", color=f"C{j}",
                label=name)
        ax.plot(pos, [res[f"len_{lo}-{hi}/real_vs_real/{k}"] for lo, hi in run["buckets"]], "x--", color=f"C{j}",
                alpha=0.6)
    ax.set_xticks(pos)
    ax.set_xticklabels([f"{lo}-{hi}" for lo, hi in run["buckets"]])
    ax.set(title="Pearson r per length bucket: generated vs real (solid), real vs real (dashed)",
           xlabel="trial length (bins)", ylabel="r")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(2, 2, 4)
    edges = np.arange(min(run["lengths_train"].min(), run["lengths_requested"].min()), T + 2) - 0.5
    ax.hist(run["lengths_train"], bins=edges, density=True, color="0.6", alpha=0.5, label="training trials")
    ax.hist(run["lengths_requested"], bins=edges, density=True, histtype="step", lw=2, color="C0", label="requested")
    ax.hist(run["lengths_generated"], bins=edges, density=True, histtype="step", ls="--", color="C3",
            label="generated")
    ax.set(title="trial lengths", xlabel="length (bins)", ylabel="density")
    ax.legend(fontsize=8)
    save_figure(fig, os.path.join(fig_dir, "6_varlen.png"))


def acg_figure(fig_dir, res):
    """Lag ratios and group auto-correlograms (official plotting notebooks): data, LDNS, LDNS + spike history."""
    from matplotlib.figure import Figure
    names = (("data", "k", "data"), ("ldns", "C0", "LDNS"), ("ldns_sh", "C3", "LDNS + spike history"))
    G = len(res["acg/data/group_acg"])
    fig = Figure(figsize=(3.2 * (G + 1), 3.2))
    ax = fig.add_subplot(1, G + 1, 1)
    for name, col, lab in names:
        rho = res[f"acg/{name}/lag_ratio"]
        ax.plot(range(1, len(rho) + 1), rho, col, marker=".", label=lab)
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set(title="P(spike at t+l | spike at t) / P(spike)", xlabel="lag l (bins)", ylabel="ratio")
    ax.legend(fontsize=7)
    for g in range(G):
        ax = fig.add_subplot(1, G + 1, g + 2)
        for name, col, lab in names:
            c = res[f"acg/{name}/group_acg"][g]
            ax.plot(range(1, len(c) + 1), c, col, marker=".", label=lab)
        ax.set(title=f"group {g + 1} auto-correlogram", xlabel="lag (bins)", ylabel="autocovariance")
    save_figure(fig, os.path.join(fig_dir, "6_autocorrelograms.png"))


def reach_figures(fig_dir, data, run, gen):
    """--demo reach (paper Fig. 5): 6_reach_angle_fan (real held-out reaches and decoded angle-conditioned samples,
    coloured by angle), 7_reach_velocity (requested vs decoded held-out trajectories and speeds), 8_reach_raster
    (one angle-conditioned trial, neurons sorted by preferred direction)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    hsv, norm, te = colormaps["hsv"], Normalize(-np.pi, np.pi), data["test"]
    if "angle" in gen:
        g = gen["angle"]
        fig = Figure(figsize=(10, 4.6))
        panels = ((trajectory(data["velocity"][te]), data["angle"][te], "real held-out reaches"),
                  (trajectory(run["v_dec_angle"]), g["theta"].cpu().numpy(),
                   "decoded, angle-conditioned samples"))
        for i, (p, angle, title) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            for pk, ak in zip(p, angle):
                ax.plot(pk[0], pk[1], color=hsv(norm(ak)), lw=0.7, alpha=0.6)
            ax.set(title=title, xlabel="x (m)", ylabel="y (m)", aspect="equal")
        fig.colorbar(ax.scatter([], [], c=[], cmap=hsv, norm=norm), ax=ax).set_label("requested angle (rad)")
        save_figure(fig, os.path.join(fig_dir, "6_reach_angle_fan.png"))
        fig = Figure(figsize=(10, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        ax.imshow(g["spikes"][0].cpu().numpy()[np.argsort(data["pref_dir"])], aspect="auto", cmap="Greys",
                  interpolation="nearest", vmax=3)
        ax.set(title=f"generated trial, requested angle {np.degrees(g['theta'][0].item()):.0f} deg",
               xlabel="time bin", ylabel="neuron (by preferred direction)")
        save_figure(fig, os.path.join(fig_dir, "8_reach_raster.png"))
    if "velocity" in gen:
        n = min(6, len(run["v_req_trials"]))
        v_req = data["velocity"][run["v_req_trials"][:n]]
        v_dec = run["v_dec_velocity"][:n]
        fig = Figure(figsize=(10, 4.6))
        ax = fig.add_subplot(1, 2, 1)
        for i, (pr, pd) in enumerate(zip(trajectory(v_req), trajectory(v_dec))):
            ax.plot(pr[0], pr[1], color=f"C{i}", lw=2.5, alpha=0.5)
            ax.plot(pd[0], pd[1], color=f"C{i}", lw=1, ls="--")
        ax.set(title="held-out: requested (thick), decoded (dashed)", xlabel="x (m)", ylabel="y (m)", aspect="equal")
        ax = fig.add_subplot(1, 2, 2)
        for i in range(min(3, n)):
            ax.plot(np.hypot(*v_req[i]), color=f"C{i}", lw=2.5, alpha=0.5)
            ax.plot(np.hypot(*v_dec[i]), color=f"C{i}", lw=1, ls="--")
        ax.set(title="speed: requested vs decoded", xlabel="time bin", ylabel="speed (m/s)")
        save_figure(fig, os.path.join(fig_dir, "7_reach_velocity.png"))


# -----------------------------------------------------------------------------
# Outputs and the pipeline
# -----------------------------------------------------------------------------
def write_outputs(cfg, weights, samples, res, clock):
    """State dicts {file name: state dict} (on the CPU), samples.npz (counts as int16 when they fit), timing.json,
    and metrics.json last; each file written atomically."""
    for name, sd in weights.items():
        save_atomic(os.path.join(cfg.out, name), lambda f, sd=sd: torch.save({k: v.cpu() for k, v in sd.items()}, f))
    ints = [a for a in samples.values() if np.issubdtype(a.dtype, np.integer)]
    dt = np.int16 if max(a.max() for a in ints) < 2 ** 15 else np.int64
    samples = {k: a.astype(dt) if np.issubdtype(a.dtype, np.integer) else a for k, a in samples.items()}
    save_atomic(os.path.join(cfg.out, "samples.npz"), lambda f: np.savez_compressed(f, **samples))
    clock.lap("figures_and_outputs")
    clock.times["total"] = round(sum(clock.times.values()), 2)
    write_json(os.path.join(cfg.out, "timing.json"), clock.times)
    write_json(os.path.join(cfg.out, "metrics.json"), res)    # last, atomically


def lorenz_outputs(cfg, data, ae, dn, mu, sigma, gen, run, res, clock):
    """Figures, ae.pt, denoiser.pt (with the latent normalisation), samples.npz (real = training trials, generated;
    LDNS alone with spike history; the lengths for lorenz-varlen), timing.json, metrics.json."""
    make_figures(os.path.join(cfg.out, "figures"), data, run, res)
    samples = dict(real=data["spikes"][data["train"]], generated=gen["spikes"].cpu().numpy().astype(np.int64))
    if "spikes_plain" in gen:
        samples["generated_plain"] = gen["spikes_plain"].cpu().numpy().astype(np.int64)
    if "lengths" in data:                                      # lorenz-varlen: end-padded trials and their lengths
        samples.update(lengths_real=data["lengths"][data["train"]], lengths_generated=run["lengths_generated"])
    weights = {"ae.pt": ae.state_dict(), "denoiser.pt": {**dn.state_dict(), "latent_mu": mu, "latent_sigma": sigma}}
    write_outputs(cfg, weights, samples, res, clock)


def run_reach(cfg, data, ae, rates_hat, mu, sigma, zn_tr, clock):
    """--demo reach, stages 2-5 on the AE and latent normalisation of the run: the conditional denoisers, trials
    at the requested angles and at held-out velocity traces never used in training, the behaviour evaluation,
    figures and outputs (samples.npz: real, generated = angle-conditioned (velocity-conditioned without an angle
    model), generated_velocity and the conditions; the time per stage also in metrics.json)."""
    v = torch.tensor(data["velocity"]).to(mu.device)           # (K,2,T) m/s
    ddpm, models, v_scale = train_reach_denoisers(cfg, zn_tr, v[data["train"]], clock.lap)
    v_req_trials = data["test"][:cfg.n_vel]                    # held-out: their trajectories are never trained on
    gen = generate_reach(cfg, ddpm, models, ae, mu, sigma, v.shape[-1], v[v_req_trials] / v_scale, clock.lap)
    res, run = evaluate_reach(cfg, data, rates_hat.cpu().numpy(), gen, v_req_trials)
    clock.lap("evaluation")
    make_figures(os.path.join(cfg.out, "figures"), data, dict(run, rates_hat=rates_hat.cpu().numpy(), reach=gen), res)
    clock.lap("figures")
    res.update({f"time_s/{k}": t for k, t in clock.times.items()})
    first = gen.get("angle", gen.get("velocity"))
    samples = dict(real=data["spikes"][data["train"]], generated=first["spikes"].cpu().numpy().astype(np.int64))
    if "angle" in gen:
        samples["angle_requested"] = gen["angle"]["theta"].cpu().numpy()
    if "velocity" in gen:
        samples.update(generated_velocity=gen["velocity"]["spikes"].cpu().numpy().astype(np.int64),
                       velocity_requested=data["velocity"][v_req_trials], velocity_requested_trials=v_req_trials)
    weights = {"ae.pt": ae.state_dict(), **{f"denoiser_{k}.pt": {**m.state_dict(), "latent_mu": mu, "latent_sigma":
               sigma, "velocity_scale": v_scale.reshape(1)} for k, m in models.items()}}
    write_outputs(cfg, weights, samples, res, clock)
    return res


def setup(cfg):
    """Threads, seeds and the device; a warning when the paper's scale is asked for on a CPU."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    if cfg.preset == "paper" and device.type == "cpu":
        print(f"WARNING: --paper is the official scale ({cfg.n_trials} trials x {cfg.n_bins} bins, AE {cfg.ae_steps} "
              f"steps and denoiser {cfg.dn_steps} steps of batch {cfg.ae_batch}, {cfg.n_gen} trials x "
              f"{cfg.sample_steps} sampler steps): days on a CPU, hours on one GPU. Use --device cuda.")
    return device


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    device, clock = setup(cfg), Stopwatch()
    data = make_data(cfg)                                      # validated before anything is written
    prepare_out(cfg.out)
    write_json(os.path.join(cfg.out, "config.json"), run_info(cfg, device))
    x = torch.tensor(data["spikes"], dtype=torch.float32).to(device)  # (K,N,T)
    tr, T = data["train"], x.shape[-1]
    len_tr = torch.tensor(data["lengths"][tr]).to(device) if "lengths" in data else None  # (K_tr,) lorenz-varlen
    clock.lap("data")
    ae = train_autoencoder(cfg, x[tr], len_tr)                 # 1) autoencoder with coordinated dropout
    z_all = batched(ae.encode, x)                              # (K,d,T), raw spikes in, no mask
    rates_hat = batched(ae.decode, z_all)                      # (K,N,T)
    clock.lap("autoencoder")
    mu, sigma, zn_tr, m_tr = latents_for_diffusion(z_all[tr], len_tr, clip=cfg.demo != "reach")  # 2) latents
    if cfg.demo == "reach":                                    # 2-5) the conditional models of Sec. 4.4
        return report(run_reach(cfg, data, ae, rates_hat, mu, sigma, zn_tr, clock), clock, cfg.out)
    ddpm, dn = train_denoiser(cfg, zn_tr, m_tr)
    clock.lap("diffusion_train")
    glm = None
    if cfg.spike_history:                                      # 3) the spike-history observation model
        glm = fit_spike_history(cfg, x[tr], rates_hat[tr])
        clock.lap("spike_history")
    gen = generate(cfg, ddpm, dn, ae, mu, sigma, T, glm, len_tr)  # 4) new trials
    clock.lap("sampling")
    res, run = evaluate(cfg, data, x, z_all, rates_hat, mu, sigma, gen)  # 5) statistics vs the real trials
    clock.lap("evaluation")
    run.update(rates_hat=rates_hat.cpu().numpy(), z_ae=z_all[data["test"]].cpu().numpy(),
               **latent_axes(data, z_all.cpu()))
    lorenz_outputs(cfg, data, ae, dn, mu, sigma, gen, run, res, clock)
    return report(res, clock, cfg.out)


def report(res, clock, out):
    """Print the metrics and the time per stage; return the metrics."""
    print("\nmetric" + " " * 36 + "value")
    for k, v in res.items():
        if not isinstance(v, list):
            print(f"  {k:<40} {v:.4g}" if isinstance(v, float) else f"  {k:<40} {v}")
    print(f"time per stage (s): {clock.times}\noutputs in {out}")
    return res


def latent_axes(data, z_all):
    """How figure 3 draws latents: in Lorenz coordinates through the latent-recovery map fit on training trials,
    or, for own data, as three raw latent channels."""
    if "latents" in data:
        return dict(project=latent_map(z_all[data["train"]].cpu().numpy(), data["latents"][data["train"]]),
                    axes=("Lorenz x", "Lorenz y", "Lorenz z"))
    dims = [1, 5, 3] if z_all.shape[1] >= 6 else list(range(min(3, z_all.shape[1]))) * 3
    return dict(project=lambda z: z[:, dims[:3]], axes=tuple(f"latent {c}" for c in dims[:3]))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # bad input or a diverged run: one sentence, exit status 1
        sys.exit(f"error: {e}")
