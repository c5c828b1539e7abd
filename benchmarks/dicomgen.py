"""Synthetic DICOM series for tests and benchmarks, made with numpy and pydicom (no downloads).

:func:`synthetic_ct` builds a CT series of a phantom (air around a water-filled elliptic body
with a 60 HU sphere in it), one single-frame file per slice, in explicit VR little endian;
``phi=True`` fills it with identifying attributes (names, IDs, birth date, address, comments,
a private block) as a real export from a scanner carries them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

#: The phantom's sphere: centre (mm, patient coordinates) and radius, and its value in HU.
SPHERE_HU = 60
BODY_HU = 0
AIR_HU = -1000


@dataclass(frozen=True)
class Phantom:
    """Where the phantom's parts are (patient coordinates, mm)."""

    origin: tuple[float, float, float]
    pixel_spacing: float
    slice_spacing: float
    sphere_center: tuple[float, float, float]
    sphere_radius: float


def phantom_volume(rows: int, cols: int, slices: int, noise: float = 0.0) -> np.ndarray:
    """The phantom in HU, (slices, rows, cols) int16: each slice filled from two masks, plus
    Gaussian noise of ``noise`` HU (a real scanner's images are never flat; their PNGs are
    larger and slower to compress than flat ones)."""
    rng = np.random.default_rng(7)
    y, x = np.ogrid[:rows, :cols]
    cy, cx, cz = rows / 2, cols / 2, slices / 2
    body = ((x - cx) / (0.42 * cols)) ** 2 + ((y - cy) / (0.35 * rows)) ** 2 <= 1.0
    r = 0.12 * min(rows, cols)
    disc = ((x - cx) ** 2 + (y - cy) ** 2) / r**2  # the sphere's cross-section, scaled
    vol = np.full((slices, rows, cols), AIR_HU, np.int16)
    for k in range(slices):
        dz = ((k - cz) / max(1.0, 0.25 * slices)) ** 2
        vol[k][body] = BODY_HU
        vol[k][(disc + dz <= 1) & body] = SPHERE_HU
        if noise:
            vol[k] += rng.normal(0.0, noise, (rows, cols)).round().astype(np.int16)
    return vol


def synthetic_ct(
    rows: int = 64,
    cols: int = 64,
    slices: int = 16,
    *,
    phi: bool = False,
    pixel_spacing: float = 0.7,
    slice_spacing: float = 2.5,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1001",
    frame_of_reference: str = "1.2.826.0.1.3680043.8.498.2001",
    burned_in: bool = False,
    noise: float = 0.0,
) -> dict[str, bytes]:
    """A CT series as ``{file name: DICOM bytes}``, slice 0 at z = 0 going up (+z)."""
    vol = phantom_volume(rows, cols, slices, noise)
    stored = (vol.astype(np.int32) + 1024).astype(np.uint16)  # intercept -1024
    origin = (-(cols - 1) * pixel_spacing / 2, -(rows - 1) * pixel_spacing / 2, 0.0)
    out: dict[str, bytes] = {}
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(f"slice{k:04d}.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = series_uid + ".0"
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * slice_spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = slice_spacing
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PatientIdentityRemoved = "NO" if phi else "YES"
        if phi:
            ds.PatientName = "Doe^Jane"
            ds.PatientID = "MRN-0042"
            ds.PatientBirthDate = "19610412"
            ds.PatientSex = "F"
            ds.PatientAddress = "12 Harbour Lane, Springfield"
            ds.InstitutionName = "St Elsewhere General"
            ds.ReferringPhysicianName = "House^Gregory"
            ds.StudyDate = "20261130"
            ds.AccessionNumber = "ACC-77"
            ds.ImageComments = "Jane called back about the mass"
            ds.OtherPatientIDs = "OLD-9"
            block = ds.private_block(0x0029, "ACME SCANNER", create=True)
            block.add_new(0x01, "LO", "operator jsmith")
        if burned_in:
            ds.BurnedInAnnotation = "YES"
        ds.PixelData = stored[k].tobytes()
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out[f"slice{k:04d}.dcm"] = buf.getvalue()
    return out


def phantom_of(
    rows: int, cols: int, slices: int, pixel_spacing: float = 0.7, slice_spacing: float = 2.5
) -> Phantom:
    """Where :func:`synthetic_ct`'s phantom is, for checking measurements."""
    origin = (-(cols - 1) * pixel_spacing / 2, -(rows - 1) * pixel_spacing / 2, 0.0)
    centre = (
        origin[0] + cols / 2 * pixel_spacing,
        origin[1] + rows / 2 * pixel_spacing,
        slices / 2 * slice_spacing,
    )
    return Phantom(origin, pixel_spacing, slice_spacing, centre, 0.12 * min(rows, cols))


def plain_dataset_bytes() -> bytes:
    """A DICOM file without pixel data (a structured report-like object)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.9"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("sr.dcm", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
