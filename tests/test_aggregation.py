"""The shared battery every aggregation method passes, plus each method's own promise (SPEC §2-§3)."""


import pytest
import torch
from helpers import relative_error

from florist_hf.aggregation import METHODS, ClientModule, SharedAMismatch, energy, get_method, linalg, round_communication
from florist_hf.aggregation import streaming
from florist_hf.aggregation.base import map_modules

M, N = 40, 56  # out, in: deliberately not square


def make_clients(ranks, scales=None, *, seed=0, dtype=torch.float32, shared_a=False):
    """One module per client; with ``shared_a`` every client's A is a prefix of one frozen A (FFA-LoRA)."""
    generator = torch.Generator().manual_seed(seed)
    scales = scales or [2.0] * len(ranks)
    frozen_a = torch.randn(max(ranks), N, generator=generator)
    clients = []
    for rank, scale in zip(ranks, scales):
        lora_a = frozen_a[:rank].clone() if shared_a else torch.randn(rank, N, generator=generator)
        lora_b = torch.randn(M, rank, generator=generator)
        clients.append({"layers.0.q_proj": ClientModule(lora_a.to(dtype), lora_b.to(dtype), scale)})
    return clients


def dense_update(clients, weights):
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return sum(
        p[k] * c["layers.0.q_proj"].scale * (c["layers.0.q_proj"].lora_b.double() @ c["layers.0.q_proj"].lora_a.double())
        for k, c in enumerate(clients)
    )



def delta(result):
    return result.modules["layers.0.q_proj"].delta_weight


#: FLoRIST's streaming aggregation runs the whole battery too, at its exact tolerance.
BATTERY = sorted(METHODS) + ["florist_streaming"]
EXACT = {name: METHODS[name].exact for name in METHODS} | {"florist_streaming": True}
#: Methods whose clients keep one shared A frozen (FFA-LoRA, FedSVD): their clients must share it.
SHARED_A = {name for name, method in METHODS.items() if method.freezes_lora_a}


def method_for(name, **options):
    if name == "florist_streaming":
        return get_method("florist", threshold=1.0, aggregation="streaming")
    return get_method(name, threshold=1.0) if name == "florist" else get_method(name, **options)


HETER = [16, 8, 4, 4]
WEIGHTS = [1579.0, 685.0, 3775.0, 607.0]


@pytest.fixture
def small_blocks(monkeypatch):
    """Streaming folds blocks of at least 2 ranks, so these small cases fold more than once."""
    monkeypatch.setattr(streaming, "MIN_BLOCK_RANK", 2)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("name", BATTERY)
class TestEveryMethod:
    def test_exact_methods_reproduce_the_weighted_update(self, name):
        clients = make_clients(HETER, [0.5, 2.0, 4.0, 1.0], shared_a=name in SHARED_A)
        result = method_for(name).aggregate(clients, WEIGHTS)
        error = relative_error(delta(result), dense_update(clients, WEIGHTS))
        if EXACT[name]:
            assert error < 1e-5
        else:  # FedIT's product of averages and FlexLoRA's truncation are lossy here
            assert error > 1e-3

    def test_client_order_does_not_matter(self, name):
        clients = make_clients(HETER, [0.5, 2.0, 4.0, 1.0], shared_a=name in SHARED_A)
        reference = delta(method_for(name).aggregate(clients, WEIGHTS))
        for order in [(3, 2, 1, 0), (1, 0, 3, 2)]:
            permuted = method_for(name).aggregate([clients[i] for i in order], [WEIGHTS[i] for i in order])
            assert relative_error(delta(permuted), reference) < 1e-10

    def test_only_relative_weights_matter(self, name):
        clients = make_clients([8, 8, 8], shared_a=name in SHARED_A)
        a = delta(method_for(name).aggregate(clients, [1.0, 2.0, 3.0]))
        b = delta(method_for(name).aggregate(clients, [10.0, 20.0, 30.0]))
        assert relative_error(a, b) < 1e-12

    def test_weights_change_the_result(self, name):
        clients = make_clients([8, 8, 8], shared_a=name in SHARED_A)
        a = delta(method_for(name).aggregate(clients, [1.0, 1.0, 1.0]))
        b = delta(method_for(name).aggregate(clients, [1.0, 1.0, 5.0]))
        assert relative_error(a, b) > 1e-3

    def test_bf16_adapters_are_computed_in_high_precision(self, name):
        clients = make_clients(HETER, dtype=torch.bfloat16, shared_a=name in SHARED_A)
        result = method_for(name).aggregate(clients, WEIGHTS)
        module = result.modules["layers.0.q_proj"]
        assert module.lora_b.dtype == torch.float64 and module.lora_a.dtype == torch.float64
        if EXACT[name]:  # exact w.r.t. the bf16 values the clients sent
            assert relative_error(delta(result), dense_update(clients, WEIGHTS)) < 1e-10

    def test_single_client_with_its_own_scale_is_its_update(self, name):
        clients = make_clients([8], [1.5])
        result = method_for(name).aggregate(clients, [42.0])
        assert relative_error(delta(result), dense_update(clients, [1.0])) < 1e-10

    def test_output_shapes_match_the_selected_rank(self, name):
        result = method_for(name).aggregate(make_clients(HETER, shared_a=name in SHARED_A), WEIGHTS)
        module = result.modules["layers.0.q_proj"]
        assert module.lora_b.shape == (M, module.selected_rank)
        assert module.lora_a.shape == (module.selected_rank, N)


