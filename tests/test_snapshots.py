"""Snapshots of what the pass emits. A change in decisions or in the rewritten graph shows
up here as a diff to review; accept with EXPECTTEST_ACCEPT=1 after reading it."""
import expecttest
import torch

from fp8_fx import FP8Config, make_fp8_backend
from wan_like import WanLikeBlock, WanLikeModel


def compile_once(model, *inputs, config):
    torch._dynamo.reset()
    torch.manual_seed(0)
    backend = make_fp8_backend(config)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(*inputs)
    return backend


def report_of(scheme):
    torch.manual_seed(0)
    model = WanLikeModel(scheme, layers=1).eval()
    return str(compile_once(model, torch.randn(1, 8, 16), torch.randn(1, 4, 32),
                            config=FP8Config(fallback="emulate")).report)


class TestSnapshots(expecttest.TestCase):
    def test_report_diffusers_names(self):
        self.assertExpectedInline(report_of("diffusers"), """\
qualname                 action   in  out  reason
patch_embedding          skipped  16  32   not targeted
time_projection          skipped  32  32   not targeted
blocks.0.attn1.to_q      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn1.to_k      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn1.to_v      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn1.to_out.0  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_q      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_k      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_v      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_out.0  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.net.0.proj  emulate  32  64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.net.2       emulate  64  32   no FP8 tensor cores on cpu: fallback='emulate'
proj_out                 skipped  32  16   not targeted
(13 linears: 3 skipped, 10 emulate)""")

    def test_report_fastvideo_names(self):
        self.assertExpectedInline(report_of("fastvideo"), """\
qualname               action   in  out  reason
patch_embedding        skipped  16  32   not targeted
time_projection        skipped  32  32   not targeted
blocks.0.to_q          emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.to_k          emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.to_v          emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.to_out        emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_q    emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_k    emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_v    emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_out  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.fc_in     emulate  32  64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.fc_out    emulate  64  32   no FP8 tensor cores on cpu: fallback='emulate'
proj_out               skipped  32  16   not targeted
(13 linears: 3 skipped, 10 emulate)""")

    def test_report_original_wan_names(self):
        self.assertExpectedInline(report_of("wan"), """\
qualname               action   in  out  reason
patch_embedding        skipped  16  32   not targeted
time_projection        skipped  32  32   not targeted
blocks.0.self_attn.q   emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.self_attn.k   emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.self_attn.v   emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.self_attn.o   emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.cross_attn.q  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.cross_attn.k  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.cross_attn.v  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.cross_attn.o  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.0         emulate  32  64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.2         emulate  64  32   no FP8 tensor cores on cpu: fallback='emulate'
proj_out               skipped  32  16   not targeted
(13 linears: 3 skipped, 10 emulate)""")

    def test_rewritten_block_graph(self):
        torch.manual_seed(0)
        block = WanLikeBlock("diffusers", dim=32, ffn_dim=64, heads=2).eval()
        backend = compile_once(block, torch.randn(1, 8, 32), torch.randn(1, 4, 32),
                               config=FP8Config(fallback="emulate"))
        (gm,) = backend.graphs
        code = "\n".join(line.rstrip() for line in gm.code.strip().splitlines())
        self.assertExpectedInline(code, """\
def forward(self, L_x_ : torch.Tensor, L_self_modules_attn1_modules_to_q_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_q_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_k_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_k_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_v_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_v_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_out_modules_0_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn1_modules_to_out_modules_0_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_norm2_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_norm2_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_q_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_q_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_k_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_k_parameters_bias_ : torch.nn.parameter.Parameter, L_context_ : torch.Tensor, L_self_modules_attn2_modules_to_v_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_v_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_out_modules_0_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_attn2_modules_to_out_modules_0_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_bias_ : torch.nn.parameter.Parameter, L_self_modules_ffn_modules_net_modules_2_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_ffn_modules_net_modules_2_parameters_bias_ : torch.nn.parameter.Parameter, attn1_to_q_weight_fp8, attn1_to_q_weight_scale, attn1_to_k_weight_fp8, attn1_to_k_weight_scale, attn1_to_v_weight_fp8, attn1_to_v_weight_scale, attn1_to_out_0_weight_fp8, attn1_to_out_0_weight_scale, attn2_to_q_weight_fp8, attn2_to_q_weight_scale, attn2_to_k_weight_fp8, attn2_to_k_weight_scale, attn2_to_v_weight_fp8, attn2_to_v_weight_scale, attn2_to_out_0_weight_fp8, attn2_to_out_0_weight_scale, ffn_net_0_proj_weight_fp8, ffn_net_0_proj_weight_scale, ffn_net_2_weight_fp8, ffn_net_2_weight_scale):
    l_x_ = L_x_
    l_self_modules_attn1_modules_to_q_parameters_weight_ = L_self_modules_attn1_modules_to_q_parameters_weight_
    l_self_modules_attn1_modules_to_q_parameters_bias_ = L_self_modules_attn1_modules_to_q_parameters_bias_
    l_self_modules_attn1_modules_to_k_parameters_weight_ = L_self_modules_attn1_modules_to_k_parameters_weight_
    l_self_modules_attn1_modules_to_k_parameters_bias_ = L_self_modules_attn1_modules_to_k_parameters_bias_
    l_self_modules_attn1_modules_to_v_parameters_weight_ = L_self_modules_attn1_modules_to_v_parameters_weight_
    l_self_modules_attn1_modules_to_v_parameters_bias_ = L_self_modules_attn1_modules_to_v_parameters_bias_
    l_self_modules_attn1_modules_to_out_modules_0_parameters_weight_ = L_self_modules_attn1_modules_to_out_modules_0_parameters_weight_
    l_self_modules_attn1_modules_to_out_modules_0_parameters_bias_ = L_self_modules_attn1_modules_to_out_modules_0_parameters_bias_
    l_self_modules_norm2_parameters_weight_ = L_self_modules_norm2_parameters_weight_
    l_self_modules_norm2_parameters_bias_ = L_self_modules_norm2_parameters_bias_
    l_self_modules_attn2_modules_to_q_parameters_weight_ = L_self_modules_attn2_modules_to_q_parameters_weight_
    l_self_modules_attn2_modules_to_q_parameters_bias_ = L_self_modules_attn2_modules_to_q_parameters_bias_
    l_self_modules_attn2_modules_to_k_parameters_weight_ = L_self_modules_attn2_modules_to_k_parameters_weight_
    l_self_modules_attn2_modules_to_k_parameters_bias_ = L_self_modules_attn2_modules_to_k_parameters_bias_
    l_context_ = L_context_
    l_self_modules_attn2_modules_to_v_parameters_weight_ = L_self_modules_attn2_modules_to_v_parameters_weight_
    l_self_modules_attn2_modules_to_v_parameters_bias_ = L_self_modules_attn2_modules_to_v_parameters_bias_
    l_self_modules_attn2_modules_to_out_modules_0_parameters_weight_ = L_self_modules_attn2_modules_to_out_modules_0_parameters_weight_
    l_self_modules_attn2_modules_to_out_modules_0_parameters_bias_ = L_self_modules_attn2_modules_to_out_modules_0_parameters_bias_
    l_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_weight_ = L_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_weight_
    l_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_bias_ = L_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_bias_
    l_self_modules_ffn_modules_net_modules_2_parameters_weight_ = L_self_modules_ffn_modules_net_modules_2_parameters_weight_
    l_self_modules_ffn_modules_net_modules_2_parameters_bias_ = L_self_modules_ffn_modules_net_modules_2_parameters_bias_
    h = torch.nn.functional.layer_norm(l_x_, (32,), None, None, 1e-05)
    h_quantized = torch.ops.fp8_fx.quantize.default(h, 'tensor');  h = None
    h_fp8 = h_quantized[0]
    h_scale = h_quantized[1];  h_quantized = None
    attn1_to_q = torch.ops.fp8_fx.emulated_scaled_mm.default(h_fp8, h_scale, attn1_to_q_weight_fp8, attn1_to_q_weight_scale, l_self_modules_attn1_modules_to_q_parameters_bias_, torch.float32);  attn1_to_q_weight_fp8 = attn1_to_q_weight_scale = l_self_modules_attn1_modules_to_q_parameters_bias_ = None
    unflatten = attn1_to_q.unflatten(-1, (2, -1));  attn1_to_q = None
    transpose = unflatten.transpose(1, 2);  unflatten = None
    attn1_to_k = torch.ops.fp8_fx.emulated_scaled_mm.default(h_fp8, h_scale, attn1_to_k_weight_fp8, attn1_to_k_weight_scale, l_self_modules_attn1_modules_to_k_parameters_bias_, torch.float32);  attn1_to_k_weight_fp8 = attn1_to_k_weight_scale = l_self_modules_attn1_modules_to_k_parameters_bias_ = None
    unflatten_1 = attn1_to_k.unflatten(-1, (2, -1));  attn1_to_k = None
    transpose_1 = unflatten_1.transpose(1, 2);  unflatten_1 = None
    attn1_to_v = torch.ops.fp8_fx.emulated_scaled_mm.default(h_fp8, h_scale, attn1_to_v_weight_fp8, attn1_to_v_weight_scale, l_self_modules_attn1_modules_to_v_parameters_bias_, torch.float32);  h_fp8 = h_scale = attn1_to_v_weight_fp8 = attn1_to_v_weight_scale = l_self_modules_attn1_modules_to_v_parameters_bias_ = None
    unflatten_2 = attn1_to_v.unflatten(-1, (2, -1));  attn1_to_v = None
    transpose_2 = unflatten_2.transpose(1, 2);  unflatten_2 = None
    a = torch._C._nn.scaled_dot_product_attention(transpose, transpose_1, transpose_2);  transpose = transpose_1 = transpose_2 = None
    transpose_3 = a.transpose(1, 2);  a = None
    flatten = transpose_3.flatten(2);  transpose_3 = None
    flatten_quantized = torch.ops.fp8_fx.quantize.default(flatten, 'tensor');  flatten = None
    flatten_fp8 = flatten_quantized[0]
    flatten_scale = flatten_quantized[1];  flatten_quantized = None
    attn1_to_out_0 = torch.ops.fp8_fx.emulated_scaled_mm.default(flatten_fp8, flatten_scale, attn1_to_out_0_weight_fp8, attn1_to_out_0_weight_scale, l_self_modules_attn1_modules_to_out_modules_0_parameters_bias_, torch.float32);  flatten_fp8 = flatten_scale = attn1_to_out_0_weight_fp8 = attn1_to_out_0_weight_scale = l_self_modules_attn1_modules_to_out_modules_0_parameters_bias_ = None
    x = l_x_ + attn1_to_out_0;  l_x_ = attn1_to_out_0 = None
    layer_norm_1 = torch.nn.functional.layer_norm(x, (32,), l_self_modules_norm2_parameters_weight_, l_self_modules_norm2_parameters_bias_, 1e-05);  l_self_modules_norm2_parameters_weight_ = l_self_modules_norm2_parameters_bias_ = None
    layer_norm_1_quantized = torch.ops.fp8_fx.quantize.default(layer_norm_1, 'tensor');  layer_norm_1 = None
    layer_norm_1_fp8 = layer_norm_1_quantized[0]
    layer_norm_1_scale = layer_norm_1_quantized[1];  layer_norm_1_quantized = None
    attn2_to_q = torch.ops.fp8_fx.emulated_scaled_mm.default(layer_norm_1_fp8, layer_norm_1_scale, attn2_to_q_weight_fp8, attn2_to_q_weight_scale, l_self_modules_attn2_modules_to_q_parameters_bias_, torch.float32);  layer_norm_1_fp8 = layer_norm_1_scale = attn2_to_q_weight_fp8 = attn2_to_q_weight_scale = l_self_modules_attn2_modules_to_q_parameters_bias_ = None
    unflatten_3 = attn2_to_q.unflatten(-1, (2, -1));  attn2_to_q = None
    transpose_4 = unflatten_3.transpose(1, 2);  unflatten_3 = None
    l_context__quantized = torch.ops.fp8_fx.quantize.default(l_context_, 'tensor');  l_context_ = None
    l_context__fp8 = l_context__quantized[0]
    l_context__scale = l_context__quantized[1];  l_context__quantized = None
    attn2_to_k = torch.ops.fp8_fx.emulated_scaled_mm.default(l_context__fp8, l_context__scale, attn2_to_k_weight_fp8, attn2_to_k_weight_scale, l_self_modules_attn2_modules_to_k_parameters_bias_, torch.float32);  attn2_to_k_weight_fp8 = attn2_to_k_weight_scale = l_self_modules_attn2_modules_to_k_parameters_bias_ = None
    unflatten_4 = attn2_to_k.unflatten(-1, (2, -1));  attn2_to_k = None
    transpose_5 = unflatten_4.transpose(1, 2);  unflatten_4 = None
    attn2_to_v = torch.ops.fp8_fx.emulated_scaled_mm.default(l_context__fp8, l_context__scale, attn2_to_v_weight_fp8, attn2_to_v_weight_scale, l_self_modules_attn2_modules_to_v_parameters_bias_, torch.float32);  l_context__fp8 = l_context__scale = attn2_to_v_weight_fp8 = attn2_to_v_weight_scale = l_self_modules_attn2_modules_to_v_parameters_bias_ = None
    unflatten_5 = attn2_to_v.unflatten(-1, (2, -1));  attn2_to_v = None
    transpose_6 = unflatten_5.transpose(1, 2);  unflatten_5 = None
    a_1 = torch._C._nn.scaled_dot_product_attention(transpose_4, transpose_5, transpose_6);  transpose_4 = transpose_5 = transpose_6 = None
    transpose_7 = a_1.transpose(1, 2);  a_1 = None
    flatten_1 = transpose_7.flatten(2);  transpose_7 = None
    flatten_1_quantized = torch.ops.fp8_fx.quantize.default(flatten_1, 'tensor');  flatten_1 = None
    flatten_1_fp8 = flatten_1_quantized[0]
    flatten_1_scale = flatten_1_quantized[1];  flatten_1_quantized = None
    attn2_to_out_0 = torch.ops.fp8_fx.emulated_scaled_mm.default(flatten_1_fp8, flatten_1_scale, attn2_to_out_0_weight_fp8, attn2_to_out_0_weight_scale, l_self_modules_attn2_modules_to_out_modules_0_parameters_bias_, torch.float32);  flatten_1_fp8 = flatten_1_scale = attn2_to_out_0_weight_fp8 = attn2_to_out_0_weight_scale = l_self_modules_attn2_modules_to_out_modules_0_parameters_bias_ = None
    x_1 = x + attn2_to_out_0;  x = attn2_to_out_0 = None
    layer_norm_2 = torch.nn.functional.layer_norm(x_1, (32,), None, None, 1e-05)
    layer_norm_2_quantized = torch.ops.fp8_fx.quantize.default(layer_norm_2, 'tensor');  layer_norm_2 = None
    layer_norm_2_fp8 = layer_norm_2_quantized[0]
    layer_norm_2_scale = layer_norm_2_quantized[1];  layer_norm_2_quantized = None
    ffn_net_0_proj = torch.ops.fp8_fx.emulated_scaled_mm.default(layer_norm_2_fp8, layer_norm_2_scale, ffn_net_0_proj_weight_fp8, ffn_net_0_proj_weight_scale, l_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_bias_, torch.float32);  layer_norm_2_fp8 = layer_norm_2_scale = ffn_net_0_proj_weight_fp8 = ffn_net_0_proj_weight_scale = l_self_modules_ffn_modules_net_modules_0_modules_proj_parameters_bias_ = None
    gelu = torch._C._nn.gelu(ffn_net_0_proj, approximate = 'tanh');  ffn_net_0_proj = None
    gelu_quantized = torch.ops.fp8_fx.quantize.default(gelu, 'tensor');  gelu = None
    gelu_fp8 = gelu_quantized[0]
    gelu_scale = gelu_quantized[1];  gelu_quantized = None
    ffn_net_2 = torch.ops.fp8_fx.emulated_scaled_mm.default(gelu_fp8, gelu_scale, ffn_net_2_weight_fp8, ffn_net_2_weight_scale, l_self_modules_ffn_modules_net_modules_2_parameters_bias_, torch.float32);  gelu_fp8 = gelu_scale = ffn_net_2_weight_fp8 = ffn_net_2_weight_scale = l_self_modules_ffn_modules_net_modules_2_parameters_bias_ = None
    add_2 = x_1 + ffn_net_2;  x_1 = ffn_net_2 = None
    return (add_2,)""")


