"""Targets and excludes: suffixes and glob patterns, entries that match nothing named,
per-block entries under regional compilation refused clearly; one report record per
linear per graph."""
import warnings

import pytest
import torch
import torch.nn as nn

import fp8_fx
from fp8_fx import DIFFUSERS_WAN_TARGETS, FP8Config, make_fp8_backend
from fp8_fx.targeting import entry_matches, why_not_targeted
from wan_like import WanLikeModel, targeted_qualnames


@pytest.mark.parametrize("qualname, entry, expected", [
    ("blocks.0.attn1.to_q", "to_q", True),
    ("blocks.0.attn1.add_to_q", "to_q", False),          # whole components only
    ("blocks.0.attn1.to_q", "attn1.to_q", True),
    ("blocks.0.attn1.to_out.0", "*.to_out.0", True),      # a glob, not taken literally
    ("blocks.0.attn1.to_out.0", "attn?.to_out.0", True),  # matched on a dotted tail
    ("blocks.0.attn2.to_out.0", "attn[1].to_out.0", False),
    ("blocks.12.ffn.net.2", "blocks.1*.ffn.net.2", True),
    ("blocks.2.ffn.net.2", "blocks.1*.ffn.net.2", False),
])
def test_entry_matching(qualname, entry, expected):
    assert entry_matches(qualname, entry) is expected


def test_exclude_wins_over_targets_for_patterns_too():
    cfg = FP8Config(targets=("attn*.to_*",), exclude=("attn2.*",))
    assert why_not_targeted("blocks.0.attn1.to_k", cfg) is None
    assert why_not_targeted("blocks.0.attn2.to_k", cfg) == "excluded by 'attn2.*'"
    assert why_not_targeted("blocks.0.ffn.net.2", cfg) == "not targeted"


def compile_wan_like(config, scheme="diffusers"):
    torch.manual_seed(0)
    model = WanLikeModel(scheme, layers=2).eval()
    backend = make_fp8_backend(config)
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(torch.randn(1, 8, 16), torch.randn(1, 4, 32))
    return backend


def test_pattern_targets_convert_what_they_match():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every entry matched: no warning
        backend = compile_wan_like(FP8Config(targets=("attn?.to_out.0", "blocks.1.ffn.*"), fallback="emulate"))
    assert [d.qualname for d in backend.report if d.converted] == [
        "blocks.0.attn1.to_out.0", "blocks.0.attn2.to_out.0",
        "blocks.1.attn1.to_out.0", "blocks.1.attn2.to_out.0", "blocks.1.ffn.net.0.proj", "blocks.1.ffn.net.2"]


def test_entries_that_match_nothing_are_named():
    cfg = FP8Config(targets=(*DIFFUSERS_WAN_TARGETS, "ffn.net.2x"), exclude=("attn3.to_q",), fallback="emulate")
    with pytest.warns(UserWarning) as seen:
        backend = compile_wan_like(cfg)
    text = "\n".join(str(w.message) for w in seen)
    assert "['ffn.net.2x']" in text and "['attn3.to_q']" in text
    assert "attn1.to_q" not in text.split("matched no linear")[0]  # preset entries are not listed
    assert sum(d.converted for d in backend.report) == 20


def test_a_config_matching_nothing_warns_once_with_the_targets():
    with pytest.warns(UserWarning, match="none of the 23 linear ops"):
        compile_wan_like(FP8Config(targets=("nothing.here",), fallback="emulate"))


def test_presets_do_not_warn_for_the_other_codebases_names():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_wan_like(FP8Config(fallback="emulate"))  # WAN_TARGETS: three codebases' names


# ---- regional compilation --------------------------------------------------------------

def regional_wan(exclude=()):
    diffusers = pytest.importorskip("diffusers")  # noqa: F841
    from fp8_fx.wan import build_wan
    model = build_wan("tiny", dtype=torch.float32)
    cfg = FP8Config(fallback="emulate", exclude=exclude)
    return model, cfg


def wan_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([500]), torch.randn(1, 16, 64, generator=g))


def test_per_block_exclude_under_regional_compilation_is_refused():
    model, cfg = regional_wan(exclude=("blocks.0.ffn.net.2",))
    model.compile_repeated_blocks(backend=make_fp8_backend(cfg), fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception, match=r"blocks\.0\.ffn\.net\.2.*regional compilation"):
        model(*wan_inputs(), return_dict=False)


