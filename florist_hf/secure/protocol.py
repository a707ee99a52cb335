"""SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017) as a client and a server exchanging
in-memory messages: the server learns the sum of the clients' arrays and nothing else, and recovers
the sum when up to n − t clients vanish after masking.

Built on Flower's primitives, as Flower's own SecAgg+ mod is: EC key pairs (SECP384R1) and ECDH+HKDF
key agreement (``generate_shared_key``), Fernet encryption of the share payloads (``encrypt`` /
``decrypt``, framed by ``share_keys_plaintext_concat`` / ``_separate``), Shamir sharing (``create_shares``
/ ``combine_shares``, pycryptodome). Masks come from ``encoding.apply_masks`` (AES-128 in counter
mode). Every client is every other's neighbour (Flower's ring neighbourhood with num_shares = n): at
federations of tens of clients the n² key agreements cost little, and the threshold then bounds the
whole federation.

Stages (each a server → clients → server exchange; the surviving set shrinks, never grows):
  0. setup: the server names the clients, the threshold t and the encoding;
  1. keys: each client sends two public keys (one to encrypt its shares, one to agree its masks);
  2. shares: each client Shamir-shares its self-mask seed b_u and its mask private key among all,
     encrypted per recipient; the server routes the ciphertexts it cannot read;
  3. masked input: y_u = encode(x_u) + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^64 (+ where u < v, − where
     u > v, so each pair's masks cancel in the sum); the server adds them up;
  4. unmask: each survivor reveals, per other client, the b-share of a client whose input arrived or
     the key share of one that vanished (never both for one client); t of them rebuild each secret.
Fewer than t clients at any stage: a SecureAggregationError, and no sum.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from florist_hf.secure.encoding import SEED_BYTES, apply_masks, encode, unmask_and_decode
from florist_hf.secure.errors import SecureAggregationError
from florist_hf.secure.settings import SecAggSettings

try:
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_utils import (
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )
except ImportError as error:  # pragma: no cover - the flower extra is missing
    raise SecureAggregationError("secure aggregation builds on Flower's SecAgg+ primitives; install them with "
                                 "pip install 'florist-hf[flower]'") from error

STAGES = ("keys", "shares", "masked", "unmask")
#: What the server sends each client at each stage, and the client's method that answers it.
_ANSWERS = {"keys": "advertise_keys", "shares": "share_keys", "masked": "mask_input", "unmask": "reveal"}


# ---- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Server → every client: who takes part and how."""

    client_ids: tuple[int, ...]
    threshold: int
    fraction_bits: int


@dataclass(frozen=True)
class PublicKeys:
    """Client → server → every client (stage 1): PEM public keys."""

    client_id: int
    share_key: bytes  # encrypts the shares this client receives
    mask_key: bytes  # agrees the pairwise masks


