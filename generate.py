"""Samples text from a training workdir or a zoo checkpoint, streaming it to stdout as it is produced.

    python generate.py                                   # the default training run, runs/default
    python generate.py --workdir=runs/default --prompt="def main(" --max_new_tokens=200
    python generate.py --checkpoint=ckpt/gemma4 --prompt="Hello" --temperature=0.8 --top_p=0.95
    python generate.py --workdir=runs/deepseek --speculative          # greedy, drafted by the MTP modules

Text is encoded with the checkpoint's tokenizer (`data.tokenizer` of its config: bytes, or a Hugging Face
tokenizer.json; a tokenizer.json inside the checkpoint directory wins). The program is compiled first,
then timed: the last line gives prefill and decode tokens/s and the cache's size.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir to sample from (default runs/default)")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "zoo checkpoint directory (e.g. from hf-to-zoo)")
_PROMPT = flags.DEFINE_string("prompt", "def ", "the prompt text")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "tokens to generate")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "nucleus sampling mass, in (0, 1]")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter and cache dtype")
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 256, "prompt tokens per prefill step")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "cache length (default: prompt + max_new_tokens)")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "stop at the model's eos_id")
_SPECULATIVE = flags.DEFINE_bool("speculative", False, "greedy self-speculative decoding with the model's MTP "
                                 "modules (zoo.speculative; DeepSeek-V4); prints the text when done, with the "
                                 "acceptance rate and tokens per main-model call")


def fail(message) -> None:
    """Ends the program with one line on stderr."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(1)


class _Text:
    """Encodes the prompt and turns generated ids into text as they come (bytes: one byte per id; a
    tokenizer.json: the new suffix of the decoded text)."""

    def __init__(self, tokenizer: str):
        self.hf = None
        if tokenizer != "bytes":
            from zoo.data import HFTokenizer
            self.hf = HFTokenizer(tokenizer).tokenizer
        self.ids, self.shown = [], ""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) if self.hf is None else self.hf.encode(text, add_special_tokens=False).ids

    def push(self, token: int) -> None:
        if self.hf is None:
            sys.stdout.buffer.write(bytes([token % 256]))
            sys.stdout.buffer.flush()
            return
        self.ids.append(token)
        text = self.hf.decode(self.ids, skip_special_tokens=False)
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        self.shown = text


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(e)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if _WORKDIR.value and _CHECKPOINT.value:
        fail("give --workdir or --checkpoint, not both")
    path = _CHECKPOINT.value or _WORKDIR.value or "runs/default"
    import jax
    import numpy as np

    import zoo
    from zoo import checkpoints, inference

    try:
        config = checkpoints.read_config(path)
        tokenizer = os.path.join(path, "tokenizer.json")
        text = _Text(tokenizer if os.path.isfile(tokenizer) else config.get("data", {}).get("tokenizer", "bytes"))
        prompt = text.encode(_PROMPT.value)
        model = zoo.load(path, dtype=_DTYPE.value)
        done = {"first": None, "count": 0}

        def on_token(tokens_B):
            if done["first"] is None:
                done["first"] = time.perf_counter()
            done["count"] += 1
            if not done.get("stopped"):
                token = int(np.asarray(tokens_B)[0])
                if token in stops:
                    done["stopped"] = True
                else:
                    text.push(token)

        eos = config.model.get("eos_id", None)
        stops = (eos,) if _STOP_AT_EOS.value and eos is not None else ()
        if _SPECULATIVE.value:
            return _speculative(model, text, prompt, stops)
        args, static = inference.prepare_generate(
            model, np.asarray([prompt]), max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, stop_tokens=stops,
            max_len=_MAX_LEN.value, prefill_chunk=_PREFILL_CHUNK.value, cache_dtype=_DTYPE.value, on_token=on_token)
    except (ValueError, FileNotFoundError, ImportError) as e:
        fail(e)
    compiled = inference.GENERATE.lower(*args, **static).compile()
    cache = jax.eval_shape(lambda: inference.init_cache(model, batch_size=1, max_len=static["max_len"],
                                                        dtype=_DTYPE.value))
    sys.stdout.write(_PROMPT.value)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args[1:]))
    end = time.perf_counter()
    first = done["first"] or end
    decode_rate = (done["count"] - 1) / (end - first) if done["count"] > 1 and end > first else float("nan")
    print(f"\n[prefill {len(prompt) / (first - start):.1f} tokens/s ({len(prompt)} tokens), decode "
          f"{decode_rate:.1f} tokens/s ({done['count']} tokens), cache {inference.cache_bytes(cache) / 2**20:.2f} MiB]")


def _speculative(model, text, prompt, stops) -> None:
    """Greedy MTP speculative decoding (no streaming: the loop runs on device to the end), timed after a
    compiling run."""
    import jax
    import numpy as np

    from zoo import speculative
    run = lambda: speculative.generate_mtp(model, np.asarray([prompt]), max_new_tokens=_MAX_NEW.value,
                                           stop_tokens=stops, max_len=_MAX_LEN.value,
                                           prefill_chunk=_PREFILL_CHUNK.value, cache_dtype=_DTYPE.value,
                                           return_stats=True)
    try:
        jax.block_until_ready(run()[0])
    except ValueError as e:
        fail(e)
    start = time.perf_counter()
    tokens, stats = run()
    tokens = np.asarray(tokens)[0]
    seconds = time.perf_counter() - start
    sys.stdout.write(_PROMPT.value)
    for token in tokens:
        if int(token) in stops:
            break
        text.push(int(token))
    print(f"\n[speculative: {len(tokens) / seconds:.1f} tokens/s with prefill, acceptance "
          f"{stats['acceptance_rate']:.2f}, {stats['tokens_per_main_call']:.2f} tokens per main-model call, "
          f"{stats['tokens_per_step']:.2f} per step]")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
