"""The diffusion process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") and its samplers.

`python ddpm.py` trains the unconditional UNet (see train.py and `python ddpm.py --help`).

Notation: index t in 0..noise_steps-1, beta[t] linear, alpha = 1 - beta, alpha_hat = cumprod(alpha).
The network predicts the noise eps in x_t = sqrt(alpha_hat[t]) x_0 + sqrt(1 - alpha_hat[t]) eps.
All samplers walk from t = noise_steps-1 down and land on the alpha_hat[0] level, as the original's
DDPM loop (999..1) does.
"""
import logging
import os

# GNU OpenMP's waiting threads spin for a long while before they sleep: fast on an idle machine, 3.7x slower
# per training step when another process shares the cores (a laptop, a shared node). A short spin keeps
# most of both (default-config step, 2 cores: idle 123 -> 148 ms, shared 1125 -> 340 ms; README). It must
# be set before torch loads OpenMP, and a user's own OpenMP settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import torch  # noqa: E402
from tqdm import tqdm

SAMPLERS = ("ddpm", "ddim", "dpm++")


def default_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def unwrap(model):
    """The plain network behind DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _at(schedule, t, x):
    """schedule[t] shaped to broadcast against the batch x."""
    return schedule.to(x.device)[t.to(x.device)].view(-1, *([1] * (x.dim() - 1)))


class Diffusion:
    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=256, device=None):
        self.noise_steps = noise_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.img_size = img_size
        self.device = torch.device(device) if device is not None else default_device()

        self.beta = self.prepare_noise_schedule().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)

    @property
    def image_hw(self):
        s = self.img_size
        return (s, s) if isinstance(s, int) else tuple(s)

    def prepare_noise_schedule(self):
        return torch.linspace(self.beta_start, self.beta_end, self.noise_steps)

    def noise_images(self, x, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) in closed form; returns (x_t, the noise used)."""
        eps = torch.randn_like(x) if noise is None else noise
        a = _at(self.alpha_hat, t, x)
        return a.sqrt() * x + (1 - a).sqrt() * eps, eps

    def loss_weight(self, t, gamma=5.0):
        """Min-SNR-gamma weights for the noise-prediction MSE (Hang et al. 2023, "Efficient Diffusion
        Training via Min-SNR Weighting Strategy"): min(SNR_t, gamma) / SNR_t, so the nearly clean timesteps,
        whose noise is easy to predict but says little about the image, stop dominating the gradient."""
        a = self.alpha_hat.to(t.device)[t]
        snr = a / (1 - a)
        return snr.clamp(max=gamma) / snr

    def sample_timesteps(self, n, generator=None):
        """n training timesteps, uniform in [1, noise_steps-1] as the original."""
        return torch.randint(1, self.noise_steps, (n,), generator=generator).to(self.device)

    def timesteps(self, steps=None, spacing="time"):
        """The `steps` timesteps the network is evaluated at, from noise_steps-1 down, and the level each one
        steps to: the next one, and 0 after the last. steps=999 is the original's loop (999..1, landing on 0).

        spacing "time": even in t (DDIM's "linear" choice). "logsnr": even in lambda = log(alpha/sigma), the
        DPM-Solver authors' choice for low-resolution images (Lu et al. 2022, sec. 3.3); uniform t leaves
        one huge lambda step at the end that a multistep solver handles badly."""
        steps = self.noise_steps - 1 if steps is None else steps
        if not 1 <= steps <= self.noise_steps - 1:
            raise ValueError(f"steps must lie in 1..{self.noise_steps - 1}, got {steps}")
        if spacing == "time":
            ts = torch.linspace(self.noise_steps - 1, 0, steps + 1).round().long().tolist()
        elif spacing == "logsnr":
            lam = 0.5 * (self.alpha_hat / (1 - self.alpha_hat)).log().cpu()  # increasing as t falls
            target = torch.linspace(lam[-1].item(), lam[0].item(), steps + 1)
            ts = [int((lam - v).abs().argmin()) for v in target]
            # near t=0 several targets round to one index: keep them distinct, within reach of both ends
            ts = [min(max(t, steps - i), self.noise_steps - 1 - i) for i, t in enumerate(ts)]
            for i in range(steps - 1, -1, -1):
                ts[i] = max(ts[i], ts[i + 1] + 1)
        else:
            raise ValueError(f"unknown spacing {spacing!r}: time or logsnr")
        return ts[:-1], ts[1:]

    # ---- the network's noise prediction, with classifier-free guidance ---------------------------------

    def predict_noise(self, model, x, t, labels=None, cfg_scale=3, batched_cfg=True):
        """eps(x_t). With labels and cfg_scale > 0: torch.lerp(uncond, cond, cfg_scale) as the original,
        both predictions from one pass over a doubled batch (label -1 = unconditional) unless batched_cfg
        is False, which runs the original's two passes."""
        if labels is None:
            return model(x, t)
        if cfg_scale <= 0:
            return model(x, t, labels)
        if not batched_cfg:
            return torch.lerp(model(x, t, None), model(x, t, labels), cfg_scale)
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                             torch.cat([labels, torch.full_like(labels, -1)])).chunk(2)
        return torch.lerp(uncond, cond, cfg_scale)

    def clip_eps(self, x, t, eps):
        """The noise that goes with the x0 prediction clipped to the data range [-1, 1] (Ho et al.'s
        clip_denoised; Saharia et al. 2022's static thresholding, which Lu et al. 2022 pair with
        DPM-Solver++). At t near T, x0 = (x - sigma eps) / alpha divides small eps errors by alpha ~ 0.006:
        an ODE sampler carries that error to the end, where ancestral noise would wash it out."""
        a = _at(self.alpha_hat, t, x)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    # ---- one reverse step of each sampler --------------------------------------------------------------

    def ddpm_step(self, x, t, eps, noise):
        """Algorithm 2 of Ho et al.: variance beta_t, as the original; pass noise=None at the last step."""
        alpha, alpha_hat, beta = _at(self.alpha, t, x), _at(self.alpha_hat, t, x), _at(self.beta, t, x)
        mean = (x - (1 - alpha) / (1 - alpha_hat).sqrt() * eps) / alpha.sqrt()
        return mean if noise is None else mean + beta.sqrt() * noise

    def ddim_step(self, x, t, t_prev, eps, eta, noise):
        """Song et al. 2021, eq. 12: eta=0 deterministic, eta=1 the DDPM posterior variance."""
        a, a_prev = _at(self.alpha_hat, t, x), _at(self.alpha_hat, t_prev, x)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        return x if noise is None else x + sigma * noise

    def dpm_solver_step(self, x, t, t_prev, eps, x0_last, h_last, first_order):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) in data prediction. Returns (x, x0, h)."""
        a, a_prev = _at(self.alpha_hat, t, x), _at(self.alpha_hat, t_prev, x)
        lam, lam_prev = 0.5 * (a / (1 - a)).log(), 0.5 * (a_prev / (1 - a_prev)).log()  # log(alpha/sigma)
        h = lam_prev - lam
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        d = x0
        if x0_last is not None and not first_order:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        x = ((1 - a_prev) / (1 - a)).sqrt() * x - a_prev.sqrt() * torch.expm1(-h) * d
        return x, x0, h

    # ---- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, model, n, labels=None, cfg_scale=3, sampler="ddpm", steps=None, eta=1.0,
               generator=None, noise=None, batched_cfg=True, progress=True, raw=False, spacing=None, clip=None):
        """n images as uint8 (n, C, H, W). The default is the original's: 999 DDPM ancestral steps.

        sampler: "ddpm" (steps defaults to 999), "ddim" (with eta), or "dpm++" (DPM-Solver++(2M), no
        noise injected). generator: a CPU torch.Generator that makes the result repeatable on any device.
        noise: the starting x_T, overriding generator for it. spacing: of the timesteps (see timesteps());
        by default "logsnr" for dpm++ and "time" for the others. clip: clip each x0 prediction to [-1, 1]
        (see clip_eps); by default on for ddim and dpm++, off for ddpm as in the original. raw=True returns
        the final float x as it is (no clamping, no uint8), for tests and measurements."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        net = unwrap(model)
        device = next(net.parameters()).device
        shape = (n, getattr(net, "c_in", 3), *self.image_hw)

        def randn():
            return torch.randn(shape, generator=generator).to(device) if generator is not None \
                else torch.randn(shape, device=device)

        logging.info(f"Sampling {n} new images with {sampler}....")
        if labels is not None:
            labels = torch.as_tensor(labels, device=device).long()
            labels = labels.expand(n) if labels.dim() == 0 else labels  # one label for all n images
            if labels.shape != (n,):
                raise ValueError(f"labels must be one label or n={n} labels, got shape {tuple(labels.shape)}")
        if steps is None and sampler != "ddpm":
            steps = 50
        spacing = spacing or ("logsnr" if sampler == "dpm++" else "time")
        clip = sampler != "ddpm" if clip is None else clip
        ts, ts_prev = self.timesteps(steps, spacing)
        if sampler == "ddpm" and len(ts) != self.noise_steps - 1:
            raise ValueError("the ddpm sampler walks every step: use ddim or dpm++ for fewer steps")
        was_training = model.training
        model.eval()
        try:
            x = randn() if noise is None else noise.to(device)
            x0_last = h_last = None
            for i, (t_now, t_prev) in enumerate(tqdm(list(zip(ts, ts_prev)), desc=sampler, disable=not progress,
                                                     leave=False)):
                last = i == len(ts) - 1
                t = torch.full((n,), t_now, device=device, dtype=torch.long)
                tp = torch.full_like(t, t_prev)
                eps = self.predict_noise(model, x, t, labels, cfg_scale, batched_cfg).float()
                if clip:
                    eps = self.clip_eps(x, t, eps)
                if sampler == "ddpm":
                    x = self.ddpm_step(x, t, eps, None if last else randn())
                elif sampler == "ddim":
                    x = self.ddim_step(x, t, tp, eps, eta, None if last or eta == 0 else randn())
                else:
                    # first order at the start (no history) and, for short runs, at the end: the paper's
                    # "lower order final" steps, which keep few-step sampling stable
                    first = x0_last is None or (last and len(ts) < 15)
                    x, x0_last, h_last = self.dpm_solver_step(x, t, tp, eps, x0_last, h_last, first)
        finally:  # restored as found, also when interrupted
            model.train(was_training)
        return x if raw else to_uint8(x)


def to_uint8(x):
    """[-1, 1] floats to uint8 [0, 255], truncating as the original."""
    return ((x.clamp(-1, 1) + 1) / 2 * 255).type(torch.uint8)


if __name__ == "__main__":
    import train

    train.main(conditional=False)
