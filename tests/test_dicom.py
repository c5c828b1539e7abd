"""DICOM parsing, validation, the de-identification gate, geometry, rendering and measuring,
without a server: pydicom's own test files (shipped in its wheel) and synthetic series."""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from benchmarks.dicomgen import SPHERE_HU, phantom_of, synthetic_ct
from medverse.server import dicom
from medverse.server.dicom import ImageError, build_series, identifying_attributes, read_files
from medverse.server.imaging import (
    encode_png,
    open_volume,
    plane_image,
    prepare,
    unzip,
    window_u8,
    write_volume,
)
from medverse.server.viewer import Refusal, measure

KEY = b"k" * 32


def shipped(name: str) -> tuple[str, bytes]:
    """A file of pydicom's test data that is inside its wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not shipped with pydicom"
    return name, Path(path).read_bytes()


@pytest.mark.parametrize(
    ("name", "syntax", "shape"),
    [
        ("CT_small.dcm", "1.2.840.10008.1.2.1", (1, 128, 128)),
        ("MR_small.dcm", "1.2.840.10008.1.2.1", (1, 64, 64)),
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2", (1, 64, 64)),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2", (1, 64, 64)),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5", (1, 64, 64)),
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", (1, 64, 64)),
        ("MR_small_jp2klossless.dcm", "1.2.840.10008.1.2.4.90", (1, 64, 64)),
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", (1, 1024, 256)),
        ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", (1, 1024, 256)),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", (1, 512, 512)),
    ],
)
def test_shipped_files_of_every_syntax_decode(
    name: str, syntax: str, shape: tuple[int, ...]
) -> None:
    series = build_series(read_files([shipped(name)]))
    assert series.syntaxes == (syntax,)
    assert series.volume.shape == shape
    if name.startswith("MR_small"):  # the same image in every syntax: lossless is lossless
        reference = build_series(read_files([shipped("MR_small.dcm")])).volume
        assert np.array_equal(series.volume, reference)


def test_ct_small_is_in_hounsfield_units() -> None:
    name, data = shipped("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    series = build_series(read_files([(name, data)]))
    expect = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(series.volume[0], expect)
    assert series.units == "HU" and series.modality == "CT"
    assert series.geometry.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)


def test_not_dicom_files_are_named() -> None:
    with pytest.raises(ImageError) as e:
        read_files([("a.dcm", shipped("CT_small.dcm")[1]), ("notes.txt", b"hello " * 50)])
    assert e.value.code == "not_dicom" and "notes.txt" in e.value.message
    with pytest.raises(ImageError) as e:
        read_files([])
    assert e.value.code == "not_dicom"
    truncated = shipped("CT_small.dcm")[1][:300]
    with pytest.raises(ImageError) as e:
        build_series(read_files([("cut.dcm", truncated)]))
    assert e.value.code in ("not_dicom", "no_pixel_data")


def test_missing_pixel_module() -> None:
    with pytest.raises(ImageError) as e:
        build_series(read_files([shipped("rtplan.dcm")]))
    assert e.value.code == "no_pixel_data"
    ds = pydicom.dcmread(io.BytesIO(shipped("CT_small.dcm")[1]))
    del ds.PhotometricInterpretation
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageError) as e:
        build_series(read_files([("ct.dcm", buf.getvalue())]))
    assert e.value.code == "no_pixel_data" and "PhotometricInterpretation" in e.value.message


def test_mixed_series_are_refused() -> None:
    with pytest.raises(ImageError) as e:
        build_series(read_files([shipped("CT_small.dcm"), shipped("MR_small.dcm")]))
    assert e.value.code == "mixed_series"
    a = synthetic_ct(16, 16, 3)
    b = synthetic_ct(16, 16, 3, series_uid="1.2.3.4")
    with pytest.raises(ImageError) as e:
        build_series(read_files([*a.items(), *list(b.items())[:1]]))
    assert e.value.code == "mixed_series"
    twice = [*a.items(), ("copy.dcm", a["slice0001.dcm"])]
    with pytest.raises(ImageError) as e:
        build_series(read_files(twice))
    assert e.value.code == "mixed_series" and "same position" in e.value.message


def test_unsupported_transfer_syntax_and_images() -> None:
    ds = pydicom.dcmread(io.BytesIO(shipped("CT_small.dcm")[1]))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: never decoded here
    with pytest.raises(ImageError) as e:
        dicom.check_instance(ds, dicom.supported_syntaxes())
    assert e.value.code == "unsupported_transfer_syntax" and "MPEG2" in e.value.message
    with pytest.raises(ImageError) as e:
        build_series(read_files([shipped("SC_rgb_jpeg_dcmtk.dcm")]))
    assert e.value.code == "unsupported_image"


def test_supported_syntaxes_are_what_is_installed() -> None:
    have = dicom.supported_syntaxes()
    # The decoders pyproject.toml installs: every syntax of the list.
    assert have == list(dicom.SUPPORTED_SYNTAXES)


def test_the_gate_finds_identifying_attributes_and_names_only_keywords() -> None:
    files = synthetic_ct(16, 16, 4, phi=True)
    found = identifying_attributes(read_files(files.items()))
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "ImageComments"):
        assert kw in found
    assert "private(0029,xxxx)" in found
    assert not any("Doe" in f or "MRN" in f for f in found)
    clean = synthetic_ct(16, 16, 4)
    assert identifying_attributes(read_files(clean.items())) == []


def test_deidentification_removes_everything_and_keeps_uids_consistent() -> None:
    files = synthetic_ct(16, 16, 5, phi=True)
    datasets = read_files(files.items())
    originals = {ds.SOPInstanceUID for ds in datasets}
    actions = dicom.deidentify(datasets, KEY)
    assert "PatientName:Z" in actions and "ImageComments:X" in actions and "private:X" in actions
    assert "SeriesInstanceUID:U" in actions
    assert identifying_attributes(datasets) == []
    assert {ds.SeriesInstanceUID for ds in datasets} == {datasets[0].SeriesInstanceUID}
    assert {ds.FrameOfReferenceUID for ds in datasets} == {datasets[0].FrameOfReferenceUID}
    sops = {ds.SOPInstanceUID for ds in datasets}
    assert len(sops) == 5 and not sops & originals
    assert all(ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID for ds in datasets)
    assert all(ds.PatientIdentityRemoved == "YES" for ds in datasets)
    written = io.BytesIO()
    datasets[0].save_as(written)
    blob = written.getvalue()
    for secret in (b"Doe", b"MRN-0042", b"19610412", b"Harbour", b"jsmith", b"Elsewhere"):
        assert secret not in blob
    # The same key maps the same UID the same way (another upload of the room's series).
    again = read_files(files.items())
    dicom.deidentify(again, KEY)
    assert again[0].FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    other = read_files(files.items())
    dicom.deidentify(other, b"x" * 32)
    assert other[0].FrameOfReferenceUID != datasets[0].FrameOfReferenceUID


def test_burned_in_annotations_are_refused_even_when_deidentifying(tmp_path: Path) -> None:
    files = list(synthetic_ct(16, 16, 2, burned_in=True).items())
    for wanted in (False, True):
        with pytest.raises(ImageError) as e:
            prepare(
                files,
                allow_identifiable=False,
                deidentify_requested=wanted,
                uid_key=KEY,
                staging_dir=tmp_path,
            )
        assert e.value.code == "identifiable_data"
        assert e.value.attributes == ("BurnedInAnnotation",)


def test_geometry_maps_voxels_and_planes_both_ways() -> None:
    files = synthetic_ct(24, 20, 10)
    series = build_series(read_files(reversed(list(files.items()))))  # any file order
    g = series.geometry
    ph = phantom_of(24, 20, 10)
    assert g.origin == pytest.approx(ph.origin)
    assert g.slice_spacing == pytest.approx(2.5) and g.pixel_spacing == (0.7, 0.7)
    ijk = np.array([3.0, 7.0, 4.0])
    assert g.to_voxel(g.to_patient(ijk)) == pytest.approx(ijk)
    planes = g.planes()
    # Each plane's pixel (r, c) of image n is the voxel the plane image shows there.
    for plane, n, r, c in (("axial", 4, 7, 3), ("coronal", 7, 2, 3), ("sagittal", 3, 2, 7)):
        p = planes[plane]
        pos = np.add.reduce(
            [
                np.array(p["origin"]),
                n * np.array(p["slice_step"]),
                r * np.array(p["row_step"]),
                c * np.array(p["col_step"]),
            ]
        )
        i, j, k = (round(float(v)) for v in g.to_voxel(pos))
        assert plane_image(series.volume, plane, n)[r, c] == series.volume[k, j, i]
    assert (planes["coronal"]["rows"], planes["coronal"]["cols"]) == (10, 20)
    assert (planes["sagittal"]["rows"], planes["sagittal"]["cols"]) == (10, 24)


def test_uneven_slices_are_refused() -> None:
    files = synthetic_ct(16, 16, 4)
    datasets = read_files(files.items())
    datasets[3].ImagePositionPatient = [
        datasets[3].ImagePositionPatient[0],
        datasets[3].ImagePositionPatient[1],
        20.0,
    ]
    with pytest.raises(ImageError) as e:
        build_series(datasets)
    assert e.value.code == "unsupported_image"


def _png_pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    at, idat = 8, b""
    while at < len(png):
        (n,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + n]
        assert zlib.crc32(kind + data) == struct.unpack(">I", png[at + 8 + n : at + 12 + n])[0]
        if kind == b"IDAT":
            idat += data
        at += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_window_and_png_match_the_dicom_formula() -> None:
    img = np.arange(-1100, 1100, 7, dtype=np.int16).reshape(1, -1)
    c, w = 40.0, 400.0
    out = window_u8(img, c, w)
    for x, y in zip(img[0], out[0], strict=True):
        lo, hi = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
        expect = 0 if x <= lo else 255 if x > hi else ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
        assert abs(int(y) - expect) <= 0.5 + 1e-6
    assert (window_u8(img, c, w, invert=True) == 255 - out).all()
    gray = np.random.default_rng(1).integers(0, 256, (37, 53), dtype=np.uint8)
    assert np.array_equal(_png_pixels(encode_png(gray)), gray)


def test_stored_volume_round_trips_with_its_hash(tmp_path: Path) -> None:
    series = build_series(read_files(synthetic_ct(20, 18, 6).items()))
    path = tmp_path / "v.series"
    sha = write_volume(path, series)
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    vol = open_volume(path, sha)
    assert np.array_equal(np.asarray(vol.data), series.volume)
    assert vol.geometry == series.geometry and vol.units == "HU"


def test_zip_limits() -> None:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.dcm", b"\0" * 200_000)  # compresses to almost nothing
    with pytest.raises(ImageError) as e:
        unzip(buf.getvalue(), 100_000)
    assert e.value.code == "oversized"
    with pytest.raises(ImageError) as e:
        unzip(b"PK\x03\x04 not really", 100)
    assert e.value.code == "not_dicom"


def _volume(tmp_path: Path, rows: int = 64, cols: int = 64, slices: int = 16):  # type: ignore[no-untyped-def]
    series = build_series(read_files(synthetic_ct(rows, cols, slices).items()))
    path = tmp_path / "v.series"
    return open_volume(path, write_volume(path, series))


def test_measurements(tmp_path: Path) -> None:
    vol = _volume(tmp_path)
    ph = phantom_of(64, 64, 16)
    cx, cy, cz = ph.sphere_center
    d, _ = measure(vol, "distance", ((cx, cy, cz), (cx + 3.0, cy + 4.0, cz)))
    assert d == pytest.approx(5.0)
    a, _ = measure(vol, "angle", ((cx + 5, cy, cz), (cx, cy, cz), (cx, cy + 5, cz)))
    assert a == pytest.approx(90.0)
    # A square well inside the sphere, in the axial image through its centre: all 60 HU.
    s = 2.0
    square = (
        (cx - s, cy - s, cz),
        (cx + s, cy - s, cz),
        (cx + s, cy + s, cz),
        (cx - s, cy + s, cz),
    )
    area, stats = measure(vol, "roi", square)
    assert stats["mean"] == SPHERE_HU and stats["sd"] == 0.0 and stats["units"] == "HU"
    assert stats["pixels"] > 0 and area == pytest.approx(stats["pixels"] * 0.49)
    # The same ROI in a coronal image (y fixed): still inside the sphere.
    coronal = (
        (cx - s, cy, cz - 1.0),
        (cx + s, cy, cz - 1.0),
        (cx + s, cy, cz + 1.0),
        (cx - s, cy, cz + 1.0),
    )
    _, stats = measure(vol, "roi", coronal)
    assert stats["mean"] == SPHERE_HU
    # A triangle across the body's edge mixes air and water: the mean is between.
    g = vol.geometry
    tri = tuple(
        tuple(g.to_patient(ijk)) for ijk in ((0.0, 26.0, 8.0), (14.0, 32.0, 8.0), (0.0, 38.0, 8.0))
    )
    _, stats = measure(vol, "roi", tri)
    assert -1000 < stats["mean"] < 0 and stats["sd"] > 0
    for kind, pts, why in (
        ("distance", ((cx, cy, cz), (cx, cy, cz)), "distinct"),
        ("distance", ((cx, cy, cz), (cx, cy, 1e4)), "outside"),
        ("roi", ((cx, cy, cz - 5), (cx + 1, cy, cz), (cx, cy + 1, cz + 5)), "one image"),
        (
            "roi",
            ((cx + 0.2, cy + 0.2, cz), (cx + 0.21, cy + 0.2, cz), (cx + 0.2, cy + 0.21, cz)),
            "no pixel",
        ),
        ("angle", ((cx, cy, cz),) * 3, "length"),
    ):
        with pytest.raises(Refusal) as e:
            measure(vol, kind, pts)
        assert e.value.code.value == "out_of_range" and why in e.value.message
    assert math.isfinite(area)
