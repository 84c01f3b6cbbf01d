"""Which denoising step runs next, and whether its attention runs in FP8.

FP8 attention is what degrades video first; users keep the first and last steps in bf16
(AttentionConfig.bf16_first_steps / bf16_last_steps). A compiled graph cannot see the
step, so the caller says it: `backend.set_step(step, num_steps)` before a step, or
`callback_on_step_end=backend.step_callback` in a diffusers pipeline (it sets the next
step after each one, and wraps to step 0 after the last, ready for the next video). The
backend compiles each graph twice (FP8 attention, and attention as written), once each,
and picks one per call from here: Python outside the compiled code, so no guard, no
recompile per step.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, Iterable, Optional

from .config import AttentionConfig


class DenoisingSteps:
    """The step the next forward belongs to (0 until told otherwise)."""

    def __init__(self, attention: Optional[AttentionConfig]) -> None:
        self.first = attention.bf16_first_steps if attention is not None else 0
        self.last = attention.bf16_last_steps if attention is not None else 0
        self.step, self.num_steps = 0, None
        self.told = False  # whether the caller ever gave a step
        self.calls = {"fp8": 0, "bf16": 0}  # forwards of converted graphs, by attention precision

    @property
    def active(self) -> bool:
        """Whether any step keeps bf16 attention (else one compiled graph serves all)."""
        return bool(self.first or self.last)

    def set(self, step: int, num_steps: Optional[int] = None) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"set_step: step must be a whole number >= 0, got {step!r}")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                      or num_steps <= step):
            raise ValueError(f"set_step: num_steps must be a whole number > step ({step}), got {num_steps!r}")
        if self.last and num_steps is None:
            raise ValueError("set_step: AttentionConfig.bf16_last_steps needs num_steps (the total) to know "
                             "which steps are the last")
        self.step, self.num_steps, self.told = step, num_steps, True

    def fp8_attention_now(self) -> bool:
        if not self.told:  # every forward would be "step 0": say so once, loudly
            self.told = True
            warnings.warn(
                "fp8_fx: AttentionConfig.bf16_first_steps/bf16_last_steps are set but no denoising step was "
                "given, so every forward counts as step 0 (bf16 attention for bf16_first_steps > 0). Call "
                "backend.set_step(step, num_steps) before each step, or pass "
                "callback_on_step_end=backend.step_callback to the diffusers pipeline.", stacklevel=3)
        if self.step < self.first:
            return False
        return not (self.last and self.num_steps is not None and self.step >= self.num_steps - self.last)

    def count(self, fp8: bool) -> None:
        self.calls["fp8" if fp8 else "bf16"] += 1

    def diffusers_callback(self, pipe: Any, step: int, timestep: Any, callback_kwargs: Dict) -> Dict:
        """diffusers' callback_on_step_end: after step `step`, the next is step + 1 of
        pipe.num_timesteps; after the last, step 0 again."""
        num_steps = getattr(pipe, "num_timesteps", None)
        following = step + 1
        if num_steps is not None and following >= num_steps:
            following = 0
        self.step, self.num_steps, self.told = following, num_steps, True
        return callback_kwargs


def chained_step_callback(backends: Iterable[Any]) -> Callable[[Any, int, Any, Dict], Dict]:
    """One diffusers callback_on_step_end telling every backend the steps. Fetched now, not
    at the first step's end: fetching a backend's step_callback says steps will come, and
    diffusers calls the callback only after each step (else step 0 warns)."""
    callbacks = [b.step_callback for b in backends]

    def tell_each(pipe: Any, step: int, timestep: Any, callback_kwargs: Dict) -> Dict:
        for callback in callbacks:
            callback_kwargs = callback(pipe, step, timestep, callback_kwargs)
        return callback_kwargs
    return tell_each
