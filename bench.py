"""Speed benchmark: the fast path against the faithful path (the original's computation), same weights, same run.

For each configuration it prints training images/s, guided sampling evaluations/s, forward time, peak memory,
achieved GFLOP/s and its share of a large matmul timed in the same run. Each (config, path) runs in its own
subprocess, because a process's peak RSS never goes down.

    python bench.py                                  # both configs, CPU or the default device
    python bench.py --configs original --steps 3 --warmup 1
    python bench.py --device cuda --compile
    python bench.py --configs original --paths fast,fast-fp32 --profile   # where each path's step goes

fast:      what train.py runs: SDPA attention, batched CFG (one pass over 2n images), torch.inference_mode
           for sampling, fused AdamW (4x cheaper on the CPU), and the per-device choices of hardware.py:
           autocast_dtype, per path (bf16 on CUDA; on CPUs with AVX512-BF16 or AMX for training, with AMX for
           sampling) and fast_memory_format (channels_last on CUDA and x86 CPUs); TF32 on CUDA. Eager:
           with one process on a GPU train.py also replays the step as CUDA graphs (--no-cuda-graphs to
           compare; docs/speed.md#cuda).
fast-fp32: the same without autocast (run only where the fast path uses one).
train.py:  train.py's own step (train.train_step on train.build_run's model, optimizer and precision): the fast
           path's network plus the run's loss weighting, gradient clipping, EMA and learning-rate schedule, and
           on CUDA with one process the step replayed as CUDA graphs (with --compile: the compiled network
           instead). Sampling as the fast path.
faithful:  fp32 eager, the original's nn.MultiheadAttention call, two CFG passes, contiguous NCHW, plain AdamW.
"""
import hardware  # noqa: F401, I001  (first: it sets the OpenMP spin policy before torch loads OpenMP)

import argparse
import os
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from diffusion import Diffusion
from hardware import autocast, autocast_dtype, fast_memory_format, precision_name
from modules import UNet_conditional, set_original_attention