@dataclass(frozen=True)
class EncryptedShares:
    """Client → server (stage 2): one Fernet ciphertext per other client, keyed by recipient."""

    client_id: int
    ciphertexts: dict[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Client → server (stage 3): the masked encodings, uint64, by array name."""

    client_id: int
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class UnmaskRequest:
    """Server → every survivor (stage 4): whose input arrived and whose did not."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class RevealedShares:
    """Client → server (stage 4): self-mask seed shares of survivors, mask-key shares of the dropped."""

    client_id: int
    seed_shares: dict[int, bytes]
    key_shares: dict[int, bytes]


def _too_few(stage: str, replied: int, total: int, threshold: int) -> SecureAggregationError:
    return SecureAggregationError(
        f"secure aggregation failed at its {stage} stage: {replied} of {total} clients replied and the threshold is "
        f"{threshold}; nothing was aggregated (rerun the round, or lower federation.secure_aggregation.threshold)")


def _owned(values) -> np.ndarray:
    """A received masked array as a writeable C-contiguous uint64 array: itself when it already is
    one (the server owns what it receives: no copy), else a copy."""
    if isinstance(values, np.ndarray) and values.dtype == np.uint64 and values.flags.c_contiguous \
            and values.flags.writeable:
        return values
    return np.array(values, dtype=np.uint64, order="C")


def _add_into(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    """total += values (mod 2^64), in place, for each (total, values) pair."""
    for total, values in pairs:
        np.add(total, values, out=total)


def _key_bytes(shared_key: bytes) -> bytes:
    # generate_shared_key returns the 32-byte HKDF output base64-encoded (Fernet's key format); its first
    # 16 bytes seed the pair's mask (an AES-128 key, as b_u is).
    return base64.urlsafe_b64decode(shared_key)[:SEED_BYTES]


# ---- client ---------------------------------------------------------------------------------------


class SecAggClient:
    """One client's side of one secure sum: it holds its arrays and its secrets, and answers each stage."""

    def __init__(self, client_id: int, arrays: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]):
        """``arrays``: what to sum, or a function that computes it when the client masks (then it is
        held only while it is masked: a process simulating many clients holds one client's at a time)."""
        if client_id < 0:
            raise ValueError("client ids are non-negative integers (they travel as 8-byte unsigned)")
        self.client_id = client_id
        self._arrays = arrays

    def respond(self, stage: str, request):
        """The reply to the server's request of one stage (`run_stages` names what each stage sends)."""
        return getattr(self, _ANSWERS[stage])(request)

    def advertise_keys(self, setup: Setup) -> PublicKeys:
        if self.client_id not in setup.client_ids:
            raise SecureAggregationError(f"secure aggregation: client {self.client_id} is not in this session")
        if not len(setup.client_ids) // 2 < setup.threshold <= len(setup.client_ids) or setup.threshold < 2:
            # A server that asked for fewer could rebuild the secrets of a client it pretends has dropped.
            raise SecureAggregationError(
                f"secure aggregation: client {self.client_id} refuses threshold {setup.threshold} for "
                f"{len(setup.client_ids)} clients: more than half (and at least 2) must be needed to unmask")
        self._setup = setup
        self._share_secret, share_public = generate_key_pairs()
        self._mask_secret, mask_public = generate_key_pairs()
        self._own_keys = PublicKeys(self.client_id, public_key_to_bytes(share_public), public_key_to_bytes(mask_public))
        return self._own_keys

    def share_keys(self, keys: Mapping[int, PublicKeys]) -> EncryptedShares:
        """Shamir-share b_u and the mask private key among every client that advertised keys."""
        setup = self._setup
        if keys.get(self.client_id) != self._own_keys:
            raise SecureAggregationError(f"secure aggregation: client {self.client_id}'s own keys came back altered")
        if len(keys) < setup.threshold or not set(keys) <= set(setup.client_ids):
            raise _too_few("keys", len(keys), len(setup.client_ids), setup.threshold)
        self._keys = dict(keys)
        self._seed = secrets.token_bytes(SEED_BYTES)  # b_u: the self mask's seed
        holders = sorted(keys)
        seed_shares = create_shares(self._seed, setup.threshold, len(holders))
        key_shares = create_shares(private_key_to_bytes(self._mask_secret), setup.threshold, len(holders))
        ciphertexts = {}
        for holder, seed_share, key_share in zip(holders, seed_shares, key_shares, strict=True):
            plaintext = share_keys_plaintext_concat(self.client_id, holder, seed_share, key_share)
            if holder == self.client_id:  # its own share stays here
                self._received = {self.client_id: (seed_share, key_share)}
                continue
            ciphertexts[holder] = encrypt(self._agree(keys[holder].share_key, self._share_secret), plaintext)
        return EncryptedShares(self.client_id, ciphertexts)

    def _agree(self, public_pem: bytes, secret) -> bytes:
        return generate_shared_key(secret, bytes_to_public_key(public_pem))

    def mask_input(self, ciphertexts: Mapping[int, bytes]) -> MaskedInput:
        """Decrypt the shares addressed here; mask the encoded arrays with b_u and one pairwise mask per
        client that shared its keys (whoever did not is out of the sum from here on)."""
        setup = self._setup
        for sender, ciphertext in ciphertexts.items():
            if sender not in self._keys or sender == self.client_id:
                raise SecureAggregationError(f"secure aggregation: client {self.client_id} got shares from unknown "
                                             f"client {sender}")
            plaintext = decrypt(self._agree(self._keys[sender].share_key, self._share_secret), ciphertext)
            source, destination, seed_share, key_share = share_keys_plaintext_separate(plaintext)
            if (source, destination) != (sender, self.client_id):
                raise SecureAggregationError(f"secure aggregation: a share from client {sender} to client "
                                             f"{self.client_id} names {source} → {destination}; refusing it")
            self._received[sender] = (seed_share, key_share)
        self._partners = sorted(set(ciphertexts) | {self.client_id})
        if len(self._partners) < setup.threshold:
            raise _too_few("shares", len(self._partners), len(setup.client_ids), setup.threshold)
        num_clients = len(setup.client_ids)
        computed = callable(self._arrays)  # computed here for this message: encoded over their own memory
        arrays = self._arrays() if computed else self._arrays
        # b_u's mask and one pairwise mask per partner: the seeds are agreed once, for every array.
        masks = [(self._seed, +1)] + [
            (_key_bytes(self._agree(self._keys[partner].mask_key, self._mask_secret)), +1 if self.client_id < partner else -1)
            for partner in self._partners if partner != self.client_id]
        masked = {}
        for index, (name, values) in enumerate(sorted(arrays.items())):
            encoded = encode(f"client {self.client_id}'s {name}", values, num_clients, setup.fraction_bits,
                             in_place=computed)
            apply_masks(encoded, masks, index)
            masked[name] = encoded
        return MaskedInput(self.client_id, masked)

    def reveal(self, request: UnmaskRequest) -> RevealedShares:
        """The shares the server needs, after the checks that keep it from asking for both of one client's."""
        setup = self._setup
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped or not (survivors | dropped) <= set(self._partners):
            raise SecureAggregationError(f"secure aggregation: client {self.client_id} was asked to reveal shares "
                                         "of a client both present and dropped, or unknown; refusing")
        if self.client_id not in survivors:
            raise SecureAggregationError(f"secure aggregation: client {self.client_id} is listed as dropped")
        if len(survivors) < setup.threshold:
            raise _too_few("masked", len(survivors), len(setup.client_ids), setup.threshold)
        return RevealedShares(
            self.client_id,
            {owner: self._received[owner][0] for owner in survivors if owner in self._received},
            {owner: self._received[owner][1] for owner in dropped if owner in self._received},
        )


    # A Flower ClientApp runs each message in a fresh process: the client's secrets wait between
    # stages in the node's own state (`flower.secure`), as bytes, and never leave the node.

    def state(self) -> dict[str, bytes]:
        """What this client holds between stages (its secrets included), as named bytes."""
        import json

        held = {}
        if hasattr(self, "_setup"):
            held["setup"] = json.dumps([list(self._setup.client_ids), self._setup.threshold,
                                        self._setup.fraction_bits]).encode()
            held["share_secret"] = private_key_to_bytes(self._share_secret)
            held["mask_secret"] = private_key_to_bytes(self._mask_secret)
            held["own_keys"] = _keys_bytes({self.client_id: self._own_keys})
        if hasattr(self, "_keys"):
            held["keys"] = _keys_bytes(self._keys)
            held["seed"] = self._seed
            held["received"] = json.dumps({str(owner): [seed.hex(), key.hex()]
                                           for owner, (seed, key) in self._received.items()}).encode()
        if hasattr(self, "_partners"):
            held["partners"] = json.dumps(self._partners).encode()
        return held

    @classmethod
    def restore(cls, client_id: int, held: Mapping[str, bytes],
                arrays: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]) -> "SecAggClient":
        """The client `state` describes, its arrays (or the function computing them) given anew."""
        import json

        client = cls(client_id, arrays)
        if "setup" in held:
            ids, threshold, fraction_bits = json.loads(held["setup"])
            client._setup = Setup(tuple(ids), threshold, fraction_bits)
            client._share_secret = bytes_to_private_key(held["share_secret"])
            client._mask_secret = bytes_to_private_key(held["mask_secret"])
            client._own_keys = _keys_from_bytes(held["own_keys"])[client_id]
        if "keys" in held:
            client._keys = _keys_from_bytes(held["keys"])
            client._seed = held["seed"]
            client._received = {int(owner): (bytes.fromhex(seed), bytes.fromhex(key))
                                for owner, (seed, key) in json.loads(held["received"]).items()}
        if "partners" in held:
            client._partners = json.loads(held["partners"])
        return client


