"""Class-conditional DDPM with EMA and classifier-free guidance (Ho & Salimans 2022).

`python ddpm_conditional.py` trains UNet_conditional (see train.py and `python ddpm_conditional.py --help`).
The diffusion process is ddpm.Diffusion, re-exported here for the original's imports.
"""
from ddpm import Diffusion  # noqa: F401  (the original's `from ddpm_conditional import Diffusion`)

if __name__ == "__main__":
    import train

    train.main(conditional=True)