def test_per_block_exclude_works_by_converting_first():
    model, cfg = regional_wan(exclude=("blocks.0.ffn.net.2",))
    fp8_fx.convert_to_fp8(model, cfg)
    assert isinstance(model.blocks[0].ffn.net[2], nn.Linear)
    assert isinstance(model.blocks[1].ffn.net[2], fp8_fx.FP8Linear)
    backend = make_fp8_backend(FP8Config(targets=(), fallback="emulate"))  # the converted layers only
    model.compile_repeated_blocks(backend=backend, fullgraph=True)
    with torch.no_grad():
        model(*wan_inputs(), return_dict=False)
    # Two graphs (the blocks differ in one module's class), each with its own records.
    graphs = backend.report.graphs
    assert len(graphs) == 2 and {d.graph.index for d in graphs[1]} == {1}
    ffn_out = [[d for d in g if d.qualname == "ffn.net.2"][0] for g in graphs]
    assert [d.action for d in ffn_out] == ["skipped", "emulate"]  # block 0 stays as it was
    assert ffn_out[1].reason.startswith("FP8 weights at rest")
    assert {d.graph.root for d in backend.report} == {"WanTransformerBlock"}


# ---- one record per linear per graph -----------------------------------------------------

class OtherBlock(nn.Module):
    """Same in-block names as a Wan block, other layers: records must not merge."""

    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(32, 64)
        self.attn1.to_k = nn.Linear(32, 60)  # not a multiple of 16: skipped

    def forward(self, x):
        return self.attn1.to_q(x), self.attn1.to_k(x)


class FirstBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(32, 32)

    def forward(self, x):
        return self.attn1.to_q(x)


def test_two_models_on_one_backend_keep_their_own_records():
    backend = make_fp8_backend(FP8Config(fallback="emulate"), name="experts")
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.compile(FirstBlock().eval(), backend=backend)(x)
        torch.compile(OtherBlock().eval(), backend=backend)(x)
    records = backend.report.records
    assert [(d.graph.index, d.graph.root, d.qualname, d.out_features, d.action) for d in records] == [
        (0, "FirstBlock", "attn1.to_q", 32, "emulate"),
        (1, "OtherBlock", "attn1.to_q", 64, "emulate"),
        (1, "OtherBlock", "attn1.to_k", 60, "skipped"),
    ]
    assert {d.graph.model for d in records} == {"experts"}
    table = str(backend.report)
    assert "graph 0 (experts: FirstBlock" in table and "graph 1 (experts: OtherBlock" in table
    torch._dynamo.reset()  # calls reset() on cached backends: the report must survive it
    assert len(backend.report.records) == 3 and len(backend.graphs) == 2
    backend.clear()
    assert len(backend.report) == 0 and not backend.graphs


def test_two_experts_of_one_class_with_named_backends_have_their_own_reports():
    """Wan 2.2's two experts share a class: on one backend Dynamo serves both from one
    graph; named backends of their own give each its graph and report."""
    torch.manual_seed(0)
    experts = [FirstBlock().eval(), FirstBlock().eval()]
    backends = [make_fp8_backend(FP8Config(fallback="emulate"), name=n) for n in ("transformer", "transformer_2")]
    x = torch.randn(3, 32)
    with torch.no_grad():
        outs = [torch.compile(m, backend=b)(x) for m, b in zip(experts, backends)]
    for b, name in zip(backends, ("transformer", "transformer_2")):
        assert [(d.graph.model, d.qualname) for d in b.report] == [(name, "attn1.to_q")]
    assert not torch.equal(outs[0], outs[1])  # each expert ran its own weights


def test_a_pattern_that_converts_a_root_level_linear_is_not_called_unmatched():
    """Compiling an nn.Linear itself: its path is "" and "*" converts it, so no warning."""
    backend = make_fp8_backend(FP8Config(targets=("*",), fallback="emulate"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            torch.compile(nn.Linear(32, 16).eval(), backend=backend)(torch.randn(4, 32))
    assert [(d.qualname, d.action) for d in backend.report] == [("", "emulate")]


class NamedOddly(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = nn.Module()
        self.attn1.to_q = nn.Linear(32, 16)

    def forward(this, x):  # noqa: N805 - the module's first argument need not be "self"
        return this.attn1.to_q(x)


def test_the_report_names_the_traced_module_whatever_forward_calls_it():
    backend = make_fp8_backend(FP8Config(targets=("attn1.to_q",), fallback="emulate"))
    with torch.no_grad():
        torch.compile(NamedOddly().eval(), backend=backend)(torch.randn(4, 32))
    assert [d.graph.root for d in backend.report] == ["NamedOddly"]
