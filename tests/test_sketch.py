"""The two-stage sketch (aggregation/sketch.py) reproduces the stacked FLoRIST, FlexLoRA and FedEx-LoRA
from two sums, at the heterogeneous ranks of the paper's setting; a narrower sketch reports its error."""

import pytest
import torch
from helpers import relative_error

from florist_hf.aggregation import ClientModule, get_method
from florist_hf.aggregation import sketch
from florist_hf.aggregation.fedit import FedIT

RANKS = [64, 32, 16, 16, 8, 8, 4, 4]
SEED = 1234


def heterogeneous_clients(shape, ranks=RANKS, seed=0, decay=False):
    """Random clients with rsLoRA-like scales; ``decay`` gives each client a decaying spectrum so that
    τ < 1 has something to choose."""
    m, n = shape
    generator = torch.Generator().manual_seed(seed)
    clients = []
    for rank in ranks:
        lora_b = torch.randn(m, rank, generator=generator, dtype=torch.float64)
        lora_a = torch.randn(rank, n, generator=generator, dtype=torch.float64) / n**0.5
        if decay:
            lora_b = lora_b * torch.logspace(0, -3, rank, dtype=torch.float64)
        clients.append(ClientModule(lora_a=lora_a, lora_b=lora_b, scale=16.0 / rank**0.5))
    sizes = torch.rand(len(ranks), generator=generator, dtype=torch.float64) + 0.2
    return clients, (sizes / sizes.sum()).tolist()


def plain(name, clients, weights, **options):
    return get_method(name, **options).aggregate([{"m": c} for c in clients], weights).modules["m"]


SHAPES = [(256, 192), (200, 320), (96, 200)]  # the last: Σ r_k = 152 > m, the sketch capped at m


@pytest.mark.parametrize("shape", SHAPES)
class TestExactSketch:
    def test_florist_equals_the_stacked_svd(self, shape):
        clients, weights = heterogeneous_clients(shape, decay=True)
        update = sketch.sketched_update(clients, weights, SEED, "layers.0.q_proj")
        assert update.columns == min(sum(RANKS) + sketch.OVERSAMPLING, *shape) and update.error is None
        for threshold in (1.0, 0.9, 0.6):
            reference = plain("florist", clients, weights, threshold=threshold)
            sketched = sketch.florist_from_sketch(update, threshold)
            assert sketched.selected_rank == reference.selected_rank
            rank = reference.selected_rank
            assert relative_error(sketched.delta_weight, reference.delta_weight) < 1e-12
            k = min(sum(RANKS), *shape)
            assert relative_error(sketched.singular_values[:k], reference.singular_values[:k]) < 1e-12
            assert rank > 1 and (threshold == 1.0) == (rank == k)

    def test_flexlora_equals_its_dense_svd(self, shape):
        clients, weights = heterogeneous_clients(shape, seed=1)
        update = sketch.sketched_update(clients, weights, SEED, "layers.0.v_proj")
        reference = plain("flexlora", clients, weights)
        sketched = sketch.flexlora_from_sketch(update, RANKS)
        assert sketched.selected_rank == reference.selected_rank == max(RANKS)
        assert relative_error(sketched.delta_weight, reference.delta_weight) < 1e-12
        for (b, a), (ref_b, ref_a) in zip(sketched.client_factors, reference.client_factors, strict=True):
            assert b.shape == ref_b.shape and relative_error(b @ a, ref_b.double() @ ref_a.double()) < 1e-12

    def test_fedex_residual_equals_the_plain_residual(self, shape):
        clients, weights = heterogeneous_clients(shape, seed=2)
        update = sketch.sketched_update(clients, weights, SEED, "layers.0.q_proj")
        averages = FedIT().aggregate_module(clients, torch.tensor(weights, dtype=torch.float64))
        reference = plain("fedex", clients, weights)
        sketched = sketch.fedex_from_sketch(update, averages.lora_b, averages.lora_a)
        assert sketched.continued_rank == reference.continued_rank == max(RANKS)
        assert sketched.selected_rank == reference.selected_rank
        assert relative_error(sketched.delta_weight, reference.delta_weight) < 1e-12
        continued = sketched.continued_rank
        assert torch.equal(sketched.lora_b[:, :continued], averages.lora_b)