@pytest.mark.usefixtures("small_blocks")
@pytest.mark.parametrize("aggregation", ["stacked", "streaming"])
class TestFlorist:
    def test_threshold_one_equals_flora_and_the_dense_update(self, aggregation):
        clients = make_clients(HETER, [2.0, 2.0, 2.0, 2.0])
        florist = delta(get_method("florist", threshold=1.0, aggregation=aggregation).aggregate(clients, WEIGHTS))
        flora = delta(get_method("flora").aggregate(clients, WEIGHTS))
        dense = dense_update(clients, WEIGHTS)
        assert relative_error(florist, dense) < 1e-5
        assert relative_error(florist, flora) < 1e-5

    @pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.95, 0.99])
    def test_below_one_it_is_the_dense_truncated_svd_at_the_smallest_rank_meeting_the_rule(self, aggregation, threshold):
        clients = make_clients(HETER, [0.5, 2.0, 4.0, 1.0], seed=3)
        module = get_method("florist", threshold=threshold, aggregation=aggregation).aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        dense = dense_update(clients, WEIGHTS)
        u, sigma, vh = torch.linalg.svd(dense, full_matrices=False)
        dense_energy = torch.cumsum(sigma**2, 0) / (sigma**2).sum()
        expected_rank = int((dense_energy < threshold).sum()) + 1
        assert module.selected_rank == expected_rank
        assert dense_energy[expected_rank - 1] >= threshold > (dense_energy[expected_rank - 2] if expected_rank > 1 else 0)
        truncated = u[:, :expected_rank] @ torch.diag(sigma[:expected_rank]) @ vh[:expected_rank]
        assert relative_error(module.delta_weight, truncated) < 1e-8
        assert torch.allclose(module.singular_values[: sum(HETER)], sigma[: sum(HETER)], rtol=1e-8, atol=1e-10)

    def test_lower_threshold_never_selects_more_rank(self, aggregation):
        clients = make_clients(HETER, seed=5)
        ranks = [
            get_method("florist", threshold=t, aggregation=aggregation).aggregate(clients, WEIGHTS).modules["layers.0.q_proj"].selected_rank
            for t in (0.5, 0.7, 0.9, 0.99, 1.0)
        ]
        assert ranks == sorted(ranks) and ranks[0] < ranks[-1] == sum(HETER)

    def test_duplicated_clients_and_a_zero_client_keep_the_numerical_rank(self, aggregation):
        clients = make_clients([8, 8])
        zero_b = ClientModule(torch.randn(4, N), torch.zeros(M, 4), 2.0)
        stack = [clients[0], clients[0], clients[1], {"layers.0.q_proj": zero_b}]
        module = get_method("florist", threshold=1.0, aggregation=aggregation).aggregate(stack, [1, 1, 1, 1]).modules["layers.0.q_proj"]
        assert module.selected_rank == 16  # duplicates add nothing, the zero client adds nothing
        assert relative_error(module.delta_weight, dense_update(stack, [1, 1, 1, 1])) < 1e-10

    def test_all_zero_update_gives_rank_one_of_zeros(self, aggregation):
        zero = {"layers.0.q_proj": ClientModule(torch.randn(4, N), torch.zeros(M, 4), 2.0)}
        module = get_method("florist", threshold=0.9, aggregation=aggregation).aggregate([zero, zero], [1, 1]).modules["layers.0.q_proj"]
        assert module.selected_rank == 1
        assert float(module.delta_weight.abs().max()) == 0.0

    def test_stacked_rank_larger_than_the_layer(self, aggregation):
        clients = make_clients([32, 32])  # R = 64 > m = 40
        module = get_method("florist", threshold=1.0, aggregation=aggregation).aggregate(clients, [1, 1]).modules["layers.0.q_proj"]
        assert module.selected_rank == M
        assert relative_error(module.delta_weight, dense_update(clients, [1, 1])) < 1e-10

    def test_gram_and_householder_paths_agree(self, aggregation, monkeypatch):
        clients = make_clients(HETER, [0.5, 2.0, 4.0, 1.0], seed=11)
        stacked_b, _, column_scale = linalg.stack_client_factors(
            [c["layers.0.q_proj"] for c in clients], torch.tensor(WEIGHTS) / sum(WEIGHTS)
        )
        assert linalg._cholesky_basis(linalg.column_gram(stacked_b, column_scale)) is not None  # the Gram path
        fast = get_method("florist", threshold=0.9, aggregation=aggregation).aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        monkeypatch.setattr(linalg, "MAX_GRAM_CONDITION", 0.0)  # every stack now takes the Householder path
        slow = get_method("florist", threshold=0.9, aggregation=aggregation).aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        assert fast.selected_rank == slow.selected_rank
        assert relative_error(fast.delta_weight, slow.delta_weight) < 1e-10
        assert torch.allclose(fast.singular_values, slow.singular_values, rtol=1e-10, atol=0)

    def test_ill_conditioned_full_rank_stack_is_still_exact(self, aggregation):
        # Client 1's B is client 0's B plus a 1e-7 perturbation: full rank, condition number ~1e7,
        # beyond what the Gram matrix resolves, so the guard sends it to Householder QR.
        generator = torch.Generator().manual_seed(2)
        lora_b = torch.randn(M, 6, generator=generator, dtype=torch.float64)
        clients = [
            {"layers.0.q_proj": ClientModule(torch.randn(6, N, generator=generator, dtype=torch.float64), b, 1.0)}
            for b in (lora_b, lora_b + 1e-7 * torch.randn(M, 6, generator=generator, dtype=torch.float64))
        ]
        stacked_b, _, column_scale = linalg.stack_client_factors([c["layers.0.q_proj"] for c in clients], torch.ones(2))
        assert linalg._cholesky_basis(linalg.column_gram(stacked_b, column_scale)) is None
        module = get_method("florist", threshold=1.0, aggregation=aggregation).aggregate(clients, [1, 1]).modules["layers.0.q_proj"]
        assert relative_error(module.delta_weight, dense_update(clients, [1, 1])) < 1e-10

    def test_singular_values_the_squared_core_cannot_resolve_take_the_householder_path(self, aggregation):
        # ΔW = U·diag(σ)·Vᵀ with σ from 1 down to 1e-7, factored as B = U·X, A = X⁻¹·diag(σ)·Vᵀ for
        # a well-conditioned random X. The fast path's eigenvalues are σ², resolved only to about
        # R·eps·σ_1², which would leave the smallest σ with a ~1e-2 relative error: the guard must
        # send the module to Householder QR, where every σ is exact to fp64 round-off.
        generator = torch.Generator().manual_seed(3)
        sigma = torch.logspace(0, -7, 6, dtype=torch.float64)
        left = torch.linalg.qr(torch.randn(M, 6, generator=generator, dtype=torch.float64)).Q
        right = torch.linalg.qr(torch.randn(N, 6, generator=generator, dtype=torch.float64)).Q
        mixing = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=generator, dtype=torch.float64)
        lora_b, lora_a = left @ mixing, torch.linalg.solve(mixing, sigma[:, None] * right.T)
        client = {"layers.0.q_proj": ClientModule(lora_a, lora_b, 1.0)}
        module = get_method("florist", threshold=1.0, aggregation=aggregation).aggregate([client], [1]).modules["layers.0.q_proj"]
        assert module.selected_rank == 6
        assert torch.allclose(module.singular_values, sigma, rtol=1e-9, atol=0)
        assert relative_error(module.delta_weight, dense_update([client], [1])) < 1e-12

    def test_threshold_outside_the_unit_interval_is_refused(self, aggregation):
        for bad in (0.0, -0.1, 1.01):
            with pytest.raises(ValueError):
                get_method("florist", threshold=bad, aggregation=aggregation)


