"""Sampling from a trained run: its network and diffusion rebuilt from the checkpoint and config.json, and
images generated in batches (sample.py, evaluate.py and the benchmarks call these)."""
import argparse
import dataclasses
import os
import re

import torch

from checkpoints import GUIDE_FILE, load_config, load_model, resolve_ckpt
from config import SECTIONS, check_cfg_min_sigma, check_corrector_snr, own_clip
from diffusion import SAMPLERS
from hardware import autocast, fast_memory_format
from modules import Autoguided
from utils import UserError

OTHER_GUIDE_SCALE = 1.5  # --guide RUN's default scale: measured best for a separate smaller run (docs/sampling.md)
# what a guide must share with the model: everything about the network and the diffusion but its size
GUIDE_MUST_MATCH = tuple(k for k in SECTIONS["network"] + SECTIONS["diffusion"] if k not in ("base_width", "time_dim"))


def load_for_sampling(ckpt, device, **overrides):
    """(checkpoint path, model in eval mode, its RunConfig, its Diffusion) for a checkpoint or run folder.
    overrides (e.g. image_size=32, noise_steps=...) replace the config's values where not None."""
    path = resolve_ckpt(ckpt)
    model, config = load_model(path, device)
    model = model.to(memory_format=fast_memory_format(device))  # the same numbers, faster (hardware.py)
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    if config.image_size <= 0 or config.image_size % 8:
        raise UserError(f"--image-size {config.image_size} is not a positive multiple of 8 (the UNet halves "
                        f"it three times): try {max(8, config.image_size // 8 * 8)}")
    if config.noise_steps < 2:
        raise UserError(f"--noise-steps must be at least 2, got {config.noise_steps}")
    diffusion = config.make_diffusion(device)
    try:
        diffusion.prediction_of(model)
    except ValueError as e:  # an option against what the weights say they were trained with
        raise UserError(f"--ckpt {path}: {e}") from None
    return path, model, config, diffusion


def add_sampling_options(opt):
    """The options sample.py and evaluate.py share (opt: utils.option_adder); the unset ones take the run's
    grid settings (see resolve_sampling)."""
    opt("--labels", help="conditional checkpoints: 6, 0-9 or 1,3,5 (default: every class)")
    opt("--sampler", choices=SAMPLERS, help="ddpm walks all noise steps (default: the run's grid sampler)")
    opt("--steps", type=int, help="network evaluations per image (default: the run's, or the sampler's)")
    opt("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: the run's)")
    opt("--cfg-scale", type=float, help="classifier-free guidance scale, 0: none (default: the run's)")
    opt("--cfg-min-sigma", type=float, help="guide only at noise levels sigma_t above this (1: t >= 259), 0: at "
                                            "every step (default: the run's)")
    opt("--guide", help="autoguidance by this weaker model of the same kind, a checkpoint or run folder "
                        "(default: the run's own guide_ckpt.pt, where it has one; docs/sampling.md)")
    opt("--guide-scale", type=float, help="autoguidance: torch.lerp(guide, model, scale), 1: off (default: the "
                                          f"run's guide_scale with its own guide, {OTHER_GUIDE_SCALE} with --guide)")
    opt("--corrector-snr", type=float, help="a Langevin corrector step after each step, of this step-to-noise "
                                            "ratio; twice the evaluations (0: none; default: the run's, with its "
                                            "sampler)")
    opt("--clip", action=argparse.BooleanOptionalAction,
        help="clip each step's x0 prediction to the data range (default: the run's, with its sampler; else the "
             "sampler's own: ddim and dpm++ clip, ddpm does not)")
    opt("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    opt("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="bf16 autocast on CUDA and CPUs with AMX (fp16 on CUDA without bf16; hardware.py); --no-amp: fp32")


def resolve_sampling(a, config):
    """Fill a's unset sampler, steps, eta, corrector, clip and guidance settings from the run's config, and
    check them."""
    last = config.noise_steps - 1
    same_sampler = a.sampler in (None, config.sampler)
    a.sampler = a.sampler or config.sampler
    if a.sampler == "ddpm" and a.steps not in (None, last):
        raise UserError(f"--sampler ddpm walks all {last} steps: use ddim or dpm++ for --steps")
    if a.steps is None:
        a.steps = last if a.sampler == "ddpm" else \
            min(config.sample_steps if same_sampler else SAMPLERS[a.sampler].default_steps, last)
    if not 1 <= a.steps <= last:
        raise UserError(f"--steps must lie in 1..{last}, got {a.steps}")
    if a.eta is not None and a.eta < 0:
        raise UserError(f"--eta must be >= 0, got {a.eta}")
    a.eta = config.eta if a.eta is None else a.eta
    if a.corrector_snr is None:  # the run's corrector goes with its own sampler, not with a deterministic one
        a.corrector_snr = config.corrector_snr if same_sampler and a.eta > 0 else 0.0
    check_corrector_snr(a.corrector_snr)
    if a.clip is None:  # the run's clip goes with its own sampler and eta too
        a.clip = own_clip(config, a.sampler, a.eta)
    resolve_guidance(a, config)


