"""One connection's protocol state, sans-IO: bytes in, events out, bytes to send.

Both ends run the same class. The handshake (README.md, section 4) proves the shared secret both
ways, each proof over the other side's fresh nonce, so a recorded transcript cannot be replayed.
Before both proofs check out the frame limit is a few KiB and only handshake messages are
parsed; nothing is unpickled here at all. After its proof each side seals every frame it sends
with a MAC under a key of this connection and direction, over a sequence number, and the other
decodes none that fails: nothing can be injected, replayed, reordered or dropped on the way.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from . import messages as m
from .errors import (
    ERROR_CODES,
    AuthError,
    HandshakeTimeout,
    LocalProtocolError,
    RemapError,
    RemoteProtocolError,
    ServerBusy,
    VersionMismatch,
)
from .framing import (
    DEFAULT_MAX_FRAME,
    MAC_SIZE,
    PREAUTH_MAX_FRAME,
    Frame,
    FrameDecoder,
    encode_frame,
    small_frame,
)

NONCE_SIZE = 32
_SERVER_LABEL = b"remap/1 server"
_CLIENT_LABEL = b"remap/1 client"
_PERSON_LABEL = b"remap/1 person "
_CLIENT_FRAMES = b"remap/1 client frames"
_SERVER_FRAMES = b"remap/1 server frames"
#: what a frame's MAC covers before its header: its sequence number and its header's length
_SEALED = struct.Struct(">QI")
#: a person's name: what ``--issue-key`` takes and ``hello.user`` carries
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def person_key(secret: bytes, user: str) -> bytes:
    """The key a person authenticates with (their ``REMAP_SECRET_KEY``, as hex text): a keyed
    hash of their name under the cluster secret, so the server needs no user database."""
    if not USER_NAME.fullmatch(user):
        raise ValueError(f"a user name is letters, digits and ._@- (up to 64), not {user!r}")
    return hmac.new(secret, _PERSON_LABEL + user.encode(), "sha256").hexdigest().encode()


#: the longest text a refusal frame carries (an ``error`` message when closing: ≤ 500)
_REFUSAL_TEXT = 200


def refusal_frame(message: str) -> bytes:
    """The one frame a server writes to a connection it will not serve (its caps are full):
    ``error(code="busy")`` in place of a challenge. Small, and nothing read first: a refused
    connection costs one tiny write, so it amplifies nothing."""
    header, payload = m.encode(m.Error(code=ServerBusy.code, message=message[:_REFUSAL_TEXT]))
    return small_frame(header, payload)


#: the longest error text of an unauthenticated peer shown (a server's own are at most 500)
_PEER_TEXT = 500


def peer_words(text: str) -> str:
    """An unauthenticated peer's error text (anyone can write it) as a caller may show it: one
    line, printable characters only (others as ``?``: no terminal escapes), cut short."""
    if len(text) > _PEER_TEXT:
        text = text[:_PEER_TEXT] + "..."
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def local_versions() -> tuple[str, str]:
    """(python major.minor, cloudpickle major.minor) of this process."""
    import cloudpickle  # a dependency of every side (the server too imports it)

    cp = ".".join(cloudpickle.__version__.split(".")[:2])
    return f"{sys.version_info[0]}.{sys.version_info[1]}", cp


class State(Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


# read on every message: ``State.OPEN`` costs EnumType's ``__getattr__`` hook each time
_OPEN = State.OPEN
_CLOSED = State.CLOSED


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Both sides proved the secret; ``peer_role`` is node, console or server."""

    peer_role: str
    session: str
    #: the person a console authenticated as ("": it holds the cluster secret itself)
    peer_user: str = ""


class MessageReceived(NamedTuple):
    """A message arrived (a tuple: built with ``tuple.__new__`` per message, a C call)."""

    message: m.Message