def streamed_module(clients, weights, **options):
    method = get_method("florist", aggregation="streaming", **options)
    return method.aggregate(clients, weights).modules["layers.0.q_proj"]


def rslora_scale(rank):
    return 16 / rank**0.5


@pytest.mark.usefixtures("small_blocks")
class TestStreaming:
    def test_many_mixed_clients_fold_in_blocks_and_equal_the_stacked_decomposition(self):
        # 24 clients, ranks 1..16, lora_alpha and rsLoRA scales, skewed weights: R = 196 > m = 40
        ranks = [1 + (5 * k) % 16 for k in range(24)]
        scales = [rslora_scale(r) if k % 3 == 0 else 2.0 * (1 + k % 4) / r for k, r in enumerate(ranks)]
        clients = make_clients(ranks, scales, seed=7)
        weights = [float(10 + 37 * k % 101) for k in range(24)]
        dense = dense_update(clients, weights)
        for threshold in (0.5, 0.9, 0.99, 1.0):
            stacked = get_method("florist", threshold=threshold).aggregate(clients, weights).modules["layers.0.q_proj"]
            streamed = streamed_module(clients, weights, threshold=threshold)
            assert streamed.approximation["folds"] >= 2
            assert streamed.selected_rank == stacked.selected_rank
            assert relative_error(streamed.delta_weight, stacked.delta_weight) < 1e-10
            assert torch.allclose(streamed.singular_values[:M], stacked.singular_values[:M], rtol=1e-9, atol=1e-12)
        assert relative_error(streamed.delta_weight, dense) < 1e-10
        assert streamed.approximation["discarded_energy"] < 1e-20

    def test_the_running_factors_stay_at_the_numerical_rank_of_what_was_folded(self):
        # 40 clients of rank 4 whose updates all lie in one rank-5 subspace (fp64: exactly so)
        generator = torch.Generator().manual_seed(1)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, dtype=torch.float64)

        left, right = randn(M, 5), randn(5, N)
        clients = [{"layers.0.q_proj": ClientModule(randn(4, 5) @ right, left @ randn(5, 4), 2.0)} for _ in range(40)]
        running = streaming.RunningSVD((M, N))
        for client in clients:
            module = client["layers.0.q_proj"]
            running.add(module.lora_b.double() * module.scale, module.lora_a.double())
            assert running.sigma.numel() <= 5 and running.u.shape == (M, running.sigma.numel())
            assert running.rank_held - running.sigma.numel() <= streaming.MIN_BLOCK_RANK + 4  # at most one block pending
        assert running.folds >= 2
        module = streamed_module(clients, [1.0] * 40, threshold=1.0)
        assert module.selected_rank == 5
        assert relative_error(module.delta_weight, dense_update(clients, [1.0] * 40)) < 1e-10

    def test_a_looser_tolerance_drops_small_components_within_the_recorded_bound(self):
        # a shared rank-4 signal plus small client-specific parts: 30 clients of rank 6
        generator = torch.Generator().manual_seed(2)
        left, right = torch.randn(M, 4, generator=generator), torch.randn(4, N, generator=generator)
        clients = []
        for _ in range(30):
            own_b, own_a = 0.02 * torch.randn(M, 2, generator=generator), torch.randn(2, N, generator=generator)
            mix = torch.randn(4, 4, generator=generator)
            clients.append({"layers.0.q_proj": ClientModule(
                torch.cat([mix @ right, own_a]), torch.cat([left @ torch.linalg.inv(mix), own_b], dim=1), 1.0)})
        dense = dense_update(clients, [1.0] * 30)
        exact = streamed_module(clients, [1.0] * 30, threshold=1.0)
        loose = streamed_module(clients, [1.0] * 30, threshold=1.0, tolerance=1e-2)
        assert loose.selected_rank < exact.selected_rank == M
        record = loose.approximation
        assert record["tolerance"] == 1e-2 and record["discarded_energy"] > 0
        error = relative_error(loose.delta_weight, dense)
        assert 0 < error <= record["error_bound"] * (1 + 1e-9) and error**2 <= record["error_bound"] ** 2
        # τ = 0.9 picks the same components either way: they are far above the tolerance
        assert streamed_module(clients, [1.0] * 30, threshold=0.9, tolerance=1e-2).selected_rank == \
            get_method("florist", threshold=0.9).aggregate(clients, [1.0] * 30).modules["layers.0.q_proj"].selected_rank

    def test_a_module_that_stays_zero_over_many_folds_gives_rank_one_of_zeros(self, monkeypatch):
        monkeypatch.setattr(streaming, "MIN_BLOCK_RANK", 64)  # five rank-16 clients: the last one folds
        zero = {"layers.0.q_proj": ClientModule(torch.randn(16, N), torch.zeros(M, 16), 2.0)}
        module = streamed_module([zero] * 5, [1.0] * 5, threshold=0.9)
        assert module.approximation["folds"] == 1 and module.selected_rank == 1
        assert float(module.delta_weight.abs().max()) == 0.0 and module.singular_values.tolist() == [0.0]

    def test_streaming_options_are_checked_and_recorded(self):
        for bad in ({"aggregation": "online"}, {"aggregation": "streaming", "tolerance": 1.0},
                    {"aggregation": "streaming", "tolerance": -1e-3}):
            with pytest.raises(ValueError):
                get_method("florist", **bad)
        assert get_method("florist", threshold=0.9).options() == {"threshold": 0.9}
        assert get_method("florist", threshold=0.9, aggregation="streaming", tolerance=1e-3).options() == {
            "threshold": 0.9, "aggregation": "streaming", "tolerance": 1e-3}


