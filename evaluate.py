"""Sample quality that works offline (quality.py): label accuracy, class histogram and in-domain FD by a
judge classifier trained once on the training images and cached in models/; standard FID when you have
pytorch-fid's Inception weights file (--inception-weights PATH).

    python evaluate.py --samples sixes/                  # a folder written by sample.py
    python evaluate.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --n 50
"""
import hardware  # noqa: F401, I001  (first: it sets the OpenMP spin before torch loads)

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from hardware import autocast_dtype, pick_device
from quality import FID_WEIGHTS_NAME, Evaluator, fid, inception_extractor
from sampling import (add_sampling_options, describe_sampling, generate, labels_for, load_for_sampling,
                      resolve_sampling, with_guide)
from utils import IMAGE_EXTENSIONS, UserError, option_adder


def read_samples(folder, channels):
    """uint8 images and labels from a folder written by sample.py: one subfolder per label (numeric names),
    or images directly in it (unconditional, labels None)."""
    if not os.path.isdir(folder):
        raise UserError(f"--samples {folder}: no such folder")
    subdirs = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and d.isdigit())
    entries = [(os.path.join(folder, d, f), int(d)) for d in subdirs
               for f in sorted(os.listdir(os.path.join(folder, d)))] if subdirs else \
        [(os.path.join(folder, f), None) for f in sorted(os.listdir(folder))]
    entries = [(p, y) for p, y in entries if p.lower().endswith(IMAGE_EXTENSIONS)]
    if not entries:
        raise UserError(f"--samples {folder}: no images found")
    arrays = [np.asarray(Image.open(p).convert("L" if channels == 1 else "RGB")) for p, _ in entries]
    if len({a.shape for a in arrays}) != 1:
        raise UserError(f"--samples {folder}: the images differ in size")
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
    return x.contiguous(), (torch.tensor([y for _, y in entries]) if subdirs else None)


def report(r, classes, title=""):
    lines = [f"{title}n={r['n']}"]
    if "label_acc" in r:
        lines.append(f"label accuracy: {r['label_acc']:.3f}")
        held_out = r["classifier_class_acc"]  # a small dataset may hold out no image of some class
        lines.append("per class (the judge on real held-out images): " + ", ".join(
            f"{classes[c]}:{acc:.2f} ({held_out[c]:.2f})" if c in held_out else f"{classes[c]}:{acc:.2f} (none)"
            for c, acc in r["class_acc"].items()))
    lines.append("class histogram: " + ", ".join(f"{c}:{k}" for c, k in zip(classes, r["histogram"])))
    lines.append(f"confident (the judge's top class at >= 0.9): {r['confident']:.3f}  (real held-out images: "
                 f"{r['classifier_confident']:.3f})")
    lines.append(f"in-domain FD ({r['fd_n']} vs held-out): {r['fd']:.3f}  (real-vs-real floor {r['fd_floor']:.3f}; "
                 f"classifier held-out accuracy {r['classifier_acc']:.3f})")
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description="Offline sample quality: label accuracy, class histogram and "
                                            "in-domain FD; FID with local Inception weights.")
    opt = option_adder(p)
    opt("--samples", help="a folder written by sample.py (per-label subfolders, or flat)")
    opt("--ckpt", help="or: sample from this checkpoint or run folder first (see sample.py)")
    opt("--n", type=int, default=50, help="with --ckpt: images per label (in all, unconditional; default: 50)")
    add_sampling_options(opt)  # with --ckpt
    opt("--seed", type=int, default=0, help="default: 0")
    opt("--dataset-path", help="the training ImageFolder (default: the run's, else the bundled MNIST digits)")
    opt("--image-size", type=int, help="default: the samples' size, or the run's")
    opt("--channels", type=int, choices=(1, 3), help="with --samples (default: 1)")
    opt("--inception-weights", help=f"pytorch-fid's {FID_WEIGHTS_NAME}: also compute standard FID")
    return p


def samples_from_checkpoint(a, device):
    """(images, labels, channels, the run's dataset path) sampled from --ckpt as sample.py would."""
    ckpt, model, config, diffusion = load_for_sampling(a.ckpt, device, image_size=a.image_size)
    labels = labels_for(config, a.labels, ckpt)
    resolve_sampling(a, config)
    model, guided = with_guide(model, config, ckpt, device, a.guide, a.guide_scale)
    # named every time: a run saved before a setting existed samples as it did then
    print(f"sampling: {describe_sampling(a, guided, config.takes_labels)}", file=sys.stderr)
    images, ys = generate(model, diffusion, a.n, labels, a.cfg_scale, a.sampler, a.steps, a.eta, a.seed,
                          amp_dtype=autocast_dtype(device, a.amp, "sample"), cfg_min_sigma=a.cfg_min_sigma,
                          corrector_snr=a.corrector_snr, clip=a.clip, clusters=config.cluster_sizes)
    return images, ys, config.channels, config.dataset_path


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        if (a.samples is None) == (a.ckpt is None):
            raise UserError("pass either --samples DIR or --ckpt PATH")
        if a.n <= 0:
            raise UserError(f"--n must be positive, got {a.n}")
        if a.samples is not None and (a.guide or a.guide_scale is not None):
            raise UserError("--guide samples from --ckpt: a --samples folder is already sampled")
        if a.inception_weights is not None:
            inception = inception_extractor(a.inception_weights)  # fail early, before any sampling
        device = pick_device(a.device)
        if a.ckpt is not None:
            images, ys, channels, run_data = samples_from_checkpoint(a, device)
        else:
            channels, run_data = a.channels or 1, None
            images, ys = read_samples(a.samples, channels)
        if a.image_size is not None and a.image_size != images.shape[-1]:
            raise UserError(f"--image-size {a.image_size}: the samples are {images.shape[-1]} pixels")
        ev = Evaluator(a.dataset_path or run_data, images.shape[-1], channels, device,
                       log=lambda s: print(s, file=sys.stderr))
        print(report(ev.evaluate(images, ys), ev.classes))
        if a.inception_weights is None:
            print(f"FID (Inception): not computed: pass --inception-weights PATH to pytorch-fid's {FID_WEIGHTS_NAME}")
        else:
            print(f"FID (Inception, {len(images)} vs {len(ev.real_b)} held-out): "
                  f"{fid(images, ev.real_b, inception):.3f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
