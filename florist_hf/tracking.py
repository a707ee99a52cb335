"""Experiment tracking for a whole federation through transformers' own integration callbacks
(TensorBoard, Weights & Biases, Trackio, MLflow, ...): one tracker run per federation, every
client's training curve and every round's server metrics on one monotone step.

The step is the federation's optimizer-step count: client k of round t logs at the steps of all
the clients trained before it plus its own, so curves never restart at 0; a round's server
metrics are logged at the step where the round ended. A resumed run starts from the steps that
``metrics.jsonl`` already holds.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback

from florist_hf.errors import FloristError


class FederationTracker:
    """The integration callbacks of ``report_to``, driven as one long training run."""

    def __init__(self, report_to: list[str], *, output_dir: Path, run_name: str, logging_dir: Path | None = None,
                 start_step: int = 0, config: dict | None = None):
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        try:
            classes = get_reporting_integration_callbacks(list(report_to))
        except (ValueError, RuntimeError, ImportError) as error:
            raise FloristError(f"tracking.report_to: {str(error).splitlines()[0]}") from None
        self.args = TrainingArguments(output_dir=str(output_dir), report_to=list(report_to), run_name=run_name,
                                      logging_steps=1, disable_tqdm=True)
        self.state = TrainerState(global_step=start_step)
        self.control = TrainerControl()
        self.callbacks = []
        for callback_class in classes:
            try:
                callback = callback_class()
            except (RuntimeError, ValueError, ImportError) as error:  # the integration's package is not installed
                raise FloristError(f"tracking.report_to: {str(error).splitlines()[0]}") from None
            if hasattr(callback, "logging_dir") and getattr(callback, "logging_dir", None) is None and logging_dir:
                callback.logging_dir = str(logging_dir)  # TensorBoard: the run's own folder
            self.callbacks.append(callback)
        #: steps of the clients that finished so far: the base of the next client's curve
        self.step = start_step
        for callback in self.callbacks:
            callback.on_train_begin(self.args, self.state, self.control)
        if config:
            self.log({f"recipe/{key}": value for key, value in config.items()}, step=start_step)

    def log(self, metrics: dict, *, step: int) -> None:
        """Log numeric ``metrics`` at ``step`` to every tracker."""
        logs = {key: float(value) for key, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        if not logs:
            return
        self.state.global_step = step
        for callback in self.callbacks:
            callback.on_log(self.args, self.state, self.control, logs=logs)

    def log_image(self, name: str, image_file: Path, *, step: int) -> None:
        """A figure (PNG) where the tracker takes images: TensorBoard and Weights & Biases."""
        for callback in self.callbacks:
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                import numpy as np
                from PIL import Image

                writer.add_image(name, np.asarray(Image.open(image_file).convert("RGB")), step, dataformats="HWC")
                writer.flush()
            elif type(callback).__name__ == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
                # Its callback logs without a step (W&B's own counter) and keys curves on train/global_step;
                # an explicit step= behind that counter would be dropped.
                callback._wandb.log({name: callback._wandb.Image(str(image_file)), "train/global_step": step})

    def log_client(self, client_id: int, round_index: int, info: dict) -> None:
        """A finished client's line (its client.json): its steps move the federation's step on."""
        self.step += info.get("steps") or 0
        prefix = f"client_{client_id}"
        self.log({f"{prefix}/train_loss": info.get("loss"), f"{prefix}/train_seconds": info.get("train_seconds"),
                  f"{prefix}/round": round_index, **({f"{prefix}/epsilon": info["epsilon"]} if "epsilon" in info else {})},
                 step=self.step)

    def log_round(self, record: dict, sidecar_file: Path, plots_dir: Path, *, images: bool = True, console=None) -> None:
        """A round's server metrics (its line in metrics.jsonl) and, where ``images``, its rank heatmap
        and energy curves drawn from its sidecar into ``plots_dir``."""
        round_index, step = record["round"], self.step
        metrics = {f"server/{key}": record[key] for key in (
            "total_selected_rank", "rank_min", "rank_median", "rank_max", "eff_x1e4", "uplink_bytes_total",
            "downlink_bytes_total", "server_seconds")}
        metrics["server/round"] = round_index
        if "heldout_loss" in record:
            metrics["eval_heldout_loss"] = record["heldout_loss"]
        if record.get("central_epsilon") is not None:
            metrics["server/central_epsilon"] = record["central_epsilon"]
        self.log(metrics, step=step)
        if not images:
            return
        try:
            self._log_round_images(round_index, sidecar_file, plots_dir, step)
        except FloristError as error:  # a module layout the plots do not know: the scalars are logged all the same
            if console is not None:
                console.print(f"[yellow]tracking: no rank images for round {round_index} ({error})[/]")

    def _log_round_images(self, round_index: int, sidecar_file: Path, plots_dir: Path, step: int) -> None:
        import json

        from florist_hf.report import plot_energy, plot_selected_ranks, selected_ranks

        sidecar = json.loads(sidecar_file.read_text())
        plots_dir.mkdir(parents=True, exist_ok=True)
        heatmap = plot_selected_ranks(selected_ranks(sidecar), sidecar_file, plots_dir / f"ranks_{round_index}.png",
                                      title=f"Selected rank, round {round_index}")
        self.log_image("server/selected_ranks", heatmap, step=step)
        if any(module.get("singular_values") for module in sidecar["modules"].values()):
            curves = plot_energy(sidecar, sidecar.get("threshold"), sidecar_file, plots_dir / f"energy_{round_index}.png",
                                 title=f"Energy, round {round_index}")
            self.log_image("server/energy", curves, step=step)

    def client_relay(self, client_id: int, round_index: int) -> TrainerCallback:
        """A callback for client ``client_id``'s Trainer in ``round_index`` that forwards its logs."""
        return ClientCurveRelay(self, client_id, round_index)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.on_train_end(self.args, self.state, self.control)
            writer = getattr(callback, "tb_writer", None)
            if writer is not None:
                writer.close()


class ClientCurveRelay(TrainerCallback):
    """Forwards a client Trainer's logged loss, learning rate and gradient norm to the
    federation's tracker as ``client_<k>/<name>``, on the federation's step."""

    def __init__(self, tracker: FederationTracker, client_id: int, round_index: int):
        self.tracker = tracker
        self.prefix = f"client_{client_id}"
        self.round_index = round_index

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = {f"{self.prefix}/{key}": value for key, value in logs.items() if key in ("loss", "learning_rate", "grad_norm")}
        if metrics:
            self.tracker.log({**metrics, f"{self.prefix}/round": self.round_index}, step=self.tracker.step + state.global_step)
