"""Fuzz the fleet manager's ingestion through a real broker: every payload accounted for, nothing crashes.

A private Mosquitto, a live :class:`fleet.ingest.Ingestor` in this process writing into SQLite (or a fresh
PostgreSQL database with ``--db postgresql+psycopg://...``), and ``--publishers`` processes publishing
``--payloads`` payloads with QoS 1. The payloads come from a seeded generator (``--seed``; the same seed
gives the same payloads) that mixes valid messages of every kind (built with the contract's models) with
what a broken or hostile device might send:

- wrong types, missing required fields, extra fields (top level and nested), wrong schema versions;
- valid JSON that is not an object, non-JSON bytes, truncated JSON, trailing garbage, a UTF-8 BOM;
- invalid UTF-8 spliced into string values, JSON nested 260 to 100,000 levels deep;
- huge strings (200 kB, in valid and invalid messages), empty payloads;
- valid messages on another kind's channel or another device's topic, replays (same message id);
- odd topics under the device tree: bad fleet/device ids that still match the manager's subscription
  (``bad_topic``), and topics outside it (unknown channel, extra level, ``desired``), which the broker
  must not deliver to the manager at all;
- valid messages with extreme values the contract allows (the largest 64-bit and per-window 32-bit
  integers, 64-character ids, NUL characters, dates in year 1 and 9999); integers past those bounds
  are invalid.

Each payload carries the outcome the contract says it must have; the bench exits 1 unless the ingestion
threads are alive at the end, every published payload is accounted for (stored + rejected + duplicates
+ outside the subscription == sent), and stored, duplicates and every reject reason match what was
expected. A contract-valid message the database cannot hold is counted as ``unstorable``.

    .venv/bin/python bench/fleet_fuzz.py --payloads 100000 --json-out out/bench/fleet-fuzz.json
    .venv/bin/python bench/fleet_fuzz.py --payloads 20000 --db postgresql+psycopg://postgres@127.0.0.1/test
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import finish, fresh_database  # bench/ is not a package

from agent.contract import (
    INT32_MAX,
    INT64_MAX,
    Birth,
    BundleRef,
    Event,
    Metrics,
    Percentiles,
    Readings,
    Status,
    UpdateStatus,
    device_topic,
)
from agent.mqtt import make_client, parse_broker_url
from fleet.broker import MosquittoBroker
from fleet.ingest import Ingestor
from fleet.store import Store

FLEET = "fuzz"
HUGE = 200_000  # bytes of a "huge string"
KIND_CHANNEL = {
    "birth": "birth",
    "status": "status",
    "metrics": "metrics",
    "event": "events",
    "update_status": "update",
}
REQUIRED = {
    "birth": ("profile", "agent_version", "backend"),
    "status": ("state", "uptime_s"),
    "metrics": ("window_s", "inferences"),
    "event": ("event", "message"),
    "update_status": ("update_id", "target", "state"),
}
ENVELOPE = ("device_id", "seq", "message_id", "sent_at", "kind")
# Values the contract must refuse for each field (no lax-mode coercion applies to any of them).
BAD_VALUES: dict[str, list[Any]] = {
    "device_id": [123, None, "", "has space", "a/b", "x" * 65, "-lead", ["d"], {"id": 1}],
    "seq": ["seven", -1, 1.5, None, [], {}, 2**63, 2**100],
    "message_id": [5, None, "xyz", "A" * 32, "0" * 31, "0" * 33, "g" * 32],
    "sent_at": ["yesterday", "2024-01-01T00:00:00", None, [], "2024-13-45T00:00:00Z"],
    "kind": [5, None, "nope", "METRICS", ["metrics"]],
    "profile": ["", "bad profile", 7, None],
    "agent_version": ["", 3, None, "v" * 65],
    "backend": ["tensorrt", "", 1, None],
    "bundle": ["m@v", 5, {"model_id": "m"}],
    "variants": ["dense", [1, 2], ["bad id"]],
    "state": ["sleeping", 1, None, ""],
    "uptime_s": [-1, "long", None, [], "nan"],
    "outbox_pending": [-1, 1.5, "x", 2**63],
    "window_s": [0, -1, "fast", None],
    "inferences": [-5, "many", 1.5, None, 2**31, 2**64],
    "errors": [-1, "none", 2**31],
    "latency": ["fast", {"p50_ms": 1}, {"p50_ms": -1, "p90_ms": 1, "p99_ms": 1}],
    "readings": [{"battery_pct": 101}, {"cpu_load_pct": -1}, "full", {"charging": "maybe"}],
    "mean_density": [2, -0.5],
    "agreement": [1.5, "all"],
    "event": ["exploded", 1, None],
    "severity": ["fatal", 0],
    "message": [None, 5, []],
    "data": [[1], "x", {"k": [1]}, {"k": {"n": 1}}],
    "update_id": ["", "bad id", None],
    "target": ["m@v", {"model_id": "m"}, None],
    "bytes_done": [-1, "lots"],
    "bytes_total": [-1],
}
BAD_SCHEMA_VERSIONS: list[Any] = [0, 2, 3, 99, -1, "1", "v1", None, [1], {"v": 1}]
# Topic levels that match the manager's `+` but are not identifiers: delivered, then rejected.
BAD_IDS = ["-lead", "x" * 65, "d\u00e9v", "a b", "", "a:b", ".hidden", "\u4e2d\u6587"]
INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"\x80"]
NOT_JSON_START = b"\x00\x01\x7f\xff<!#%&'()*;=?@\\^`|~"

# (category, weight); each category's generator returns (topic, payload, expected outcome)
WEIGHTS: dict[str, float] = {
    "valid": 30,
    "valid_edge": 2,
    "valid_huge": 0.1,
    "duplicate": 5,
    "not_json": 8,
    "empty": 1,
    "invalid_utf8": 6,
    "deep_nesting": 3,
    "not_object": 3,
    "wrong_type": 12,
    "missing_field": 8,
    "extra_field": 6,
    "schema_version": 5,
    "wrong_kind": 4,
    "wrong_device": 4,
    "bad_topic": 4,
    "outside_subscription": 3,
    "huge_invalid": 0.1,
}

Item = tuple[str, bytes, str]


class Fuzzer:
    """A seeded source of (topic, payload, expected outcome). Expected outcomes: ``stored``, ``duplicate``,
    ``edge`` (valid, stored unless the database cannot hold a value: then ``reject.unstorable``),
    ``reject.<reason>`` and ``outside`` (the broker must not deliver it to the manager)."""

    def __init__(self, seed: str, *, devices: int = 256) -> None:
        self.rng = random.Random(seed)
        self.devices = [f"fz-{i:04d}" for i in range(devices)]
        self.replay: list[tuple[str, bytes]] = []
        self.epoch = datetime(2025, 1, 1, tzinfo=UTC)
        self._categories = list(WEIGHTS)
        self._weights = [WEIGHTS[c] for c in self._categories]

    # --- building blocks -----------------------------------------------------------------------------

    def _device(self) -> str:
        return self.rng.choice(self.devices)

    def _ident(self) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-"
        return self.rng.choice("abcxyz019") + "".join(
            self.rng.choice(alphabet) for _ in range(self.rng.randint(0, 20))
        )

    def _text(self) -> str:
        pool = 'abc xyz \u00e9\u00fc\u4e2d\u6587\U0001f600"\\/\n\t{}[]:,'
        return "".join(self.rng.choice(pool) for _ in range(self.rng.randint(0, 40)))

    def _envelope(self, device: str) -> dict[str, Any]:
        return {
            "device_id": device,
            "seq": self.rng.randrange(0, 2**31),
            "message_id": f"{self.rng.getrandbits(128):032x}",
            "sent_at": self.epoch + timedelta(seconds=self.rng.uniform(0, 86400 * 30)),
        }

    def _maybe(self, value: Any) -> Any:
        return value if self.rng.random() < 0.7 else None

    def _valid(self, device: str, kind: str | None = None) -> Any:
        """A valid message (a contract model) of ``kind`` (random if None) from ``device``."""
        r = self.rng
        kind = kind or r.choice(list(KIND_CHANNEL))
        env = self._envelope(device)
        if kind == "birth":
            return Birth(
                **env,
                profile=self._ident(),
                agent_version=f"0.{r.randint(0, 9)}.{r.randint(0, 99)}",
                backend=r.choice(["onnx", "executorch"]),
                bundle=self._maybe(BundleRef(model_id=self._ident(), bundle_version=self._ident())),
                variants=tuple(self._ident() for _ in range(r.randint(0, 4))),
            )
        if kind == "status":
            return Status(
                **env,
                state=r.choice(["online", "offline"]),
                uptime_s=r.uniform(0, 1e6),
                active_variant=self._maybe(self._ident()),
                budget=self._maybe(r.random()),
                outbox_pending=r.randint(0, 1000),
            )
        if kind == "metrics":
            p50 = r.uniform(0, 50)
            return Metrics(
                **env,
                window_s=r.uniform(0.1, 60),
                inferences=r.randint(0, 10_000),
                errors=r.randint(0, 10),
                latency=self._maybe(Percentiles(p50_ms=p50, p90_ms=p50 * 1.5, p99_ms=p50 * 2)),
                mean_macs=self._maybe(r.uniform(0, 1e9)),
                mean_density=self._maybe(r.random()),
                active_variant=self._maybe(self._ident()),
                budget=self._maybe(r.random()),
                readings=Readings(
                    battery_pct=self._maybe(r.uniform(0, 100)),
                    charging=self._maybe(r.random() < 0.5),
                    cpu_load_pct=self._maybe(r.uniform(0, 100)),
                    temperature_c=self._maybe(r.uniform(-20, 90)),
                    free_memory_mb=self._maybe(r.uniform(0, 4096)),
                ),
                agreement=self._maybe(r.random()),
                shadow_runs=r.randint(0, 5),
            )
        if kind == "event":
            return Event(
                **env,
                event=r.choice(["started", "stopping", "variant_switch", "budget_change", "error"]),
                severity=r.choice(["info", "warning", "error"]),
                message=self._text(),
                data={self._ident(): r.choice([None, 1, -2.5, True, self._text()]) for _ in range(3)},
            )
        return UpdateStatus(
            **env,
            update_id=self._ident(),
            target=BundleRef(model_id=self._ident(), bundle_version=self._ident()),
            state=r.choice(["downloading", "verifying", "staged", "committed", "failed"]),
            bytes_done=r.randint(0, 10**8),
            bytes_total=self._maybe(r.randint(0, 10**8)),
            error=self._maybe(self._text()),
        )

    def _doc(self, device: str) -> dict[str, Any]:
        """A valid message as a JSON document, ready to be damaged."""
        return json.loads(self._valid(device).to_json())  # type: ignore[no-any-return]

    @staticmethod
    def _topic(device: str, doc_or_kind: dict[str, Any] | str, fleet: str = FLEET) -> str:
        kind = doc_or_kind if isinstance(doc_or_kind, str) else doc_or_kind["kind"]
        return f"edgeprune/v1/{fleet}/{device}/{KIND_CHANNEL[kind]}"

    @staticmethod
    def _dumps(doc: Any) -> bytes:
        return json.dumps(doc, ensure_ascii=False).encode()

    # --- categories ----------------------------------------------------------------------------------

    def valid(self) -> Item:
        device = self._device()
        m = self._valid(device)
        topic, payload = device_topic(FLEET, device, KIND_CHANNEL[m.kind]), m.to_json().encode()  # type: ignore[arg-type]
        self.replay.append((topic, payload))
        if len(self.replay) > 1000:
            del self.replay[: len(self.replay) - 1000]
        return topic, payload, "stored"

    def duplicate(self) -> Item:
        if not self.replay:
            return self.valid()
        topic, payload = self.rng.choice(self.replay)
        return topic, payload, "duplicate"

    def valid_edge(self) -> Item:
        r = self.rng
        device = r.choice([*self.devices[:4], "Z" + "9" * 63, "a.b_c-d"])
        doc = self._doc(device)
        big, count = INT64_MAX, INT32_MAX  # the largest integers the contract allows
        extreme: dict[str, list[dict[str, Any]]] = {
            "birth": [{"agent_version": "\u0000" + "v" * 63}, {"variants": ["a" * 64] * 50}],
            "status": [{"uptime_s": 1.7976931348623157e308}, {"outbox_pending": big}, {"budget": -1e300}],
            "metrics": [
                {"inferences": count},
                {"shadow_runs": count, "errors": count},
                {"window_s": 5e-324},
                {"mean_macs": 1e308},
            ],
            "event": [
                {"message": "nul \u0000 inside", "data": {"k\u0000": "v\u0000"}},
                {"data": {"big": 10**40}},
                {"message": "\U0001f600" * 1000},
            ],
            "update_status": [{"bytes_done": big, "bytes_total": big}, {"error": "\u0000"}],
        }
        doc.update(r.choice(extreme[doc["kind"]]))
        doc.update(r.choice([{}, {"seq": big}, {"sent_at": "0001-01-01T00:00:00+00:00"}]))
        doc.update(r.choice([{}, {"sent_at": "9999-12-31T23:59:59.999999+00:00"}]))
        payload = self._dumps(doc)
        # U+0000 in any text is well-formed JSON the contract refuses: no store keeps it everywhere
        return self._topic(device, doc), payload, "reject.invalid" if b"\\u0000" in payload else "edge"

    def valid_huge(self) -> Item:
        device = self._device()
        text = "".join(self.rng.choice("ab \u00e9") for _ in range(64)) * (HUGE // 64)
        m = Event(**self._envelope(device), event="error", severity="error", message=text)
        return self._topic(device, "event"), m.to_json().encode(), "stored"

    def not_json(self) -> Item:
        r = self.rng
        device = self._device()
        valid = self._valid(device).to_json().encode()
        choice = r.randrange(5)
        if choice == 0:
            payload = bytes([r.choice(NOT_JSON_START)]) + r.randbytes(r.randint(0, 300))
        elif choice == 1:
            payload = valid[: r.randint(1, len(valid) - 1)]  # truncated
        elif choice == 2:
            payload = valid + r.choice([b" garbage", b"}", b",", b"\x00", b"{}"])
        elif choice == 3:
            payload = b"\xef\xbb\xbf" + valid  # a UTF-8 BOM is not JSON
        else:
            payload = valid.replace(b'"', b"'")  # a Python repr, not JSON
        kind = json.loads(valid)["kind"]
        return self._topic(device, kind), payload, "reject.not_json"

    def empty(self) -> Item:
        device = self._device()
        return self._topic(device, self.rng.choice(list(KIND_CHANNEL))), b"", "reject.empty"

    def invalid_utf8(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        text = self._dumps(doc)
        marker = b'"message_id":"' if b'"message_id":"' in text else b'"message_id": "'
        at = text.index(marker) + len(marker) + self.rng.randint(0, 31)
        payload = text[:at] + self.rng.choice(INVALID_UTF8) + text[at:]
        return self._topic(device, doc), payload, "reject.not_json"

    def deep_nesting(self) -> Item:
        r = self.rng
        device = self._device()
        kind = r.choice(list(KIND_CHANNEL))
        deep = r.random() < 0.6
        depth = r.randint(260, 100_000) if deep else r.randint(2, 150)
        arrays = r.random() < 0.5
        payload = b"[" * depth + b"]" * depth if arrays else b'{"a":' * depth + b"1" + b"}" * depth
        # jiter (pydantic's JSON parser) stops at 200 levels: "recursion limit exceeded".
        return self._topic(device, kind), payload, "reject.not_json" if deep else "reject.invalid"

    def not_object(self) -> Item:
        device = self._device()
        value = self.rng.choice([5, -1.5, "metrics", None, True, [], [1, 2], ["kind", "metrics"], ""])
        return self._topic(device, self.rng.choice(list(KIND_CHANNEL))), self._dumps(value), "reject.invalid"

    def wrong_type(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        fields = [f for f in doc if f in BAD_VALUES]
        key = self.rng.choice(fields)
        topic = self._topic(device, doc)  # the topic of the kind before any damage to "kind"
        doc[key] = self.rng.choice(BAD_VALUES[key])
        return topic, self._dumps(doc), "reject.invalid"

    def missing_field(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        topic = self._topic(device, doc)
        for key in self.rng.sample([*ENVELOPE, *REQUIRED[doc["kind"]]], self.rng.randint(1, 3)):
            doc.pop(key)
        return topic, self._dumps(doc), "reject.invalid"

    def extra_field(self) -> Item:
        r = self.rng
        device = self._device()
        doc = self._doc(device)
        nested = [k for k in ("readings", "latency", "target", "bundle") if isinstance(doc.get(k), dict)]
        value: Any = r.choice([1, "x", None, [], {"a": 1}, 1e308])
        if nested and r.random() < 0.4:
            doc[r.choice(nested)]["zz_" + self._ident()] = value
        else:
            doc["zz_" + self._ident()] = value
        return self._topic(device, doc), self._dumps(doc), "reject.invalid"

    def schema_version(self) -> Item:
        device = self._device()
        doc = self._doc(device) | {"schema_version": self.rng.choice(BAD_SCHEMA_VERSIONS)}
        return self._topic(device, doc), self._dumps(doc), "reject.schema_version"

    def wrong_kind(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        other = self.rng.choice([k for k in KIND_CHANNEL if k != doc["kind"]])
        return self._topic(device, other), self._dumps(doc), "reject.wrong_kind"

    def wrong_device(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        other = self.rng.choice([d for d in self.devices[:8] if d != device])
        return self._topic(other, doc), self._dumps(doc), "reject.wrong_device"

    def bad_topic(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        bad = self.rng.choice(BAD_IDS)
        in_device = self.rng.random() < 0.7
        topic = self._topic(bad, doc) if in_device else self._topic(device, doc, fleet=bad)
        return topic, self._dumps(doc), "reject.bad_topic"

    def outside_subscription(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        channel = KIND_CHANNEL[doc["kind"]]
        topic = self.rng.choice(
            [
                f"edgeprune/v1/{FLEET}/{device}/desired",
                f"edgeprune/v1/{FLEET}/{device}/{channel}/extra",
                f"edgeprune/v1/{FLEET}/{device}/telemetry",
                f"edgeprune/v1/{FLEET}/{device}/{channel.upper()}",
                f"edgeprune/v1/{FLEET}/{device}",
                f"edgeprune/v2/{FLEET}/{device}/{channel}",
                f"edgeprune/v1/{FLEET}/{device}/{channel}/",
            ]
        )
        return topic, self._dumps(doc), "outside"

    def huge_invalid(self) -> Item:
        device = self._device()
        doc = self._doc(device)
        choice = self.rng.randrange(3)
        if choice == 0:
            doc["device_id"] = "d" * HUGE
            return self._topic(device, doc), self._dumps(doc), "reject.invalid"
        if choice == 1:
            doc["zz_huge"] = "\u00e9" * (HUGE // 2)
            return self._topic(device, doc), self._dumps(doc), "reject.invalid"
        payload = bytes([self.rng.choice(NOT_JSON_START)]) + self.rng.randbytes(HUGE)
        return self._topic(device, doc), payload, "reject.not_json"

    def draw(self) -> Item:
        category = self.rng.choices(self._categories, self._weights)[0]
        generate: Callable[[], Item] = getattr(self, category)
        return generate()


def generate(seed: str, n: int) -> list[Item]:
    fuzzer = Fuzzer(seed)
    return [fuzzer.draw() for _ in range(n)]


# --- publishers ----------------------------------------------------------------------------------------


def _publisher(*, broker_url: str, seed: str, n: int, acked: Any, report: Any, go: Any) -> None:
    items = generate(seed, n)
    report.put(("expected", dict(Counter(expect for _, _, expect in items))))
    address = parse_broker_url(broker_url)
    client = make_client(f"fuzz-pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(500)
    done = [0]

    def on_publish(*args: Any) -> None:
        done[0] += 1

    client.on_publish = on_publish
    client.connect(address.host, address.port)
    client.loop_start()
    go.wait()
    infos = []
    for i, (topic, payload, _) in enumerate(items):
        infos.append(client.publish(topic, payload, qos=1))
        if i % 500 == 0:
            acked.value = done[0]
    for info in infos:
        info.wait_for_publish(300)
        acked.value = done[0]
    acked.value = sum(1 for info in infos if info.is_published())
    report.put(("done", acked.value))
    client.disconnect()
    client.loop_stop()


# --- the run -------------------------------------------------------------------------------------------


class CrashWatch:
    """Records exceptions that end any thread of this process (paho's network loop, the writer)."""

    def __init__(self) -> None:
        self.crashes: list[str] = []
        self._previous = threading.excepthook

    def __enter__(self) -> CrashWatch:
        threading.excepthook = self._hook
        return self

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        name = args.thread.name if args.thread else "?"
        self.crashes.append(f"{name}: {args.exc_type.__name__}: {args.exc_value}")
        self._previous(args)

    def __exit__(self, *exc: object) -> None:
        threading.excepthook = self._previous


def ingest_threads_alive(ing: Ingestor) -> dict[str, bool]:
    names = {t.name for t in threading.enumerate() if t.is_alive()}
    return {
        "writer": "fleet-ingest-writer" in names,
        "mqtt_loop": any(n.startswith("paho-mqtt-client-") for n in names),
        "connected": bool(ing.client.is_connected()),
    }


def summarize(counters: dict[str, int]) -> dict[str, Any]:
    rejects = {k.removeprefix("reject."): v for k, v in counters.items() if k.startswith("reject.")}
    return {
        "stored": counters.get("stored", 0),
        "duplicates": counters.get("duplicates", 0),
        "rejected": sum(rejects.values()),
        "rejects": dict(sorted(rejects.items())),
    }


def check(result: dict[str, Any]) -> list[str]:
    """What went wrong, one line each (empty: all goals met)."""
    problems = [f"crash: {c}" for c in result["crashes"]]
    problems += [f"ingestion {k} not alive at the end" for k, ok in result["alive"].items() if not ok]
    exp, got = result["expected"], result["measured"]
    if result["acked"] != result["generated"]:
        problems.append(f"only {result['acked']} of {result['generated']} publishes were acknowledged")
    accounted = got["stored"] + got["rejected"] + got["duplicates"] + exp["outside"]
    if accounted != result["acked"]:
        problems.append(
            f"accounting: stored {got['stored']} + rejected {got['rejected']} + duplicates "
            f"{got['duplicates']} + outside the subscription {exp['outside']} = {accounted}, "
            f"sent {result['acked']} ({result['acked'] - accounted:+d} unaccounted)"
        )
    if result["ingestor"]["received"] != got["stored"] + got["rejected"] + got["duplicates"]:
        problems.append(
            f"the ingestor received {result['ingestor']['received']}, the store counted otherwise"
        )
    unstorable = got["rejects"].get("unstorable", 0)
    if got["stored"] + unstorable != exp["stored"] + exp["edge"] or unstorable > exp["edge"]:
        problems.append(
            f"stored {got['stored']} (+ {unstorable} unstorable), expected {exp['stored']} valid "
            f"+ {exp['edge']} edge-valid"
        )
    if got["duplicates"] != exp["duplicate"]:
        problems.append(f"duplicates {got['duplicates']}, expected {exp['duplicate']}")
    for reason in sorted((set(exp["rejects"]) | set(got["rejects"])) - {"unstorable"}):
        if exp["rejects"].get(reason, 0) != got["rejects"].get(reason, 0):
            problems.append(
                f"reject.{reason}: {got['rejects'].get(reason, 0)}, expected {exp['rejects'].get(reason, 0)}"
            )
    if result["ingestor"]["write_failures"]:
        problems.append(f"{result['ingestor']['write_failures']} batch writes failed")
    return problems


def expected_totals(per_publisher: list[dict[str, int]]) -> dict[str, Any]:
    total: Counter[str] = Counter()
    for counts in per_publisher:
        total.update(counts)
    return {
        "stored": total["stored"],
        "edge": total["edge"],
        "duplicate": total["duplicate"],
        "outside": total["outside"],
        "rejects": {
            k.removeprefix("reject."): v for k, v in sorted(total.items()) if k.startswith("reject.")
        },
    }


def run(args: argparse.Namespace, db: str, broker: MosquittoBroker) -> dict[str, Any]:  # noqa: PLR0915
    ctx = mp.get_context("spawn")
    report = ctx.Queue()
    go = ctx.Event()
    shares = [
        args.payloads // args.publishers + (k < args.payloads % args.publishers)
        for k in range(args.publishers)
    ]
    acked = [ctx.Value("q", 0) for _ in shares]
    pubs = [
        ctx.Process(
            target=_publisher,
            kwargs=dict(
                broker_url=broker.url, seed=f"{args.seed}-{k}", n=n, acked=acked[k], report=report, go=go
            ),
            name=f"fuzz-publisher-{k}",
        )
        for k, n in enumerate(shares)
    ]
    # Rejects are logged one line each at WARNING: keep them out of the bench's output (errors still show).
    logging.getLogger("fleet.ingest").setLevel(logging.ERROR)
    t_start = time.time()
    with CrashWatch() as watch, Store(db) as store:
        ing = Ingestor(
            store,
            broker_url=broker.url,
            group=f"fuzz-{uuid.uuid4().hex[:6]}",
            batch_max=args.batch,
            receive_maximum=args.receive_maximum,
        )
        ing.start()
        try:
            for p in pubs:
                p.start()
            expected = [report.get(timeout=300)[1] for _ in pubs]
            exp = expected_totals(expected)
            to_deliver = args.payloads - exp["outside"]
            print(
                f"generated {args.payloads:,} payloads in {time.time() - t_start:.1f} s: "
                f"{exp['stored']:,} valid, {exp['edge']:,} edge-valid, {exp['duplicate']:,} replays, "
                f"{sum(exp['rejects'].values()):,} to reject, {exp['outside']:,} outside the subscription",
                flush=True,
            )
            t0 = time.time()
            go.set()
            published_done = 0
            last_change, last_total, next_print = time.monotonic(), -1, 0.0
            while True:
                while not report.empty():
                    kind, _ = report.get()
                    published_done += kind == "done"
                s = ing.stats()
                total = s["received"]
                now = time.monotonic()
                if total != last_total:
                    last_change, last_total = now, total
                if now >= next_print:
                    sent = sum(a.value for a in acked)
                    print(
                        f"[{time.time() - t0:6.1f} s] acked {sent:,}/{args.payloads:,}; ingested "
                        f"{total:,}/{to_deliver:,} (stored {s['stored']:,}, rejected "
                        f"{sum(s['rejects'].values()):,}, duplicates {s['duplicates']:,}); "
                        f"queued {s['queued']:,}",
                        flush=True,
                    )
                    next_print = now + args.progress_s
                if published_done == len(pubs) and total >= to_deliver:
                    break
                if published_done == len(pubs) and now - last_change > args.settle_s:
                    print(f"no progress for {args.settle_s:.0f} s: stopping", flush=True)
                    break
                if not any(p.is_alive() for p in pubs) and published_done < len(pubs):
                    print("a publisher died", flush=True)
                    break
                time.sleep(0.2)
            t1 = time.time()
            ing.wait_idle(timeout_s=30)
            time.sleep(args.linger_s)  # anything delivered late (a redelivery) would show up now
            ing.wait_idle(timeout_s=30)
            alive = ingest_threads_alive(ing)
            stats = ing.stats()
        finally:
            ing.stop()
            for p in pubs:
                p.join(30)
                if p.is_alive():
                    p.kill()
        counters = store.counters()
    return {
        "generated": args.payloads,
        "acked": sum(a.value for a in acked),
        "seconds": t1 - t0,
        "payloads_per_s": args.payloads / (t1 - t0),
        "expected": exp,
        "measured": summarize(counters),
        "ingestor": stats,
        "alive": alive,
        "crashes": watch.crashes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--payloads", type=int, default=100_000)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--batch", type=int, default=500, help="the ingestor's batch size")
    parser.add_argument("--db", default="", help="'' (a temporary SQLite file) or postgresql+psycopg://...")
    parser.add_argument(
        "--broker-queue",
        type=int,
        default=0,
        help="mosquitto max_queued_messages for the manager's session (0: no limit; a small one loses "
        "messages, which the bench must then report)",
    )
    parser.add_argument(
        "--receive-maximum",
        type=int,
        default=65_535,
        help="unacknowledged messages the manager accepts in flight (MQTT v5 Receive Maximum); the "
        "manager acknowledges after each commit, so with a small one the broker must queue the rest",
    )
    parser.add_argument("--progress-s", type=float, default=3.0)
    parser.add_argument(
        "--settle-s", type=float, default=20.0, help="give up after this long without progress"
    )
    parser.add_argument("--linger-s", type=float, default=1.0)
    parser.add_argument("--json-out", type=Path, default=Path("out/bench/fleet-fuzz.json"))
    args = parser.parse_args(argv)

    # 0: the manager's session may queue without bound (see docs/fleet.md); otherwise --receive-maximum
    # messages in flight plus at most --broker-queue queued, beyond which mosquitto drops.
    config = (
        "max_queued_messages 0\nmax_inflight_messages 0"
        if not args.broker_queue
        else f"max_queued_messages {args.broker_queue}"
    )
    with fresh_database(args.db, prefix="fleet-fuzz-") as db, MosquittoBroker(extra_config=config) as broker:
        result = run(args, db, broker)
    result["store"] = "postgresql" if args.db.startswith("postgresql") else "sqlite"
    problems = check(result)
    result["problems"] = problems
    result["ok"] = not problems

    exp, got = result["expected"], result["measured"]
    print()
    print(
        f"{result['generated']:,} fuzzed payloads, {args.publishers} publisher process(es), QoS 1, "
        f"{result['store']}, {os.cpu_count()} CPUs: {result['seconds']:.1f} s "
        f"({result['payloads_per_s']:,.0f} payloads/s)"
    )
    rows = [
        ("sent (acknowledged by the broker)", result["generated"], result["acked"]),
        ("outside the subscription (not delivered)", exp["outside"], exp["outside"]),
        ("stored", exp["stored"] + exp["edge"], got["stored"]),
        ("duplicates", exp["duplicate"], got["duplicates"]),
        ("rejected", sum(exp["rejects"].values()), got["rejected"]),
        *[
            (f"  {reason}", exp["rejects"].get(reason, 0), got["rejects"].get(reason, 0))
            for reason in sorted(set(exp["rejects"]) | set(got["rejects"]))
        ],
        (
            "accounted (stored+rejected+dups+outside)",
            result["generated"],
            got["stored"] + got["rejected"] + got["duplicates"] + exp["outside"],
        ),
    ]
    print(f"{'':42} {'expected':>10} {'measured':>10}")
    for name, e, g in rows:
        print(f"{name:42} {e:10,} {g:10,}")
    print(f"ingestion threads alive at the end: {result['alive']}; crashes: {len(result['crashes'])}")
    if exp["edge"]:
        print(f"(stored expected includes {exp['edge']} edge-valid messages; unstorable ones are rejects)")
    return finish(result, args, argv, problems, ok="OK: no crash, every payload accounted for")


if __name__ == "__main__":
    sys.exit(main())
