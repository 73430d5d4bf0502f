"""The plain-data encoding between the grader's processes (omniopd.evaluation.wire)."""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, namedtuple

import pytest

from omniopd.evaluation import wire

VALUES = [
    None, True, False, 0, -7, 2**53, -(2**200), 10**5000, 0.1, -0.0, 1e308, "héllo\x00", "", b"\x00\xff",
    bytearray(b"ab"), 3 + 4j, [1, [2, (3,)]], (1, "a", None), (), {1: "a", (2, 3): [4], "k": {5}},
    {frozenset({1, 2}), (1, 2)}, frozenset(), [int, str, type(None), tuple],
]


@pytest.mark.parametrize("value", VALUES, ids=[type(v).__name__ for v in VALUES])
def test_round_trip_keeps_value_and_type(value):
    (message,) = wire.FrameReader().feed(wire.pack({"v": wire.encode(value)}))
    back = wire.decode(message["v"])
    assert back == value and type(back) is type(value)
    if isinstance(value, (list, tuple)):
        assert [type(x) for x in back] == [type(x) for x in value]


def test_non_finite_floats():
    for x in (math.inf, -math.inf):
        assert wire.decode(wire.encode(x)) == x
    assert math.isnan(wire.decode(wire.encode(math.nan)))


def test_subclasses_arrive_as_their_base_type_without_their_methods():
    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    Pair = namedtuple("Pair", "a b")
    assert type(wire.decode(wire.encode(Liar(3)))) is int and wire.decode(wire.encode(Liar(3))) != 4
    assert wire.decode(wire.encode(Pair(1, 2))) == (1, 2) and type(wire.decode(wire.encode(Pair(1, 2)))) is tuple
    assert wire.decode(wire.encode(Counter("aab"))) == {"a": 2, "b": 1}
    assert type(wire.decode(wire.encode(OrderedDict(a=1)))) is dict


def test_what_is_not_plain_data_is_refused():
    class Yes:
        def __eq__(self, other):
            return True

    cyclic: list = []
    cyclic.append(cyclic)
    for value in (Yes(), (x for x in range(3)), print, object, map(str, [1]), cyclic):
        with pytest.raises(wire.Unsupported):
            wire.encode(value)


def test_malformed_data_and_frames_are_protocol_errors():
    for data in ({"set": [[1]]}, {"nope": 1}, {"int": "zz"}, {"a": 1, "b": 2}, {"type": "object"}, {"complex": [1]}):
        with pytest.raises(wire.ProtocolError):
            wire.decode(data)
    reader = wire.FrameReader(limit=100)
    with pytest.raises(wire.ProtocolError):
        reader.feed(b"\x00\x00\x10\x00")
    with pytest.raises(wire.ProtocolError):
        wire.FrameReader().feed(b"\x00\x00\x00\x03[1]")
    assert wire.FrameReader().feed(wire.pack({"a": 1})[:3]) == []  # an incomplete frame waits
