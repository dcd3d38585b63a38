"""Framing, keys and the handshake of one mesh connection (no policy, no tasks).

Frame on the wire: a 4-byte big-endian length, then that many bytes. During the
handshake the body is one JSON handshake message (at most `HANDSHAKE_MAX_FRAME` bytes).
After it, the body is `seq (8 bytes, big-endian) | payload (JSON) | tag (32 bytes)`, where
`tag = HMAC-SHA256(direction key, seq | payload)` and `seq` counts 0, 1, 2, ... per
direction. Without a cluster secret the keys derive from a public constant: the tags then
catch corruption and bugs, not forgery. See docs/mesh.md.
"""

import hashlib
import hmac
import secrets
import struct
import time
from dataclasses import dataclass

import anyio
from anyio.abc import ByteStream

from exo.routing.mesh.messages import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    Accept,
    HandshakeParseError,
    Hello,
    Proof,
    Reject,
    RejectReason,
    parse_handshake,
    printable,
)
from exo.shared.types.ids import NodeId

LENGTH = struct.Struct(">I")
SEQ = struct.Struct(">Q")
TAG_BYTES = 32
FRAME_OVERHEAD = 8 + TAG_BYTES
HANDSHAKE_MAX_FRAME = 4096
_LABEL = b"exo-mesh/1 "


class ProtocolError(Exception):
    """The peer broke the protocol (malformed, oversized, truncated, forged or replayed
    frame). Closes that connection only."""

    def __init__(self, message: str) -> None:
        super().__init__(printable(message))


class PeerClosed(Exception):
    """The peer closed the connection at a frame boundary."""


class HandshakeRejected(Exception):
    """The handshake ended with a refusal, by the peer (`by_peer`) or by this node."""

    def __init__(self, reason: RejectReason, detail: str, *, by_peer: bool) -> None:
        detail = printable(detail)
        super().__init__(f"{'refused by the peer' if by_peer else 'refused'} ({reason}): {detail}")
        self.reason: RejectReason = reason
        self.detail = detail
        self.by_peer = by_peer


# ---------------------------------------------------------------- keys


def derive_cluster_key(secret: str, namespace: str) -> bytes:
    """The long-term key from the operator's secret (scrypt: slows offline guessing)."""
    return hashlib.scrypt(
        secret.encode(), salt=_LABEL + namespace.encode(), n=2**14, r=8, p=1, dklen=32
    )


def public_cluster_key(namespace: str) -> bytes:
    """The key used without a cluster secret: public, so it authenticates nothing."""
    return hashlib.sha256(_LABEL + b"no secret|" + namespace.encode()).digest()


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) with one 32-byte output block."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


# ---------------------------------------------------------------- frames


class FrameReader:
    """Reads length-prefixed frames; the length is checked before anything is buffered."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        # When bytes last arrived (a long frame in progress keeps the connection alive).
        self.last_receive = time.monotonic()

    async def _fill(self, n: int, *, frame_start: bool) -> None:
        while len(self._buf) < n:
            try:
                chunk = await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError) as e:
                if frame_start and not self._buf:
                    raise PeerClosed("connection closed by peer") from None
                raise ProtocolError(
                    f"truncated frame ({len(self._buf)} of {n} bytes, then {type(e).__name__})"
                ) from None
            self._buf += chunk
            self.last_receive = time.monotonic()

    async def read(self, max_bytes: int) -> bytes:
        await self._fill(LENGTH.size, frame_start=True)
        (n,) = LENGTH.unpack_from(self._buf)
        if n > max_bytes:
            raise ProtocolError(f"frame length {n} exceeds the limit of {max_bytes} bytes")
        await self._fill(LENGTH.size + n, frame_start=False)
        body = bytes(self._buf[LENGTH.size : LENGTH.size + n])
        del self._buf[: LENGTH.size + n]
        return body


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


class Sealer:
    """Numbers (and with a key, authenticates) the frames of one direction."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.seq = 0

    def seal(self, payload: bytes) -> bytes:
        head = SEQ.pack(self.seq)
        self.seq += 1
        return frame(head + payload + _mac(self._key, head + payload))


class Opener:
    """Checks the tag and that the sequence number is exactly the next one."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.expected = 0

    def open(self, body: bytes) -> bytes:
        if len(body) < FRAME_OVERHEAD:
            raise ProtocolError(f"frame of {len(body)} bytes is shorter than its header")
        signed, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
        if not hmac.compare_digest(tag, _mac(self._key, signed)):
            raise ProtocolError("frame authentication failed (forged, corrupted or foreign)")
        (seq,) = SEQ.unpack_from(signed)
        if seq != self.expected:
            raise ProtocolError(
                f"frame sequence {seq}, expected {self.expected} (replayed or reordered)"
            )
        self.expected += 1
        return signed[SEQ.size :]


# ---------------------------------------------------------------- handshake


@dataclass(frozen=True)
class LocalIdentity:
    node_id: NodeId
    namespace: str
    instance: str
    listen_port: int
    schema_fingerprint: str
    # `derive_cluster_key(secret, namespace)` with a secret, else `public_cluster_key(namespace)`.
    key: bytes
    authenticated: bool


@dataclass
class Session:
    """An established, authenticated connection's crypto state."""

    peer: Hello
    initiator: bool
    reader: FrameReader
    sealer: Sealer
    opener: Opener


