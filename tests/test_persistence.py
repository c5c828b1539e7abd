"""Objects and annotations survive a graceful restart and a kill -9 of the server, on each
durable-state backend (SQLite and PostgreSQL: the ``backend`` fixture)."""

from __future__ import annotations

import asyncio
import signal
import tempfile
from typing import Any

import pytest

from medverse.client_sdk import Session, connect

from .backends import Backend
from .conftest import run_server
from .helpers import wait_for
from .models import HEART, KIDNEY, provide, sha256_of

ASSET = sha256_of(HEART)
OTHER_ASSET = sha256_of(KIDNEY)


def close(a: tuple[float, ...], b: tuple[float, ...], tol: float = 0.002) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


async def build_case(url: str, room: str) -> dict[str, Any]:
    """A small case review; returns what the server acknowledged."""
    await provide(url, room)  # a server without authentication: anyone may upload
    async with connect(url, room=room, name="surgeon", ping_interval=0) as s:
        await s.objects.wait_synced()
        heart = await s.spawn(ASSET, (0.0, 1.2, -0.6), name="heart")
        gone = await s.spawn(ASSET, (2.0, 0.0, 0.0), name="spare")
        kidney = await s.spawn(OTHER_ASSET, (0.5, 1.0, 0.0), scale=0.8, name="kidney")
        await s.grab(heart)
        for i in range(20):
            s.move(heart, (0.01 * i, 1.2, -0.6), (0.0, 0.0, 0.0, 1.0), 1.0 + 0.05 * i)
            await asyncio.sleep(0.01)
        await s.release(heart)
        await s.set_view(heart, nodes={"skin": False}, plane=(1.0, 0.0, 0.0, -0.01))
        pin = await s.annotate(heart, "pin", [(0.0, 0.02, 0.0)], text="LAD stenosis")
        stroke = await s.annotate(heart, "stroke", [(0, 0, 0), (0.01, 0.0, 0.0)])
        meas = await s.annotate(kidney, "measure", [(0, 0, 0), (0, 0.05, 0)])
        await s.edit_annotation(pin, text="LAD stenosis 70 %")
        await s.delete_annotation(stroke)
        await s.annotate(gone, "pin", [(0, 0, 0)], text="goes with its object")
        await s.remove_object(gone)
        return {
            "heart": heart,
            "kidney": kidney,
            "gone": gone,
            "pin": pin,
            "meas": meas,
            "stroke": stroke,
            "heart_pos": (0.19, 1.2, -0.6),
            "heart_scale": 1.95,
        }


async def check_case(url: str, room: str, case: dict[str, Any]) -> Session:
    s = connect(url, room=room, name="radiologist", ping_interval=0)
    await s.start()
    await s.objects.wait_synced()
    objs = s.objects
    assert set(objs) == {case["heart"], case["kidney"]}
    heart, kidney = objs[case["heart"]], objs[case["kidney"]]
    assert heart.name == "heart" and heart.holder is None
    assert heart.nodes == {"skin": False} and heart.plane == (1.0, 0.0, 0.0, -0.01)
    assert set(heart.annotations) == {case["pin"]}
    assert heart.annotations[case["pin"]].text == "LAD stenosis 70 %"
    assert set(kidney.annotations) == {case["meas"]}
    await wait_for(lambda: s.snapshot.ids.size >= 3)
    assert close(heart.position, case["heart_pos"])
    assert heart.scale == pytest.approx(case["heart_scale"])
    assert kidney.scale == pytest.approx(0.8)
    # Ids are never reused after a restart.
    fresh = await s.spawn(ASSET)
    assert fresh > case["gone"]
    aid = await s.annotate(fresh, "pin", [(0, 0, 0)])
    assert aid > case["stroke"]
    return s


@pytest.mark.parametrize("how", ["graceful", "kill -9"])
async def test_restart_keeps_every_acknowledged_operation(how: str, backend: Backend) -> None:
    data = tempfile.mkdtemp(prefix="medverse-persist-")
    settings = {"data_dir": data, "room_linger": 30, **backend.settings()}
    with run_server(**settings) as srv:
        case = await build_case(srv.url, "review")
        if how == "kill -9":
            await asyncio.sleep(1.1)  # transforms are written at least once a second
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(5)
    with run_server(**settings) as srv:
        s = await check_case(srv.url, "review", case)
        await s.close()