def _keys_bytes(keys: Mapping[int, PublicKeys]) -> bytes:
    import json

    return json.dumps({str(cid): [k.share_key.decode(), k.mask_key.decode()] for cid, k in keys.items()}).encode()


def _keys_from_bytes(data: bytes) -> dict[int, PublicKeys]:
    import json

    return {int(cid): PublicKeys(int(cid), share.encode(), mask.encode()) for cid, (share, mask) in json.loads(data).items()}


# ---- the stages, over any transport ---------------------------------------------------------------


#: Called with each array of a sum (its name, its decoded fp64 values) as soon as it is unmasked.
OnArray = Callable[[str, np.ndarray], None]


@dataclass(frozen=True)
class ArrayJobs:
    """What the server does with the arrays of a sum as it unmasks them.

    ``then(name, values)`` runs on each array's decoded values as soon as they are unmasked, on the
    thread that unmasked them; ``submit(function, *args)`` (a thread pool's, returning a Future)
    runs each array's unmasking and its ``then`` as one job. The AES keystreams (``cryptography``
    releases the GIL while it encrypts), numpy's additions and torch's linear algebra all run
    outside the GIL, so on a pool of worker threads the arrays unmask, and their work runs, in
    parallel. Without ``submit``: one array after another on the calling thread, in name order.
    ``add_threads``: threads that add each masked input into the sum, each a share of its arrays
    (numpy alone: clients computing in the same process meanwhile keep their thread settings)."""

    then: OnArray | None = None
    submit: Callable[..., Future] | None = None
    add_threads: int = 1


