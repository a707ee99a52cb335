"""The ring the masked sums live in: fixed-point encoding of fp64 values to uint64 (mod 2^64), and
the masks, expanded from 16-byte seeds by AES-128 in counter mode (GCM's) from the ``cryptography`` package.

Not Flower's ``pseudo_rand_gen``: it folds the seed to 32 bits and draws from numpy's RandomState
(a Mersenne Twister, predictable from its output), so a mask would carry 32 bits of secrecy at most.
Not Flower's ``quantize`` either: it rounds stochastically from numpy's global, unseeded generator;
here rounding is to nearest, so the decoded sum is the same number every time the round runs.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from florist_hf.secure.errors import SecureAggregationError

# A value x travels as round(x·2^f) mod 2^64 (f = settings.FRACTION_BITS by default): |error| ≤ 2^-(f+1) per client.
#: Bytes of a mask seed, the key of the mask's AES-128: the self-mask seed b_u (random), and the first
#: 16 bytes of a pairwise key agreement's HKDF output. 128-bit security, the level of the Fernet (AES-128)
#: encryption that carries the protocol's shares; and a 16-byte b_u is two chunks for Flower's Shamir
#: sharing (the secret is padded to whole 16-byte blocks, a block more when it fills them) where 32
#: bytes were three: the server rebuilds each survivor's b_u in 4.0 ms of pure Python instead of 6.2
#: here. AES in counter mode is the fastest keystream the ``cryptography`` package has on CPUs with AES
#: instructions (ChaCha20 took 1.5× as long here), and
#: its fastest counter mode is GCM's: GCM encrypts by AES in counter mode (NIST SP 800-38D's GCTR,
#: counter blocks IV ‖ 2, IV ‖ 3, … for a 96-bit IV), and OpenSSL runs it with VAES and AVX-512 where
#: its CTR mode has no such path: 25 GB/s against 12 GB/s on the development machine (AMD EPYC,
#: OpenSSL 4.0), GHASH included. The keystream is GCM's encryption of zeros; its tag is never taken.
SEED_BYTES = 16
#: GCM's 32-bit block counter gives one IV at most 2^32 − 2 blocks: the longest array a mask covers.
MAX_MASK_BYTES = 16 * (2**32 - 2)
#: Masks are expanded and applied in pieces of this many uint64 words (256 KiB): a piece of the
#: target and of the keystream stay in the core's cache while every mask is added to it.
_MASK_CHUNK_WORDS = 1 << 15
_ZEROS = memoryview(bytes(8 * _MASK_CHUNK_WORDS))


def max_encodable(num_clients: int, fraction_bits: int) -> float:
    """The largest |x| a client may send so that a sum over ``num_clients`` still fits in int64."""
    return float(2 ** (63 - fraction_bits)) / num_clients


def sum_error(num_clients: int, fraction_bits: int) -> float:
    """The largest absolute error of one decoded entry of a sum over ``num_clients``: each encoding
    rounds to nearest, off by at most half a unit of 2^-f."""
    return num_clients * 2.0 ** -(fraction_bits + 1)


def sensitivity_slack(num_clients: int, entries: int, fraction_bits: int) -> float:
    """How much further than its real contribution one client's presence can move a decoded sum over
    ``num_clients``, in L2 over ``entries`` summed values: adding or removing a client changes every
    client's weights (uniform, 1/n), so each of the n rounded inputs may round the other way, by at
    most 2^-f an entry: n·√entries·2^-f in all."""
    return num_clients * math.sqrt(entries) * 2.0 ** -fraction_bits


def encode(name: str, values: np.ndarray, num_clients: int, fraction_bits: int, in_place: bool = False) -> np.ndarray:
    """round(values·2^f) as two's-complement uint64 (a new C-contiguous array; with ``in_place``, written
    over ``values``' own memory where it is a writeable C-contiguous fp64 array, which it then no longer
    holds); refuses (one line) a value whose sum over ``num_clients`` could overflow, or a non-finite one."""
    values = np.asarray(values, dtype=np.float64)
    # max and min rather than abs().max(): no array-sized temporary; a NaN propagates through both.
    largest = max(-float(values.min(initial=0.0)), float(values.max(initial=0.0)))
    limit = max_encodable(num_clients, fraction_bits)
    if not np.isfinite(largest):
        raise SecureAggregationError(f"secure aggregation: {name} holds a NaN or infinite value; a masked sum cannot "
                                     "carry it (check the client's training for divergence)")
    if largest >= limit:
        raise SecureAggregationError(
            f"secure aggregation: {name} holds |x| = {largest:.3g}, beyond the {limit:.3g} that {num_clients} clients "
            f"can sum at {fraction_bits} fractional bits; lower federation.secure_aggregation.fraction_bits")
    if in_place and values.flags.c_contiguous and values.flags.writeable:
        scaled = np.ldexp(values, fraction_bits, out=values)
    else:
        scaled = np.ldexp(values, fraction_bits, order="C")  # the one new array: rounded and cast in place
    encoded = scaled.view(np.int64)
    np.rint(scaled, out=encoded, casting="unsafe")  # an integer below 2^63 in magnitude: the cast is exact
    return encoded.view(np.uint64)


def _check_decodable(encoded_sum: np.ndarray) -> None:
    if encoded_sum.dtype != np.uint64 or not encoded_sum.flags.c_contiguous or not encoded_sum.flags.writeable:
        raise ValueError("a sum is decoded in place: a writeable C-contiguous uint64 array")


def decode(encoded_sum: np.ndarray, fraction_bits: int) -> np.ndarray:
    """The fp64 value of a uint64 sum of encodings (read as int64), written over the sum's own memory
    (a C-contiguous uint64 array, which is left holding the fp64 bits) and returned as its fp64 view."""
    _check_decodable(encoded_sum)
    # int64 → fp64 rounds to nearest; the power-of-two scale is exact: the same bits as ldexp.
    decoded = encoded_sum.view(np.float64)
    np.multiply(encoded_sum.view(np.int64), 2.0**-fraction_bits, out=decoded, casting="unsafe")
    return decoded


def _keystream(seed: bytes, index: int):
    # The 96-bit IV is the array's index (each array of one secure sum its own): the counter blocks
    # are the index's 12 big-endian bytes followed by GCM's 32-bit block counter, from 2.
    return Cipher(algorithms.AES(seed), modes.GCM(index.to_bytes(12, "big"))).encryptor()


def apply_mask(target: np.ndarray, seed: bytes, index: int, sign: int) -> None:
    """target += sign·mask (mod 2^64), in place; the mask is AES-128-GCM's keystream (its encryption
    of zeros: AES in counter mode) under the 16-byte ``seed``, its IV the array's ``index``
    (each array of one secure sum its own), read as little-endian uint64 words."""
    apply_masks(target, [(seed, sign)], index)


def apply_masks(target: np.ndarray, masks: Sequence[tuple[bytes, int]], index: int) -> None:
    """target += Σ sign·mask(seed) (mod 2^64) over ``masks`` ((seed, sign) pairs), in place, each
    mask as ``apply_mask`` draws it; one pass over ``target``, a cache-sized piece at a time."""
    _apply_masks(target, masks, index, None)


def unmask_and_decode(total: np.ndarray, masks: Sequence[tuple[bytes, int]], index: int, fraction_bits: int
                      ) -> np.ndarray:
    """``apply_masks`` then ``decode``, in the same one pass: each piece is decoded as soon as its
    masks are off, while it is still in cache. Returns the fp64 view of ``total``'s memory."""
    _check_decodable(total)
    _apply_masks(total, masks, index, fraction_bits)
    return total.view(np.float64)


