"""SecAgg+ (florist_hf/secure): the server unmasks the clients' sum and nothing else; up to n − t clients
may vanish after masking; fewer than t replies fail in one line; the result does not depend on the keys."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from florist_hf.secure import SecAggSettings, SecureAggregationError
from florist_hf.secure.local import secure_sum
from florist_hf.secure.protocol import ArrayJobs, SecAggClient, SecAggServer
from florist_hf.secure import encoding
from florist_hf.secure.protocol import EncryptedShares, MaskedInput, PublicKeys, RevealedShares, UnmaskRequest

N_CLIENTS = 8  # default threshold ⌈2·8/3⌉ = 6: two may vanish


def client_inputs(n=N_CLIENTS, seed=0):
    """Sketch-like arrays: a few named blocks of very different scales per client (ids need not be 0..n-1)."""
    rng = np.random.default_rng(seed)
    return {
        100 + 7 * k: {
            "layers.0.q_proj.range": 0.05 * rng.standard_normal((64, 40)),
            "layers.0.v_proj.range": 3.0 * rng.standard_normal((48, 40)),
            "layers.0.q_proj.lora_a": rng.standard_normal((4, 16)) * 1e-4,
        }
        for k in range(n)
    }


def plain_sum(inputs, included):
    return {name: sum(inputs[cid][name] for cid in included) for name in inputs[next(iter(inputs))]}


def encoding_tolerance(n, fraction_bits):
    return encoding.sum_error(n, fraction_bits) * (1 + 1e-9)  # plus fp64 round-off


@pytest.mark.parametrize("fraction_bits", [32, 16])
def test_the_unmasked_sum_equals_the_plain_sum_within_the_encoding(fraction_bits):
    inputs = client_inputs()
    result = secure_sum(inputs, SecAggSettings(fraction_bits=fraction_bits))
    assert result.included == tuple(sorted(inputs))
    expected = plain_sum(inputs, inputs)
    errors = [float(np.abs(result.arrays[name] - expected[name]).max()) for name in expected]
    assert max(errors) <= encoding_tolerance(N_CLIENTS, fraction_bits)
    assert max(errors) > 0  # really quantised, not passed through
    assert all(result.arrays[name].dtype == np.float64 and result.arrays[name].shape == expected[name].shape
               for name in expected)


def test_the_result_does_not_depend_on_the_keys():
    """Fresh key pairs, seeds and Shamir polynomials every run, the same sum to the bit: a round resumed
    after a kill mid-protocol reruns it and publishes what an uninterrupted run would have."""
    inputs = client_inputs()
    first, second = secure_sum(inputs), secure_sum(inputs)
    assert all(np.array_equal(first.arrays[name], second.arrays[name]) for name in first.arrays)


@pytest.mark.parametrize("vanish", [
    {"masked": {107, 142}},  # shared their keys, never sent a masked input: their pairwise masks are rebuilt
    {"unmask": {100, 149}},  # sent their masked inputs, then vanished: their self masks are rebuilt
    {"masked": {114}, "unmask": {121}},
    {"shares": {128}, "masked": {135}},  # one before sharing (never in the masks at all), one after
])
def test_up_to_n_minus_t_clients_may_vanish(vanish):
    inputs = client_inputs()
    result = secure_sum(inputs, vanish=vanish)
    before_masking = set(vanish.get("masked", ())) | set(vanish.get("shares", ()))
    assert set(result.included) == set(inputs) - before_masking
    expected = plain_sum(inputs, result.included)
    for name in expected:
        assert float(np.abs(result.arrays[name] - expected[name]).max()) <= encoding_tolerance(N_CLIENTS, 32)


@pytest.mark.parametrize("vanish", [{"masked": {100, 107, 114}}, {"unmask": {100, 107, 114}}, {"keys": {100, 107, 114}},
                                    {"masked": {100, 107}, "unmask": {114}}])
def test_more_than_n_minus_t_vanishing_fails_in_one_line(vanish):
    with pytest.raises(SecureAggregationError) as error:
        secure_sum(client_inputs(), vanish=vanish)
    message = str(error.value)
    assert "\n" not in message and "5 of 8 clients replied and the threshold is 6" in message
    assert "nothing was aggregated" in message


def test_a_lower_threshold_tolerates_more_vanishing():
    inputs = client_inputs()
    result = secure_sum(inputs, SecAggSettings(threshold=5), vanish={"masked": {100, 107, 114}})
    assert len(result.included) == 5


def test_the_server_never_holds_a_clients_update():
    """Every message the server receives is recorded: each masked array is uniform-looking in the ring,
    equals no client's encoding (or a partial sum of them) and does not correlate with any client's
    input; keys and shares are opaque bytes that hold no input; the revealed shares never give the
    server both secrets of one client."""
    inputs = client_inputs(seed=3)
    result = secure_sum(inputs, vanish={"unmask": {121}}, keep_transcript=True)
    kinds = {type(message) for message in result.transcript}
    assert kinds == {PublicKeys, EncryptedShares, MaskedInput, RevealedShares}
    masked = [message for message in result.transcript if isinstance(message, MaskedInput)]
    assert len(masked) == N_CLIENTS
    encoded = {cid: {name: encoding.encode(name, values, N_CLIENTS, 32) for name, values in arrays.items()}
               for cid, arrays in inputs.items()}
    for message in masked:
        for name, array in message.arrays.items():
            assert array.dtype == np.uint64
            signed = array.view(np.int64).astype(np.float64).ravel()
            # Uniform on the ring: the mean of the signed words is 0 within 6σ (a uniform word on [-1, 1)·2^63 has
            # σ = 2^63/√3, so the mean of N has 2^63/√(3N); a fixed 0.2 failed one array of 64 words in ~200).
            assert abs(signed.mean()) / 2.0**63 < 6 / np.sqrt(3 * signed.size)
            for cid, arrays in inputs.items():
                assert not np.array_equal(array, encoded[cid][name])
                assert np.mean(array == encoded[cid][name]) < 0.01
                correlation = abs(np.corrcoef(signed, arrays[name].ravel())[0, 1])
                assert correlation < 6 / np.sqrt(signed.size)  # ~6σ of independent data
    payload = b"".join(
        b"".join(m.ciphertexts.values()) if isinstance(m, EncryptedShares)
        else m.share_key + m.mask_key if isinstance(m, PublicKeys)
        else b"".join([*m.seed_shares.values(), *m.key_shares.values()]) if isinstance(m, RevealedShares)
        else b""
        for m in result.transcript
    )
    for cid, arrays in inputs.items():
        for name, values in arrays.items():
            assert values.tobytes()[:64] not in payload and encoded[cid][name].tobytes()[:64] not in payload
    for message in result.transcript:
        if isinstance(message, RevealedShares):
            assert not set(message.seed_shares) & set(message.key_shares)


def test_a_client_refuses_to_reveal_both_secrets_of_one_client():
    """A curious server that lists a present client as dropped too would get its mask key and its
    self-mask seed, hence its input: the client checks the request."""
    inputs = client_inputs(n=3)
    server = SecAggServer(inputs)
    clients = {cid: SecAggClient(cid, arrays) for cid, arrays in inputs.items()}
    keys = server.collect_keys([client.advertise_keys(server.setup()) for client in clients.values()])
    routed = server.route_shares([client.share_keys(keys) for client in clients.values()])
    server.collect_masked([client.mask_input(routed[cid]) for cid, client in clients.items()])
    honest = clients[100]
    with pytest.raises(SecureAggregationError, match="both present and dropped"):
        honest.reveal(UnmaskRequest(survivors=(100, 107, 114), dropped=(107,)))
    with pytest.raises(SecureAggregationError, match="threshold is 2"):
        honest.reveal(UnmaskRequest(survivors=(100,), dropped=(107, 114)))


def test_a_value_that_could_overflow_the_sum_is_refused_in_one_line():
    inputs = client_inputs(n=4)
    limit = encoding.max_encodable(4, 32)
    inputs[107]["layers.0.v_proj.range"][3, 5] = limit * 1.01
    with pytest.raises(SecureAggregationError) as error:
        secure_sum(inputs)
    assert "\n" not in str(error.value)
    assert "client 107's layers.0.v_proj.range" in str(error.value) and "fraction_bits" in str(error.value)
    inputs[107]["layers.0.v_proj.range"][3, 5] = np.nan
    with pytest.raises(SecureAggregationError, match="NaN or infinite"):
        secure_sum(inputs)


def test_values_near_the_limit_still_sum_exactly():
    """The largest admitted |x| summed over every client, all of one sign, stays inside int64."""
    limit = encoding.max_encodable(3, 32)
    inputs = {cid: {"x": np.full(5, 0.999 * limit)} for cid in (1, 2, 3)}
    result = secure_sum(inputs)
    assert np.allclose(result.arrays["x"], 3 * 0.999 * limit, rtol=1e-12)
    inputs = {cid: {"x": np.full(5, -0.999 * limit)} for cid in (1, 2, 3)}
    assert np.allclose(secure_sum(inputs).arrays["x"], -3 * 0.999 * limit, rtol=1e-12)


@pytest.mark.parametrize("threshold, clients, message", [
    (4, 8, r"threshold 4 is outside \(4, 8\]"),
    (9, 8, r"threshold 9 is outside"),
    (None, 1, "at least 2 clients"),
])
def test_settings_out_of_range_are_refused(threshold, clients, message):
    with pytest.raises(SecureAggregationError, match=message):
        SecAggServer(range(clients), SecAggSettings(threshold=threshold))


def test_fraction_bits_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"fraction_bits 60 is outside \[8, 52\]"):
        SecAggSettings(fraction_bits=60)


def test_masks_cancel_and_differ_per_seed_and_array():
    base = np.arange(10_000, dtype=np.uint64)
    target = base.copy()
    encoding.apply_mask(target, bytes(range(16)), 0, +1)
    assert np.mean(target == base) < 0.001
    other = base.copy()
    encoding.apply_mask(other, bytes(range(16)), 1, +1)
    assert np.mean(target == other) < 0.001
    reseeded = base.copy()
    encoding.apply_mask(reseeded, bytes(range(1, 17)), 0, +1)
    assert np.mean(target == reseeded) < 0.001
    encoding.apply_mask(target, bytes(range(16)), 0, -1)
    assert np.array_equal(target, base)
    with pytest.raises(ValueError, match="a mask seed is 16 bytes"):
        encoding.apply_mask(target, bytes(range(32)), 0, +1)


def test_a_client_outside_the_layout_is_refused():
    inputs = client_inputs(n=3)
    inputs[107] = {name: values[:-1] if name.endswith("range") else values for name, values in inputs[107].items()}
    with pytest.raises(SecureAggregationError, match="differ in names or shapes"):
        secure_sum(inputs)


def test_a_mask_longer_than_one_chunk_is_the_one_keystream():
    """Masks are expanded a chunk at a time into one reused buffer: the words are AES-128 in counter mode
    (GCM's encryption of zeros keyed by the 16-byte seed, the IV the array's index), unbroken across
    chunks: the AES encryptions of the counter blocks index ‖ 2, index ‖ 3, … (NIST SP 800-38D)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    size = encoding._MASK_CHUNK_WORDS * 2 + 12_345
    seed = bytes(range(1, 17))
    target = np.zeros(size, dtype=np.uint64).reshape(-1, 5) if size % 5 == 0 else np.zeros(size, dtype=np.uint64)
    encoding.apply_mask(target, seed, 7, +1)
    keystream = Cipher(algorithms.AES(seed), modes.GCM((7).to_bytes(12, "big"))).encryptor()
    expected = np.frombuffer(keystream.update(bytes(8 * size)), dtype="<u8")
    assert np.array_equal(target.ravel(), expected)
    # GCM's keystream is AES in counter mode: the same words as CTR from the counter block index ‖ 2.
    counter = Cipher(algorithms.AES(seed), modes.CTR((7).to_bytes(12, "big") + (2).to_bytes(4, "big"))).encryptor()
    assert np.array_equal(expected, np.frombuffer(counter.update(bytes(8 * size)), dtype="<u8"))
    with pytest.raises(ValueError, match="C-contiguous"):
        encoding.apply_mask(np.zeros((4, 4), dtype=np.uint64).T, seed, 0, +1)


