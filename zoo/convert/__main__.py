"""python -m zoo.convert hf-to-zoo SRC DST | zoo-to-hf SRC DST   [--mesh=fsdp=2,tensor=4] [--distributed]"""
from __future__ import annotations

import argparse
import sys

from zoo import distributed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.convert", description=__doc__)
    parser.add_argument("direction", choices=["hf-to-zoo", "zoo-to-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default=None, help="parameter dtype of the output (default: keep)")
    parser.add_argument("--max_shard_gb", type=float, default=2.0, help="zoo-to-hf: safetensors shard size")
    parser.add_argument("--mesh", default="", help="device mesh axis sizes, e.g. fsdp=2,tensor=4 (one may be "
                        "-1; axes not named: 1): parameters are loaded straight into their shardings and never "
                        "gathered whole; hf-to-zoo writes each device's shards and records the mesh as "
                        "config.mesh (default: one device; in a multi-process run data=-1, every process's "
                        "devices holding the whole model)")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        distributed.maybe_initialize_distributed(**distributed.arguments(args))
    except distributed.InitializationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import jax

    from zoo import checkpoints, convert, sharding
    try:
        sizes = sharding.parse_mesh(args.mesh)
        if not sizes and jax.process_count() > 1:   # a mesh over every process's devices
            sizes = {"data": -1}
        mesh = sharding.make_mesh(sizes) if sizes else None
        if args.direction == "hf-to-zoo":   # every process saves its devices' shards; process 0 config.json
            model = convert.from_hf(args.src, dtype=args.dtype or "float32", mesh=mesh)
            checkpoints.save_model(model, args.dst, config=_config_with_mesh(sizes) if sizes else None)
        else:                               # every process gathers each tensor; process 0 writes the files
            model = checkpoints.load(args.src, dtype=args.dtype or "float32", mesh=mesh)
            convert.to_hf(model, args.dst, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if distributed.is_primary():
        print(f"wrote {args.dst}")
    return 0


def _config_with_mesh(sizes: dict):
    """The shared training defaults (save_model adds the model) with `config.mesh` the converting mesh
    (axes not named: 1), so eval.py and train.py use that layout by default."""
    import ml_collections

    from configs.common import base_config
    from zoo.sharding import MESH_AXES

    config = base_config(ml_collections.ConfigDict())
    config.mesh = ml_collections.ConfigDict({a: int(sizes.get(a, 1)) for a in MESH_AXES})
    return config


if __name__ == "__main__":
    sys.exit(main())
