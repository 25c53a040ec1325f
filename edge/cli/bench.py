"""``edge-reason bench``: benchmark this device, and merge records from many devices.

    edge-reason bench run MODEL [--suite ...] [--quick] [--out RUN.json]
    edge-reason bench MODEL ...                     # the same: ``run`` is the default
    edge-reason bench report RUN.json [RUN2.json | FOLDER ...] [--out DIR]
    edge-reason bench batch-cost [-m MODEL] [--threads N] [--remeasure]

A thin adapter over :mod:`benchmarks.bench`: options become one
:class:`~benchmarks.bench.suites.BenchConfig`; progress goes to stderr, the summary table to
stdout, and the record to a JSON file.
"""

from __future__ import annotations

from pathlib import Path

import click

from edge.cli.options import model_options
from edge.errors import ConfigError

SUITE_CHOICES = ("throughput", "overhead", "reasoning", "peers", "all")


class DefaultRunGroup(click.Group):
    """A group whose first argument, when it names no subcommand, goes to ``run``:
    ``edge-reason bench MODEL`` is ``edge-reason bench run MODEL``."""

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def int_list(name: str, *, allow_negative: bool = False):
    """A click callback turning ``"1,2,4"`` into ``(1, 2, 4)``."""

    def convert(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        out = []
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise click.BadParameter(f"{part!r} is not an integer; give a comma-separated list such as 1,2,4") from None
            if n < (-1 if allow_negative else 1):
                raise click.BadParameter(f"{n} is out of range for {name}")
            out.append(n)
        if not out:
            raise click.BadParameter(f"{name} needs at least one value")
        return tuple(dict.fromkeys(out))

    return convert


def parse_suites(value: str) -> tuple[str, ...]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in names if s not in SUITE_CHOICES]
    if bad or not names:
        raise ConfigError(f"unknown suite {', '.join(bad) or '(none)'}; choose from: {', '.join(SUITE_CHOICES)} (comma-separated)")
    if "all" in names:
        names = ["throughput", "overhead", "reasoning", *(n for n in names if n == "peers")]
    return tuple(dict.fromkeys(names))


@click.group(cls=DefaultRunGroup)
def bench() -> None:
    """Benchmark throughput, overhead and reasoning cost on this device.

    \b
      edge-reason bench run MODEL [OPTIONS]          measure; write one JSON record
      edge-reason bench MODEL [OPTIONS]              the same (run is the default)
      edge-reason bench report RUN.json ... [--out DIR]   tables and plots from many records
      edge-reason bench batch-cost [-m MODEL] [--threads N] [--remeasure]   the batch-cost curve
                                                     auto speculation decides from
    """


@bench.command("run")
@click.argument("model", required=False)
@click.option("--suite", "suite", default="all", show_default=True,
              help="throughput | overhead | reasoning | peers | all (comma-separated; all = the first three). peers: llama-bench, "
                   "llama-server and bare llama-cpp-python against edge-reason, interleaved (needs `bash .ci/build-peers`).")
@click.option("--quick", is_flag=True, help="Short lengths, few repeats, one problem per level: about a minute on a small model.")
@click.option("--threads", callback=int_list("--threads"), default=None, help="Thread counts to compare, e.g. 1,2,4 (default: physical cores).")
@click.option("--gpu-layers", callback=int_list("--gpu-layers", allow_negative=True), default=None,
              help="GPU layer settings to compare, e.g. 0,16,-1 (-1 = all; default 0,-1 where a GPU is usable, else 0).")
