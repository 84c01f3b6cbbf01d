"""What is targeted, and why: the one rule the pass, `convert_to_fp8` and calibration share.

An entry of `FP8Config.targets` / `exclude` is either
- a suffix: whole dotted components at the end of the module path
  (`to_q` matches `attn1.to_q`, never `add_to_q`), or
- a glob pattern (it holds `*`, `?` or `[`): matched, with `fnmatch`, against the whole
  path or any dotted tail of it (`attn?.to_out.0` matches `blocks.3.attn1.to_out.0`;
  `*` also crosses dots).
`exclude` wins over `targets`.

Under regional compilation one graph serves every block, and its paths start at the
block (`attn1.to_q`, not `blocks.0.attn1.to_q`): an entry naming a path above the
graph's root cannot apply there, and `entries_above_root` finds it so the backend can
say so instead of ignoring it.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable, List, Optional

import torch

from . import presets
from .config import FP8Config, WAN_I2V_IMAGE_KV_TARGETS, WAN_TARGETS

GLOB_CHARS = "*?["
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The presets list the names of three codebases at once: most never match one model, so
# their entries are not reported one by one (a graph where no target matched still is).
PRESET_ENTRIES = frozenset(WAN_TARGETS + WAN_I2V_IMAGE_KV_TARGETS)
# Every preset's full-path entries: copied into targets of your own (to add a layer to a
# preset), one a graph lacks (fused `to_qkv`, a model without `ff_context`) is no typo.
QUIET_ENTRIES = PRESET_ENTRIES | {t for p in presets.PRESETS.values() for t in p.targets}


def is_pattern(entry: str) -> bool:
    return any(c in entry for c in GLOB_CHARS)


def _tails(qualname: str) -> List[str]:
    parts = qualname.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def entry_matches(qualname: str, entry: str) -> bool:
    if is_pattern(entry):
        return any(fnmatch.fnmatchcase(tail, entry) for tail in _tails(qualname))
    return qualname == entry or qualname.endswith("." + entry)


def first_match(qualname: str, entries: Iterable[str]) -> Optional[str]:
    """The first entry that matches `qualname`, else None."""
    return next((e for e in entries if entry_matches(qualname, e)), None)


def why_not_targeted(qualname: Optional[str], config: FP8Config) -> Optional[str]:
    """None when `config` targets the layer at `qualname`, else the reason it does not."""
    if qualname is None:
        return "no module path (F.linear called outside any module)"
    excluded = first_match(qualname, config.exclude)
    if excluded:
        return f"excluded by {excluded!r}"
    if first_match(qualname, config.targets) is None:
        return "not targeted"
    return None


def why_not_fp8_shape(in_features: int, out_features: int) -> Optional[str]:
    """None when an FP8 GEMM takes a (out_features, in_features) weight, else why not."""
    bad = [f"{name}={v}" for name, v in (("in_features", in_features), ("out_features", out_features))
           if v % 16 or v == 0]
    return f"{' and '.join(bad)} not a positive multiple of 16 (FP8 GEMM needs it)" if bad else None


def why_not_fp8_dtype(dtype: torch.dtype) -> Optional[str]:
    if dtype not in FLOAT_DTYPES:
        return f"weight dtype {dtype} is not bf16/fp16/fp32"
    return None


def unmatched_entries(qualnames: Iterable[str], entries: Iterable[str]) -> List[str]:
    """The user's entries (not the presets') that match none of `qualnames` ("" is the
    root module's path: a pattern such as "*" matches it)."""
    names = list(qualnames)
    return [e for e in entries if e not in QUIET_ENTRIES and not any(entry_matches(q, e) for q in names)]


def entries_above_root(qualnames: Iterable[str], entries: Iterable[str]) -> List[str]:
    """Entries that match none of `qualnames` but whose tail names one of them whole:
    they name a path above the graph's root (`blocks.0.ffn.net.2` in a block graph)."""
    names = {q for q in qualnames if q}
    above = []
    for entry in entries:
        if entry in PRESET_ENTRIES or any(entry_matches(q, entry) for q in names):
            continue
        tails = _tails(entry)[1:]
        if any(fnmatch.fnmatchcase(q, tail) if is_pattern(tail) else q == tail
               for tail in tails for q in names):
            above.append(entry)
    return above
