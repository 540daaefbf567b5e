"""The training loop behind `python ddpm.py` (unconditional) and `python ddpm_conditional.py` (conditional).

One step, top to bottom: draw t, noise the images in closed form, predict the noise, MSE, AdamW, EMA.
Around it: presets, resume, atomic checkpoints, Ctrl-C/SIGTERM handling, and DDP under torchrun.
"""
import argparse
import copy
import math
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ddpm import SAMPLERS, Diffusion, unwrap
from modules import EMA, UNet, UNet_conditional
from utils import (UserError, atomic_save, autocast_dtype, cpu_state_dict, fast_memory_format, get_data,
                   load_checkpoint, load_weights, option_adder, pick_device, precision_name, prepare_mnist,
                   save_images, setup_logging)

# Settings a preset fills in where the command line is silent. "default" finishes on a 2-core CPU in
# 6-9 minutes on the bundled MNIST digits (README: its timings and what each setting is worth);
# "original" is the original repo's setup.
PRESETS = {
    "default": dict(image_size=16, channels=None, base_width=16, batch_size=64, lr=2e-3, epochs=20,
                    sample_interval=10, sampler="ddim", sample_steps=50, eta=1.0, ema=True, ema_start=500,
                    lr_schedule="constant", min_snr_gamma=5.0, label_dropout_mode="sample", n_samples=64),
    "original": dict(image_size=64, channels=3, base_width=64, batch_size=12, lr=3e-4, epochs=500,
                     sample_interval=1, sampler="ddpm", sample_steps=999, eta=1.0, ema=False, ema_start=2000,
                     lr_schedule="constant", min_snr_gamma=0.0, label_dropout_mode="batch", n_samples=12),
}
CONDITIONAL = {"default": dict(n_samples=80), "original": dict(batch_size=14, epochs=300, sample_interval=10,
                                                                n_samples=10)}
COMMON = dict(seed=None, num_classes=10, noise_steps=1000, cfg_scale=3.0, ema_beta=0.995, label_dropout=0.1,
              num_workers=None, device="auto", compile=False, amp=True, dataset_path=None)
# What fixes the network and data: a resumed run keeps its own and refuses a different one.
RUN_DEFINING = ("image_size", "channels", "base_width", "num_classes", "noise_steps")


