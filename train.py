"""The training loop behind `python ddpm.py` (unconditional) and `python ddpm_conditional.py` (conditional).

One step, top to bottom, is train_step(): draw t and the noise, noise the images in closed form, predict,
the loss, AdamW, EMA. Around it: resume, checkpoints (checkpoints.py), the sample grids, Ctrl-C/SIGTERM
handling, and DDP under torchrun. The options are options.py's, their defaults config.py's.
"""
import hardware  # noqa: F401, I001  (first: it sets the OpenMP spin before torch loads)

import copy
import math
import os
import random
import signal
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from checkpoints import (GUIDE_FILE, atomic_save, cpu_state_dict, file_version, load_checkpoint, load_run,
                         load_weights, match_state_layout, old_run_outputs, rng_state, save_run, set_rng_state)
from config import cluster_count, guide_epoch
from options import parse_args, resolve_args
from hardware import (autocast, autocast_dtype, cuda_graphed, describe_precision, fast_memory_format,
                      precision_name, setup_distributed)
from modules import EMA, Autoguided
from sampling import cluster_draws
from utils import UserError, cluster_images, get_data, make_dataset, prepare_mnist, save_images, setup_logging


# ---- one run's pieces --------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a training run holds, built once by build_run()."""
    config: object
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the plain network: checkpoints and EMA read it
    net: torch.nn.Module  # what the step calls: the model, under DDP, torch.compile or a CUDA graph when asked
    ema_model: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    diffusion: object
    amp_dtype: torch.dtype
    memory_format: torch.memory_format
    steps_per_epoch: int
    global_step: int = 0
    graphed_batch: int = None  # the one batch size the CUDA graph replays; other sizes run the model eagerly
    replaced: dict = field(default_factory=dict)  # --overwrite: old_run_outputs, gone at the first save
    guide_model: torch.nn.Module = None  # the EMA weights saved at guide_epoch: autoguidance for the grids


def build_run(c, rank, world, device, steps_per_epoch):
    memory_format, amp_dtype = fast_memory_format(device), autocast_dtype(device, c.amp, "train")  # measured
    model = c.make_model().to(device, memory_format=memory_format)
    net = model
    if world > 1:  # DDP starts every rank from rank 0's weights
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False) if c.ema else None  # of those weights
    # fused: one kernel for all tensors, 4-6x faster than the per-tensor loop on the CPU (bench.py)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, betas=(0.9, c.adam_beta2),
                                  fused=device.type in ("cuda", "cpu"))
    graphed_batch = None
    if c.compile:
        net = torch.compile(net)
    elif c.cuda_graphs and device.type == "cuda" and world == 1:
        net, graphed_batch = cuda_graphed(model, c, device, amp_dtype, memory_format), c.batch_size
    return Run(c, rank, world, device, model, net, ema_model, EMA(c.ema_beta, c.ema_start) if c.ema else None,
               optimizer, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
               c.make_diffusion(device), amp_dtype, memory_format, steps_per_epoch, graphed_batch=graphed_batch)


def train_step(run, images, labels):
    """One optimizer step on a batch, top to bottom. Returns the per-sample plain MSE (detached)."""
    c, diffusion = run.config, run.diffusion
    images = images.to(run.device, non_blocking=True).contiguous(memory_format=run.memory_format)
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(c, run.global_step, c.epochs * run.steps_per_epoch)
    t, noise, u = step_randomness(run, images.shape)
    x_t, noise = diffusion.noise_images(images, t, noise)
    net = run.net if run.graphed_batch in (None, len(images)) else run.model
    # a CUDA graph holds its own casts, so no autocast cache beside it (make_graphed_callables refuses one)
    with autocast(run.device, run.amp_dtype, cache_enabled=run.graphed_batch is None):
        if c.takes_labels:
            out = net(x_t, t, drop_labels(labels.to(run.device, non_blocking=True), u, c))
        else:
            out = net(x_t, t)
    loss, mse = diffusion.training_loss(out, images, t, noise, c.min_snr_gamma, c.timesteps == "weighted")

    # set to None, not zeroed: a graphed backward hands back its own buffers as the gradients, and a second
    # backward accumulated into them would corrupt them (PyTorch issue #181723)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if c.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), c.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.step_ema(run.ema_model, run.model)
    run.global_step += 1
    return mse.detach()


