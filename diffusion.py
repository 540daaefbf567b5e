"""The diffusion process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"): the noise schedule,
noising in closed form, the training loss and its weighting, classifier-free guidance, and the samplers.

Notation: index t in 0..noise_steps-1, beta[t] linear, alpha = 1 - beta, alpha_hat = cumprod(alpha),
x_t = sqrt(alpha_hat[t]) x_0 + sqrt(1 - alpha_hat[t]) eps. The network predicts eps (the original), v or x0:
a model whose weights say so (modules.UNet.trained_with) is sampled as they say, any other as `prediction`
(default eps); every sampler works on the eps the prediction implies. All samplers walk from
t = noise_steps-1 down and land on the alpha_hat[0] level, as the original's DDPM loop (999..1) does.
"""
import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hardware import default_device
from modules import unwrap

PREDICTIONS = ("eps", "v", "x0")


def _at(schedule, t, x):
    """schedule[t] shaped to broadcast against the batch x."""
    return schedule.to(x.device)[t.to(x.device)].view(-1, *([1] * (x.dim() - 1)))


def to_uint8(x):
    """[-1, 1] floats to uint8 [0, 255], truncating as the original."""
    return ((x.clamp(-1, 1) + 1) / 2 * 255).type(torch.uint8)


class Diffusion:
    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=256, device=None,
                 prediction=None):
        if prediction not in (None, *PREDICTIONS):
            raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")
        self.noise_steps = noise_steps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.img_size = img_size
        self.prediction = prediction or "eps"  # the training target, and how models that do not say are sampled
        self.prediction_given = prediction is not None
        self.device = torch.device(device) if device is not None else default_device()

        self.beta = self.prepare_noise_schedule().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = torch.cumprod(self.alpha, dim=0)
        # signal-to-noise ratio alpha_hat / (1 - alpha_hat): the min-SNR weight, the noise level sigma_t =
        # SNR^-1/2 the guidance interval reads, and lambda = log(SNR) / 2 that DPM-Solver steps in
        self.snr = self.alpha_hat / (1 - self.alpha_hat)
        self._weight_tables = {}

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

    def sample_timesteps(self, n, generator=None):
        """n training timesteps, uniform in [1, noise_steps-1] as the original (its global CPU RNG, unless a
        generator is given: then on the generator's device)."""
        if generator is None:
            return torch.randint(1, self.noise_steps, (n,)).to(self.device)
        return torch.randint(1, self.noise_steps, (n,), generator=generator, device=generator.device)

    def sample_weighted_timesteps(self, n, gamma, generator=None):
        """n training timesteps in [1, noise_steps-1] drawn in proportion to their min-SNR-gamma weight
        (importance sampling): uniform t spends about half the batch where that weight is below 0.05 and
        adds almost nothing to the gradient. training_loss(importance_sampled=True) divides the proportion
        back out, so the expected loss is the uniform one's and only its variance falls."""
        device = generator.device if generator is not None else self.device
        t = torch.multinomial(self.weight_table(gamma).to(device), n, replacement=True, generator=generator)
        return t + 1

    def weight_table(self, gamma):
        """loss_weight(t, gamma) for t = 1..noise_steps-1, built once per gamma: every weighted step reads it
        twice (to draw t, and for its mean in training_loss)."""
        if gamma not in self._weight_tables:
            self._weight_tables[gamma] = self.loss_weight(torch.arange(1, self.noise_steps, device=self.snr.device),
                                                          gamma)
        return self._weight_tables[gamma]

    # ---- what the network predicts, and the training loss ---------------------------------------------

    def target(self, x0, t, noise):
        """What the network learns to output for x_t made from x0 and noise."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = _at(self.alpha_hat, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v (Salimans & Ho 2022)

    def eps_from_output(self, x, t, out, prediction=None):
        """The noise eps that the network's output `out` at x_t = x implies (the inverse of target()), for a
        network that predicts `prediction` (default: this Diffusion's)."""
        prediction = prediction or self.prediction
        if prediction == "eps":
            return out
        a = _at(self.alpha_hat, t, x)
        if prediction == "x0":
            return (x - a.sqrt() * out) / (1 - a).sqrt()
        return a.sqrt() * out + (1 - a).sqrt() * x

    def loss_weight(self, t, gamma=5.0):
        """Min-SNR-gamma weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy"): the weight that turns each target's MSE into min(SNR_t, gamma) times the x0 error, so the
        nearly clean timesteps, whose noise is easy to predict but says little about the image, stop
        dominating the gradient. eps: min(SNR, gamma) / SNR; v: min(SNR, gamma) / (SNR + 1); x0: min(SNR, gamma)."""
        snr = self.snr.to(t.device)[t]
        clipped = snr.clamp(max=gamma)
        return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[self.prediction]

    def training_loss(self, out, x0, t, noise, min_snr_gamma=0.0, importance_sampled=False):
        """(the loss to minimise, the per-sample plain MSE) for the network's output on x_t(x0, t, noise).
        min_snr_gamma=0 is the original's plain MSE. importance_sampled: t came from
        sample_weighted_timesteps, which already applied the weight up to its mean over uniform t."""
        mse = F.mse_loss(out.float(), self.target(x0, t, noise), reduction="none").mean(dim=tuple(range(1, x0.dim())))
        if not min_snr_gamma:
            return mse.mean(), mse
        if importance_sampled:
            return mse.mean() * self.weight_table(min_snr_gamma).mean().to(mse.device), mse
        return (mse * self.loss_weight(t, min_snr_gamma)).mean(), mse

    # ---- the network's noise prediction, with classifier-free guidance ---------------------------------

    def prediction_of(self, model):
        """What `model` predicts: what its weights say (modules.UNet.trained_with), else this Diffusion's
        prediction. A ValueError where the two disagree, or where the weights were trained on another noise
        schedule: sampled so, they would give wrong images without a word."""
        trained = getattr(unwrap(model), "trained_with", None) or {}
        own = trained.get("prediction")
        if own is not None and self.prediction_given and own != self.prediction:
            raise ValueError(f"Diffusion(prediction={self.prediction!r}) contradicts the model, whose weights "
                             f"predict {own!r}: drop prediction= (the weights say it) or pass {own!r}")
        schedule = {"noise_steps": self.noise_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}
        differ = [f"{k}={trained[k]}" for k in schedule if k in trained and trained[k] != schedule[k]]
        if differ:
            ours = ", ".join(f"{k}={schedule[k]}" for k in schedule)
            raise ValueError(f"the model was trained with {', '.join(differ)}, this Diffusion has {ours}: "
                             f"build Diffusion({', '.join(differ)}, ...)")
        return own or self.prediction

    def predict_noise(self, model, x, t, labels=None, cfg_scale=3, batched_cfg=True):
        """eps(x_t). With labels and cfg_scale > 0: torch.lerp(uncond, cond, cfg_scale) as the original,
        both predictions from one pass over a doubled batch (label -1 = unconditional) unless batched_cfg
        is False, which runs the original's two passes. Guidance mixes the raw outputs: the conversion to
        eps is affine in them, so it makes no difference which comes first."""
        if labels is None:
            out = model(x, t)
        elif cfg_scale <= 0:
            out = model(x, t, labels)
        elif not batched_cfg:
            out = torch.lerp(model(x, t, None), model(x, t, labels), cfg_scale)
        else:
            cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]),
                                 torch.cat([labels, torch.full_like(labels, -1)])).chunk(2)
            out = torch.lerp(uncond, cond, cfg_scale)
        return self.eps_from_output(x, t, out.float(), self.prediction_of(model))

    def clip_eps(self, x, t, eps):
        """The noise that goes with the x0 prediction clipped to the data range [-1, 1] (Ho et al.'s
        clip_denoised; Saharia et al. 2022's static thresholding, which Lu et al. 2022 pair with
        DPM-Solver++). At t near T, x0 = (x - sigma eps) / alpha divides small eps errors by alpha ~ 0.006:
        an ODE sampler carries that error to the end, where ancestral noise would wash it out."""
        a = _at(self.alpha_hat, t, x)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

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
            lam = 0.5 * self.snr.log().cpu()  # increasing as t falls
            target = torch.linspace(lam[-1].item(), lam[0].item(), steps + 1)
            ts = [int((lam - v).abs().argmin()) for v in target]
            # near t=0 several targets round to one index: keep them distinct, within reach of both ends
            ts = [min(max(t, steps - i), self.noise_steps - 1 - i) for i, t in enumerate(ts)]
            for i in range(steps - 1, -1, -1):
                ts[i] = max(ts[i], ts[i + 1] + 1)
        else:
            raise ValueError(f"unknown spacing {spacing!r}: time or logsnr")
        return ts[:-1], ts[1:]

    # ---- one reverse step of each sampler (the SAMPLERS below call these) ------------------------------

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
        lam, lam_prev = 0.5 * _at(self.snr, t, x).log(), 0.5 * _at(self.snr, t_prev, x).log()  # log(alpha/sigma)
        h = lam_prev - lam
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        d = x0
        if x0_last is not None and not first_order:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_last
        x = ((1 - a_prev) / (1 - a)).sqrt() * x - a_prev.sqrt() * torch.expm1(-h) * d
        return x, x0, h

    def langevin_step(self, x, t, eps, snr, noise):
        """One Langevin corrector step at level t (Song et al. 2021, "Score-Based Generative Modeling through
        Stochastic Differential Equations", Algorithm 5, per sample): x moves along the score
        -eps / sqrt(1 - alpha_hat_t) and takes fresh noise, the step sized so that the move is about snr times
        the noise added. Repeated, such steps draw from the model's own density at t: they pull a sample that
        the last step left between modes toward one, which a poorly trained model's reverse steps do not."""
        score = -eps / _at(1 - self.alpha_hat, t, x).sqrt()
        ratio = noise.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1)
        step = 2 * _at(self.alpha, t, x) * (snr * ratio).square().view(-1, *([1] * (x.dim() - 1)))
        return x + step * score + (2 * step).sqrt() * noise

    # ---- sampling ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, model, n, labels=None, cfg_scale=3, sampler="ddpm", steps=None, eta=1.0,
               generator=None, noise=None, batched_cfg=True, progress=True, raw=False, spacing=None, clip=None,
               cfg_min_sigma=0.0, corrector_snr=0.0):
        """n images as uint8 (n, C, H, W). The default is the original's: 999 DDPM ancestral steps.

        sampler: a name in SAMPLERS: "ddpm" (steps defaults to 999), "ddim" (with eta), or "dpm++"
        (DPM-Solver++(2M), no noise injected). generator: a CPU torch.Generator that makes the result
        repeatable on any device. noise: the starting x_T, overriding generator for it. spacing: of the
        timesteps (see timesteps()); clip: clip each x0 prediction to [-1, 1] (see clip_eps); both default to
        the sampler's own choice. cfg_min_sigma: guide only where the noise level sigma_t = sqrt((1 - alpha_hat_t)
        / alpha_hat_t) exceeds it, and take the conditional prediction alone below (the lower end of Kynkaenniemi
        et al. 2024's guidance interval; 1 is t >= 259 on the original's schedule): near the clean end guidance
        no longer decides the class and moves samples away from the data (docs/quality.md), and skipping it
        saves the unconditional passes there; 0 guides every step, as the original. corrector_snr: after each
        step but the last, one Langevin corrector step at the level reached (langevin_step; Song et al.'s
        predictor-corrector sampling), with the network's own, unclipped eps: twice the network evaluations;
        0: none, as the original. raw=True returns the final float x as it is (no clamping, no uint8), for
        tests and measurements."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        net = unwrap(model)
        device = next(net.parameters()).device
        shape = (n, getattr(net, "c_in", 3), *self.image_hw)

        def randn():
            return torch.randn(shape, generator=generator).to(device) if generator is not None \
                else torch.randn(shape, device=device)

        logging.info(f"Sampling {n} new images with {sampler}....")
        labels = self._labels(labels, n, device)
        kind = SAMPLERS[sampler]
        ts, ts_prev = self.timesteps(steps if steps is not None else kind.default_steps, spacing or kind.spacing)
        if kind.walks_every_step and len(ts) != self.noise_steps - 1:
            raise ValueError(f"the {sampler} sampler walks every step: use ddim or dpm++ for fewer steps")
        stepper = kind(self, eta=eta, steps=len(ts))
        noise_level = self.snr.rsqrt().tolist()  # sigma_t, one host transfer per call
        clip = kind.clip if clip is None else clip
        was_training = model.training
        model.eval()

        def eps_at(x, t, level):  # level: t's value, read without a device sync
            guided = noise_level[level] > cfg_min_sigma
            return self.predict_noise(model, x, t, labels, cfg_scale if guided else 0, batched_cfg)

        try:
            x = randn() if noise is None else noise.to(device)
            for i, (t_now, t_prev) in enumerate(tqdm(list(zip(ts, ts_prev)), desc=sampler, disable=not progress,
                                                     leave=False)):
                last = i == len(ts) - 1
                t = torch.full((n,), t_now, device=device, dtype=torch.long)
                t_next = torch.full_like(t, t_prev)
                eps = eps_at(x, t, t_now)
                if clip:
                    eps = self.clip_eps(x, t, eps)
                x = stepper.step(x, t, t_next, eps, last, randn)
                if corrector_snr and not last:
                    x = self.langevin_step(x, t_next, eps_at(x, t_next, t_prev), corrector_snr, randn())
        finally:  # restored as found, also when interrupted
            model.train(was_training)
        return x if raw else to_uint8(x)

    @staticmethod
    def _labels(labels, n, device):
        """None, or n labels as a LongTensor on `device` (one label is repeated n times)."""
        if labels is None:
            return None
        labels = torch.as_tensor(labels, device=device).long()
        labels = labels.expand(n) if labels.dim() == 0 else labels
        if labels.shape != (n,):
            raise ValueError(f"labels must be one label or n={n} labels, got shape {tuple(labels.shape)}")
        return labels


# ---- the samplers: each one reverse step at a time, with whatever history it keeps ----------------------

class DDPMSampler:
    """The original's ancestral sampler (Ho et al., Algorithm 2), unclipped; it walks every timestep."""
    default_steps, spacing, clip, walks_every_step = None, "time", False, True

    def __init__(self, diffusion, eta, steps):
        self.diffusion = diffusion

    def step(self, x, t, t_prev, eps, last, randn):
        return self.diffusion.ddpm_step(x, t, eps, None if last else randn())


