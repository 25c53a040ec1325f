import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)) + "/../../..")
from convert.verify import DEFAULT_PROMPTS
torch.set_num_threads(int(__import__("os").environ.get("SIM_THREADS", "1")))
def load(src, prompts=DEFAULT_PROMPTS):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    seqs = [tok(p)["input_ids"] for p in prompts]
    return model, seqs, logits(model, seqs)
def logits(model, seqs):
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([s])).logits[0].float(), -1) for s in seqs]
def ort(w, zp_range=True):
    lo = torch.clamp(w.amin(-1, keepdim=True), max=0); hi = torch.clamp(w.amax(-1, keepdim=True), min=0)
    s = (hi - lo) / 15; s = torch.where(s == 0, torch.ones_like(s), s)
    zp = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(w / s + zp), 0, 15)
    return (q - zp) * s
def sym8(w):
    s = w.abs().amax(-1, keepdim=True) / 127; s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(w / s).clamp(-128, 127) * s
def qk_fit(w, nstep=20, rdelta=0.1, rmin=-1.0, imp=None):
    lo = torch.clamp(w.amin(-1, keepdim=True), max=0); hi = w.amax(-1, keepdim=True)
    rng = (hi - lo).clamp_min(1e-12)
    wt = torch.ones_like(w) if imp is None else imp.expand_as(w)
    s0 = rng / 15; best_s, best_m = s0, lo
    best_q = torch.clamp(torch.round((w - lo) / s0), 0, 15)
    best_err = (wt * (best_q * s0 + lo - w) ** 2).sum(-1, keepdim=True)
    for i in range(nstep + 1):
        iscale = (rmin + rdelta * i + 15) / rng
        q = torch.clamp(torch.round(iscale * (w - lo)), 0, 15)
        sw = wt.sum(-1, keepdim=True)
        sx = (wt * q).sum(-1, keepdim=True); sxx = (wt * q * q).sum(-1, keepdim=True)
        sy = (wt * w).sum(-1, keepdim=True); sxy = (wt * q * w).sum(-1, keepdim=True)
        D = sw * sxx - sx * sx
        Ds = D.where(D > 0, torch.ones_like(D))
        s = (sw * sxy - sx * sy) / Ds
        m = (sxx * sy - sx * sxy) / Ds
        ok = (D > 0) & (s > 0)
        err = (wt * (q * s + m - w) ** 2).sum(-1, keepdim=True)
        better = ok & (err < best_err)
        best_s = torch.where(better, s, best_s); best_m = torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err); best_q = torch.where(better, q, best_q)
    q = torch.clamp(torch.round((w - best_m) / best_s), 0, 15)
    return best_s, best_m, q
def corrected(w, cbits):
    s, m, q = qk_fit(w)
    zp = torch.clamp(torch.round(-m / s), 0, 15)
    c = m + s * zp
    if cbits:
        N, nb, _ = c.shape
        cc = c.reshape(N, nb); g = 32
        pad = (-nb) % g
        cp = torch.nn.functional.pad(cc, (0, pad)).reshape(N, -1, g)
        lim = (1 << (cbits - 1)) - 1
        sc = cp.abs().amax(-1, keepdim=True) / lim; sc = torch.where(sc == 0, torch.ones_like(sc), sc)
        c = (torch.round(cp / sc).clamp(-lim - 1, lim) * sc).reshape(N, -1)[:, :nb].reshape(N, nb, 1)
    return s * (q - zp) + c