def test_an_array_longer_than_one_keystream_is_refused(monkeypatch):
    """GCM's 32-bit block counter bounds what one IV's keystream covers: a longer array is refused in one
    line rather than masked with a keystream that OpenSSL would stop (or that would repeat)."""
    monkeypatch.setattr(encoding, "MAX_MASK_BYTES", 64)
    with pytest.raises(SecureAggregationError, match="beyond the 64 bytes one mask's keystream covers"):
        encoding.apply_mask(np.zeros(9, dtype=np.uint64), bytes(16), 0, +1)
    target = np.zeros(8, dtype=np.uint64)
    encoding.apply_mask(target, bytes(16), 0, +1)  # at the limit: masked
    assert target.any()


def test_several_masks_in_one_pass_are_the_masks_one_after_another():
    """``apply_masks`` (what clients and the server run: every mask added to a cache-sized piece before
    the next piece) gives the bits of ``apply_mask`` applied mask by mask, across piece boundaries."""
    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, size=(encoding._MASK_CHUNK_WORDS * 3 + 1_001) * 7, dtype=np.uint64).reshape(-1, 7)
    masks = [(bytes(rng.integers(0, 256, 16, dtype=np.uint8)), sign) for sign in (+1, -1, -1, +1)]
    one_by_one, fused = base.copy(), base.copy()
    for seed, sign in masks:
        encoding.apply_mask(one_by_one, seed, 3, sign)
    encoding.apply_masks(fused, masks, 3)
    assert np.array_equal(fused, one_by_one) and not np.array_equal(fused, base)
    encoding.apply_masks(fused, [(seed, -sign) for seed, sign in masks], 3)
    assert np.array_equal(fused, base)


