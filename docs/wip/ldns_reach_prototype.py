# ---- prototype only (drop when pasting into ldns_minimal.py): the base file's names and the shared utilities ----
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ldns_base as base
from ldns_base import DenoiserBlock, instance_norm, timestep_embedding  # noqa: F401  (used below)


def save_atomic(path, write):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def save_figure(fig, path, dpi=90):
    fig.tight_layout()
    save_atomic(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
# ---- end of the prototype-only part ----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# Reaching data (paper Sec. 4.4 uses monkey MC_Maze; this is a synthetic stand-in made by the file itself)
# -----------------------------------------------------------------------------
REACH_BIN_S = 0.01                 # bin width in seconds (velocities in m/s, positions in m)
REACH_ONSET = (0.15, 0.30)         # movement onset, as a fraction of the trial length: uniform in this range
REACH_DURATION = (0.30, 0.55)      # movement duration, as a fraction of the trial length: uniform in this range
REACH_DISTANCE = (0.08, 0.12)      # reach distance in m: uniform in this range
REACH_V_REF = 0.35                 # m/s: a typical peak speed, the unit of the velocity tuning


def min_jerk_speed(T, onset, duration):
    """Minimum-jerk speed profile (Flash & Hogan 1985) of a unit-distance reach, per second, on bins 0..T-1.
    Position s(tau) = 10 tau^3 - 15 tau^4 + 6 tau^5 with tau = (t - onset) / duration in [0, 1], so the speed
    ds/dt = 30 tau^2 (1 - tau)^2 / duration is bell-shaped and zero outside the movement. onset, duration (K,) in
    bins -> (K, T)."""
    t = np.arange(T)
    tau = np.clip((t[None] - onset[:, None]) / duration[:, None], 0.0, 1.0)  # (K,T)
    # ds/dt = 30 tau^2 (1 - tau)^2 / (duration * bin width)
    return 30 * tau ** 2 * (1 - tau) ** 2 / (duration[:, None] * REACH_BIN_S)


def make_reach_data(n_trials, T, N, rng, n_shared=3):
    """Synthetic centre-out reaching population, drawn with its own generator rng (np.random.Generator).

    Per trial: reach angle theta ~ U[-pi, pi) (NOTE (choice): continuous directions rather than a few targets),
    distance r, onset and duration uniform in the ranges above; v(t) = r speed(t) [cos theta, sin theta] (m/s),
    a straight minimum-jerk reach.
    Per neuron n: preferred direction u_n = [cos phi_n, sin phi_n], phi_n ~ U[-pi, pi); modulation depth
    k_n ~ U[0.7, 1.4]; baseline rate between 10 and 30 Hz; weights w_n ~ N(0, 0.4^2 I) on n_shared shared latents.
    Log-rates mix cosine tuning to velocity (Moran & Schwartz 1999) with shared dynamics not explained by velocity:
        log lambda_n(t) = b_n + k_n (u_n . v(t)) / v_ref + w_n . x(t),
    x(t) = a 2-d rotation a [cos(2 pi f t + psi), sin(2 pi f t + psi)] with per-trial frequency f ~ U[1.5, 2.5] Hz,
    phase psi and amplitude a, plus (n_shared - 2) smooth Gaussian-process latents (length scale 15 bins);
    counts ~ Poisson(lambda). Returns spikes (K,N,T) int64, rates (K,N,T), velocity (K,2,T) in m/s, angle (K,),
    shared latents (K,n_shared,T) and the preferred directions (N,)."""
    K = n_trials
    theta = rng.uniform(-np.pi, np.pi, K)
    distance = rng.uniform(*REACH_DISTANCE, K)
    onset = rng.uniform(*REACH_ONSET, K) * T
    duration = rng.uniform(*REACH_DURATION, K) * T
    speed = distance[:, None] * min_jerk_speed(T, onset, duration)          # (K,T) m/s
    direction = np.stack([np.cos(theta), np.sin(theta)], 1)                  # (K,2)
    velocity = direction[:, :, None] * speed[:, None, :]                      # (K,2,1) * (K,1,T) -> (K,2,T)
    # shared latent dynamics, independent of the reach
    t_s = np.arange(T) * REACH_BIN_S                                          # (T,) seconds
    f = rng.uniform(1.5, 2.5, K)
    psi = rng.uniform(-np.pi, np.pi, K)
    a = rng.uniform(0.5, 1.5, K)
    arg = 2 * np.pi * f[:, None] * t_s[None] + psi[:, None]                   # (K,T)
    rotation = a[:, None, None] * np.stack([np.cos(arg), np.sin(arg)], 1)    # (K,2,T)
    ell = 15.0
    lag = np.arange(T)
    cov = np.exp(-0.5 * ((lag[:, None] - lag[None]) / ell) ** 2)             # (T,T) squared-exponential kernel
    L_chol = np.linalg.cholesky(cov + 1e-6 * np.eye(T))
    gp = np.einsum("ts,ks->kt", L_chol, rng.standard_normal((K * (n_shared - 2), T)))  # (K*(n_shared-2), T)
    gp = gp.reshape(K, n_shared - 2, T)                                       # (K*(n_shared-2),T) -> (K,n_shared-2,T)
    x = np.concatenate([rotation, gp], 1)                                     # (K,n_shared,T)
    # neurons
    phi = rng.uniform(-np.pi, np.pi, N)
    u = np.stack([np.cos(phi), np.sin(phi)], 1)                               # (N,2)
    k = rng.uniform(0.7, 1.4, N)
    b = np.log(rng.uniform(10.0, 30.0, N) * REACH_BIN_S)                       # log(rate in Hz * bin width)
    w = 0.4 * rng.standard_normal((N, n_shared))
    # log lambda_n(t) = b_n + k_n (u_n . v(t)) / v_ref + w_n . x(t)
    log_rates = (b[None, :, None] + k[None, :, None] * np.einsum("nc,kct->knt", u, velocity) / REACH_V_REF
                 + np.einsum("nj,kjt->knt", w, x))                            # (K,N,T)
    rates = np.exp(log_rates)
    return dict(spikes=rng.poisson(rates), rates=rates.astype(np.float32), velocity=velocity.astype(np.float32),
                angle=theta.astype(np.float32), shared=x.astype(np.float32), pref_dir=phi.astype(np.float32))


def reach_condition(velocity, angle_bin):
    """Angle condition as in the official monkey recipe (ldns/data/monkey.py): theta = atan2(v_y, v_x) at the fixed
    bin angle_bin, c = [cos theta, sin theta]. velocity (K,2,T) -> theta (K,), c (K,2)."""
    theta = torch.atan2(velocity[:, 1, angle_bin], velocity[:, 0, angle_bin])
    return theta, torch.stack([torch.cos(theta), torch.sin(theta)], 1)


# -----------------------------------------------------------------------------
# Denoiser with conditioning: extra input channels (official Denoiser with C_in = d + 2) and an angle embedding
# added to the timestep embedding (official ConditionalDenoiser, ldns/networks/blocks.py)
# -----------------------------------------------------------------------------
class Denoiser(nn.Module):
    """eps_theta(z_t, t [, c] [, extra]): grouped Conv1x1(C_in->C) -> adaLN-Zero blocks -> grouped Conv1x1(C->C_in);
    no U-Net, no attention. Time: sinusoidal(256) -> Linear(256, C/4) -> SiLU -> Linear(C/4, C/4) = e.

    d_extra > 0: C_in = d + d_extra; the extra channels (velocity traces, a padding mask) are concatenated to z_t at
    every step and the last d_extra output channels are dropped (official velocity-conditioned Denoiser(C_in=16+2)).
    Official grouping rule: conv_in / conv_out use groups=C_in iff C % C_in == 0 and C > C_in, else ungrouped.
    d_cond > 0: c (B,d_cond) -> Linear(d_cond, C/4) -> SiLU -> Linear(C/4, C/4), added to e, so it reaches every
    block through the same zero-initialised adaLN (official ConditionalDenoiser). No classifier-free guidance and
    no condition dropout: the official code has neither."""

    def __init__(self, d, C, n_blocks, d_state, d_extra=0, d_cond=0):
        super().__init__()
        self.d = d
        C_in = d + d_extra
        g = C_in if (C % C_in == 0 and C > C_in) else 1        # each input channel feeds its own C/C_in channels
        self.conv_in = nn.Conv1d(C_in, C, 1, groups=g)
        self.t_mlp = nn.Sequential(nn.Linear(256, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))
        self.blocks = nn.ModuleList([DenoiserBlock(C, d_state) for _ in range(n_blocks)])
        # NOTE (deviation): DiT's final adaLN modulation before conv_out (see the unconditional Denoiser above)
        self.ada_out = nn.Linear(C // 4, 2 * C)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        self.conv_out = nn.Conv1d(C, C_in, 1, groups=g)
        if d_cond > 0:
            self.c_mlp = nn.Sequential(nn.Linear(d_cond, C // 4), nn.SiLU(), nn.Linear(C // 4, C // 4))

    def forward(self, z, t, c=None, extra=None):
        """z (B,d,T), t (B,) int, c (B,d_cond) or None, extra (B,d_extra,T) or None -> eps_hat (B,d,T)."""
        e = self.t_mlp(timestep_embedding(t))                  # (B,C/4)
        if c is not None:
            # e = e_t + e_c (official ConditionalDenoiser.forward)
            e = e + self.c_mlp(c)
        h = self.conv_in(z if extra is None else torch.cat([z, extra], 1))  # (B,d+d_extra,T) -> (B,C,T)
        for blk in self.blocks:
            h = blk(h, e)
        sh, sc = self.ada_out(F.gelu(e))[..., None].chunk(2, dim=1)  # (B,2C,1) -> 2 x (B,C,1)
        return self.conv_out(h * (1 + sc) + sh)[:, :self.d]    # (B,C_in,T) -> (B,d,T): extra outputs dropped


class DDPM(base.DDPM):
    """The base DDPM with conditioning passed through to the model at every call (replaces its loss and sample)."""

    def loss(self, model, x0, mask=None, **cond):
        """Alg. 1 with conditioning: t ~ U{0..T-1}, eps ~ N(0,I) on x0's d channels only, loss
        || eps - eps_theta(x_t, t, **cond) ||^2, a mean over the latent entries (masked mean with mask (B,1,T)).
        The model's extra output channels are dropped before this, so they never enter the loss.
        NOTE (deviation): the monkey recipes use SmoothL1(beta 0.05) instead of the MSE; MSE as for Lorenz."""
        t = torch.randint(0, len(self.beta), (len(x0),)).to(x0.device)
        eps = torch.randn(x0.shape).to(x0.device)
        err = (model(self.q_sample(x0, t, eps), t, **cond) - eps) ** 2   # (B,d,T)
        if mask is None:
            return err.mean()
        return (err * mask).sum() / (mask.sum() * x0.shape[1])

    @torch.no_grad()
    def sample(self, model, shape, K, eta, **cond):
        """Respaced ancestral DDPM / DDIM from x_T ~ N(0,I) (base DDPM.sample), with cond (c=..., extra=...) given
        to the model at every step (official sample_conditioned_on_angle / sample_with_velocity)."""
        ts, abar = self.respaced(K)
        device = self.beta.device
        x = torch.randn(shape).to(device)
        for i in reversed(range(len(ts))):
            ab = abar[i]
            ab_prev = abar[i - 1] if i > 0 else torch.ones((), device=device)
            eps_hat = model(x, ts[i].expand(shape[0]), **cond)
            mean, var = self.p_step(x, eps_hat, ab, ab_prev, eta)
            if i > 0:
                x = mean + var.sqrt() * torch.randn(shape).to(device)
            else:
                x = mean                                       # no noise at the last step
        return x


# -----------------------------------------------------------------------------
# Behaviour evaluation (official train_and_plot_diffusion_monkey_*_conditioned notebooks)
# -----------------------------------------------------------------------------
def bins_as_rows(a):
    """(K,C,T) -> (K*T, C): every time bin of every trial is one sample."""
    return a.transpose(0, 2, 1).reshape(-1, a.shape[1])


def fit_ridge(X, Y, alpha):
    """Ridge regression with an intercept (sklearn Ridge, fit_intercept=True): centre X and Y, then
    W = (Xc^T Xc + alpha I)^-1 Xc^T Yc and b = mean(Y) - mean(X) W. X (M,N), Y (M,c) -> W (N,c), b (c,)."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc = X - x_mean
    Yc = Y - y_mean
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)
    return W, y_mean - x_mean @ W


def decode_velocity(rates, W, b):
    """Per-bin linear decoder v_hat(t) = W^T lambda(t) + b. rates (K,N,T) -> velocity (K,c,T)."""
    V = bins_as_rows(rates.astype(np.float64)) @ W + b         # (K*T, c)
    return V.reshape(rates.shape[0], rates.shape[2], -1).transpose(0, 2, 1)  # (K*T,c) -> (K,T,c) -> (K,c,T)


def r2_score(Y, Y_hat):
    """R^2 = 1 - SSE/SST per output over all trials and bins, averaged over outputs (sklearn r2_score default).
    Y, Y_hat (K,c,T)."""
    Y = bins_as_rows(Y.astype(np.float64))
    Y_hat = bins_as_rows(Y_hat.astype(np.float64))
    return float(np.mean(1 - ((Y - Y_hat) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)))


def trajectory(velocity):
    """Hand position by integrating the velocity: p(t) = sum_{s<=t} v(s) dt (the official plots cumsum the
    velocity). (K,2,T) m/s -> (K,2,T) m."""
    return np.cumsum(velocity, -1) * REACH_BIN_S


def reach_direction(velocity):
    """Reach direction of a (decoded) trial: the angle of its integrated end point p(T-1).
    NOTE (choice): the paper compares decoded and requested reaches visually; the end point is the least noisy
    single direction of a decoded trajectory. (K,2,T) -> (K,) radians."""
    end = trajectory(velocity)[:, :, -1]                       # (K,2)
    return np.arctan2(end[:, 1], end[:, 0])


def angular_error_deg(a, b):
    """|a - b| wrapped to [0, 180] degrees."""
    return np.abs(np.degrees(np.angle(np.exp(1j * (a - b)))))


def behaviour_metrics(dec, data, te, rates_hat, angles_req, rates_angle, v_req, rates_vel):
    """The paper's behaviour evaluation. The ridge decoder (official alpha) maps AE-reconstructed rates of the real
    training trials to their velocity; its R^2 on the held-out real trials is the ceiling. Applied to the rates of
    the angle-conditioned samples (direction error against the requested angle) and of the velocity-conditioned
    samples (R^2 against the requested held-out traces). rates_angle / rates_vel may be None (not trained)."""
    v = data["velocity"]
    res = {"behaviour/decoder_r2_real_test": r2_score(v[te], decode_velocity(rates_hat[te], *dec))}
    err_real = angular_error_deg(reach_direction(decode_velocity(rates_hat[te], *dec)), data["angle"][te])
    res["behaviour/real_test_angle_error_median_deg"] = float(np.median(err_real))
    if rates_angle is not None:
        v_angle = decode_velocity(rates_angle, *dec)
        err = angular_error_deg(reach_direction(v_angle), angles_req)
        res["angle/n_angles"] = int(len(np.unique(angles_req)))
        res["angle/n_samples"] = int(len(angles_req))
        res["angle/error_median_deg"] = float(np.median(err))
        res["angle/error_p90_deg"] = float(np.percentile(err, 90))
    if rates_vel is not None:
        r2 = r2_score(v_req, decode_velocity(rates_vel, *dec))
        res["velocity/n_traces"] = int(len(v_req))
        res["velocity/r2_decoded_vs_requested"] = r2
        res["velocity/r2_fraction_of_real_decoder"] = r2 / res["behaviour/decoder_r2_real_test"]
    return res


# -----------------------------------------------------------------------------
# The reaching stage of main(): both conditional denoisers share the AE and the latent normalisation
# -----------------------------------------------------------------------------
def train_reach_denoisers(cfg, ddpm, zn_tr, v_tr, fit, lap):
    """Train the denoisers that --condition asks for on the normalised train latents zn_tr (n,d,T) with the train
    velocities v_tr (n,2,T) (m/s, on the device); lap(stage) is called after each one (Stopwatch.lap).
    Angle: c = [cos theta, sin theta] with theta at cfg.angle_bin (official ConditionalDenoiser, condition_dim 2).
    Velocity: v / v_scale as 2 extra input channels (official Denoiser with C_in = d + 2).
    Returns ({"angle"|"velocity": EMA model}, v_scale)."""
    _, c_tr = reach_condition(v_tr, cfg.angle_bin)             # (n,2)
    # NOTE (choice): velocity inputs in units of the train velocity's std (official: m/s, about the same scale)
    v_scale = v_tr.std()
    extra_tr = v_tr / v_scale
    models = {}
    for kind in ("angle", "velocity"):
        if cfg.condition not in (kind, "both"):
            continue
        dn = Denoiser(cfg.d_latent, cfg.dn_channels, cfg.dn_blocks, cfg.d_state,
                      d_cond=2 if kind == "angle" else 0, d_extra=2 if kind == "velocity" else 0).to(zn_tr.device)
        with torch.no_grad():
            # official monkey recipes: conv_out scaled by 0.1 at init ("makes training faster")
            dn.conv_out.weight.mul_(0.1)
            dn.conv_out.bias.mul_(0.1)
        ema = base.EMA(dn)
        print(f"[diffusion, {kind}-conditioned] denoiser {sum(p.numel() for p in dn.parameters()):,} parameters")

        def loss_fn(idx, dn=dn, kind=kind):
            if kind == "angle":
                return ddpm.loss(dn, zn_tr[idx], c=c_tr[idx])
            return ddpm.loss(dn, zn_tr[idx], extra=extra_tr[idx])
        fit(dn, loss_fn, len(zn_tr), cfg.dn_batch, cfg.dn_steps, cfg.dn_lr, 1.0, f"DDPM-{kind}", ema)
        models[kind] = ema.model
        lap(f"diffusion_train_{kind}")
    return models, v_scale


def requested_angles(n_angles, n_per_angle):
    """Evaluation grid: n_angles evenly spaced directions in [-pi, pi), each requested n_per_angle times. (n,)"""
    grid = -np.pi + 2 * np.pi * np.arange(n_angles) / n_angles
    return np.repeat(grid, n_per_angle).astype(np.float32)


@torch.no_grad()
def sample_reach(cfg, ddpm, models, ae, mu, sigma, T, v_req, v_scale, lap):
    """Conditioned generation: noise -> DDPM with c (angles) or extra (held-out velocity traces v_req (n,2,T), m/s)
    at every step -> un-normalise -> decode -> rates -> Poisson; lap(stage) after each. Returns numpy arrays
    (None where not trained)."""
    device = mu.device
    out = dict(angles_req=None, rates_angle=None, spikes_angle=None, rates_vel=None, spikes_vel=None)
    if "angle" in models:
        out["angles_req"] = requested_angles(cfg.n_angles, cfg.n_per_angle)
        theta = torch.tensor(out["angles_req"])
        c = torch.stack([torch.cos(theta), torch.sin(theta)], 1).to(device)   # (n,2)
        z = ddpm.sample(models["angle"], (len(c), cfg.d_latent, T), cfg.sample_steps, cfg.eta, c=c) * sigma + mu
        rates = base.batched(ae.decode, z)                     # (n,N,T)
        out["rates_angle"] = rates.cpu().numpy()
        out["spikes_angle"] = torch.poisson(rates.cpu()).numpy().astype(np.int64)
        lap("sampling_angle")
    if "velocity" in models:
        extra = (torch.tensor(v_req).to(device) / v_scale)     # (n,2,T)
        z = ddpm.sample(models["velocity"], (len(extra), cfg.d_latent, T), cfg.sample_steps, cfg.eta,
                        extra=extra) * sigma + mu
        rates = base.batched(ae.decode, z)                     # (n,N,T)
        out["rates_vel"] = rates.cpu().numpy()
        out["spikes_vel"] = torch.poisson(rates.cpu()).numpy().astype(np.int64)
        lap("sampling_velocity")
    return out


def reach_metrics(cfg, data, tr, te, rates_hat, gen):
    """metrics.json rows of the reaching demo: the behaviour evaluation, then spike statistics (base compare) of
    the angle-conditioned samples vs all real training trials (their angles cover the circle evenly, so they
    stand for unconditional samples), a size-matched real-vs-real floor, and velocity-conditioned samples vs the
    real held-out trials they were conditioned on."""
    dec = fit_ridge(bins_as_rows(rates_hat[tr].astype(np.float64)), bins_as_rows(data["velocity"][tr]),
                    cfg.ridge_alpha)
    v_req = data["velocity"][te[:cfg.n_vel]]
    res = behaviour_metrics(dec, data, te, rates_hat, gen["angles_req"], gen["rates_angle"], v_req,
                            gen["rates_vel"])
    real = data["spikes"][tr]
    st_real = base.spike_stats(real)
    if gen["spikes_angle"] is not None:
        n = len(gen["spikes_angle"])
        rows = {"angle_gen_vs_real": (base.spike_stats(gen["spikes_angle"]), st_real),
                "real_vs_real_size_matched": (base.spike_stats(real[:n]), base.spike_stats(real[n:]))}
        for row, (a, b) in rows.items():
            res.update({f"{row}/{k}": v for k, v in base.compare(a, b).items()})
    if gen["spikes_vel"] is not None:
        st_te = base.spike_stats(data["spikes"][te[:cfg.n_vel]])
        res.update({f"velocity_gen_vs_real_test/{k}": v for k, v in base.compare(
            base.spike_stats(gen["spikes_vel"]), st_te).items()})
    return res, dec


# -----------------------------------------------------------------------------
# Figures for the reaching demo (paper Fig. 5-style); matplotlib is imported here only
# -----------------------------------------------------------------------------
def make_reach_figures(fig_dir, data, te, dec, angles_req, rates_angle, spikes_angle, v_req, rates_vel):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    hsv = colormaps["hsv"]
    norm = Normalize(-np.pi, np.pi)
    if rates_angle is not None:
        # the fan of reaches: real held-out trajectories and decoded angle-conditioned samples, coloured by angle
        fig = Figure(figsize=(10, 4.6))
        p_real = trajectory(data["velocity"][te])
        p_gen = trajectory(decode_velocity(rates_angle, *dec))
        panels = ((p_real, data["angle"][te], "real held-out reaches (true velocity)"),
                  (p_gen, angles_req, "decoded angle-conditioned samples"))
        for i, (p, ang, title) in enumerate(panels):
            ax = fig.add_subplot(1, 2, i + 1)
            for pk, ak in zip(p, ang):
                ax.plot(pk[0], pk[1], color=hsv(norm(ak)), lw=0.7, alpha=0.6)
            ax.set_aspect("equal")
            ax.set_title(title)
            ax.set_xlabel("x (m)")
            ax.set_ylabel("y (m)")
        sm = fig.colorbar(ax.scatter([], [], c=[], cmap=hsv, norm=norm), ax=ax)
        sm.set_label("requested angle (rad)")
        save_figure(fig, os.path.join(fig_dir, "6_reach_angle_fan.png"))
        # raster of one angle-conditioned trial, neurons sorted by preferred direction
        fig = Figure(figsize=(10, 4.5))
        ax = fig.add_subplot(1, 1, 1)
        order = np.argsort(data["pref_dir"])
        ax.imshow(spikes_angle[0][order], aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set_title(f"generated trial conditioned on angle {np.degrees(angles_req[0]):.0f} deg "
                     "(neurons sorted by preferred direction)")
        ax.set_xlabel("time bin")
        ax.set_ylabel("neuron")
        save_figure(fig, os.path.join(fig_dir, "8_reach_raster.png"))
    if rates_vel is not None:
        # requested (held-out) vs decoded trajectories for a few velocity traces
        fig = Figure(figsize=(10, 4.6))
        n_show = min(6, len(v_req))
        p_req = trajectory(v_req[:n_show])
        v_dec = decode_velocity(rates_vel[:n_show], *dec)
        p_dec = trajectory(v_dec)
        ax = fig.add_subplot(1, 2, 1)
        for i in range(n_show):
            ax.plot(p_req[i, 0], p_req[i, 1], color=f"C{i}", lw=2, alpha=0.5)
            ax.plot(p_dec[i, 0], p_dec[i, 1], color=f"C{i}", lw=1, ls="--")
        ax.set_aspect("equal")
        ax.set_title("requested (thick) vs decoded (dashed) trajectories")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax = fig.add_subplot(1, 2, 2)
        for i in range(min(3, n_show)):
            ax.plot(np.hypot(*v_req[i]), color=f"C{i}", lw=2, alpha=0.5)
            ax.plot(np.hypot(*v_dec[i]), color=f"C{i}", lw=1, ls="--")
        ax.set_title("speed: requested vs decoded")
        ax.set_xlabel("time bin")
        ax.set_ylabel("speed (m/s)")
        save_figure(fig, os.path.join(fig_dir, "7_reach_velocity.png"))
