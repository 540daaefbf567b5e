"""The networks: the original's UNet and UNet_conditional, their blocks, and EMA.

State-dict keys and shapes are exactly the original's (see tests/reference/), so its published checkpoints
load with strict=True. What changed is how they compute, never what they compute:
  * any image size whose sides are multiples of 8, square or not (the original hard-coded 64x64 in attention);
  * the device comes from the inputs (the original's device="cuda" default crashed on CPU machines);
  * attention runs through F.scaled_dot_product_attention on nn.MultiheadAttention's own parameters;
  * time and label embeddings broadcast instead of being materialised with .repeat;
  * base_width scales every channel count (64 is the original);
  * a state_dict carries, in its metadata, the constructor call and the diffusion the weights were trained
    with (see CHECKPOINT_INFO); loading records the latter as `model.trained_with`, which Diffusion.sample
    reads, and a checkpoint of another shape fails with the constructor call that fits it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class EMA:
    """Exponential moving average of a model's parameters, as the original: a hard copy for the first
    `step_start_ema` steps, then ema = beta * ema + (1 - beta) * model after each step."""

    def __init__(self, beta, step_start_ema=2000):
        self.beta = beta
        self.step = 0
        self.step_start_ema = step_start_ema

    def update_model_average(self, ma_model, current_model):
        ema_params = [p.detach() for p in ma_model.parameters()]
        params = [p.detach() for p in current_model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.beta)  # one fused kernel, not one per tensor

    def update_average(self, old, new):
        if old is None:
            return new
        return old * self.beta + (1 - self.beta) * new

    def step_ema(self, ema_model, model, step_start_ema=None):
        start = self.step_start_ema if step_start_ema is None else step_start_ema
        if self.step < start:
            self.reset_parameters(ema_model, model)
        else:
            self.update_model_average(ema_model, model)
        self.step += 1

    @torch.no_grad()
    def reset_parameters(self, ema_model, model):
        # what the original's ema_model.load_state_dict(model.state_dict()) does, in one fused copy
        torch._foreach_copy_([*ema_model.parameters(), *ema_model.buffers()], [*model.parameters(), *model.buffers()])

    # The step counter decides when averaging starts, so resuming needs it.
    def state_dict(self):
        return {"beta": self.beta, "step": self.step, "step_start_ema": self.step_start_ema}

    def load_state_dict(self, state):
        self.beta, self.step, self.step_start_ema = state["beta"], state["step"], state["step_start_ema"]


# the private kernels CPUBf16Attention calls (torch 2.14 has them); without them CPU bf16 training uses plain SDPA
HAS_CPU_FLASH_BACKWARD = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


class CPUBf16Attention(torch.autograd.Function):
    """Softmax attention for bf16 training on the CPU: PyTorch's fused flash kernel, forward in bf16 and
    backward in fp32. In torch 2.14 that kernel's bf16 backward runs 1.5-1.8x slower than its fp32 one, while its
    bf16 forward is 1.4x faster (the 64x64 layer at batch 12: python bench_cpu.py); the mix cuts the original's
    64x64 training step by ~6% against fp32 attention throughout. Gradients as fp32 SDPA's to
    bf16 rounding (tests/test_speed_paths.py)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, logsumexp = ctx.saved_tensors
        fp32 = [z.to(torch.float32, memory_format=torch.contiguous_format) for z in (grad_out, q, k, v, out)]
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*fp32, logsumexp, 0.0, False)
        return tuple(g.to(torch.bfloat16) for g in grads)


# Training heads of 4 or 8 channels (widths below 64) over 256 pixels or more: PyTorch's fused CPU kernel runs
# their fp32 forward and backward 1.25-1.6x faster with each head zero-padded to 16 channels, which takes the
# default run's step down by a tenth (python bench_cpu.py --only attention). Over fewer pixels, and when
# sampling, it gains nothing reliable.
PADDED_HEAD = 16


