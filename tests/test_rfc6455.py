"""RFC 6455 framing without sockets: the sans-I/O parser (in both roles: a server's, reading
masked client frames, and a client's, reading unmasked server frames) and builders, then the
server's asyncio adapter over a fake transport."""

from __future__ import annotations

import asyncio
import struct
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medverse.protocol.rfc6455 import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Event,
    FrameParser,
    Message,
    Ping,
    Pong,
    Role,
    Violation,
    binary_frame,
    close_frame,
    control_frame,
    frame_size,
    masked_frame,
    unmask,
)
from medverse.server import transport as transport_module
from medverse.server.transport import WebSocketConnection

MASK = b"\x37\xfa\x21\x3d"


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bytes | None = MASK,
    rsv: int = 0,
    length_bits: int | None = None,
    length: int | None = None,
) -> bytes:
    """A client frame; ``length_bits`` forces the 7, 16 or 64-bit length encoding and
    ``length`` the length the header claims."""
    n = len(payload) if length is None else length
    if length_bits is None:
        length_bits = 7 if n < 126 else 16 if n < 65536 else 64
    head = bytes(((0x80 if fin else 0) | rsv | opcode,))
    bit = 0x80 if mask is not None else 0
    if length_bits == 7:
        head += bytes((bit | n,))
    elif length_bits == 16:
        head += bytes((bit | 126,)) + struct.pack("!H", n)
    else:
        head += bytes((bit | 127,)) + struct.pack("!Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def feed_all(parser: FrameParser, stream: bytes, step: int | None = None) -> list[Event]:
    if step is None:
        return parser.feed(stream)
    events: list[Event] = []
    for i in range(0, len(stream), step):
        events += parser.feed(stream[i : i + step])
    return events


def violation(code: int, reason: bytes) -> list[Event]:
    return [Violation(code, reason)]


# ------------------------------------------------------------------------------ lengths, masks


@pytest.mark.parametrize(
    ("size", "bits"),
    [
        (0, 7),
        (1, 7),
        (125, 7),
        (126, 16),
        (1000, 16),
        (65535, 16),
        (65536, 64),
        (70001, 64),
    ],
)
def test_every_length_encoding(size: int, bits: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = frame(OP_BINARY, payload)
    assert len(data) == size + 2 + {7: 0, 16: 2, 64: 8}[bits] + 4
    for step in (None, 7, 4096):
        parser = FrameParser(max_message=1 << 20)
        assert feed_all(parser, data, step) == [Message(OP_BINARY, payload)]
        assert parser.buffered == 0


@pytest.mark.parametrize("bits", [16, 64])
def test_longer_length_encodings_than_needed_are_accepted(bits: int) -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_BINARY, b"hello", length_bits=bits)) == [
        Message(OP_BINARY, b"hello")
    ]


def test_masks_are_removed() -> None:
    parser = FrameParser(max_message=1024)
    payload = bytes(range(40)) * 3
    for mask in (b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", MASK, b"\x01\x80\x7f\xfe"):
        assert parser.feed(frame(OP_BINARY, payload, mask=mask)) == [Message(OP_BINARY, payload)]


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask_is_a_bytewise_xor(payload: bytes, mask: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask) == expected
    assert unmask(bytearray(payload), bytearray(mask)) == expected


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE])
def test_unmasked_client_frames_are_refused(opcode: int) -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(opcode, b"plain", mask=None)) == violation(
        1002, b"client frames must be masked"
    )


def test_text_messages_keep_their_opcode() -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_TEXT, b"hi") + frame(OP_BINARY, b"\x00")) == [
        Message(OP_TEXT, b"hi"),
        Message(OP_BINARY, b"\x00"),
    ]


# ------------------------------------------------------------------------------ fragmentation


def test_fragments_are_reassembled() -> None:
    parser = FrameParser(max_message=1024)
    stream = (
        frame(OP_TEXT, b"he", fin=False)
        + frame(OP_CONTINUATION, b"", fin=False)
        + frame(OP_CONTINUATION, b"ll", fin=False)
        + frame(OP_CONTINUATION, b"o")
        + frame(OP_BINARY, b"next")
    )
    assert parser.feed(stream) == [Message(OP_TEXT, b"hello"), Message(OP_BINARY, b"next")]