class Handshake:
    """One side of the handshake, in two steps so the caller can decide in between.

    Initiator:  `hs = await Handshake.initiate(...)` (sent Hello, got the peer's Hello);
                caller checks `hs.peer`; `session = await hs.finish()` or `await hs.refuse()`.
    Responder:  `hs = await Handshake.respond(...)` (got Hello, proofs verified);
                caller decides; `session = await hs.accept()` or `await hs.refuse()`.

    I -> R  Hello(node, namespace, version, schema, instance, nonce_i, authenticated)
    R -> I  Hello(... nonce_r ...)        [R refuses with Reject on version/namespace/schema/auth]
    R -> I  Proof(HMAC(K, "responder" | T))
    I -> R  Proof(HMAC(K, "initiator" | T))
    R -> I  Accept | Reject(duplicate, ...)
    T = sha256(len|hello_i bytes|len|hello_r bytes); frame keys = HKDF(K, nonce_i|nonce_r,
    "frames i->r"|T) and "frames r->i". K is the cluster key, or a public constant
    without a secret (then the proofs only order the handshake; they prove nothing).
    """

    def __init__(
        self,
        stream: ByteStream,
        reader: FrameReader,
        local: LocalIdentity,
        *,
        initiator: bool,
        peer: Hello,
        transcript: bytes,
        nonces: bytes,
    ) -> None:
        self._stream = stream
        self._reader = reader
        self._local = local
        self._initiator = initiator
        self.peer = peer
        self._transcript = transcript
        self._nonces = nonces

    @staticmethod
    def _hello(local: LocalIdentity) -> Hello:
        return Hello(
            protocol_version=PROTOCOL_VERSION,
            node_id=local.node_id,
            namespace=local.namespace,
            instance=local.instance,
            listen_port=local.listen_port,
            schema_fingerprint=local.schema_fingerprint,
            nonce=secrets.token_hex(NONCE_BYTES),
            authenticated=local.authenticated,
        )

    @staticmethod
    def _transcript_of(hello_i: bytes, hello_r: bytes) -> bytes:
        h = hashlib.sha256()
        for part in (hello_i, hello_r):
            h.update(LENGTH.pack(len(part)))
            h.update(part)
        return h.digest()

    @staticmethod
    def _compatibility(local: LocalIdentity, peer: Hello) -> tuple[RejectReason, str] | None:
        if peer.namespace != local.namespace:
            return "namespace", (
                f"{peer.node_id} is in cluster namespace {peer.namespace!r}, "
                f"{local.node_id} in {local.namespace!r}"
            )
        if peer.schema_fingerprint != local.schema_fingerprint:
            return "schema", (
                f"{peer.node_id} runs another build of exo than {local.node_id} (message "
                f"schema {peer.schema_fingerprint or '-'} against {local.schema_fingerprint or '-'}"
                "): run the same exo version on every node"
            )
        if peer.authenticated != local.authenticated:
            with_secret, without = (
                (local.node_id, peer.node_id)
                if local.authenticated
                else (peer.node_id, local.node_id)
            )
            return "auth_mismatch", (
                f"{with_secret} has a cluster secret, {without} has none "
                "(give every node the same --secret / EXO_SECRET)"
            )
        return None

    @staticmethod
    async def _send_reject(stream: ByteStream, reason: RejectReason, detail: str) -> None:
        try:
            with anyio.fail_after(1):
                await stream.send(
                    frame(Reject(reason=reason, detail=detail).model_dump_json().encode())
                )
        except Exception:
            pass  # best effort: we are closing anyway

    async def _read(self) -> Hello | Proof | Accept | Reject:
        return await _read_handshake(self._stream, self._reader)

    # ------------------------------------------------------------ initiator

    @classmethod
    async def initiate(
        cls, stream: ByteStream, reader: FrameReader, local: LocalIdentity
    ) -> "Handshake":
        hello = cls._hello(local)
        raw_i = hello.model_dump_json().encode()
        await stream.send(frame(raw_i))
        raw_r = await reader.read(HANDSHAKE_MAX_FRAME)
        msg = await _parse_or_reject(stream, raw_r)
        if isinstance(msg, Reject):
            raise HandshakeRejected(msg.reason, msg.detail, by_peer=True)
        if not isinstance(msg, Hello):
            await cls._send_reject(stream, "malformed", f"expected hello, got {msg.kind}")
            raise ProtocolError(f"expected hello, got {msg.kind}")
        problem = cls._compatibility(local, msg)
        if problem is not None:
            await cls._send_reject(stream, *problem)
            raise HandshakeRejected(*problem, by_peer=False)
        return cls(
            stream,
            reader,
            local,
            initiator=True,
            peer=msg,
            transcript=cls._transcript_of(raw_i, raw_r),
            nonces=bytes.fromhex(hello.nonce) + bytes.fromhex(msg.nonce),
        )

    async def finish(self) -> Session:
        """Initiator: verify the responder's proof, send ours, wait for Accept."""
        msg = await self._read()
        if isinstance(msg, Reject):
            raise HandshakeRejected(msg.reason, msg.detail, by_peer=True)
        if not isinstance(msg, Proof):
            raise ProtocolError(f"expected proof, got {msg.kind}")
        await self._check_proof(msg, b"responder")
        mine = _mac(self._local.key, _LABEL + b"initiator" + self._transcript).hex()
        await self._stream.send(frame(Proof(mac=mine).model_dump_json().encode()))
        msg = await self._read()
        if isinstance(msg, Reject):
            raise HandshakeRejected(msg.reason, msg.detail, by_peer=True)
        if not isinstance(msg, Accept):
            raise ProtocolError(f"expected accept, got {msg.kind}")
        return self._session()

    async def _check_proof(self, proof: Proof, role: bytes) -> None:
        expected = _mac(self._local.key, _LABEL + role + self._transcript)
        try:
            given = bytes.fromhex(proof.mac)
        except ValueError:
            given = b""
        if not hmac.compare_digest(given, expected):
            detail = "the cluster secret proof did not verify: the nodes have different secrets"
            await self._send_reject(self._stream, "auth_failed", detail)
            raise HandshakeRejected("auth_failed", detail, by_peer=False)

    # ------------------------------------------------------------ responder

    @classmethod
    async def respond(
        cls, stream: ByteStream, reader: FrameReader, local: LocalIdentity
    ) -> "Handshake":
        raw_i = await reader.read(HANDSHAKE_MAX_FRAME)
        msg = await _parse_or_reject(stream, raw_i)
        if not isinstance(msg, Hello):
            detail = f"expected hello, got {msg.kind}"
            await cls._send_reject(stream, "malformed", detail)
            raise ProtocolError(detail)
        problem = cls._compatibility(local, msg)
        if problem is not None:
            await cls._send_reject(stream, *problem)
            raise HandshakeRejected(*problem, by_peer=False)
        hello = cls._hello(local)
        raw_r = hello.model_dump_json().encode()
        hs = cls(
            stream,
            reader,
            local,
            initiator=False,
            peer=msg,
            transcript=cls._transcript_of(raw_i, raw_r),
            nonces=bytes.fromhex(msg.nonce) + bytes.fromhex(hello.nonce),
        )
        mine = _mac(local.key, _LABEL + b"responder" + hs._transcript).hex()
        await stream.send(frame(raw_r) + frame(Proof(mac=mine).model_dump_json().encode()))
        reply = await hs._read()
        if isinstance(reply, Reject):
            raise HandshakeRejected(reply.reason, reply.detail, by_peer=True)
        if not isinstance(reply, Proof):
            raise ProtocolError(f"expected proof, got {reply.kind}")
        await hs._check_proof(reply, b"initiator")
        return hs

    async def accept(self) -> Session:
        await self._stream.send(frame(Accept().model_dump_json().encode()))
        return self._session()

    async def refuse(self, reason: RejectReason, detail: str) -> None:
        await self._send_reject(self._stream, reason, detail)

    # ------------------------------------------------------------ keys

    def _session(self) -> Session:
        key = self._local.key
        i_to_r = _hkdf(key, self._nonces, _LABEL + b"frames i->r" + self._transcript)
        r_to_i = _hkdf(key, self._nonces, _LABEL + b"frames r->i" + self._transcript)
        send_key, recv_key = (i_to_r, r_to_i) if self._initiator else (r_to_i, i_to_r)
        return Session(
            peer=self.peer,
            initiator=self._initiator,
            reader=self._reader,
            sealer=Sealer(send_key),
            opener=Opener(recv_key),
        )


async def _read_handshake(
    stream: ByteStream, reader: FrameReader
) -> Hello | Proof | Accept | Reject:
    return await _parse_or_reject(stream, await reader.read(HANDSHAKE_MAX_FRAME))


async def _parse_or_reject(stream: ByteStream, raw: bytes) -> Hello | Proof | Accept | Reject:
    try:
        return parse_handshake(raw)
    except HandshakeParseError as e:
        await Handshake._send_reject(stream, e.reason, e.detail)  # pyright: ignore[reportPrivateUsage]
        if e.reason == "malformed":
            raise ProtocolError(e.detail) from None
        raise HandshakeRejected(e.reason, e.detail, by_peer=False) from None
