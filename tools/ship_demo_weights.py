"""Write the demo weights that ship in the package (tokenopt/demo_weights/) from the demo cache.

    tokenopt demo --retrain --cache-dir /tmp/demo-cache        # train every demo model and method (minutes)
    python tools/ship_demo_weights.py --cache-dir /tmp/demo-cache

Writes each demo ViT and each method's learned parts (with the recipe they were trained with) in
float16, and manifest.json with every file's sha256; then reads them back the way `tokenopt demo`
does and refuses (exit 2, nothing written) if the test top-1 of any differs from the cached one.
Run it from the checkout (PYTHONPATH=. when another tokenopt is installed) and commit the folder.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from tokenopt.demo_package import ship_demo_weights
    from tokenopt.demo_shipped import SHIPPED_DIR
    from tokenopt.errors import TokenoptError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="the cache `tokenopt demo --retrain` wrote (default: $TOKENOPT_CACHE)")
    parser.add_argument("--out", default=str(SHIPPED_DIR), help="the package data folder (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="largest change of test top-1 that float16 storage may cause (default: 0)")
    args = parser.parse_args(argv)
    try:
        rows = ship_demo_weights(args.cache_dir, args.out, tolerance=args.tolerance)
    except TokenoptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    print(f"{'model':<16} {'method':<24} {'top-1 float32':>14} {'top-1 float16':>14}")
    for r in rows:
        print(f"{r['name']:<16} {r['method'] or '(the model)':<24} {100 * r['cached']:>13.2f}% {100 * r['shipped']:>13.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