def _apply_masks(target: np.ndarray, masks: Sequence[tuple[bytes, int]], index: int, decode_bits: int | None) -> None:
    if any(len(seed) != SEED_BYTES for seed, _ in masks):
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {sorted({len(seed) for seed, _ in masks})}")
    if not target.flags.c_contiguous:
        raise ValueError("a masked array must be C-contiguous (it is masked in place)")
    if target.nbytes > MAX_MASK_BYTES:
        raise SecureAggregationError(f"secure aggregation: an array of {target.nbytes} bytes is beyond the "
                                     f"{MAX_MASK_BYTES} bytes one mask's keystream covers; no module's sum is that "
                                     "large (check the adapter's shapes)")
    streams = [(_keystream(seed, index), np.add if sign > 0 else np.subtract) for seed, sign in masks]
    flat = target.reshape(-1)  # a view
    # The keystream is the encryption of zeros, written into one reused buffer (update_into: about
    # twice update's speed, which allocates the output every call).
    buffer = bytearray(8 * min(flat.size, _MASK_CHUNK_WORDS) + 64)
    for start in range(0, flat.size, _MASK_CHUNK_WORDS):
        piece = flat[start : start + _MASK_CHUNK_WORDS]
        mask = np.frombuffer(buffer, dtype="<u8", count=piece.size)
        for keystream, combine in streams:
            keystream.update_into(_ZEROS[: 8 * piece.size], buffer)
            combine(piece, mask, out=piece)
        if decode_bits is not None:
            decode(piece, decode_bits)