NAMES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
def evaluate(model, seqs, base, plan, scheme, cbits):
    saved = {}
    for i, layer in enumerate(model.model.layers):
        for role, names in NAMES.items():
            tq = plan.for_weight(role, i)
            for nm in names:
                lin = getattr(layer.self_attn if role in ("qkv", "o") else layer.mlp, nm)
                w = lin.weight.data; N, K = w.shape
                saved[(i, nm)] = w.clone()
                if tq.bits == 8:
                    B = tq.fit(K).block_size
                    wq = sym8(w.reshape(N, K // B, B))
                else:
                    B = tq.fit(K).block_size
                    wb = w.reshape(N, K // B, B)
                    wq = wb if scheme == "none" else ort(wb) if scheme == "ort" else corrected(wb, cbits)
                lin.weight.data = wq.reshape(N, K).contiguous()
    import os
    extra = os.environ.get("SIM_EXTRA", "")
    emb = model.model.embed_tokens.weight.data.clone(); head = model.lm_head.weight.data.clone()
    if "emb" in extra:
        V, H = emb.shape
        model.model.embed_tokens.weight.data = (ort(emb.reshape(V, H // 32, 32)) if "emb4" in extra else sym8(emb.reshape(V, H // 128, 128))).reshape(V, H)
    if "head" in extra:
        V, H = head.shape
        model.lm_head.weight.data = sym8(head.reshape(V, H // 128, 128)).reshape(V, H)
    out = logits(model, seqs)
    model.model.embed_tokens.weight.data = emb; model.lm_head.weight.data = head
    for i, layer in enumerate(model.model.layers):
        for role, names in NAMES.items():
            for nm in names:
                getattr(layer.self_attn if role in ("qkv", "o") else layer.mlp, nm).weight.data = saved[(i, nm)]
    kls, agree = [], []
    for b, o in zip(base, out):
        kls.append((b.exp() * (b - o)).sum(-1)[1:]); agree.append((b.argmax(-1) == o.argmax(-1))[1:].float())
    return torch.cat(agree).mean().item(), torch.cat(kls).mean().item()

def gptq_float(w, H, block, damp=0.1, group=128, offsets=True):
    """w [N, K] torch; returns dequantized [N, K]: GPTQ with per-block grid (scale, float offset)
    from qk_fit (offsets) or ORT's integer-zp grid."""
    N, K = w.shape
    W = w.clone().float()
    H = torch.as_tensor(H).clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1; W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    group = max(group, block)
    for c1 in range(0, K, group):
        c2 = min(c1 + group, K)
        W1 = W[:, c1:c2].clone(); err = torch.zeros_like(W1); Hinv1 = Hinv[c1:c2, c1:c2]
        for i in range(c2 - c1):
            if (c1 + i) % block == 0:
                blk = W1[:, i:i + block].unsqueeze(1)
                if offsets:
                    s, m, _ = qk_fit(blk)
                    s, m = s[:, 0, 0], m[:, 0, 0]
                else:
                    lo = torch.clamp(blk.amin(-1), max=0)[:, 0]; hi = torch.clamp(blk.amax(-1), min=0)[:, 0]
                    s = (hi - lo) / 15; s = torch.where(s == 0, torch.ones_like(s), s)
                    zp = torch.clamp(torch.round(-lo / s), 0, 15); m = -zp * s
            x = W1[:, i]
            q = torch.clamp(torch.round((x - m) / s), 0, 15)
            d = q * s + m
            Q[:, c1 + i] = d
            e = (x - d) / Hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, c2:] -= err @ Hinv[c1:c2, c2:]
    return Q


def plan_with_correction(dims, cbits, block, **fields):
    """The resolved int4 plan and its bytes when every 4-bit block also stores a ``cbits``-bit
    offset correction (the size budget then sees those bytes too)."""
    import convert.onnx_quant as oq
    real = oq.packed_bytes

    def with_correction(quant, k, n):
        b = real(quant, k, n)
        if quant.bits == 4 and cbits:
            b += n * (k // quant.fit(k).block_size) * cbits // 8
        return b

    oq.packed_bytes = with_correction
    try:
        plan = oq.QuantPlan(block_size=None if block == "auto" else int(block), **fields).resolve(dims)
        return plan, oq.export_bytes(plan, dims)
    finally:
        oq.packed_bytes = real
