"""Reading engine counters from Prometheus text as llama-server and vLLM export it.

The fixture texts copy the exposition of each server (names, label sets, `_created` samples
and histogram children as those servers emit them); the values are made up.
"""

from __future__ import annotations

import pytest

from wattops.engines.metrics import EngineUsage, parse_usage

LLAMA_SERVER = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 1234
# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens reused from the cache
# TYPE llamacpp:prompt_tokens_cached_total counter
llamacpp:prompt_tokens_cached_total 766
# HELP llamacpp:prompt_seconds_total Prompt process time
# TYPE llamacpp:prompt_seconds_total counter
llamacpp:prompt_seconds_total 2.5
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 567
# HELP llamacpp:tokens_predicted_seconds_total Predict process time
# TYPE llamacpp:tokens_predicted_seconds_total counter
llamacpp:tokens_predicted_seconds_total 10.5
# HELP llamacpp:n_decode_total Total number of llama_decode() calls
# TYPE llamacpp:n_decode_total counter
llamacpp:n_decode_total 600
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# HELP llamacpp:requests_deferred Number of requests deferred.
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
"""

VLLM_V1 = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-2-13b-hf"} 3.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="meta-llama/Llama-2-13b-hf"} 12345.0
# HELP vllm:prompt_tokens_created Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_created gauge
vllm:prompt_tokens_created{engine="0",model_name="meta-llama/Llama-2-13b-hf"} 1.7e+09
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="meta-llama/Llama-2-13b-hf"} 6789.0
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="meta-llama/Llama-2-13b-hf"} 10000.0
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="meta-llama/Llama-2-13b-hf"} 4000.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 90.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 0.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="m"} 100.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="m"} 100.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="m"} 42.0
"""

# vLLM 0.8-0.9 named the prefix-cache counters with a gpu_ prefix (dropped in 0.10).
VLLM_GPU_PREFIX = """\
# TYPE vllm:gpu_prefix_cache_queries_total counter
vllm:gpu_prefix_cache_queries_total{engine="0",model_name="m"} 500.0
# TYPE vllm:gpu_prefix_cache_hits_total counter
vllm:gpu_prefix_cache_hits_total{engine="0",model_name="m"} 125.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 500.0
"""


def test_llama_server_names() -> None:
    usage = parse_usage(LLAMA_SERVER)
    assert usage == EngineUsage(
        # llama-server counts evaluated and reused prompt tokens apart: a prompt is both.
        prompt_tokens=1234 + 766,
        completion_tokens=567,
        cached_prompt_tokens=766,
        requests=None,
        in_flight=2,
        # Its prompt and generation seconds are summed over slots: not wall-clock busy time.
        busy_seconds=None,
        decode_steps=600,
    )


def test_an_older_llama_server_without_the_cached_counter() -> None:
    older = "\n".join(line for line in LLAMA_SERVER.splitlines() if "cached" not in line)
    usage = parse_usage(older + "\n")
    assert usage.prompt_tokens == 1234 and usage.cached_prompt_tokens is None


def test_vllm_v1_names_sum_over_labels() -> None:
    usage = parse_usage(VLLM_V1)
    assert usage.prompt_tokens == 12345
    assert usage.completion_tokens == 6789
    assert usage.cached_prompt_tokens == 4000
    assert usage.requests == 100
    assert usage.in_flight == 3
    assert usage.busy_seconds is None


def test_vllm_renamed_prefix_cache_counters() -> None:
    assert parse_usage(VLLM_GPU_PREFIX).cached_prompt_tokens == 125


def test_garbage_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_usage("this is { not prometheus")