CONFIGS = {
    "original": dict(image_size=64, channels=3, base_width=64, batch=12),  # the original repo's setup
    "default": dict(image_size=16, channels=1, base_width=16, batch=64),   # the default preset's network and
    # images; the preset trains at batch 32, timed at 64 here as in every table in docs/speed.md
}
NUM_CLASSES = 10
PATHS = ("fast", "fast-fp32", "train.py", "faithful")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps, warmup):
    """Median seconds of fn() over `steps` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_gflops(device, dtype=torch.float32, n=2048, reps=10):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, reps, 2) / 1e9


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # VmHWM, not getrusage: Linux keeps ru_maxrss across fork+exec, so a worker would report its parent's peak
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1e6  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux, bytes on macOS


def count_flops(cfg):
    """Forward and training-step FLOPs per image, counted on the original's attention math: FlopCounterMode
    has no formula for the CPU SDPA kernel and would leave the attention out (13.5 instead of 18.7 GFLOP)."""
    model = set_original_attention(make_model(cfg))
    x = torch.randn(1, cfg["channels"], cfg["image_size"], cfg["image_size"])
    t, y = torch.tensor([500]), torch.tensor([3])
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, y)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        F.mse_loss(model(x, t, y), x).backward()
    return fwd, fc.get_total_flops()


def make_model(cfg):
    torch.manual_seed(0)
    c = cfg["channels"]
    return UNet_conditional(c_in=c, c_out=c, num_classes=NUM_CLASSES, base_width=cfg["base_width"])


def worker(a):
    """One (config, path) in this process; prints a JSON line."""
    device = torch.device(a.device)
    cfg, fast = CONFIGS[a.config], a.path != "faithful"
    if a.threads:
        torch.set_num_threads(a.threads)
    train_dtype, sample_dtype = (autocast_dtype(device, purpose=p) if a.path in ("fast", "train.py") else None
                                 for p in ("train", "sample"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = train_dtype is not None
    fmt = fast_memory_format(device) if a.channels_last == "auto" else (
        torch.channels_last if a.channels_last == "on" else torch.contiguous_format)
    fmt = fmt if fast else torch.contiguous_format
    dtypes = (train_dtype, sample_dtype)
    if a.path == "train.py":  # its own training step; sampling as train.py's grids and sample.py: eager
        train_step, model = train_py_step(cfg, a.compile, device)
        _, sample_step, forward = make_steps(cfg, fast, False, device, dtypes, fmt, model)
    else:
        train_step, sample_step, forward = make_steps(cfg, fast, a.compile, device, dtypes, fmt)

    base = peak_memory_gb(device)  # held before the first step (on the CPU: torch's own libraries too)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s = timed(train_step, device, a.steps, a.warmup)
    train_peak = peak_memory_gb(device)
    if a.profile:  # one more training step, op by op, to stderr (stdout carries the JSON line)
        from torch.profiler import profile

        with profile() as prof:
            train_step()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"[{a.config}, {a.path}] one training step, by operator:\n"
              + prof.key_averages().table(sort_by=key, row_limit=15), file=sys.stderr)
    with torch.inference_mode() if fast else torch.no_grad():  # the original sampled under no_grad
        sample_s = timed(sample_step, device, a.steps, a.warmup)
        forward_s = timed(forward, device, a.steps, a.warmup)
    print(json.dumps(dict(train_s=train_s, sample_s=sample_s, forward_s=forward_s, base_gb=base,
                          train_peak_gb=train_peak, peak_gb=peak_memory_gb(device),
                          channels_last=fmt == torch.channels_last, precision=precision_name(train_dtype),
                          sample_precision=precision_name(sample_dtype),
                          threads=torch.get_num_threads())))


def make_steps(cfg, fast, compile, device, dtypes, fmt, model=None):
    """(a training step, a guided sampling step, a forward pass) of one path, as closures, on `model` or a new
    one; dtypes: the autocast dtypes (None: fp32) of training and of sampling."""
    train_dtype, sample_dtype = dtypes
    model = make_model(cfg).to(device, memory_format=fmt) if model is None else model
    set_original_attention(model, not fast)
    net = torch.compile(model) if fast and compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True if fast else None)
    scaler = torch.amp.GradScaler("cuda", enabled=train_dtype == torch.float16)
    diffusion = Diffusion(1000, img_size=cfg["image_size"], device=device)
    n, s, c = cfg["batch"], cfg["image_size"], cfg["channels"]
    images = torch.randn(n, c, s, s, device=device).clamp(-1, 1).contiguous(memory_format=fmt)
    labels = torch.randint(0, NUM_CLASSES, (n,), device=device)
    x = torch.randn(n, c, s, s, device=device).contiguous(memory_format=fmt)
    t_mid = torch.full((n,), 500, device=device, dtype=torch.long)

    def train_step():
        # drawn on the device: sample_timesteps copies from the CPU, a host sync per step on CUDA
        t = torch.randint(1, diffusion.noise_steps, (n,), device=device) if fast else diffusion.sample_timesteps(n)
        x_t, noise = diffusion.noise_images(images, t)
        with autocast(device, train_dtype):
            predicted = net(x_t, t, labels)
        loss = F.mse_loss(predicted.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()  # no .item(): nothing here waits for the GPU

    def sample_step():  # one DDPM step with classifier-free guidance, as Diffusion.sample runs it
        model.eval()
        with autocast(device, sample_dtype):
            eps = diffusion.predict_noise(net, x, t_mid, labels, cfg_scale=3, batched_cfg=fast)
        diffusion.ddpm_step(x, t_mid, eps, torch.randn_like(x))

    def forward():
        model.eval()
        with autocast(device, sample_dtype):
            net(x, t_mid, labels)

    return train_step, sample_step, forward


def train_py_step(cfg, compile, device):
    """(train.py's training step on this configuration as a closure, the run's model)."""
    import train
    from config import RunConfig

    torch.manual_seed(0)
    c = RunConfig(conditional=True, channels=cfg["channels"], base_width=cfg["base_width"], num_classes=NUM_CLASSES,
                  image_size=cfg["image_size"], batch_size=cfg["batch"], seed=0, data_seed=0, compile=compile)
    run = train.build_run(c, 0, 1, device, steps_per_epoch=1000)
    n, s = cfg["batch"], cfg["image_size"]
    images = torch.randn(n, cfg["channels"], s, s).clamp(-1, 1)  # on the host, as the DataLoader gives them
    labels = torch.randint(0, NUM_CLASSES, (n,))
    return (lambda: train.train_step(run, images, labels)), run.model


def run_worker(a, config, path):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", config, "--path", path,
           "--device", a.device, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--channels-last", a.channels_last]
    cmd += ["--compile"] * a.compile + ["--profile"] * a.profile
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--configs", default="original,default", help=f"comma-separated: {', '.join(CONFIGS)}")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated: fast, fast-fp32, train.py, faithful (fast-fp32 only where fast uses "
                        "autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the fast path's network")
    p.add_argument("--profile", action="store_true", help="also print each path's training step by operator")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    p.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                   help="the fast paths' memory format (auto: hardware.fast_memory_format)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    for option, given, known in (("--configs", a.configs, CONFIGS), ("--paths", a.paths, PATHS)):
        unknown = [v for v in given.split(",") if v not in known]
        if unknown:
            p.error(f"{option}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")

    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    amp_dtype, sample_dtype = autocast_dtype(device, purpose="train"), autocast_dtype(device, purpose="sample")
    peak32 = matmul_gflops(device)
    # each step's compute dtype sets its peak: the fast path's autocast dtype (training's, sampling's), else fp32
    peak_fast = matmul_gflops(device, amp_dtype) if amp_dtype is not None else peak32
    fast_peaks = (peak_fast, peak_fast if sample_dtype == amp_dtype else peak32)
    peaks = {"fast": fast_peaks, "train.py": fast_peaks, "fast-fp32": (peak32, peak32), "faithful": (peak32, peak32)}
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}")
    print(f"matmul peak (2048^3): fp32 {peak32:.0f} GFLOP/s" +
          (f", {precision_name(amp_dtype).split()[0]} {peak_fast:.0f} GFLOP/s" if amp_dtype is not None else ""))
    print(f"median of {a.steps} timed iterations after {a.warmup} warmup; FLOPs counted with FlopCounterMode "
          "on the original's attention math (the same function)")
    paths = [p for p in a.paths.split(",") if p != "fast-fp32" or amp_dtype is not None]
    for config in a.configs.split(","):
        print_config(a, config, paths, peaks, device)


def print_config(a, config, paths, peaks, device):
    """One configuration's rows: each path in its own process, then the fast/faithful ratios."""
    cfg = CONFIGS[config]
    fwd_flops, train_flops = count_flops(cfg)
    n = cfg["batch"]
    print(f"\n[{config}] {cfg['image_size']}x{cfg['image_size']}x{cfg['channels']}, base_width "
          f"{cfg['base_width']}, batch {n}, UNet_conditional({NUM_CLASSES} classes); "
          f"{fwd_flops / 1e9:.2f} GFLOP/image forward, {train_flops / 1e9:.2f} per training image")
    rows = {}
    for path in paths:
        r = rows[path] = run_worker(a, config, path)
        peak, forward_peak = peaks[path]  # training's, and the forward's (sampling's precision)
        gf_train = train_flops * n / r["train_s"] / 1e9
        gf_fwd = fwd_flops * n / r["forward_s"] / 1e9
        mem = "max_memory_allocated" if device.type == "cuda" else "peak RSS"
        print(f"  {path:9s} train {n / r['train_s']:7.2f} img/s ({r['train_s']:.3f} s/step, "
              f"{gf_train:.0f} GFLOP/s = {gf_train / peak:.0%} of peak)\n"
              f"            sample {n / r['sample_s']:7.1f} guided evals/s ({r['sample_s']:.3f} s per CFG step "
              f"of {n})\n"
              f"            forward {r['forward_s']:.3f} s "
              f"({gf_fwd:.0f} GFLOP/s = {gf_fwd / forward_peak:.0%} of peak)\n"
              f"            {mem}: training {r['train_peak_gb']:.2f} GB, whole run {r['peak_gb']:.2f} GB, "
              f"at start {r['base_gb']:.2f} GB | channels_last={r['channels_last']}, {r['precision']}"
              + (f", sampling {r['sample_precision']}" if r['sample_precision'] != r['precision'] else ""))
    for path in ("fast", "fast-fp32", "train.py"):
        if path in rows and "faithful" in rows:
            f, o = rows[path], rows["faithful"]
            print(f"  {path}/faithful: train {o['train_s'] / f['train_s']:.1f}x, "
                  f"sample {o['sample_s'] / f['sample_s']:.1f}x, forward {o['forward_s'] / f['forward_s']:.1f}x, "
                  f"train peak memory {f['train_peak_gb'] / o['train_peak_gb']:.2f}x")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