def describe_sampling(a, guided=None, takes_labels=False):
    """resolve_sampling's settings in words, for the line that says how samples were drawn; guided: with_guide's
    note. The clip is always named: a run saved before the setting clips as its sampler does."""
    clip = SAMPLERS[a.sampler].clip if a.clip is None else a.clip
    cfg = f", CFG {a.cfg_scale:g}" + (f" where sigma > {a.cfg_min_sigma:g}" if a.cfg_min_sigma else "")
    return (f"{a.sampler} {a.steps} steps" + (f", {guided}" if guided else "") + (cfg if takes_labels else "")
            + (f", corrector {a.corrector_snr}" if a.corrector_snr else "")
            + (", x0 clipped" if clip else ", x0 unclipped"))


def resolve_guidance(a, config):
    """Fill a's unset guidance scale and cut-off from the run's config, and check them."""
    a.cfg_scale = config.cfg_scale if a.cfg_scale is None else a.cfg_scale
    a.cfg_min_sigma = config.cfg_min_sigma if a.cfg_min_sigma is None else a.cfg_min_sigma
    check_cfg_min_sigma(a.cfg_min_sigma)


def with_guide(model, config, ckpt, device, guide=None, scale=None):
    """(the network to sample with, a note of its autoguidance or None): `model` wrapped in Autoguided by
    `guide` (a checkpoint or run folder) or, without one, by the run's own guide_ckpt.pt where it has one, at
    `scale` (default: the run's guide_scale; 1: the model alone). Checks that the two fit together."""
    if scale is not None and scale <= 0:
        raise UserError(f"--guide-scale must be positive (1: no autoguidance), got {scale}")
    if guide is None:
        guide = os.path.join(os.path.dirname(ckpt), GUIDE_FILE)
        if not os.path.isfile(guide):
            if scale not in (None, 1):
                raise UserError(f"--guide-scale {scale}: {ckpt} has no {GUIDE_FILE} beside it: pass --guide RUN, "
                                "the weaker model to guide with")
            return model, None
        scale = config.guide_scale if scale is None else scale
    scale = OTHER_GUIDE_SCALE if scale is None else scale
    if scale == 1:
        return model, None
    # a bare checkpoint (the original's) says nothing of its diffusion: a bare guide takes the model's T
    bare = load_config(os.path.dirname(os.path.abspath(resolve_ckpt(guide)))) is None
    guide_path, guide_model, guide_config, _ = load_for_sampling(
        guide, device, image_size=config.image_size, noise_steps=config.noise_steps if bare else None)
    differ = [f"{k} {getattr(guide_config, k)} (the model's: {getattr(config, k)})" for k in GUIDE_MUST_MATCH
              if getattr(guide_config, k) != getattr(config, k) and (k != "num_classes" or config.takes_labels)]
    if differ:
        raise UserError(f"--guide {guide}: it must be the same kind of model, trained on the same data; its "
                        + ", ".join(differ))
    return Autoguided(model, guide_model, scale), f"autoguidance {scale} by {guide_path}"


def parse_labels(text, num_classes):
    """'6', '0-9', '1,3,5' or '0-4,7' to a list of ints, each checked against the checkpoint's classes."""
    labels = []
    for part in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m or (m[2] is not None and int(m[2]) < int(m[1])):
            raise UserError(f"--labels {text}: write one label (6), a range (0-9) or a list (1,3,5)")
        labels += range(int(m[1]), int(m[2] if m[2] is not None else m[1]) + 1)
    bad = sorted({x for x in labels if not 0 <= x < num_classes})
    if bad:
        raise UserError(f"--labels {text}: label(s) {', '.join(map(str, bad))} out of range: the checkpoint "
                        f"has {num_classes} classes, 0-{num_classes - 1}")
    return labels


def labels_for(config, text, ckpt="the checkpoint"):
    """The labels a --labels option asks of this model (every class by default; None when unconditional)."""
    if config.conditional:
        return parse_labels(text, config.num_classes) if text is not None else list(range(config.num_classes))
    if text is not None:
        raise UserError(f"--labels {text}: {ckpt} is an unconditional checkpoint and takes no labels")
    return None


def cluster_draws(sizes, n, generator=None):
    """n clusters of a --clusters run, each drawn in proportion to the images in it: the images' own mix."""
    return torch.multinomial(torch.tensor(sizes, dtype=torch.float), n, replacement=True, generator=generator)


def generate(model, diffusion, n, labels=None, cfg_scale=3.0, sampler="ddim", steps=None, eta=1.0,
             seed=None, batch_size=500, progress=True, amp_dtype=None, cfg_min_sigma=0.0, corrector_snr=0.0,
             clip=None, clusters=None):
    """n images per label (or n in all without labels) as uint8 (N, C, H, W), label-major, and their labels
    (None for an unconditional model). The same seed and batch size give the same images. amp_dtype: the
    network runs under that autocast (hardware.autocast_dtype), None for fp32. clip: Diffusion.sample's.
    clusters: a --clusters run's cluster_sizes; each image's cluster is drawn from them (and not returned)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    all_labels = torch.tensor(labels).repeat_interleave(n) if labels is not None else None
    if clusters is not None:
        all_labels = cluster_draws(clusters, n, g)
    total = n * len(labels) if labels is not None else n
    out = []
    for i in range(0, total, batch_size):
        b = min(batch_size, total - i)
        y = all_labels[i:i + b] if all_labels is not None else None
        with autocast(diffusion.device, amp_dtype):
            out.append(diffusion.sample(model, b, y, cfg_scale=cfg_scale, sampler=sampler, steps=steps, eta=eta,
                                        generator=g, progress=progress, cfg_min_sigma=cfg_min_sigma,
                                        corrector_snr=corrector_snr, clip=clip).cpu())
    return torch.cat(out), all_labels if labels is not None else None