def test_control_frames_between_fragments_are_allowed() -> None:
    parser = FrameParser(max_message=1024)
    stream = (
        frame(OP_BINARY, b"hel", fin=False)
        + frame(OP_PING, b"hi")
        + frame(OP_PONG, b"yo")
        + frame(OP_CONTINUATION, b"lo")
    )
    assert parser.feed(stream) == [Ping(b"hi"), Pong(b"yo"), Message(OP_BINARY, b"hello")]


def test_close_between_fragments_ends_the_stream() -> None:
    parser = FrameParser(max_message=1024)
    stream = frame(OP_BINARY, b"hel", fin=False) + frame(OP_CLOSE, struct.pack("!H", 1001))
    assert parser.feed(stream + frame(OP_CONTINUATION, b"lo")) == [Close(1001, b"")]


def test_continuation_without_a_message_is_refused() -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_CONTINUATION, b"lo")) == violation(
        1002, b"continuation without a message"
    )


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_inside_a_fragmented_one_is_refused(opcode: int) -> None:
    parser = FrameParser(max_message=1024)
    stream = frame(OP_BINARY, b"hel", fin=False) + frame(opcode, b"lo")
    assert parser.feed(stream) == violation(1002, b"new message inside a fragmented one")


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frames_are_refused(opcode: int) -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(opcode, b"x", fin=False)) == violation(1002, b"bad control frame")


# ------------------------------------------------------------------------------ size limit


def test_largest_message_is_accepted_and_one_more_byte_refused() -> None:
    parser = FrameParser(max_message=300)
    assert parser.feed(frame(OP_BINARY, b"x" * 300)) == [Message(OP_BINARY, b"x" * 300)]
    assert parser.feed(frame(OP_BINARY, b"x" * 301)) == violation(1009, b"message too big")


@pytest.mark.parametrize("bits", [16, 64])
def test_oversized_frame_is_refused_from_its_header(bits: int) -> None:
    parser = FrameParser(max_message=1024)
    header = frame(OP_BINARY, length=2000, length_bits=bits)  # the header only
    assert parser.feed(header) == violation(1009, b"message too big")
    assert parser.finished


def test_two_gigabyte_header_buffers_nothing() -> None:
    parser = FrameParser(max_message=16384)
    header = frame(OP_BINARY, length=2**31)
    megabyte = bytes(1 << 20)
    assert parser.feed(header + megabyte) == violation(1009, b"message too big")
    assert parser.buffered == 0
    for _ in range(4):
        assert parser.feed(megabyte) == []
        assert parser.buffered == 0

    # Split inside the header: only the header's own bytes were ever held.
    parser = FrameParser(max_message=16384)
    assert parser.feed(header[:5]) == []
    assert parser.buffered == 5
    assert parser.feed(header[5:] + megabyte) == violation(1009, b"message too big")
    assert parser.buffered == 0


def test_oversized_fragmented_message_is_refused_from_a_header() -> None:
    parser = FrameParser(max_message=1000)
    first = frame(OP_BINARY, b"a" * 600, fin=False)
    assert parser.feed(first + frame(OP_PING, b"p")) == [Ping(b"p")]
    header = frame(OP_CONTINUATION, length=401)  # 600 + 401 > 1000, payload not sent yet
    assert parser.feed(header) == violation(1009, b"message too big")
    assert parser.buffered == 0
    # The frame's length is sound: its payload is skipped unread, then the peer's close counts.
    assert parser.discarding
    for _ in range(401):
        assert parser.feed(b"\x00") == []
        assert parser.buffered == 0
    assert parser.feed(frame(OP_CLOSE, struct.pack("!H", 1002))) == [Close(1002, b"")]


def test_fragmented_message_of_exactly_the_limit_is_accepted() -> None:
    parser = FrameParser(max_message=1000)
    stream = b"".join(
        frame(OP_CONTINUATION if i else OP_BINARY, b"z" * 100, fin=i == 9) for i in range(10)
    )
    assert parser.feed(stream) == [Message(OP_BINARY, b"z" * 1000)]


def test_parser_holds_at_most_one_frame() -> None:
    parser = FrameParser(max_message=1024)
    a, b = frame(OP_BINARY, b"a" * 200), frame(OP_BINARY, b"b" * 300)
    assert parser.feed(a + b[:100]) == [Message(OP_BINARY, b"a" * 200)]
    assert parser.buffered == 100
    assert parser.feed(b[100:] + a[:3]) == [Message(OP_BINARY, b"b" * 300)]
    assert parser.buffered == 3


# ------------------------------------------------------------------------------ header rules


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_rsv_bits_are_refused(rsv: int) -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_BINARY, b"x", rsv=rsv)) == violation(
        1002, b"no extensions were negotiated"
    )


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_refused(opcode: int) -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(opcode, b"x")) == violation(1002, b"unknown opcode")


