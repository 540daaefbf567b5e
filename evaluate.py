"""Sample quality that works offline.

FID needs Inception weights that cannot always be downloaded. This script measures quality in the domain
instead, with a small classifier trained once on the training images and cached in models/:
  * label accuracy: the share of conditional samples the classifier puts in their own class;
  * class histogram: how unconditional samples spread over the classes (mode dropping shows here);
  * in-domain FD: the Frechet distance between the classifier's penultimate features of generated images and
    of real images it never trained on, printed next to the real-vs-real floor at the same sample count
    (FD is biased upwards at small counts, so only the distance to the floor means something).
Standard FID runs too when you have pytorch-fid's Inception weights file (--inception-weights PATH).

    python evaluate.py --samples sixes/                  # a folder written by sample.py
    python evaluate.py --ckpt models/DDPM_conditional_mnist/ema_ckpt.pt --n 50 --sampler ddim --steps 50
"""
import argparse
import hashlib
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ddpm import SAMPLERS, to_uint8
from utils import (IMAGE_EXTENSIONS, UserError, atomic_save, autocast_dtype, load_checkpoint, make_dataset,
                   option_adder, pick_device, prepare_mnist)

CLASSIFIER_VERSION = 1  # bump when the classifier or its training changes: old caches are not reused
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


# ---- the Frechet distance --------------------------------------------------------------------------------

def _psd_sqrt(s):
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) between Gaussians fitted to two feature sets
    (N, D) (Heusel et al. 2017). S1 S2 is similar to sqrt(S1) S2 sqrt(S1), which is symmetric PSD, so the
    trace of its square root is the sum of the square roots of that matrix's eigenvalues: no scipy."""
    f1 = torch.as_tensor(np.asarray(f1), dtype=torch.float64)
    f2 = torch.as_tensor(np.asarray(f2), dtype=torch.float64)
    if f1.dim() != 2 or f2.dim() != 2 or f1.shape[1] != f2.shape[1] or len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of the same D, got {tuple(f1.shape)}, {tuple(f2.shape)}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T).reshape(f1.shape[1], -1), torch.cov(f2.T).reshape(f2.shape[1], -1)
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean)


# ---- the in-domain classifier --------------------------------------------------------------------------

