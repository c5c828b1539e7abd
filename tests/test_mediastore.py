"""The stores of uploaded models, image series and the image viewers' state, the same on each
backend (SQLite in the data directory; PostgreSQL, shared by the servers of a cluster):
listings per room, each file kept once, removal, viewer panels and measurements, what a second
server sharing the database and the blob directory sees, and how many database round trips
each operation costs on PostgreSQL."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from benchmarks.dicomgen import synthetic_ct
from medverse.server.assets import ANONYMOUS_UPLOADER, AssetStore
from medverse.server.auth import Identity
from medverse.server.gltf import validate_glb
from medverse.server.imaging import ImageStore, prepare

from .backends import Backend
from .models import triangle_glb

DR_A = Identity("dr-a", "Dr A", "ward", "host", frozenset())
DR_B = Identity("dr-b", "Dr B", "ward", "host", frozenset(), pseudonym="Fox")


def stage_model(store: AssetStore, extra: int = 0) -> tuple[Path, str, Any]:
    """A model staged for :meth:`AssetStore.add`: (file, sha256, ModelInfo)."""
    model = triangle_glb(nodes=("skin", "vessels"), extra=extra)
    sha = hashlib.sha256(model).hexdigest()
    staged = store.tmp / f"{sha}-{extra}.glb"
    staged.write_bytes(model)
    return staged, sha, validate_glb(model)


def stage_series(store: ImageStore, room: str, slices: int = 4) -> tuple[Path, str, Any]:
    """A small CT staged for :meth:`ImageStore.add`: (file, sha256, listing metadata)."""
    files = list(synthetic_ct(16, 16, slices).items())
    p = prepare(
        files,
        allow_identifiable=True,
        deidentify_requested=False,
        uid_key=store.uid_key_for(room),
        staging_dir=store.tmp,
    )
    return p.staged, p.sha256, p.meta


def staged_size(assets: AssetStore, sha: str) -> int:
    return assets.blob_path(sha).stat().st_size


def panel(pid: int, index: int) -> dict[str, Any]:
    return {"panel_id": pid, "series": "ab" * 32, "slices": [index, 8, 8], "plane": "axial"}


def measurement(mid: int, value: float) -> dict[str, Any]:
    return {"measurement_id": mid, "kind": "distance", "value": value, "label": f"m{mid}"}


def test_models_are_listed_per_room_and_stored_once(backend: Backend, tmp_path: Path) -> None:
    with backend.media_stores(tmp_path) as (assets, _, _db):
        staged, sha, model = stage_model(assets)
        size = staged.stat().st_size
        info, new = assets.add("ward", "heart.glb", DR_A, staged, sha, model)
        assert new and (info.sha256, info.name, info.size, info.uploader) == (
            sha,
            "heart.glb",
            size,
            "Dr A",
        )
        assert info.nodes == ("skin", "vessels") and assets.cached_nodes(sha) == info.nodes
        again, sha2, _ = stage_model(assets)
        info2, new = assets.add("ward", "other name.glb", DR_B, again, sha2, model)
        assert not new and info2 == info  # listed once, under its first name and uploader
        assert not again.exists()  # the second copy was not kept
        third, _, _ = stage_model(assets)
        info3, new = assets.add("clinic", "h.glb", DR_B, third, sha, model, pseudonymous=True)
        assert new and info3.uploader == "Fox" and info3.name == "h.glb"
        assert assets.totals() == (1, size) and assets.blob_hashes() == [sha]
        assert assets.count("ward") == 1 and assets.count("clinic") == 1
        assert assets.count("nowhere") == 0
        assert assets.list("ward") == [info] and assets.list("nowhere") == []
        assert assets.info("nowhere", sha) is None and assets.info("ward", "0" * 64) is None
        assert assets.uploader_subject("clinic", sha) == "dr-b"
        assert assets.uploader_subject("nowhere", sha) is None
        # A real name is never shown in a room that shows pseudonyms only.
        shown = assets.info("ward", sha, pseudonymous=True)
        assert shown is not None and shown.uploader == ANONYMOUS_UPLOADER
        assert assets.check(sha) is None
        # Removed from one room the file stays for the other; from the last, it goes.
        assert assets.remove("ward", sha) and not assets.remove("ward", sha)
        assert assets.blob_path(sha).exists() and assets.check(sha) is None
        assert assets.remove("clinic", sha)
        assert not assets.blob_path(sha).exists() and assets.totals() == (0, 0)
        assert assets.check(sha) is None  # nothing stored: nothing to vouch for
        staged, sha, model = stage_model(assets, extra=100)
        assets.add("ward", "kept.glb", DR_A, staged, sha, model)
    with backend.media_stores(tmp_path) as (assets, _, _db):  # as after a restart
        assert [(a.name, a.sha256) for a in assets.list("ward")] == [("kept.glb", sha)]
        assert assets.check(sha) is None


def test_series_listings_and_viewer_state(backend: Backend, tmp_path: Path) -> None:
    with backend.media_stores(tmp_path) as (_, images, _db):
        staged, sha, meta = stage_series(images, "ward")
        size = staged.stat().st_size
        listing, new = images.add("ward", "CT", DR_A, staged, sha, meta)
        assert new and (listing.sha256, listing.name, listing.size) == (sha, "CT", size)
        assert listing.instances == 4 and listing.uploader == "Dr A"
        staged, _, _ = stage_series(images, "ward")
        again, new = images.add("ward", "CT again", DR_B, staged, sha, meta)
        assert not new and again == listing
        staged, _, _ = stage_series(images, "clinic")
        there, new = images.add("clinic", "CT", DR_B, staged, sha, meta, pseudonymous=True)
        assert new and there.uploader == "Fox"
        assert images.listings("ward") == [listing] and images.listing("nowhere", sha) is None
        # A real name is never shown in a room that shows pseudonyms only; a pseudonym is.
        shown = images.listing("ward", sha, pseudonymous=True)
        assert shown is not None and shown.uploader == ANONYMOUS_UPLOADER
        assert [s.uploader for s in images.listings("ward", pseudonymous=True)] == ["Participant"]
        kept = images.listing("clinic", sha, pseudonymous=True)
        assert kept is not None and kept.uploader == "Fox"
        assert images.count("ward") == 1 and images.uploader_subject("clinic", sha) == "dr-b"
        assert images.volume(sha).data.shape == (4, 16, 16)
        assert images.remove("ward", sha) and not images.remove("ward", sha)
        assert images.blob_path(sha).exists()
        assert images.remove("clinic", sha) and not images.blob_path(sha).exists()

        assert images.load_viewer("ward") == ([], [], 1, 1, 0)
        images.put_panels("ward", [panel(1, 3), panel(2, 5)], 3, 1, 0)
        images.put_panels("ward", [panel(2, 7)], 3, 1, 0)  # a flush of a changed view
        images.put_measurement("ward", measurement(1, 4.0), 3, 2, 1)
        images.put_measurement("ward", measurement(2, 9.5), 3, 3, 2)
        images.delete_measurement("ward", 1, 3, 3, 3)
        images.put_panels("clinic", [panel(1, 1)], 2, 1, 0)
        images.delete_panel("clinic", 1, 2, 1, 0)
    with backend.media_stores(tmp_path) as (_, images, _db):  # as after a restart
        assert images.load_viewer("ward") == (
            [panel(1, 3), panel(2, 7)],
            [measurement(2, 9.5)],
            3,
            3,
            3,
        )
        # Ids go on from where they were, even with nothing left to show.
        assert images.load_viewer("clinic") == ([], [], 2, 1, 0)


def test_a_second_server_sees_what_the_first_stored(backend: Backend, tmp_path: Path) -> None:
    """With PostgreSQL two servers, each with its own data directory, share the database and
    a blob directory: what one stored, the other lists, serves and shows. (With SQLite the
    index is the data directory's: the second server is the first one restarted.)"""
    blobs = tmp_path / "shared"
    first = tmp_path / "a"
    second = tmp_path / "b" if backend.database_url else first
    with backend.media_stores(first, blobs) as (assets, images, _db):
        staged, sha, model = stage_model(assets)
        assets.add("ward", "heart.glb", DR_A, staged, sha, model)
        staged, series, meta = stage_series(images, "ward")
        images.add("ward", "CT", DR_A, staged, series, meta)
        images.put_panels("ward", [panel(1, 2)], 2, 2, 1)
        images.put_measurement("ward", measurement(1, 3.5), 2, 2, 1)
        key = images.uid_key_for("ward")
        # An upload in progress on this server when the other one starts.
        uploading = assets.tmp / "in-progress.glb"
        uploading.write_bytes(b"glTF")
        assert assets.root == blobs / "assets" and images.root == blobs / "images"
        with backend.media_stores(second, blobs) as (assets_b, images_b, _db_b):
            if backend.database_url:
                assert assets_b.tmp != assets.tmp and images_b.tmp != images.tmp
                assert uploading.exists(), "another server's upload was taken for stale"
            info = assets_b.info("ward", sha)
            assert info is not None and info.name == "heart.glb" and info.nodes == model.nodes
            assert assets_b.blob_path(sha) == assets.blob_path(sha)
            assert assets_b.check(sha, reread=True) is None
            listed = images_b.listing("ward", series)
            assert listed is not None and listed.name == "CT"
            assert images_b.volume(series).data.shape == (4, 16, 16)
            assert images_b.load_viewer("ward") == ([panel(1, 2)], [measurement(1, 3.5)], 2, 2, 1)
            # De-identified UIDs map the same way on every server (one key in the blob dir).
            assert images_b.uid_key_for("ward") == key
    # Nothing of the shared files is in the data directories.
    assert not (first / "assets" / sha[:2]).exists()
    assert (first / "assets" / "assets.sqlite3").exists() == (backend.database_url is None)


def test_blobs_default_to_the_data_directory(tmp_path: Path) -> None:
    """Without a blob directory the layout is what it always was: ``<data-dir>/assets/`` and
    ``<data-dir>/images/``, the indexes beside the files, uploads staged in ``incoming``."""
    assets = AssetStore(tmp_path)
    images = ImageStore(tmp_path)
    try:
        assert assets.root == tmp_path / "assets" and assets.tmp == tmp_path / "assets/incoming"
        assert images.root == tmp_path / "images" and images.tmp == tmp_path / "images/incoming"
        assert (tmp_path / "assets/assets.sqlite3").exists()
        assert (tmp_path / "images/images.sqlite3").exists()
        assert (tmp_path / "images/uid_key").stat().st_size == 32
        (assets.tmp / "cut-short.glb").write_bytes(b"x")
    finally:
        assets.close()
        images.close()
    AssetStore(tmp_path).close()  # a restart clears what a crash left staged
    assert not (tmp_path / "assets/incoming/cut-short.glb").exists()


def test_database_round_trips(backend: Backend, tmp_path: Path) -> None:
    """What each operation costs in round trips to PostgreSQL (each is one statement), so a
    change that adds one shows here."""
    if backend.database_url is None:
        pytest.skip("SQLite has no round trips")
    with backend.media_stores(tmp_path) as (assets, images, db):

        def cost(fn: Any, *args: Any, **kw: Any) -> int:
            before = db.calls
            fn(*args, **kw)
            return int(db.calls - before)

        staged, sha, model = stage_model(assets)
        # An upload: the room's count (the limit), then the file's record and the listing in
        # one statement.
        assert cost(assets.count, "ward") == 1
        assert cost(assets.add, "ward", "heart.glb", DR_A, staged, sha, model) == 1
        # The same model again, to another room: the stored copy's size is read first (its
        # check), then listed.
        staged, _, _ = stage_model(assets)
        assert cost(assets.add, "clinic", "heart.glb", DR_A, staged, sha, model) == 2
        assert cost(assets.list, "ward") == 1
        assert cost(assets.info, "ward", sha) == 1
        # A download: the listing (above), then the file checked against the size it gave.
        assert cost(assets.check, sha, size=staged_size(assets, sha)) == 0
        assert cost(assets.remove, "clinic", sha) == 1  # one transaction (three statements)
        staged, series, meta = stage_series(images, "ward")
        assert cost(images.add, "ward", "CT", DR_A, staged, series, meta) == 1
        assert cost(images.listings, "ward") == 1
        assert cost(images.listing, "ward", series) == 1
        assert cost(images.load_viewer, "ward") == 1
        assert cost(images.put_panels, "ward", [panel(1, 1), panel(2, 2)], 3, 1, 0) == 1
        assert cost(images.put_measurement, "ward", measurement(1, 2.0), 3, 2, 1) == 1
