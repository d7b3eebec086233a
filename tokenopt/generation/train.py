"""Train a demo generator once on the bundled digits and cache it (``demo:digits-dit``, ``demo:digits-unet``).

    python -m tokenopt.generation.train digits-dit      # once; later loads read the cache

The data: the 1,437 training scans of the digits split, 1 x 32 x 32 in [-1, 1]
(:mod:`tokenopt.generation.data`). The objective is DDPM's: predict the
noise added at a random step (:mod:`tokenopt.generation.schedule`). The cached weights are an
exponential moving average of the trained ones, which samples better after a short training.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from tokenopt.demo_specs import demo_files, write_cached
from tokenopt.errors import TokenoptError
from tokenopt.generation.data import digits_images
from tokenopt.sources.generator_models import build, call_inputs, example_of, predicted_noise
from tokenopt.generation.schedule import add_noise, alphas_cumprod
from tokenopt.sources.generator_specs import GENERATORS, GeneratorSpec, cached_generator

def generator_model(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False,
                    quiet: bool = False):
    """The trained demo generator ``name`` (eval mode) and its info dict; trains and caches it on first use."""
    if name not in GENERATORS:
        raise TokenoptError(f"unknown demo generator '{name}': choose one of {', '.join(GENERATORS)}")
    if not force:
        found = cached_generator(name, cache_dir)
        if found is not None:
            return found
    spec = GENERATORS[name]
    model, info = train_generator(spec, quiet=quiet)
    info["name"] = name
    weights, meta = demo_files(name, cache_dir)
    _save(model, info, weights, meta)
    info["weights"] = str(weights)
    return model, info


def train_generator(spec: GeneratorSpec, epochs: int | None = None, quiet: bool = True):
    """Train a generator of ``spec`` (``epochs`` overrides the spec's, for tests); (EMA model, info)."""
    torch.manual_seed(spec.seed)
    model = build(spec.class_name, spec.config).train()
    example = example_of(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    images, labels = digits_images("train")
    abar = alphas_cumprod()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    epochs = spec.epochs if epochs is None else epochs
    steps, start, losses = 0, time.perf_counter(), []
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        total, batches = 0.0, 0
        for i in range(0, len(order), spec.batch_size):
            idx = order[i:i + spec.batch_size]
            x0, y = images[idx], labels[idx]
            t = torch.randint(0, len(abar), (len(idx),), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            args, kwargs = call_inputs(example, add_noise(x0, noise, t, abar), t, y)
            loss = F.mse_loss(predicted_noise(model(*args, **kwargs)), noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():   # the EMA starts as the model itself and follows it
                decay = min(spec.ema, (1 + steps) / (10 + steps))
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - decay)
            total, batches, steps = total + loss.item(), batches + 1, steps + 1
        losses.append(total / batches)
        if not quiet:
            print(f"epoch {epoch + 1}/{epochs}  loss {losses[-1]:.4f}  {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)
    info = {"class": spec.class_name, "config": json.loads(json.dumps(spec.config, default=list)),
            "train": {"epochs": epochs, "steps": steps, "seconds": round(time.perf_counter() - start, 1),
                      "final_loss": losses[-1] if losses else None, "threads": torch.get_num_threads()},
            "spec_digest": spec.digest(), "torch": torch.__version__}
    return ema, info


def _save(model, info: dict, weights, meta) -> None:
    write_cached(model.state_dict(), info, weights, meta,
                 metadata={"class": info["class"], "spec_digest": info["spec_digest"]})


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tokenopt.generation.train",
                                     description="Train the demo generators once and cache them.")
    parser.add_argument("names", nargs="*", choices=list(GENERATORS), help="default: every demo generator")
    parser.add_argument("--retrain", action="store_true", help="train again even if the cache is up to date")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a loaded machine 1 is often fastest")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.names or list(GENERATORS):
        _, info = generator_model(name, force=args.retrain, quiet=False)
        print(name, info["train"])


if __name__ == "__main__":
    main()