def test_long_control_frame_is_refused_from_its_header() -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_PING, length=126)) == violation(1002, b"bad control frame")
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_PING, b"p" * 125)) == [Ping(b"p" * 125)]


def test_checks_run_in_order_masking_rsv_size() -> None:
    parser = FrameParser(max_message=10)
    unmasked = frame(5, b"x" * 20, rsv=0x40, mask=None)
    assert parser.feed(unmasked) == violation(1002, b"client frames must be masked")
    parser = FrameParser(max_message=10)
    assert parser.feed(frame(5, b"x" * 20, rsv=0x40)) == violation(
        1002, b"no extensions were negotiated"
    )
    parser = FrameParser(max_message=10)
    assert parser.feed(frame(OP_PING, b"x" * 20)) == violation(1009, b"message too big")


def test_after_a_bad_frame_only_the_peers_close_counts() -> None:
    stream = (
        frame(OP_BINARY, b"before")
        + frame(5, b"u" * 300)  # unknown opcode: a sound length, so the stream is readable
        + frame(OP_BINARY, b"after")
        + frame(OP_PING, b"p")
        + frame(OP_CLOSE, struct.pack("!H", 1002) + b"ok")
        + frame(OP_BINARY, b"late")
    )
    expected = [
        Message(OP_BINARY, b"before"),
        Violation(1002, b"unknown opcode"),
        Close(1002, b"ok"),
    ]
    for step in (None, 1, 2, 7, 64):
        parser = FrameParser(max_message=1024)
        assert feed_all(parser, stream, step) == expected, step
        assert parser.finished
        assert parser.buffered == 0


def test_discarding_skips_payloads_unread_until_the_close() -> None:
    parser = FrameParser(max_message=1 << 20)
    assert parser.feed(frame(OP_BINARY, b"ab", fin=False)) == []
    parser.discard()  # we sent our close frame
    big = frame(OP_BINARY, b"z" * 500_000)
    for i in range(0, len(big), 1000):
        assert parser.feed(big[i : i + 1000]) == []
        assert parser.buffered <= 14  # a header at most, never the payload
    stream = frame(OP_CONTINUATION, b"c") + frame(OP_PING, b"p") + frame(OP_CLOSE)
    assert feed_all(parser, stream, 1) == [Close(None, b"")]
    assert parser.finished


def test_unreadable_frame_while_discarding_finishes_quietly() -> None:
    parser = FrameParser(max_message=1024)
    parser.discard()
    assert parser.feed(frame(OP_BINARY, b"x", mask=None) + frame(OP_CLOSE)) == []
    assert parser.finished
    assert parser.buffered == 0


def test_nothing_is_parsed_after_a_violation() -> None:
    parser = FrameParser(max_message=1024)
    assert parser.feed(frame(OP_BINARY, b"x", rsv=0x40) + frame(OP_BINARY, b"y")) == violation(
        1002, b"no extensions were negotiated"
    )
    assert parser.finished
    assert parser.feed(frame(OP_BINARY, b"z")) == []


# ------------------------------------------------------------------------------ control frames


def test_close_with_code_and_reason() -> None:
    parser = FrameParser(max_message=1024)
    events = parser.feed(frame(OP_CLOSE, struct.pack("!H", 4001) + b"bye") + frame(2, b"late"))
    assert events == [Close(4001, b"bye")]
    assert events[0].reply == b"\x88\x02" + struct.pack("!H", 4001)
    assert parser.finished
    assert parser.feed(frame(OP_BINARY, b"later")) == []


@pytest.mark.parametrize("payload", [b"", b"\x03"])
def test_close_without_a_code_is_answered_with_1000(payload: bytes) -> None:
    parser = FrameParser(max_message=1024)
    events = parser.feed(frame(OP_CLOSE, payload))
    assert events == [Close(None, b"")]
    assert events[0].reply == b"\x88\x02\x03\xe8"


def test_ping_is_answered_with_its_payload() -> None:
    parser = FrameParser(max_message=1024)
    events = parser.feed(frame(OP_PING, b"stamp-123") + frame(OP_PING))
    assert events == [Ping(b"stamp-123"), Ping(b"")]
    assert events[0].pong == b"\x8a\x09stamp-123"
    assert events[1].pong == b"\x8a\x00"


