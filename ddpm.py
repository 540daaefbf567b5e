"""`python ddpm.py` trains the unconditional UNet (train.py; `python ddpm.py --help` lists the options).

The diffusion process lives in diffusion.py; `Diffusion` is re-exported here for the original's
`from ddpm import Diffusion`.
"""
import hardware  # noqa: F401  (first: it sets the OpenMP spin before torch loads)
from diffusion import SAMPLERS, Diffusion, to_uint8  # noqa: F401

if __name__ == "__main__":
    import train

    train.main(conditional=False)
