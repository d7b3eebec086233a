"""Write the demo generators' weights that ship in the package (tokenopt/generation/weights/) from the cache.

    TOKENOPT_CACHE=/tmp/gen-cache python -m tokenopt.generation.train --retrain --threads 1   # train (minutes)
    python tools/ship_generator_weights.py --cache-dir /tmp/gen-cache

Stores each cached generator in float16 with manifest.json (sha256 of every file), reads them back the
way demo:NAME does and samples both from the same seeded noise; refuses (exit 2, nothing written) if
demo:digits reads a different class on more of the samples than --tolerance allows.
Run it from the checkout (PYTHONPATH=. when another tokenopt is installed) and commit the folder.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from tokenopt.errors import TokenoptError
    from tokenopt.generation.package import ship_generators
    from tokenopt.sources.generator_specs import GENERATORS, SHIPPED_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", choices=list(GENERATORS), help="default: every demo generator")
    parser.add_argument("--cache-dir", help="the cache the training wrote (default: $TOKENOPT_CACHE)")
    parser.add_argument("--out", default=str(SHIPPED_DIR), help="the package data folder (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=100, help="samples compared per generator (default: 100)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="largest fraction of samples whose class float16 storage may change (default: 0)")
    args = parser.parse_args(argv)
    try:
        rows = ship_generators(args.cache_dir, args.out, args.names, samples=args.samples, tolerance=args.tolerance)
    except TokenoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    print(f"{'generator':<14} {'class acc float32':>18} {'class acc float16':>18} {'class changed':>14} {'max |pixel diff|':>17}")
    for r in rows:
        print(f"{r['name']:<14} {100 * r['cached']:>17.1f}% {100 * r['shipped']:>17.1f}% "
              f"{100 * r['changed']:>13.1f}% {r['max_abs']:>17.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
