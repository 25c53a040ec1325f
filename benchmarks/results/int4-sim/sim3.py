import sys, time, json, torch
HERE = __import__("os").path.dirname(__import__("os").path.abspath(__file__)); sys.path.insert(0, HERE); sys.path.insert(0, HERE + "/../../..")
import convert.onnx_quant as oq
from convert.onnx import Shape
from pathlib import Path
import sim_lib as S
SRC = sys.argv[1]; variants = sys.argv[2].split(",")
model, seqs, base = S.load(SRC)
dims = Shape(json.loads((Path(SRC) / "config.json").read_text()), Path(SRC))
ref = oq.q4_k_m_bytes(dims)
t = time.time()
cache = Path("hess05.pt")
if cache.exists():
    sums, ntok = torch.load(cache)
else:
    cal = oq.Calibration(Path(SRC), oq.default_calibration_texts(), lambda i, r: r in ("gate_up", "down"))
    sums = dict(cal._sums); ntok = cal.tokens
    torch.save((sums, ntok), cache)
print("calibration", time.time() - t, flush=True)
for v in variants:
    method, cbits, bs, emb = v.split(":"); cbits = int(cbits)
    plan, size = S.plan_with_correction(dims, cbits, bs, embedding_bits=int(emb))
    t = time.time(); saved = {}
    for i, layer in enumerate(model.model.layers):
        for role, names in S.NAMES.items():
            tq = plan.for_weight(role, i)
            for nm in names:
                lin = getattr(layer.self_attn if role in ("qkv", "o") else layer.mlp, nm)
                w = lin.weight.data; N, K = w.shape; saved[(i, nm)] = w.clone()
                B = tq.fit(K).block_size
                if tq.bits == 8:
                    wq = S.sym8(w.reshape(N, K // B, B)).reshape(N, K)
                else:
                    H = sums[(i, role)] / ntok
                    wq = S.gptq_float(w, H, B, offsets=(method == "gq"))
                    if method == "gq" and cbits:
                        pass  # correction quantization error ignored in this sim
                lin.weight.data = wq.contiguous()
    E = model.model.embed_tokens.weight.data; Hd = model.lm_head.weight.data
    V, Hh = E.shape
    model.model.embed_tokens.weight.data = (S.ort(E.reshape(V, Hh // 32, 32)) if plan.embedding_bits == 4 else S.sym8(E.reshape(V, Hh // 128, 128))).reshape(V, Hh)
    model.lm_head.weight.data = S.sym8(Hd.reshape(V, Hh // 128, 128)).reshape(V, Hh)
    out = S.logits(model, seqs)
    model.model.embed_tokens.weight.data = E; model.lm_head.weight.data = Hd
    for (i, nm), w in saved.items():
        layer = model.model.layers[i]
        getattr(layer.self_attn if nm in ("q_proj","k_proj","v_proj","o_proj") else layer.mlp, nm).weight.data = w
    kls, agree = [], []
    for b, o in zip(base, out):
        kls.append((b.exp() * (b - o)).sum(-1)[1:]); agree.append((b.argmax(-1) == o.argmax(-1))[1:].float())
    print(f"{v:12s} b{plan.block_size} int8={plan.int8_layers} down={plan.int8_down_layers} size={size/ref:.3f} top1={torch.cat(agree).mean():.3f} KL={torch.cat(kls).mean():.5f} ({time.time()-t:.0f}s)", flush=True)
