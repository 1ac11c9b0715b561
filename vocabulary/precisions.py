"""Precisions by llama.cpp's names: the lower-case model types its tools use."""

from __future__ import annotations

#: llama.cpp model types by the lower-case names its tools use, best quality first.
PRECISIONS: tuple[str, ...] = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_1",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "iq4_nl",
    "iq4_xs",
    "q4_1",
    "q4_0",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)

#: Precisions a base model file may have: the agent quantizes from these.
BASE_PRECISIONS: tuple[str, ...] = ("f32", "f16", "bf16")