async def test_kill_right_after_an_ack_loses_nothing_acknowledged(backend: Backend) -> None:
    data = tempfile.mkdtemp(prefix="medverse-persist-")
    with run_server(data_dir=data, **backend.settings()) as srv:
        await provide(srv.url, "fast")
        async with connect(srv.url, room="fast", name="a", ping_interval=0) as s:
            await s.objects.wait_synced()
            oid = await s.spawn(ASSET)
            acked = [
                await s.annotate(oid, "pin", [(0, 0, i / 100)], text=str(i)) for i in range(10)
            ]
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(5)
    with backend.object_store(data) as store:
        record = store.load_room("fast")
    assert [o.id for o in record.objects] == [oid]
    assert [a.id for a in record.annotations] == acked
    assert [a.text for a in record.annotations] == [str(i) for i in range(10)]


def test_store_round_trip_and_counters(tmp_path: Any, backend: Backend) -> None:
    with backend.object_store(tmp_path) as store:
        fill(store)
    with backend.object_store(tmp_path) as store:
        rec = store.load_room("r")
        assert [x.id for x in rec.objects] == [1] and rec.annotations == []
        heart = rec.objects[0]
        assert (heart.position, heart.rotation, heart.scale) == ((1, 2, 3), (0, 1, 0, 0), 3.5)
        # Ids and sequence numbers go on from the highest ever used, deleted or not.
        assert (rec.next_object_id, rec.next_annotation_id, rec.seq) == (3, 2, 1)
        assert store.load_room("never").objects == [] and store.room_names() == ["other", "r"]
        # Writing the same operation again (a retry after a lost answer) changes nothing.
        fill(store)
        again = store.load_room("r")
        assert [x.id for x in again.objects] == [1] and again.annotations == []
        assert (again.next_object_id, again.next_annotation_id, again.seq) == (3, 2, 1)


def fill(store: Any) -> None:
    from medverse.server.store import StoredAnnotation, StoredObject, TransformRow

    o = StoredObject("r", 1, ASSET, "heart", "Dr A", "dr-a", 1.0, (0, 1, 0), (0, 0, 0, 1), 1.0)
    store.put_object(o)
    store.put_object(
        StoredObject("r", 2, ASSET, "b", "Dr A", "dr-a", 2.0, (0, 0, 0), (0, 0, 0, 1), 2)
    )
    store.put_object(
        StoredObject("other", 1, ASSET, "c", "x", "x", 3.0, (0, 0, 0), (0, 0, 0, 1), 1)
    )
    a = StoredAnnotation(
        "r", 1, 2, "stroke", ((0, 0, 0), (1, 0, 0)), None, 7, "Dr A", "dr-a", 3, 4.0, None, 1
    )
    store.put_annotation(a)
    store.put_transforms([TransformRow("r", 1, (1.0, 2.0, 3.0), (0.0, 1.0, 0.0, 0.0), 3.5)])
    store.delete_object("r", 2, 1)  # takes its annotation along


def test_a_batch_commits_together_and_a_bad_operation_fails_alone(
    tmp_path: Any, backend: Backend
) -> None:
    """Operations that queued up are committed in one transaction (group commit); if one of
    them cannot be stored, it fails on its own and the others are stored."""
    from functools import partial

    from medverse.server.store import StoredAnnotation, StoredObject

    def anno(aid: int, kind: Any = "pin") -> StoredAnnotation:
        return StoredAnnotation(
            "b", aid, 1, kind, ((0, 0, 0),), f"n{aid}", None, "a", "a", 1, 1.0, None, aid
        )

    with backend.object_store(tmp_path) as store:
        obj = StoredObject("b", 1, ASSET, "h", "a", "a", 1.0, (0, 0, 0), (0, 0, 0, 1), 1.0)
        calls = [partial(store.put_object, obj)]
        calls += [partial(store.put_annotation, anno(i)) for i in range(1, 6)]
        assert store.run_batch(calls) == [None] * 6
        bad = [partial(store.put_annotation, anno(6)), partial(store.put_annotation, anno(7, None))]
        bad += [partial(store.delete_annotation, "b", 2, 8)]
        errors = store.run_batch(bad)
        assert errors[0] is None and errors[1] is not None and errors[2] is None
    with backend.object_store(tmp_path) as store:
        rec = store.load_room("b")
    assert [a.id for a in rec.annotations] == [1, 3, 4, 5, 6]
    assert (rec.next_annotation_id, rec.seq) == (7, 8)