class TestBaselines:
    def test_fedit_averages_each_factor_after_zero_padding(self):
        clients = make_clients([8, 4], [2.0, 2.0])
        module = get_method("fedit").aggregate(clients, [3.0, 1.0]).modules["layers.0.q_proj"]
        big, small = (c["layers.0.q_proj"] for c in clients)
        expected_b = 0.75 * 2.0 * big.lora_b.double()
        expected_b[:, :4] += 0.25 * 2.0 * small.lora_b.double()
        expected_a = 0.75 * big.lora_a.double()
        expected_a[:4] += 0.25 * small.lora_a.double()
        assert torch.allclose(module.lora_b, expected_b) and torch.allclose(module.lora_a, expected_a)
        assert module.selected_rank == 8

    def test_ffa_refuses_clients_that_do_not_share_the_frozen_a(self):
        clients = make_clients([8, 4], shared_a=False)
        with pytest.raises(SharedAMismatch) as raised:
            get_method("ffa").aggregate(clients, [1, 1])
        assert raised.value.client_index == 1

    def test_ffa_keeps_the_shared_a(self):
        clients = make_clients([8, 4], shared_a=True)
        module = get_method("ffa").aggregate(clients, [1, 1]).modules["layers.0.q_proj"]
        assert torch.equal(module.lora_a, clients[0]["layers.0.q_proj"].lora_a.double())

    def test_fedsvd_refactorises_the_averaged_b_times_a_by_its_svd(self):
        """The dense oracle: B̄ = Σ p_k s_k pad(B_k), then numpy's SVD of B̄·A; the new A has
        orthonormal rows, the new B is U·Σ, and the product is the exact weighted update."""
        import numpy as np

        clients = make_clients(HETER, [0.5, 2.0, 4.0, 1.0], seed=3, shared_a=True)
        module = get_method("fedsvd").aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        p = np.array(WEIGHTS) / sum(WEIGHTS)
        mean_b = np.zeros((M, max(HETER)))
        for weight, client in zip(p, clients):
            part = client["layers.0.q_proj"]
            mean_b[:, : part.rank] += weight * part.scale * part.lora_b.double().numpy()
        shared_a = clients[0]["layers.0.q_proj"].lora_a.double().numpy()
        u, sigma, vh = np.linalg.svd(mean_b @ shared_a, full_matrices=False)
        rank = max(HETER)
        assert module.selected_rank == rank and module.lora_a.shape == (rank, N)
        np.testing.assert_allclose(module.singular_values.numpy()[:rank], sigma[:rank], rtol=1e-10)
        np.testing.assert_allclose(module.lora_a.numpy() @ module.lora_a.numpy().T, np.eye(rank), atol=1e-12)
        np.testing.assert_allclose(np.abs(module.lora_a.numpy()), np.abs(vh[:rank]), atol=1e-8)  # up to each row's sign
        np.testing.assert_allclose(module.delta_weight.numpy(), mean_b @ shared_a, atol=1e-10)

    def test_fedex_continues_fedits_averages_and_carries_the_exact_residual(self):
        """The dense oracle: the global update is Σ p_k s_k B_k A_k exactly; its first r components
        are FedIT's averages, which the clients continue, and the rest is Σ p_k ΔW_k − B̄·Ā."""
        clients = make_clients(HETER, [0.5, 2.0, 4.0, 1.0], seed=5)
        module = get_method("fedex").aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        fedit = get_method("fedit").aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        rank = module.continued_rank
        assert rank == max(HETER) and module.selected_rank == module.lora_a.shape[0] > rank
        assert torch.allclose(module.lora_b[:, :rank], fedit.lora_b) and torch.allclose(module.lora_a[:rank], fedit.lora_a)
        exact = dense_update(clients, WEIGHTS)
        assert relative_error(module.delta_weight, exact) < 1e-10
        residual = module.lora_b[:, rank:] @ module.lora_a[rank:]
        assert relative_error(residual, exact - fedit.lora_b @ fedit.lora_a) < 1e-10

    def test_fedsvd_refuses_clients_that_do_not_share_the_frozen_a(self):
        with pytest.raises(SharedAMismatch):
            get_method("fedsvd").aggregate(make_clients([8, 4], shared_a=False), [1, 1])

    def test_flexlora_sends_each_client_the_truncation_at_its_own_rank(self):
        clients = make_clients(HETER, seed=7)
        module = get_method("flexlora").aggregate(clients, WEIGHTS).modules["layers.0.q_proj"]
        u, sigma, vh = torch.linalg.svd(dense_update(clients, WEIGHTS), full_matrices=False)
        for (lora_b, lora_a), rank in zip(module.client_factors, HETER):
            assert lora_a.shape[0] == rank
            expected = u[:, :rank] @ torch.diag(sigma[:rank]) @ vh[:rank]
            assert relative_error(lora_b @ lora_a, expected) < 1e-8
        assert module.selected_rank == max(HETER)
        assert torch.allclose(module.singular_values, sigma[: sum(HETER)])


