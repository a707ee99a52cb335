"""Flower: the ServerApp + ClientApp reproduce ``florist-hf run``, in simulation and in deployment."""

import dataclasses
import datetime
import ipaddress
import math
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr", reason="the flower extra is not installed")

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

import helpers
from helpers import quiet_console

from florist_hf.adapters import read_adapter
from florist_hf.recipe import load_recipe
from florist_hf.rundir import RunPaths
from florist_hf.runner import run_federation

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
def flower_recipe(path: Path, *, method: str, ranks, rounds: int, threshold: float = 0.9, **sections) -> Path:
    """`helpers.write_recipe` at ``path``, with 256 byte tokens (the ~170-byte prompt and a response,
    which the held-out loss scores) and one held-out record per label."""
    return helpers.write_recipe(path.parent, file_name=path.name, method=method, ranks=ranks, rounds=rounds,
                                threshold=threshold, name=f"flower-{method}", output_dir="runs/flower-test",
                                data={"cutoff_len": 256, "holdout_per_label": 1}, **sections)


def reference_run(recipe_path: Path, out_dir: Path) -> Path:
    return run_federation(load_recipe(recipe_path, [f"output_dir={out_dir}"]), console=quiet_console())


def grid_run(recipe_path: Path, tmp_path: Path, nodes: int = 3) -> Path:
    """The recipe over Flower on an in-process grid of ``nodes`` SuperNodes (kept under tmp_path/nodes),
    its run directory tmp_path/flower."""
    from florist_hf.flower import make_client_app, run_flower_federation

    grid = LocalGrid(make_client_app(), nodes, tmp_path / "nodes")
    return run_flower_federation(grid, load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"]),
                                 console=quiet_console())


def assert_same_adapter(flower_dir: Path, reference_dir: Path) -> None:
    flower, reference = read_adapter(flower_dir), read_adapter(reference_dir)
    assert flower.modules.keys() == reference.modules.keys()
    for name, module in reference.modules.items():
        other = flower.modules[name]
        assert other.rank == module.rank, name
        assert other.scale == pytest.approx(module.scale)
        torch.testing.assert_close(other.lora_a, module.lora_a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.lora_b, module.lora_b, rtol=1e-5, atol=1e-6)


def round_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "round"]


# --- unit: the wire format ---------------------------------------------------------------------


def test_adapter_records_round_trip_keep_peft_names_dtypes_and_config(tmp_path):
    from safetensors.torch import save_file

    from florist_hf.flower.records import adapter_to_records, write_adapter_records

    source = tmp_path / "source"
    source.mkdir()
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{name}.lora_A.weight": torch.randn(2, 8, dtype=torch.bfloat16),
        f"{name}.lora_B.weight": torch.randn(8, 2, dtype=torch.bfloat16),
    }
    save_file(tensors, source / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (source / "adapter_config.json").write_text(json.dumps(config))

    arrays, record_config = adapter_to_records(source)
    assert set(arrays) == set(tensors)  # PEFT key names on the wire
    out = write_adapter_records(tmp_path / "copy", arrays, record_config, client_info={"num_samples": 3})
    adapter = read_adapter(out)
    assert adapter.num_samples == 3 and adapter.dtype == torch.bfloat16
    assert adapter.modules[name].scale == 2.0
    assert torch.equal(adapter.modules[name].lora_a, tensors[f"{name}.lora_A.weight"])
    assert json.loads((out / "adapter_config.json").read_text()) == config


def test_the_shipped_flower_app_is_a_valid_flower_app_with_a_valid_recipe():
    import tomli
    from flwr.common.config import validate_config

    from florist_hf.flower.server_app import split_overrides

    app_dir = REPO / "recipes" / "flower"
    config = tomli.loads((app_dir / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(config, check_module=True, project_dir=app_dir)
    assert valid, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    recipe = load_recipe(app_dir / run_config["recipe"], split_overrides("federation.rounds=1; lora.ranks=[2, 2, 2]"))
    assert recipe.federation.rounds == 1 and recipe.lora.ranks == [2, 2, 2]


# --- simulation: the same global adapter as florist-hf run ---------------------------------------


# Session-scoped: the slow simulation test runs first and the fast tests that share it later.
@pytest.fixture(scope="session")
def florist_case(tmp_path_factory):
    """A 3-client, 2-round FLoRIST recipe (τ = 0.9, ranks 4/2/2) and its ``florist-hf run`` result."""
    root = tmp_path_factory.mktemp("florist_case")
    recipe_path = flower_recipe(root / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=2, threshold=0.9)
    return recipe_path, reference_run(recipe_path, root / "reference")


def assert_same_run(run_dir: Path, reference: Path, rounds=(1, 2), clients=range(3)) -> None:
    assert_same_adapter(run_dir / "global_adapter", reference / "global_adapter")
    for round_index in rounds:  # each round's global, and the client adapters behind it
        assert_same_adapter(RunPaths(run_dir).global_dir(round_index), RunPaths(reference).global_dir(round_index))
        for client in clients:
            assert_same_adapter(RunPaths(run_dir).client_dir(round_index, client),
                                RunPaths(reference).client_dir(round_index, client))


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None,
                    reason='Flower simulation needs Ray: pip install "flwr[simulation]>=1.41,<1.42"')
def test_simulation_of_three_clients_gives_the_global_adapter_of_florist_hf_run(tmp_path, florist_case):
    from florist_hf.flower import run_simulation

    recipe_path, reference = florist_case
    run_dir = run_simulation(recipe_path, output_dir=tmp_path / "flower", work_dir=tmp_path / "clients",
                             console=quiet_console())

    assert_same_run(run_dir, reference)
    flower_rounds, reference_rounds = round_records(run_dir), round_records(reference)
    for key in ("total_selected_rank", "uplink_bytes_total", "downlink_bytes_total", "clients"):
        assert [r[key] for r in flower_rounds] == [r[key] for r in reference_rounds]
    for flower_round, reference_round in zip(flower_rounds, reference_rounds):
        assert flower_round["heldout_loss"] == pytest.approx(reference_round["heldout_loss"], rel=1e-5)
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["client_samples"] == [16, 16, 16]
    assert sorted(summary["runtime"]["flower"]["nodes"]) == ["0", "1", "2"]
    aggregation = json.loads((run_dir / "global_adapter" / "aggregation.json").read_text())
    assert aggregation["method"] == "florist" and aggregation["threshold"] == 0.9


# --- the ServerApp's round loop over an in-process grid: recovery and resume ---------------------


class LocalGrid(Grid):
    """Hands every message straight to a ClientApp in this process: no Ray, no network."""

    def __init__(self, client_app, num_nodes: int, work_dir: Path, before_delivery=None):
        self.client_app = client_app
        self.before_delivery = before_delivery
        self.deliveries: list[tuple[str, int, str]] = []
        self.contexts = {
            100 + k: Context(
                run_id=7, node_id=100 + k, state=RecordDict(), run_config={},
                node_config={"partition-id": k, "num-partitions": num_nodes, "work-dir": str(work_dir)},
            )
            for k in range(num_nodes)
        }
        self._run = None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Delivers at once; the replies wait in ``outbox`` for ``pull_messages``."""
        self.outbox = getattr(self, "outbox", {})
        message_ids = []
        for message in messages:
            message_id = f"message-{len(self.deliveries)}"
            message.metadata.__dict__["_message_id"] = message_id  # what a SuperLink assigns on push
            self.outbox[message_id] = self._deliver(message)
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids):
        """One reply per pull, the most recently pushed first: replies arrive out of order."""
        ready = [message_id for message_id in message_ids if message_id in self.outbox]
        return [self.outbox.pop(max(ready, key=lambda message_id: int(message_id.split("-")[1])))] if ready else []

    def _deliver(self, message):
        context = self.contexts[message.metadata.dst_node_id]
        if self.before_delivery is not None:
            self.before_delivery(message, context)
        self.deliveries.append((message.metadata.message_type, context.node_config["partition-id"], message.metadata.group_id))
        try:
            return self.client_app(message, context)
        except Exception as error:  # noqa: BLE001 - what a SuperNode replies when its ClientApp raises
            return Message(Error(code=0, reason=f"{type(error)}:<'{error}'>"), reply_to=message)

    def send_and_receive(self, messages, *, timeout=None):
        return [self._deliver(message) for message in messages]


@pytest.fixture
def server_identity():
    """Flower stamps new messages with the process's task identity (a SuperLink sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_a_node_that_lost_its_global_updates_gets_them_again_and_a_killed_run_resumes(tmp_path, florist_case, server_identity):
    from florist_hf.flower import make_client_app, run_flower_federation

    recipe_path, reference = florist_case
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"])
    nodes = tmp_path / "nodes"

    lost = []

    def client_1_loses_round_1(message, context):
        """As if the server had sent round 1's update before and client 1's work dir was reset since."""
        where = (message.metadata.message_type, message.metadata.group_id, context.node_config["partition-id"])
        if where == ("train", "2", 1) and not lost:
            del message.content.array_records["global"]
            del message.content.config_records["global.config"]
            shutil.rmtree(nodes / "run_7" / "client_1" / "globals", ignore_errors=True)
            lost.append(True)

    grid = LocalGrid(make_client_app(), 3, nodes, client_1_loses_round_1)
    run_dir = run_flower_federation(grid, recipe, console=quiet_console())
    round_2 = [delivery for delivery in grid.deliveries if delivery[0] == "train" and delivery[2] == "2"]
    assert sorted(delivery[1] for delivery in round_2) == [0, 1, 1, 2]  # client 1 asked again, with round 1's update
    assert_same_run(run_dir, reference)

    # as if killed right after round 1: the resumed run trains round 2 only, on fresh nodes
    shutil.rmtree(RunPaths(run_dir).round_dir(2))
    shutil.rmtree(run_dir / "global_adapter")
    (run_dir / "run.json").unlink()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["round"] == 1))
    grid = LocalGrid(make_client_app(), 3, tmp_path / "fresh_nodes")
    run_flower_federation(grid, recipe, console=quiet_console())
    assert {delivery[2] for delivery in grid.deliveries if delivery[0] == "train"} == {"2"}
    assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "run.json").read_text())["rounds_completed"] == 2