_new_event = tuple.__new__


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The connection must close; ``error`` says why. Bytes to send may remain (an error frame)."""

    error: RemapError


Event = Authenticated | MessageReceived | ConnectionFailed


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _mac(keyed: hmac.HMAC, seq: int, header: bytes, payload: bytes | memoryview) -> bytes:
    """A frame's MAC (README, section 4), from a copy of the direction's keyed HMAC (OpenSSL
    looks its digest up again for every new one: twice the cost of a small frame's MAC); the
    payload hashed where it lies, never copied."""
    mac = keyed.copy()
    mac.update(_SEALED.pack(seq, len(header)) + header)
    if payload:
        mac.update(payload)
    return mac.digest()


class Connection:
    """The protocol machine for one side of one connection.

    ``role`` is "server", "node" or "console". Feed it with :meth:`receive_data`,
    send with :meth:`send`, and write whatever :meth:`data_to_send` returns.
    """

    def __init__(
        self,
        role: str,
        secret: bytes,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        heartbeat: float = 2.0,
        user: str = "",
        nonce: Callable[[int], bytes] = os.urandom,
        versions: tuple[str, str] | None = None,
    ) -> None:
        if role not in ("server", *m.ROLES):
            raise ValueError(f"unknown role {role!r}")
        if not secret:
            raise ValueError("a non-empty shared secret is required")
        self.role = role
        self.is_server = role == "server"
        self._key = secret
        self._nonce_source = nonce
        self._max_frame = max_frame
        #: the largest frame the peer accepts (from its welcome or about)
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self._heartbeat = heartbeat
        self._user = user
        self._python, self._cloudpickle = versions or local_versions()
        #: the frames coming in (a transport may read a large frame straight into its buffer)
        self.decoder = FrameDecoder(PREAUTH_MAX_FRAME)
        #: buffers queued for the transport (:meth:`data_to_send` takes them)
        self.outgoing: list[bytes | memoryview] = []
        self.state = State.HANDSHAKE
        self.peer_role: str | None = None
        #: the server's heartbeat interval, from its welcome (clients adapt to it)
        self.peer_heartbeat: float | None = None
        self.session = ""
        self._hello_hash = b""
        self._my_nonce = b""
        self._expected_client_proof = b""
        #: keyed HMACs of frames sent and received (None: not sealed yet), their next numbers
        self._send_mac = self._recv_mac = self._peer_mac = None
        self._send_seq = self._recv_seq = 0
        self._stage = "hello"  # what we expect next during the handshake

    # ------------------------------------------------------------------ outgoing

    def initiate(self) -> None:
        """Client side: queue the hello (what the handshake needs: whoever listens reads it).
        The server waits for it."""
        if self.is_server or self._stage != "hello":
            raise LocalProtocolError("only a fresh client connection initiates")
        self._my_nonce = self._nonce_source(NONCE_SIZE)
        hello = m.Hello(
            version=m.PROTOCOL_VERSION, role=self.role, nonce=self._my_nonce, user=self._user
        )
        header = self._queue(hello)
        self._hello_hash = _digest(header)
        self._stage = "challenge"

    def send(self, msg: m.Message) -> None:
        """Queue a message; only once the connection is open (errors excepted)."""
        if self.state is not _OPEN and not isinstance(msg, m.Error):
            raise LocalProtocolError(f"cannot send {msg.TYPE} in state {self.state.value}")
        self._queue(msg)

    def send_encoded(self, header: bytes, payload: bytes | memoryview) -> None:
        """Queue a message ``messages.encode`` encoded already; only once the connection is open."""
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send in state {self.state.value}")
        self.outgoing.extend(encode_frame(self.seal(header, payload), payload))

    def seal(self, header: bytes, payload: bytes | memoryview = b"") -> bytes:
        """``header`` as it travels: once this side proved the secret, behind its frame's MAC
        (README, section 4), which takes the next sequence number: frames leave in the order
        they were sealed."""
        keyed = self._send_mac
        if keyed is None:
            return header
        tag = _mac(keyed, self._send_seq, header, payload)
        self._send_seq += 1
        return tag + header

    def _unseal(self, header: bytes, payload: bytes | memoryview) -> bytes:
        """The header behind a received frame's MAC, if the MAC is the next one this side
        expects; else nothing of the frame is read and the connection fails."""
        body = header[MAC_SIZE:]
        tag = _mac(self._recv_mac, self._recv_seq, body, payload)  # type: ignore[arg-type]
        if not hmac.compare_digest(tag, header[:MAC_SIZE]):
            raise RemoteProtocolError(
                f"frame {self._recv_seq} from the peer failed its integrity check (MAC): it was "
                "altered, injected, replayed or reordered on the way, or another connection's; "
                "nothing of it was read"
            )
        self._recv_seq += 1
        return body

    def _queue(self, msg: m.Message) -> bytes:
        header, payload = m.encode(msg)
        self.outgoing.extend(encode_frame(self.seal(header, payload), payload))
        return header

    @property
    def max_frame(self) -> int:
        """The largest frame this side will accept now."""
        return self._max_frame

    @property
    def send_limit(self) -> int:
        """The largest frame (:func:`~.framing.frame_length`) this side may send the peer: the
        smaller of the two sides' limits."""
        return min(self._max_frame, self.peer_max_frame)

    @property
    def partial_frame(self) -> int:
        """Bytes of the large frame being received, when complete (0 when none is)."""
        return self.decoder.gathering

    def data_to_send(self) -> list[bytes | memoryview]:
        """Return and forget the buffers queued for the transport."""
        out, self.outgoing = self.outgoing, []
        return out

    def timeout(self) -> ConnectionFailed | None:
        """The adapter's handshake timer fired: fail if still handshaking."""
        if self.state is State.HANDSHAKE:
            return self._fail(HandshakeTimeout("handshake not completed in time"))
        return None

    def close(self) -> None:
        self.state = State.CLOSED

    # ------------------------------------------------------------------ incoming

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the transport; return what happened (the events of frames before
        a bad one too)."""
        if self.state is _CLOSED:
            return []
        self.decoder.add(data)
        return self._events()

    def receive_message(self, data: bytes) -> m.Message | None:
        """``data`` as the one message it holds, when it is one whole small frame of an open
        connection that decodes: no list of events. None: :meth:`receive_data` it."""
        if self.state is not _OPEN:
            return None
        frame = self.decoder.whole(data)
        if frame is None:
            return None
        seq = self._recv_seq
        try:
            return m.decode(self._unseal(frame[0], frame[1]), frame[1])
        except RemapError:
            self._recv_seq = seq  # receive_data reads the frame again and says why
            return None

    def received_into(self, n: int) -> list[Event]:
        """``n`` bytes were read into the decoder's ``read_buffer()``; return what happened."""
        self.decoder.wrote(n)
        return self._events()

    def _events(self) -> list[Event]:
        events: list[Event] = []
        decoder = self.decoder
        while self.state is not _CLOSED:
            try:
                frame = decoder.next_frame()
                if frame is None:
                    break
                if self.state is _OPEN:
                    self._open_frame(frame, events)
                else:  # the welcome, or an error after the challenge, is sealed already
                    header = frame.header if self._recv_mac is None else self._unseal(*frame)
                    msg = m.decode(header, frame.payload, preauth=True)
                    event = self._handshake(msg, header)
                    if event is not None:
                        events.append(event)
            except RemapError as exc:
                events.append(self._fail(exc))
        return events

    def _open_frame(self, frame: Frame, events: list[Event]) -> None:
        """A frame once authenticated: its message, as an event (raises RemapError)."""
        header = self._unseal(frame[0], frame[1])
        try:
            msg = m.decode(header, frame[1])
        except m.UnknownMessageType as exc:
            # a newer peer may know more messages: answer, keep the connection
            self._queue(m.Error(code=exc.code, message=str(exc), re=exc.re))
            return
        events.append(_new_event(MessageReceived, (msg,)))

    def _fail(self, error: RemapError) -> ConnectionFailed:
        """Close with an error frame to the peer where the protocol still allows one."""
        if self.state is not State.CLOSED:
            code = getattr(error, "code", "protocol")
            self._queue(m.Error(code=code, message=str(error)[:500]))
            self.state = State.CLOSED
        return ConnectionFailed(error)

    def _closed_by_peer(self, msg: m.Error) -> ConnectionFailed:
        """The peer ended the handshake with an error: fail with its code's class, answer
        nothing. A server that finds our own hello malformed has another catalogue: that is a
        version mismatch (a server of version 4 says a field is missing)."""
        cls = ERROR_CODES.get(msg.code, RemoteProtocolError)
        who = "server" if not self.is_server else "peer"
        self.state = State.CLOSED
        words = peer_words(msg.message)
        if self._stage == "challenge" and msg.code == RemoteProtocolError.code:
            cls = VersionMismatch
            words += f" (it speaks another protocol version than {m.PROTOCOL_VERSION})"
        error = cls.from_wire(f"{who} refused: {words}")
        error.peer_message = words  # the peer's own words, for a caller's line
        return ConnectionFailed(error)

    def _check_versions(self, about: m.About) -> None:
        """The server's check of a client that proved the secret (told no one else)."""
        role = self.peer_role
        # the peer's own words, bound for the server's log: printable only
        python, pickler = peer_words(about.python), peer_words(about.cloudpickle)
        if about.python != self._python:
            raise VersionMismatch(
                f"the {role} runs Python {python}, the server Python {self._python}: "
                "pickles are not portable between Python versions; run the same Python everywhere"
            )
        if about.cloudpickle != self._cloudpickle:
            raise VersionMismatch(
                f"the {role} has cloudpickle {pickler}, the server cloudpickle "
                f"{self._cloudpickle}: install the same cloudpickle version everywhere"
            )

    def _proof(self, label: bytes, last: bytes) -> bytes:
        """``HMAC(key, label | H(hello) | last)``: either side's proof (README, section 4)."""
        return hmac.new(self._key, label + self._hello_hash + last, "sha256").digest()

    def _frame_mac(self, label: bytes, transcript: bytes) -> hmac.HMAC:
        """One direction's keyed HMAC: its key ``HMAC(key, label | H(hello) | H(challenge))``."""
        return hmac.new(self._proof(label, transcript), digestmod="sha256")

    def _handshake(self, msg: m.Message, raw_header: bytes) -> Event | None:
        if isinstance(msg, m.Error):
            return self._closed_by_peer(msg)
        if self.is_server:
            return self._server_step(msg, raw_header)
        return self._client_step(msg, raw_header)

    def _server_step(self, msg: m.Message, raw_header: bytes) -> Event | None:
        if self._stage == "hello" and isinstance(msg, m.Hello):
            m.check_version(msg.version)  # first: another version may have other roles, nonces
            if msg.role not in m.ROLES:
                raise RemoteProtocolError(f"unknown role {msg.role!r}")
            if len(msg.nonce) != NONCE_SIZE:
                raise RemoteProtocolError("bad nonce length")
            self.peer_role = msg.role
            self._user = msg.user
            if msg.user:
                if msg.role != "console":
                    raise AuthError(
                        "only a console may authenticate with a person's key; nodes use the "
                        "cluster secret"
                    )
                try:
                    self._key = person_key(self._key, msg.user)
                except ValueError as exc:
                    raise AuthError(str(exc)) from None
            self._hello_hash = _digest(raw_header)
            self._my_nonce = self._nonce_source(NONCE_SIZE)
            if self._my_nonce == msg.nonce:
                raise RemoteProtocolError("peer reflected our nonce")
            proof = self._proof(_SERVER_LABEL, self._my_nonce)
            challenge = self._queue(
                m.Challenge(version=m.PROTOCOL_VERSION, nonce=self._my_nonce, proof=proof)
            )
            transcript = _digest(challenge)
            self._expected_client_proof = self._proof(_CLIENT_LABEL, transcript)
            self._send_mac = self._frame_mac(_SERVER_FRAMES, transcript)
            self._peer_mac = self._frame_mac(_CLIENT_FRAMES, transcript)
            self._stage = "auth"
            return None
        if self._stage == "auth" and isinstance(msg, m.Auth):
            if not hmac.compare_digest(msg.proof, self._expected_client_proof):
                who = f"{self._user!r}'s key" if self._user else "this cluster's secret"
                raise AuthError(
                    f"authentication failed: the peer does not hold {who} "
                    "(check REMAP_SECRET_KEY and REMAP_USER)"
                )
            self._recv_mac = self._peer_mac  # its about comes sealed
            self._stage = "about"
            return None
        if self._stage == "about" and isinstance(msg, m.About):
            if msg.max_frame > 0:  # (a nonsensical limit is not said: the default holds)
                self.peer_max_frame = msg.max_frame
            self._check_versions(msg)
            self.session = self._nonce_source(8).hex()
            self._queue(
                m.Welcome(
                    session=self.session, max_frame=self._max_frame, heartbeat=self._heartbeat
                )
            )
            self._open()
            return Authenticated(self.peer_role or "", self.session, self._user)
        raise RemoteProtocolError(
            f"unexpected {msg.TYPE} during the handshake (expected {self._stage})"
        )

    def _client_step(self, msg: m.Message, raw_header: bytes) -> Event | None:
        if self._stage == "challenge" and isinstance(msg, m.Challenge):
            m.check_version(msg.version)
            expected = self._proof(_SERVER_LABEL, msg.nonce)
            if not hmac.compare_digest(msg.proof, expected):
                raise AuthError(
                    "the server could not prove it holds this cluster's secret: refusing to "
                    "talk to it (wrong REMAP_SECRET_KEY here or there, or not a remap server)"
                )
            if msg.nonce == self._my_nonce:
                raise AuthError("server reflected our nonce")
            transcript = _digest(raw_header)
            self._queue(m.Auth(proof=self._proof(_CLIENT_LABEL, transcript)))
            self._send_mac = self._frame_mac(_CLIENT_FRAMES, transcript)
            self._recv_mac = self._frame_mac(_SERVER_FRAMES, transcript)
            # the server proved itself: now, and sealed, what it checks
            self._queue(
                m.About(
                    python=self._python, cloudpickle=self._cloudpickle, max_frame=self._max_frame
                )
            )
            self._stage = "welcome"
            return None
        if self._stage == "welcome" and isinstance(msg, m.Welcome):
            self.session = msg.session
            if 0.05 <= msg.heartbeat <= 3600:  # ignore absurd values rather than spin or go deaf
                self.peer_heartbeat = msg.heartbeat
            if msg.max_frame > 0:
                self.peer_max_frame = msg.max_frame
                self._max_frame = min(self._max_frame, msg.max_frame)
            self.peer_role = "server"
            self._open()
            return Authenticated("server", msg.session)
        raise RemoteProtocolError(
            f"unexpected {msg.TYPE} during the handshake (expected {self._stage})"
        )

    def _open(self) -> None:
        self.state = State.OPEN
        self._stage = "open"
        self.decoder.max_frame = self._max_frame + MAC_SIZE  # the MAC is not counted
