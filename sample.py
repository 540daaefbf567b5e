"""Sample images from a trained checkpoint.

    python sample.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --labels 0-9 --n 8 --out digits.png
    python sample.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --labels 6 --n 100 --out sixes/

The network (conditional or not, classes, channels, width) is read off the checkpoint's weights; the image
size and noise steps, which weights do not fix, come from the run's state.pt next to the checkpoint when
there is one. --out x.png writes one grid (one row per label); a path ending in / or an existing folder
gets one PNG per image, in one subfolder per label for conditional checkpoints.
"""
import argparse
import os
import re
import sys

import torch
from PIL import Image

from ddpm import SAMPLERS, Diffusion
from modules import UNet, UNet_conditional
from utils import (UserError, autocast_dtype, load_checkpoint, load_weights, option_adder, pick_device, save_images,
                   strip_prefixes)

def resolve_ckpt(path):
    """A checkpoint file, or a run folder (models/<run>/): its EMA weights when it has them."""
    if os.path.isdir(path):
        for name in ("ema_ckpt.pt", "ckpt.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"--ckpt {path}: the folder holds no ema_ckpt.pt or ckpt.pt")
    if not os.path.isfile(path):
        raise UserError(f"--ckpt {path}: no such file")
    return path


def run_args(ckpt):
    """The training settings in the state.pt beside the checkpoint, or {} when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), "state.pt")
    if not os.path.isfile(path):
        return {}
    try:
        state = load_checkpoint(path)
        return dict(state.get("args", {})) if isinstance(state, dict) else {}
    except UserError as e:  # only defaults come from it: say so and go on
        print(f"warning: ignoring {path}: {e}", file=sys.stderr)
        return {}


def load_model(ckpt, device="cpu"):
    """The network a checkpoint holds, in eval mode, and what was learnt about it (a dict)."""
    sd = load_checkpoint(ckpt)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--ckpt {ckpt}: not a state_dict of a UNet (use ckpt.pt or ema_ckpt.pt of a run)")
    sd = strip_prefixes(sd)
    if "inc.double_conv.0.weight" not in sd or "down1.emb_layer.1.weight" not in sd:
        raise UserError(f"--ckpt {ckpt}: not a UNet checkpoint of this project (no inc/down1 weights)")
    width, channels = sd["inc.double_conv.0.weight"].shape[:2]
    info = dict(channels=int(channels), c_out=int(sd["outc.weight"].shape[0]), base_width=int(width),
                time_dim=int(sd["down1.emb_layer.1.weight"].shape[1]),
                num_classes=int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None)
    info["conditional"] = info["num_classes"] is not None
    if info["conditional"]:
        model = UNet_conditional(info["channels"], info["c_out"], info["time_dim"], info["num_classes"],
                                 base_width=info["base_width"])
    else:
        model = UNet(info["channels"], info["c_out"], info["time_dim"], base_width=info["base_width"])
    load_weights(model, sd, ckpt)
    return model.to(device).eval(), info


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


def check_out(out):
    """Decide grid file or folder, and fail before sampling if it cannot be written."""
    as_dir = out.endswith(("/", os.sep)) or os.path.isdir(out)
    if not as_dir:
        ext = os.path.splitext(out)[1].lower()
        if ext not in Image.registered_extensions():
            raise UserError(f"--out {out}: unknown image extension {ext or '(none)'}: use .png or .jpg for a "
                            "grid, or end the path with / for single images")
    # the nearest folder that exists must be a writable folder (os.makedirs creates the rest)
    probe = os.path.abspath(out if as_dir else os.path.dirname(os.path.abspath(out)))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write there ({probe} is not a writable folder)")
    return as_dir


def generate(model, diffusion, n, labels=None, cfg_scale=3.0, sampler="ddim", steps=None, eta=1.0,
             seed=None, batch_size=500, progress=True, amp_dtype=None):
    """n images per label (or n in all without labels) as uint8 (N, C, H, W), label-major, and their labels
    (None for an unconditional model). The same seed and batch size give the same images. amp_dtype: the
    network runs under that autocast (utils.autocast_dtype), None for fp32."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    all_labels = torch.tensor(labels).repeat_interleave(n) if labels is not None else None
    total = n * len(labels) if labels is not None else n
    out = []
    for i in range(0, total, batch_size):
        b = min(batch_size, total - i)
        y = all_labels[i:i + b] if all_labels is not None else None
        with torch.autocast(diffusion.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out.append(diffusion.sample(model, b, y, cfg_scale=cfg_scale, sampler=sampler, steps=steps, eta=eta,
                                        generator=g, progress=progress).cpu())
    return torch.cat(out), all_labels


def write(images, labels, out, as_dir, nrow):
    if not as_dir:
        save_images(images, out, nrow=nrow)
        return out
    for i, img in enumerate(images):
        d = os.path.join(out, str(int(labels[i]))) if labels is not None else out
        os.makedirs(d, exist_ok=True)
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(os.path.join(d, f"{i:05d}.png"))
    return out


def build_parser():
    p = argparse.ArgumentParser(description="Sample images from a DDPM checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    opt = option_adder(p)

    opt("--ckpt", required=True, help="ckpt.pt / ema_ckpt.pt, or a run folder (uses its ema_ckpt.pt)")
    opt("--labels", help="conditional checkpoints: 6, 0-9 or 1,3,5 (default: every class)")
    opt("--n", type=int, default=8, help="images per label (in all, for an unconditional checkpoint)")
    opt("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (0: none)")
    # DDIM eta=1 at 50 steps: the default model's best fast sampler (see bench_samplers.py); the ODE
    # samplers (eta=0, dpm++) leave gray backgrounds on that small model
    opt("--sampler", choices=SAMPLERS, default="ddim", help="ddpm walks all noise steps")
    opt("--steps", type=int, help="network evaluations per image (default: ddpm all, others 50)")
    opt("--eta", type=float, default=1.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    opt("--seed", type=int, help="makes the output repeatable")
    opt("--image-size", type=int, help="side in pixels, a multiple of 8 (default: the run's, else 16)")
    opt("--noise-steps", type=int, help="the T the model was trained with (default: the run's, else 1000)")
    opt("--batch-size", type=int, default=500, help="images per sampling batch")
    opt("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    opt("--amp", action=argparse.BooleanOptionalAction, default=True,
        help="bf16 autocast on CUDA and AMX CPUs (fp16 on CUDA without bf16); --no-amp: fp32")
    opt("--out", default="samples.png", help="x.png: a grid; dir/ or an existing folder: single PNGs")
    opt("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve(a):
    """Check everything the user gave before anything is computed or written; returns the model and co."""

    ckpt = resolve_ckpt(a.ckpt)
    saved = run_args(ckpt)
    a.image_size = a.image_size if a.image_size is not None else saved.get("image_size", 16)
    a.noise_steps = a.noise_steps if a.noise_steps is not None else saved.get("noise_steps", 1000)
    if a.image_size <= 0 or a.image_size % 8:
        raise UserError(f"--image-size {a.image_size} is not a positive multiple of 8 (the UNet halves it "
                        f"three times): try {max(8, a.image_size // 8 * 8)}")
    if a.n <= 0 or a.batch_size <= 0:
        raise UserError("--n and --batch-size must be positive")
    if a.noise_steps < 2:
        raise UserError(f"--noise-steps must be at least 2, got {a.noise_steps}")
    if a.sampler == "ddpm" and a.steps not in (None, a.noise_steps - 1):
        raise UserError(f"--sampler ddpm walks all {a.noise_steps - 1} steps: use ddim or dpm++ for --steps")
    if a.steps is None:
        a.steps = a.noise_steps - 1 if a.sampler == "ddpm" else min(50, a.noise_steps - 1)
    if not 1 <= a.steps <= a.noise_steps - 1:
        raise UserError(f"--steps must lie in 1..{a.noise_steps - 1}, got {a.steps}")
    if a.eta < 0:
        raise UserError(f"--eta must be >= 0, got {a.eta}")
    device = pick_device(a.device)
    model, info = load_model(ckpt, device)
    if info["conditional"]:
        labels = parse_labels(a.labels, info["num_classes"]) if a.labels is not None \
            else list(range(info["num_classes"]))
    elif a.labels is not None:
        raise UserError(f"--labels {a.labels}: {ckpt} is an unconditional checkpoint and takes no labels")
    else:
        labels = None
    as_dir = check_out(a.out)
    diffusion = Diffusion(a.noise_steps, img_size=a.image_size, device=device)
    return ckpt, model, info, labels, diffusion, as_dir


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        ckpt, model, info, labels, diffusion, as_dir = resolve(a)
        images, ys = generate(model, diffusion, a.n, labels, a.cfg_scale, a.sampler, a.steps, a.eta, a.seed,
                              a.batch_size, not a.no_progress, autocast_dtype(diffusion.device, a.amp))
        nrow = a.n if labels is not None and a.n <= 16 else min(16, len(images))
        write(images, ys, a.out, as_dir, nrow)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    what = f"labels {','.join(map(str, labels))}" if labels is not None else "unconditional"
    print(f"wrote {len(images)} images ({what}, {a.sampler} {a.steps} steps) to {a.out}")


if __name__ == "__main__":
    main()