def test_energy_is_cumulative_share_of_squared_singular_values():
    sigma = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.allclose(energy(sigma), torch.tensor([9 / 14, 13 / 14, 1.0], dtype=torch.float64))


TINYLLAMA_QV = {f"layers.{i}.{name}": shape for i in range(22) for name, shape in (("q_proj", (2048, 2048)), ("v_proj", (256, 2048)))}


@pytest.mark.parametrize("name, eff", [("fedit", 14.20), ("flora", 1.78), ("ffa", 28.41), ("flexlora", 14.20)])
def test_paper_eff_for_tinyllama(name, eff):
    report = round_communication(get_method(name), TINYLLAMA_QV, [16] * 8)
    assert round(report.eff_x1e4, 2) == eff


def test_communication_counts_each_direction():
    shapes = {"a": (10, 20), "b": (30, 20)}
    report = round_communication(get_method("florist", threshold=0.9), shapes, [4, 2], {"a": 3, "b": 1}, bytes_per_param=2)
    assert report.uplink_params == [4 * 30 + 4 * 50, 2 * 30 + 2 * 50]
    assert report.downlink_params == [3 * 30 + 1 * 50] * 2
    assert report.to_dict()["downlink_bytes_total"] == 2 * 2 * (3 * 30 + 50)
    assert report.eff_x1e4 == pytest.approx(1e4 / 4)
    ffa = round_communication(get_method("ffa"), shapes, [4, 2])
    assert ffa.uplink_params == [4 * 10 + 4 * 30, 2 * 10 + 2 * 30]  # B only
    assert ffa.downlink_params == [4 * 40, 4 * 40]
    fedsvd = round_communication(get_method("fedsvd"), shapes, [4, 2])
    assert fedsvd.uplink_params == ffa.uplink_params  # B only goes up: A is the server's
    assert fedsvd.downlink_params == [4 * 30 + 4 * 50] * 2  # the new A and B both come down


