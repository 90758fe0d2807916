"""The intake's promise, by property, against a real Redis and kombu's own restore code: whatever
bytes lie on a queue list, the pop script either files the message where kombu's restore can
re-publish it, or dead-letters it with a reason; nothing vanishes, the envelope decoder never
raises, and every string it hands on is text."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

from producers.local_redis import LocalRedis
from shared.names import DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY, priority_lists
from shared.wire_text import first_non_text, is_text
from workers.envelope import decode, recover_id
from workers.ingest import pop_script, served_lists

QUEUE = "conveyor.classify"
KEYS = ["unacked", "unacked_index", DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(tmp_path_factory.mktemp("intake-redis"), record_url=False)
    yield server.start()
    server.stop()


# -- strategies: messages as a careless producer or an attacker would write them -------------------
leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_value = st.recursive(
    leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
type_marker = st.fixed_dictionaries({"__type__": st.sampled_from(["datetime", "uuid", "nope"]), "__value__": leaf})
tag = st.text(max_size=20) | st.sampled_from(["a/b", "x" * 300, "", "ok-1", "\udcff", "\x00"])
properties = st.fixed_dictionaries(
    {},
    optional={
        "delivery_tag": tag | json_value,
        "delivery_info": json_value | st.fixed_dictionaries({"exchange": st.text(max_size=6), "routing_key": tag}),
        "priority": st.integers(-5, 300) | st.floats(allow_nan=True, allow_infinity=True) | json_value,
        "body_encoding": st.sampled_from(["base64", "utf-8", ""]) | st.text(max_size=6),
    },
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "id": tag | json_value,
        "task": st.sampled_from(["conveyor.classify", "conveyor.train", "x"]) | st.text(max_size=10),
        "retries": json_value,
        "expires": json_value,
        "marker": type_marker,
    },
)
message = st.fixed_dictionaries(
    {},
    optional={
        "body": st.text(max_size=40) | json_value,
        "content-type": st.sampled_from(["application/json", "application/x-python-serialize"]) | st.text(max_size=8),
        "headers": headers | json_value,
        "properties": properties | json_value,
    },
)


@st.composite
def raw_entries(draw: st.DrawFn) -> bytes:
    """A list entry: JSON of a message-like value (escaped or raw UTF-8, lone surrogates
    included), optionally damaged; or any bytes at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=60))
    value = draw(message | json_value)
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), allow_nan=True)
    data = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "byte", "control", "cut"]))
    if damage != "none" and data:
        at = draw(st.integers(0, len(data)))
        if damage == "byte":
            bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]))
            data = data[:at] + bad + data[at:]
        elif damage == "control":
            data = data[:at] + draw(st.sampled_from([b"\x00", b"\x01", b"\n", b"\x1f"])) + data[at:]
        else:
            data = data[:at]
    return data


