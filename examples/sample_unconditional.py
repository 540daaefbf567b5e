"""Sample a trained unconditional checkpoint with the original's calls, and plot the images.

    python examples/sample_unconditional.py [models/DDPM_Unconditional_mnist/ema_ckpt.pt]

The checkpoint says what it is: the UNet(...) call its weights fit, and what they predict (Diffusion.sample
reads it). The network alone, 999 DDPM steps, as the original's README; sample.py samples as the run's grids."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from ddpm import Diffusion  # noqa: E402  (first: it sets up threads before torch loads)
import torch  # noqa: E402
from modules import UNet, network_of  # noqa: E402
from utils import plot_images  # noqa: E402

ckpt = sys.argv[1] if len(sys.argv) > 1 else "models/DDPM_Unconditional_mnist/ema_ckpt.pt"
if not os.path.isfile(ckpt):
    sys.exit(f"error: {ckpt}: no such file (train one with `python ddpm.py`)")
weights = torch.load(ckpt, map_location="cpu", weights_only=True)
model = UNet(**network_of(weights)[1])  # e.g. UNet(c_in=1, c_out=1, base_width=16)
model.load_state_dict(weights)
diffusion = Diffusion(img_size=model.trained_with.get("image_size", 64), device="cpu")
plot_images(diffusion.sample(model, n=16), "unconditional")
