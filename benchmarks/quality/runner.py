"""One benchmark run: `florist-hf run RECIPE --set ...` (the real command, called in-process so the
libraries are imported once), then the run's numbers from its metrics.jsonl and run.json, plus the
final global adapter's loss on every client's own held-out records."""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.quality import config

#: Overrides of the federated grid that the one-client centralised reference keeps from its own recipe.
#: The quality benchmark's name for FLoRIST under secure aggregation (a row of its own), and the override that turns it on.
SECURE_FLORIST = "florist-secure"
SECURE_OVERRIDE = "federation.secure_aggregation.enabled=true"
FEDERATION_ONLY = {"federation.num_clients", "lora.ranks", "lora.alphas", "federation.rounds", "federation.method", "federation.threshold"}


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    setting: str  # homo | heter | centralised
    method: str  # fedit | flora | flexlora | ffa | fedex | fedsvd | florist | florist-secure
    seed: int
    threshold: float | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)
    #: Which base and recipes (`config.RECIPE_SETS`): the pre-trained tiny Llama, or the real SmolLM2.
    recipe_set: str = "tiny"

    @property
    def label(self) -> str:
        if self.setting == "centralised":
            return "centralised LoRA"
        if self.method == "florist":
            return f"FLoRIST τ={self.threshold:.2f}"
        if self.secure:
            return f"FLoRIST τ={self.threshold:.2f}, secure aggregation"
        return {"fedit": "FedIT", "flora": "FLoRA", "flexlora": "FlexLoRA", "ffa": "FFA-LoRA", "fedex": "FedEx-LoRA",
                "fedsvd": "FedSVD"}[self.method]

    @property
    def name(self) -> str:
        method = self.method if self.threshold is None else f"florist{self.threshold:.2f}" + ("-secure" if self.secure else "")
        return f"{self.setting}/{method}/seed_{self.seed}"

    @property
    def secure(self) -> bool:
        """FLoRIST under ``federation.secure_aggregation`` (SecAgg+ over the two sketch sums)."""
        return self.method == SECURE_FLORIST

    @property
    def federation_method(self) -> str:
        """What ``federation.method`` is set to: the aggregation method itself."""
        return "florist" if self.secure else self.method

    @property
    def recipe_file(self) -> Path:
        return config.RECIPE_SETS[self.recipe_set][self.setting]

    def base_reference(self, base_dir: Path) -> str:
        """What ``model.name_or_path`` is set to: the tiny base's directory, or the real recipes'
        own GGUF package (so each run goes through the GGUF path a user's does)."""
        return str(base_dir) if self.recipe_set == "tiny" else config.REAL_BASE

    @property
    def merges_into_base(self) -> bool:
        return self.federation_method in ("florist", "flora")


def first_round_donor(spec: RunSpec, done: dict[str, Path]) -> Path | None:
    """A finished run whose round-1 client training is identical to ``spec``'s, if any.

    Round 1 of FLoRA and FLoRIST (any τ) trains the same fresh LoRA on the same base with the same
    seeds; round 1 of FedIT and FlexLoRA starts every client from the same shared initial adapter.
    Only the server step differs, so the runner may resume from the donor's round-1 client adapters
    (the runner's own resume path) instead of training them again.
    """
    if spec.setting == "centralised" or spec.secure:  # a secure run's clients train and mask through the protocol
        return None
    family = ("flora", "florist") if spec.merges_into_base else ("fedit", "flexlora") if spec.method in ("fedit", "flexlora") else ()
    for other_name, run_dir in done.items():
        setting, method, seed = other_name.split("/")
        method = "florist" if method.startswith("florist") else method
        if setting == spec.setting and seed == f"seed_{spec.seed}" and method in family and other_name != spec.name:
            return run_dir
    return None


def florist_run(recipe_file: Path, overrides: list[str], log_file: Path, command: tuple[str, ...] = ("run",)) -> None:
    """`florist-hf run recipe_file --set o1 --set o2 ...` (or another command, e.g. ``("sweep",
    "--thresholds", "0.8,0.9")``), its console output into ``log_file``."""
    from florist_hf.cli import app

    args = [command[0], str(recipe_file), *command[1:]]
    for override in overrides:
        args += ["--set", override]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print("$ florist-hf " + " ".join(args), flush=True)
        try:
            code = app(args, standalone_mode=False)
        except SystemExit as exit_:  # pragma: no cover - typer may exit on usage errors
            code = exit_.code
    if code:
        raise RuntimeError(f"florist-hf {command[0]} failed (exit {code}); see {log_file}")