def padded_head_attention(q, k, v):
    """F.scaled_dot_product_attention with the heads zero-padded to PADDED_HEAD channels: the same numbers
    (the zeros add nothing to q.k and the padded output channels are dropped), at the unpadded head's scale."""
    d = q.shape[-1]
    out = F.scaled_dot_product_attention(*(F.pad(z, (0, PADDED_HEAD - d)) for z in (q, k, v)), scale=d ** -0.5)
    return out[..., :d]


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the pixels, then a pre-norm MLP, both residual.

    `size` is kept for the original's signature; the spatial size is read from the input. `original_math`
    switches to the original's call of nn.MultiheadAttention (same parameters, same function, materialises
    the full attention matrix): the faithful path for benchmarks and tests."""

    def __init__(self, channels, size=None, heads=4):
        super().__init__()
        self.channels = channels
        self.size = size
        self.heads = heads
        self.original_math = False
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ln = nn.LayerNorm([channels])
        self.ff_self = nn.Sequential(
            nn.LayerNorm([channels]),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def attention(self, x):
        if self.original_math:
            return self.mha(x, x, x)[0]
        b, n, c = x.shape
        q, k, v = F.linear(x, self.mha.in_proj_weight, self.mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.view(b, n, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad and HAS_CPU_FLASH_BACKWARD:
            out = CPUBf16Attention.apply(q, k, v)
        elif (q.dtype == torch.float32 and q.device.type == "cpu" and q.requires_grad and n >= 256
              and q.shape[-1] < PADDED_HEAD):
            out = padded_head_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.mha.out_proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x):
        b, c, h, w = x.shape
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        # (b, h*w, c) and back: free views when x is channels_last, one copy each way otherwise
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.attention(self.ln(x)) + x
        x = self.ff_self(x) + x
        return x.view(b, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=fmt)


class DoubleConv(nn.Module):
    def __init__(self, in_channels, out_channels, mid_channels=None, residual=False):
        super().__init__()
        self.residual = residual
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, mid_channels),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
        )

    def forward(self, x):
        if self.residual:
            return F.gelu(x + self.double_conv(x))
        return self.double_conv(x)


class Down(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim=256):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, in_channels, residual=True),
            DoubleConv(in_channels, out_channels),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x, t):
        x = self.maxpool_conv(x)
        return x + self.emb_layer(t)[:, :, None, None]


class Up(nn.Module):
    def __init__(self, in_channels, out_channels, emb_dim=256):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_channels, in_channels, residual=True),
            DoubleConv(in_channels, out_channels, in_channels // 2),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x, skip_x, t):
        x = self.up(x)
        x = torch.cat([skip_x, x], dim=1)
        x = self.conv(x)
        return x + self.emb_layer(t)[:, :, None, None]


# ---- what a checkpoint says it is ----------------------------------------------------------------------
# A state_dict's metadata (its `_metadata` attribute, which torch.save and torch.load(weights_only=True) keep
# and load_state_dict passes to each module) holds, under this key at the root, {"network": "UNet", "args":
# the constructor's keyword arguments, "trained_with": the diffusion settings}. The original's code ignores it.
CHECKPOINT_INFO = "ddpm"


def network_of(state_dict):
    """(class name, constructor keyword arguments) that the weights' shapes fit, or None for another network."""
    try:
        width, c_in = state_dict["inc.double_conv.0.weight"].shape[:2]
        args = dict(c_in=int(c_in), c_out=int(state_dict["outc.weight"].shape[0]),
                    time_dim=int(state_dict["down1.emb_layer.1.weight"].shape[1]), base_width=int(width))
    except (KeyError, AttributeError, IndexError, ValueError):
        return None
    if "label_emb.weight" in state_dict:
        return "UNet_conditional", {**args, "num_classes": int(state_dict["label_emb.weight"].shape[0])}
    return "UNet", args


def constructor_call(name, args):
    """UNet(c_in=1, c_out=1, base_width=16): the call, without the arguments left at their defaults."""
    defaults = dict(c_in=3, c_out=3, time_dim=256, base_width=64)
    shown = [f"{k}={v}" for k, v in args.items() if k == "num_classes" or defaults.get(k) != v]
    return f"{name}({', '.join(shown)})"


def _write_info(module, state_dict, prefix, local_metadata):
    local_metadata[CHECKPOINT_INFO] = {"network": type(module).__name__, "args": module.constructor_args(),
                                       "trained_with": dict(module.trained_with)}