@pytest.mark.parametrize("rank", [1, 3, 7, 33])
def test_gram_matrices_equal_the_full_products_and_are_exactly_symmetric(rank):
    x = torch.randn(rank, 50, dtype=torch.float64)
    scale = torch.rand(rank, dtype=torch.float64) + 0.5
    for gram, expected in (
        (linalg.row_gram(x), x @ x.T),
        (linalg.column_gram(x.T), x @ x.T),
        (linalg.column_gram(x.T, scale), (x.T * scale).T @ (x.T * scale)),
    ):
        assert torch.allclose(gram, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(gram, gram.T)  # Cholesky reads one triangle: both must be the same


def test_blas_matmul_equals_torch_and_leaves_what_numpy_cannot_take_to_torch():
    x, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    assert torch.allclose(linalg.blas_matmul(x, y), x @ y, rtol=1e-12, atol=1e-12)
    bf16 = linalg.blas_matmul(x.bfloat16(), y.bfloat16())
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, x.bfloat16() @ y.bfloat16())
    with_grad = x.clone().requires_grad_()
    assert linalg.blas_matmul(with_grad, y).grad_fn is not None


def test_modules_are_aggregated_in_parallel_with_the_same_result():
    generator = torch.Generator().manual_seed(4)
    clients = [
        {f"layers.{i}.q_proj": ClientModule(torch.randn(r, N, generator=generator), torch.randn(M, r, generator=generator), 2.0) for i in range(5)}
        for r in HETER
    ]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = get_method("florist", threshold=0.9).aggregate(clients, WEIGHTS)
        torch.set_num_threads(3)
        parallel = get_method("florist", threshold=0.9).aggregate(clients, WEIGHTS)
        assert torch.get_num_threads() == 3  # restored after the worker threads ran single-threaded
        assert list(parallel.modules) == list(sequential.modules)  # module order kept
        for name, module in parallel.modules.items():
            assert torch.equal(module.lora_b, sequential.modules[name].lora_b)
            assert torch.equal(module.lora_a, sequential.modules[name].lora_a)
        with pytest.raises(ZeroDivisionError):  # a worker's error reaches the caller
            map_modules(lambda name: 1 / 0, ["a", "b"])
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


#: Merge-style methods report each client's norm and cosine to the global update (the outlier report).
REPORTING = sorted(name for name, method in METHODS.items() if method.merges_into_base)


