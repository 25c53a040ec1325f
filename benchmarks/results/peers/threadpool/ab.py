# attach a persistent ggml threadpool (as llama-server / llama-bench do) to a llama-cpp-python context
import ctypes, glob, os, time, statistics, subprocess, json, sys
import llama_cpp
libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
base = ctypes.CDLL(os.path.join(libdir, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
cpu = ctypes.CDLL(os.path.join(libdir, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
lib = ctypes.CDLL(os.path.join(libdir, "libllama.so"), mode=ctypes.RTLD_GLOBAL)
class TPParams(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]
base.ggml_threadpool_params_default.restype = TPParams
base.ggml_threadpool_params_default.argtypes = [ctypes.c_int]
cpu.ggml_threadpool_new.restype = ctypes.c_void_p
cpu.ggml_threadpool_new.argtypes = [ctypes.POINTER(TPParams)]
lib.llama_attach_threadpool.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
M = sys.argv[2] if len(sys.argv) > 2 else "/work/models/qwen2.5-coder-1.5b-q4_k_m.gguf"
N = 128
bench = glob.glob("/root/.cache/edge-reason/bin/*/llama-bench")[0]
def make(pool):
    llm = llama_cpp.Llama(M, n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
    if pool:
        p = base.ggml_threadpool_params_default(2)
        p.poll = int(pool)
        tp = cpu.ggml_threadpool_new(ctypes.byref(p))
        lib.llama_attach_threadpool(ctypes.c_void_p(llm._ctx.ctx), ctypes.c_void_p(tp), ctypes.c_void_p(tp))
    return llm
models = {"default": make(None), "pool poll=50": make(50), "pool poll=0": make(0)}
prompt = models["default"].tokenize(b"Write a Python class for a singly linked list with insert, delete, search and reverse methods.")
def gen(llm):
    t = None; n = 0; out = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        if t is None: t = time.perf_counter()
        out.append(tok); n += 1
        if n > N: break
    return N / (time.perf_counter() - t), out
def lb():
    o = subprocess.run([bench, "-m", M, "-t", "2", "-p", "0", "-n", str(N), "-d", str(len(prompt)), "-r", "1", "-o", "json"], capture_output=True, text=True).stdout
    return json.loads(o)[0]["avg_ts"]
res = {k: [] for k in [*models, "llama-bench"]}
toks = {}
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    order = list(models)[r % 3:] + list(models)[:r % 3]
    for k in order:
        s, out = gen(models[k]); res[k].append(s); toks.setdefault(k, out)
    res["llama-bench"].append(lb())
    print(r, {k: round(v[-1], 2) for k, v in res.items()}, flush=True)
print("same tokens:", all(t == toks["default"] for t in toks.values()))
for k, v in res.items():
    print("RESULT", k, "median", round(statistics.median(v), 2), "ratio to default per round", [round(a / b, 3) for a, b in zip(v, res["default"])])
