"""Image generation demo: tiny class-conditional diffusers denoisers trained on the bundled digits.

    (what each demo generator is and how it is built are model sources: tokenopt/sources/generator_specs.py and
    tokenopt/sources/generator_models.py: the demo: source loads them without this package's training and measuring)
    schedule.py   the DDPM noise schedule it is trained with and the deterministic DDIM sampler
    train.py      trains a demo generator once and caches it (``python -m tokenopt.generation.train NAME``)
    fid.py        digits-FID: the Fréchet distance on the demo digits classifier's features
    quality.py    per setting (original, each recipe): GFLOPs per denoising call, digits-FID, class
                  accuracy, seconds per image, and a sample grid

The generators are ordinary diffusers models (``DiTTransformer2DModel``, ``UNet2DConditionModel``),
so ``demo:digits-dit`` and ``demo:digits-unet`` go through the same analysis and recipes as any
``diffusers:DIR`` denoiser.
"""