def test_violation_carries_its_close_frame() -> None:
    v = Violation(1002, b"r" * 200)
    assert v.frame == b"\x88\x7d\x03\xea" + b"r" * 123


# ------------------------------------------------------------------------------ feeding


def _mixed_stream() -> bytes:
    return (
        frame(OP_BINARY, bytes(range(92)))
        + frame(OP_TEXT, b"hel", fin=False)
        + frame(OP_PING, b"ping")
        + frame(OP_CONTINUATION, b"lo")
        + frame(OP_BINARY, b"m" * 300)
        + frame(OP_BINARY, b"q" * 70000)
        + frame(OP_PONG)
        + frame(OP_BINARY, b"")
        + frame(OP_CLOSE, struct.pack("!H", 1000) + b"done")
    )


def test_byte_by_byte_gives_the_same_events() -> None:
    stream = _mixed_stream()
    whole = FrameParser(max_message=1 << 17).feed(stream)
    assert len(whole) == 8
    assert whole[-1] == Close(1000, b"done")
    for step in (1, 2, 3, 5, 13, 1000):
        parser = FrameParser(max_message=1 << 17)
        assert feed_all(parser, stream, step) == whole, step


message = st.tuples(
    st.sampled_from([OP_TEXT, OP_BINARY]),
    st.one_of(st.binary(max_size=200), st.binary(min_size=126, max_size=1200)),
    st.lists(st.integers(0, 1200), max_size=4),  # fragment boundaries
    st.lists(st.binary(max_size=125), max_size=2),  # pings between the fragments
    st.binary(min_size=4, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(message, max_size=8), st.lists(st.integers(0, 20000), max_size=12))
def test_any_split_of_valid_frames_yields_the_messages(
    messages: list[tuple[int, bytes, list[int], list[bytes], bytes]], cuts: list[int]
) -> None:
    stream = b""
    expected: list[Event] = []
    for opcode, payload, bounds, pings, mask in messages:
        edges = sorted({0, len(payload), *(b for b in bounds if b <= len(payload))})
        parts = [payload[a:b] for a, b in pairwise(edges)] or [b""]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            stream += frame(OP_CONTINUATION if i else opcode, part, fin=last, mask=mask)
            if not last and pings:
                ping = pings.pop()
                stream += frame(OP_PING, ping, mask=mask[::-1])
                expected.append(Ping(ping))
        expected.append(Message(opcode, payload))
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    parser = FrameParser(max_message=1200)
    events: list[Event] = []
    for a, b in pairwise(points):
        events += parser.feed(stream[a:b])
    assert events == expected
    assert parser.buffered == 0
    assert not parser.finished


any_frame = st.builds(
    lambda opcode, payload, fin, rsv, masked: frame(
        opcode, payload, fin=fin, rsv=rsv, mask=MASK if masked else None
    ),
    st.sampled_from([0, 0, 1, 2, 2, 3, 8, 9, 9, 10, 11]),
    st.binary(max_size=140),
    st.booleans(),
    st.sampled_from([0, 0, 0, 0, 0x40]),
    st.sampled_from([True] * 9 + [False]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(any_frame, max_size=10),
    st.lists(st.integers(0, 2000), max_size=10),
    st.one_of(st.none(), st.integers(0, 10)),
)
def test_any_split_of_any_frames_gives_the_events_of_one_feed(
    frames: list[bytes], cuts: list[int], discard_after: int | None
) -> None:
    """Valid or not, a stream parses the same however it is cut, in every mode."""
    cut_at = sum(len(f) for f in frames[:discard_after]) if discard_after is not None else None
    stream = b"".join(frames)

    def run(points: list[int]) -> list[Event]:
        parser = FrameParser(max_message=100)
        events: list[Event] = []
        for a, b in pairwise(points):
            events += parser.feed(stream[a:b])
            if b == cut_at:
                parser.discard()
            assert parser.buffered <= 14 + 100
        return events

    whole = [0, len(stream)]
    if cut_at is not None and cut_at not in whole:
        whole = [0, cut_at, len(stream)]
    points = sorted({*whole, *(c for c in cuts if c <= len(stream))})
    assert run(points) == run(whole)


# ------------------------------------------------------------------------------ builders


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x82\x00"),
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f" + struct.pack("!Q", 65536)),
    ],
)
def test_binary_frame_headers(size: int, header: bytes) -> None:
    payload = b"p" * size
    assert binary_frame(payload) == header + payload


