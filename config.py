"""Every setting of a run: RunConfig at ddpm.py's defaults, and DIFFERENCES beside it, where ddpm_conditional.py's
and the original's (--preset original) differ; each value written once.

A run's config is saved as models/<run>/config.json beside its checkpoints (checkpoints.py); sample.py,
evaluate.py and --resume rebuild the network, the diffusion and the data from it.
"""
import dataclasses
from dataclasses import dataclass

from diffusion import PREDICTIONS, SAMPLERS, Diffusion
from modules import UNet, UNet_conditional
from utils import UserError


@dataclass
class RunConfig:
    # the network (modules.UNet / UNet_conditional)
    conditional: bool = False
    clusters: int = 0  # condition on up to this many k-means clusters of the images, guide by them (0: none)
    channels: int = None  # c_in = c_out; None: 1 for the bundled digits, else 3
    base_width: int = 16
    num_classes: int = None  # None: the dataset's class count, set when the data is read (the digits: 10)
    time_dim: int = 256
    # the diffusion (diffusion.Diffusion)
    noise_steps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "v"  # what the network predicts: eps (the original), v or x0
    # the data
    image_size: int = 16
    dataset_path: str = None  # None: the bundled MNIST digits
    crop: str = "center"  # or "random": the original's zooming crops
    cluster_sizes: list = None  # --clusters: images per cluster, set when the images are clustered
    # the training recipe
    epochs: int = 12  # 1,872 steps of 32 on the bundled digits
    batch_size: int = 32
    lr: float = 3e-3
    adam_beta2: float = 0.99  # AdamW's second-moment decay; 0.999 (PyTorch's default) as the original
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    lr_schedule: str = "cosine"  # down to lr_floor * lr at the run's last step; or "constant"
    lr_floor: float = 0.1
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0: off
    min_snr_gamma: float = 5.0
    timesteps: str = "weighted"  # drawn in proportion to their min-SNR weight; "uniform" as the original
    ema: bool = True
    ema_beta: float = 0.99
    ema_start: int = 0  # steps of hard copy before the averaging starts
    guide_at: float = 0.25  # also save the EMA weights after this share of the epochs as guide_ckpt.pt (0: not)
    label_dropout: float = 0.1
    label_dropout_mode: str = "sample"
    seed: int = None
    data_seed: int = None  # the data order and each step's noise; drawn once, kept on resume
    # the sample grids
    sample_interval: int = 10
    n_samples: int = 64
    sampler: str = "ddim"
    sample_steps: int = 100  # autoguided samples gain from 100 (docs/sampling.md); CFG'd ones are done at 50
    eta: float = 1.0
    cfg_scale: float = 1.6  # for labels: ddpm_conditional.py's (--clusters K brings its own, CLUSTERED_DEFAULTS)
    cfg_min_sigma: float = 1.0  # guidance only where sigma_t > this, t >= 259 (0: at every step, as the original)
    guide_scale: float = 2.0  # autoguidance by guide_ckpt.pt, where the run has one (1: off; sampling.with_guide)
    corrector_snr: float = 0.3  # a Langevin corrector step after each sampling step (0: none; docs/sampling.md)
    clip: bool = False  # clip each x0 prediction to [-1, 1] (None: the sampler's own, ddim and dpm++ clip)
    # the run and this machine
    run_name: str = None
    preset: str = "default"
    device: str = "auto"
    num_workers: int = None  # None: 0 on the CPU, 4 on a GPU
    compile: bool = False
    cuda_graphs: bool = True  # one process on a GPU: replay the network's step as CUDA graphs (train.py)
    amp: bool = True

    @property
    def takes_labels(self):
        """The network is UNet_conditional: labels are the dataset's classes, or --clusters' clusters."""
        return self.conditional or bool(self.clusters)

    def make_model(self):
        """The network, marked with the diffusion it is trained with (saved in its checkpoints' metadata)."""
        if self.takes_labels:
            model = UNet_conditional(self.channels, self.channels, self.time_dim, self.num_classes,
                                     base_width=self.base_width)
        else:
            model = UNet(self.channels, self.channels, self.time_dim, base_width=self.base_width)
        model.trained_with = self.trained_with()
        return model

    def trained_with(self):
        """What sampling the network right needs beyond its shape: modules.UNet.trained_with."""
        return {k: getattr(self, k) for k in ("prediction", "noise_steps", "beta_start", "beta_end", "image_size")}

    def make_diffusion(self, device=None):
        return Diffusion(self.noise_steps, self.beta_start, self.beta_end, self.image_size, device,
                         prediction=self.prediction)

    def to_json(self):
        values = dataclasses.asdict(self)
        return {section: {k: values[k] for k in keys} for section, keys in SECTIONS.items()}

    @classmethod
    def from_json(cls, sections, source="config.json"):
        flat = {**ADDED_LATER, **{k: v for section in sections.values() for k, v in section.items()}}
        unknown = sorted(set(flat) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"{source}: unknown setting(s) {', '.join(unknown)}: written by a newer version?")
        return cls(**flat)