def _restore_drops(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Could not restore" in r.getMessage()]


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(raw_entries(), min_size=1, max_size=4))
def test_every_entry_is_filed_restorably_or_dead_lettered(
    url: str, entries: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    r = redis.Redis.from_url(url)
    r.flushdb()
    pop = r.register_script(pop_script(served_lists([QUEUE], [])))
    for entry in entries:
        r.lpush(QUEUE, entry)
    out = pop(keys=KEYS, args=[len(entries) + 1, 1.0, 10, 0])
    assert len(out) == 4 * len(entries)  # every entry came out, none vanished
    filed = []
    for i in range(0, len(out), 4):
        tag, msg, index, reason = out[i], out[i + 1], out[i + 2], out[i + 3]
        assert index in (1, 5)  # the bare list, or the default-priority one for a message without a priority
        text = msg.decode("utf-8", "surrogateescape")
        env = decode(text)  # never raises
        for value in (env.id, env.task, env.queue, env.expires):
            assert value is None or env.error is not None or is_text(value)
        if env.ok:
            assert first_non_text([env.args, env.kwargs]) is None
        recover_id(text)  # never raises either
        if reason:
            letter = json.loads(r.hget(DEAD_LETTER_KEY, tag) or b"null")
            assert letter["reason"] == reason.decode() and letter["queue"] == QUEUE
            if not letter["truncated"]:
                assert letter["message"].encode("utf-8", "surrogateescape") == msg  # kept byte for byte
        else:
            assert r.zscore("unacked_index", tag) is not None
            filed.append(tag)
    # kombu's own restore (what a dead worker's messages go through) re-publishes every filed one.
    caplog.clear()
    with caplog.at_level(logging.CRITICAL), Connection(
        url, transport_options={"priority_steps": list(range(10)), "queue_order_strategy": "priority"}
    ) as conn:
        channel: Any = conn.default_channel
        for t in filed:
            channel.qos.restore_by_tag(t)
    assert _restore_drops(caplog) == []
    assert r.hlen("unacked") == 0
    back = sum(int(r.llen(key)) for key in priority_lists(QUEUE))
    assert back == len(filed)  # each one back on the queue it was taken from


def test_a_known_set_of_unrestorable_shapes_is_dead_lettered_and_fine_ones_filed(url: str) -> None:
    r = redis.Redis.from_url(url)
    r.flushdb()
    pop = r.register_script(pop_script(served_lists([QUEUE], [])))
    cases: list[tuple[bytes, bool]] = [
        (b'{"headers": [], "properties": {}}', True),  # normalized: kombu needs an object, cjson cannot tell
        (b'{"headers": null}', False),
        (b'{"properties": {"delivery_info": null}}', False),
        (b'{"properties": {"priority": 1e400}}', False),
        (b"[1, 2]", False),
        (b'{"headers": {"x": {"__type__": "datetime", "__value__": "no"}}}', False),
        (b'{"headers": {"id": "\xff"}}', False),
        (b'{"headers": {"id": "\\ud800"}}', False),
        (b'{"a": 0x10}', False),
        (b'{"headers": {"id": "a\x01b"}}', True),  # control byte: filed in a form Python's json reads
        (b'{"headers": {"id": "ok"}, "properties": {"delivery_tag": "../x"}}', True),
    ]
    for raw, _ in cases:
        r.lpush(QUEUE, raw)
    out = pop(keys=KEYS, args=[len(cases), 1.0, 10, 0])
    got = [(out[i + 1], out[i + 3] == b"") for i in range(0, len(out), 4)]
    assert sorted(got) == sorted(cases)  # (filed ones without a priority come later, from the default list)
    tags = [out[i] for i in range(0, len(out), 4) if out[i + 3] == b""]
    assert all(t.startswith(b"conveyor-") for t in tags)  # '../x' was not kept as a tag


def test_dead_letter_and_result_keys_use_the_exact_bytes_of_an_id(tmp_path: Path) -> None:
    from shared.wire_text import wire_bytes

    raw = b'{"headers": {"id": "job-\xff"}}'.decode("utf-8", "surrogateescape")
    env = decode(raw)
    assert env.id == "job-\udcff" and not env.ok
    assert wire_bytes(env.id) == b"job-\xff"
    assert wire_bytes("\ud800") == "\ud800".encode("utf-8", "surrogatepass")


@settings(max_examples=500, deadline=None, database=None)
@given(args=st.lists(json_value, max_size=3), kwargs=st.dictionaries(st.text(max_size=6), json_value, max_size=3),
       ascii_only=st.booleans())  # fmt: skip
def test_the_decoder_refuses_exactly_the_messages_holding_a_string_that_is_not_text(
    args: list[Any], kwargs: dict[str, Any], ascii_only: bool
) -> None:
    import base64

    body = json.dumps([args, kwargs, {}], ensure_ascii=ascii_only, allow_nan=True)
    data = body.encode("utf-8", "surrogatepass") if not ascii_only else body.encode()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return  # not UTF-8 at all: the pop script refuses it before the decoder sees it
    message = {
        "body": base64.b64encode(data).decode(), "content-type": "application/json",
        "headers": {"task": "conveyor.classify", "id": "job-1"}, "properties": {"body_encoding": "base64"},
    }  # fmt: skip
    env = decode(json.dumps(message))
    has_non_text = first_non_text([args, kwargs]) is not None
    assert (env.error is not None) == has_non_text, (env.error, args, kwargs)
    if has_non_text:
        assert env.error is not None and "not valid Unicode" in env.error


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=(st.binary(max_size=40) | st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass"))).map(
        lambda b: bytes(c for c in b if c >= 0x20 and c not in b'"\\')
    )
)
def test_the_pop_scripts_utf8_check_agrees_with_pythons(url: str, raw: bytes) -> None:
    """Bytes inside a JSON string: filed exactly when they are UTF-8 (Python's strict decoder)."""
    r = redis.Redis.from_url(url)
    r.flushdb()
    pop = r.register_script(pop_script(served_lists([QUEUE], [])))
    r.lpush(QUEUE, b'{"headers": {"x": "' + raw + b'"}, "properties": {"priority": 0}}')
    out = pop(keys=KEYS, args=[2, 1.0, 10, 0])
    try:
        raw.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    assert (out[3] == b"") == utf8, (raw, out[3])
