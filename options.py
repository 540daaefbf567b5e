"""The training command line of ddpm.py and ddpm_conditional.py: options to a config.RunConfig, over the
preset for a new run or over the saved config.json when resuming."""
import argparse
import dataclasses
import os
import sys

from checkpoints import load_config
from config import CLUSTERED_DEFAULTS, PRESETS, RUN_DEFINING, own_clip, preset_config, validate
from diffusion import PREDICTIONS, SAMPLERS
from utils import UserError, looks_grayscale, option_adder


def add_grid_options(opt, conditional):
    """How the sample grids saved during training are drawn."""
    opt("--sample-interval", type=int, help="save a sample grid every N epochs (and after the last)")
    opt("--n-samples", type=int, help="images per sample grid")
    opt("--sampler", choices=SAMPLERS, help="sampler for the grids (with another sampler or --eta than the "
                                            "preset's, the clip is the sampler's own unless --clip/--no-clip)")
    opt("--sample-steps", type=int, help="network evaluations per grid image (ddpm: all)")
    opt("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    opt("--cfg-scale", type=float, help="classifier-free guidance scale for the grids"
                                        + ("" if conditional else " (--clusters runs)"))
    opt("--cfg-min-sigma", type=float, help="guide the grids only at noise levels sigma_t above this (1: "
                                             "t >= 259); 0: at every step")
    opt("--guide-scale", type=float, help="autoguidance scale for the grids, sample.py and evaluate.py once the "
                                          "run has its guide (--guide-at); 1: off")
    opt("--corrector-snr", type=float, help="a Langevin corrector step after each grid sampling step, of this "
                                            "step-to-noise ratio (0: none)")
    opt("--clip", action=argparse.BooleanOptionalAction,
        help="clip each x0 prediction of the grids' sampler to the data range (default: the preset's, with its "
             "sampler and eta; else the sampler's own)")


def add_machine_options(opt):
    """Where and how the steps run: the device, the loader, the speed paths."""
    opt("--device", help="auto, cpu, cuda, cuda:N or mps")
    opt("--num-workers", type=int, help="DataLoader workers (default: 0 on CPU, 4 on GPU)")
    opt("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the network")
    opt("--cuda-graphs", action=argparse.BooleanOptionalAction,
        help="one process on a GPU: capture the network's forward and backward once as CUDA graphs and replay "
             "them each step (the same arithmetic, without the kernel launches); --no-cuda-graphs: eager")
    opt("--amp", action=argparse.BooleanOptionalAction,
        help="mixed precision where it is faster: bf16 autocast on CUDA (fp16 without bf16); on CPUs with "
             "native bf16 (AVX512-BF16 or AMX) for training, with AMX for the grids; --no-amp: fp32 everywhere")


def parse_args(conditional, argv=None):
    """The command line; what it leaves unset stays None and comes from the preset or the resumed run."""
    p = argparse.ArgumentParser(
        description=f"Train a {'class-conditional' if conditional else 'unconditional'} DDPM. With no "
                    "arguments: the bundled MNIST digits, a small network, minutes on a laptop CPU.")
    opt = option_adder(p)  # --dash-names, with the original's --underscore_names as aliases
    opt("--preset", choices=sorted(PRESETS), help="settings for what you leave unset (default: default; "
                                                   "config.py lists both side by side)")
    opt("--run-name", help="outputs go to runs/, results/, models/ under this name")
    opt("--dataset-path", help="an ImageFolder (one subfolder per class) or a flat folder of images; "
                               "default: the bundled MNIST digits, written to data/mnist")
    opt("--epochs", type=int, help="total epochs; --resume continues up to it")
    opt("--batch-size", type=int, help="images per step per process")
    opt("--image-size", type=int, help="side in pixels, a multiple of 8")
    opt("--channels", type=int, choices=(1, 3), help="1 grayscale, 3 RGB (default: 1 for the bundled digits, "
                                                     "else 3)")
    opt("--crop", choices=("center", "random"), help="center: the images as they are; random: the original's "
                                                     "zooming random crop")
    opt("--base-width", type=int, help="channels of the first level (64 = the original network)")
    opt("--prediction", choices=PREDICTIONS, help="what the network predicts: the noise (eps, the original), "
                                                  "v, or the clean image x0")
    opt("--lr", type=float, help="AdamW learning rate")
    opt("--adam-beta2", type=float, help="AdamW's second-moment decay (0.999: PyTorch's default, as the original)")
    opt("--warmup-steps", type=int, help="linear learning-rate warm-up over this many steps (0: none)")
    opt("--lr-schedule", choices=("constant", "cosine"), help="after the warm-up: constant as the original, or "
                                                               "a cosine decay to --lr-floor x lr at the last step")
    opt("--lr-floor", type=float, help="the cosine schedule's last rate, as a share of --lr")
    opt("--grad-clip", type=float, help="clip the gradient's global norm (0: off, as the original)")
    opt("--min-snr-gamma", type=float, help="weight each timestep's loss by min(SNR, gamma) (Hang et al. "
                                            "2023); 0: plain MSE as the original")
    opt("--timesteps", choices=("uniform", "weighted"),
        help="training timesteps: uniform as the original, or drawn in proportion to their min-SNR weight "
             "(the same expected loss, less noise)")
    opt("--seed", type=int, help="makes a CPU run repeatable")
    opt("--noise-steps", type=int, help="diffusion steps T (the grids' default --sample-steps shrink to at "
                                        "most T - 1 with it)")
    add_grid_options(opt, conditional)
    opt("--ema-beta", type=float, help="EMA decay")
    opt("--ema-start", type=int, help="steps of hard copy before the EMA starts averaging")
    opt("--guide-at", type=float, help="save the EMA weights after this share of the epochs as guide_ckpt.pt, "
                                       "the run's autoguidance guide (docs/sampling.md); 0: none")
    opt("--resume", action="store_true", help="continue the run named --run-name from its last save")
    opt("--overwrite", action="store_true", help="replace an existing run of the same name")
    add_machine_options(opt)
    add_label_options(opt, conditional)
    args = p.parse_args(argv)
    args.conditional = conditional
    return args


