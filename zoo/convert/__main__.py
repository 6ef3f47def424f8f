"""python -m zoo.convert hf-to-zoo SRC DST | zoo-to-hf SRC DST"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.convert", description=__doc__)
    parser.add_argument("direction", choices=["hf-to-zoo", "zoo-to-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default=None, help="parameter dtype of the output (default: keep)")
    parser.add_argument("--max_shard_gb", type=float, default=2.0, help="zoo-to-hf: safetensors shard size")
    args = parser.parse_args(argv)
    from zoo import checkpoints, convert
    try:
        if args.direction == "hf-to-zoo":
            model = convert.from_hf(args.src, dtype=args.dtype or "float32")
            checkpoints.save_model(model, args.dst)
        else:
            model = checkpoints.load(args.src, dtype=args.dtype or "float32")
            convert.to_hf(model, args.dst, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
