"""The `florist-hf` command line (typer): aggregate, comm, run, evaluate, push, report."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from florist_hf.errors import FloristError

app = typer.Typer(
    name="florist-hf",
    help="Federated LoRA fine-tuning with FLoRIST on Hugging Face Trainer and PEFT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def user_errors(command):
    """Turn a FloristError into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except FloristError as error:
            error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _parse_numbers(text: str | None, kind, option: str) -> list | None:
    if text is None:
        return None
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FloristError(f"{option} {text!r}: expected comma-separated numbers, e.g. {option} 1579,685,3775") from None


def _method(name: str, threshold: float | None, aggregation: str = "stacked", tolerance: float = 0.0):
    from florist_hf.aggregation import METHODS, method_from_settings
    from florist_hf.aggregation.florist import FloristOptions, check_aggregation_mode

    if name not in METHODS:
        raise FloristError(f"--method {name!r} is unknown; choose one of {', '.join(sorted(METHODS))}")
    try:
        check_aggregation_mode(name, aggregation, tolerance)
        options = FloristOptions(0.9 if threshold is None else threshold, aggregation, tolerance)
    except ValueError as error:
        raise FloristError(f"--threshold/--aggregation/--streaming-tolerance: {error}") from None
    return method_from_settings(name, {"threshold": options.threshold, "aggregation": options.aggregation,
                                       "streaming_tolerance": options.tolerance})


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return str(count)


#: FLoRIST's decomposition of a round (``federation.aggregation`` and ``streaming_tolerance`` in a recipe).
AggregationMode = Annotated[
    str, typer.Option(help="FLoRIST: stacked (all clients at once) or streaming (one client at a time, bounded memory).")
]
StreamingTolerance = Annotated[
    float, typer.Option(help="Streaming: drop components below this fraction of the largest singular value (0: exact).")
]