def assert_same_update(run_dir: Path, reference_dir: Path, rtol: float) -> None:
    """Same ΔW = B·A·scale per module (factors may differ by the SVD's sign and basis freedom)."""
    run, reference = read_adapter(run_dir), read_adapter(reference_dir)
    assert run.modules.keys() == reference.modules.keys()
    for name, module in reference.modules.items():
        other = run.modules[name]
        expected = module.scale * module.lora_b.double() @ module.lora_a.double()
        got = other.scale * other.lora_b.double() @ other.lora_a.double()
        assert float((got - expected).norm() / expected.norm()) < rtol, name


@pytest.mark.parametrize("method, ranks", [("fedsvd", (4, 2, 2)), ("fedex", (4, 4, 4))])
def test_the_2025_baselines_on_flower_give_florist_hf_runs_result(tmp_path, server_identity, method, ranks):
    """FedSVD's clients freeze the A the server re-factorised (sent in the init record); FedEx-LoRA's
    continue the averaged factors on top of the earlier residuals (the node's global state). Over
    Flower both runs equal `florist-hf run`."""
    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method=method, ranks=ranks, rounds=2)
    reference = reference_run(recipe_path, tmp_path / "reference")
    run_dir = grid_run(recipe_path, tmp_path)
    assert_same_run(run_dir, reference)
    flower_rounds, reference_rounds = round_records(run_dir), round_records(reference)
    for key in ("uplink_bytes_total", "downlink_bytes_total"):
        assert [r[key] for r in flower_rounds] == [r[key] for r in reference_rounds]


SECURE = {"secure_aggregation": {"enabled": True}}


@pytest.fixture(scope="session")
def secure_florist_case(tmp_path_factory):
    """`florist_case`'s recipe under secure aggregation, and its ``florist-hf run`` result."""
    root = tmp_path_factory.mktemp("secure_florist_case")
    recipe_path = flower_recipe(root / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=2, federation=SECURE)
    return recipe_path, reference_run(recipe_path, root / "reference")


def drop_out(stage: str, round_sum: str, partitions):
    """A LocalGrid hook: the nodes of ``partitions`` lose their secure-aggregation state (as a restarted
    node would) just before ``stage`` of the sum ``round_sum`` ("<round>.<first|second>"), so they fail it."""
    def hook(message, context):
        if (message.metadata.message_type == "query.florist_secagg" and message.metadata.group_id == round_sum
                and message.content["config"]["stage"] == stage and context.node_config["partition-id"] in partitions):
            del context.state["florist-secagg"]
    return hook


