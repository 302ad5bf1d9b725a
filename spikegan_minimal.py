"""Spike-GAN: minimal single-file reference for Molano-Mazon, Onken, Piasini & Panzeri, "Synthesizing realistic
neural population activity patterns using Generative Adversarial Networks", ICLR 2018 (arXiv:1803.00338).
Self-contained: torch + numpy (matplotlib for figures only).

A WGAN-GP whose critic and generator are 1-D convolutions over time with neurons as channels (the paper's
"semi-convolutional" design), trained on binary spike patterns x in {0,1}^(N x T). The generator outputs spike
probabilities that are Bernoulli-sampled for evaluation only. Every run scores Spike-GAN, a dichotomized-Gaussian
(DG) baseline and the real-vs-real noise floor against held-out data; importance maps show which spikes the
critic relies on. Paper / official code (github.com/manuelmolano/Spike-GAN) -> code:
  data, Fig 2 and 4       refractory_soft, refractory_hard, make_uniform, make_packets   (tflib/sim_pop_activity.py)
  model, Fig 1            Critic, Generator, init_weights                                (model_conv.py)
  WGAN-GP loss, training  gradient_penalty, critic_loss, generator_loss, train  (Gulrajani et al. 2017; main_conv.py)
  statistics, Fig 2/S5    binarize, spike_stats, compare, memorisation                   (tflib/analysis.py)
  DG baseline, Fig 3/S6   Phi2, fit_dg, sample_dg          (Macke et al. 2009, spatio-temporal: Lyamzin et al. 2010)
  importance maps, Fig 4  importance_map, packet_template                (tflib/spike_relevance_analysis.py)
Markers: "NOTE (deviation)" marks where this file differs from the paper or the official code, and why;
"NOTE (choice)" marks a detail that the paper and the code leave open.
Randomness: every random draw is made on the CPU (torch's global generator seeded by set_seed, a seeded CPU
torch.Generator, or numpy's default_rng) and then moved to the device, so one seed gives the same draws on CPU, CUDA
and MPS. Models are built on the CPU, then moved. Float sums depend on the thread count, so same-seed runs give
identical numbers at the same --threads.

Run (a 2-core x86 CPU VM, both cores, seed 0; numbers against the held-out data; GPU times not measured):
  python spikegan_minimal.py                 # 5 min, 3000 iterations: rate r 0.98, covariance r 0.90, k-statistics
                                             #   L1 0.093 (real-vs-real 0.0017), lag-1 ratio 1.24 (data 0.10)
  python spikegan_minimal.py --long          # 19 min, 15000 iterations: covariance r 0.97, lag-1 ratio 0.78
  python spikegan_minimal.py --demo packets  # 8 min, 6000 iterations: importance inside / outside the packets 2.47
  python spikegan_minimal.py --quick         # 10 s smoke test (numbers meaningless)
  python spikegan_minimal.py --paper         # the paper's Fig 2 job (T 128, F 128, 300000 iterations), for a GPU
Left out: the MLP-GAN comparison (Fig 2), k-pairwise MaxEnt samples (Fig 3), the pattern-probability check (Fig S1).
Shapes: S samples, B batch, N neurons, T time bins, C channels, F width multiplier, Z = 128 latent dims.
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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Config: one dataclass, the demos and the named presets
# -----------------------------------------------------------------------------
@dataclass
class Config:
    demo: str = "uniform"      # uniform (correlated groups + refractoriness, Fig 2) | packets (Fig 4)
    preset: str = ""           # set from --quick / --long / --paper
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda | mps
    out: str = ""              # output folder; "" -> runs/spikegan_minimal-<demo>
    data: str = ""             # own data: .npy or .npz (key "spikes"), binary (trials, N, T) or (time, N)
    threads: int = 0           # torch CPU threads; 0 -> torch default
    # data: the paper's Fig 2 parameters (f 0.25, c 0.3, groups of 2, refractory 2, 2^13 training samples)
    # NOTE (deviation): T 32 bins instead of 128 (CPU size; --paper: 128). The refractory statistics of the data
    # depend on T: the dip in P(spike t+1 | spike t) is deeper in longer samples.
    neurons: int = 16          # N
    window: int = 32           # T, bins per sample; also the window cut from a long --data series
    stride: int = 0            # stride between windows of a long --data series; 0 -> window (non-overlapping)
    n_train: int = 8192        # training samples (paper 2^13)
    n_test: int = 4096         # held-out samples (the repo's dev set has 2048; more lowers the noise floor)
    rate: float = 0.25         # f: spike probability per bin before the refractory rule
    corr: float = 0.3          # c: within-group correlation parameter (copy probability q = sqrt(c))
    group: int = 2             # neurons per correlated group / per packet
    refr: float = 2.0          # rho: soft refractory period (bins)
    packet_prob: float = 0.1   # packet onset probability per bin (packets demo)
    # model. NOTE (deviation): CPU widths; the paper uses F 128 for both nets (--paper). The critic's
    # double-backward gradient penalty runs critic_iters times per iteration, so the critic is the narrower one.
    d_features: int = 16       # critic F: channels 2F, 4F (paper Fig 1: F 128 -> 256 and 512 channels)
    g_features: int = 48       # generator F: channels 4F, 2F, N
    layers: int = 2            # L conv layers in critic and generator
    kernel: int = 5            # kernel width (odd)
    z_dim: int = 128           # Z (fixed at 128 in the repo)
    # training: WGAN-GP with lambda 10, 5 critic steps per generator step, Adam betas (0, 0.9), batch 64
    # NOTE (deviation): lr 4e-3 decayed linearly to 0 (lr_at) instead of the paper's constant 1e-4: with ~1% of the
    # paper's iterations a constant 1e-4 is too slow; the decay (as in Gulrajani et al.'s CIFAR code) lets the last
    # snapshot settle. --paper: 1e-4, constant.
    iters: int = 3000          # generator iterations (repo default 300000)
    batch: int = 64
    lr: float = 4e-3           # Adam learning rate for both nets
    lr_decay: bool = True      # linear decay to 0 over `iters`; off: constant (paper)
    critic_iters: int = 5
    lambd: float = 10.0        # gradient-penalty weight lambda
    eval_every: int = 250      # log statistics of fresh samples every this many generator iterations
    # evaluation
    n_gen: int = 8192          # generated (and DG) samples scored against the held-out set (repo: 8192)
    importance: int = 0        # samples for importance maps (0 = skip; packets demo: 512)
    pattern: int = 8           # P: width of the shuffled window (paper Fig 4: 8, step 1)
    shuffles: int = 5          # shuffles per window


# NOTE (choice): the packets demo (Fig 4: f 0.1, groups of 8) trains 6000 iterations.
DEMOS = {"uniform": {}, "packets": dict(rate=0.1, group=8, importance=512, iters=6000)}
# --paper: the paper's Fig 2 run (with --demo packets --neurons 32 --window 64: the Fig 4 sizes). NOTE (choice): the
# repo's default 300000 iterations (the paper does not state its count), logged every 20000 as main_conv.py does; a
# held-out set of the repo's dev-set size, num_samples / 4.
PRESETS = {
    "quick": (dict(n_train=1024, n_test=512, n_gen=1024, iters=60, d_features=8, g_features=8, eval_every=30),
              "tiny end-to-end smoke test (numbers meaningless)"),
    "long": (dict(iters=15000, eval_every=500), "15000 generator iterations"),
    "paper": (dict(window=128, n_train=8192, n_test=2048, d_features=128, g_features=128, lr=1e-4, lr_decay=False,
                   batch=64, critic_iters=5, iters=300000, eval_every=20000, n_gen=8192),
              "the paper's Fig 2 configuration (T 128, critic 256/512 channels, generator F 128, lr 1e-4 constant, "
              "300000 iterations): a GPU job"),
}
CHOICES = dict(demo=tuple(DEMOS), device=("auto", "cpu", "cuda", "mps"), preset=("", *PRESETS))
POSITIVE_FIELDS = ("neurons", "window", "n_train", "n_test", "group", "d_features", "g_features", "layers", "kernel",
                   "z_dim", "iters", "batch", "lr", "critic_iters", "eval_every", "n_gen", "pattern", "shuffles")


def check_config(cfg: Config):
    """Spike-GAN's own CLI checks (the shared ones are in parse_args)."""
    if cfg.preset == "quick":
        cfg.importance = min(cfg.importance, 32)                           # quick: few importance maps, if any
    if min(cfg.stride, cfg.importance, cfg.threads) < 0:
        return "--stride, --importance and --threads must be >= 0"
    if cfg.kernel % 2 == 0:
        return f"--kernel must be odd, got {cfg.kernel}"
    if not (0 < cfg.rate <= 2 / 3 and 0 <= cfg.corr <= 2 / 3 and 0 < cfg.packet_prob < 1):
        return "--rate and --corr must lie in (0, 2/3] (they are drawn up to 1.5x), --packet-prob in (0, 1)"
    if not cfg.data and (cfg.window % 2 ** cfg.layers or cfg.group > cfg.neurons or 2 * cfg.group > cfg.window):
        return "--window must be a multiple of 2^layers, --group <= --neurons and 2 * --group <= --window"
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
# Data (step 1): the repo's simulators (tflib/sim_pop_activity.py), vectorised over rows; datasets are (S, N, T) bool
# -----------------------------------------------------------------------------
def refractory_soft(x: np.ndarray, f: np.ndarray, rho: float, rng) -> np.ndarray:
    """The repo's soft refractory rule on rows x (R, T) with per-row rate f (R,).

    Prepend a 2T-bin margin (each bin a spike with prob 1 - e^-f, so the rule also acts across the sample start),
    then repeat passes: every inter-spike interval d is flagged with prob exp(-d / sigma^2), sigma = rho / 1.5, and
    the later spikes of all flagged intervals are deleted at once. A row stops after its first pass that flags
    nothing; the last T bins are returned. Every interval is redrawn on every pass, so the suppression at d = 1
    (0.57 per pass for rho 2) compounds into a deep dip.
    NOTE (deviation): the repo's first pass deletes the wrong spike (an indexing bug, nearly always inside the
    margin); we apply every pass as intended. The effect on the statistics is negligible.
    """
    R, T = x.shape
    sigma2 = (rho / 1.5) ** 2
    s = np.concatenate([rng.random((R, 2 * T)) < 1 - np.exp(-f)[:, None], x], axis=1)  # (R, 3T)
    t = np.arange(3 * T)
    rows = np.arange(R)                                           # rows still being processed
    while rows.size:
        r = s[rows]
        last = np.maximum.accumulate(np.where(r, t, -1), axis=1)  # last spike at or before t
        prev = np.concatenate([np.full((rows.size, 1), -1), last[:, :-1]], axis=1)  # last spike before t
        flag = r & (prev >= 0) & (rng.random(r.shape) < np.exp(-(t - prev) / sigma2))
        s[rows] = r & ~flag
        rows = rows[flag.any(1)]                                  # stop after the first clean pass
    return s[:, 2 * T:]