@pytest.mark.parametrize("fraction_bits", [32, 16])
def test_encoding_and_in_place_decoding_are_the_fixed_point_formulas(fraction_bits):
    """encode = round(x·2^f) as uint64 (one new C-contiguous array, also from a transposed input);
    decode writes the fp64 value over the sum's own memory, the bits of ldexp(int64, −f)."""
    rng = np.random.default_rng(fraction_bits)
    values = rng.standard_normal((300, 40)) * 10.0 ** rng.integers(-9, 3, (300, 40))
    for x in (values, values.T):
        encoded = encoding.encode("x", x, N_CLIENTS, fraction_bits)
        assert encoded.dtype == np.uint64 and encoded.flags.c_contiguous
        assert np.array_equal(encoded, np.rint(np.ldexp(x, fraction_bits)).astype(np.int64).view(np.uint64))
    total = encoded * np.uint64(N_CLIENTS)  # a sum of encodings (mod 2^64), negative entries included
    expected = np.ldexp(total.view(np.int64).astype(np.float64), -fraction_bits)
    decoded = encoding.decode(total, fraction_bits)
    assert np.shares_memory(decoded, total) and np.array_equal(decoded, expected)
    with pytest.raises(ValueError, match="in place"):
        encoding.decode(np.zeros((4, 4), dtype=np.uint64).T, fraction_bits)


