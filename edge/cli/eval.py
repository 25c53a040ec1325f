"""``edge-reason eval``: accuracy and thinking cost of reasoning policies on a task."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edge.cli.options import model_options, open_runtime, options_from, plan_speculation, pop_sampling
from edge.params import SamplingParams

# eval decodes greedily by default (top_p then 1.0), with a fixed seed for sampled runs
EVAL_SAMPLING = {
    "temperature": {"default": 0.0},
    "top_p": {"default": None, "help": "Default: 1.0 when greedy (--temperature 0), else 0.95."},
    "seed": {"default": 0},
    # records must not depend on this machine's batch cost (auto speculation can flip a near
    # tie of greedy decoding), and journals from before the option resume: off unless asked
    "speculate": {"default": False, "help": "Speculative decoding (see `edge-reason run --help`); off by default in eval, "
                                            "whose records must not depend on this machine's measured batch cost."},
}


@click.command("eval")
@model_options
@click.option("--tasks", "task", default="tiny-r1", show_default=True,
              help="tiny-r1 | tiny-r1-val | tiny-r1-stress | gsm8k | math500 | aime24 | amc23 (shipped with the package), or a name for --data.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Read the task's problems from this JSONL instead (one object per line); a new task name makes a custom task.")
@click.option("--question-field", default=None, help="Field of --data holding the question (default: question, problem or prompt).")
@click.option("--answer-field", default=None, help="Field of --data holding the gold answer (default: answer, gold or target; text after '####' is kept).")
@click.option("--scorer", type=click.Choice(["math", "exact"]), default=None,
              help="math: last \\boxed{} or number, math equivalence (default); exact: the whole answer text.")
@click.option("--prompt-suffix", default=None, help="Text appended to each question of --data (the built-in math sets ask for \\boxed{}).")
@click.option("--policy", "policies", multiple=True, default=("unlimited",), show_default=True,
              help="unlimited | oracle | budget:N[,N..] | budget-step:N | budget-probe:N | effort:L | wait:N | adaptive:S[,S..] | "
                   "adaptive-step:S | adaptive-probe:S | signal:FIRST:THRESHOLD:LOW:HIGH[,..] | early-exit[:T,..] | dynasor[:K,..]; "
                   "repeatable. budget-step cuts back to the last paragraph break and the model answers freely; budget-probe "
                   "cuts back to the last probe point and answers with the probe there, and signal sets the cap from one "
                   "probe's confidence: these two are what 'python -m edge.benchmarks.offline' replays from an oracle run.")
@click.option("--limit", type=int, default=None, help="Evaluate the first N problems (spread over levels).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for records.jsonl, summary, curve.csv and curve.png; an interrupted run given the same folder resumes.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None, help="Adaptive-budget calibration JSON (made with --calibrate).")
@click.option("--calibrate", is_flag=True, help="Fit the adaptive-budget predictor on the validation split first.")
@options_from(SamplingParams, EVAL_SAMPLING)
@click.option("--no-plot", is_flag=True, help="Skip the PNG plot.")
def eval_cmd(task, data, question_field, answer_field, scorer, prompt_suffix, policies, limit, out, calibration, calibrate,
             no_plot, **kw) -> None:
    """Run each policy on a task; print a summary table (and write records with --out)."""
    import dataclasses
    import json

    from edge.benchmarks import harness
    from edge.benchmarks.tasks import load_task, task_spec
    from edge.control.budget import LengthPredictor
    from edge.errors import ConfigError
    from edge.files import atomic_write

    pols = [p for spec in policies for p in harness.parse_policies(spec)]
    spec = task_spec(task, data, question=question_field, answer=answer_field, scorer=scorer, suffix=prompt_suffix)
    items = load_task(spec, limit)
    if kw["top_p"] is None:
        kw["top_p"] = 1.0 if kw["temperature"] == 0 else SamplingParams.top_p
    params = pop_sampling(kw)
    if out is not None and out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    predictor = None
    if calibration is not None:
        try:
            predictor = LengthPredictor(**json.loads(Path(calibration).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read calibration {calibration}: {exc}") from None
    with open_runtime(kw) as rt:
        plan_speculation(rt, params.speculate)
        reasoning_prompt = rt.reasoning_prompt  # the instruction text, recorded with the results
        if any(p.family.startswith("adaptive") for p in pols) and predictor is None:
            if not calibrate:
                raise ConfigError("the adaptive policy needs --calibration FILE or --calibrate")
            cal_task = spec.validation
            if cal_task is None:
                raise ConfigError(f"no validation split to calibrate on for {task}; pass --calibration FILE")
            click.echo(f"calibrating the adaptive budget on {cal_task} ...", err=True)
            predictor, _ = harness.calibrate(rt, load_task(cal_task), params)
            click.echo(f"  budget = {predictor.intercept:.1f} + {predictor.slope:.3f} * prompt_tokens", err=True)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                atomic_write(out / "calibration.json", json.dumps(predictor.to_dict(), indent=2))

        def progress(i, total, rec):
            mark = "ok" if rec["correct"] else "x "
            sys.stderr.write(f"\r[{i}/{total}] {rec['policy']:<18} {mark} think={rec['thinking_tokens']:<5} probes={rec['probe_tokens']:<4}")
            sys.stderr.flush()

        settings = {"model": rt.backend.info.model_path, "task": spec.name, "data": str(spec.path) if spec.path else spec.file,
                    "reasoning_prompt": reasoning_prompt, "sampling": dataclasses.asdict(params)}
        journal = out / "progress.jsonl" if out is not None else None  # resumable: records land as they are made
        records = harness.evaluate(rt, items, pols, params, predictor=predictor, progress=progress, journal=journal, settings=settings)
        sys.stderr.write("\n")
    rows = harness.summarize(records)
    click.echo(harness.markdown_table(rows))
    if out is not None:
        for p in harness.write_outputs(out, records, rows, plot=not no_plot):
            click.echo(f"wrote {p}", err=True)
        settings.update(n=len(items), policies=[p.name for p in pols])
        atomic_write(out / "settings.json", json.dumps(settings, indent=2, default=str))
        click.echo(f"wrote {out / 'settings.json'}", err=True)