def refractory_hard(x: np.ndarray, f: float, rho_h: int, rng) -> np.ndarray:
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


def make_params(cfg: Config, rng) -> dict:
    """Per-dataset draws: rates f and correlations c per group (uniform) or rates per neuron (packets), each
    ~ U[0.5 x, 1.5 x], and one random neuron permutation that hides the groups."""
    G = cfg.neurons // cfg.group
    if cfg.demo == "uniform":
        return dict(f=rng.uniform(0.5 * cfg.rate, 1.5 * cfg.rate, G), c=rng.uniform(0.5 * cfg.corr, 1.5 * cfg.corr, G),
                    perm=rng.permutation(cfg.neurons))
    return dict(f=rng.uniform(0.5 * cfg.rate, 1.5 * cfg.rate, cfg.neurons), perm=rng.permutation(cfg.neurons))


def make_uniform(cfg: Config, S: int, prm: dict, rng) -> np.ndarray:
    """Correlated groups with refractoriness (repo spike_trains_corr, Fig 2 data). For each group of s neurons:
    Bernoulli(f_g) members; a Bernoulli(f_g) reference train made refractory; each member bin copies the reference
    bin (0 or 1) with prob q = sqrt(c_g), so two members correlate at ~c_g; then each member is made refractory."""
    N, T, s, G = cfg.neurons, cfg.window, cfg.group, cfg.neurons // cfg.group
    f = prm["f"]
    B = rng.random((S, G, s, T)) < f[:, None, None]                           # members ~ Bernoulli(f_g)
    Rf = np.broadcast_to(f, (S, G)).ravel()
    Ref = refractory_soft(rng.random((S * G, T)) < Rf[:, None], Rf, cfg.refr, rng).reshape(S, G, 1, T)
    M = rng.random((S, G, s, T)) < np.sqrt(prm["c"])[:, None, None]           # copy mask, q = sqrt(c_g)
    B = np.where(M, Ref, B)                                                   # (S, G, s, T)
    Bf = np.broadcast_to(f[:, None], (S, G, s)).ravel()
    B = refractory_soft(B.reshape(-1, T), Bf, cfg.refr, rng)                  # (S*G*s, T)
    x = np.zeros((S, N, T), bool)
    x[:, :G * s] = B.reshape(S, G * s, T)                                     # leftover neurons stay silent
    return x[:, prm["perm"]]