class DDIMSampler:
    """DDIM (Song et al. 2021) at any number of steps; eta=1 adds the DDPM posterior's noise."""
    default_steps, spacing, clip, walks_every_step = 50, "time", True, False

    def __init__(self, diffusion, eta, steps):
        self.diffusion, self.eta = diffusion, eta

    def step(self, x, t, t_prev, eps, last, randn):
        noise = None if last or self.eta == 0 else randn()
        return self.diffusion.ddim_step(x, t, t_prev, eps, self.eta, noise)


class DPMSolverPPSampler:
    """DPM-Solver++(2M) (Lu et al. 2022): deterministic, second order from the second step on."""
    default_steps, spacing, clip, walks_every_step = 50, "logsnr", True, False

    def __init__(self, diffusion, eta, steps):
        self.diffusion, self.steps = diffusion, steps
        self.x0_last = self.h_last = None

    def step(self, x, t, t_prev, eps, last, randn):
        # first order at the start (no history) and, for short runs, at the end: the paper's "lower order
        # final" steps, which keep few-step sampling stable
        first = self.x0_last is None or (last and self.steps < 15)
        x, self.x0_last, self.h_last = self.diffusion.dpm_solver_step(x, t, t_prev, eps, self.x0_last,
                                                                      self.h_last, first)
        return x


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpm++": DPMSolverPPSampler}