def client_losses(base_dir: Path, adapter_dir: Path | None, recipe, client_records: list[list[dict]], work_dir: Path) -> list[float]:
    """Loss of base (+ adapter) on each client's own held-out records, with the runner's own
    held-out loss function (`florist_hf.server.heldout_loss`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from florist_hf.heldout import heldout_loss

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    losses = [heldout_loss(model, tokenizer, records, recipe, work_dir) for records in client_records]
    shutil.rmtree(work_dir, ignore_errors=True)
    return losses


def test_loss(base_dir: Path, recipe, test_records: list[dict], work_dir: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from florist_hf.heldout import heldout_loss

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    loss = heldout_loss(model, tokenizer, test_records, recipe, work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    return loss


def summarize_metrics(run_dir: Path) -> dict:
    """The per-round numbers the runner logged, and their per-round means."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = sorted((r for r in records if r["kind"] == "round"), key=lambda r: r["round"])
    clients = [r for r in records if r["kind"] == "client"]
    summary = json.loads((run_dir / "run.json").read_text())
    sidecar = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text()) if (run_dir / "global_adapter" / "aggregation.json").exists() else {}
    mean = statistics.fmean
    return {
        "rounds": len(rounds),
        "test_loss_per_round": [r.get("heldout_loss") for r in rounds],
        "test_loss": rounds[-1].get("heldout_loss"),
        "uplink_bytes_per_round": mean(r["uplink_bytes_total"] for r in rounds),
        "downlink_bytes_per_round": mean(r["downlink_bytes_total"] for r in rounds),
        "eff_x1e4": mean(r["eff_x1e4"] for r in rounds),
        "total_selected_rank_per_round": [r["total_selected_rank"] for r in rounds],
        "total_selected_rank": mean(r["total_selected_rank"] for r in rounds),
        "rank_min_median_max_per_round": [[r["rank_min"], r["rank_median"], r["rank_max"]] for r in rounds],
        "published_total_rank": sidecar.get("total_rank"),
        "server_seconds_per_round": [r["server_seconds"] for r in rounds],
        "server_seconds": mean(r["server_seconds"] for r in rounds),
        "client_train_loss": mean(c["loss"] for c in clients if c.get("loss") is not None),
        "client_train_seconds": sum(c["train_seconds"] for c in clients),
        "local_epochs": summary["recipe"]["training"].get("num_train_epochs"),
        "local_max_steps": summary["recipe"]["training"].get("max_steps"),
        "client_samples": summary["client_samples"],
        "client_ranks": summary["client_ranks"],
    }


def run_overrides(spec: RunSpec, *, base_dir: Path, split_dir: Path, run_dir: Path, extra_overrides: tuple[str, ...] = ()) -> list[str]:
    return [
        f"model.name_or_path={spec.base_reference(base_dir)}",
        f"data.source={split_dir}",
        f"federation.seed={spec.seed}",
        f"output_dir={run_dir}",
        *([] if spec.setting == "centralised" else [f"federation.method={spec.federation_method}"]),
        *([f"federation.threshold={spec.threshold}"] if spec.threshold is not None else []),
        *([SECURE_OVERRIDE] if spec.secure else []),
        *spec.overrides,
        *(o for o in extra_overrides if spec.setting != "centralised" or o.split("=", 1)[0].strip() not in FEDERATION_ONLY),
    ]


def measure_run(spec: RunSpec, run_dir: Path, overrides: list[str], *, base_dir: Path, client_records: list[list[dict]],
                run_seconds: float, first_round_from: Path | None) -> dict:
    """A finished run's numbers, plus its global adapter's loss on every client's held-out slice."""
    from florist_hf.recipe import load_recipe

    recipe = load_recipe(spec.recipe_file, overrides)
    started = time.perf_counter()
    losses = client_losses(base_dir, run_dir / "global_adapter", recipe, client_records, run_dir / "eval_work")
    eval_seconds = time.perf_counter() - started
    shutil.rmtree(run_dir / "work", ignore_errors=True)
    return {
        "setting": spec.setting, "method": spec.method, "label": spec.label, "threshold": spec.threshold,
        "seed": spec.seed, "run_dir": str(run_dir), "overrides": overrides,
        "first_round_from": None if first_round_from is None else str(first_round_from),
        **summarize_metrics(run_dir),
        "client_eval_loss": losses,
        "client_eval_loss_mean": statistics.fmean(losses),
        "run_seconds": run_seconds, "client_eval_seconds": eval_seconds,
    }