def _read_info(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    module.trained_with = dict(local_metadata.get(CHECKPOINT_INFO, {}).get("trained_with", {}))


class UNet(nn.Module):
    """The original's UNet. Input sides must be multiples of 8 (three 2x poolings).

    `trained_with`: the diffusion the weights were trained with ({"prediction": "v", "noise_steps": 1000,
    "beta_start", "beta_end", "image_size"}), saved with the state_dict and set by load_state_dict from it;
    {} for weights that do not say (the original's, which predict the noise)."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, device=None, base_width=64):
        super().__init__()
        del device  # accepted for old scripts; the device now comes from the inputs
        w = base_width
        self.c_in, self.c_out, self.time_dim, self.base_width = c_in, c_out, time_dim, base_width
        self.trained_with = {}
        self.register_state_dict_post_hook(_write_info)
        self.register_load_state_dict_pre_hook(_read_info)
        self.inc = DoubleConv(c_in, w)
        self.down1 = Down(w, 2 * w, time_dim)
        self.sa1 = SelfAttention(2 * w, 32)
        self.down2 = Down(2 * w, 4 * w, time_dim)
        self.sa2 = SelfAttention(4 * w, 16)
        self.down3 = Down(4 * w, 4 * w, time_dim)
        self.sa3 = SelfAttention(4 * w, 8)

        self.bot1 = DoubleConv(4 * w, 8 * w)
        self.bot2 = DoubleConv(8 * w, 8 * w)
        self.bot3 = DoubleConv(8 * w, 4 * w)

        self.up1 = Up(8 * w, 2 * w, time_dim)
        self.sa4 = SelfAttention(2 * w, 16)
        self.up2 = Up(4 * w, w, time_dim)
        self.sa5 = SelfAttention(w, 32)
        self.up3 = Up(2 * w, w, time_dim)
        self.sa6 = SelfAttention(w, 64)
        self.outc = nn.Conv2d(w, c_out, kernel_size=1)

    def constructor_args(self):
        return dict(c_in=self.c_in, c_out=self.c_out, time_dim=self.time_dim, base_width=self.base_width)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """nn.Module's, but weights of another shape fail with one line naming the constructor call they fit."""
        if strict:
            own = {k: tuple(v.shape) for k, v in self.state_dict().items()}
            theirs = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
            fits = network_of(state_dict)
            if own != theirs and fits is not None:
                mine, call = constructor_call(type(self).__name__, self.constructor_args()), constructor_call(*fits)
                raise RuntimeError(f"the weights do not fit {mine}: they were saved from {call}; build that")
        return super().load_state_dict(state_dict, strict, assign)

    def pos_encoding(self, t, channels):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, channels, 2, device=t.device).float() / channels))
        return torch.cat([torch.sin(t * inv_freq), torch.cos(t * inv_freq)], dim=-1)

    def check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.c_in or x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(
                f"{type(self).__name__} expects images (N, {self.c_in}, H, W) with H and W multiples of 8, "
                f"got {tuple(x.shape)}: resize the images or build the network with c_in={x.shape[1]}"
                if x.dim() == 4 else f"{type(self).__name__} expects a 4-D batch (N, C, H, W), got {tuple(x.shape)}")

    def embed_time(self, t):
        return self.pos_encoding(t.unsqueeze(-1).float(), self.time_dim)

    def unet_forward(self, x, t):
        x1 = self.inc(x)
        x2 = self.sa1(self.down1(x1, t))
        x3 = self.sa2(self.down2(x2, t))
        x4 = self.sa3(self.down3(x3, t))

        x4 = self.bot3(self.bot2(self.bot1(x4)))

        x = self.sa4(self.up1(x4, x3, t))
        x = self.sa5(self.up2(x, x2, t))
        x = self.sa6(self.up3(x, x1, t))
        return self.outc(x)

    def forward(self, x, t):
        self.check_input(x)
        return self.unet_forward(x, self.embed_time(t))


class UNet_conditional(UNet):
    """The original's class-conditional UNet: a label embedding added to the time embedding.

    `y` is None (no label for the whole batch, as the original) or a LongTensor in which -1 marks a sample
    without label. Per-sample -1 is what lets classifier-free guidance run the conditional and the
    unconditional prediction in one batched pass, and label dropout act per sample."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, num_classes=None, device=None, base_width=64):
        super().__init__(c_in, c_out, time_dim, device, base_width)
        self.num_classes = num_classes
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_dim)

    def constructor_args(self):
        return {**super().constructor_args(), "num_classes": self.num_classes}

    def forward(self, x, t, y=None):
        self.check_input(x)
        t = self.embed_time(t)
        if y is not None:
            if self.num_classes is None:
                raise ValueError("this UNet_conditional was built with num_classes=None and takes no labels")
            keep = (y >= 0).unsqueeze(-1).to(t.dtype)
            t = t + self.label_emb(y.clamp(min=0)) * keep
        return self.unet_forward(x, t)


class Autoguided(nn.Module):
    """Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the
    model's output extrapolated away from a weaker model's, torch.lerp(guide, model, scale), as classifier-free
    guidance does from the unconditional prediction; it needs no labels, so it also guides unconditional
    models. Both see the same inputs (labels included), so CFG still works on top."""

    def __init__(self, model, guide, scale):
        super().__init__()
        self.model, self.guide, self.scale = model, guide, scale
        self.c_in = model.c_in

    @property
    def trained_with(self):  # Diffusion.sample reads what the model predicts
        return self.model.trained_with

    def forward(self, x, t, *labels):
        return torch.lerp(self.guide(x, t, *labels).float(), self.model(x, t, *labels).float(), self.scale)


def unwrap(model):
    """The plain network behind DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def set_original_attention(model, enabled=True):
    """Switch every SelfAttention of `model` to (or back from) the original's nn.MultiheadAttention call."""
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.original_math = enabled
    return model
