"""``edge-reason bench``: throughput, overhead and reasoning-cost benchmarks on consumer hardware.

- :mod:`.fingerprint` – what device a record came from (pure parsers over captured text, plus
  the probes that read this machine), battery state and RAPL energy;
- :mod:`.suites` – the measurements, run through edge's own Runtime and generation loop;
- :mod:`.schema` – the versioned, portable JSON record: validation, atomic write, loading;
- :mod:`.report` – many records from many devices merged into markdown tables and PNG plots.
"""