def random_heterogeneous_case(case: int, dtype: torch.dtype):
    """Clients of random ranks (2-7 of them, ranks 1-12), scales and weights; case 0 repeats a
    client (a rank-deficient stack: FLoRIST's Householder path), case 1 stacks more rank than M."""
    generator = torch.Generator().manual_seed(100 + case)
    count = int(torch.randint(2, 8, (1,), generator=generator))
    ranks = [int(r) for r in torch.randint(1, 13, (count,), generator=generator)]
    if case == 1:
        ranks = [24, 16, 8, 4]  # R = 52 > M = 40
    clients = []
    for rank in ranks:
        lora_b = torch.randn(M, rank, generator=generator, dtype=torch.float64) * float(torch.rand(1, generator=generator) * 10 + 0.1)
        lora_a = torch.randn(rank, N, generator=generator, dtype=torch.float64)
        scale = float(torch.rand(1, generator=generator) * 4 + 0.25)
        clients.append({"layers.0.q_proj": ClientModule(lora_a.to(dtype), lora_b.to(dtype), scale)})
    if case == 0:
        clients.append(clients[0])
    weights = (torch.rand(len(clients), generator=generator, dtype=torch.float64) * 1000 + 1).tolist()
    threshold = float(torch.rand(1, generator=generator) * 0.5 + 0.5)
    return clients, weights, threshold


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("name", REPORTING)
def test_client_products_read_off_the_grams_equal_the_dense_ones(name, case, dtype):
    """Each client's ‖B_k·A_k‖² and ⟨B_k·A_k, B_g·A_g⟩ (what the outlier report needs), read off the
    method's Gram matrices, equal the dense m×n computation to 1e-9, bf16 clients included."""
    from florist_hf.aggregation.bounding import factor_products

    clients, weights, threshold = random_heterogeneous_case(case, dtype)
    method = get_method(name, threshold=threshold) if name == "florist" else get_method(name)
    module = method.aggregate(clients, weights).modules["layers.0.q_proj"]
    if name == "florist":  # the global is the dense update's SVD truncated at the selected rank
        u, sigma, vh = torch.linalg.svd(dense_update(clients, weights), full_matrices=False)
        rank = module.selected_rank
        assert relative_error(module.delta_weight, u[:, :rank] * sigma[:rank] @ vh[:rank]) < 1e-9
    global_update = module.delta_weight
    global_norm = float(global_update.norm())
    products = module.client_products
    assert products.global_norm_squared == pytest.approx(global_norm**2, rel=1e-9)
    for k, client in enumerate(c["layers.0.q_proj"] for c in clients):
        dense = client.lora_b.double() @ client.lora_a.double()
        norm = float(dense.norm())
        assert products.norms_squared[k] == pytest.approx(norm**2, rel=1e-9)
        # The cosine to 1e-9: the inner product's error relative to the norms it is divided by.
        assert abs(products.inners[k] - float((dense * global_update).sum())) <= 1e-9 * norm * global_norm
    # The factor path (for factors changed after aggregation) agrees with the Gram path.
    from_factors = factor_products([c["layers.0.q_proj"] for c in clients], module.lora_b, module.lora_a)
    assert from_factors.norms_squared == pytest.approx(products.norms_squared, rel=1e-9)
    assert from_factors.global_norm_squared == pytest.approx(products.global_norm_squared, rel=1e-9)


def clients_with_hidden_difference(shared_a: bool):
    """Two client sets with the same factor sums (Σ p_k·s_k·B_k, Σ p_k·A_k) and the same update
    ΔW = Σ p_k·s_k·B_k·A_k, whose clients' own factors differ: clients 0 and 1 share A and p·s,
    and their B's move by +E and −E. Weights for ``aggregate``."""
    generator = torch.Generator().manual_seed(21)
    frozen_a = torch.randn(4, N, generator=generator, dtype=torch.float64)
    third_a = frozen_a[:2].clone() if shared_a else torch.randn(2, N, generator=generator, dtype=torch.float64)
    factors = [(torch.randn(M, 4, generator=generator, dtype=torch.float64), frozen_a, 2.0),
               (torch.randn(M, 4, generator=generator, dtype=torch.float64), frozen_a, 2.0),
               (torch.randn(M, 2, generator=generator, dtype=torch.float64), third_a, 0.5)]
    shift = torch.randn(M, 4, generator=generator, dtype=torch.float64)
    moved = [(factors[0][0] + shift, *factors[0][1:]), (factors[1][0] - shift, *factors[1][1:]), factors[2]]

    def as_clients(triples):
        return [{"layers.0.q_proj": ClientModule(a.clone(), b, scale)} for b, a, scale in triples]

    return as_clients(factors), as_clients(moved), [300.0, 300.0, 100.0]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_what_a_method_declares_it_needs_from_the_clients_is_all_it_reads(name):
    """A method that needs only the factor sums and/or the sketch sums (ΔW) gives the same global
    update for two client sets that agree on those and differ in each client's own factors; one that
    needs each client's factors (FLoRA's broadcast, a robust statistic) tells them apart."""
    from florist_hf.aggregation import FACTORS, NEEDS

    method_cls = METHODS[name]
    assert method_cls.needs and method_cls.needs <= set(NEEDS)
    clients, moved, weights = clients_with_hidden_difference(shared_a=method_cls.freezes_lora_a)
    variants = [method_for(name)]
    if "robust" in method_cls.settings:
        variants.append(method_cls.from_settings({"robust": "median"}))
    for method in variants:
        before = method.aggregate(clients, weights).modules["layers.0.q_proj"]
        after = method.aggregate(moved, weights).modules["layers.0.q_proj"]
        if FACTORS in method.client_needs():
            assert not torch.allclose(before.lora_b, after.lora_b, rtol=1e-6, atol=1e-6)
            continue
        assert relative_error(after.delta_weight, before.delta_weight) < 1e-10
        for own_before, own_after in zip(before.client_factors or [], after.client_factors or []):
            assert relative_error(own_after[0] @ own_after[1], own_before[0] @ own_before[1]) < 1e-10
        if before.continued_rank is not None:  # FedEx-LoRA's continued factors are the averages
            assert torch.allclose(after.lora_b[:, :before.continued_rank], before.lora_b[:, :before.continued_rank],
                                  rtol=1e-10, atol=1e-12)