SECTIONS = {
    "network": ("conditional", "clusters", "channels", "base_width", "num_classes", "time_dim"),
    "diffusion": ("noise_steps", "beta_start", "beta_end", "prediction"),
    "data": ("image_size", "dataset_path", "crop", "cluster_sizes"),
    "training": ("epochs", "batch_size", "lr", "adam_beta2", "warmup_steps", "lr_schedule", "lr_floor", "grad_clip",
                 "min_snr_gamma", "timesteps", "ema", "ema_beta", "ema_start", "guide_at",
                 "label_dropout", "label_dropout_mode", "seed", "data_seed"),
    "sample_grids": ("sample_interval", "n_samples", "sampler", "sample_steps", "eta", "cfg_scale",
                     "cfg_min_sigma", "guide_scale", "corrector_snr", "clip"),
    "run": ("run_name", "preset", "device", "num_workers", "compile", "cuda_graphs", "amp"),
}
# what fixes the network, the diffusion and the data's shape: a resumed run keeps its own
RUN_DEFINING = SECTIONS["network"] + SECTIONS["diffusion"] + ("image_size",)

ORIGINAL_NUM_CLASSES = 10  # the original's hard-coded count: its preset, and runs saved before it came from the data

# RunConfig's defaults above are ddpm.py's. Where ddpm_conditional.py's and the original's (--preset original: the
# original repo's two scripts as they were) differ from them, side by side; a setting not named here is the same
# everywhere. AS_DDPM: the same as ddpm.py's in that preset.
AS_DDPM = "as ddpm.py"
#                    ddpm_conditional.py  --preset original: ddpm.py   ddpm_conditional.py
DIFFERENCES = {
    "image_size":         (AS_DDPM,           64,                          AS_DDPM),
    "channels":           (AS_DDPM,           3,                           AS_DDPM),
    "base_width":         (AS_DDPM,           64,                          AS_DDPM),
    "num_classes":        (AS_DDPM,           ORIGINAL_NUM_CLASSES,        AS_DDPM),
    "prediction":         (AS_DDPM,           "eps",                       AS_DDPM),
    "crop":               (AS_DDPM,           "random",                    AS_DDPM),
    "epochs":             (AS_DDPM,           500,                         300),
    "batch_size":         (AS_DDPM,           12,                          14),
    "lr":                 (AS_DDPM,           3e-4,                        AS_DDPM),
    "adam_beta2":         (AS_DDPM,           0.999,                       AS_DDPM),
    "warmup_steps":       (AS_DDPM,           0,                           AS_DDPM),
    "lr_schedule":        (AS_DDPM,           "constant",                  AS_DDPM),
    "grad_clip":          (AS_DDPM,           0.0,                         AS_DDPM),
    "min_snr_gamma":      (AS_DDPM,           0.0,                         AS_DDPM),
    "timesteps":          (AS_DDPM,           "uniform",                   AS_DDPM),
    "ema":                (AS_DDPM,           False,                       True),
    "ema_beta":           (AS_DDPM,           0.995,                       AS_DDPM),
    "ema_start":          (AS_DDPM,           2000,                        AS_DDPM),
    "label_dropout_mode": (AS_DDPM,           "batch",                     AS_DDPM),
    "guide_at":           (0.0,               0.0,                         AS_DDPM),  # CFG guides a conditional run
    "sample_interval":    (AS_DDPM,           1,                           10),
    "n_samples":          (80,                12,                          10),
    "sampler":            (AS_DDPM,           "ddpm",                      AS_DDPM),
    "sample_steps":       (50,                999,                         AS_DDPM),  # CFG'd samples are done at 50
    "cfg_scale":          (AS_DDPM,           3.0,                         AS_DDPM),
    "cfg_min_sigma":      (AS_DDPM,           0.0,                         AS_DDPM),
    "corrector_snr":      (0.0,               0.0,                         AS_DDPM),
    "clip":               (AS_DDPM,           None,                        AS_DDPM),
}
# what each preset changes from RunConfig's defaults in ddpm.py (preset_config adds ddpm_conditional.py's column)
PRESETS = {"default": {}, "original": {k: cells[1] for k, cells in DIFFERENCES.items()}}
# `ddpm.py --clusters K` (K >= 2) brings these with it, unless given: clusters guide by CFG, which is done at 50
# steps, with neither the run's own guide nor a corrector (docs/quality.md#guided-by-its-own-clusters)
CLUSTERED_DEFAULTS = dict(cfg_scale=2.5, sample_steps=50, guide_at=0.0, corrector_snr=0.0)
IMAGES_PER_CLUSTER = 10  # --clusters K finds at most one cluster per this many images
# settings added to config.json later, and what a run saved without them trained with
ADDED_LATER = dict(timesteps="uniform", cfg_min_sigma=0.0, adam_beta2=0.999, guide_at=0.0, guide_scale=1.0,
                   corrector_snr=0.0, clip=None, clusters=0, cluster_sizes=None)
# what a run of an earlier version (its state.pt "args", no config.json) trained with, where its args are silent
# (and bare checkpoints, the original's: they sample as they always did here, DDIM-50)
LEGACY = dict(crop="random", prediction="eps", warmup_steps=0, lr_floor=0.0, grad_clip=0.0,
              num_classes=ORIGINAL_NUM_CLASSES, sample_steps=50, **ADDED_LATER)


