import sys, torch, math
sys.path.insert(0, "tests")
import fp8_fx
from reference import reference_quantize
torch.manual_seed(3)
x = torch.randn(64, 5120, device="cuda", dtype=torch.bfloat16)
x[::2] = -x[::2].abs()
for act in ["gelu_tanh", "gelu"]:
    xq, xs = torch.ops.fp8_fx.triton_quantize(x, "tensor", act)
    xc = x.cpu(); x64 = xc.double()
    if act == "gelu_tanh":
        g64 = (0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))).to(torch.bfloat16)
        geager = torch.nn.functional.gelu(x, approximate="tanh").cpu()
    else:
        g64 = (0.5 * x64 * (1 + torch.erf(x64 / math.sqrt(2)))).to(torch.bfloat16)
        geager = torch.nn.functional.gelu(x).cpu()
    rq, rs = reference_quantize(g64, "tensor")
    eq, es = reference_quantize(geager, "tensor")
    d = (xq.cpu().double() != rq)
    print(act, "scale", xs.item(), rs.item(), es.item(), "differ vs f64-gelu", d.double().mean().item(),
          "vs eager-gelu", (xq.cpu().double() != eq).double().mean().item(),
          "eager-gelu vs f64 (bf16)", (geager != g64).double().mean().item())
    idx = d.nonzero()[:8]
    for i, j in idx.tolist():
        print("  x", xc[i, j].item(), "ours", xq[i, j].float().item(), "ref", rq[i, j].item(), "eager-ref", eq[i, j].item(),
              "g64", g64[i, j].item(), "geager", geager[i, j].item(), "scaled", (g64[i, j].double() / rs.double()).item())