def learning_rate(c, step, total_steps):
    """The rate for optimizer step `step` (0-based) of `total_steps`: a linear warm-up, then constant or a
    cosine decay from lr to lr_floor * lr at the last step."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.lr_schedule == "constant":
        return c.lr
    progress = (step - c.warmup_steps) / max(1, total_steps - 1 - c.warmup_steps)
    return c.lr * (c.lr_floor + (1 - c.lr_floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def step_randomness(run, shape):
    """This rank's share of the step's timesteps, noise and label-dropout draws for the whole global batch.

    They depend on (seed, step) alone: every rank draws different numbers, a resumed run draws the same as
    an uninterrupted one, and N processes with batch B train like one process with batch N*B."""
    g = torch.Generator(run.device).manual_seed(run.config.data_seed * 1_000_003 + run.global_step)
    rank, world, n = run.rank, run.world, shape[0] * run.world
    c = run.config
    t = (run.diffusion.sample_weighted_timesteps(n, c.min_snr_gamma, generator=g) if c.timesteps == "weighted"
         else run.diffusion.sample_timesteps(n, generator=g))[rank::world]
    noise = torch.randn((n, *shape[1:]), generator=g, device=run.device)[rank::world]
    u = torch.rand(n + 1, generator=g, device=run.device)  # one per sample, the last for whole-batch dropout
    return t, noise, torch.cat([u[:n][rank::world], u[n:]])


def drop_labels(labels, u, c):
    """Classifier-free guidance training: a label of -1 means "no label". Dropping whole batches (the
    original's way) gives -1 everywhere, the same numbers as its labels=None, with no host sync."""
    drop = u[-1:] if c.label_dropout_mode == "batch" else u[:-1]
    return torch.where(drop < c.label_dropout, -1, labels)


def log_loss(run, mse, pbar, logger):
    """The original's plain MSE, averaged over ranks, to the progress bar and TensorBoard; stops on NaN."""
    if run.device.type == "cuda" and run.global_step % 25:  # .item() syncs a GPU: only now and then there
        return
    value = mse.mean()
    if run.world > 1:  # the mean over all ranks (gloo has no AVG)
        dist.all_reduce(value)
    value = value.item() / run.world
    if not np.isfinite(value):
        raise UserError(f"the loss became {value} at step {run.global_step}; the last good checkpoint "
                        "was kept: lower --lr, or resume with --resume")
    if run.rank == 0:
        pbar.set_postfix(MSE=f"{value:.4f}")
        logger.add_scalar("MSE", value, global_step=run.global_step)


def sample_grid(run, model):
    """A grid with the same starting noise every time, so grids across epochs compare; the global RNG is
    left untouched so that resumed runs stay bit-identical."""
    c = run.config
    g = torch.Generator().manual_seed(0 if c.seed is None else c.seed)
    labels = torch.arange(c.n_samples) % c.num_classes if c.conditional else None
    if c.clusters:  # drawn as the images fall into them, as sample.py draws them
        labels = cluster_draws(c.cluster_sizes, c.n_samples, g)
    if run.guide_model is not None and c.guide_scale != 1:
        model = Autoguided(model, run.guide_model, c.guide_scale)
    with autocast(run.device, autocast_dtype(run.device, c.amp, "sample")):
        return run.diffusion.sample(model, c.n_samples, labels, cfg_scale=c.cfg_scale, sampler=c.sampler,
                                    steps=c.sample_steps, eta=c.eta, generator=g, cfg_min_sigma=c.cfg_min_sigma,
                                    corrector_snr=c.corrector_snr, clip=c.clip)


def save_grids(run, epoch, logger):
    c = run.config
    grids = [("", run.model)] + ([("_ema", run.ema_model)] if run.ema_model is not None else [])
    for suffix, m in grids:
        images = sample_grid(run, m)
        nrow = c.num_classes if c.conditional and c.n_samples > c.num_classes else 8
        save_images(images, os.path.join("results", c.run_name, f"{epoch}{suffix}.jpg"), nrow=nrow)
        logger.add_images(f"samples{suffix}", images, run.global_step)


def save(run, epoch, step_in_epoch):
    save_run(os.path.join("models", run.config.run_name), run.model, run.ema_model, run.optimizer,
             {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": run.global_step,
              "ema": run.ema.state_dict() if run.ema else None, "scaler": run.scaler.state_dict(),
              "rng": rng_state(), "precision": precision_name(run.amp_dtype)}, run.config)
    for path, version in run.replaced.items():  # --overwrite: what is left of the old run (never resumed from)
        if os.path.isfile(path) and file_version(path) == version:
            os.remove(path)
    run.replaced = {}


def resume(run):
    """Load the run's last save into `run`; returns (epoch, step in it) to continue from."""
    state = load_run(os.path.join("models", run.config.run_name), run.model, run.ema_model, run.optimizer)
    match_state_layout(run.optimizer)
    for group in run.optimizer.param_groups:  # the saved betas came back with the state: the config decides
        group["betas"] = (group["betas"][0], run.config.adam_beta2)
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    if state["scaler"]:  # empty when saved without fp16 (CPU, bf16, --no-amp): the new scaler starts afresh
        run.scaler.load_state_dict(state["scaler"])
    if state["rng"] is not None and run.world == 1:
        set_rng_state(state["rng"])
    run.global_step = state["global_step"]
    guide_path = os.path.join("models", run.config.run_name, GUIDE_FILE)
    if os.path.isfile(guide_path):
        run.guide_model = load_weights(copy.deepcopy(run.model), load_checkpoint(guide_path), guide_path).eval()
    return state["epoch"], state["step_in_epoch"]


# ---- the run around the steps ------------------------------------------------------------------------

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


def prepare_run_dir(c, rank):
    """Check that the run's outputs can be written."""
    if rank == 0:
        try:
            setup_logging(c.run_name)
            for top in ("models", "results", "runs"):
                probe = os.path.join(top, c.run_name, ".write_test")
                open(probe, "w").close()
                os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write the run's outputs under {os.getcwd()} ({e.strerror}): run from a "
                            "writable folder") from None


