"""The persistent ggml thread pool of the llama.cpp backend: attached, same greedy tokens, freed."""

from edge.backends.llamacpp import LlamaCppBackend


def greedy(backend, n=24):
    ids = backend.tokenize("Write a Python function that reverses a list, then explain it.")
    logits = backend.eval(ids)
    out = []
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        logits = backend.eval([tok])
    return out


def test_the_backend_decodes_on_a_persistent_pool_with_the_same_tokens(smollm2):
    with LlamaCppBackend(smollm2, n_ctx=256, threads=2) as pooled, LlamaCppBackend(smollm2, n_ctx=256, threads=2, threadpool=False) as plain:
        assert pooled.info.extra["threadpool"] == "persistent (2 threads, no polling)"
        assert plain.info.extra["threadpool"] == "llama.cpp's default (threadpool=False)"
        assert greedy(pooled) == greedy(plain)
        pooled.rollback(0)
        assert pooled.score(pooled.tokenize("one two three")).shape[0] == len(pooled.tokenize("one two three"))


def test_decode_and_batch_threads_that_differ_get_a_pool_each(smollm2, monkeypatch):
    import edge.backends.llamacpp as mod
    from edge.backends.cpu import CpuThreads

    monkeypatch.setattr(mod, "default_threads", lambda: CpuThreads(decode=1, batch=2, logical=2, source="test"))
    b = LlamaCppBackend(smollm2, n_ctx=256)
    try:
        assert b.info.extra["threadpool"] == "persistent (1 and 2 threads, no polling)"
        assert len(b._pools.pools) == 2 and len(greedy(b, 4)) == 4
    finally:
        b.close()
    assert b._pools is None  # freed after the context


def test_one_thread_is_said_in_the_singular(smollm2):
    with LlamaCppBackend(smollm2, n_ctx=64, threads=1) as b:
        assert b.info.extra["threadpool"] == "persistent (1 thread, no polling)"
