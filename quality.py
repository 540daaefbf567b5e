"""Sample quality that works offline: a small in-domain classifier (the judge), the Frechet distance on its
features with a real-vs-real floor, and standard FID when pytorch-fid's Inception weights are at hand.

  * label accuracy: the share of conditional samples the judge puts in their own class;
  * class histogram: how unconditional samples spread over the classes (mode dropping shows here);
  * in-domain FD: the Frechet distance between the judge's penultimate features of generated images and of
    real images it never trained on, printed next to the real-vs-real floor at the same sample count (FD is
    biased upwards at small counts, so only the distance to the floor means something).
"""
import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import atomic_save, load_checkpoint
from diffusion import to_uint8
from utils import IMAGE_EXTENSIONS, UserError, make_dataset, prepare_mnist

CLASSIFIER_VERSION = 3  # bump when the classifier or its training changes: old caches are not reused
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# the judge for the bundled digits at 16x16, trained once (`python quality.py`) and shipped: no training, and one judge
SHIPPED_JUDGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judges", "mnist16.pt")


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
    """The judge: a small CNN with BatchNorm and dropout; its 128 penultimate features (after the ReLU) are
    what the in-domain FD compares."""

    def __init__(self, channels, num_classes, width=32, dropout=0.3):
        super().__init__()

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        w = width
        self.body = nn.Sequential(
            *conv(channels, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(2 * w * 16, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x):
        f = self.body(x)
        return self.head(f), f


def shift_and_rotate(x, generator, shift=2, degrees=10):
    """The judge's augmentation: each image moved by up to +-shift whole pixels and turned by up to
    +-degrees, in one affine resampling; what comes in at the borders is background (-1)."""
    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * degrees * torch.pi / 180
    dx, dy = (torch.randint(-shift, shift + 1, (2, n), generator=generator).float() * 2
              / torch.tensor([[w], [h]]))  # affine_grid measures in [-1, 1]: a pixel is 2 / size
    theta = torch.stack([torch.stack([angle.cos(), -angle.sin(), dx], 1),
                         torch.stack([angle.sin(), angle.cos(), dy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def per_class(right, labels):
    """{label: the share of its samples that are right}, for each label present."""
    return {c: float(right[labels == c].float().mean()) for c in labels.unique().tolist()}


def confident_share(logits, threshold=0.9):
    """The share of images whose top class has a softmax probability of at least `threshold`."""
    return float((logits.softmax(1).max(1).values >= threshold).float().mean())


def to_float(images):
    """uint8 (N, C, H, W) to the [-1, 1] floats the networks see."""
    return images.float() / 255 * 2 - 1


class Evaluator:
    """The judge (trained on first use, then cached in models/) and fixed real reference images.

    The dataset is split once, by a fixed seed: 80% trains the judge, the held-out 20% is halved into A and
    B. Generated images are compared with B; A vs B is the real-vs-real floor. Real images are the dataset's
    images as they are (resized, centre cropped, uint8; no augmentation, whatever crop the diffusion model
    trained with), so FD measures the distance from the user's data. The judge trains on its share with
    random shifts and small rotations; its accuracy on A and B is `heldout_acc` (`heldout_class_acc` per
    class). The diffusion model itself saw all images: "held out" is from the judge."""

    def __init__(self, dataset_path=None, image_size=16, channels=1, device="cpu", cache_dir="models",
                 epochs=20, seed=0, log=print, train_share=0.8, max_images=80_000):
        self.device, self.log = torch.device(device), log
        dataset_path = dataset_path or prepare_mnist()
        self.dataset = make_dataset(dataset_path, image_size, channels, "center")
        self.classes = list(getattr(self.dataset, "classes", ["all"]))
        if len(self.classes) < 2:
            raise UserError(f"{dataset_path}: the in-domain classifier needs an ImageFolder with at least "
                            "two class subfolders")
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        n_train = int(train_share * n)
        half = (n - n_train) // 2
        self.train_idx = order[:n_train]
        a_idx, b_idx = order[n_train:n_train + half], order[n_train + half:n_train + 2 * half]
        self.real_a, self.labels_a = self.real_images(a_idx)
        self.real_b, self.labels_b = self.real_images(b_idx)

        self.recipe = [CLASSIFIER_VERSION, image_size, channels, epochs, seed, train_share, max_images]
        path = os.path.join(cache_dir, f"classifier_{self.cache_key(dataset_path, tuple(self.recipe))}.pt")
        with torch.random.fork_rng(devices=[]):  # the same classifier whatever ran before
            torch.manual_seed(seed)
            self.net = Classifier(channels, len(self.classes)).to(self.device)
        if os.path.isfile(path):
            saved = load_checkpoint(path)
        elif (saved := self.shipped_judge()) is not None:
            atomic_save(saved, path)
            log(f"classifier: the judge shipped for this dataset ({SHIPPED_JUDGE}), cached in {path}")
        else:
            with torch.random.fork_rng(devices=[]):  # dropout draws from the global RNG: the same judge every time
                torch.manual_seed(seed)
                # no more epochs than it takes to see max_images: a large dataset's judge costs what 4,000 digits' does
                secs = self.train_classifier(min(epochs, -(-max_images // len(self.train_idx))), seed)
            self.heldout_acc = self.accuracy(torch.cat([self.real_a, self.real_b]),
                                             torch.cat([self.labels_a, self.labels_b]))
            saved = self.saved()
            atomic_save(saved, path)
            log(f"classifier: trained in {secs:.0f} s (one thread), held-out accuracy "
                f"{self.heldout_acc:.4f}, cached in {path}")
        self.net.load_state_dict(saved["state_dict"])
        self.heldout_acc = saved["heldout_acc"]
        self.net.eval()
        logits_b, self.feat_b = self.features(self.real_b)
        # what the judge can certify per class: on real digits it errs most on some classes (9s on MNIST);
        # and the share of real images it is confident about, the ceiling for unconditional samples'
        logits = torch.cat([self.features(self.real_a)[0], logits_b])
        real_labels = torch.cat([self.labels_a, self.labels_b])
        self.heldout_class_acc = per_class(logits.argmax(1) == real_labels, real_labels)
        self.heldout_confident = confident_share(logits)

    @staticmethod
    def cache_key(dataset_path, recipe):
        """Changes with the data (file names, sizes and times of change, as make and rsync tell) and the
        judge's recipe (image format included)."""
        h = hashlib.sha1(repr(recipe).encode())
        for root, dirs, files in sorted(os.walk(dataset_path)):
            dirs.sort()
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    p = os.path.join(root, f)
                    st = os.stat(p)
                    h.update(f"{os.path.relpath(p, dataset_path)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:12]

    def content_digest(self):
        """A hash of the judge's recipe and of every image as the judge sees it, with its label: names the data
        itself, where the cache key trusts file times (a fresh copy of the same images has new ones)."""
        images, labels = self.real_images(range(len(self.dataset)))
        h = hashlib.sha1(repr((self.recipe, self.classes)).encode())
        h.update(images.numpy().tobytes())
        h.update(labels.numpy().tobytes())
        return h.hexdigest()

    def shipped_judge(self):
        """The judge that ships with the project, if it was trained on exactly these images with this recipe
        (the bundled digits at 16x16), else None. Shipped, it is the same judge on every machine: trained
        here, each CPU's arithmetic would give a slightly different one, and so other figures than docs/'s."""
        if not os.path.isfile(SHIPPED_JUDGE):
            return None
        saved = load_checkpoint(SHIPPED_JUDGE)
        wanted = (self.recipe, self.classes, len(self.dataset))
        if (saved.get("recipe"), saved.get("classes"), saved.get("n")) != wanted:
            return None  # cheap checks first: hashing the images reads them all
        return saved if saved["digest"] == self.content_digest() else None

    def saved(self):
        """What the cache keeps of the judge."""
        return {"state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                "heldout_acc": self.heldout_acc, "classes": self.classes}

    def ship(self, path=None):
        """Writes this judge with its recipe and data digest as the shipped judge (`python quality.py`)."""
        atomic_save({**self.saved(), "recipe": self.recipe, "n": len(self.dataset), "digest": self.content_digest()},
                    path or SHIPPED_JUDGE)

    def real_images(self, idx):
        """Dataset images as they are (resized, centre cropped) as uint8, and their labels."""
        items = [self.dataset[i] for i in idx]
        return to_uint8(torch.stack([x for x, _ in items])), torch.tensor([y for _, y in items])

    def train_classifier(self, epochs, seed, batch=128, lr=3e-3):
        """Trains the judge at one thread (sums over more threads round differently: one judge for every
        machine) and returns the seconds it took."""
        self.log(f"classifier: training on {len(self.train_idx)} images for {epochs} epochs (cached after)")
        started, threads = time.perf_counter(), torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._train(epochs, seed, batch, lr)
        finally:
            torch.set_num_threads(threads)
        return time.perf_counter() - started

    def _train(self, epochs, seed, batch, lr):
        x_all, y_all = self.real_images(self.train_idx)
        x_all, g = to_float(x_all), torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(x_all) // batch))
        self.net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x_all), generator=g)
            for i in range(0, len(x_all), batch):
                b = perm[i:i + batch]
                logits = self.net(shift_and_rotate(x_all[b], g).to(self.device))[0]
                loss = F.cross_entropy(logits, y_all[b].to(self.device))
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
        """A dict: n; the judge's class histogram and the share it classifies with confidence >= 0.9; with
        labels, the label accuracy overall and per class ({label: share}, beside the judge's own on real
        images); the FD against B, and the floor (A vs B)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1:] != self.real_b.shape[1:]:
            raise UserError(f"samples must be uint8 {tuple(self.real_b.shape[1:])} images like the dataset's at "
                            f"this --image-size/--channels, got {images.dtype} {tuple(images.shape[1:])}")
        if len(images) < 2:
            raise UserError(f"FD compares spreads of features: it needs at least 2 samples, got {len(images)}")
        top = None if labels is None else int(torch.as_tensor(labels).max())
        if top is not None and top >= len(self.classes):
            raise UserError(f"label {top} among the samples, but the dataset has {len(self.classes)} classes: "
                            "check --dataset-path")
        logits, feats = self.features(images)
        pred = logits.argmax(1)
        k = min(len(images), len(self.real_a))  # the floor can only use as many real images as A holds
        # samples usually come label by label: FD's k must be drawn from all of them, not be the first k
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:k]
        out = {"n": len(images), "fd_n": k, "fd": frechet_distance(feats[pick], self.feat_b),
               "fd_floor": frechet_distance(self.features(self.real_a[:k])[1], self.feat_b),
               "classifier_acc": self.heldout_acc, "confident": confident_share(logits),
               "classifier_confident": self.heldout_confident,
               "histogram": torch.bincount(pred, minlength=len(self.classes)).tolist()}
        if labels is not None:
            labels = torch.as_tensor(labels)
            right = (pred == labels).float()
            out["label_acc"] = float(right.mean())
            out["class_acc"] = per_class(right, labels)
            out["classifier_class_acc"] = self.heldout_class_acc
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


if __name__ == "__main__":  # (re)writes the shipped judge: after a change to the judge, on one thread as always
    Evaluator().ship()
    print(f"wrote {SHIPPED_JUDGE}")