def guide_epoch(c):
    """After which epoch the run saves its EMA weights as the autoguidance guide (None: it does not)."""
    return max(1, round(c.epochs * c.guide_at)) if c.guide_at else None


def preset_config(preset, conditional):
    """A new run's settings before its options: the preset's column of DIFFERENCES over RunConfig's defaults."""
    changes = dict(PRESETS[preset])
    if conditional:
        column = 0 if preset == "default" else 2
        changes.update({k: cells[column] for k, cells in DIFFERENCES.items() if cells[column] != AS_DDPM})
    return RunConfig(conditional=conditional, preset=preset, **changes)


def cluster_count(requested, n_images):
    """How many clusters --clusters K finds in n images: K, but at most one per IMAGES_PER_CLUSTER, at least 2."""
    return min(requested, max(2, n_images // IMAGES_PER_CLUSTER))


def own_clip(base, sampler, eta):
    """base.clip where sampling goes with base's sampler and eta, with which its clip was chosen, else None:
    the sampler's own choice (docs/sampling.md). base: a preset, or a run's saved config."""
    return base.clip if (sampler, eta) == (base.sampler, base.eta) else None


def check_cfg_min_sigma(value):
    if not value >= 0:  # also NaN
        raise UserError(f"--cfg-min-sigma must be >= 0 (0: guidance at every step), got {value}")


def check_corrector_snr(value):
    if not 0 <= value < 1:  # also NaN
        raise UserError(f"--corrector-snr must lie in [0, 1) (0: no corrector; {RunConfig.corrector_snr}: the "
                        f"unconditional default), got {value}")


def validate(c):
    """A UserError naming the option and the fix for any setting that cannot work."""
    for name in ("epochs", "batch_size", "image_size", "base_width", "n_samples", "sample_interval",
                 "sample_steps", "noise_steps", "num_classes"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
    if not c.lr > 0:  # written so that NaN fails too
        raise UserError(f"--lr must be positive, got {c.lr}")
    if not c.min_snr_gamma >= 0:
        raise UserError(f"--min-snr-gamma must be >= 0 (0: plain MSE), got {c.min_snr_gamma}")
    if not 0 <= c.ema_beta <= 1:
        raise UserError(f"--ema-beta must lie in [0, 1] (the share of the old EMA kept each step), got {c.ema_beta}")
    if c.num_workers is not None and c.num_workers < 0:
        raise UserError(f"--num-workers must be >= 0 (0: load in the main process), got {c.num_workers}")
    if not c.eta >= 0:
        raise UserError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like), got {c.eta}")
    if not 0 <= c.adam_beta2 < 1:
        raise UserError(f"--adam-beta2 must lie in [0, 1), got {c.adam_beta2}")
    if not 0 <= c.guide_at < 1:
        raise UserError(f"--guide-at must lie in [0, 1) (a share of the epochs; 0: no guide), got {c.guide_at}")
    if not c.guide_scale > 0:
        raise UserError(f"--guide-scale must be positive (1: no autoguidance), got {c.guide_scale}")
    for name in ("warmup_steps", "grad_clip", "ema_start"):
        if not getattr(c, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
    if not 0 <= c.lr_floor <= 1:
        raise UserError(f"--lr-floor must lie in [0, 1] (a share of --lr), got {c.lr_floor}")
    if c.image_size % 8:
        raise UserError(f"--image-size {c.image_size} is not a multiple of 8 (the UNet halves it three "
                        f"times): try {max(8, c.image_size // 8 * 8)}")
    if c.clusters < 0 or c.clusters == 1:
        raise UserError(f"--clusters must be 0 (off) or at least 2, got {c.clusters}")
    if c.clusters and c.conditional:
        raise UserError("--clusters finds classes for an unconditional run (ddpm.py): a conditional run has its own")
    if not 0 <= c.label_dropout <= 1:
        raise UserError(f"--label-dropout must lie in [0, 1], got {c.label_dropout}")
    if c.noise_steps < 2:
        raise UserError(f"--noise-steps must be at least 2, got {c.noise_steps}")
    if c.timesteps == "weighted" and not c.min_snr_gamma:
        raise UserError("--timesteps weighted draws timesteps by their min-SNR weight: set --min-snr-gamma "
                        "above 0, or use --timesteps uniform")
    if c.sampler not in SAMPLERS or c.prediction not in PREDICTIONS:
        raise UserError(f"--sampler {c.sampler} / --prediction {c.prediction}: choose from "
                        f"{', '.join(SAMPLERS)} / {', '.join(PREDICTIONS)}")
    check_cfg_min_sigma(c.cfg_min_sigma)
    check_corrector_snr(c.corrector_snr)
    if c.sampler == "ddpm":
        c.sample_steps = c.noise_steps - 1
    elif c.sample_steps > c.noise_steps - 1:
        raise UserError(f"--sample-steps must be at most {c.noise_steps - 1}, got {c.sample_steps}")
    return c