def run_stages(server: "SecAggServer", exchange: Callable[[str, Mapping[int, object]], Iterable],
               jobs: ArrayJobs | None = None) -> dict[str, np.ndarray]:
    """One secure sum: ``exchange(stage, {client id: what the server sends it})`` delivers a stage's
    requests and yields the replies that come back (a client that does not reply has vanished);
    the server's part of each stage takes them. Returns the decoded sum (``jobs``: see
    `SecAggServer.unmask`)."""
    setup = server.setup()
    keys = server.collect_keys(exchange("keys", {cid: setup for cid in server.client_ids}))
    routed = server.route_shares(exchange("shares", {cid: keys for cid in keys}))
    request = server.collect_masked(exchange("masked", routed), jobs.add_threads if jobs is not None else 1)
    return server.unmask(exchange("unmask", {cid: request for cid in request.survivors}), jobs)


# ---- server ---------------------------------------------------------------------------------------


class SecAggServer:
    """The server's side of one secure sum: it routes what it cannot read and only ever holds sums."""

    def __init__(self, client_ids: Iterable[int], settings: SecAggSettings = SecAggSettings()):
        self.client_ids = tuple(sorted(set(client_ids)))
        try:
            self.threshold = settings.threshold_for(len(self.client_ids))
        except ValueError as error:
            raise SecureAggregationError(f"secure aggregation: {error}") from None
        self.fraction_bits = settings.fraction_bits

    def setup(self) -> Setup:
        return Setup(self.client_ids, self.threshold, self.fraction_bits)

    def _require(self, stage: str, replied: Iterable[int]) -> set[int]:
        replied = set(replied)
        if not replied <= set(self.client_ids):
            raise SecureAggregationError(f"secure aggregation: a reply at the {stage} stage came from a client outside "
                                         f"the session ({sorted(replied - set(self.client_ids))})")
        if len(replied) < self.threshold:
            raise _too_few(stage, len(replied), len(self.client_ids), self.threshold)
        return replied

    def collect_keys(self, replies: Iterable[PublicKeys]) -> dict[int, PublicKeys]:
        """Stage 1: every advertised key, for every client that advertised."""
        self._keys = {reply.client_id: reply for reply in replies}
        self._require("keys", self._keys)
        return dict(self._keys)

    def route_shares(self, replies: Iterable[EncryptedShares]) -> dict[int, dict[int, bytes]]:
        """Stage 2: the ciphertexts addressed to each client that shared, from each client that shared."""
        replies = {reply.client_id: reply for reply in replies}
        self._sharers = self._require("shares", set(replies) & set(self._keys))
        return {
            recipient: {sender: replies[sender].ciphertexts[recipient] for sender in self._sharers if sender != recipient}
            for recipient in self._sharers
        }

    def collect_masked(self, replies: Iterable[MaskedInput], add_threads: int = 1) -> UnmaskRequest:
        """Stage 3: add the masked inputs as they come (mod 2^64); none is kept on its own. With
        ``add_threads`` > 1 an input's arrays are added on as many threads, all before the next input."""
        if add_threads <= 1:
            return self._collect_masked(replies, _add_into)
        with ThreadPoolExecutor(add_threads, "secagg-add") as pool:
            def add(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
                # One job per thread, each a share of the arrays: small arrays would cost a job's overhead apiece.
                for future in [pool.submit(_add_into, pairs[k::add_threads]) for k in range(add_threads)]:
                    future.result()

            return self._collect_masked(replies, add)

    def _collect_masked(self, replies: Iterable[MaskedInput],
                        add: Callable[[list[tuple[np.ndarray, np.ndarray]]], None]) -> UnmaskRequest:
        self._sum: dict[str, np.ndarray] | None = None
        arrived = set()
        for reply in replies:
            if reply.client_id not in self._sharers or reply.client_id in arrived:
                raise SecureAggregationError(f"secure aggregation: a masked input from client {reply.client_id}, "
                                             "which did not share its keys or sent twice")
            if self._sum is None:  # the first input's own arrays become the running sum where they can
                self._sum = {name: _owned(values) for name, values in reply.arrays.items()}
            else:
                layout = {name: array.shape for name, array in self._sum.items()}
                if {name: np.shape(values) for name, values in reply.arrays.items()} != layout:
                    raise SecureAggregationError(f"secure aggregation: client {reply.client_id}'s arrays differ in names "
                                                 "or shapes from the others'; every client must send the same layout")
                add([(self._sum[name], values) for name, values in reply.arrays.items()])
            arrived.add(reply.client_id)
            del reply  # added: its arrays go before the next input is computed or received
        self._survivors = self._require("masked", arrived)
        self._dropped = self._sharers - self._survivors
        return UnmaskRequest(tuple(sorted(self._survivors)), tuple(sorted(self._dropped)))

    def unmask(self, replies: Iterable[RevealedShares], jobs: ArrayJobs | None = None) -> dict[str, np.ndarray]:
        """Stage 4: rebuild each survivor's b_u and each dropped client's mask key from t shares,
        take their masks off the sum, and decode it. ``jobs`` (`ArrayJobs`): where each array is
        unmasked and what runs on it then (the values it sees are the returned ones, not a copy)."""
        replies = [reply for reply in replies if reply.client_id in self._survivors]
        self._require("unmask", {reply.client_id for reply in replies})
        names = sorted(self._sum)
        # Every mask to take off, then one pass per array: the survivors' self masks, and for each
        # dropped client its pairwise masks with the survivors (a survivor added +mask when its id is
        # below the dropped client's, −mask otherwise, so here the opposite).
        masks = [(combine_shares(self._shares(replies, owner, "seed_shares")), -1) for owner in sorted(self._survivors)]
        for owner in sorted(self._dropped):
            mask_secret = bytes_to_private_key(combine_shares(self._shares(replies, owner, "key_shares")))
            masks += [(_key_bytes(generate_shared_key(mask_secret, bytes_to_public_key(self._keys[partner].mask_key))),
                       -1 if partner < owner else +1) for partner in sorted(self._survivors)]
        total, self._sum = self._sum, None
        jobs = jobs or ArrayJobs()

        def unmask_one(index: int, name: str) -> np.ndarray:  # in place: the fp64 view of the sum's memory
            values = unmask_and_decode(total[name], masks, index, self.fraction_bits)
            if jobs.then is not None:
                jobs.then(name, values)
            return values

        if jobs.submit is None:
            return {name: unmask_one(index, name) for index, name in enumerate(names)}
        pending = {name: jobs.submit(unmask_one, index, name) for index, name in enumerate(names)}
        return {name: future.result() for name, future in pending.items()}

    def _shares(self, replies: list[RevealedShares], owner: int, kind: str) -> list[bytes]:
        shares = [getattr(reply, kind)[owner] for reply in replies if owner in getattr(reply, kind)]
        if len(shares) < self.threshold:
            raise _too_few("unmask", len(shares), len(self.client_ids), self.threshold)
        return shares[: self.threshold]

    @property
    def survivors(self) -> tuple[int, ...]:
        """The clients whose inputs the sum holds (after stage 3)."""
        return tuple(sorted(self._survivors))