def prepare_data(c, rank, world, device):
    """The DataLoader; first the run-wide settings it depends on (the bundled data, the data seed)."""
    if c.dataset_path is None:  # written once per machine, by its first process
        c.dataset_path = prepare_mnist() if int(os.environ.get("LOCAL_RANK", 0)) == 0 else "data/mnist"
        if world > 1:
            dist.barrier()
    if c.seed is not None:  # the initial weights (DDP copies rank 0's) and each rank's data augmentation
        random.seed(c.seed + rank)
        np.random.seed(c.seed + rank)
        torch.manual_seed(c.seed + rank)
    if c.data_seed is None:  # seeds the data order and each step's noise; kept on resume
        box = [random.SystemRandom().randrange(2**31) if c.seed is None else c.seed]
        if world > 1:
            dist.broadcast_object_list(box, src=0)
        c.data_seed = box[0]
    if c.num_workers is None:
        c.num_workers = 4 if device.type == "cuda" else 0
    labels = None
    if c.clusters:  # classes found without labels, the same on every rank; a resumed run must find its own
        if c.cluster_sizes is None:  # a new run: a small folder gets fewer clusters
            n_images = len(make_dataset(c.dataset_path, c.image_size, c.channels, "center"))
            if n_images < 2:
                raise UserError(f"--dataset-path {c.dataset_path}: one image cannot be sorted into clusters to "
                                "guide by: add images, or drop --clusters")
            c.clusters = cluster_count(c.clusters, n_images)
        labels = cluster_images(c.dataset_path, c.image_size, c.channels, c.clusters, c.data_seed)
        sizes = torch.bincount(labels, minlength=c.clusters).tolist()
        if c.cluster_sizes not in (None, sizes):
            raise UserError(f"--resume: the images of {c.dataset_path} no longer fall into the clusters this run "
                            "started with (were images added or removed?); start a new run")
        c.cluster_sizes = sizes
    dataloader = get_data(c, labels=labels)
    classes = c.clusters or len(dataloader.dataset.classes)
    c.num_classes = classes if c.num_classes is None else c.num_classes
    if c.conditional and classes > c.num_classes:
        raise UserError(f"--dataset-path {c.dataset_path} has {classes} classes but "
                        f"--num-classes is {c.num_classes}: raise --num-classes")
    return dataloader


