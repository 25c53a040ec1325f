# GPTQ the default plan once (cached hessians), then vary the embedding's 4-bit scheme
import sys, json, torch
HERE = __import__("os").path.dirname(__import__("os").path.abspath(__file__)); sys.path.insert(0, HERE); sys.path.insert(0, HERE + "/../../..")
import convert.onnx_quant as oq
from convert.onnx import Shape
from pathlib import Path
import sim_lib as S
SRC = sys.argv[1]
model, seqs, base = S.load(SRC)
dims = Shape(json.loads((Path(SRC) / "config.json").read_text()), Path(SRC))
sums, ntok = torch.load("hess05.pt")
plan = oq.QuantPlan().resolve(dims)
offsets = len(sys.argv) > 2 and sys.argv[2] == "offsets"
for i, layer in enumerate(model.model.layers):
    for role, names in S.NAMES.items():
        tq = plan.for_weight(role, i)
        for nm in names:
            lin = getattr(layer.self_attn if role in ("qkv", "o") else layer.mlp, nm)
            w = lin.weight.data; N, K = w.shape; B = tq.fit(K).block_size
            if tq.bits == 8:
                wq = S.sym8(w.reshape(N, K // B, B)).reshape(N, K)
            else:
                wq = S.gptq_float(w, sums[(i, role)] / ntok, B, offsets=offsets)
            lin.weight.data = wq.contiguous()
E = model.model.embed_tokens.weight.data.clone(); V, H = E.shape
model.lm_head.weight.data = S.sym8(model.lm_head.weight.data.reshape(V, H // 128, 128)).reshape(V, H)
def q_emb(kind):
    if kind == "float": return E
    if kind == "ort32": return S.ort(E.reshape(V, H // 32, 32)).reshape(V, H)
    if kind == "ort16": return S.ort(E.reshape(V, H // 16, 16)).reshape(V, H)
    if kind == "qkc32": return S.corrected(E.reshape(V, H // 32, 32), 8).reshape(V, H)
    if kind == "qk32": s, m, q = S.qk_fit(E.reshape(V, H // 32, 32)); return (q * s + m).reshape(V, H)
    if kind == "sym8": return S.sym8(E.reshape(V, H // 128, 128)).reshape(V, H)
for kind in ["float", "ort32", "qkc32", "ort16", "sym8"]:
    model.model.embed_tokens.weight.data = q_emb(kind)
    out = S.logits(model, seqs)
    kls, agree = [], []
    for b, o in zip(base, out):
        kls.append((b.exp() * (b - o)).sum(-1)[1:]); agree.append((b.argmax(-1) == o.argmax(-1))[1:].float())
    print(f"offsets={offsets} emb={kind:6s} top1={torch.cat(agree).mean():.3f} KL={torch.cat(kls).mean():.5f}", flush=True)