def add_label_options(opt, conditional):
    """ddpm_conditional.py: the labels and their dropout; ddpm.py: clusters to take as labels, and the EMA."""
    if conditional:
        opt("--num-classes", type=int, help="label embedding size, at least the dataset's class count (default: "
                                            "that count; --preset original: 10)")
        opt("--label-dropout", type=float, help="share of labels dropped for CFG training")
        opt("--label-dropout-mode", choices=("sample", "batch"),
            help="drop labels per sample, or whole batches as the original")
    else:
        opt("--clusters", type=int, help="find up to this many clusters of the images by k-means (no labels; "
                                         "at most one per 10 images), train on them as classes and guide the "
                                         "samples with them; their label embedding is saved in clusters.pt. "
                                         "K >= 2 also sets, unless given, " + spelled_all(CLUSTERED_DEFAULTS)
                                         + " (docs/quality.md). Default 0: the plain unconditional model, "
                                         "autoguided by its own early EMA")
        opt("--ema", action=argparse.BooleanOptionalAction, help="also keep an EMA model (ema_ckpt.pt); "
                                                                 "on in the default preset")


def spelled_all(settings):
    return " ".join(spelled(k, v) for k, v in settings.items())


def spelled(name, value):
    """An option as typed: --base-width 8, --ema, --no-ema."""
    flag = name.replace("_", "-")
    return (f"--{flag}" if value else f"--no-{flag}") if isinstance(value, bool) else f"--{flag} {value}"


def default_run_name(conditional, preset, dataset_path):
    """The original's names for --preset original; else _mnist for the bundled digits, or the folder's name."""
    name = "DDPM_conditional" if conditional else "DDPM_Unconditional"
    if preset == "original":
        return name
    folder = os.path.basename(os.path.normpath(os.path.abspath(dataset_path))) if dataset_path else "mnist"
    return f"{name}_{folder}"


def resolve_args(args):
    """(the run's RunConfig, whether it resumes): the command line over the resumed run's config, or over
    the preset for a new run."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "overwrite")}
    preset = explicit.get("preset", "default")
    run_name = explicit.get("run_name") or default_run_name(args.conditional, preset, explicit.get("dataset_path"))
    run_dir = os.path.join("models", run_name)
    if args.resume:
        saved = load_config(run_dir) if os.path.isfile(os.path.join(run_dir, "state.pt")) else None
        if saved is None:
            raise UserError(f"--resume: nothing to resume in models/{run_name} (no state.pt); "
                            "drop --resume to start this run, or check --run-name")
        for k in RUN_DEFINING + ("ema",):  # ema too: its checkpoint would be missing, or left stale
            if k in explicit and explicit[k] != getattr(saved, k):
                raise UserError(f"--resume: run {run_name} was trained with {spelled(k, getattr(saved, k))}, "
                                f"not {spelled(k, explicit[k])}: drop the option or start a new run")
        base = saved
    else:
        base = preset_config(preset, args.conditional)
        if explicit.get("clusters"):  # what clusters need to guide by them (--help); 0 changes nothing
            base = dataclasses.replace(base, **CLUSTERED_DEFAULTS)
    config = dataclasses.replace(base, **explicit)
    if not config.takes_labels and {"cfg_scale", "cfg_min_sigma"} & set(explicit):
        raise UserError("--cfg-scale / --cfg-min-sigma guide by labels: this run has none (pass --clusters K, "
                        "or use --guide-scale, its autoguidance)")
    if "clip" not in explicit:
        config.clip = own_clip(base, config.sampler, config.eta)
    config.run_name = run_name
    if "sample_steps" not in explicit:  # a short --noise-steps shortens the default grid sampling with it
        config.sample_steps = min(config.sample_steps, config.noise_steps - 1)
    if config.channels is None:  # the bundled digits are grayscale; a user's images are taken as RGB
        config.channels = 1 if config.dataset_path is None else 3
        if config.dataset_path and os.environ.get("RANK", "0") == "0" and looks_grayscale(config.dataset_path):
            print(f"note: the images in {config.dataset_path} are grayscale and train as RGB (3 channels); "
                  "pass --channels 1 for a grayscale model", file=sys.stderr)
    return validate(config), args.resume
