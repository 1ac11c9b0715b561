"""Engine usage counters read from an engine's Prometheus `/metrics`.

Covers the names llama-server (`llamacpp:*`), vLLM (`vllm:*`, V0 and V1, before and after the
`gpu_` prefix was dropped from the prefix-cache counters), TGI (`tgi_*`) and wattops's own
llama.cpp worker export. For each figure the first name present wins; samples of one name are
summed over their labels (vLLM labels per model and per finish reason).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

#: figure -> metric sample names in order of preference.
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt_tokens": (
        # llama-server counts prompt tokens it evaluated and those reused from a slot's KV
        # apart; wattops's worker counts all of them in llamacpp:prompt_tokens_total.
        "llamacpp:prompt_tokens_total+llamacpp:prompt_tokens_cached_total",
        "llamacpp:prompt_tokens_total",
        "vllm:prompt_tokens_total",
        "tgi_request_input_length_sum",
    ),
    "completion_tokens": (
        "llamacpp:tokens_predicted_total",
        "vllm:generation_tokens_total",
        "tgi_request_generated_tokens_sum",
    ),
    "cached_prompt_tokens": (
        "wattops:prompt_tokens_cached_total",
        "llamacpp:prompt_tokens_cached_total",
        "vllm:prefix_cache_hits_total",
        "vllm:gpu_prefix_cache_hits_total",
    ),
    "requests": (
        "wattops:requests_total",
        "vllm:request_success_total",
        "tgi_request_success_total",
    ),
    "in_flight": (
        "llamacpp:requests_processing",
        "vllm:num_requests_running",
        "tgi_batch_current_size",
    ),
    # llama-server counts tokens when a request finishes; its decode steps move every step,
    # so a long generation shows progress (the agent's hung-replica check) before it ends.
    "decode_steps": ("llamacpp:n_decode_total",),
    # Only wattops's worker reports wall-clock busy time. llama-server's prompt and generation
    # seconds are summed over its slots, so with several slots busy they run faster than the
    # clock: busy time there comes from requests in flight (llamacpp:requests_processing).
    "busy_seconds": ("wattops:busy_seconds_total",),
}


@dataclass(frozen=True)
class EngineUsage:
    """Counters an engine reports about itself. None: the engine does not report it."""

    prompt_tokens: float | None = None
    completion_tokens: float | None = None
    cached_prompt_tokens: float | None = None
    requests: float | None = None
    in_flight: float | None = None
    busy_seconds: float | None = None
    decode_steps: float | None = None


def parse_usage(text: str) -> EngineUsage:
    """Parse Prometheus exposition text; ValueError if it is not valid exposition format."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # vLLM exports histogram/summary children too; only plain counters/gauges matter.
            totals[sample.name] = totals.get(sample.name, 0.0) + float(sample.value)
    figures: dict[str, float | None] = {}
    for figure, names in ALIASES.items():
        value = None
        for name in names:
            parts = name.split("+")
            if all(part in totals for part in parts):
                value = sum(totals[part] for part in parts)
                break
        figures[figure] = value
    return EngineUsage(**figures)