def test_unmasking_decodes_each_piece_as_the_masks_come_off_and_hands_each_array_over_at_once():
    """``unmask_and_decode`` (the server's one pass) gives the bits of ``apply_masks`` then ``decode``;
    the server hands each decoded array to ``on_array`` as it has it, in name order, the same arrays
    it returns."""
    rng = np.random.default_rng(9)
    base = rng.integers(0, 2**64, size=(encoding._MASK_CHUNK_WORDS * 2 + 77) * 3, dtype=np.uint64).reshape(-1, 3)
    masks = [(bytes(rng.integers(0, 256, 16, dtype=np.uint8)), sign) for sign in (+1, -1, +1)]
    one, fused = base.copy(), base.copy()
    encoding.apply_masks(one, masks, 4)
    expected = encoding.decode(one, 32)
    decoded = encoding.unmask_and_decode(fused, masks, 4, 32)
    assert np.shares_memory(decoded, fused) and np.array_equal(decoded.view(np.uint64), expected.view(np.uint64))
    with pytest.raises(ValueError, match="in place"):
        encoding.unmask_and_decode(np.zeros((4, 4), dtype=np.uint64).T, masks, 0, 32)

    seen = []
    result = secure_sum(client_inputs(), jobs=ArrayJobs(then=lambda name, values: seen.append((name, values))))
    assert [name for name, _ in seen] == sorted(result.arrays)
    assert all(values is result.arrays[name] for name, values in seen)

    # On worker threads (each array's unmasking and what follows it one job): the same sum to the bit,
    # every array handed over once, from the thread that unmasked it.
    threads, lock = {}, threading.Lock()

    def then(name, values):
        with lock:
            threads[name] = threading.current_thread().name

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="unmask") as pool:
        parallel = secure_sum(client_inputs(), jobs=ArrayJobs(then=then, submit=pool.submit))
    assert sorted(threads) == sorted(result.arrays) and all(name.startswith("unmask") for name in threads.values())
    assert all(np.array_equal(parallel.arrays[name].view(np.uint64), result.arrays[name].view(np.uint64))
               for name in result.arrays)


def test_computed_arrays_are_encoded_over_their_own_memory_and_given_arrays_are_not_touched():
    values = np.random.default_rng(0).normal(size=(64, 8))
    expected = encoding.encode("x", values, 4, 32)
    given = values.copy()
    in_place = encoding.encode("x", given, 4, 32, in_place=True)
    assert np.array_equal(in_place, expected) and np.shares_memory(in_place, given)
    strided = values.copy()[:, ::2]  # not C-contiguous: a new array, the input left as it was
    assert not np.shares_memory(encoding.encode("x", strided, 4, 32, in_place=True), strided)
    assert np.array_equal(strided, values[:, ::2])
    # A client given its arrays (not computing them) leaves them as they were.
    kept = {"a": values.copy()}
    secure_sum({0: kept, 1: {"a": values.copy()}, 2: {"a": values.copy()}})
    assert np.array_equal(kept["a"], values)


def test_a_local_secure_sum_holds_one_masked_input_at_a_time():
    """Each masked input is let go once the server has added it, before the next client computes and
    masks its own: no earlier input is alive when the next arrives."""
    import weakref

    refs, alive = [], []

    def watch(message):
        if isinstance(message, MaskedInput):
            refs.append(weakref.ref(message))

    def compute(k):  # called as client k masks: the earlier inputs are added by then
        alive.append(sum(ref() is not None for ref in refs))
        return {"x": np.full(1000, float(k))}

    summed = secure_sum({k: (lambda k=k: compute(k)) for k in range(5)}, on_message=watch)
    assert len(refs) == 5 and alive == [0] * 5
    assert np.allclose(summed.arrays["x"], 10.0)