def run_one(spec: RunSpec, *, base_dir: Path, split_dir: Path, runs_root: Path, client_records: list[list[dict]],
            done: dict[str, Path], share_first_round: bool = True, extra_overrides: tuple[str, ...] = ()) -> dict:
    """Run ``spec`` with the real runner (reusing an earlier identical round 1 when allowed) and measure it."""
    run_dir = runs_root / spec.name
    overrides = run_overrides(spec, base_dir=base_dir, split_dir=split_dir, run_dir=run_dir, extra_overrides=extra_overrides)
    shutil.rmtree(run_dir, ignore_errors=True)  # every benchmark run starts clean
    donor = first_round_donor(spec, done) if share_first_round else None
    if donor is not None:
        shutil.copytree(donor / "rounds" / "1" / "clients", run_dir / "rounds" / "1" / "clients")
    started = time.perf_counter()
    florist_run(spec.recipe_file, overrides, run_dir / "console.log")
    record = measure_run(spec, run_dir, overrides, base_dir=base_dir, client_records=client_records,
                         run_seconds=time.perf_counter() - started, first_round_from=donor)
    done[spec.name] = run_dir
    return record


#: FLoRIST-O and FLoRIST-E as `florist-hf sweep` picks them, by the branches' test loss.
VARIANTS = {"optimal": ("florist-o", "FLoRIST-O"), "efficient": ("florist-e", "FLoRIST-E")}


def run_sweep_group(specs: list[RunSpec], *, base_dir: Path, split_dir: Path, runs_root: Path,
                    client_records: list[list[dict]], tolerance: float, extra_overrides: tuple[str, ...] = ()) -> list[dict]:
    """FLoRA and every FLoRIST τ of one setting and seed through `florist-hf sweep` (round 1 trained
    once for all of them), each branch measured as a run, plus FLoRIST-O and FLoRIST-E as the sweep
    chose them (records copied from the chosen branch, with its τ as ``chosen_threshold``)."""
    florist = [spec for spec in specs if spec.method == "florist"]
    first = florist[0]
    sweep_dir = runs_root / first.setting / "sweep" / f"seed_{first.seed}"
    overrides = [
        override for override in run_overrides(first, base_dir=base_dir, split_dir=split_dir, run_dir=sweep_dir,
                                                extra_overrides=extra_overrides)
        if not override.startswith(("federation.threshold=", "federation.method="))
    ]
    thresholds = ",".join(f"{spec.threshold:g}" for spec in florist)
    command = ("sweep", "--thresholds", thresholds, "--tolerance", str(tolerance),
               *(("--baselines", "flora") if any(spec.method == "flora" for spec in specs) else ()))
    shutil.rmtree(sweep_dir, ignore_errors=True)  # every benchmark run starts clean
    started = time.perf_counter()
    florist_run(first.recipe_file, overrides, sweep_dir / "console.log", command)
    sweep_seconds = time.perf_counter() - started
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    records = {}
    for spec in specs:
        branch = "flora" if spec.method == "flora" else f"tau_{spec.threshold:g}"
        run_overrides_ = [*overrides[:3], f"output_dir={sweep_dir / branch}", f"federation.method={spec.method}",
                          *([f"federation.threshold={spec.threshold}"] if spec.threshold is not None else []), *overrides[4:]]
        records[branch] = measure_run(
            spec, sweep_dir / branch, run_overrides_, base_dir=base_dir, client_records=client_records,
            run_seconds=sweep_seconds / len(specs),
            first_round_from=None if branch == sweep["rows"][0]["branch"] else sweep_dir / sweep["rows"][0]["branch"],
        )
        records[branch]["name"] = spec.name
    out = list(records.values())
    for pick, (method, label) in VARIANTS.items():
        chosen = dict(records[sweep["branches"][pick]])
        chosen.update(method=method, label=label, threshold=None, chosen_threshold=sweep[pick],
                      name=f"{first.setting}/{method}/seed_{first.seed}", sweep_tolerance=sweep["tolerance"])
        out.append(chosen)
    return out
