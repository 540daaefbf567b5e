"""Sample a trained class-conditional checkpoint with the original's calls: one image per class, guided.

    python examples/sample_conditional.py [models/DDPM_conditional_mnist/ema_ckpt.pt]

The checkpoint says what it is: the UNet_conditional(...) call its weights fit, and what they predict
(Diffusion.sample reads it). 999 DDPM steps, CFG 3, as the original's README; sample.py: as the grids."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from ddpm import Diffusion  # noqa: E402  (first: it sets up threads before torch loads)
import torch  # noqa: E402
from modules import UNet_conditional, network_of  # noqa: E402
from utils import plot_images  # noqa: E402

ckpt = sys.argv[1] if len(sys.argv) > 1 else "models/DDPM_conditional_mnist/ema_ckpt.pt"
if not os.path.isfile(ckpt):
    sys.exit(f"error: {ckpt}: no such file (train one with `python ddpm_conditional.py`)")
weights = torch.load(ckpt, map_location="cpu", weights_only=True)
model = UNet_conditional(**network_of(weights)[1])  # e.g. UNet_conditional(c_in=1, c_out=1, num_classes=10, ...)
model.load_state_dict(weights)
diffusion = Diffusion(img_size=model.trained_with.get("image_size", 64), device="cpu")
labels = torch.arange(model.num_classes)
plot_images(diffusion.sample(model, len(labels), labels, cfg_scale=3), "one per class")