@click.option("--ctx", "n_ctx", type=int, default=None, help="Context size (default 4096, 1024 with --quick; clipped to the model's).")
@click.option("--prompt-lengths", callback=int_list("--prompt-lengths"), default=None, help="Prefill lengths (default 128,512,2048).")
@click.option("--depths", callback=int_list("--depths"), default=None, help="Context depths for decode speed (default 64,512,2048).")
@click.option("--decode-tokens", type=int, default=None, help="Tokens per decode run (default 128, 32 with --quick).")
@click.option("--repeats", type=int, default=None, help="Measured runs per figure, overhead and peer rounds included (default 5, 3 with --quick).")
@click.option("--overhead-tokens", type=int, default=None, help="Tokens per overhead and peers run (default 128, 32 with --quick).")
@click.option("--warmup", type=int, default=None, help="Unmeasured warm-up runs per figure (default 1).")
@click.option("--task", default=None, help="Reasoning task (default tiny-r1): tiny-r1 | gsm8k | math500 | aime24 | amc23.")
@click.option("--per-level", type=int, default=None, help="Reasoning problems per difficulty level (default 2, 1 with --quick).")
@click.option("--limit", type=int, default=None, help="Reasoning problems in all (overrides --per-level).")
@click.option("--policy", "policies", multiple=True, help="Reasoning policy, repeatable (default: unlimited, budget:128, early-exit).")
@click.option("--max-tokens", type=int, default=None, help="Cap on generated tokens per reasoning problem (default 2048, 256 with --quick).")
@click.option("--device-name", default=None, help="Label for this device in records and reports (default: derived from the CPU/SoC).")
@click.option("--notes", default=None, help="Free text stored in the record (e.g. 'on battery, power saver').")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Record file (default: ./<device>-<date>-<time>.json).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def run_cmd(model, suite, quick, threads, gpu_layers, n_ctx, prompt_lengths, depths, decode_tokens, repeats, overhead_tokens, warmup, task,
            per_level, limit, policies, max_tokens, device_name, notes, out, force, quiet) -> None:
    """Measure MODEL (a GGUF file; default: the bundled tiny-r1) on this device and write one JSON record."""
    from edge.benchmarks.bench import report, schema, suites

    given = {
        "suites": parse_suites(suite), "threads": threads, "gpu_layers": gpu_layers, "n_ctx": n_ctx,
        "prompt_lengths": prompt_lengths, "depths": depths, "decode_tokens": decode_tokens, "repeats": repeats,
        "overhead_repeats": repeats, "overhead_tokens": overhead_tokens,
        "warmup": warmup, "task": task, "per_level": per_level, "limit": limit, "policies": tuple(policies) or None,
        "max_tokens": max_tokens,
    }
    given = {k: v for k, v in given.items() if v is not None}
    cfg = suites.BenchConfig.quick_config(**given) if quick else suites.BenchConfig(**given)
    if "reasoning" in cfg.suites:  # fail on a bad task or policy now, not after the throughput suite
        from edge.benchmarks import harness

        for spec in cfg.policies:
            harness.parse_policies(spec)
        suites.reasoning_items(cfg)
    if "peers" in cfg.suites:  # fail on missing programs now, not after the other suites
        from edge.benchmarks.bench.peers import require_peers

        require_peers()
    if out is not None:
        schema.check_output_path(out, force=force)
    progress = suites.Progress(enabled=not quiet)
    record = suites.run(model, cfg, progress=progress, device_name=device_name, notes=notes)
    path = out if out is not None else Path(suites.default_record_name(record))
    schema.write_record(record, path, force=force)
    click.echo(report.markdown([record]))
    click.echo(f"wrote {path}", err=True)


@bench.command("batch-cost")
@model_options
@click.option("--remeasure", is_flag=True, help="Measure again and replace the cached curve.")
def batch_cost_cmd(remeasure: bool, **kw) -> None:
    """Show this machine's batch-cost curve for a model (what auto speculation decides from):
    the cached one, or measured now and cached (the model options must match those of the runs
    it is for: --threads, --kv-cache, --device, --gpu-layers)."""
    from edge.cli.options import open_runtime
    from edge.speculative import UNSETTLED, SpeculativeConfig, break_even, exact_batch_cached

    with open_runtime(kw) as rt:
        curve = rt.batch_cost(refresh=remeasure)
        plan = rt.plan_speculation(None)
        info = rt.backend.info
        exact = exact_batch_cached(rt.backend)
    how = f"measured now in {curve.took:.1f} s" if curve.measured else f"cached, measured {curve.when} in {curve.took:.1f} s"
    if not curve.settled:
        how += f"; uncertain: {UNSETTLED}"
    click.echo(f"{Path(info.model_path).name}: threads {info.threads} (batches {info.extra.get('threads_batch')}), device {info.device}, "
               f"flash attention {'on' if info.extra.get('flash_attn') else 'off'}, KV cache {info.extra.get('kv_cache')}")
    click.echo(f"batch cost ({how}): time of a batch of k tokens / one token")
    click.echo("  k     " + " ".join(f"{k:>5}" for k in range(1, len(curve.cost) + 1)))
    click.echo("  cost  " + " ".join(f"{c:>5.2f}" for c in curve.cost))
    click.echo("  ms    " + " ".join(f"{curve.seconds[k] * 1e3:>5.1f}" if k in curve.seconds else "    -" for k in range(1, len(curve.cost) + 1)))
    rate = break_even(SpeculativeConfig(cost=curve.cost))
    click.echo(f"drafts pay above acceptance {rate:.2f}" if rate is not None else "no draft ever pays")
    click.echo(f"exact batches: up to {exact} rows computed bit for bit as one-token steps (drafts of at most {exact - 1} "
               f"token{'s' if exact != 2 else ''} keep greedy output the same)" if exact >= 2 else
               "exact batches: not even 2 rows are computed as one-token steps here, so speculation would not be "
               "token-exact" + ("" if info.extra.get("flash_attn") else " (--flash-attn may help)"))
    click.echo(f"auto speculation: {plan}")
    click.echo(f"cache: {curve.path or '(not cached)'}")


@bench.command("report")
@click.argument("records", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder for report.md and the PNG plots.")
@click.option("--no-plots", is_flag=True, help="Write report.md only.")
def report_cmd(records, out, no_plots) -> None:
    """Merge RECORDS (JSON files, or folders of them) from many devices into tables and plots."""
    from edge.benchmarks.bench import report

    recs = report.load_records(records)
    click.echo(report.markdown(recs), nl=False)
    if out is not None:
        for p in report.write_report(recs, out, plots=not no_plots):
            click.echo(f"wrote {p}", err=True)
