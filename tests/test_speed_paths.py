"""The fast paths compute what the faithful path computes (fp32 on the CPU, tiny sizes so this runs in seconds)."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import deterministic_weights, fake_cpu_bf16
from ddpm import Diffusion
from modules import UNet, UNet_conditional, set_original_attention

REFERENCE = Path(__file__).parent / "reference" / "forward_64.pt"


def tiny(conditional=True, seed=0):
    torch.manual_seed(seed)
    if conditional:
        return UNet_conditional(c_in=1, c_out=1, time_dim=32, num_classes=10, base_width=8)
    return UNet(c_in=1, c_out=1, time_dim=32, base_width=8)


def inputs(n=3, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, size, size, generator=g), torch.randint(1, 1000, (n,), generator=g),
            torch.tensor([0, 6, -1, 9][:n]))


def test_reference_forward_64_channels_last():  # contiguous: tests/test_core.py
    memory_format = torch.channels_last
    ref = torch.load(REFERENCE, weights_only=True)
    x = ref["x"].contiguous(memory_format=memory_format)
    with torch.no_grad():
        unet = deterministic_weights(UNet()).eval().to(memory_format=memory_format)
        assert (unet(x, ref["t"]) - ref["unet"]).abs().max() <= 1e-4
        cond = deterministic_weights(UNet_conditional(num_classes=10)).eval().to(memory_format=memory_format)
        assert (cond(x, ref["t"], ref["y"]) - ref["unet_conditional_labels"]).abs().max() <= 1e-4
        assert (cond(x, ref["t"], None) - ref["unet_conditional_none"]).abs().max() <= 1e-4


def grads(model, x, t, y):
    model.zero_grad(set_to_none=True)
    out = model(x, t, y)
    F.mse_loss(out, torch.zeros_like(out)).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def assert_close_grads(ga, gb):
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sdpa_matches_original_attention():
    model = tiny()
    x, t, y = inputs()
    out_fast, g_fast = grads(model, x, t, y)
    out_orig, g_orig = grads(set_original_attention(model), x, t, y)
    torch.testing.assert_close(out_fast, out_orig, rtol=1e-4, atol=1e-5)
    assert_close_grads(g_fast, g_orig)


def test_channels_last_matches_contiguous():
    model = tiny()
    x, t, y = inputs()
    out_a, g_a = grads(model, x, t, y)
    model = model.to(memory_format=torch.channels_last)
    out_b, g_b = grads(model, x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    assert_close_grads(g_a, g_b)


def test_batched_cfg_matches_two_passes():
    model = tiny().eval()
    x, t, _ = inputs()
    labels = torch.tensor([2, 5, 7])
    d = Diffusion(1000, img_size=16, device="cpu")
    with torch.inference_mode():
        batched = d.predict_noise(model, x, t, labels, cfg_scale=3, batched_cfg=True)
        faithful = d.predict_noise(set_original_attention(model), x, t, labels, cfg_scale=3, batched_cfg=False)
    torch.testing.assert_close(batched, faithful, rtol=1e-4, atol=1e-4)


def test_fused_adamw_matches_plain():
    models = [tiny(), tiny()]
    x, t, y = inputs()
    opts = [torch.optim.AdamW(models[0].parameters(), lr=1e-3),
            torch.optim.AdamW(models[1].parameters(), lr=1e-3, fused=True)]
    for _ in range(3):
        for m, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            F.mse_loss(m(x, t, y), x).backward()
            opt.step()
    # Adam turns rounding differences in tiny gradients into steps of up to lr: allow 2% of the 3 steps' lr.
    # The attention key biases cannot change softmax(QK^T): their gradient is pure rounding noise, which Adam
    # scales up to lr-sized steps, so only the query and value thirds are compared.
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        if name.endswith("in_proj_bias"):
            c = len(a) // 3
            a, b = torch.cat([a[:c], a[2 * c:]]), torch.cat([b[:c], b[2 * c:]])
        torch.testing.assert_close(a, b, rtol=1e-4, atol=6e-5)


@pytest.mark.skipif(os.environ.get("DDPM_TEST_COMPILE") != "1",
                    reason="set DDPM_TEST_COMPILE=1: a cold inductor build takes ~100 s on a 2-core CPU")
def test_compile_matches_eager():
    model = tiny().eval()
    x, t, y = inputs()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            out = compiled(x, t, y)
    except Exception as e:  # no C++ compiler, unsupported platform...: nothing to check here
        pytest.skip(f"torch.compile cannot build here: {type(e).__name__}: {str(e)[:200]}")
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, t, y), rtol=1e-4, atol=1e-5)


def rel_err(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def test_cpu_bf16_attention_gradients_match_fp32():
    # bf16 forward kernel, fp32 backward kernel: fp32 SDPA's outputs and gradients to bf16 rounding
    from modules import CPUBf16Attention

    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, 64, 16, generator=g) for _ in range(4))
    q32, k32, v32 = (z.clone().requires_grad_() for z in (q, k, v))
    F.scaled_dot_product_attention(q32, k32, v32).backward(grad)
    q16, k16, v16 = (z.bfloat16().requires_grad_() for z in (q, k, v))
    out = CPUBf16Attention.apply(q16, k16, v16)
    out.backward(grad.bfloat16())
    assert out.dtype == q16.grad.dtype == torch.bfloat16
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v)) < 1e-2
    for a, b in ((q16, q32), (k16, k32), (v16, v32)):
        assert rel_err(a.grad, b.grad) < 2e-2


def test_small_heads_train_padded_with_the_same_numbers(monkeypatch):
    # width 8 at 16x16: the last attention layer has 4 heads of 2 channels over 256 pixels, a padded case
    import modules

    calls, padded = [], modules.padded_head_attention
    monkeypatch.setattr(modules, "padded_head_attention", lambda *qkv: calls.append(qkv[0].shape) or padded(*qkv))
    model = tiny()
    x, t, y = inputs(n=2)
    out_padded, g_padded = grads(model, x, t, y)
    assert calls == [(2, 4, 256, 2)]  # only where it pays: training, 256 pixels, heads under 16 channels
    monkeypatch.setattr(modules, "PADDED_HEAD", 0)  # every layer through F.scaled_dot_product_attention as is
    out_plain, g_plain = grads(model, x, t, y)
    assert len(calls) == 1
    torch.testing.assert_close(out_padded, out_plain, rtol=1e-5, atol=1e-6)
    assert_close_grads(g_padded, g_plain)
    monkeypatch.setattr(modules, "PADDED_HEAD", 16)
    with torch.no_grad():  # sampling: not padded (no gain measured)
        model(x, t, y)
    assert len(calls) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here"))])
def test_bf16_autocast_close_to_faithful(device):
    # the fast path under bf16 autocast (CUDA, CPUs with native bf16) against the faithful fp32 path on the CPU:
    # close, not equal. bf16's 8-bit mantissa alone moves this tiny net's deepest gradients by ~25% (the faithful
    # path under autocast does the same), so the bar is: near fp32 overall, and no more error than bf16 puts on
    # the faithful path.
    model = tiny()
    x, t, y = inputs()
    out_orig, g_orig = grads(set_original_attention(model), x, t, y)
    model, x, t, y = model.to(device), x.to(device), t.to(device), y.to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        _, g_orig_bf16 = grads(model, x, t, y)
    model = set_original_attention(model, False).to(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=torch.bfloat16):
        out_fast, g_fast = grads(model, x.contiguous(memory_format=torch.channels_last), t, y)
    assert out_fast.dtype == torch.bfloat16  # autocast really ran
    assert rel_err(out_fast, out_orig) < 3e-2
    assert rel_err(torch.cat([g.flatten() for g in g_fast]), torch.cat([g.flatten() for g in g_orig])) < 0.1
    fast_err = sum(rel_err(a, b) for a, b in zip(g_fast, g_orig)) / len(g_orig)
    bf16_err = sum(rel_err(a, b) for a, b in zip(g_orig_bf16, g_orig)) / len(g_orig)
    assert fast_err < 1.5 * bf16_err + 1e-3, (fast_err, bf16_err)


def test_cuda_graphs_are_on_by_default_and_only_on_cuda():
    import train
    from config import preset_config
    from options import parse_args, resolve_args

    assert resolve_args(parse_args(True, []))[0].cuda_graphs
    assert not resolve_args(parse_args(False, ["--no-cuda-graphs"]))[0].cuda_graphs
    c = preset_config("default", True)
    c.channels, c.num_classes, c.base_width, c.batch_size = 1, 10, 8, 4
    run = train.build_run(c, 0, 1, torch.device("cpu"), steps_per_epoch=2)
    assert run.graphed_batch is None and run.net is run.model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_graph_steps_match_eager_steps(monkeypatch):
    # fp32 without TF32: the replayed graph runs the eager step's kernels, so the weights agree to rounding
    import train
    from config import preset_config

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    runs = []
    for graphs in (False, True):
        c = preset_config("default", True)
        c.channels, c.num_classes, c.base_width, c.batch_size, c.data_seed = 1, 10, 8, 4, 0
        c.cuda_graphs, c.amp = graphs, False
        torch.manual_seed(0)
        runs.append(train.build_run(c, 0, 1, torch.device("cuda"), steps_per_epoch=10))
    assert [r.graphed_batch for r in runs] == [None, 4]
    g = torch.Generator().manual_seed(1)
    for n in (4, 4, 3, 4):  # the graphed run takes the batch of 3 eagerly
        images, labels = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)
        eager_mse, graphed_mse = (train.train_step(r, images, labels) for r in runs)
        torch.testing.assert_close(graphed_mse, eager_mse, rtol=1e-4, atol=1e-6)
    # Adam moves a weight by up to lr a step whatever its gradient's size, so a rounding in a near-zero
    # gradient (cuDNN may pick another algorithm under capture) shows at the scale of lr, not of the gradient:
    # 1e-5 is a thirtieth of the 3e-4 these four warm-up steps can move a weight (seen on an H200: 1.2e-6)
    for a, b in zip(runs[1].model.parameters(), runs[0].model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("avx512_bf16, amx, train, sample", [
    (True, True, torch.bfloat16, torch.bfloat16),  # AMX: bf16 everywhere
    (True, False, torch.bfloat16, None),  # AVX512-BF16 alone: bf16 trains faster, samples the default model slower
    (False, True, None, None),  # AMX tiles without AVX512-BF16: taken as no native bf16
    (False, False, None, None),  # emulated bf16 (AVX2): fp32
])
def test_cpu_precision_follows_the_native_bf16_units(monkeypatch, avx512_bf16, amx, train, sample):
    import hardware

    fake_cpu_bf16(monkeypatch, avx512_bf16, amx)
    cpu = torch.device("cpu")
    assert hardware.autocast_dtype(cpu, purpose="train") == train
    assert hardware.autocast_dtype(cpu, purpose="sample") == sample
    assert hardware.autocast_dtype(cpu, amp=False, purpose="train") is None  # --no-amp: fp32 everywhere
    assert hardware.autocast_dtype(cpu, amp=False, purpose="sample") is None
    assert hardware.describe_precision(cpu, amp=False) == "fp32 (--no-amp)"
    words = hardware.describe_precision(cpu)
    assert words.startswith("bf16 autocast (" if train else "fp32 (") and ("grids fp32" in words) == (train != sample)
    with pytest.raises(ValueError):
        hardware.autocast_dtype(cpu, purpose="eval")


def test_precision_and_layout_are_chosen_per_device(monkeypatch):
    import hardware

    cpu = torch.device("cpu")
    assert hardware.autocast_dtype(torch.device("mps")) is None
    for capability, layout in (("AVX2", torch.channels_last), ("AVX512", torch.channels_last),
                               ("DEFAULT", torch.contiguous_format), ("SVE256", torch.contiguous_format)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert hardware.fast_memory_format(cpu) == layout, capability
    assert hardware.fast_memory_format(torch.device("mps")) == torch.contiguous_format


@pytest.mark.parametrize("saved, resumed", [(torch.channels_last, torch.contiguous_format),
                                            (torch.contiguous_format, torch.channels_last)])
def test_resumed_fused_adamw_state_follows_the_parameter_layout(saved, resumed):
    # optim.pt keeps the saving model's layout; fused AdamW mis-steps when state and parameter strides differ
    from train import match_state_layout

    x = torch.randn(2, 4, 8, 8)

    def model_and_optimizer(fmt):
        torch.manual_seed(0)
        m = torch.nn.Conv2d(4, 8, 3).to(memory_format=fmt)
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True)

    def step(m, opt):
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()

    m, opt = model_and_optimizer(saved)
    step(m, opt)
    reference = copy.deepcopy(m).to(memory_format=resumed)
    reference_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no shared state tensors
    reference_opt.param_groups[0]["fused"] = False  # the per-tensor loop: strides do not matter to it
    step(reference, reference_opt)
    m2, opt2 = model_and_optimizer(resumed)
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    match_state_layout(opt2)
    step(m2, opt2)
    torch.testing.assert_close(m2.weight, reference.weight, rtol=1e-5, atol=1e-6)