def train(c, resuming=False, overwrite=False, stop=None):
    rank, world, device = setup_distributed(c)
    replaced = old_run_outputs(c, resuming, overwrite)
    dataloader = prepare_data(c, rank, world, device)
    prepare_run_dir(c, rank)
    if device.type == "cuda":  # TF32 for what autocast leaves in fp32; --no-amp is full fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = c.amp
    run = build_run(c, rank, world, device, len(dataloader))
    run.replaced = replaced
    start_epoch, skip = resume(run) if resuming else (0, 0)
    if start_epoch >= c.epochs:
        print(f"run {c.run_name} already trained {start_epoch} epochs: raise --epochs to train more")
        return run.model
    logger = SummaryWriter(os.path.join("runs", c.run_name)) if rank == 0 else None
    if rank == 0:
        clustered = f" in {c.clusters} k-means clusters" if c.clusters else ""
        print(f"run {c.run_name}: {len(dataloader.dataset)} images from {c.dataset_path}{clustered}, {device}, "
              f"{world} process(es) x batch {c.batch_size}, {describe_precision(device, c.amp)}; "
              f"outputs in runs/, results/, models/{c.run_name}/")
    for epoch in range(start_epoch, c.epochs):
        # the order depends on (seed, epoch) alone; a run stopped mid-epoch resumes at its next batch
        dataloader.sampler.set_epoch(epoch, skip=skip * c.batch_size)
        pbar = tqdm(dataloader, desc=f"epoch {epoch}", disable=rank != 0, initial=skip, total=len(dataloader))
        i = skip
        for i, (images, labels) in enumerate(pbar, start=skip + 1):
            log_loss(run, train_step(run, images, labels), pbar, logger)
            if stop is not None and stop.requested(device, run.global_step):
                break
        skip = 0
        finished = i == len(dataloader)
        end_epoch(run, epoch, i if not finished else None, logger)
        if not finished:
            stop_run(run, epoch, i, stop.signum, logger)
    if logger:
        logger.close()
        print(f"done: models/{c.run_name}/ckpt.pt, grids in results/{c.run_name}/")
    return run.model


def end_epoch(run, epoch, stopped_at, logger):
    """Grids when due, then a save: at the epoch's end, or at `stopped_at` when the run was stopped in it."""
    c = run.config
    if run.world > 1:
        check_ranks_agree(run.model, run.ema_model)
    if run.rank == 0:
        if stopped_at is None and (epoch % c.sample_interval == 0 or epoch == c.epochs - 1):
            save_grids(run, epoch, logger)
        save(run, epoch + 1 if stopped_at is None else epoch, stopped_at or 0)
        if stopped_at is None and epoch + 1 == guide_epoch(c):  # a weaker model of the same kind to guide with
            weights = run.ema_model if run.ema_model is not None else run.model
            run.guide_model = copy.deepcopy(weights).eval().requires_grad_(False)
            atomic_save(cpu_state_dict(run.guide_model), os.path.join("models", c.run_name, GUIDE_FILE))
    if run.world > 1:
        dist.barrier()


def stop_run(run, epoch, step, signum, logger):
    c = run.config
    if run.rank == 0:
        cmd = "ddpm_conditional.py" if c.conditional else "ddpm.py"
        launcher = f"torchrun --nproc_per_node={run.world}" if run.world > 1 else "python"  # the same global batch
        print(f"saved models/{c.run_name} at epoch {epoch}, step {step}/{run.steps_per_epoch}. Resume with: "
              f"{launcher} {cmd} --run-name {c.run_name} --resume", file=sys.stderr)
    if logger:
        logger.close()
    sys.exit(128 + signum)


def check_ranks_agree(*models):
    """DDP keeps every rank's weights (and so its EMA) identical; verify it before saving rank 0's copy."""
    sums = torch.stack([p.detach().double().sum() for m in models if m is not None for p in m.parameters()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("the ranks' weights diverged: a bug, please report it with your command line")


def main(conditional, argv=None):
    try:
        args = parse_args(conditional, argv)
        config, resuming = resolve_args(args)
        stop = StopFlag()
        try:
            train(config, resuming, args.overwrite, stop)
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