def parse_args(conditional, argv=None):
    p = argparse.ArgumentParser(
        description=f"Train a {'class-conditional' if conditional else 'unconditional'} DDPM. With no "
                    "arguments: the bundled MNIST digits, a small network, under 10 minutes on a laptop CPU.",
        argument_default=None)

    opt = option_adder(p)  # --dash-names, with the original's --underscore_names as aliases

    opt("--preset", choices=sorted(PRESETS), help="settings for what you leave unset (default: default)")
    opt("--run-name", help="outputs go to runs/, results/, models/ under this name")
    opt("--dataset-path", help="an ImageFolder (one subfolder per class) or a flat folder of images; "
                               "default: the bundled MNIST digits, written to data/mnist")
    opt("--epochs", type=int, help="total epochs; --resume continues up to it")
    opt("--batch-size", type=int, help="images per step per process")
    opt("--image-size", type=int, help="side in pixels, a multiple of 8")
    opt("--channels", type=int, choices=(1, 3), help="1 grayscale, 3 RGB (default: 1 for the bundled digits, "
                                                     "else 3)")
    opt("--base-width", type=int, help="channels of the first level (64 = the original network)")
    opt("--lr", type=float, help="AdamW learning rate")
    opt("--min-snr-gamma", type=float, help="weight each timestep's MSE by min(SNR, gamma)/SNR (Hang et al. "
                                            "2023); 0: plain MSE as the original")
    opt("--lr-schedule", choices=("constant", "cosine"), help="constant as the original, or a cosine decay "
                                                               "to 0 over the run's --epochs")
    opt("--device", help="auto, cpu, cuda, cuda:N or mps")
    opt("--seed", type=int, help="makes a CPU run repeatable")
    opt("--num-workers", type=int, help="DataLoader workers (default: 0 on CPU, 4 on GPU)")
    opt("--noise-steps", type=int, help="diffusion steps T")
    opt("--sample-interval", type=int, help="save a sample grid every N epochs (and after the last)")
    opt("--n-samples", type=int, help="images per sample grid")
    opt("--sampler", choices=SAMPLERS, help="sampler for the grids")
    opt("--sample-steps", type=int, help="network evaluations per grid image (ddpm: 999)")
    opt("--eta", type=float, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    opt("--ema-beta", type=float, help="EMA decay")
    opt("--ema-start", type=int, help="steps of hard copy before the EMA starts averaging")
    opt("--resume", action="store_true", help="continue the run named --run-name from its last save")
    opt("--overwrite", action="store_true", help="replace an existing run of the same name")
    opt("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the network")
    opt("--amp", action=argparse.BooleanOptionalAction,
        help="mixed precision where it is faster: bf16 autocast on CUDA (fp16 without bf16) and on CPUs with "
             "AMX; --no-amp: fp32 everywhere")
    if conditional:
        opt("--num-classes", type=int, help="label embedding size; at least the dataset's class count")
        opt("--cfg-scale", type=float, help="classifier-free guidance scale for the grids")
        opt("--label-dropout", type=float, help="share of labels dropped for CFG training")
        opt("--label-dropout-mode", choices=("sample", "batch"),
            help="drop labels per sample, or whole batches as the original")
    else:
        opt("--ema", action=argparse.BooleanOptionalAction, help="also keep an EMA model (ema_ckpt.pt); "
                                                                 "on in the default preset")
    args = p.parse_args(argv)
    args.conditional = conditional
    return args


def resolve_args(args):
    """Fill what the command line left unset: from the saved run when resuming, else the preset."""
    explicit = {k: v for k, v in vars(args).items() if v is not None}
    preset = explicit.get("preset", "default")
    run_name = explicit.get("run_name") or ("DDPM_conditional" if args.conditional else "DDPM_Unconditional") + \
        ("" if preset == "original" else "_mnist")
    saved = None
    if args.resume:
        path = os.path.join("models", run_name, "state.pt")
        if not os.path.isfile(path):
            raise UserError(f"--resume: nothing to resume in models/{run_name} (no state.pt); "
                            "drop --resume to start this run, or check --run-name")
        saved = load_checkpoint(path)
        for k in RUN_DEFINING:
            if k in explicit and explicit[k] != saved["args"][k]:
                raise UserError(f"--resume: run {run_name} was trained with --{k.replace('_', '-')} "
                                f"{saved['args'][k]}, not {explicit[k]}: drop the option or start a new run")
        preset = explicit.get("preset", saved["args"]["preset"])
    settings = {**COMMON, **PRESETS[preset], **(CONDITIONAL[preset] if args.conditional else {})}
    settings.update(preset=preset, run_name=run_name)
    settings.update(saved["args"] if saved else {})
    settings.update(explicit)
    settings["ema"] = settings["ema"] or args.conditional  # the conditional script always keeps one
    if settings["channels"] is None:  # the bundled digits are grayscale; a user's images are taken as RGB
        settings["channels"] = 1 if settings["dataset_path"] is None else 3
    out = argparse.Namespace(**settings)
    validate(out)
    return out, saved


def validate(a):
    for name in ("epochs", "batch_size", "image_size", "base_width", "n_samples", "sample_interval",
                 "sample_steps", "noise_steps"):
        if getattr(a, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    if a.lr <= 0:
        raise UserError(f"--lr must be positive, got {a.lr}")
    if a.image_size % 8:
        raise UserError(f"--image-size {a.image_size} is not a multiple of 8 (the UNet halves it three "
                        f"times): try {max(8, a.image_size // 8 * 8)}")
    if a.num_classes <= 0:
        raise UserError(f"--num-classes must be positive, got {a.num_classes}")
    if not 0 <= a.label_dropout <= 1:
        raise UserError(f"--label-dropout must lie in [0, 1], got {a.label_dropout}")
    if a.sampler == "ddpm":
        a.sample_steps = a.noise_steps - 1
    elif a.sample_steps > a.noise_steps - 1:
        raise UserError(f"--sample-steps must be at most {a.noise_steps - 1}, got {a.sample_steps}")


def make_model(a):
    if a.conditional:
        return UNet_conditional(c_in=a.channels, c_out=a.channels, num_classes=a.num_classes,
                                base_width=a.base_width)
    return UNet(c_in=a.channels, c_out=a.channels, base_width=a.base_width)


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy arrays would need pickle: store a tensor
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                     has_gauss, gauss), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to finish its step, save and exit; a second Ctrl-C aborts at once."""

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step (under torchrun, up to 25), then saving "
              "(Ctrl-C again to abort)", file=sys.stderr)

    def requested(self, device, step, every=25):
        if not (dist.is_available() and dist.is_initialized()):
            return bool(self.signum)
        if step % every:  # agreeing costs an all_reduce and a host sync: only now and then
            return False
        flag = torch.tensor([self.signum], device=device)  # every rank must stop at the same step
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def setup_distributed(a):
    """Under torchrun (WORLD_SIZE set): one process per device, NCCL on GPUs and gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1, pick_device(a.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(a.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, dist.get_world_size(), device


def prepare_run_dir(a, saved, rank):
    """Refuse to overwrite another run's checkpoints unless asked to."""
    ckpts = [f for f in ("ckpt.pt", "ema_ckpt.pt", "optim.pt", "state.pt")
             if os.path.exists(os.path.join("models", a.run_name, f))]
    if ckpts and saved is None:
        if not a.overwrite:
            raise UserError(f"models/{a.run_name} already holds a run ({', '.join(ckpts)}): pass --resume to "
                            "continue it, --overwrite to replace it, or choose another --run-name")
        if rank == 0:  # a new run must never be resumed from the old one's files
            for f in ckpts:
                os.remove(os.path.join("models", a.run_name, f))
    if rank == 0:
        try:
            setup_logging(a.run_name)
            for top in ("models", "results", "runs"):
                probe = os.path.join(top, a.run_name, ".write_test")
                open(probe, "w").close()
                os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write the run's outputs under {os.getcwd()} ({e.strerror}): run from a "
                            "writable folder") from None


def sample_grid(a, diffusion, model, device):
    """A grid with the same starting noise every time, so grids across epochs compare; the global RNG is
    left untouched so that resumed runs stay bit-identical."""
    g = torch.Generator().manual_seed(0 if a.seed is None else a.seed)
    labels = torch.arange(a.n_samples) % a.num_classes if a.conditional else None
    amp_dtype = autocast_dtype(device, a.amp)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return diffusion.sample(model, a.n_samples, labels, cfg_scale=a.cfg_scale, sampler=a.sampler,
                                steps=a.sample_steps, eta=a.eta, generator=g)


def match_state_layout(optimizer):
    """Give each optimizer state tensor its parameter's memory layout. A run saved from a channels_last model
    resumed in NCHW (or the reverse: another machine, see utils.fast_memory_format) would otherwise feed fused
    AdamW tensors of different strides, and torch 2.14's CPU kernel then takes wrong steps without a word."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def save_run(a, model, ema_model, ema, optimizer, scaler, epoch, step_in_epoch, global_step):
    """ckpt.pt, ema_ckpt.pt and optim.pt are plain state_dicts as in the original; state.pt holds the rest
    that resuming needs. Each file is replaced atomically; state.pt goes last."""
    for p in unwrap(model).parameters():
        if not torch.isfinite(p).all():
            raise UserError("the weights became non-finite; nothing was saved over the last good checkpoint: "
                            "lower --lr, or resume from the last save with --resume")
    d = os.path.join("models", a.run_name)
    atomic_save(cpu_state_dict(model), os.path.join(d, "ckpt.pt"))
    if ema_model is not None:
        atomic_save(cpu_state_dict(ema_model), os.path.join(d, "ema_ckpt.pt"))
    atomic_save(optimizer.state_dict(), os.path.join(d, "optim.pt"))
    atomic_save({"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                 "ema": ema.state_dict() if ema else None, "scaler": scaler.state_dict(),
                 "rng": rng_state(), "args": {k: v for k, v in vars(a).items()
                                              if k not in ("resume", "overwrite")}},
                os.path.join(d, "state.pt"))


def train(a, saved=None, stop=None):
    rank, world, device = setup_distributed(a)
    if a.dataset_path is None:  # written once per machine, by its first process
        a.dataset_path = prepare_mnist() if int(os.environ.get("LOCAL_RANK", 0)) == 0 else "data/mnist"
        if world > 1:
            dist.barrier()
    prepare_run_dir(a, saved, rank)
    if a.seed is not None:  # the initial weights (DDP copies rank 0's) and each rank's data augmentation
        random.seed(a.seed + rank)
        np.random.seed(a.seed + rank)
        torch.manual_seed(a.seed + rank)
    if getattr(a, "data_seed", None) is None:  # seeds the data order and each step's noise; kept on resume
        box = [random.SystemRandom().randrange(2**31) if a.seed is None else a.seed]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        a.data_seed = box[0]
    if a.num_workers is None:
        a.num_workers = 4 if device.type == "cuda" else 0
    cuda = device.type == "cuda"
    if cuda:  # TF32 for what autocast leaves in fp32; --no-amp is full fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = a.amp

    dataloader = get_data(a)
    if a.conditional and len(dataloader.dataset.classes) > a.num_classes:
        raise UserError(f"--dataset-path {a.dataset_path} has {len(dataloader.dataset.classes)} classes but "
                        f"--num-classes is {a.num_classes}: raise --num-classes")
    memory_format, amp_dtype = fast_memory_format(device), autocast_dtype(device, a.amp)  # per device, measured
    model = make_model(a).to(device, memory_format=memory_format)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if a.ema else None
    ema = EMA(a.ema_beta, a.ema_start) if a.ema else None
    # fused: one kernel for all tensors, 4-6x faster than the per-tensor loop on the CPU (bench.py)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=device.type in ("cuda", "cpu"))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    diffusion = Diffusion(a.noise_steps, img_size=a.image_size, device=device)

    start_epoch, skip, global_step = 0, 0, 0
    if saved is not None:
        d = os.path.join("models", a.run_name)
        load_weights(model, load_checkpoint(os.path.join(d, "ckpt.pt")), f"models/{a.run_name}/ckpt.pt")
        if ema_model is not None:
            load_weights(ema_model, load_checkpoint(os.path.join(d, "ema_ckpt.pt")), "ema_ckpt.pt")
            ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(load_checkpoint(os.path.join(d, "optim.pt")))
        match_state_layout(optimizer)
        scaler.load_state_dict(saved["scaler"])
        start_epoch, skip, global_step = saved["epoch"], saved["step_in_epoch"], saved["global_step"]
        if saved["rng"] is not None and world == 1:
            set_rng_state(saved["rng"])
        if start_epoch >= a.epochs:
            print(f"run {a.run_name} already trained {start_epoch} epochs: raise --epochs to train more")
            return model

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    if a.compile:
        net = torch.compile(net)
    logger = SummaryWriter(os.path.join("runs", a.run_name)) if rank == 0 else None
    if rank == 0:
        print(f"run {a.run_name}: {len(dataloader.dataset)} images from {a.dataset_path}, {device}, "
              f"{world} process(es) x batch {a.batch_size}, {precision_name(amp_dtype)}; "
              f"outputs in runs/, results/, models/{a.run_name}/")
    steps_per_epoch = len(dataloader)

    for epoch in range(start_epoch, a.epochs):
        # the order depends on (seed, epoch) alone; a run stopped mid-epoch resumes at its next batch
        dataloader.sampler.set_epoch(epoch, skip=skip * a.batch_size)
        pbar = tqdm(dataloader, desc=f"epoch {epoch}", disable=rank != 0, initial=skip, total=steps_per_epoch)
        i = skip
        for i, (images, labels) in enumerate(pbar, start=skip + 1):
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            if a.lr_schedule == "cosine":
                progress = global_step / (a.epochs * steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = a.lr * 0.5 * (1 + math.cos(math.pi * progress))
            t, noise, u = step_randomness(a, global_step, images.shape, rank, world, device)
            x_t, noise = diffusion.noise_images(images, t, noise)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if a.conditional:
                    labels = drop_labels(labels.to(device, non_blocking=True), u, a)
                    predicted_noise = net(x_t, t, labels)
                else:
                    predicted_noise = net(x_t, t)
            mse = F.mse_loss(predicted_noise.float(), noise, reduction="none").mean(dim=(1, 2, 3))
            loss = (mse * diffusion.loss_weight(t, a.min_snr_gamma)).mean() if a.min_snr_gamma else mse.mean()

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.step_ema(ema_model, model)
            global_step += 1

            if not cuda or global_step % 25 == 0:  # .item() syncs a GPU: only now and then there
                value = mse.detach().mean()  # the original's plain MSE, whatever the weighting
                if world > 1:  # the mean over all ranks (gloo has no AVG)
                    dist.all_reduce(value)
                value = value.item() / world
                if not np.isfinite(value):
                    raise UserError(f"the loss became {value} at step {global_step}; the last good checkpoint "
                                    "was kept: lower --lr, or resume with --resume")
                if rank == 0:
                    pbar.set_postfix(MSE=f"{value:.4f}")
                    logger.add_scalar("MSE", value, global_step=global_step)
            if stop is not None and stop.requested(device, global_step):
                break
        skip = 0
        if world > 1:
            check_ranks_agree(model, ema_model)
        finished_epoch = i == steps_per_epoch
        last = epoch == a.epochs - 1
        if rank == 0:
            if finished_epoch and (epoch % a.sample_interval == 0 or last):
                grids = [("", model)] + ([("_ema", ema_model)] if ema_model is not None else [])
                for suffix, m in grids:
                    images = sample_grid(a, diffusion, m, device)
                    nrow = a.num_classes if a.conditional and a.n_samples > a.num_classes else 8
                    save_images(images, os.path.join("results", a.run_name, f"{epoch}{suffix}.jpg"), nrow=nrow)
                    logger.add_images(f"samples{suffix}", images, global_step)
            save_run(a, model, ema_model, ema, optimizer, scaler,
                     epoch + 1 if finished_epoch else epoch, 0 if finished_epoch else i, global_step)
        if world > 1:
            dist.barrier()
        if not finished_epoch:
            if rank == 0:
                cmd = "ddpm_conditional.py" if a.conditional else "ddpm.py"
                print(f"saved models/{a.run_name} at epoch {epoch}, step {i}/{steps_per_epoch}. Resume with: "
                      f"python {cmd} --run-name {a.run_name} --resume", file=sys.stderr)
            if logger:
                logger.close()
            sys.exit(128 + stop.signum)
    if logger:
        logger.close()
        print(f"done: models/{a.run_name}/ckpt.pt, grids in results/{a.run_name}/")
    return model


def check_ranks_agree(*models):
    """DDP keeps every rank's weights (and so its EMA) identical; verify it before saving rank 0's copy."""
    sums = torch.stack([p.detach().double().sum() for m in models if m is not None for p in m.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the ranks' weights diverged: a bug, please report it with your command line")


def step_randomness(a, step, shape, rank, world, device):
    """This rank's share of the step's timesteps, noise and label-dropout draws for the whole global batch.

    They depend on (seed, step) alone: every rank draws different numbers, a resumed run draws the same as
    an uninterrupted one, and N processes with batch B train like one process with batch N*B."""
    g = torch.Generator(device).manual_seed(a.data_seed * 1_000_003 + step)
    n = shape[0] * world
    t = torch.randint(1, a.noise_steps, (n,), generator=g, device=device)[rank::world]
    noise = torch.randn((n, *shape[1:]), generator=g, device=device)[rank::world]
    u = torch.rand(n + 1, generator=g, device=device)  # one per sample, the last for whole-batch dropout
    return t, noise, torch.cat([u[:n][rank::world], u[n:]])


def drop_labels(labels, u, a):
    """Classifier-free guidance training: a label of -1 means "no label". Dropping whole batches (the
    original's way) gives -1 everywhere, the same numbers as its labels=None, with no host sync."""
    drop = u[-1:] if a.label_dropout_mode == "batch" else u[:-1]
    return torch.where(drop < a.label_dropout, -1, labels)


def main(conditional, argv=None):
    try:
        args = parse_args(conditional, argv)
        args, saved = resolve_args(args)
        stop = StopFlag()
        try:
            train(args, saved, stop)
        finally:
            stop.restore()
    except UserError as e:
        # raised in a DataLoader worker, the message carries that worker's traceback: keep its last line
        message = str(e).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