@app.command()
@user_errors
def aggregate(
    client_dirs: Annotated[list[Path], typer.Argument(help="Client PEFT adapter directories.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the global PEFT adapter.")],
    method: Annotated[str, typer.Option(help="florist, fedit, flora, flexlora, ffa, fedsvd or fedex.")] = "florist",
    threshold: Annotated[float, typer.Option(help="FLoRIST energy threshold τ in (0, 1].")] = 0.9,
    weights: Annotated[
        Optional[str], typer.Option(help="Comma-separated client weights (default: num_samples in client.json, else equal).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    aggregation: AggregationMode = "stacked",
    streaming_tolerance: StreamingTolerance = 0.0,
    clip_update_norm: Annotated[
        Optional[float], typer.Option(help="Bound every client's update to this Frobenius norm (over its whole adapter).")
    ] = None,
    reference: Annotated[
        Optional[Path], typer.Option(help="With --clip-update-norm for fedit, ffa, fedsvd, fedex: the global the clients continued.")
    ] = None,
) -> None:
    """Aggregate client LoRA adapters into one global PEFT adapter (one server step)."""
    from florist_hf.io_utils import writable_directory
    from florist_hf.server import UpdateBounding, aggregate_adapters

    aggregator = _method(method, threshold, aggregation, streaming_tolerance)
    writable_directory(out.parent, key="--out", target=out)  # before any adapter is read
    bounding = None
    if clip_update_norm is not None:
        if not clip_update_norm > 0:
            raise FloristError(f"--clip-update-norm {clip_update_norm} must be a positive norm, e.g. 0.1")
        if not aggregator.bounds_updates:
            raise FloristError(f"--clip-update-norm bounds a client's update; {method} aggregates each client's whole product")
        bounding = UpdateBounding(clip=clip_update_norm, reference=None if aggregator.merges_into_base else reference)
    elif reference is not None:
        raise FloristError("--reference is the global the clients continued, for --clip-update-norm; add it or drop --reference")
    step = aggregate_adapters(
        client_dirs,
        aggregator,
        out,
        weights=_parse_numbers(weights, float, "--weights"),
        overwrite=force,
        bounding=bounding,
    )
    ranks = step.rank_summary
    table = Table(title=f"{method} over {len(step.adapters)} clients", show_header=False)
    table.add_row("modules", str(len(step.result.modules)))
    table.add_row("selected rank (min / median / max)", f"{ranks['min']} / {ranks['median']:g} / {ranks['max']}")
    table.add_row("total rank", str(ranks["total"]))
    table.add_row("Eff (x1e-4)", f"{step.communication.eff_x1e4:.2f}")
    comm = step.communication.to_dict()
    table.add_row("uplink (all clients)", _human_bytes(comm["uplink_bytes_total"]))
    table.add_row("downlink (all clients)", _human_bytes(comm["downlink_bytes_total"]))
    if bounding is not None:
        clipped = [client["name"] for client in step.sidecar["clients"] if client.get("clipped")]
        table.add_row(f"clipped to {clip_update_norm:g}", ", ".join(clipped) or "none")
    if step.sidecar.get("outliers"):
        table.add_row("outliers (norm ≥ 10× the median)", ", ".join(step.sidecar["outliers"]))
    console.print(table)
    console.print(f"global adapter: {step.out_dir}")


@app.command()
@user_errors
def comm(
    model_config: Annotated[str, typer.Option("--model-config", help="A config.json, a model directory or a Hub id.")],
    method: Annotated[str, typer.Option(help="florist, fedit, flora, flexlora, ffa, fedsvd or fedex.")] = "florist",
    clients: Annotated[Optional[int], typer.Option(help="Number of clients (with --rank).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="One LoRA rank for every client.")] = None,
    ranks: Annotated[Optional[str], typer.Option(help="Comma-separated per-client ranks.")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated target module names.")] = "q_proj,v_proj",
    selected_ranks: Annotated[
        Optional[Path], typer.Option(help="A FLoRIST aggregation.json whose per-module selected ranks to use.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Dtype on the wire: float32, bfloat16, float16.")] = "float32",
    secure: Annotated[bool, typer.Option(help="Also the round under secure aggregation (SecAgg+), side by side.")] = False,
    sketch_columns: Annotated[
        Optional[int], typer.Option(help="With --secure: the sketch width p (default Σ r_k + 8, exact).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Communication per round per direction, and the paper's Eff, from a model config alone."""
    from florist_hf.aggregation import round_communication
    from florist_hf.model_shapes import target_module_shapes

    client_ranks = _client_ranks(clients, rank, ranks)
    if dtype not in DTYPES:
        raise FloristError(f"--dtype {dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    shapes = target_module_shapes(model_config, [t.strip() for t in targets.split(",") if t.strip()])
    selected = _read_selected_ranks(selected_ranks, shapes) if selected_ranks else None
    if sketch_columns is not None and (not secure or sketch_columns < 1):
        raise FloristError("--sketch-columns is a positive sketch width of --secure; add --secure or drop it")
    chosen = _method(method, 1.0)
    report = round_communication(chosen, shapes, client_ranks, selected, bytes_per_param=DTYPES[dtype])
    figures = {
        "method": method,
        "model_config": model_config,
        "modules": len(shapes),
        "client_ranks": client_ranks,
        "dtype": dtype,
        **report.to_dict(),
    }
    if secure:
        from florist_hf.secure.communication import secure_round_communication

        if len(client_ranks) < 2:
            raise FloristError("--secure needs at least 2 clients: the sum of one client is its update")
        try:
            figures["secure"] = secure_round_communication(chosen, shapes, client_ranks, selected,
                                                           sketch_columns=sketch_columns,
                                                           bytes_per_param=DTYPES[dtype])["secure"]
        except ValueError as error:
            raise FloristError(f"--secure: {error}") from None
    if as_json:
        print(json.dumps(figures))
        return
    if secure:
        _print_secure_comm(figures, method, len(client_ranks), len(shapes))
        console.print(f"Eff (x1e-4): {report.eff_x1e4:.2f}")
        return
    table = Table(title=f"{method}: one round, {len(client_ranks)} clients, {len(shapes)} modules")
    for column in ("direction", "parameters", "bytes", "largest client"):
        table.add_column(column, justify="right")
    for direction in ("uplink", "downlink"):
        table.add_row(
            direction,
            f"{figures[f'{direction}_params_total']:,}",
            _human_bytes(figures[f"{direction}_bytes_total"]),
            _human_bytes(max(figures[f"{direction}_bytes"])),
        )
    console.print(table)
    console.print(f"Eff (x1e-4): {report.eff_x1e4:.2f}")


def _print_secure_comm(figures: dict, method: str, num_clients: int, num_modules: int) -> None:
    secure = figures["secure"]
    table = Table(title=f"{method}: one round, {num_clients} clients, {num_modules} modules, plain and secure")
    for column in ("per client", "plain", "secure"):
        table.add_column(column, justify="right")
    largest = max(range(num_clients), key=lambda k: figures["uplink_bytes"][k])
    table.add_row("uplink (largest client)", _human_bytes(figures["uplink_bytes"][largest]),
                  _human_bytes(secure["masked_uplink_bytes"][largest]))
    table.add_row("  parameters", f"{figures['uplink_params'][largest]:,}", f"{secure['uplink_params'][largest]:,} words")
    table.add_row("downlink (largest client)", _human_bytes(max(figures["downlink_bytes"])),
                  _human_bytes(max(figures["downlink_bytes"]) + secure["basis_downlink_bytes"]))
    table.add_row("  of which the basis Q", "", _human_bytes(secure["basis_downlink_bytes"]))
    table.add_row("protocol keys and shares (up + down)", "",
                  _human_bytes(max(u + d for u, d in zip(secure["protocol_uplink_bytes"], secure["protocol_downlink_bytes"]))))
    table.add_row("all clients, up", _human_bytes(figures["uplink_bytes_total"]), _human_bytes(secure["uplink_bytes_total"]))
    table.add_row("all clients, down", _human_bytes(figures["downlink_bytes_total"]), _human_bytes(secure["downlink_bytes_total"]))
    console.print(table)


def _client_ranks(clients: int | None, rank: int | None, ranks: str | None) -> list[int]:
    if (rank is None) == (ranks is None):
        raise FloristError("give exactly one of --rank (with --clients) or --ranks r1,r2,...")
    if ranks is not None:
        client_ranks = _parse_numbers(ranks, int, "--ranks")
        if clients is not None and clients != len(client_ranks):
            raise FloristError(f"--clients {clients} but --ranks lists {len(client_ranks)} ranks; give one rank per client")
    else:
        if clients is None:
            raise FloristError("--rank needs --clients K")
        client_ranks = [rank] * clients
    if not client_ranks or any(r <= 0 for r in client_ranks):
        raise FloristError(f"client ranks must be positive integers, got {client_ranks}")
    return client_ranks


def _read_selected_ranks(sidecar_file: Path, shapes: dict) -> dict[str, int]:
    try:
        modules = json.loads(sidecar_file.read_text())["modules"]
        selected = {name: int(info["selected_rank"]) for name, info in modules.items()}
    except FileNotFoundError:
        raise FloristError(f"{sidecar_file}: not found; pass the aggregation.json written beside a global adapter") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise FloristError(f"{sidecar_file}: not an aggregation.json sidecar (modules.*.selected_rank expected)") from None
    missing = sorted(set(shapes) - set(selected))
    if missing:
        raise FloristError(f"{sidecar_file}: no selected rank for module {missing[0]}; was it made for this model and --targets?")
    return selected


#: ``--set key=value`` (repeatable), as `recipe.load_recipe` takes overrides.
RecipeOverrides = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe field: --set federation.rounds=3 (repeatable).")
]


@app.command()
@user_errors
def run(
    recipe_file: Annotated[Path, typer.Argument(help="A recipe YAML, e.g. recipes/tiny_cpu_demo.yaml.")],
    set_: RecipeOverrides = None,
    force: Annotated[bool, typer.Option(help="Continue a run directory made with a different recipe: changed server settings (τ, method) re-aggregate from the kept client adapters; a change to how clients train is refused.")] = False,
) -> None:
    """Run (or resume) a whole federation from a recipe."""
    from florist_hf.recipe import load_recipe
    from florist_hf.runner import run_federation

    from florist_hf.distributed import is_main_process

    recipe = load_recipe(recipe_file, set_ or [])
    run_dir = run_federation(recipe, force=force, console=console)
    if is_main_process():  # under accelerate launch every process returns here
        print_run_summary(run_dir)


@app.command()
@user_errors
def sweep(
    recipe_file: Annotated[Path, typer.Argument(help="A FLoRIST recipe YAML; its output_dir holds the sweep.")],
    thresholds: Annotated[str, typer.Option(help="Comma-separated τ values in (0, 1], e.g. 0.80,0.85,0.90,0.95.")],
    criterion: Annotated[
        str, typer.Option(help="heldout_loss (lower is better) or TASK:METRIC of the recipe's lm-eval evaluation, e.g. mmlu:acc.")
    ] = "heldout_loss",
    tolerance: Annotated[
        float, typer.Option(help="FLoRIST-E: the least-downlink τ within this much (absolute) of FLoRIST-O's value.")
    ] = 0.01,
    baselines: Annotated[str, typer.Option(help="Also run these methods, comma-separated: flora, fedit, flexlora, ffa, fedsvd, fedex.")] = "",
    set_: RecipeOverrides = None,
    force: Annotated[bool, typer.Option(help="Continue branch run directories made with a different recipe (see run --force).")] = False,
) -> None:
    """Sweep the FLoRIST threshold at the cost of one round-1 training; choose FLoRIST-O and FLoRIST-E."""
    from florist_hf.recipe import load_recipe
    from florist_hf.sweep import parse_baselines, parse_criterion, parse_thresholds, run_sweep

    recipe = load_recipe(recipe_file, set_ or [])
    # Every argument is checked before any training starts.
    values, methods = parse_thresholds(thresholds), parse_baselines(baselines)
    parse_criterion(criterion, recipe)
    sweep_dir = run_sweep(recipe, values, baselines=methods, criterion=criterion, tolerance=tolerance, force=force,
                          console=console)
    console.print(f"sweep: {sweep_dir / 'sweep.json'}, {sweep_dir / 'sweep.md'}, {sweep_dir / 'sweep.png'}")


@app.command()
@user_errors
def export(
    source: Annotated[Path, typer.Argument(help="A run directory or a PEFT adapter directory.")],
    out: Annotated[Path, typer.Option("--out", help="Where the exported adapter or model directory goes.")],
    format_: Annotated[
        str, typer.Option("--format", help="uniform: one rank for every module, scale folded in (vLLM, SGLang, LoRAX, "
                                           "llama.cpp, exllamav2); merged: a full model with the update merged in.")
    ] = "uniform",
    round_to: Annotated[int, typer.Option(help="uniform: round the rank up to a multiple of this (LoRAX/TGI: 16).")] = 1,
    max_rank: Annotated[
        Optional[int], typer.Option(help="uniform: truncate modules above this rank to their best approximation (lossy).")
    ] = None,
    base_model: Annotated[
        Optional[str], typer.Option(help="merged: the base model (default: the adapter's base_model_name_or_path).")
    ] = None,
    gguf_file: Annotated[
        Optional[str], typer.Option(help="merged: a GGUF file in --base-model's folder or repository (as model.gguf_file).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Export a global adapter for a serving engine: one uniform rank, or merged into the base."""
    from florist_hf.export import export_merged, export_uniform
    from florist_hf.io_utils import writable_directory
    from florist_hf.loading import resolve_base

    writable_directory(out.parent, key="--out", target=out)  # before any model is loaded
    if gguf_file is not None and base_model is None:
        raise FloristError("--gguf-file names a file in --base-model's folder or repository; pass --base-model too")
    if base_model is not None:
        base_model = resolve_base(base_model, gguf_file, key="--base-model", file_key="--gguf-file")

    if format_ == "uniform":
        result = export_uniform(source, out, round_to=round_to, max_rank=max_rank, overwrite=force)
        console.print(f"uniform rank {result.rank} (r = lora_alpha = {result.rank}, no patterns) -> {out}", soft_wrap=True)
        for name, kept in sorted(result.truncated.items()):
            console.print(f"[yellow]truncated {name} to rank {result.rank}: {100 * kept:.2f}% of its update's energy kept[/]",
                          soft_wrap=True)
    elif format_ == "merged":
        export_merged(source, out, base_model=base_model, overwrite=force)
        console.print(f"merged model -> {out}")
    else:
        raise FloristError(f"--format {format_!r}: choose uniform or merged")


@app.command()
@user_errors
def evaluate(
    base: Annotated[str, typer.Option("--base", help="Base model: a Hub id, a local directory or package:NAME.")],
    gguf_file: Annotated[
        Optional[str], typer.Option(help="A GGUF file in --base's folder or repository: the base dequantized from it (as model.gguf_file).")
    ] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="The global PEFT adapter directory (omit for the base alone).")] = None,
    tasks: Annotated[
        Optional[str], typer.Option(help="Comma-separated lm-eval tasks (default: mmlu; with --mmlu-file: florist_mmlu).")
    ] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples (default 0).")] = None,
    limit: Annotated[Optional[float], typer.Option(help="Examples per task (a count, or a fraction < 1).")] = None,
    include_path: Annotated[Optional[Path], typer.Option(help="Extra lm-eval task folder (local task YAMLs, offline data).")] = None,
    mmlu_file: Annotated[
        Optional[Path],
        typer.Option(help="The 1,444-question MMLU subset JSON: MMLU by log-likelihood on it offline (task florist_mmlu)."),
    ] = None,
    paper_mmlu: Annotated[
        Optional[Path], typer.Option(help="The paper's generative protocol on the 1,444-question MMLU subset JSON (SPEC §7).")
    ] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda when available).")] = None,
    batch_size: Annotated[str, typer.Option(help='Batch size: a number, "auto" or "auto:N".')] = "8",
    apply_chat_template: Annotated[
        bool, typer.Option(help="Wrap prompts in the tokenizer's chat template (with --paper-mmlu: its chat-template variant).")
    ] = False,
    log_samples: Annotated[bool, typer.Option(help="Keep every question's prompt, answer and score in --out.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Branch, tag or commit of the base model.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the results JSON here.")] = None,
) -> None:
    """Evaluate a global adapter with lm-evaluation-harness (MMLU by default)."""
    from florist_hf.evaluation import HUB_MMLU_TASK, MMLU_SUBSET_TASK, evaluate_adapter, evaluate_paper_mmlu, results_table
    from florist_hf.loading import resolve_base
    from florist_hf.recipe import EvaluationSection

    if limit is not None and not limit > 0:
        raise FloristError(f"--limit {limit:g}: give the examples per task as a count (1 or more) or a fraction in (0, 1), "
                           "or leave --limit out for every example")
    if paper_mmlu is not None:  # the paper's protocol is one fixed task: options that choose tasks do not apply
        given = [flag for flag, value in (("--tasks", tasks), ("--num-fewshot", num_fewshot),
                                          ("--include-path", include_path), ("--mmlu-file", mmlu_file)) if value is not None]
        if given:
            raise FloristError(
                f"{given[0]} does not apply with --paper-mmlu (the paper's protocol, 0-shot on its own subset); drop it, "
                "or run the log-likelihood MMLU separately with --mmlu-file"
            )
    if out is not None:
        from florist_hf.io_utils import writable_directory

        writable_directory(out.parent, key="--out", target=out)  # before the model is loaded
    base = resolve_base(base, gguf_file, revision=revision, key="--base", file_key="--gguf-file")

    count_limit = int(limit) if limit is not None and limit >= 1 else limit
    try:
        lm_eval_batch_size = EvaluationSection(batch_size=int(batch_size) if batch_size.isdigit() else batch_size).batch_size
    except ValueError:
        raise FloristError(f'--batch-size {batch_size!r}: use a number, "auto" or "auto:N"') from None
    common = dict(limit=count_limit, device=device, batch_size=lm_eval_batch_size, log_samples=log_samples, revision=revision,
                  apply_chat_template=apply_chat_template, out_file=out)
    if paper_mmlu is not None:
        results = evaluate_paper_mmlu(base, adapter, paper_mmlu, **common)
    else:
        results = evaluate_adapter(
            base, adapter, tasks=tasks or (MMLU_SUBSET_TASK if mmlu_file is not None else HUB_MMLU_TASK),
            num_fewshot=0 if num_fewshot is None else num_fewshot, include_path=include_path, mmlu_file=mmlu_file, **common,
        )
    console.print(results_table(results))
    if out is not None:
        console.print(f"results: {out}")


@app.command()
@user_errors
def answer(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (its output_dir).")],
    instruction: Annotated[
        Optional[list[str]], typer.Option("--instruction", help="An instruction to answer (repeatable; default: held-out records).")
    ] = None,
    heldout: Annotated[int, typer.Option(help="Without --instruction: this many of the run's held-out test records.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 96,
) -> None:
    """The base model's answer beside the global adapter's (greedy), for held-out records or your own instructions."""
    from rich.markup import escape

    from florist_hf.generation import run_answers

    for index, row in enumerate(run_answers(run_dir, instructions=instruction or (), heldout=heldout,
                                            max_new_tokens=max_new_tokens), start=1):
        console.rule(f"[bold]{index}[/]")
        console.print(f"[bold]instruction[/]    {escape(row['instruction'])}"
                      + (f"\n[bold]input[/]          {escape(row['input'])}" if row["input"] else ""), highlight=False)
        if row["reference"]:
            console.print(f"[bold]reference[/]      {escape(row['reference'])}", highlight=False)
        console.print(f"[bold]base[/]           {escape(row['base'])}", highlight=False)
        console.print(f"[bold green]global adapter[/] {escape(row['adapter'])}", highlight=False)


@app.command()
@user_errors
def push(
    source: Annotated[Path, typer.Argument(help="A run directory or a global adapter directory.")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="namespace/name on the Hugging Face Hub.")],
    private: Annotated[bool, typer.Option(help="Create the repository as private.")] = False,
    dry_run: Annotated[
        Optional[Path], typer.Option("--dry-run", help="Only build the folder that would be uploaded, here.")
    ] = None,
    include_client_details: Annotated[
        bool, typer.Option(help="Also upload per-client sample counts, weights, names and local paths.")
    ] = False,
    pick: Annotated[
        Optional[str], typer.Option(help="SOURCE is a sweep directory: publish its optimal (FLoRIST-O) or efficient (FLoRIST-E) branch.")
    ] = None,
    format_: Annotated[
        str, typer.Option("--format", help="peft: the adapter as aggregated (per-module ranks); uniform: one rank for "
                                           "every module, for vLLM, SGLang, LoRAX and llama.cpp (see `export`).")
    ] = "peft",
) -> None:
    """Publish a global adapter to the Hub with a model card (token from HF_TOKEN or `hf auth login`).

    By default the upload carries the adapter, the card and aggregate-level records only."""
    from florist_hf.hub import push as push_to_hub

    selection = None
    if pick is not None:
        from florist_hf.sweep import picked_branch

        source, selection = picked_branch(source, pick)
    location = push_to_hub(source, repo_id, private=private, dry_run_dir=dry_run, include_client_details=include_client_details,
                           selection=selection, variant=format_)
    console.print(f"{'built upload folder' if dry_run else 'pushed to'} {location}")


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    compare: Annotated[Optional[list[Path]], typer.Option(help="Other run directories to compare bytes with.")] = None,
) -> None:
    """Write PNG plots (loss, ranks, energy, bytes) and a Markdown summary into RUN_DIR/report/."""
    from florist_hf.report import write_report

    for path in write_report(run_dir, compare=compare or []):
        console.print(str(path))


def print_run_summary(run_dir: Path) -> None:
    """Per-round loss, ranks and bytes, and where the global adapter is."""
    from florist_hf.rundir import GLOBAL_ADAPTER, RunPaths, read_metrics

    records = read_metrics(RunPaths(run_dir).metrics)
    table = Table(title=f"{run_dir}")
    for column in ("round", "client loss", "test loss", "ranks", "total", "up", "down", "Eff"):
        table.add_column(column, justify="right")
    for record in (r for r in records if r["kind"] == "round"):
        losses = [
            r["loss"] for r in records
            if r["kind"] == "client" and r["round"] == record["round"] and r.get("client") in record["clients"]
        ]
        heldout = record.get("heldout_loss")
        table.add_row(
            str(record["round"]),
            f"{sum(losses) / len(losses):.4f}" if losses else "-",
            f"{heldout:.4f}" if heldout is not None else "-",
            f"{record['rank_min']}/{record['rank_median']:g}/{record['rank_max']}",
            str(record["total_selected_rank"]),
            _human_bytes(record["uplink_bytes_total"]),
            _human_bytes(record["downlink_bytes_total"]),
            f"{record['eff_x1e4']:.2f}",
        )
    console.print(table)
    console.print("client loss: mean over the round's clients; ranks: min/median/max per module; Eff: x1e-4")
    console.print(f"global adapter: {run_dir / GLOBAL_ADAPTER}")


def quiet_libraries() -> None:
    """Our own progress lines replace the libraries' bars and deprecation chatter.

    Set through the environment, which transformers, huggingface_hub, datasets and tqdm read when
    they are first imported, so that commands that need none of them (aggregate, comm) do not
    import them. ``TQDM_DISABLE`` is tqdm's own default for every bar that does not set
    ``disable`` itself (transformers' GGUF dequantization, lm-eval's request building).
    """
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def main() -> None:
    quiet_libraries()
    app()


if __name__ == "__main__":
    main()