def client_contributions(reference: Path, round_index: int, seed: int) -> list[dict]:
    """What each client of a secure reference round puts into the first and the second sum, computed
    from its adapter in the clear (the second on the plain Q of the first sum)."""
    from florist_hf.aggregation import sketch
    from florist_hf.secure.server_step import SumTask, plan_modules

    adapters = [read_adapter(RunPaths(reference).client_dir(round_index, k)) for k in range(3)]
    total = sum(adapter.num_samples for adapter in adapters)
    plans = plan_modules(adapters[0].module_shapes, [{n: m.rank for n, m in a.modules.items()} for a in adapters], None)
    task = SumTask("first", tuple(plans), seed, tuple(a.num_samples / total for a in adapters), ("sketch_sums",), False)
    first = [task.compute(k, adapter.modules) for k, adapter in enumerate(adapters)]
    bases = {plan.name: sketch.range_basis(torch.from_numpy(sum(arrays[f"{plan.name}/range"] for arrays in first)))
             for plan in plans}
    second = dataclasses.replace(task, kind="second", bases=bases)
    return [{**first[k], **second.compute(k, adapter.modules)} for k, adapter in enumerate(adapters)]


def test_secure_aggregation_over_flower_equals_florist_hf_run_and_the_server_receives_only_masked_arrays(
    tmp_path, florist_case, secure_florist_case, server_identity
):
    """FLoRIST under SecAgg+ on the in-process grid, 3 clients × 2 rounds, client 2's node failing
    round 1's first sum after it masked (recovered from the others' shares): every round's global
    equals `florist-hf run` with secure aggregation, and the plain run's within the encoding; every
    reply the ServerApp received holds no array but masked uint64 words that equal, and correlate
    with, no client's contribution to either sum."""
    import numpy as np

    from florist_hf.flower import make_client_app, run_flower_federation

    _, plain = florist_case
    recipe_path, reference = secure_florist_case
    received = []
    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes", drop_out("unmask", "1.first", {2}))
    real_deliver = grid._deliver
    grid._deliver = lambda message: received.append(real_deliver(message)) or received[-1]
    run_dir = run_flower_federation(grid, load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"]),
                                    console=quiet_console())

    for t in (1, 2):
        ours, secure_run = RunPaths(run_dir).global_dir(t), RunPaths(reference).global_dir(t)
        assert_same_adapter(ours, secure_run)
        assert_same_update(ours, RunPaths(plain).global_dir(t), rtol=1e-4)
        sidecar = json.loads((ours / "aggregation.json").read_text())
        assert sidecar["secure_aggregation"]["sums"] == 2
        assert not list(RunPaths(run_dir).client_dir(t, 0).glob("*.safetensors"))  # the server kept layouts only
    assert_same_adapter(run_dir / "global_adapter", reference / "global_adapter")
    ours, theirs = round_records(run_dir), round_records(reference)
    for key in ("downlink_bytes_total", "plain_uplink_bytes_total", "secure_aggregation"):
        assert [r[key] for r in ours] == [r[key] for r in theirs]
    # The same traffic, counted message by message, but for the shares client 2 did not reveal in round 1
    assert ours[1]["uplink_bytes_total"] == theirs[1]["uplink_bytes_total"] > ours[0]["uplink_bytes_total"]

    trains = [reply for reply in received if reply.metadata.message_type == "train"]
    assert len(trains) == 6 and all(not reply.content.array_records for reply in trains)
    stages = [reply for reply in received if reply.metadata.message_type == "query.florist_secagg"]
    assert sum(reply.has_error() for reply in stages) == 1  # client 2 at round 1's first unmask
    checked, expected = 0, 0
    for t in (1, 2):
        contributions = client_contributions(reference, t, 42 * 1_000_003 + t)
        expected += 3 * len(contributions[0]) * 3  # 3 clients' masked replies × their arrays × 3 contributions
        for reply in (r for r in stages if r.metadata.group_id.startswith(f"{t}.") and not r.has_error()):
            for record in reply.content.array_records.values():
                for name, array in record.items():
                    masked = array.numpy()
                    assert masked.dtype == np.uint64
                    signed = masked.view(np.int64).astype(np.float64).ravel()
                    for contribution in (arrays[name] for arrays in contributions):
                        assert not np.array_equal(masked.view(np.int64) / 2.0**32, contribution)
                        assert abs(np.corrcoef(signed, contribution.ravel())[0, 1]) < 6 / np.sqrt(signed.size)
                        checked += 1
    assert checked == expected > 0


def test_a_secure_flower_run_killed_between_the_sums_resumes_from_the_adapters_the_nodes_kept(
    tmp_path, secure_florist_case, server_identity
):
    """The ServerApp stops as round 2's second sum begins; a new ServerApp (new node state: the
    secrets of the stopped sums are gone) trains nothing again: the nodes still hold round 2's
    adapters, both sums run anew, and every global equals `florist-hf run` with secure aggregation."""
    from florist_hf.flower import make_client_app, run_flower_federation

    recipe_path, reference = secure_florist_case
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"])

    def stop_at_round_2s_second_sum(message, context):
        if message.metadata.message_type == "query.florist_secagg" and message.metadata.group_id == "2.second":
            raise KeyboardInterrupt

    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes", stop_at_round_2s_second_sum)
    with pytest.raises(KeyboardInterrupt):
        run_flower_federation(grid, recipe, console=quiet_console())
    assert RunPaths(tmp_path / "flower").global_dir(1).exists() and not RunPaths(tmp_path / "flower").global_dir(2).exists()
    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes")
    run_dir = run_flower_federation(grid, recipe, console=quiet_console())
    assert not [delivery for delivery in grid.deliveries if delivery[0] == "train"]
    assert {delivery[2] for delivery in grid.deliveries if delivery[0] == "query.florist_secagg"} == {"2.first", "2.second"}
    for t in (1, 2):
        assert_same_adapter(RunPaths(run_dir).global_dir(t), RunPaths(reference).global_dir(t))
    assert_same_adapter(run_dir / "global_adapter", reference / "global_adapter")


def test_fedit_clients_over_flower_bound_their_own_updates_before_masking_as_in_florist_hf_run(tmp_path, server_identity):
    """clip_update_norm under secure aggregation on Flower: each node bounds the change of its factors
    since the global it continued (kept on the node for the round's sums) before masking; the run
    equals `florist-hf run`'s, and the bound binds every client of round 2."""
    from florist_hf.aggregation.bounding import update_norm

    clip = 1e-3
    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="fedit", ranks=(4, 2, 2), rounds=2,
                                federation={**SECURE, "clip_update_norm": clip})
    reference = reference_run(recipe_path, tmp_path / "reference")
    run_dir = grid_run(recipe_path, tmp_path)
    for t in (1, 2):
        assert_same_adapter(RunPaths(run_dir).global_dir(t), RunPaths(reference).global_dir(t))
    continued = read_adapter(RunPaths(reference).global_dir(1)).modules
    for k in range(3):
        client = read_adapter(RunPaths(reference).client_dir(2, k)).modules
        assert update_norm(client, continued) > clip
    sidecar = json.loads((RunPaths(run_dir).global_dir(2) / "aggregation.json").read_text())
    assert sidecar["bounding"]["clip_update_norm"] == clip
    kept = sorted(path.name for path in (tmp_path / "nodes" / "run_7" / "client_0").glob("*/*"))
    assert "1" not in kept and "round_1" not in kept  # round 1's adapter and global left the node in round 2