def test_control_and_close_frames() -> None:
    assert control_frame(OP_PING) == b"\x89\x00"
    assert control_frame(OP_PONG, b"ab") == b"\x8a\x02ab"
    assert close_frame(1000) == b"\x88\x02\x03\xe8"
    assert close_frame(4008, b"x" * 500) == b"\x88\x7d\x0f\xa8" + b"x" * 123


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70001])
def test_masked_frames_parse_in_a_servers_parser(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    data = masked_frame(OP_BINARY, payload)
    assert data[0] == 0x80 | OP_BINARY and data[1] & 0x80
    assert len(data) == frame_size(size, masked=True)
    parser = FrameParser(max_message=1 << 17)
    assert feed_all(parser, data, 1000) == [Message(OP_BINARY, payload)]
    assert parser.buffered == 0


def test_masked_frames_get_fresh_keys() -> None:
    keys = {masked_frame(OP_TEXT, b"same")[2:6] for _ in range(20)}
    assert len(keys) > 1


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70001])
def test_frame_size_is_the_wire_size(size: int) -> None:
    assert frame_size(size) == len(binary_frame(b"q" * size))


# ------------------------------------------------------------------------------ the client role


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70001])
def test_a_clients_parser_reads_server_frames(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    stream = binary_frame(payload) + control_frame(OP_PING, b"hb") + close_frame(4008, b"bye")
    for step in (None, 1 if size < 1000 else 997, 4096):
        parser = FrameParser(max_message=1 << 17, role="client")
        assert parser.role == "client"
        assert feed_all(parser, stream, step) == [
            Message(OP_BINARY, payload),
            Ping(b"hb"),
            Close(4008, b"bye"),
        ]
        assert parser.finished and parser.buffered == 0


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_CLOSE])
def test_a_clients_parser_refuses_masked_frames(opcode: int) -> None:
    parser = FrameParser(max_message=1024, role="client")
    assert parser.feed(frame(opcode, b"hidden")) == violation(
        1002, b"server frames must not be masked"
    )
    assert parser.finished
    assert parser.feed(binary_frame(b"later")) == []


def test_a_servers_parser_refuses_what_a_client_parser_reads() -> None:
    assert FrameParser(max_message=1024).feed(binary_frame(b"x")) == violation(
        1002, b"client frames must be masked"
    )


def test_a_clients_parser_reassembles_and_discards_until_the_close() -> None:
    parser = FrameParser(max_message=1024, role="client")
    stream = (
        frame(OP_TEXT, b"he", fin=False, mask=None)
        + frame(OP_PING, b"p", mask=None)
        + frame(OP_CONTINUATION, b"llo", mask=None)
    )
    assert feed_all(parser, stream, 1) == [Ping(b"p"), Message(OP_TEXT, b"hello")]
    parser.discard()
    rest = binary_frame(b"y" * 300) + close_frame(1000) + binary_frame(b"after")
    assert feed_all(parser, rest, 7) == [Close(1000, b"")]
    assert parser.finished


def test_a_clients_parser_checks_sizes_from_the_header() -> None:
    parser = FrameParser(max_message=100, role="client")
    header = b"\x82\x7f" + struct.pack("!Q", 1 << 31)  # claims 2 GB, unmasked
    assert parser.feed(header) == violation(1009, b"message too big")
    assert parser.buffered == 0


def _flip(event: Event) -> Event:
    """A server parser's event as a client parser reports it for the same frames with their
    masking swapped."""
    if event == Violation(1002, b"client frames must be masked"):
        return Violation(1002, b"server frames must not be masked")
    return event