class TestWanSnapshot(expecttest.TestCase):
    def test_report_tiny_diffusers_wan(self):
        import pytest
        pytest.importorskip("diffusers")
        from fp8_fx.inspect_graph import capture_graph
        from fp8_fx.passes.linear import rewrite_linears
        from fp8_fx.report import format_table
        from fp8_fx.wan import build_wan
        model = build_wan("tiny")
        gm = capture_graph(model, torch.randn(1, 16, 3, 16, 16, dtype=torch.bfloat16), torch.tensor([500]),
                           torch.randn(1, 16, 64, dtype=torch.bfloat16), return_dict=False)
        table = format_table(rewrite_linears(gm, FP8Config(fallback="emulate")).decisions)
        self.assertExpectedInline(table, """\
qualname                                   action   in   out  reason
condition_embedder.time_embedder.linear_1  skipped  32   64   not targeted
condition_embedder.time_embedder.linear_2  skipped  64   64   not targeted
condition_embedder.time_proj               skipped  64   384  not targeted
condition_embedder.text_embedder.linear_1  skipped  64   64   not targeted
condition_embedder.text_embedder.linear_2  skipped  64   64   not targeted
blocks.0.attn1.to_q                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn1.to_k                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn1.to_v                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn1.to_out.0                    emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_q                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_k                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_v                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.attn2.to_out.0                    emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.net.0.proj                    emulate  64   128  no FP8 tensor cores on cpu: fallback='emulate'
blocks.0.ffn.net.2                         emulate  128  64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn1.to_q                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn1.to_k                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn1.to_v                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn1.to_out.0                    emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn2.to_q                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn2.to_k                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn2.to_v                        emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.attn2.to_out.0                    emulate  64   64   no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.ffn.net.0.proj                    emulate  64   128  no FP8 tensor cores on cpu: fallback='emulate'
blocks.1.ffn.net.2                         emulate  128  64   no FP8 tensor cores on cpu: fallback='emulate'
proj_out                                   skipped  64   64   not targeted
(26 linears: 6 skipped, 20 emulate)""")


class SelfAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(32, 32)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(32, 32)])

    def forward(self, x):
        q = self.to_q(x).unflatten(-1, (2, 16)).transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        return self.to_out[0](o.transpose(1, 2).flatten(2))


class AttentionBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = SelfAttention()

    def forward(self, x):
        return self.attn1(x)


class TestAttentionSnapshots(expecttest.TestCase):
    def test_rewritten_attention_graph(self):
        from fp8_fx import AttentionConfig
        backend = compile_once(AttentionBlock().eval(), torch.randn(1, 8, 32),
                               config=FP8Config(fallback="emulate", attention=AttentionConfig()))
        code = "\n".join(line.split(";")[0].strip() for line in backend.graphs[0].code.splitlines()
                         if "fp8_fx" in line)
        self.assertExpectedInline(str(backend.report) + "\n" + code, """\
qualname        action   in  out  reason
attn1.to_q      emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
attn1.to_out.0  emulate  32  32   no FP8 tensor cores on cpu: fallback='emulate'
(2 linears: 2 emulate)
attention  action   reason
attn1      emulate  recipe 'tensor', Q/K rotated, emulated in fp32 (fallback='emulate'; no FP8 attention kernel for cpu)
(1 attention calls: 1 emulate)
l_x__quantized = torch.ops.fp8_fx.quantize.default(l_x_, 'tensor')
attn1_to_q = torch.ops.fp8_fx.emulated_scaled_mm.default(l_x__fp8, l_x__scale, attn1_to_q_weight_fp8, attn1_to_q_weight_scale, l_self_modules_attn1_modules_to_q_parameters_bias_, torch.float32)
attn1_qkv_quantized = torch.ops.fp8_fx.quantize_attention_inputs.default(q, q, q, 'tensor', True)
attn1_fp8_attention = torch.ops.fp8_fx.fp8_attention.default(attn1_q8, attn1_q_scale, attn1_k8, attn1_k_scale, attn1_v8, attn1_v_scale, 0.25, 'tensor', 'emulate', torch.float8_e4m3fn)
attn1_to_out_0 = torch.ops.fp8_fx.emulated_scaled_mm.default(flatten_fp8, attn1_v_scale, attn1_to_out_0_weight_fp8, attn1_to_out_0_weight_scale, l_self_modules_attn1_modules_to_out_modules_0_parameters_bias_, torch.float32)""")
