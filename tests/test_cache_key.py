"""Stale compiled code after an upgrade: Inductor's caches must key on fp8_fx's source.

fp8_fx's ops are CompositeImplicitAutograd, so Inductor's FX graph cache and
AOTAutograd's cache hash the graph *before* the op bodies are inlined (by op name). An
edited op body would then reuse kernels compiled from the old code out of a warm
TORCHINDUCTOR_CACHE_DIR. The backend's `CacheKey` (passes/__init__.py), passed as
Inductor's `post_grad_custom_pre_pass`, hashes every .py file of the package into both
keys. These tests copy the package, compile from the copy in fresh processes sharing
one cache directory, edit the copy's recipe, and check what the next process runs.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fp8_fx

SCRIPT = r'''
import json, sys
from pathlib import Path
root = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(root))
import torch
import torch.nn as nn
import fp8_fx
assert Path(fp8_fx.__file__).resolve().is_relative_to(root), fp8_fx.__file__
from torch._dynamo.utils import counters


class OneLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(64, 48, dtype=torch.float32)

    def forward(self, x):
        return self.attn1.to_q(x)


torch.manual_seed(0)
model = OneLinear().eval()
x = torch.randn(4, 64) * 2
backend = fp8_fx.make_fp8_backend(fp8_fx.FP8Config(targets=("attn1.to_q",), fallback="emulate"))
with torch.no_grad():
    compiled = torch.compile(model, backend=backend, fullgraph=True)(x)
    lin = model.attn1.to_q
    # The same package's recipe, eagerly: what the compiled graph should compute.
    xq, xs = fp8_fx.ops.quantize(x, "tensor")
    wq, ws = fp8_fx.ops.quantize_weight(lin.weight, "tensor")
    eager = torch.ops.fp8_fx.emulated_scaled_mm(xq, xs, wq, ws, lin.bias, torch.float32)
print("RESULT " + json.dumps({
    "actions": [d.action for d in backend.report],
    "fp8_max": fp8_fx.ops.FP8_MAX,
    "compiled": compiled.tolist(),
    "eager": eager.tolist(),
    "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
    "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
    "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
    "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
}))
'''


def _copy_package(tmp_path: Path) -> Path:
    """tmp_path/pkg/fp8_fx: a copy of the package, importable from tmp_path/pkg."""
    root = tmp_path / "pkg"
    shutil.copytree(Path(fp8_fx.__file__).resolve().parent, root / "fp8_fx",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path}"
    path.write_text(text.replace(old, new))


def _run(tmp_path: Path, root: Path) -> dict:
    script = tmp_path / "compile_one.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    for var in ("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE",
                "TORCHINDUCTOR_AUTOGRAD_REMOTE_CACHE"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(root)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    assert out["actions"] == ["emulate"]
    return out


def _counters(r: dict) -> dict:
    return {k: v for k, v in r.items() if k.endswith(("_hit", "_miss"))}


def _hits(r: dict) -> int:
    return r["fxgraph_hit"] + r["aot_hit"]


def _max_abs(a, b) -> float:
    return max(abs(p - q) for ra, rb in zip(a, b) for p, q in zip(ra, rb))


def _close(a, b) -> bool:
    # One graph, compiled vs eager: the same fp32 ops, at most a few ulps apart.
    scale = max(abs(v) for row in b for v in row)
    return _max_abs(a, b) <= 1e-5 * scale


def _cold_warm_edited(tmp_path: Path, root: Path):
    cold = _run(tmp_path, root)
    warm = _run(tmp_path, root)
    ops_py = root / "fp8_fx" / "ops.py"
    _edit(ops_py, "FP8_MAX = 448.0", "FP8_MAX = 240.0")
    edited = _run(tmp_path, root)
    return cold, warm, edited


def test_edited_op_body_is_recompiled_not_served_from_a_warm_cache(tmp_path):
    root = _copy_package(tmp_path)
    cold, warm, edited = _cold_warm_edited(tmp_path, root)

    assert _hits(cold) == 0 and cold["fxgraph_miss"] >= 1, _counters(cold)
    assert _close(cold["compiled"], cold["eager"])
    # Unchanged code, second process: served from the cache (the test can see caching).
    assert _hits(warm) >= 1, _counters(warm)
    assert warm["compiled"] == cold["compiled"]

    # Edited recipe: a new key, so a fresh compile of the new op bodies.
    assert edited["fp8_max"] == 240.0
    assert _hits(edited) == 0, _counters(edited)
    assert _close(edited["compiled"], edited["eager"])
    assert _max_abs(edited["compiled"], cold["compiled"]) > 1e-3  # the edit is visible


def test_without_the_cache_key_an_edited_op_body_reuses_stale_kernels(tmp_path):
    """Documents the hazard the CacheKey guards against: with `cache_key_patch` made a
    no-op in the copied package, the edited recipe's process is served the old kernels."""
    root = _copy_package(tmp_path)
    init = root / "fp8_fx" / "passes" / "__init__.py"
    text = init.read_text()
    new, n = re.subn(r"(def cache_key_patch\(passes: Sequence\[FP8Pass\], patches: dict\) -> dict:\n)",
                     r"\1    return patches\n", text)
    assert n == 1, "cache_key_patch's signature changed: update this test"
    init.write_text(new)

    cold, warm, edited = _cold_warm_edited(tmp_path, root)
    assert _close(cold["compiled"], cold["eager"])
    assert _hits(warm) >= 1
    assert _hits(edited) >= 1  # a hit although the op bodies changed...
    # ...so the graph's activation quantization is the old recipe's (448), while the
    # weights, quantized eagerly by the weight cache, follow the new one (240): a mix
    # matching neither the package's own recipe nor the old output.
    assert not _close(edited["compiled"], edited["eager"])
    assert _max_abs(edited["compiled"], cold["compiled"]) > 1e-3