frame_fields = st.tuples(
    st.sampled_from([0, 0, 1, 2, 2, 3, 8, 9, 9, 10, 11]),
    st.binary(max_size=140),
    st.booleans(),
    st.sampled_from([0, 0, 0, 0, 0x40]),
    st.sampled_from([True] * 9 + [False]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(frame_fields, max_size=10),
    st.lists(st.integers(0, 2000), max_size=10),
    st.one_of(st.none(), st.integers(0, 10)),
)
def test_the_roles_differ_only_in_masking(
    fields: list[tuple[int, bytes, bool, int, bool]],
    cuts: list[int],
    discard_after: int | None,
) -> None:
    """Any stream, valid or not, read by a server's parser gives the events a client's parser
    gives for the same frames with masked and unmasked swapped, however it is cut."""
    as_sent = [frame(o, p, fin=f, rsv=r, mask=MASK if m else None) for o, p, f, r, m in fields]
    swapped = [frame(o, p, fin=f, rsv=r, mask=None if m else MASK) for o, p, f, r, m in fields]

    def run(frames: list[bytes], role: Role) -> list[Event]:
        stream = b"".join(frames)
        cut_at = sum(map(len, frames[:discard_after])) if discard_after is not None else None
        points = sorted(
            {0, len(stream), *(c for c in cuts if c <= len(stream))}
            | ({cut_at} if cut_at is not None else set())
        )
        parser = FrameParser(max_message=100, role=role)
        events: list[Event] = []
        if cut_at == 0:
            parser.discard()
        for a, b in pairwise(points):
            events += parser.feed(stream[a:b])
            if b == cut_at:
                parser.discard()
        return events

    assert [_flip(e) for e in run(as_sent, "server")] == run(swapped, "client")


# ------------------------------------------------------------------------------ the adapter


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def get_protocol(self) -> None:
        return None

    def set_protocol(self, protocol: object) -> None:
        pass


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[int, bytes]] = []
        self.closes = 0
        self.conn: WebSocketConnection | None = None
        self.close_on: bytes | None = None

    def on_message(self, opcode: int, payload: bytes) -> None:
        self.messages.append((opcode, payload))
        if payload == self.close_on and self.conn is not None:
            self.conn.close(4000, b"enough")

    def on_close(self) -> None:
        self.closes += 1


def _connect() -> tuple[WebSocketConnection, FakeTransport, Recorder]:
    conn = WebSocketConnection(max_message=1024)
    t, handler = FakeTransport(), Recorder()
    handler.conn = conn
    conn.attach(t, handler)  # type: ignore[arg-type]
    return conn, t, handler


async def test_adapter_delivers_messages_and_answers_pings_and_close() -> None:
    conn, t, handler = _connect()
    conn.data_received(frame(OP_BINARY, b"a") + frame(OP_PING, b"hi") + frame(OP_TEXT, b"b"))
    assert handler.messages == [(OP_BINARY, b"a"), (OP_TEXT, b"b")]
    assert bytes(t.written) == b"\x8a\x02hi"
    conn.data_received(frame(OP_CLOSE, struct.pack("!H", 1001) + b"bye"))
    assert bytes(t.written).endswith(b"\x88\x02\x03\xe9")
    assert t.closed


async def test_adapter_close_handshake_discards_until_the_peer_closes() -> None:
    conn, t, handler = _connect()
    handler.close_on = b"stop"
    conn.data_received(frame(OP_BINARY, b"stop") + frame(OP_BINARY, b"dropped"))
    assert handler.messages == [(OP_BINARY, b"stop")]
    assert bytes(t.written) == close_frame(4000, b"enough")
    assert not t.closed  # reading on for the peer's close
    conn.data_received(frame(OP_PING, b"x") + frame(OP_BINARY, b"dropped too"))
    assert bytes(t.written) == close_frame(4000, b"enough")  # no pong while closing
    conn.data_received(frame(OP_CLOSE, struct.pack("!H", 4000)))
    assert t.closed
    assert bytes(t.written) == close_frame(4000, b"enough")  # no second close frame


async def test_adapter_fails_a_bad_frame_and_closes_on_the_peers_close() -> None:
    conn, t, handler = _connect()
    conn.data_received(frame(OP_CONTINUATION, b"x") + frame(OP_BINARY, b"dropped"))
    assert bytes(t.written) == close_frame(1002, b"continuation without a message")
    assert handler.messages == []
    assert not t.closed
    conn.data_received(frame(OP_CLOSE, struct.pack("!H", 1002)))
    assert t.closed
    assert bytes(t.written) == close_frame(1002, b"continuation without a message")


async def test_adapter_closes_tcp_when_the_peer_never_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(transport_module, "CLOSE_WAIT", 0.01)
    conn, t, handler = _connect()
    conn.data_received(frame(OP_BINARY, b"x", rsv=0x40))
    assert bytes(t.written) == close_frame(1002, b"no extensions were negotiated")
    assert not t.closed
    await asyncio.sleep(0.05)
    assert t.closed
    conn.connection_lost(None)
    assert handler.closes == 1
    assert conn.closed.done()


async def test_adapter_abort_stops_everything() -> None:
    conn, t, handler = _connect()
    conn.abort()
    assert t.aborted
    before = conn.last_rx
    await asyncio.sleep(0.001)
    conn.data_received(frame(OP_BINARY, b"late") + frame(OP_PING))
    assert handler.messages == []
    assert bytes(t.written) == b""
    assert conn.last_rx > before