def make_packets(cfg: Config, S: int, prm: dict, rng, test: bool = False) -> np.ndarray:
    """Refractory Bernoulli background plus sequential packets (repo spike_train_packets, one mode, Fig 4): at each
    onset t0 neuron k of a group fires at t0 + k (a diagonal sweep); onsets are more than `group` bins apart.
    test=True gives the importance-map test set (repo spike_train_transient_packets): packets in group 0 only, onset
    prob 0.2, onsets kept in [T/4, T/2] (the paper's [16, 32] at T 64)."""
    N, T, s = cfg.neurons, cfg.window, cfg.group
    f = np.tile(prm["f"], S)
    x = refractory_soft(rng.random((S * N, T)) < f[:, None], f, cfg.refr, rng).reshape(S, N, T)   # background
    G, p_on = (1, 0.2) if test else (N // s, cfg.packet_prob)
    on = rng.random((S * G, T)) < p_on
    on[:, T - s:] = False                                                     # the packet must fit
    on = refractory_hard(on, p_on, s, rng).reshape(S, G, T)
    if test:
        on[:, :, :T // 4] = on[:, :, T // 2 + 1:] = False
    pk = np.zeros((S, G, s, T), bool)
    for k in range(s):
        pk[:, :, k, k:] = on[:, :, :T - k]                                    # neuron g*s+k fires at t0 + k
    x[:, :G * s] |= pk.reshape(S, G * s, T)                                   # packet spikes OR-ed on the background
    return x[:, prm["perm"]]


def cut_windows(a: np.ndarray, W: int, stride: int) -> np.ndarray:
    """A long series (time, N) -> windows (S, N, W) of W bins, one every `stride` bins."""
    idx = np.arange(0, len(a) - W + 1, stride)[:, None] + np.arange(W)      # (S, W) bin indices
    return a[idx].transpose(0, 2, 1)                                        # (S, W, N) -> (S, N, W)


def load_spikes(cfg: Config, rng):
    """Own data (load_arrays, key 'spikes'): binary windows (trials, N, T), or one long binary series (time, N) cut
    into windows of `window` bins every `stride` bins. Holds out 20%: the last 20% of the series in time (before
    cutting, so no window is shared), or a random 20% of the trials. Anything Spike-GAN cannot train on is a
    ValueError naming the file, what was expected and what was found, before any output is written."""
    path = cfg.data
    arrays = load_arrays(path)
    if "spikes" not in arrays:
        raise ValueError(f"--data {path}: expected an array named 'spikes', found {sorted(arrays)}")
    x = arrays["spikes"]
    want = f"--data {path}: expected"
    if x.ndim not in (2, 3) or x.size == 0:
        raise ValueError(f"{want} a non-empty (trials, neurons, bins) or (time, neurons) array, found shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"{want} binary spikes, found {int((~np.isfinite(x)).sum())} NaN or inf values")
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{want} binary spikes (0 or 1 in every bin), found the values {np.unique(x)[:8]}; "
                         "binarise counts first, e.g. (counts > 0)")
    x = x.astype(bool)
    if not x.any():
        raise ValueError(f"{want} some spikes, found none (every bin is 0)")
    always = np.flatnonzero(x.all(axis=(0, 2) if x.ndim == 3 else 0))       # neurons that spike in every bin
    if always.size:
        raise ValueError(f"{want} spike trains with silent bins, found neurons {always[:8].tolist()} spiking in every "
                         "bin (a constant channel such as a marker, or an inverted raster?)")
    if x.ndim == 3:
        x = x[rng.permutation(len(x))]
        train = x[len(x) // 5:]
        test = x[:len(x) // 5]
    else:
        cut = int(len(x) * 0.8)
        train = cut_windows(x[:cut], cfg.window, cfg.stride or cfg.window)
        test = cut_windows(x[cut:], cfg.window, cfg.stride or cfg.window)
    T = train.shape[2]
    if T % 2 ** cfg.layers:
        raise ValueError(f"{want} bins per sample a multiple of 2^layers = {2 ** cfg.layers}, found {T} "
                         "(choose --window, or cut the trials)")
    if len(train) < 2 * cfg.batch or len(test) < 16:
        hint = (f"; a (time, neurons) array has time first, and this one has {x.shape[0]} bins of {x.shape[1]} "
                "neurons: transpose it?" if x.ndim == 2 and x.shape[1] > x.shape[0] else "")
        raise ValueError(f"{want} at least {2 * cfg.batch} training and 16 held-out samples, found {len(train)} and "
                         f"{len(test)} (use a smaller --window or --stride, or more data){hint}")
    if not train.any():
        raise ValueError(f"{want} spikes in the training part (the first 80%), found none")
    return train, test


def load_data(cfg: Config, rng) -> dict:
    """Step 1. The dataset: train and test (S, N, T) bool, the simulator's draws prm (None for --data) and the
    held-out statistics st_test. Simulated from rng, or loaded and checked by load_spikes."""
    print(f"[data] {cfg.data or 'demo ' + cfg.demo}")
    prm = None
    if cfg.data:
        train, test = load_spikes(cfg, rng)
    else:
        prm = make_params(cfg, rng)
        make = make_uniform if cfg.demo == "uniform" else make_packets
        train = make(cfg, cfg.n_train, prm, rng)
        test = make(cfg, cfg.n_test, prm, rng)
    print(f"  train {train.shape}, held-out {test.shape}, spike probability per bin {train.mean():.3f}")
    return dict(train=train, test=test, prm=prm, st_test=spike_stats(test))


# -----------------------------------------------------------------------------
# Model (step 2; paper Fig 1, model_conv.py): neurons are channels, convolutions run over time
# -----------------------------------------------------------------------------
class Critic(nn.Module):
    """L x [Conv1d(stride 2, 'same') -> LeakyReLU(0.2)] -> flatten -> Linear -> scalar. No normalisation layers
    (they would couple the samples of a batch and break the per-sample gradient penalty), no output nonlinearity."""

    def __init__(self, N: int, T: int, F_: int, L: int = 2, k: int = 5):
        super().__init__()
        ch = [N] + [F_ * 2 ** l for l in range(1, L + 1)]                    # N, 2F, 4F
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
    LeakyReLU] -> sigmoid, read as the spike probability of each (neuron, bin). These are resize-convolutions, not
    transposed convolutions, and the last LeakyReLU sits before the sigmoid (probabilities near 0 need 5x more
    negative inputs), as in the repo. Upsampling makes adjacent bins near-copies, so a refractory dip (a spike at t,
    none at t+1) needs saturated, parity-dependent outputs."""

    def __init__(self, N: int, T: int, F_: int, L: int = 2, k: int = 5, z_dim: int = 128):
        super().__init__()
        ch = [F_ * 2 ** l for l in range(L, 0, -1)] + [N]                  # 4F, 2F, N
        self.T0 = T >> L
        self.fc = nn.Linear(z_dim, ch[0] * self.T0)
        self.convs = nn.ModuleList(nn.Conv1d(ch[l], ch[l + 1], k, padding=k // 2) for l in range(L))

    def forward(self, z):                                                    # (B, Z) -> (B, N, T)
        h = F.leaky_relu(self.fc(z).view(len(z), -1, self.T0), 0.2)          # (B, 4F * T/4) -> (B, 4F, T/4)
        for conv in self.convs:
            h = F.interpolate(h, scale_factor=2, mode="nearest")             # (B, C, 2 T_l): bins duplicated
            h = F.leaky_relu(conv(h), 0.2)                                   # (B, C_next, 2 T_l)
        return torch.sigmoid(h)


def init_weights(net: nn.Module) -> nn.Module:
    """Every weight ~ U(-0.02 sqrt 3, +0.02 sqrt 3) (std 0.02), every bias 0, as in the repo."""
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Linear)):
            nn.init.uniform_(m.weight, -0.02 * math.sqrt(3), 0.02 * math.sqrt(3))
            nn.init.zeros_(m.bias)
    return net


def make_models(cfg: Config, N: int, T: int):
    """Step 2. The generator and the critic, initialised on the CPU (the generator's draws first)."""
    G = init_weights(Generator(N, T, cfg.g_features, cfg.layers, cfg.kernel, cfg.z_dim))
    D = init_weights(Critic(N, T, cfg.d_features, cfg.layers, cfg.kernel))
    return G, D


def warn_if_paper_on_cpu(cfg: Config, G: nn.Module, D: nn.Module, device: torch.device) -> None:
    """--paper is a GPU job: on a CPU, say how large it is before training starts."""
    if cfg.preset != "paper" or device.type != "cpu":
        return
    n_G, n_D = (sum(p.numel() for p in net.parameters()) / 1e6 for net in (G, D))
    print(f"WARNING: --paper on the CPU is the paper's full job: {cfg.iters} generator iterations, each with "
          f"{cfg.critic_iters} critic steps (a double-backward gradient penalty) at batch {cfg.batch}, with a "
          f"{n_D:.2f} M-parameter critic and a {n_G:.2f} M-parameter generator. That takes weeks on a CPU; run it "
          "on a GPU (--device cuda), or run the default demo here.", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# WGAN-GP objective (Gulrajani et al. 2017, Alg. 1)
# -----------------------------------------------------------------------------
def gradient_penalty(D: nn.Module, x: torch.Tensor, x_fake: torch.Tensor, alpha=None) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = x + alpha (x_fake - x), alpha ~ U(0,1) per sample; the norm is
    taken over all non-batch dims (the whole N x T sample), not per neuron or per bin."""
    if alpha is None:
        alpha = torch.rand(len(x), 1, 1).to(x.device)                      # (B, 1, 1), broadcast over N, T
    # x_hat = x + alpha (x_fake - x)
    x_hat = (x + alpha * (x_fake - x)).requires_grad_(True)
    g, = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)     # (B, N, T)
    # GP = E[(||g||_2 - 1)^2]
    return ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()                    # (B, N*T) -> (B,) -> scalar


def critic_loss(D, x, x_fake, lambd: float = 10.0):
    """The fakes are the continuous sigmoid outputs: binarising them would cut the gradient, so the critic compares
    binary reals with continuous fakes and pushes the generator to saturate (intended)."""
    d_real, d_fake = D(torch.cat([x, x_fake])).chunk(2)                    # one pass over (2B, N, T) -> 2 x (B,)
    # L_D = E[D(x_fake)] - E[D(x)] + lambda GP
    return d_fake.mean() - d_real.mean() + lambd * gradient_penalty(D, x, x_fake)


def generator_loss(D, x_fake):
    # L_G = -E[D(G(z))]
    return -D(x_fake).mean()


# -----------------------------------------------------------------------------
# Training (step 3; main_conv.py, model_conv.py). Standard PyTorch from here.
# -----------------------------------------------------------------------------
@torch.no_grad()
def sample(G: Generator, n: int, z_dim: int, gen: torch.Generator, chunk: int = 4096) -> torch.Tensor:
    """n generator outputs (spike probabilities), (n, N, T) on G's device, z drawn on the CPU from `gen`."""
    device = next(G.parameters()).device
    return torch.cat([G(torch.randn(min(chunk, n - i), z_dim, generator=gen).to(device))
                      for i in range(0, n, chunk)])


def binarize(p: torch.Tensor, gen: torch.Generator) -> np.ndarray:
    """Spike iff p > u, u ~ U(0,1) per entry: Bernoulli sampling, not a 0.5 threshold (evaluation only)."""
    u = torch.rand(p.shape, generator=gen).to(p.device)                    # (n, N, T)
    return (p > u).cpu().numpy()


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of both nets at generator iteration `step` (0-based): linear decay to 0, or constant."""
    if not cfg.lr_decay:
        return cfg.lr
    # lr_t = lr (1 - t / iters)
    return cfg.lr * (1 - step / cfg.iters)


def real_batches(data: torch.Tensor, B: int):
    """Endless minibatches (B, N, T) float of the training set, reshuffled every epoch.
    NOTE (deviation): the repo reads batches in a fixed order; we reshuffle every epoch."""
    while True:
        order = torch.randperm(len(data)).to(data.device)
        for i in range(0, len(data) - B + 1, B):
            yield data[order[i:i + B]].float()


def make_monitor(cfg: Config, data: dict, device) -> dict:
    """What log_statistics needs: the held-out statistics, 1024 training and 1024 held-out samples (the critic's
    Wasserstein estimate on both; a growing gap = critic overfitting, the repo's dev-set check) and a CPU generator."""
    return dict(st_test=data["st_test"], gen=torch.Generator().manual_seed(cfg.seed + 1),
                real_train=torch.as_tensor(data["train"][:1024], dtype=torch.float32, device=device),
                real_dev=torch.as_tensor(data["test"][:1024], dtype=torch.float32, device=device))


@torch.no_grad()
def log_statistics(cfg: Config, G: nn.Module, D: nn.Module, mon: dict) -> dict:
    """Statistics of fresh binarised samples against the held-out set, the critic's Wasserstein estimate
    E[D(x)] - E[D(G(z))] on training and held-out samples, and the fraction of saturated outputs."""
    p = sample(G, min(2048, cfg.n_gen), cfg.z_dim, mon["gen"])
    c = compare(spike_stats(binarize(p, mon["gen"])), mon["st_test"])
    d_fake = D(p[:1024]).mean()
    return dict(train_w=(D(mon["real_train"]).mean() - d_fake).item(),
                dev_w=(D(mon["real_dev"]).mean() - d_fake).item(),
                **{k: c[k] for k in ("lag1_ratio", "mean_r", "mean_l1", "cov_r", "k_probs_l1", "acg_l1")},
                saturated=((p < 0.1) | (p > 0.9)).float().mean().item())


def train(cfg: Config, G: nn.Module, D: nn.Module, x_train: np.ndarray, device, monitor=None) -> list:
    """Step 3. Moves G and D to `device` and trains them in place (Gulrajani et al. 2017, Alg. 1, with the repo's
    settings). Returns the history: losses and log_statistics every eval_every iterations (if monitor is given)."""
    G.to(device)
    D.to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(0.0, 0.9))
    batches = real_batches(torch.as_tensor(x_train, dtype=torch.uint8, device=device), cfg.batch)  # kept compact
    cause = "a learning rate too high for this data (try a smaller --lr), or a degenerate --data file"
    history = []
    prog = Progress("train", cfg.iters, every=max(1, cfg.iters // 100))
    print(f"[train] {cfg.iters} generator iterations x {cfg.critic_iters} critic steps, batch {cfg.batch}, "
          f"lr {cfg.lr}, F critic {cfg.d_features} generator {cfg.g_features}, {device}, "
          f"{torch.get_num_threads()} threads")
    t0 = time.time()
    for it in range(1, cfg.iters + 1):
        for opt in (opt_G, opt_D):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, it - 1)
        # NOTE (choice): 5 critic steps, then 1 generator step. The repo runs the generator step first and skips it
        # on iteration 0: the same sequence, shifted by one step.
        for _ in range(cfg.critic_iters):                                  # each on a fresh real and fake batch
            x = next(batches)
            with torch.no_grad():
                x_fake = G(torch.randn(cfg.batch, cfg.z_dim).to(device))
            loss_D = critic_loss(D, x, x_fake, cfg.lambd)
            check_finite(loss_D.item(), "Spike-GAN critic", it, cause)
            opt_D.zero_grad(set_to_none=True)
            loss_D.backward()
            opt_D.step()
        loss_G = generator_loss(D, G(torch.randn(cfg.batch, cfg.z_dim).to(device)))
        check_finite(loss_G.item(), "Spike-GAN generator", it, cause)
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        if monitor is not None and (it % cfg.eval_every == 0 or it == cfg.iters):
            history.append(dict(iter=it, loss_D=loss_D.item(), loss_G=loss_G.item(),
                                **log_statistics(cfg, G, D, monitor)))
        prog(it, loss_D=loss_D.item(), **({"lag1_ratio": history[-1]["lag1_ratio"]} if history else {}))
    print(f"  {sum(p.numel() for p in G.parameters())} generator and {sum(p.numel() for p in D.parameters())} critic "
          f"parameters, {(time.time() - t0) / cfg.iters * 1e3:.0f} ms per generator iteration (incl. logging)")
    return history


# -----------------------------------------------------------------------------
# Statistics (tflib/analysis.py), on binary (S, N, T) arrays
# -----------------------------------------------------------------------------
def spike_stats(x: np.ndarray, max_lag: int = 10) -> dict:
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


def _r(a, b) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def compare(s: dict, ref: dict) -> dict:
    """Pearson r and unnormalised L1 error (the repo's error sums) of every statistic against a reference set."""
    out = {"lag1_ratio": float(s["lag1_ratio"])}
    for k in ("mean", "cov", "var", "k_probs", "acg", "psth", "lag_cov"):
        out[f"{k}_r"], out[f"{k}_l1"] = _r(s[k], ref[k]), float(np.abs(s[k] - ref[k]).sum())
    return out


def memorisation(x: np.ndarray, train: np.ndarray, n_near: int = 512) -> dict:
    """Fraction of samples identical to a training sample (Fig S1), and the mean Hamming distance of (up to n_near
    of) them to their nearest training sample (Fig S5)."""
    seen = {row.tobytes() for row in np.packbits(train.reshape(len(train), -1), axis=1)}
    same = np.mean([row.tobytes() in seen for row in np.packbits(x.reshape(len(x), -1), axis=1)])
    q = torch.as_tensor(x[:n_near].reshape(min(n_near, len(x)), -1), dtype=torch.float32)
    best = torch.full((len(q),), float("inf"))
    for i in range(0, len(train), 8192):                                  # Hamming = |a| + |b| - 2 a.b
        t = torch.as_tensor(train[i:i + 8192].reshape(-1, q.shape[1]), dtype=torch.float32)
        best = torch.minimum(best, (q.sum(1, keepdim=True) + t.sum(1) - 2 * q @ t.T).min(1).values)
    return dict(memorised_frac=float(same), nearest_hamming=float(best.mean()))


# -----------------------------------------------------------------------------
# Classical baseline: spatio-temporal dichotomized Gaussian (Macke et al. 2009; Lyamzin et al. 2010)
# -----------------------------------------------------------------------------
_GL_U, _GL_W = (torch.tensor(v, dtype=torch.float64) for v in np.polynomial.legendre.leggauss(40))


def Phi2(a: torch.Tensor, b: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Bivariate normal CDF P(u < a, v < b; corr rho) by Plackett's identity,
    Phi(a) Phi(b) + int_0^rho phi2(a, b; r) dr, with 40-point Gauss-Legendre quadrature on [0, rho]."""
    r = rho[..., None] * (_GL_U + 1) / 2                                   # (..., 40) nodes on [0, rho]
    a_, b_ = a[..., None], b[..., None]
    phi2 = torch.exp(-(a_ ** 2 - 2 * r * a_ * b_ + b_ ** 2) / (2 * (1 - r ** 2))) / (2 * math.pi * (1 - r ** 2).sqrt())
    return torch.special.ndtr(a) * torch.special.ndtr(b) + rho / 2 * (phi2 * _GL_W).sum(-1)


def fit_dg(x: np.ndarray, steps: int = 60):
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
    ev, V = torch.linalg.eigh(Lam)
    # NOTE (choice): we sample with this eigen square root rather than a Cholesky factor (same distribution).
    A = V * ev.clamp(min=1e-6).sqrt()                                      # clipped Lambda = A A^T
    return gamma, A / (A ** 2).sum(1, keepdim=True).sqrt()                 # rows rescaled: unit diagonal


def sample_dg(gamma, A, n: int, gen: torch.Generator) -> np.ndarray:
    """x = 1[gamma + A eps > 0], eps ~ N(0, I), as (n, N, T)."""
    N, T = len(gamma), len(A) // len(gamma)
    u = gamma.repeat_interleave(T) + torch.randn(n, len(A), generator=gen, dtype=torch.float64) @ A.T  # (n, N*T)
    return (u > 0).reshape(n, N, T).cpu().numpy()                            # (n, N*T) -> (n, N, T)


# -----------------------------------------------------------------------------
# Importance maps (paper Fig 4, tflib/spike_relevance_analysis.py)
# -----------------------------------------------------------------------------
@torch.no_grad()
def importance_map(D: nn.Module, x: torch.Tensor, P: int = 8, reps: int = 5, gen=None, chunk: int = 256):
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
                g[:, w] += (D(xp.view(B * N, N, T)).view(B, N) - s0[:, None]).abs() / reps
        I.append(xb * torch.einsum("bwn,wt->bnt", g, cover) / cover.sum(0))  # (B, N, T)
    return torch.cat(I).cpu().numpy()


def packet_template(I: np.ndarray, q: float = 95.0) -> np.ndarray:
    """The repo's find_packets: keep importance above the q-th percentile of all spikes' importance, left-align each
    sample at its first important bin and average -> (N, T) template, normalised to max 1."""
    S, N, T = I.shape
    J = np.where(I >= np.percentile(I[I > 0], q), I, 0.0)
    first = (J.sum(1) > 0).argmax(1)                                      # (S,) first important bin
    idx = np.arange(T) + first[:, None]                                   # (S, T) shifted time index
    A = np.take_along_axis(J, np.minimum(idx, T - 1)[:, None, :].repeat(N, 1), 2) * (idx < T)[:, None, :]
    tmpl = A[J.sum((1, 2)) > 0].mean(0)
    return tmpl / max(tmpl.max(), 1e-12)


# -----------------------------------------------------------------------------
# Pipeline steps 4-5: sample every model, importance maps (Fig 4), evaluate (Fig 2 statistics)
# -----------------------------------------------------------------------------
def draw_samples(cfg: Config, G: nn.Module, dg: tuple, data: dict, rng) -> dict:
    """Step 4. The sample sets, n_gen each, scored against the held-out data ('real'): Spike-GAN's probabilities
    ('Spike-GAN p') and their Bernoulli draws ('Spike-GAN'), the DG's samples, and training samples (real-vs-real,
    the noise floor)."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    p = sample(G, cfg.n_gen, cfg.z_dim, gen)                                # (n_gen, N, T) on G's device
    return {"real": data["test"], "Spike-GAN p": p.cpu().numpy(), "Spike-GAN": binarize(p, gen),
            "DG": sample_dg(*dg, cfg.n_gen, torch.Generator().manual_seed(cfg.seed + 3)),
            "real-vs-real": data["train"][rng.permutation(len(data["train"]))[:cfg.n_gen]]}


def importance_analysis(cfg: Config, D: nn.Module, data: dict, rng) -> dict:
    """Paper Fig 4: importance maps of `importance` samples (none if 0). On the packets demo they are taken on the
    Fig 4 test set (packets in group 0 only, onsets in [T/4, T/2]) and scored by how much more importance the packet
    region gets than the rest (per bin and per spike) and by the recovered template's correlation with the truth."""
    if not cfg.importance:
        return {}
    S, N, T = data["train"].shape
    packets = cfg.demo == "packets" and data["prm"] is not None
    x = make_packets(cfg, cfg.importance, data["prm"], rng, test=True) if packets else data["test"][:cfg.importance]
    x_t = torch.as_tensor(x, dtype=torch.float32, device=next(D.parameters()).device)
    I = importance_map(D, x_t, cfg.pattern, cfg.shuffles, torch.Generator().manual_seed(cfg.seed + 4))  # (S, N, T)
    imp = dict(mean_map=I.mean(0))                                          # (N, T)
    imp["metrics"] = dict(time_profile=imp["mean_map"].mean(0).tolist(),
                          neuron_profile=imp["mean_map"].mean(1).tolist())
    if packets:
        pos = np.argsort(data["prm"]["perm"])[:cfg.group]                   # where group-0 neurons were permuted to
        imp["mask_n"] = np.isin(np.arange(N), pos)
        inside = imp["mask_n"][:, None] & (np.arange(T) >= T // 4) & (np.arange(T) < T // 2 + cfg.group)  # (N, T)
        imp["truth"] = np.zeros((N, T))
        imp["truth"][pos, np.arange(cfg.group)] = 1.0                       # neuron k of the packet fires at bin k
        imp["template"] = packet_template(I)
        per_spike = I.sum(0) / np.maximum(x.sum(0), 1)                      # (N, T) importance per spike
        imp["metrics"].update(
            inside_over_outside=float(imp["mean_map"][inside].mean() / imp["mean_map"][~inside].mean()),
            per_spike_inside_over_outside=float(per_spike[inside].mean() / per_spike[~inside].mean()),
            template_r=_r(imp["template"].ravel(), imp["truth"].ravel()))
    return imp


def evaluate(cfg: Config, x: dict, data: dict, history: list, imp: dict):
    """Step 5. metrics.json: every sample set's statistics against the held-out set (compare) and its memorisation
    of the training set (for real-vs-real: of the held-out samples), the training history, the data summary and the
    importance results. Returns (metrics, statistics per sample set).
    NOTE (deviation): scored against held-out data; the repo's analysis.py scores against the training set."""
    st = {"real": data["st_test"]}
    metrics = {}
    for name in ("Spike-GAN", "DG", "real-vs-real"):
        st[name] = spike_stats(x[name])
        own = data["test"] if name == "real-vs-real" else x[name]
        metrics[name] = {**compare(st[name], data["st_test"]), **memorisation(own, data["train"])}
    metrics.update(iterations=cfg.iters, history=history,
                   data=dict(shape=list(data["train"].shape), spike_prob=float(data["test"].mean()),
                             lag1_ratio=float(data["st_test"]["lag1_ratio"])))
    if imp:
        metrics["importance"] = imp["metrics"]
    return metrics, st


# -----------------------------------------------------------------------------
# Step 6: figures (matplotlib imported lazily; Figure objects, no pyplot) and outputs
# -----------------------------------------------------------------------------
def make_figures(folder: str, x: dict, st: dict, history: list, imp: dict) -> None:
    """rasters.png; statistics.png (Fig 2 panels: data vs Spike-GAN and DG); training.png; importance.png (Fig 4)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6))
    for i, name in enumerate(("real", "Spike-GAN p", "Spike-GAN", "DG")):
        for j in range(4):
            ax = fig.add_subplot(4, 4, 4 * i + j + 1, xticks=[], yticks=[])
            ax.imshow(x[name][j], aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_ylabel(name if j == 0 else "", fontsize=8)
    save_figure(fig, os.path.join(folder, "rasters.png"))

    fig = Figure(figsize=(16, 3.2))
    for i, (k, title) in enumerate([("mean", "spikes / sample"), ("cov", "covariance (off-diagonal)"),
                                    ("k_probs", "P(k synchronous spikes)"), ("lag_cov", "lag-1 cross-covariance")]):
        ax = fig.add_subplot(1, 5, i + 1, title=title, xlabel="data (held-out)")
        for name in ("Spike-GAN", "DG"):
            ax.scatter(st["real"][k], st[name][k], s=6, alpha=0.7, label=name)
        lim = [min(st["real"][k].min(), 0), st["real"][k].max()]
        ax.plot(lim, lim, "k--", lw=0.8)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 5, 5, title="P(spike at t+l | spike at t)", xlabel="lag l (bins)")
    for name, c in (("real", "k"), ("Spike-GAN", "C0"), ("DG", "C1")):
        L = len(st[name]["acg"]) // 2
        ax.plot(range(-L, L + 1), st[name]["acg"], c, marker=".", label=name)
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(folder, "statistics.png"))

    if history:
        fig = Figure(figsize=(16, 3))
        it = [h["iter"] for h in history]
        for i, (k, title) in enumerate([("lag1_ratio", "lag-1 ratio (dashed: data)"), ("mean_r", "rate r"),
                                        ("cov_r", "covariance r"), ("k_probs_l1", "k-statistics L1"),
                                        ("dev_w", "critic W estimate: dev, train")]):
            ax = fig.add_subplot(1, 5, i + 1, title=title, xlabel="generator iteration")
            ax.plot(it, [h[k] for h in history], marker=".")
        ax.plot(it, [h["train_w"] for h in history], marker=".")
        fig.axes[0].axhline(st["real"]["lag1_ratio"], color="k", ls="--")
        save_figure(fig, os.path.join(folder, "training.png"))

    if imp:
        fig = Figure(figsize=(16, 3))
        mp = imp["mean_map"]
        panels = [("mean_map", "mean importance (neuron x bin)"), ("template", "recovered packet template"),
                  ("truth", "true packet (permuted neurons)")]
        for i, (k, title) in enumerate(p for p in panels if p[0] in imp):
            ax = fig.add_subplot(1, 5, i + 1, title=title, xlabel="bin")
            ax.imshow(imp[k], aspect="auto", interpolation="nearest")
        fig.add_subplot(1, 5, 4, title="time profile", xlabel="bin").plot(mp.mean(0))
        ax = fig.add_subplot(1, 5, 5, title="neuron profile (red: packet neurons)", xlabel="neuron")
        ax.bar(range(len(mp)), mp.mean(1), color=["C3" if b else "C0" for b in imp.get("mask_n", [0] * len(mp))])
        save_figure(fig, os.path.join(folder, "importance.png"))


def write_outputs(cfg: Config, *, metrics: dict, x: dict, st: dict, history: list, imp: dict, nets: dict,
                  sw: Stopwatch) -> None:
    """Step 6. figures/, samples.npz (real, generated first), <name>.pt state dicts (on the CPU), timing.json, then
    metrics.json last: its presence marks a finished run."""
    make_figures(os.path.join(cfg.out, "figures"), x, st, history, imp)
    save_atomic(os.path.join(cfg.out, "samples.npz"), lambda f: np.savez_compressed(
        f, real=x["real"].astype(np.uint8), generated=x["Spike-GAN"].astype(np.uint8),
        generated_probs=x["Spike-GAN p"], dg=x["DG"].astype(np.uint8)))
    for name, net in nets.items():
        state = {k: v.cpu() for k, v in net.state_dict().items()}
        save_atomic(os.path.join(cfg.out, f"{name}.pt"), lambda f: torch.save(state, f))
    sw.lap("outputs")
    write_json(os.path.join(cfg.out, "timing.json"), dict(sw.times, total=round(sum(sw.times.values()), 2)))
    write_json(os.path.join(cfg.out, "metrics.json"), metrics)


def print_summary(cfg: Config, metrics: dict, sw: Stopwatch) -> None:
    names = ("Spike-GAN", "DG", "real-vs-real")
    print(f"\n  {'statistic vs held-out':<22}" + "".join(f"{m:>14}" for m in names))
    for k in ("mean_r", "mean_l1", "cov_r", "cov_l1", "var_l1", "k_probs_l1", "acg_l1", "psth_l1", "lag_cov_r",
              "lag_cov_l1", "lag1_ratio", "memorised_frac", "nearest_hamming"):
        print(f"  {k:<22}" + "".join(f"{metrics[m][k]:>14.4g}" for m in names))
    imp = metrics.get("importance", {})
    if "inside_over_outside" in imp:
        print(f"  importance inside/outside the packets {imp['inside_over_outside']:.2f}, "
              f"template r {imp['template_r']:.2f}")
    print(f"  data lag-1 ratio {metrics['data']['lag1_ratio']:.3f}")
    print(f"total {sum(sw.times.values()):.0f}s; outputs in {cfg.out}")


# -----------------------------------------------------------------------------
# The pipeline, in paper order
# -----------------------------------------------------------------------------
def main(argv=None) -> dict:
    cfg = parse_args(argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = get_device(cfg.device)
    sw = Stopwatch()
    # 1) data: simulated (Fig 2 / Fig 4 data) or --data, validated before anything is written
    rng = np.random.default_rng(cfg.seed)
    data = load_data(cfg, rng)
    prepare_out(cfg.out)
    write_json(os.path.join(cfg.out, "config.json"), run_info(cfg, device))
    sw.lap("data")
    # 2) model: generator and critic (Fig 1), built on the CPU
    G, D = make_models(cfg, *data["train"].shape[1:])
    warn_if_paper_on_cpu(cfg, G, D, device)
    # 3) train: WGAN-GP, logging statistics of fresh samples every eval_every iterations
    history = train(cfg, G, D, data["train"], device, make_monitor(cfg, data, device))
    sw.lap("train")
    # 4) sample: Spike-GAN, the DG baseline fitted to the same training set, real-vs-real; importance maps (Fig 4)
    print("[evaluate] Spike-GAN, dichotomized Gaussian, real-vs-real")
    dg = fit_dg(data["train"])
    sw.lap("dg_fit")
    x = draw_samples(cfg, G, dg, data, rng)
    sw.lap("sample")
    imp = importance_analysis(cfg, D, data, rng)
    sw.lap("importance")
    # 5) evaluate: Fig 2 statistics against the held-out set, memorisation, importance (Fig 4)
    metrics, st = evaluate(cfg, x, data, history, imp)
    sw.lap("evaluate")
    # 6) save: figures, samples, weights, timing.json, metrics.json last
    write_outputs(cfg, metrics=metrics, x=x, st=st, history=history, imp=imp, nets=dict(generator=G, critic=D), sw=sw)
    print_summary(cfg, metrics, sw)
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # bad input or a diverged run: one sentence, exit status 1
        sys.exit(f"error: {e}")
