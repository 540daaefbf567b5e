"""Device, precision and thread policy, in one place. Entry scripts import this module before torch.

Every choice here was measured (docs/speed.md); `--no-amp` on any command line means fp32 everywhere.
"""
import os

# GNU OpenMP's waiting threads spin for a long while before they sleep: fast on an idle machine, 3.7x slower
# per training step when another process shares the cores (a laptop, a shared node). A short spin keeps
# most of both (default-config step, 2-core Xeon: idle 123 -> 148 ms, shared 1125 -> 340 ms; docs/speed.md). It
# must be set before torch loads OpenMP, and a user's own OpenMP settings win.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from utils import UserError  # noqa: E402


def default_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_device(name):
    """The torch.device a --device option names ("auto": CUDA, then MPS, then CPU), or a UserError."""
    if name in (None, "auto"):
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


def setup_distributed(c):
    """(rank, world size, device). Under torchrun (WORLD_SIZE set): one process per device, NCCL on GPUs and
    gloo on CPUs; c.device names the device type (a RunConfig or any object with .device)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1, pick_device(c.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(c.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, dist.get_world_size(), device


def cpu_native_bf16():
    """The unit that runs bf16 dot products natively on this CPU: "AMX", "AVX512-BF16", or None (bf16 would be
    emulated: a convolution ~100x slower than in fp32 on an AVX2-only EPYC, `python bench_cpu.py --only kernels`)."""
    has_avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    if has_avx512_bf16 and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    return "AVX512-BF16" if has_avx512_bf16 else None


def precision(device, amp=True, purpose="train"):
    """(autocast dtype or None for fp32, the reason in a few words) for `purpose` "train" (the training step) or
    "sample" (sampling), per device, from measurements (docs/speed.md#precision-per-device). CUDA: bf16, or fp16
    (with a GradScaler) where bf16 is missing. CPU: bf16 where its dot products are native; sampling only with
    AMX, since with AVX512-BF16 alone the default 16x16 model samples slower in bf16 than in fp32 (690 vs 760
    guided evaluations/s) while it trains 1.2x faster. MPS: fp32 (never measured). amp=False: fp32."""
    if purpose not in ("train", "sample"):
        raise ValueError(f"purpose {purpose!r}: train or sample")
    if not amp:
        return None, "--no-amp"
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), "CUDA"
    if device.type != "cpu":
        return None, f"not measured on {device.type}"
    native = cpu_native_bf16()
    if native is None:
        return None, "no native bf16 on this CPU"
    if purpose == "sample" and native != "AMX":
        return None, f"{native} without AMX: bf16 sampling measured slower"
    return torch.bfloat16, native


def autocast_dtype(device, amp=True, purpose="train"):
    """The autocast dtype precision() picks, or None for fp32."""
    return precision(device, amp, purpose)[0]


def describe_precision(device, amp=True):
    """The training and sampling precision in a few words, for a run's first line: "bf16 autocast (AMX)",
    "fp32 (--no-amp)", "bf16 autocast (AVX512-BF16), grids fp32 (AVX512-BF16 without AMX: ...)"."""
    (train_dtype, train_why), (sample_dtype, sample_why) = (precision(device, amp, p) for p in ("train", "sample"))
    text = f"{precision_name(train_dtype)} ({train_why})"
    return text if sample_dtype == train_dtype else text + f", grids {precision_name(sample_dtype)} ({sample_why})"


def autocast(device, dtype, cache_enabled=True):
    """torch.autocast for `dtype` from autocast_dtype (None: a no-op context, fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=cache_enabled)


def precision_name(dtype):
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[dtype]


def fast_memory_format(device):
    """channels_last on CUDA and on x86 CPUs, for training and sampling alike (oneDNN skips its layout
    reorders: training 3-10% faster on a 2-core AVX-512 Xeon, bench.py; on a 2-core AVX2 EPYC training 1.06x
    and sampling 1.22x as fast, python bench_cpu.py --only variants); contiguous elsewhere (not measured)."""
    x86 = device.type == "cpu" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return torch.channels_last if device.type == "cuda" or x86 else torch.contiguous_format


class Forward(torch.nn.Module):
    """The model's forward as a module of its own: make_graphed_callables rewrites the forward of what it is
    given, and the model itself must stay eager for the grids, deep copies and other batch sizes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)


def cuda_graphed(model, c, device, amp_dtype, memory_format):
    """The network's forward and backward for batches like config `c`'s, captured once as CUDA graphs and
    replayed every step (train.py, one process on a GPU; docs/speed.md#cuda). The default model is too small
    to keep a GPU busy: eager, a step is spent issuing its ~1,500 operations one by one. The same arithmetic
    on the same parameters; only the launches go."""
    g = torch.Generator(device).manual_seed(0)  # capture inputs that leave the global RNG alone
    n, side = c.batch_size, c.image_size
    x = torch.randn(n, c.channels, side, side, generator=g, device=device).contiguous(memory_format=memory_format)
    args = (x, torch.randint(1, c.noise_steps, (n,), generator=g, device=device))
    if c.takes_labels:
        args += (torch.randint(-1, c.num_classes, (n,), generator=g, device=device),)
    # The parameters' gradient nodes are made on the capture's warm-up stream and kept by its graph; PyTorch
    # (2.10 on, where the switch exists) warns of the event each step's backward then waits on. Measured, kept.
    if hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    with autocast(device, amp_dtype, cache_enabled=False):  # the cache would hold casts the graph cannot see
        return torch.cuda.make_graphed_callables(Forward(model), args, allow_unused_input=True)