def test_florist_with_central_dp_over_flower_equals_florist_hf_run(tmp_path, server_identity):
    """Central DP on FLoRIST's sketch sums over Flower: the nodes sketch with the orthonormal Ω the task
    names, the server noises both sums from its run directory's secret; with the same secret the run
    equals `florist-hf run`'s, and the sidecar records the two noised sums."""
    pytest.importorskip("opacus")

    federation = {**SECURE, "clip_update_norm": 1e-3, "central_dp": {"noise_multiplier": 0.5, "delta": 1e-3}}
    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=2, federation=federation)
    for run in ("reference", "flower"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "privacy-seed").write_text("5a" * 32)  # one secret: the same noise on both sides
    reference = reference_run(recipe_path, tmp_path / "reference")
    run_dir = grid_run(recipe_path, tmp_path)
    for t in (1, 2):
        assert_same_adapter(RunPaths(run_dir).global_dir(t), RunPaths(reference).global_dir(t))
        sidecar = json.loads((RunPaths(run_dir).global_dir(t) / "aggregation.json").read_text())
        assert sidecar["bounding"]["central_dp"]["noised_sums"] == 2


def test_a_secure_flower_sum_holds_one_masked_reply_at_a_time(tmp_path, secure_florist_case, server_identity):
    """The server pulls the masked stage's replies one by one and lets each go once it is added, so it
    holds its running sum and one client's masked arrays at most (Flower's send_and_receive would hand
    it every client's at once): no earlier masked reply is alive when the next is pulled."""
    import weakref

    from florist_hf.flower import make_client_app, run_flower_federation

    class Watching(LocalGrid):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.masked, self.alive_at_pull = [], []

        def pull_messages(self, message_ids):
            self.alive_at_pull.append(sum(ref() is not None for ref in self.masked))
            pulled = super().pull_messages(message_ids)
            self.masked += [weakref.ref(reply) for reply in pulled if not reply.has_error() and "masked" in reply.content]
            return pulled

    recipe_path, reference = secure_florist_case
    grid = Watching(make_client_app(), 3, tmp_path / "nodes")
    run_dir = run_flower_federation(grid, load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"]),
                                    console=quiet_console())
    assert len(grid.masked) == 2 * 2 * 3  # rounds × sums × clients, every one pulled
    assert max(grid.alive_at_pull) == 0
    for t in (1, 2):
        assert_same_adapter(RunPaths(run_dir).global_dir(t), RunPaths(reference).global_dir(t))


def test_a_secure_flower_round_with_fewer_than_t_clients_fails_in_one_line_and_writes_no_global(
    tmp_path, server_identity
):
    from florist_hf.flower import make_client_app, run_flower_federation
    from florist_hf.secure import SecureAggregationError

    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="fedit", ranks=(2, 2, 2), rounds=1, federation=SECURE)
    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes", drop_out("masked", "1.first", {1, 2}))
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"])
    with pytest.raises(SecureAggregationError, match=r"failed at its masked stage: 1 of 3 clients replied and the "
                                                     r"threshold is 2; nothing was aggregated") as failure:
        run_flower_federation(grid, recipe, console=quiet_console())
    assert len(str(failure.value).splitlines()) == 1
    assert not RunPaths(tmp_path / "flower").global_dir(1).exists()
    assert not (tmp_path / "flower" / "global_adapter").exists()


def test_a_node_that_sat_out_rounds_gets_one_compacted_catch_up_and_the_run_equals_florist_hf_run(tmp_path, server_identity):
    """1 of 3 clients per round for 7 rounds (clients 2, 2, 1, 2, 2, 1, 0): a node that missed one
    round gets that round's global adapter, one that missed several gets their sum compacted into
    one update, a node that holds nothing gets the whole state; the global model is run's."""
    from florist_hf.flower import make_client_app, run_flower_federation

    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 4, 4), rounds=7)
    settings = yaml.safe_load(recipe_path.read_text())
    settings["federation"].update(clients_per_round=1, eval_heldout_loss=False)
    recipe_path.write_text(yaml.safe_dump(settings))
    reference = reference_run(recipe_path, tmp_path / "reference")

    sent = []

    def record(message, context):
        if message.metadata.message_type == "train":
            config = message.content["config"]
            sent.append((int(message.metadata.group_id), context.node_config["partition-id"], config["sent-form"],
                         json.loads(config["sent-rounds"])))

    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes", record)
    run_dir = run_flower_federation(grid, load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"]),
                                    console=quiet_console())
    assert sent == [
        (1, 2, "none", []), (2, 2, "global", [1]), (3, 1, "global-state", [1, 2]), (4, 2, "catch-up", [2, 3]),
        (5, 2, "global", [4]), (6, 1, "catch-up", [3, 4, 5]), (7, 0, "global-state", [1, 2, 3, 4, 5, 6]),
    ]
    # Catch-ups are compacted by another route than the server's round-by-round fold: the same
    # update to fp32 round-off, on which the later clients trained.
    for round_index in range(1, 8):
        assert_same_update(RunPaths(run_dir).global_dir(round_index), RunPaths(reference).global_dir(round_index), rtol=1e-4)
    assert_same_update(run_dir / "global_adapter", reference / "global_adapter", rtol=1e-4)


def test_streaming_aggregation_folds_replies_as_they_arrive_and_equals_florist_hf_run(tmp_path, florist_case,
                                                                                      server_identity, monkeypatch):
    from florist_hf.flower import make_client_app, run_flower_federation
    from florist_hf.flower.nodes import ArrivingReplies

    monkeypatch.setattr(ArrivingReplies, "pull_interval", 0.0)
    recipe_path, reference = florist_case
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}", "federation.aggregation=streaming"])
    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes")
    run_dir = run_flower_federation(grid, recipe, console=quiet_console())

    for round_index in (1, 2):
        sidecar = json.loads((RunPaths(run_dir).global_dir(round_index) / "aggregation.json").read_text())
        # folded in the order the replies came: the last pushed first
        assert [client["name"] for client in sidecar["clients"]] == ["client_2", "client_1", "client_0"]
        assert sidecar["options"] == {"threshold": 0.9, "aggregation": "streaming", "tolerance": 0.0}
        assert all(module["streaming"]["discarded_energy"] < 1e-20 for module in sidecar["modules"].values())
        assert_same_update(RunPaths(run_dir).global_dir(round_index), RunPaths(reference).global_dir(round_index), 1e-5)
    assert_same_update(run_dir / "global_adapter", reference / "global_adapter", 1e-5)
    assert [r["total_selected_rank"] for r in round_records(run_dir)] == [r["total_selected_rank"] for r in round_records(reference)]


