"""The sampling policy: a persona's preset, a request's wishes, and the configured ceilings."""

from __future__ import annotations

from .config import Limits, PersonaConfig
from .messages import Sampling


def policy(persona: PersonaConfig, limits: Limits, temperature: float | None = None,
           max_tokens: int | None = None) -> tuple[Sampling, tuple[str, ...]]:
    """The sampling for one request, and a note for each value that was clamped.

    The default is the persona's preset (greedy in the shipped personas); a requested temperature is clamped to
    ``limits.temperature_ceiling`` and ``max_tokens`` to ``limits.max_tokens_ceiling``. The seed is always the
    persona's: a request cannot change it, so the same request gives the same bytes.
    """
    preset = persona.sampling
    notes = []
    temp = preset.temperature if temperature is None else max(0.0, temperature)
    if temp > limits.temperature_ceiling:
        notes.append(f"temperature {temp:g} clamped to the ceiling {limits.temperature_ceiling:g}")
        temp = limits.temperature_ceiling
    tokens = preset.max_tokens if max_tokens is None else max_tokens
    if tokens > limits.max_tokens_ceiling:
        notes.append(f"max_tokens {tokens} clamped to the ceiling {limits.max_tokens_ceiling}")
        tokens = limits.max_tokens_ceiling
    if tokens < 1:
        notes.append(f"max_tokens {tokens} raised to 1")
        tokens = 1
    return Sampling(
        temperature=temp,
        top_k=preset.top_k,
        top_p=preset.top_p,
        min_p=preset.min_p,
        repeat_penalty=preset.repeat_penalty,
        max_tokens=tokens,
        seed=persona.seed,
        stop=preset.stop,
    ), tuple(notes)