def test_the_sketch_sums_are_the_only_thing_the_server_needs():
    """Y and Z are sums of per-client terms: summing the clients' sketches in any grouping gives the
    same basis and projection (what a secure sum reveals is all the server uses)."""
    clients, weights = heterogeneous_clients((128, 96), ranks=[8, 4, 4, 2])
    omega = sketch.sketch_matrix(96, 18, SEED, "m")
    parts = [sketch.range_sketch(c, w, omega) for c, w in zip(clients, weights)]
    dense = sum(w * c.scale * c.lora_b @ c.lora_a for c, w in zip(clients, weights))
    assert relative_error(sum(parts), dense @ omega) < 1e-13
    basis = sketch.range_basis(sum(parts))
    projection = sum(sketch.projection_sketch(c, w, basis) for c, w in zip(clients, weights))
    assert relative_error(basis.apply(projection), dense) < 1e-12


def test_sketch_matrix_is_public_and_per_module():
    first = sketch.sketch_matrix(64, 8, SEED, "layers.0.q_proj")
    assert torch.equal(first, sketch.sketch_matrix(64, 8, SEED, "layers.0.q_proj"))
    assert not torch.equal(first, sketch.sketch_matrix(64, 8, SEED, "layers.0.v_proj"))
    assert not torch.equal(first, sketch.sketch_matrix(64, 8, SEED + 1, "layers.0.q_proj"))
    assert not torch.equal(first, sketch.sketch_matrix(64, 8, SEED, "layers.0.q_proj", purpose="error"))
    assert first.dtype == torch.float64 and abs(float(first.std()) - 1.0) < 0.2


@pytest.mark.parametrize("columns", [40, 100, 140])
def test_a_narrower_sketch_measures_its_error(columns):
    """p < R: the update becomes its projection on a p-dimensional range; the estimated error (from the
    check sketch's sum alone) tracks the true one, and FLoRIST's result is that projection's truncation."""
    shape = (256, 192)
    clients, weights = heterogeneous_clients(shape, decay=True, seed=3)
    update = sketch.sketched_update(clients, weights, SEED, "m", columns=columns)
    dense = sum(w * c.scale * c.lora_b @ c.lora_a for c, w in zip(clients, weights))
    true_error = relative_error(update.basis.apply(update.projection), dense)
    assert update.error is not None and 0.3 * true_error <= update.error <= 3.0 * true_error
    assert true_error > 1e-6  # really approximate
    result = sketch.florist_from_sketch(update, 1.0)
    assert update.record() == {"columns": columns, "estimated_relative_error": update.error}
    assert relative_error(result.delta_weight, dense) == pytest.approx(true_error, rel=1e-6)
    assert result.selected_rank <= columns


def test_bf16_clients_are_sketched_in_fp64():
    clients, weights = heterogeneous_clients((64, 48), ranks=[8, 4, 2])
    low = [ClientModule(c.lora_a.bfloat16(), c.lora_b.bfloat16(), c.scale) for c in clients]
    update = sketch.sketched_update(low, weights, SEED, "m")
    assert update.basis.reflectors.dtype == update.basis.tau.dtype == update.projection.dtype == torch.float64
    reference = plain("florist", low, weights, threshold=1.0)
    assert relative_error(sketch.florist_from_sketch(update, 1.0).delta_weight, reference.delta_weight) < 1e-10


def test_a_method_that_declares_sketch_sums_finishes_from_them_itself():
    """The registry holds each sketch method's own finishing (`from_sketch`, in its module): what the
    secure server step calls, and the same result as the module-level sketch math."""
    from florist_hf.aggregation import METHODS, SKETCH_SUMS, register_method
    from florist_hf.aggregation.base import AggregationMethod

    assert {name for name, method in METHODS.items() if SKETCH_SUMS in method.needs} == {"florist", "flexlora", "fedex"}
    clients, weights = heterogeneous_clients((96, 80), ranks=[8, 4, 4], decay=True)
    update = sketch.sketched_update(clients, weights, SEED, "m")
    ours = get_method("florist", threshold=0.9).from_sketch(update, [8, 4, 4])
    assert torch.equal(ours.delta_weight, sketch.florist_from_sketch(update, 0.9).delta_weight)

    class Forgetful(AggregationMethod):
        name, exact, needs = "forgetful", True, frozenset({SKETCH_SUMS})

        def aggregate_module(self, clients, client_weights, result_dtype=None):
            raise AssertionError

    with pytest.raises(TypeError, match="exactly when it defines from_sketch"):
        register_method(Forgetful)
    assert "forgetful" not in METHODS


