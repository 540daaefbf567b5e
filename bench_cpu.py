"""Three CPU choices, measured: OpenMP's wait policy, bf16 autocast, and keeping the prepared images in memory.

    python bench_cpu.py                  # prints its markdown tables (minutes on 2 cores)
    python bench_cpu.py --only profile   # one of: openmp, bf16, attention, loading, kernels, profile, variants, batches
    python bench_cpu.py --only variants --compile

OpenMP: the default network's training step (UNet_conditional, width 16, 16x16x1, at batch 64; fused
AdamW) in fresh processes, on an idle CPU and with two jobs sharing it; libgomp reads its settings once,
when torch loads it. bf16: the default configuration's and the original's (64x64, width 64, batch 12) training
step in fp32 and under CPU bf16 autocast, contiguous NCHW both: the input to hardware.precision's choice,
which takes bf16 only where the CPU has native bf16 dot products (AVX512-BF16 or AMX); and the 64x64
attention layer's forward and backward in fp32, bf16, and as modules.CPUBf16Attention runs it, and heads of 4
and 8 channels as they are and zero-padded to 16 (modules.padded_head_attention). Loading: an
epoch of the bundled digits as the default run loads them (in the training process, centre crop, batch 32),
each image read from its file every epoch or kept in memory after the first (utils.SeededSamples), beside the
training steps of that epoch. Kernels: a 3x3 convolution and a matmul, one thread, in fp32 and under bf16
autocast: 2x faster in bf16 where the CPU has AVX512-BF16, ~100x slower where bf16 is emulated. Profile: the
default runs' training step (ddpm_conditional.py's, then ddpm.py's) by operator, with its data loading.
Variants: that network's training step and a sampling evaluation computed other ways with the same math (memory
format, padded heads, convolution backend, attention kernel, torch.compile), one thread, interleaved.
Batches: that step as train.py takes it at batch sizes from 1 to 64, at one thread and at all of them.
"""
import argparse
import os
import subprocess
import sys