def test_a_streaming_round_leaves_out_a_client_whose_adapter_does_not_match_and_folds_the_others(
        tmp_path, server_identity, monkeypatch):
    from florist_hf.flower import make_client_app, protocol, run_flower_federation
    from florist_hf.flower.nodes import ArrivingReplies

    monkeypatch.setattr(ArrivingReplies, "pull_interval", 0.0)
    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=1)
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}", "federation.aggregation=streaming"])
    client_app = make_client_app()

    def client_1_drops_a_module(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == protocol.TRAIN and context.node_config["partition-id"] == 1:
            adapter = reply.content.array_records[protocol.ADAPTER]
            dropped = sorted(adapter)[0].split(".lora_")[0]
            for key in [key for key in adapter if key.startswith(dropped + ".lora_")]:
                del adapter[key]
        return reply

    run_dir = run_flower_federation(LocalGrid(client_1_drops_a_module, 3, tmp_path / "nodes"), recipe, console=quiet_console())
    sidecar = json.loads((RunPaths(run_dir).global_dir(1) / "aggregation.json").read_text())
    assert [client["name"] for client in sidecar["clients"]] == ["client_2", "client_0"]  # client 1 arrived second
    assert (RunPaths(run_dir).round_dir(1) / "clients" / "client_1.invalid").is_dir()  # kept for inspection


# --- deployment: a SuperLink and SuperNodes on loopback, driven by `flwr run` --------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _detached_children_of(pid: int) -> list[int]:
    """The SuperExec a SuperLink launched in its own session (it names the SuperLink's pid)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in argv and argv[argv.index(b"--parent-pid") + 1 : argv.index(b"--parent-pid") + 2] == [str(pid).encode()]:
            found.append(int(entry.name))
    return found


def _stop_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return


class Deployment:
    """Processes this test starts; every one is stopped in ``stop`` (a fixture finalizer)."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.log_files = []
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(root / "flwr_home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the process writes it; closed in stop()
        self.log_files.append(log)
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]], cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            for child in _detached_children_of(process.pid):
                _stop_group(child)
            _stop_group(process.pid)
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for log in self.log_files:
            log.close()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def deployment(tmp_path):
    root = tmp_path / "deployment"
    root.mkdir()
    running = Deployment(root)
    try:
        yield running
    finally:
        running.stop()


def wait_for_http(url: str, timeout: float, process: subprocess.Popen, ca: Path | None = None) -> None:
    """Until ``url`` answers (over HTTPS verified with the root certificate ``ca``, if given)."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the SuperLink exited at start"
        try:
            with opener.open(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def _write_private_key(path: Path, key, key_format: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, key_format, serialization.NoEncryption()))
    path.chmod(0o600)


def write_tls_certificates(pki: Path) -> None:
    """A self-signed CA ``pki/ca.pem`` and the SuperLink's certificate ``pki/server.pem`` (key
    ``server.key``) it signs, for IP 127.0.0.1 (where the SuperLink's own SuperExec connects) and localhost."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "florist-hf test CA")])

    def certificate(subject: x509.Name, key, *extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256())

    ca = certificate(
        ca_name, ca_key, (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True),
    )
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), server_key,
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    )
    (pki / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (pki / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private_key(pki / "server.key", server_key, serialization.PrivateFormat.PKCS8)


def write_node_key_pair(pki: Path, name: str) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384 -N "" -f <name>`` writes
    it: ``pki/<name>`` for ``flower-supernode --auth-supernode-private-key`` and ``pki/<name>.pub``
    (returned) for ``flwr supernode register``."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private_key(pki / name, key, serialization.PrivateFormat.OpenSSH)
    public = pki / f"{name}.pub"
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(openssh + b"\n")
    return public


def register_supernode(deployment, public_key: Path) -> int:
    """``flwr supernode register`` on the "loopback" connection; returns the node id the SuperLink gives the key."""
    result = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "loopback", "--format", "json"],
                            cwd=deployment.root, env=deployment.env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr + deployment.logs()
    return int(json.loads(result.stdout)["node-id"])


def start_supernode(deployment, name: str, port: int, pki: Path | None, node_config: str) -> subprocess.Popen:
    """SuperNode ``name`` of the SuperLink on 127.0.0.1:``port``: over TLS (``pki/ca.pem``) authenticated by
    its key ``pki/<name>``, or ``--insecure`` if ``pki`` is None."""
    security = (["--root-certificates", str(pki / "ca.pem"), "--auth-supernode-private-key", str(pki / name)]
                if pki else ["--insecure"])
    return deployment.start(name, "flower-supernode", *security, "--superlink", f"127.0.0.1:{port}",
                            "--port", str(free_port()), "--max-retries", "20", "--node-config", node_config)


@dataclass
class LoopbackFederation:
    port: int
    pki: Path | None  # certificates and node keys of a secure federation; None: --insecure
    supernodes: list[subprocess.Popen]
    node_ids: list[int]  # the ids the SuperLink registered the SuperNodes' keys under (secure only)


def start_loopback_federation(deployment, nodes: Path, num_nodes: int = 2, *, secure: bool = False) -> LoopbackFederation:
    """A SuperLink on loopback, ``num_nodes`` SuperNodes (partition k each, work dirs under ``nodes``) and a
    ``flwr`` CLI connection "loopback" to it. ``secure``: TLS with a CA made here, SuperNode authentication,
    and each SuperNode's key registered before it starts; else ``--insecure`` (the loopback shortcut)."""
    port, pki = free_port(), (deployment.root / "pki" if secure else None)
    ca = pki / "ca.pem" if pki else None
    if pki:
        pki.mkdir()
        write_tls_certificates(pki)
        security = ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(pki / "server.pem"),
                    "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth"]
    else:
        security = ["--insecure"]
    superlink = deployment.start("superlink", "flower-superlink", *security, "--host", "127.0.0.1", "--port", str(port))
    wait_for_http(f"{'https' if ca else 'http'}://127.0.0.1:{port}/health", 60, superlink, ca)
    home = Path(deployment.env["FLWR_HOME"])
    home.mkdir(exist_ok=True)
    tls = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n{tls}\n'
    )
    names = [f"supernode{client}" for client in range(num_nodes)]
    node_ids = [register_supernode(deployment, write_node_key_pair(pki, name)) for name in names] if pki else []
    supernodes = [
        start_supernode(deployment, name, port, pki, f"partition-id={client} num-partitions={num_nodes} work-dir='{nodes}'")
        for client, name in enumerate(names)
    ]
    return LoopbackFederation(port, pki, supernodes, node_ids)