@pytest.mark.parametrize("shape", [(300, 40), (40, 40), (50, 6)], ids=["tall", "square", "rank-deficient"])
def test_the_broadcast_basis_is_q_as_householder_reflectors_and_nothing_else(shape):
    """range_basis sends Q as geqrf's reflectors with R cleared (no trace of the summed sketch's norms):
    applying them gives what the formed Q gives, Q itself is the QR's (to the bit), and the complement's
    norm is the residual's. The square and rank-deficient cases hold reflectors of τ = 0 (identities)."""
    generator = torch.Generator().manual_seed(sum(shape))
    m, p = shape
    summed = torch.randn(m, p, generator=generator, dtype=torch.float64)
    if shape == (50, 6):
        summed[:, 1:] = 0.0
    basis = sketch.range_basis(summed)
    q = basis.dense()
    assert torch.equal(q, torch.linalg.qr(summed, mode="reduced").Q)
    assert torch.equal(torch.triu(basis.reflectors), torch.zeros_like(basis.reflectors))
    assert basis.shape == (m, p) and basis.columns == p and basis.tau.shape == (p,)
    assert relative_error(q.T @ q, torch.eye(p, dtype=torch.float64)) < 1e-14
    if shape != (300, 40):
        assert float(basis.tau.min()) == 0.0
    for width in (7, 30):  # ormqr (at most p/4 columns) and, where every τ > 0, the WY form
        x = torch.randn(p, width, generator=generator, dtype=torch.float64)
        assert relative_error(basis.apply(x), q @ x) < 1e-14 and basis.apply(x).is_contiguous()
    y = torch.randn(m, 5, generator=generator, dtype=torch.float64)
    assert relative_error(basis.apply_transpose(y), q.T @ y) < 1e-14
    assert basis.residual_norm(y) == pytest.approx(float((y - q @ (q.T @ y)).norm()), rel=1e-12)


@pytest.mark.parametrize("shape", [(4096, 160), (576, 160), (50, 6)], ids=["llama", "smollm2", "rank-deficient"])
def test_a_basis_from_an_fp32_qr_is_orthogonal_to_fp64_precision_and_spans_the_sketch_to_fp32s(shape):
    """range_basis at fp32 precision (FLoRIST for a 16-bit result): the reflectors travel in fp64 with τ
    recomputed there, so Q is orthogonal to fp64 precision, not fp32's (with fp32's own τ it is off by
    ~1e-7); its span holds the summed sketch to fp32's precision; a zero column keeps τ = 0; and Q·x in
    fp32 (the kept factor's last product) is Q·x to fp32's precision, on both paths."""
    generator = torch.Generator().manual_seed(sum(shape))
    m, p = shape
    rank = min(p - 8, m) if p > 8 else 1
    summed = (torch.randn(m, rank, generator=generator, dtype=torch.float64) * torch.logspace(0, -3, rank, dtype=torch.float64)
              ) @ torch.randn(rank, p, generator=generator, dtype=torch.float64)
    if shape == (50, 6):
        summed[:, 1:] = 0.0
    basis = sketch.range_basis(summed, torch.float32)
    assert basis.reflectors.dtype == basis.tau.dtype == torch.float64 and basis.reflectors.stride()[0] == 1
    q = basis.dense()
    assert relative_error(q.T @ q, torch.eye(p, dtype=torch.float64)) < 1e-14
    reflectors32, tau32 = torch.geqrf(summed.float())
    unfixed = torch.linalg.householder_product(reflectors32.double(), tau32.double())
    assert relative_error(unfixed.T @ unfixed, torch.eye(p, dtype=torch.float64)) > 1e-9  # what recomputing τ mends
    assert basis.residual_norm(summed) < 1e-6 * float(summed.norm())
    if shape == (50, 6):
        assert float(basis.tau[1:].abs().max()) == 0.0
    for width in (7, 40):
        x = torch.randn(p, width, generator=generator, dtype=torch.float64)
        got = basis.apply(x, torch.float32)
        assert got.dtype == torch.float32 and relative_error(got.double(), q @ x) < 1e-6
