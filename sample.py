"""Sample images from a trained checkpoint.

    python sample.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --labels 0-9 --n 8 --out digits.png
    python sample.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --labels 6 --n 100 --out sixes/

The network, the diffusion and the image size come from the run's config.json beside the checkpoint (for
the original's bare checkpoints: the network from the weights' shapes, the rest from the defaults or the
options); the sampler, its steps, eta and the guidance scale default to the run's grid settings. --out x.png
writes one grid (one row per label); a path ending in / or an existing folder gets one PNG per image, in one
subfolder per label for conditional checkpoints.
"""
import hardware  # noqa: F401, I001  (first: it sets the OpenMP spin before torch loads)

import argparse
import os
import re
import sys

from PIL import Image

from hardware import autocast_dtype, pick_device
from sampling import (add_sampling_options, describe_sampling, generate, labels_for, load_for_sampling,
                      resolve_sampling, with_guide)
from utils import UserError, option_adder, save_images

def check_out(out, overwrite=False):
    """Decide grid file or folder, and fail before sampling if it cannot be written. A folder that already
    holds files would mix earlier images with these: refused unless `overwrite`."""
    as_dir = out.endswith(("/", os.sep)) or os.path.isdir(out)
    if not as_dir:
        ext = os.path.splitext(out)[1].lower()
        if Image.registered_extensions().get(ext) not in Image.SAVE:  # PIL reads some formats it cannot write
            raise UserError(f"--out {out}: cannot write {ext or 'a file without extension'} images: use .png or "
                            ".jpg for a grid, or end the path with / for single images")
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"--out {out} already holds files: choose a new folder, or pass --overwrite to replace "
                        "the images sample.py wrote there")
    # the nearest folder that exists must be a writable folder (os.makedirs creates the rest)
    probe = os.path.abspath(out if as_dir else os.path.dirname(os.path.abspath(out)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({probe} is not a writable folder)")
    return as_dir


def earlier_samples(out):
    """The PNGs an earlier `--out` to this folder wrote: 00000.png... in it and in its label subfolders."""
    found = []
    for folder in [out] + [os.path.join(out, d) for d in os.listdir(out) if d.isdigit()]:
        if os.path.isdir(folder):
            found += [os.path.join(folder, f) for f in os.listdir(folder) if re.fullmatch(r"\d{5}\.png", f)]
    return found


def write(images, labels, out, as_dir, nrow):
    if not as_dir:
        save_images(images, out, nrow=nrow)
        return out
    for path in earlier_samples(out) if os.path.isdir(out) else []:  # (non-empty: only with --overwrite)
        os.remove(path)
    for i, img in enumerate(images):
        d = os.path.join(out, str(int(labels[i]))) if labels is not None else out
        os.makedirs(d, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(os.path.join(d, f"{i:05d}.png"))
    return out


def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a DDPM checkpoint.")
    opt = option_adder(p)
    opt("--ckpt", required=True, help="ckpt.pt / ema_ckpt.pt, or a run folder (uses its ema_ckpt.pt)")
    opt("--n", type=int, default=8, help="images per label (in all, for an unconditional checkpoint)")
    add_sampling_options(opt)
    opt("--seed", type=int, help="makes the output repeatable")
    opt("--image-size", type=int, help="side in pixels, a multiple of 8 (default: the run's)")
    opt("--noise-steps", type=int, help="the T the model was trained with (default: the run's)")
    opt("--batch-size", type=int, default=500, help="images per sampling batch (default: 500)")
    opt("--out", default="samples.png", help="x.png: a grid; dir/ or an existing folder: single PNGs "
                                             "(default: samples.png)")
    opt("--overwrite", action="store_true", help="--out dir/: replace the images an earlier run wrote there")
    opt("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve(a):
    """Check everything the user gave before anything is computed or written; fills a's unset sampling
    settings from the run's config. Returns (checkpoint path, model, config, labels, diffusion, as_dir)."""
    if a.n <= 0 or a.batch_size <= 0:
        raise UserError("--n and --batch-size must be positive")
    device = pick_device(a.device)
    ckpt, model, config, diffusion = load_for_sampling(a.ckpt, device, image_size=a.image_size,
                                                       noise_steps=a.noise_steps)
    a.image_size, a.noise_steps = config.image_size, config.noise_steps
    resolve_sampling(a, config)
    labels = labels_for(config, a.labels, ckpt)
    model, a.guided = with_guide(model, config, ckpt, device, a.guide, a.guide_scale)
    as_dir = check_out(a.out, a.overwrite)
    return ckpt, model, config, labels, diffusion, as_dir


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        ckpt, model, config, labels, diffusion, as_dir = resolve(a)
        images, ys = generate(model, diffusion, a.n, labels, a.cfg_scale, a.sampler, a.steps, a.eta, a.seed,
                              a.batch_size, not a.no_progress, autocast_dtype(diffusion.device, a.amp, "sample"),
                              cfg_min_sigma=a.cfg_min_sigma, corrector_snr=a.corrector_snr, clip=a.clip,
                              clusters=config.cluster_sizes)
        nrow = a.n if labels is not None and a.n <= 16 else min(16, len(images))
        write(images, ys, a.out, as_dir, nrow)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    what = f"labels {','.join(map(str, labels))}" if labels is not None else \
        f"unconditional, drawn from its {config.clusters} clusters" if config.clusters else "unconditional"
    print(f"wrote {len(images)} images ({what}, {describe_sampling(a, a.guided, config.takes_labels)}) to {a.out}")


if __name__ == "__main__":
    main()