@pytest.mark.slow
def test_a_deployment_over_tls_with_supernode_authentication_completes_a_round_and_refuses_an_unknown_key(
    tmp_path, deployment
):
    # The shipped Flower app (recipes/flower), with this test's recipe beside its pyproject.toml.
    app_dir = tmp_path / "app"
    shutil.copytree(REPO / "recipes" / "flower", app_dir)
    recipe_path = flower_recipe(app_dir / "test_recipe.yaml", method="fedit", ranks=(4, 2), rounds=1)
    federation = start_loopback_federation(deployment, tmp_path / "nodes", secure=True)
    write_node_key_pair(federation.pki, "stranger")  # a third SuperNode, its key never registered
    stranger = start_supernode(deployment, "stranger", federation.port, federation.pki,
                               f"partition-id=0 num-partitions=2 work-dir='{tmp_path / 'stranger'}'")
    out_dir = tmp_path / "flower_run"
    started = time.monotonic()
    flwr_run = deployment.start("flwr_run", "flwr", "run", str(app_dir), "loopback", "--stream", "--run-config",
                                f"recipe='{recipe_path.name}' output-dir='{out_dir}' node-timeout=120")

    try:  # the stranger is refused at once, while the round starts
        stranger.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a SuperNode with an unregistered key still runs after 30 s\n{deployment.logs()}")
    assert stranger.returncode != 0 and "Failed to activate SuperNode" in deployment.log("stranger"), deployment.logs()
    try:
        flwr_run.wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in 240 s\n{deployment.logs()}")
    assert flwr_run.returncode == 0, deployment.logs()
    while not (out_dir / "run.json").exists() and time.monotonic() < started + 240:  # --stream may end first
        time.sleep(1)
    assert (out_dir / "run.json").exists(), deployment.logs()

    summary = json.loads((out_dir / "run.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["method"] == "fedit"
    assert sorted(summary["runtime"]["flower"]["nodes"].values()) == sorted(federation.node_ids)  # the registered keys
    # FedIT continues from the shared round-0 init that travelled to every node: same result as run
    reference = reference_run(recipe_path, tmp_path / "reference")
    assert_same_adapter(out_dir / "global_adapter", reference / "global_adapter")


#: Two nodes' ClientApp answering a secure sum's key and share stages in a process where importing torch fails.
_LIGHT_STAGES = """
import sys
from types import SimpleNamespace

sys.modules["torch"] = None  # any import of torch now raises

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from florist_hf.flower import protocol
from florist_hf.flower.client_app import app
from florist_hf.flower.secure import reply_message, request_content
from florist_hf.secure.protocol import SecAggServer
from florist_hf.secure.settings import SecAggSettings

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
plan = SimpleNamespace(name="m", shape=(4, 4), max_rank=2, columns=4, exact_columns=4)
task = SimpleNamespace(kind="first", plans=(plan,), seed=1, weights=(0.5, 0.5), needs=("sketch_sums",), bases=None,
                       freezes_lora_a=False, clip=None, relative=False, rescale=1.0, unit_sketch=False)
contexts = {k: Context(run_id=7, node_id=100 + k, state=RecordDict(), run_config={},
                       node_config={"partition-id": k, "num-partitions": 2, "work-dir": sys.argv[1]}) for k in range(2)}
server = SecAggServer(range(2), SecAggSettings())


def exchange(stage, requests):
    for k, request in requests.items():
        message = Message(request_content(stage, request, k, 1, task), 100 + k, protocol.SECAGG, group_id="1.first")
        message.metadata.__dict__["_message_id"] = f"{stage}-{k}"  # what a SuperLink assigns on push
        reply = app(message, contexts[k])
        assert not reply.has_error(), reply.error
        yield reply_message(stage, reply.content, k)


keys = server.collect_keys(exchange("keys", {k: server.setup() for k in range(2)}))
routed = server.route_shares(exchange("shares", {k: keys for k in keys}))
assert sorted(routed) == [0, 1] and all(routed.values())
print("answered without torch")
"""


def test_a_secure_sums_key_and_share_stages_load_no_torch(tmp_path):
    """A SuperNode starts a fresh ClientApp process for every message: importing the ClientApp took 1.7 s here,
    torch 0.8 s of it, where a secure sum's key, share and unmask stages need the protocol alone (0.4 s). The
    ClientApp and its secure stages load torch only where a message needs it (training, a masked stage)."""
    script = tmp_path / "light_stages.py"
    script.write_text(_LIGHT_STAGES)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "nodes")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0 and "answered without torch" in done.stdout, done.stdout + done.stderr


@pytest.mark.slow
def test_a_deployment_over_tls_with_supernode_authentication_runs_secure_florist_as_florist_hf_run(tmp_path, deployment):
    """The shipped Flower app under SecAgg+: each stage of both secure sums is a message through the
    SuperLink to a SuperNode's ClientApp (a fresh process each, its secrets kept in the node's state);
    the global adapter equals `florist-hf run` with secure aggregation."""
    app_dir = tmp_path / "app"
    shutil.copytree(REPO / "recipes" / "flower", app_dir)
    recipe_path = flower_recipe(app_dir / "test_recipe.yaml", method="florist", ranks=(4, 2), rounds=1, federation=SECURE)
    start_loopback_federation(deployment, tmp_path / "nodes", secure=True)
    out_dir = tmp_path / "flower_run"
    started = time.monotonic()
    flwr_run = deployment.start("flwr_run", "flwr", "run", str(app_dir), "loopback", "--stream", "--run-config",
                                f"recipe='{recipe_path.name}' output-dir='{out_dir}' node-timeout=120")
    try:
        flwr_run.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish in 300 s\n{deployment.logs()}")
    assert flwr_run.returncode == 0, deployment.logs()
    while not (out_dir / "run.json").exists() and time.monotonic() < started + 300:  # --stream may end first
        time.sleep(1)
    assert (out_dir / "run.json").exists(), deployment.logs()

    sidecar = json.loads((out_dir / "global_adapter" / "aggregation.json").read_text())
    assert sidecar["secure_aggregation"]["sums"] == 2 and sidecar["secure_aggregation"]["threshold"] == 2
    assert not list(RunPaths(out_dir).client_dir(1, 0).glob("*.safetensors"))  # the server kept layouts only
    reference = reference_run(recipe_path, tmp_path / "reference")
    assert_same_adapter(out_dir / "global_adapter", reference / "global_adapter")


@pytest.mark.slow
def test_a_deployment_of_sft_clients_on_trl_prompt_completion_data_gives_florist_hf_runs_result(tmp_path, deployment):
    """`flwr run` of the shipped app with ``client.trainer=sft`` among its overrides: each SuperNode's ClientApp
    builds TRL's SFTTrainer through the client registry and trains on records in TRL's prompt/completion form
    (which only the SFT clients take), and the run equals `florist-hf run` with the same clients."""
    app_dir = tmp_path / "app"
    shutil.copytree(REPO / "recipes" / "flower", app_dir)
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps({"prompt": f"Q: What is {index} plus one?\nA:", "completion": f" {index + 1}."}) + "\n"
                                 for index in range(16)))
    recipe_path = flower_recipe(app_dir / "test_recipe.yaml", method="fedit", ranks=(4, 2), rounds=1)
    settings = yaml.safe_load(recipe_path.read_text())
    settings["data"].update(source=str(data_file), holdout_per_label=0, max_samples_per_client=8)
    settings["federation"]["eval_heldout_loss"] = False
    recipe_path.write_text(yaml.safe_dump(settings))
    start_loopback_federation(deployment, tmp_path / "nodes")
    out_dir = tmp_path / "flower_run"
    flwr_run = deployment.start("flwr_run", "flwr", "run", str(app_dir), "loopback", "--stream", "--run-config",
                                f"recipe='{recipe_path.name}' output-dir='{out_dir}' node-timeout=120 overrides='client.trainer=sft'")
    deadline = time.monotonic() + 300
    while not (out_dir / "run.json").exists() and time.monotonic() < deadline and flwr_run.poll() in (None, 0):
        time.sleep(1)
    assert (out_dir / "run.json").exists(), deployment.logs()

    summary = json.loads((out_dir / "run.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["client_samples"] == [8, 8]
    assert json.loads((out_dir / "recipe.json").read_text())["recipe"]["client"]["trainer"] == "sft"
    reference = run_federation(load_recipe(recipe_path, [f"output_dir={tmp_path / 'reference'}", "client.trainer=sft"]),
                               console=quiet_console())
    assert_same_run(out_dir, reference, rounds=(1,), clients=range(2))


# --- the node operator's policy ------------------------------------------------------------------


def test_a_node_refuses_what_its_policy_does_not_allow_and_the_round_goes_on(tmp_path, server_identity):
    import io

    from rich.console import Console

    from florist_hf.flower import make_client_app, run_flower_federation

    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=1)
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}", "federation.min_clients=2"])
    policy = tmp_path / "policy.yaml"
    policy.write_text("models: [meta-llama/Llama-3.2-1B]\n")
    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes")
    grid.contexts[102].node_config["policy"] = str(policy)  # node of client 2 runs only that base
    log = io.StringIO()
    run_dir = run_flower_federation(grid, recipe, console=Console(file=log, width=400))

    assert f"{policy} refuses base model 'builtin:tiny-llama'" in log.getvalue()
    sidecar = json.loads((RunPaths(run_dir).global_dir(1) / "aggregation.json").read_text())
    assert [client["name"] for client in sidecar["clients"]] == ["client_0", "client_1"]
    assert not (tmp_path / "nodes" / "run_7" / "client_2" / "base_model").exists()  # refused before any work