SETTINGS = [("libgomp's default spin", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": ""}),
            ("OMP_WAIT_POLICY=PASSIVE (no spin)", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": ""}),
            ("GOMP_SPINCOUNT=3000 (hardware.py's default)", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "3000"}),
            *((f"GOMP_SPINCOUNT={n}", {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": str(n)}) for n in (10000, 30000))]

STEP = """
import sys, time, torch
from modules import UNet_conditional
steps, size, channels, width, batch, bf16 = (int(v) for v in sys.argv[1:])
torch.manual_seed(0)
m = UNet_conditional(channels, channels, num_classes=10, base_width=width)
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
x = torch.randn(batch, channels, size, size)
t, y = torch.randint(1, 1000, (batch,)), torch.randint(0, 10, (batch,))
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
        out = m(x, t, y)
    loss = torch.nn.functional.mse_loss(out.float(), x)
    opt.zero_grad()
    loss.backward()
    opt.step()
step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
print((time.perf_counter() - t0) / steps)
"""
ATTENTION = """
import hardware, time, torch
import torch.nn.functional as F
from modules import CPUBf16Attention
def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)
for name, fn, dtype in (("SDPA, fp32", sdpa, torch.float32), ("SDPA, bf16", sdpa, torch.bfloat16),
                        ("CPUBf16Attention (bf16 forward, fp32 backward)", CPUBf16Attention.apply, torch.bfloat16)):
    q, k, v, g = (torch.randn(12, 4, 4096, 16, dtype=dtype, requires_grad=i < 3) for i in range(4))
    times = []
    for _ in range(4):  # the first is a warm-up
        t0 = time.perf_counter(); out = fn(q, k, v); t1 = time.perf_counter(); out.backward(g)
        times.append((t1 - t0, time.perf_counter() - t1))
    fwd, bwd = sorted(times[1:])[1]
    print(f"| {name} | {1000 * fwd:.0f} ms | {1000 * bwd:.0f} ms |", flush=True)
"""
SMALL_HEADS = """
import hardware, time, torch
import torch.nn.functional as F
import modules
torch.set_num_threads(1)
def plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)
def ms(fn, q, k, v, g, grad):
    best = []
    for _ in range(5):  # the median of five
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = fn(q, k, v)
            if grad:
                out.backward(g)
        best.append(time.perf_counter() - t0)
    return 1000 * sorted(best)[2]
for tokens in (64, 256, 1024):
    for d in (4, 8):
        for grad, batch in ((True, 32), (False, 128)):
            q, k, v, g = (torch.randn(batch, 4, tokens, d, requires_grad=grad and i < 3) for i in range(4))
            a, b = ms(plain, q, k, v, g, grad), ms(modules.padded_head_attention, q, k, v, g, grad)
            what = f"forward and backward, batch {batch}" if grad else f"forward, batch {batch}"
            print(f"| {tokens} | {d} | {what} | {a:.1f} ms | {b:.1f} ms ({a / b:.2f}x) |", flush=True)
"""
LOADING = """
import glob, os, sys, time, utils
from types import SimpleNamespace
if sys.argv[1] == "files":
    utils.KEEP_BYTES = 0
args = SimpleNamespace(dataset_path=utils.prepare_mnist(), image_size=16, channels=1, crop="center", batch_size=32,
                       seed=0, num_workers=0)
for path in glob.glob(os.path.join(args.dataset_path, "*", "*")):  # both cases start from the OS's file cache
    open(path, "rb").read()
loader, seconds = utils.get_data(args), []
for _ in range(3):
    t0 = time.perf_counter()
    for _ in loader:
        pass
    seconds.append(time.perf_counter() - t0)
print(seconds[0], min(seconds[1:]), len(loader))
"""
KERNELS = """
import hardware, time, torch
torch.set_num_threads(1)
conv, x = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.randn(12, 64, 64, 64, requires_grad=True)
a = torch.randn(1024, 1024)
def seconds(fn, bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        fn()  # a warm-up
        times = []
        for _ in range(2):
            t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    return min(times)
for name, fn in (("3x3 conv 64->64 of 12x64x64x64, forward", lambda: conv(x.detach())),
                 ("the same, forward and backward", lambda: conv(x).sum().backward()),
                 ("1024^3 matmul", lambda: a @ a)):
    fp32, bf16 = seconds(fn, False), seconds(fn, True)
    print(f"| {name} | {1000 * fp32:.0f} ms | {1000 * bf16:.0f} ms ({fp32 / bf16:.2f}x) |", flush=True)
"""
PROFILE = """
import hardware, sys, time, torch
from torch.profiler import profile
import train
from options import parse_args, resolve_args
conditional, steps = sys.argv[1] == "1", int(sys.argv[2])
c, _ = resolve_args(parse_args(conditional, ["--seed", "0"]))  # the default run, as ddpm(_conditional).py
loader = train.prepare_data(c, 0, 1, torch.device("cpu"))
run = train.build_run(c, 0, 1, torch.device("cpu"), len(loader))
for _ in loader:  # an epoch read first: every image prepared and kept, as after a run's first epoch
    pass
batches, loading = iter(loader), 0.0
for _ in range(5):  # warm-up steps
    train.train_step(run, *next(batches))
with profile() as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
        t1 = time.perf_counter()
        images, labels = next(batches)
        loading += time.perf_counter() - t1
        train.train_step(run, images, labels).mean().item()  # what log_loss reads each step
    wall = time.perf_counter() - t0
ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
total = sum(e.self_cpu_time_total for e in ops) / 1000 / steps
print(f"{steps} steps of {'ddpm_conditional.py' if conditional else 'ddpm.py'}, {torch.get_num_threads()} threads, "
      f"under the profiler: {1000 * wall / steps:.0f} ms a step wall, of which {1000 * loading / steps:.1f} ms "
      f"loading the batch; {total:.0f} ms in operators (self CPU time)")
print("| operator | ms a step | share | calls a step |")
print("|---|---|---|---|")
for e in ops[:10]:
    ms = e.self_cpu_time_total / 1000 / steps
    print(f"| {e.key} | {ms:.1f} | {ms / total:.0%} | {e.count / steps:.0f} |")
from torch.utils._python_dispatch import TorchDispatchMode
class Count(TorchDispatchMode):
    n = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Count.n += 1
        return func(*args, **(kwargs or {}))
with Count():
    train.train_step(run, *next(batches))
print(f"PyTorch operations dispatched in one step: {Count.n}")
"""
VARIANTS = """
import contextlib, sys, time, warnings, hardware, modules, torch
import torch.nn.functional as F
warnings.filterwarnings("ignore", "TF32 acceleration on top of oneDNN")  # said by mkldnn.flags, about Intel GPUs
from torch.nn.attention import SDPBackend, sdpa_kernel
from modules import UNet_conditional
torch.set_num_threads(1)  # CPU time of one thread: what other jobs on the machine change least
x, t, y = torch.randn(32, 1, 16, 16), torch.randint(1, 1000, (32,)), torch.randint(0, 10, (32,))
xs, ts, ys = torch.randn(128, 1, 16, 16), torch.full((128,), 500), torch.randint(-1, 10, (128,))  # a CFG'd grid
TRAIN_LAYOUT = hardware.fast_memory_format(torch.device("cpu"))
@contextlib.contextmanager
def unpadded():
    saved, modules.PADDED_HEAD = modules.PADDED_HEAD, 0
    try:
        yield
    finally:
        modules.PADDED_HEAD = saved
def variant(fmt=TRAIN_LAYOUT, context=contextlib.nullcontext, compile=False):
    torch.manual_seed(0)
    model = UNet_conditional(1, 1, num_classes=10, base_width=16).to(memory_format=fmt)
    net, optimizer = torch.compile(model) if compile else model, torch.optim.AdamW(model.parameters(), fused=True)
    def step():
        with context():
            loss = F.mse_loss(net(x.contiguous(memory_format=fmt), t, y), x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
    def sample():  # one network evaluation of a grid's sampling
        with context(), torch.inference_mode():
            model(xs, ts, ys)
    t0 = time.perf_counter()
    step()
    return step, (sample if not compile else None), time.perf_counter() - t0
layouts = {torch.channels_last: "channels_last", torch.contiguous_format: "contiguous NCHW"}
variants = {f"as train.py and sample.py run it here ({layouts[TRAIN_LAYOUT]}, oneDNN convolutions, fused SDPA "
            "attention, small heads padded)": variant(),
            ("contiguous NCHW" if TRAIN_LAYOUT == torch.channels_last else "channels_last"):
                variant(torch.contiguous_format if TRAIN_LAYOUT == torch.channels_last else torch.channels_last),
            "the 16x16 layer's heads of 4 channels not padded to 16": variant(context=unpadded),
            "convolutions without oneDNN": variant(context=lambda: torch.backends.mkldnn.flags(enabled=False)),
            "attention by SDPA's math backend (256x256 scores kept)": variant(context=lambda: sdpa_kernel(
                SDPBackend.MATH))}
if sys.argv[1] == "1":
    variants["torch.compile"] = variant(compile=True)
times = {name: ([], []) for name in variants}
for _ in range(10):  # interleaved, so that a busy moment hits every variant alike
    for name, (step, sample, _) in variants.items():
        for fn, record in zip((step, sample), times[name]):
            if fn is not None:
                t0 = time.process_time(); fn(); record.append(time.process_time() - t0)
for name, (_, _, first) in variants.items():
    train, sample = (f"{1000 * sorted(r)[5]:.0f} ms" if r else "-" for r in times[name])
    print(f"| {name} | {train} | {sample} | {first:.1f} s |", flush=True)
"""
BATCHES = """
import sys, time, torch
from bench import train_py_step
torch.set_num_threads(int(sys.argv[1]))
for batch in (1, 8, 16, 32, 64):  # train.py's step on the default conditional run, on fixed images
    step, _ = train_py_step(dict(channels=1, base_width=16, image_size=16, batch=batch), False, torch.device("cpu"))
    times = []
    for _ in range(25):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(batch, sorted(times[5:])[10], flush=True)  # the median after 5 warm-up steps
"""
DEFAULT = ["16", "1", "16", "64", "0"]  # size, channels, width, batch, bf16
ORIGINAL = ["64", "3", "64", "12"]


HERE = os.path.dirname(os.path.abspath(__file__))


def ms_per_step(env, jobs, steps, config=DEFAULT):
    """The mean step time of `jobs` identical processes started together."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
           **{k: v for k, v in env.items() if v}}
    procs = [subprocess.Popen([sys.executable, "-c", STEP, str(steps), *config], env=env, stdout=subprocess.PIPE,
                              text=True, cwd=HERE) for _ in range(jobs)]
    return 1000 * sum(float(p.communicate()[0]) for p in procs) / jobs


def openmp(a):
    print("| OpenMP setting | idle machine | two such jobs at once |\n|---|---|---|")
    for name, env in SETTINGS:
        print(f"| {name} | {ms_per_step(env, 1, 30):.0f} ms | {ms_per_step(env, 2, 15):.0f} ms |", flush=True)


def bf16_steps(a):
    if a.native is None:
        print("\nno native bf16 on this CPU: bf16 training steps skipped (emulated; see --only kernels)")
        return
    print(f"\n| training step (bf16 on this CPU: {a.native}) | fp32 | bf16 autocast |\n|---|---|---|")
    for name, config, steps in (("default: 16x16x1, width 16, batch 64", DEFAULT[:-1], 30),
                                ("original: 64x64x3, width 64, batch 12", ORIGINAL, 3)):
        fp32, bf16 = (ms_per_step({}, 1, steps, config + [b]) for b in ("0", "1"))
        print(f"| {name} | {fp32:.0f} ms | {bf16:.0f} ms ({fp32 / bf16:.2f}x) |", flush=True)


def attention(a):
    print("\n| attention of the 64x64 layer, batch 12 (4 heads of 16, 4,096 tokens) | forward | backward |\n"
          "|---|---|---|", flush=True)
    subprocess.run([sys.executable, "-c", ATTENTION], check=True, cwd=HERE)
    print("\nheads of 4 or 8 channels, fp32, one thread: as they are, and zero-padded to 16 channels "
          "(modules.padded_head_attention)\n| tokens | head channels | pass | as they are | padded |\n"
          "|---|---|---|---|---|", flush=True)
    subprocess.run([sys.executable, "-c", SMALL_HEADS], check=True, cwd=HERE)


def loading(a):
    print("\n| loading the bundled digits (one epoch) | first epoch | later epochs |\n|---|---|---|")
    for name, how in (("read from the files every epoch", "files"), ("kept in memory (the default)", "kept")):
        first, later, steps = (float(v) for v in subprocess.run(
            [sys.executable, "-c", LOADING, how], check=True, capture_output=True, text=True, cwd=HERE).stdout.split())
        print(f"| {name} | {first:.2f} s | {later:.2f} s |", flush=True)
    step = ms_per_step({}, 1, 30, DEFAULT[:3] + ["32", str(int(a.native is not None))])  # as train.py runs it
    print(f"| (the training steps of that epoch: {steps:.0f} x {step:.0f} ms) | {steps * step / 1000:.1f} s | |")


def profile(a):
    print("\nthe default run's training step (train.py's train_step, the bundled digits, batch 32), by operator:")
    for conditional in ("1", "0"):
        subprocess.run([sys.executable, "-c", PROFILE, conditional, "50"], check=True, cwd=HERE)


def variants(a):
    print("\nthe default network (conditional), one thread, CPU time: a training step at batch 32 (fused AdamW), and "
          "a sampling evaluation of a CFG'd grid of 64 (batch 128)\n"
          "| variant (the same math) | training step | sampling evaluation | first step (compiling) |\n"
          "|---|---|---|---|", flush=True)
    subprocess.run([sys.executable, "-c", VARIANTS, str(int(a.compile))], check=True, cwd=HERE)


def batches(a):
    import torch  # main has loaded it by now; kept out of module scope for the OpenMP table's processes
    threads = torch.get_num_threads()
    print("\ntrain.py's training step of the default conditional run at other batch sizes: the one-image step is "
          f"the fixed cost every step pays\n| batch | 1 thread: ms a step | img/s | {threads} threads: ms a step | "
          "img/s |\n|---|---|---|---|---|", flush=True)
    runs = [subprocess.run([sys.executable, "-c", BATCHES, str(n)], check=True, capture_output=True, text=True,
                           cwd=HERE).stdout.split("\n") for n in (1, threads)]
    for one, many in zip(*(r[:-1] for r in runs)):
        (batch, t1), (_, tn) = one.split(), many.split()
        print(f"| {batch} | {1000 * float(t1):.1f} | {int(batch) / float(t1):.0f} | {1000 * float(tn):.1f} "
              f"| {int(batch) / float(tn):.0f} |")


def kernels(a):
    print(f"\n| one thread (bf16 on this CPU: {a.native or 'emulated'}) | fp32 | bf16 autocast |\n|---|---|---|",
          flush=True)
    subprocess.run([sys.executable, "-c", KERNELS], check=True, cwd=HERE)


if __name__ == "__main__":
    sections = {"openmp": openmp, "bf16": bf16_steps, "attention": attention, "loading": loading, "kernels": kernels,
                "profile": profile, "variants": variants, "batches": batches}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sections, help="print this table alone")
    p.add_argument("--compile", action="store_true", help="variants: also torch.compile (minutes of compiling)")
    a = p.parse_args()
    from hardware import cpu_native_bf16  # (torch loads here; the OpenMP runs start processes of their own)

    a.native = cpu_native_bf16()
    for name, section in sections.items():
        if a.only in (None, name):
            section(a)