def test_methods_take_their_federation_settings_from_the_registry():
    from florist_hf.aggregation import method_from_settings

    settings = {"threshold": 0.7, "aggregation": "streaming", "streaming_tolerance": 1e-3, "robust": "trimmed_mean",
                "trim_fraction": 0.2, "rounds": 5}
    florist = method_from_settings("florist", settings)
    assert (florist.threshold, florist.aggregation, florist.tolerance) == (0.7, "streaming", 1e-3)
    assert method_from_settings("fedit", settings).options() == {"robust": "trimmed_mean", "trim_fraction": 0.2}
    assert method_from_settings("flora", settings).options() == {}
    with pytest.raises(ValueError, match="unknown aggregation method 'fedavg'; choose one of fedex, fedit"):
        method_from_settings("fedavg", settings)
    assert METHODS["fedex"].refusal([4, 4], samples_every_client=True) is None
    assert "give every client one rank" in METHODS["fedex"].refusal([4, 2], samples_every_client=True)
    assert "clients_per_round" in METHODS["fedex"].refusal([4, 4], samples_every_client=False)
    assert all(METHODS[name].refusal([4, 2], samples_every_client=False) is None for name in METHODS if name != "fedex")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_released_client_factors_give_the_same_result_and_leave_the_dicts_empty(name):
    generator = torch.Generator().manual_seed(6)
    frozen = {i: torch.randn(max(HETER), N, generator=generator) for i in range(3)}
    clients = [
        {f"layers.{i}.q_proj": ClientModule(frozen[i][:r].clone() if name in SHARED_A else torch.randn(r, N, generator=generator),
                                            torch.randn(M, r, generator=generator), 2.0) for i in range(3)}
        for r in HETER
    ]
    kept = method_for(name).aggregate(clients, WEIGHTS, result_dtype=torch.bfloat16)
    handed_over = [dict(client) for client in clients]
    released = method_for(name).aggregate(handed_over, WEIGHTS, result_dtype=torch.bfloat16, release=True)
    assert all(not client for client in handed_over) and all(len(client) == 3 for client in clients)
    for module_name, module in kept.modules.items():
        assert torch.equal(released.modules[module_name].lora_b, module.lora_b)
        assert torch.equal(released.modules[module_name].lora_a, module.lora_a)
        assert released.modules[module_name].lora_b.dtype == torch.bfloat16


@pytest.mark.parametrize("result_dtype", [torch.bfloat16, torch.float16])
def test_florist_forms_a_16_bit_global_from_fp32_products_within_its_rounding(result_dtype):
    """A 16-bit global's last two products run in fp32: every factor as the fp64 result rounds it, give or
    take one step of the 16-bit format, and the same ranks and singular values (they come before)."""
    from florist_hf.aggregation.linalg import product_dtype

    assert product_dtype(result_dtype) == torch.float32
    assert product_dtype(torch.float32) == product_dtype(None) == torch.float64
    clients = make_clients([64, 32, 16, 16, 8, 8, 4, 4], dtype=torch.bfloat16, seed=4)
    clients = [{name: ClientModule(m.lora_a, m.lora_b.repeat(8, 1), m.scale) for name, m in c.items()} for c in clients]  # m = 320 > R
    florist = get_method("florist", threshold=0.9)
    low = florist.aggregate(clients, [1579, 685, 3775, 607, 900, 800, 700, 600], result_dtype=result_dtype)
    high = florist.aggregate(clients, [1579, 685, 3775, 607, 900, 800, 700, 600])
    ours, exact = low.modules["layers.0.q_proj"], high.modules["layers.0.q_proj"]
    assert ours.selected_rank == exact.selected_rank < 152 and torch.equal(ours.singular_values, exact.singular_values)
    for got, reference in ((ours.lora_b, exact.lora_b), (ours.lora_a, exact.lora_a)):
        assert got.dtype == result_dtype
        rounded = reference.to(result_dtype)
        step = torch.finfo(result_dtype).eps * reference.abs().to(torch.float64)
        assert bool(((got.double() - rounded.double()).abs() <= step + torch.finfo(result_dtype).tiny).all())
        assert float((got != rounded).double().mean()) < 0.02  # most elements round to the very same value