@pytest.mark.parametrize(
    "policy_text, change, refusal",
    [
        ("", {"model": {"trust_remote_code": True}}, "refuses model.trust_remote_code=true"),
        ("", {"training": {"push_to_hub": True, "hub_model_id": "x/y"}}, "refuses training.hub_model_id (and push_to_hub)"),
        ("", {"training": {"report_to": "wandb"}}, None),  # refused by the recipe itself (federation-level tracking)
        ("models: ['builtin:tiny-llama@v2']\n", {}, "refuses revision None of 'builtin:tiny-llama'"),
        ("training_keys: [push_to_hub, hub_model_id]\n", {"training": {"push_to_hub": True, "hub_model_id": "x/y"}}, ""),
        ("trust_remote_code: true\n", {"model": {"trust_remote_code": True}}, ""),
        ("modelz: []\n", {}, "modelz: Extra inputs are not permitted"),
        ("data_sources: [databricks/databricks-dolly-15k]\n", {}, "refuses data.source 'builtin:demo'"),
    ],
)
def test_node_policy_rules(tmp_path, policy_text, change, refusal):
    from pydantic import ValidationError

    from florist_hf.errors import FloristError
    from florist_hf.flower.policy import check_request, load_policy
    from florist_hf.recipe import Recipe

    base = yaml.safe_load(flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 2), rounds=1).read_text())
    for section, values in change.items():
        base[section].update(values)
    try:
        recipe = Recipe.model_validate(base)
    except ValidationError:
        assert refusal is None
        return
    node_config = {}
    if policy_text:
        (tmp_path / "policy.yaml").write_text(policy_text)
        node_config["policy"] = str(tmp_path / "policy.yaml")
    try:
        check_request(*load_policy(node_config), recipe, 0)
    except FloristError as error:
        assert refusal and refusal in str(error), str(error)
    else:
        assert refusal == "", "expected a refusal"


def test_a_silent_node_is_left_out_when_the_round_times_out(tmp_path, server_identity):
    import io

    from rich.console import Console

    from florist_hf.flower import make_client_app, run_flower_federation
    from florist_hf.flower.nodes import DEFAULT_ROUND_TIMEOUT
    from florist_hf.flower.server_app import make_server_app

    class SilentNodeGrid(LocalGrid):
        """Node 102 never answers a train message: what send_and_receive returns when its timeout passes."""

        def send_and_receive(self, messages, *, timeout=None):
            self.timeouts.append(timeout)
            silent = [m for m in messages if m.metadata.message_type == "train" and m.metadata.dst_node_id == 102]
            return super().send_and_receive([m for m in messages if m not in silent], timeout=timeout)

    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=1)
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}", "federation.min_clients=2"])
    grid = SilentNodeGrid(make_client_app(), 3, tmp_path / "nodes")
    grid.timeouts = []
    log = io.StringIO()
    run_dir = run_flower_federation(grid, recipe, console=Console(file=log, width=400), round_timeout=30.0)
    assert "client 2: no adapter this round; left out of round 1" in log.getvalue()
    sidecar = json.loads((RunPaths(run_dir).global_dir(1) / "aggregation.json").read_text())
    assert [client["name"] for client in sidecar["clients"]] == ["client_0", "client_1"]
    assert 30.0 in grid.timeouts
    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "round"]
    assert record["flower_uplink_bytes"] > 0 and record["flower_downlink_bytes"] == 0  # round 1 of FLoRIST sends no update
    import inspect

    assert inspect.signature(make_server_app).parameters["round_timeout"].default == DEFAULT_ROUND_TIMEOUT < float("inf")


