"""`python ddpm_conditional.py` trains UNet_conditional, with EMA and classifier-free guidance (Ho & Salimans
2022), through train.py (`python ddpm_conditional.py --help` lists the options).

`Diffusion` (diffusion.py) is re-exported here for the original's `from ddpm_conditional import Diffusion`.
"""
import hardware  # noqa: F401  (first: it sets the OpenMP spin before torch loads)
from diffusion import Diffusion  # noqa: F401

if __name__ == "__main__":
    import train

    train.main(conditional=True)
