"""python -m zoo.convert hf-to-zoo SRC DST | zoo-to-hf SRC DST   [--overwrite] [--mesh=fsdp=2,tensor=4]
[--distributed]

An existing DST is refused unless --overwrite; the output is written beside DST and renamed into place
when complete, so an interrupted conversion never leaves a destination that looks finished. Errors end
with one line on stderr naming the file or flag at fault.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections

from zoo import checkpoints, convert, distributed, dtypes, sharding
from zoo.defaults import default_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.convert", description=__doc__)
    parser.add_argument("direction", choices=["hf-to-zoo", "zoo-to-hf"])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--dtype", default=None, help="parameter dtype of the output: float32, bfloat16 or "
                        "float16 (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    parser.add_argument("--max_shard_gb", type=float, default=2.0, help="zoo-to-hf: safetensors shard size")
    parser.add_argument("--mesh", default="", help="device mesh axis sizes, e.g. fsdp=2,tensor=4 (one may be "
                        "-1; axes not named: 1): parameters are loaded straight into their shardings and never "
                        "gathered whole; hf-to-zoo writes each device's shards and records the mesh as "
                        "config.mesh (default: one device; in a multi-process run data=-1, every process's "
                        "devices holding the whole model)")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return convert_command(args)
    except KeyboardInterrupt:
        print(f"error: interrupted; {args.dst} was not written", file=sys.stderr)
        return 130


def convert_command(args) -> int:
    try:
        distributed.maybe_initialize_distributed(**distributed.arguments(args))
    except distributed.InitializationError as e:
        return _fail(e)
    progress = sys.stderr.isatty() and distributed.is_primary()
    try:
        dtype = dtypes.resolve(args.dtype or "float32", "--dtype")
        checkpoints.check_destination(args.dst, args.overwrite)   # before the (slow) load
        sizes = sharding.parse_mesh(args.mesh)
        if not sizes and jax.process_count() > 1:   # a mesh over every process's devices
            sizes = {"data": -1}
        mesh = sharding.make_mesh(sizes) if sizes else None
        if args.direction == "hf-to-zoo":   # every process saves its devices' shards; process 0 config.json
            model = convert.from_hf(args.src, dtype=dtype, mesh=mesh, progress=progress)
            checkpoints.save_model(model, args.dst, config=_config_with_mesh(sizes) if sizes else None,
                                   overwrite=args.overwrite)
        else:                               # every process gathers each tensor; process 0 writes the files
            model = checkpoints.load(args.src, dtype=dtype, mesh=mesh)
            tokenizer = _tokenizer_of(checkpoints.read_config(args.src), model.config.vocab_size)
            convert.to_hf(model, args.dst, max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
                          overwrite=args.overwrite, tokenizer=tokenizer, progress=progress)
    except (ValueError, OSError, KeyError, ImportError) as e:
        return _fail(e)
    if distributed.is_primary():
        print(f"wrote {args.dst}")
    return 0


def _tokenizer_of(config, vocab_size: int) -> str | None:
    """What zoo-to-hf writes as the tokenizer: "bytes" for a byte-level model (data.tokenizer "bytes" and
    256-512 ids: the bytes and a few specials; a converted checkpoint keeps the default "bytes" whatever
    its vocabulary), the run's tokenizer.json if it still exists, else none."""
    name = config.get("data", {}).get("tokenizer")
    if name == "bytes":
        return "bytes" if 256 <= vocab_size <= 512 else None
    return name if name and os.path.isfile(name) else None


def _fail(error) -> int:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    print(f"error: {' '.join(str(text).split())}", file=sys.stderr)
    return 1


def _config_with_mesh(sizes: dict):
    """The shared training defaults (save_model adds the model) with `config.mesh` the converting mesh
    (axes not named: 1), so eval.py and train.py use that layout by default."""
    config = default_config()
    config.mesh = ml_collections.ConfigDict({a: int(sizes.get(a, 1)) for a in sharding.MESH_AXES})
    return config


if __name__ == "__main__":
    sys.exit(main())