def test_a_client_whose_supernode_reconnects_under_a_new_id_is_mapped_again(tmp_path, florist_case, server_identity):
    from florist_hf.flower import make_client_app, run_flower_federation

    recipe_path, reference = florist_case
    recipe = load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}"])

    class ReconnectingGrid(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            if any(m.metadata.message_type == "train" and m.metadata.group_id == "1" for m in messages) and 101 in self.contexts:
                context = self.contexts.pop(101)  # client 1's SuperNode restarts after round 1: new id, empty work dir
                self.contexts[201] = Context(run_id=7, node_id=201, state=RecordDict(), run_config={},
                                             node_config={**context.node_config, "work-dir": str(tmp_path / "restarted")})
            return replies

    grid = ReconnectingGrid(make_client_app(), 3, tmp_path / "nodes")
    run_dir = run_flower_federation(grid, recipe, console=quiet_console())
    round_2 = sorted(delivery[1] for delivery in grid.deliveries if delivery[0] == "train" and delivery[2] == "2")
    assert round_2 == [0, 1, 2]  # client 1 trained round 2 on its new node, sent round 1's update afresh
    assert_same_run(run_dir, reference)
    assert json.loads((run_dir / "run.json").read_text())["runtime"]["flower"]["nodes"]["1"] == 201


@pytest.mark.slow
def test_a_supernode_killed_during_the_round_is_left_out_after_the_round_timeout(tmp_path, deployment):
    app_dir = tmp_path / "app"
    shutil.copytree(REPO / "recipes" / "flower", app_dir)
    recipe_path = flower_recipe(app_dir / "test_recipe.yaml", method="florist", ranks=(4, 2), rounds=1)
    nodes = tmp_path / "nodes"
    supernodes = start_loopback_federation(deployment, nodes).supernodes
    out_dir = tmp_path / "flower_run"
    deployment.start("flwr_run", "flwr", "run", str(app_dir), "loopback", "--stream", "--run-config",
                     f"recipe='{recipe_path.name}' output-dir='{out_dir}' node-timeout=120 round-timeout=40")
    deadline = time.monotonic() + 300
    while not list(nodes.glob("run_*/client_1")) and time.monotonic() < deadline:  # client 1 starts its round
        time.sleep(0.05)
    assert list(nodes.glob("run_*/client_1")), deployment.logs()
    os.killpg(supernodes[1].pid, signal.SIGKILL)  # mid-round: it never replies

    while not (out_dir / "run.json").exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert (out_dir / "run.json").exists(), deployment.logs()
    sidecar = json.loads((out_dir / "rounds" / "1" / "global" / "aggregation.json").read_text())
    assert [client["name"] for client in sidecar["clients"]] == ["client_0"]
    assert json.loads((out_dir / "run.json").read_text())["rounds_completed"] == 1


@pytest.mark.slow
def test_dp_sgd_clients_and_bounded_updates_over_flower_give_florist_hf_runs_result(tmp_path, server_identity):
    """DP-SGD on every node and the server's update bound, through the ServerApp and ClientApp. Each
    node draws its noise from its own secret; given the run's secret, every node trains what `run`'s
    clients train and the run equals `florist-hf run`, ε lines included."""
    from florist_hf.flower import make_client_app, run_flower_federation
    from florist_hf.privacy import SECRET_SEED_FILE

    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method="florist", ranks=(4, 2, 2), rounds=2)
    settings = ["privacy={target_epsilon: 6, max_grad_norm: 1.0}", "federation.clip_update_norm=0.05",
                "training.max_steps=-1", "training.num_train_epochs=1", "training.per_device_train_batch_size=4"]
    reference = run_federation(load_recipe(recipe_path, [f"output_dir={tmp_path / 'reference'}", *settings]),
                               console=quiet_console())
    for client in range(3):
        node_root = tmp_path / "nodes" / "run_7" / f"client_{client}"
        node_root.mkdir(parents=True)
        (node_root / SECRET_SEED_FILE).write_text((reference / SECRET_SEED_FILE).read_text())
    grid = LocalGrid(make_client_app(), 3, tmp_path / "nodes")
    run_dir = run_flower_federation(grid, load_recipe(recipe_path, [f"output_dir={tmp_path / 'flower'}", *settings]),
                                    console=quiet_console())
    assert_same_run(run_dir, reference)

    def client_lines(path):
        return sorted(((r["round"], r["client"], r["epsilon"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                       if r["kind"] == "client"))

    assert client_lines(run_dir) == client_lines(reference) and len(client_lines(run_dir)) == 6
    sidecar = json.loads((RunPaths(run_dir).global_dir(2) / "aggregation.json").read_text())
    assert sidecar["bounding"]["clip_update_norm"] == 0.05


@pytest.mark.parametrize("method", ["florist", "fedit"])
def test_dpo_clients_over_flower_give_florist_hf_runs_result(tmp_path, method, server_identity):
    """TRL's DPOTrainer clients (``client.trainer: dpo``) on preference pairs, through the ServerApp and
    ClientApp for two rounds: each node trains against the reference the recipe names (the round's starting
    model: the global state a node holds, or the global factors a FedIT client continues), and the run
    equals `florist-hf run`, client adapters included."""
    from test_dpo_clients import preference_rows

    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in preference_rows("prompt_texts", 16)))
    recipe_path = flower_recipe(tmp_path / "recipe.yaml", method=method, ranks=(4, 4), rounds=2, client={"trainer": "dpo"},
                                training={"max_steps": 1, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                                          "beta": 1.0})
    settings = yaml.safe_load(recipe_path.read_text())
    settings["data"].update(source=str(data_file), holdout_per_label=0, max_samples_per_client=8)
    settings["federation"]["eval_heldout_loss"] = False
    recipe_path.write_text(yaml.safe_dump(settings))
    reference = reference_run(recipe_path, tmp_path / "reference")
    run_dir = grid_run(recipe_path, tmp_path, nodes=2)
    assert json.loads((run_dir / "recipe.json").read_text())["recipe"]["client"]["trainer"] == "dpo"
    assert_same_run(run_dir, reference, clients=range(2))
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "client"]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
