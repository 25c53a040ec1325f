# Simulate whole int4 plans on the 0.5B (fake quant in torch) incl. size vs budget
import sys, time, json
HERE = __import__("os").path.dirname(__import__("os").path.abspath(__file__)); sys.path.insert(0, HERE); sys.path.insert(0, HERE + "/../../..")
import convert.onnx_quant as oq
from convert.onnx import Shape
from pathlib import Path
SRC = sys.argv[1]
variants = sys.argv[2].split(",")
sim = __import__("sim_lib")
model, seqs, base = sim.load(SRC)
dims = Shape(json.loads((Path(SRC) / "config.json").read_text()), Path(SRC))
ref = oq.q4_k_m_bytes(dims)
for v in variants:
    scheme, cbits, bs = v.split(":")  # e.g. ort:0:auto, qk:8:auto
    cbits = int(cbits)
    plan, size = sim.plan_with_correction(dims, cbits, bs)
    t = time.time()
    top1, kl = sim.evaluate(model, seqs, base, plan, scheme, cbits)
    print(f"{v:14s} b{plan.block_size} int8={plan.int8_layers} down={plan.int8_down_layers} size={size/ref:.3f} top1={top1:.3f} KL={kl:.5f} ({time.time()-t:.0f}s)", flush=True)