class Classifier(nn.Module):
    """A small CNN; its 128 penultimate features are what the in-domain FD compares."""

    def __init__(self, channels, num_classes, width=32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * w * 16, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        f = self.body(x)
        return self.head(f), f


def to_float(images):
    """uint8 (N, C, H, W) to the [-1, 1] floats the networks see."""
    return images.float() / 255 * 2 - 1


class Evaluator:
    """The classifier (trained on first use, then cached) and fixed real reference images.

    The dataset is split once, by a fixed seed: 60% trains the classifier, the held-out 40% is halved into
    A and B. Generated images are compared with B; A vs B is the real-vs-real floor. Real images go through
    the training transforms (random crops, fixed seed) and uint8, as the diffusion model's data and samples
    do. The diffusion model itself saw all images: "held out" is from the classifier."""

    def __init__(self, dataset_path=None, image_size=16, channels=1, device="cpu", cache_dir="models",
                 epochs=12, seed=0, log=print):
        self.device, self.log = torch.device(device), log
        args = argparse.Namespace(dataset_path=dataset_path or prepare_mnist(), image_size=image_size,
                                  channels=channels)
        self.dataset = make_dataset(args)
        self.classes = list(getattr(self.dataset, "classes", ["all"]))
        if len(self.classes) < 2:
            raise UserError(f"{args.dataset_path}: the in-domain classifier needs an ImageFolder with at least "
                            "two class subfolders")
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        n_train = int(0.6 * n)
        half = (n - n_train) // 2
        self.train_idx, self.a_idx = order[:n_train], order[n_train:n_train + half]
        self.b_idx = order[n_train + half:n_train + 2 * half]
        self.real_a, self.labels_a = self.real_images(self.a_idx, seed + 1)
        self.real_b, _ = self.real_images(self.b_idx, seed + 2)

        key = self.cache_key(args, epochs, seed)
        path = os.path.join(cache_dir, f"classifier_{key}.pt")
        with torch.random.fork_rng(devices=[]):  # the same classifier whatever ran before
            torch.manual_seed(seed)
            self.net = Classifier(channels, len(self.classes)).to(self.device)
        if os.path.isfile(path):
            saved = load_checkpoint(path)
            self.net.load_state_dict(saved["state_dict"])
            self.heldout_acc = saved["heldout_acc"]
        else:
            self.train_classifier(epochs, seed)
            self.heldout_acc = self.accuracy(self.real_a, self.labels_a)
            atomic_save({"state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                         "heldout_acc": self.heldout_acc, "classes": self.classes}, path)
            log(f"classifier: trained, held-out accuracy {self.heldout_acc:.3f}, cached in {path}")
        self.net.eval()
        self.feat_b = self.features(self.real_b)[1]

    def cache_key(self, args, epochs, seed):
        """Changes with the data (file names and sizes), the image format and the training recipe."""
        h = hashlib.sha1(repr((CLASSIFIER_VERSION, args.image_size, args.channels, epochs, seed)).encode())
        for root, dirs, files in sorted(os.walk(args.dataset_path)):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    p = os.path.join(root, f)
                    h.update(f"{os.path.relpath(p, args.dataset_path)}:{os.path.getsize(p)}".encode())
        return h.hexdigest()[:12]

    def real_images(self, idx, seed):
        """Dataset images through the training transforms under a fixed seed, as uint8."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            items = [self.dataset[i] for i in idx]
        return to_uint8(torch.stack([x for x, _ in items])), torch.tensor([y for _, y in items])

    def train_classifier(self, epochs, seed):
        self.log(f"classifier: training on {len(self.train_idx)} images for {epochs} epochs (cached after)")
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * -(-len(self.train_idx) // 128))
        self.net.train()
        for epoch in range(epochs):  # fresh random crops each epoch, as the diffusion model saw them
            x, y = self.real_images(self.train_idx, seed + 100 + epoch)
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
            for i in range(0, len(x), 128):
                b = perm[i:i + 128]
                loss = F.cross_entropy(self.net(to_float(x[b]).to(self.device))[0], y[b].to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        self.net.eval()

    @torch.inference_mode()
    def features(self, images, batch=500):
        """(logits, penultimate features) of uint8 images."""
        logits, feats = [], []
        for i in range(0, len(images), batch):
            lg, f = self.net(to_float(images[i:i + batch]).to(self.device))
            logits.append(lg.cpu()), feats.append(f.cpu())
        return torch.cat(logits), torch.cat(feats)

    def accuracy(self, images, labels):
        return float((self.features(images)[0].argmax(1) == labels).float().mean())

    def evaluate(self, images, labels=None):
        """A dict: n, label accuracy (with labels) or class histogram (without), FD and the floor."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1:] != self.real_b.shape[1:]:
            raise UserError(f"samples must be uint8 {tuple(self.real_b.shape[1:])} images like the dataset's at "
                            f"this --image-size/--channels, got {images.dtype} {tuple(images.shape[1:])}")
        logits, feats = self.features(images)
        pred = logits.argmax(1)
        k = min(len(images), len(self.real_a))  # the floor can only use as many real images as A holds
        out = {"n": len(images), "fd_n": k, "fd": frechet_distance(feats[:k], self.feat_b),
               "fd_floor": frechet_distance(self.features(self.real_a[:k])[1], self.feat_b),
               "classifier_acc": self.heldout_acc,
               "histogram": torch.bincount(pred, minlength=len(self.classes)).tolist()}
        if labels is not None:
            out["label_acc"] = float((pred == torch.as_tensor(labels)).float().mean())
        return out


# ---- standard FID with pytorch-fid's Inception, when its weights are at hand ---------------------------

def inception_extractor(weights_path, device="cpu"):
    """pytorch-fid's FID InceptionV3 (pool3, 2048 features) built from a local weights file, never from the
    network. Returns a function from uint8 images to (N, 2048) features."""
    if weights_path is None:
        raise UserError("FID needs Inception weights: pass --inception-weights PATH to pytorch-fid's "
                        f"{FID_WEIGHTS_NAME}")
    if not os.path.isfile(weights_path):
        raise UserError(f"--inception-weights {weights_path}: no such file (want pytorch-fid's {FID_WEIGHTS_NAME})")
    try:
        from unittest import mock

        import pytorch_fid.inception as pfi
    except ImportError:
        raise UserError("--inception-weights needs the pytorch-fid package: pip install pytorch-fid") from None
    state = load_checkpoint(weights_path)
    # pytorch-fid fetches its weights by URL inside the constructor: hand it the local file instead
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()

    @torch.inference_mode()
    def extract(images):
        x = images.float().to(device) / 255  # pytorch-fid takes [0, 1] and resizes to 299 itself
        return net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)[0].flatten(1).cpu()

    return extract


def fid(images, real_images, extractor, batch=100):
    """FID between two sets of uint8 images under a feature extractor (Inception, or a stand-in in tests)."""
    def feats(x):
        return torch.cat([extractor(x[i:i + batch]) for i in range(0, len(x), batch)])

    return frechet_distance(feats(images), feats(real_images))


# ---- command line --------------------------------------------------------------------------------------

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
    lines.append("class histogram: " + ", ".join(f"{c}:{k}" for c, k in zip(classes, r["histogram"])))
    lines.append(f"in-domain FD ({r['fd_n']} vs held-out): {r['fd']:.3f}  (real-vs-real floor {r['fd_floor']:.3f}; "
                 f"classifier held-out accuracy {r['classifier_acc']:.3f})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Offline sample quality: label accuracy, class histogram and "
                                            "in-domain FD; FID with local Inception weights.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    opt = option_adder(p)

    opt("--samples", help="a folder written by sample.py (per-label subfolders, or flat)")
    opt("--ckpt", help="or: sample from this checkpoint first (see sample.py)")
    opt("--n", type=int, default=50, help="with --ckpt: images per label (in all, unconditional)")
    opt("--labels", help="with --ckpt: labels to sample (default: every class)")
    opt("--sampler", choices=SAMPLERS, default="ddim")
    opt("--steps", type=int)
    opt("--eta", type=float, default=1.0)
    opt("--cfg-scale", type=float, default=3.0)
    opt("--seed", type=int, default=0)
    opt("--dataset-path", help="the training ImageFolder (default: the bundled MNIST digits)")
    opt("--image-size", type=int, help="default: the samples' size, or the checkpoint run's")
    opt("--channels", type=int, choices=(1, 3), help="default: the checkpoint's, else 1")
    opt("--inception-weights", help=f"pytorch-fid's {FID_WEIGHTS_NAME}: also compute standard FID")
    opt("--device", default="auto")
    opt("--amp", action=argparse.BooleanOptionalAction, default=True, help="as sample.py's --amp")
    a = p.parse_args(argv)
    try:
        if (a.samples is None) == (a.ckpt is None):
            raise UserError("pass either --samples DIR or --ckpt PATH")
        if a.inception_weights is not None:
            inception = inception_extractor(a.inception_weights)  # fail early, before any sampling
        if a.ckpt is not None:
            import sample

            sa = sample.build_parser().parse_args(
                ["--ckpt", a.ckpt, "--n", str(a.n), "--sampler", a.sampler, "--eta", str(a.eta),
                 "--cfg-scale", str(a.cfg_scale), "--seed", str(a.seed), "--device", a.device, "--out", "x.png",
                 "--amp" if a.amp else "--no-amp"]
                + (["--labels", a.labels] if a.labels else []) + (["--steps", str(a.steps)] if a.steps else [])
                + (["--image-size", str(a.image_size)] if a.image_size else []))
            _, model, info, labels, diffusion, _ = sample.resolve(sa)
            images, ys = sample.generate(model, diffusion, sa.n, labels, sa.cfg_scale, sa.sampler, sa.steps,
                                         sa.eta, sa.seed, amp_dtype=autocast_dtype(diffusion.device, sa.amp))
            channels, size = info["channels"], sa.image_size
        else:
            channels = a.channels or 1
            images, ys = read_samples(a.samples, channels)
            size = images.shape[-1]
        if a.image_size is not None and a.image_size != images.shape[-1]:
            raise UserError(f"--image-size {a.image_size}: the samples are {images.shape[-1]} pixels")

        ev = Evaluator(a.dataset_path, size, channels, pick_device(a.device), log=lambda s: print(s, file=sys.stderr))
        print(report(ev.evaluate(images, ys), ev.classes))
        if a.inception_weights is None:
            print(f"FID (Inception): not computed: pass --inception-weights PATH to pytorch-fid's {FID_WEIGHTS_NAME}")
        else:
            k = min(len(images), len(ev.real_b))
            print(f"FID (Inception, {k} vs {len(ev.real_b)} held-out): {fid(images, ev.real_b, inception):.3f}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
