"""DICOM series: reading, validation, the de-identification gate, and the volume's geometry.

Nothing here does I/O beyond parsing bytes it is given; :mod:`.imaging` stores and serves.

A series is accepted when every file is DICOM Part 10 (or a bare dataset pydicom reads), has
the Image Pixel module (rows, columns, samples, bits, photometric interpretation, pixel data),
is monochrome (``MONOCHROME1``/``MONOCHROME2``), single-frame, in a transfer syntax of
:data:`SUPPORTED_SYNTAXES` whose decoder is installed, and all files belong to one series
(one Series Instance UID, one Frame of Reference, one size, one orientation, distinct
positions, evenly spaced along the slice normal). Anything else is an :class:`ImageError`
with a typed code (``not_dicom``, ``no_pixel_data``, ``unsupported_transfer_syntax``,
``mixed_series``, ``unsupported_image``).

The gate (:func:`identifying_attributes`) and the de-identification (:func:`deidentify`)
follow DICOM PS3.15 Annex E, the Basic Application Level Confidentiality Profile (no options):
attributes of Table E.1-1 are removed (X), emptied (Z) or replaced by a dummy (D), UIDs are
replaced (U) by ones derived from the originals with a keyed hash (so they stay consistent
within a series, and across series uploaded to the same room: a CT and its segmentation keep
sharing a frame of reference), private attributes and overlay groups are removed, and the
result is marked (Patient Identity Removed ``YES``, De-identification Method and its code
113100). A burned-in annotation (``BurnedInAnnotation`` = ``YES``) cannot be removed by the
basic profile (it needs the Clean Pixel Data option) and is refused either way.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence

#: Transfer syntaxes accepted (when their decoder is installed: see :func:`supported_syntaxes`).
#: Uncompressed and deflate are decoded by pydicom itself, RLE by pydicom or pylibjpeg-rle, the
#: JPEG family by pylibjpeg-libjpeg, JPEG 2000 and HTJ2K by pylibjpeg-openjpeg.
SUPPORTED_SYNTAXES: tuple[str, ...] = (
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.RLELossless,
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLosslessSV1,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
    dicom_uid.HTJ2KLossless,
    dicom_uid.HTJ2KLosslessRPCL,
    dicom_uid.HTJ2K,
)

#: Relative spread of slice gaps tolerated before a series counts as unevenly spaced.
SPACING_TOLERANCE = 0.01
#: Orientation cosines of two files may differ by this much and still be one series.
ORIENTATION_TOLERANCE = 1e-4


class ImageError(Exception):
    """A refused series: ``code`` is the typed error code, ``attributes`` the attribute
    keywords concerned (for ``identifiable_data``; never their values)."""

    def __init__(self, code: str, message: str, attributes: Sequence[str] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.attributes = tuple(attributes)


def supported_syntaxes() -> list[str]:
    """The transfer syntaxes this installation decodes (of :data:`SUPPORTED_SYNTAXES`)."""
    from pydicom.pixels.decoders.base import get_decoder

    out = []
    for ts in SUPPORTED_SYNTAXES:
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


# --------------------------------------------------------------------------- reading


def read_files(files: Iterable[tuple[str, bytes]]) -> list[Dataset]:
    """Parse every file; a file pydicom cannot read as DICOM is ``not_dicom`` (naming it)."""
    out: list[Dataset] = []
    for name, data in files:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=False)
        except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
            raise ImageError("not_dicom", f"{name!r} is not a DICOM file ({exc})") from None
        except Exception as exc:  # pydicom raises assorted errors on truncated input
            raise ImageError("not_dicom", f"{name!r} could not be read as DICOM ({exc})") from None
        if len(ds) == 0:
            raise ImageError("not_dicom", f"{name!r} holds no DICOM attributes")
        ds.filename = name
        out.append(ds)
    if not out:
        raise ImageError("not_dicom", "the upload holds no files")
    return out


def _syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is None:
        # A bare dataset without a file meta header: pydicom read it as implicit little endian
        # (or what it guessed); that is what it decodes.
        return (
            dicom_uid.ExplicitVRLittleEndian
            if not ds.is_implicit_VR
            else (dicom_uid.ImplicitVRLittleEndian)
        )
    return str(ts)


_PIXEL_MODULE = ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation")


def _name(ds: Dataset) -> str:
    return str(getattr(ds, "filename", "") or "a file")


def check_instance(ds: Dataset, syntaxes: Sequence[str]) -> None:
    """One file's own checks: the pixel module, the transfer syntax, monochrome, one frame."""
    if "PixelData" not in ds:
        what = "no Pixel Data"
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            what = "float pixel data, which is not supported"
        raise ImageError("no_pixel_data", f"{_name(ds)} has {what} (not an image)")
    missing = [k for k in _PIXEL_MODULE if k not in ds]
    if missing:
        raise ImageError(
            "no_pixel_data", f"{_name(ds)} lacks the Image Pixel module's {', '.join(missing)}"
        )
    ts = _syntax(ds)
    if ts not in syntaxes:
        try:
            label = dicom_uid.UID(ts).name
        except Exception:
            label = ts
        raise ImageError(
            "unsupported_transfer_syntax",
            f"{_name(ds)} is in transfer syntax {ts} ({label}); supported: " + ", ".join(syntaxes),
        )
    pi = str(ds.PhotometricInterpretation).strip()
    if pi not in ("MONOCHROME1", "MONOCHROME2") or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise ImageError(
            "unsupported_image", f"{_name(ds)} is {pi}: only grey-scale (MONOCHROME) series"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ImageError("unsupported_image", f"{_name(ds)} is multi-frame: one frame per file")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where the volume's voxels are in patient coordinates (mm, DICOM LPS).

    Voxel (column i, row j, slice k) is at ``origin + i * col_step + j * row_step + k *
    slice_step``; slices are sorted by their position along the normal (ascending)."""

    rows: int
    cols: int
    slices: int
    origin: tuple[float, float, float]  # Image Position (Patient) of slice 0
    row_cosines: tuple[float, float, float]  # direction of increasing column index
    col_cosines: tuple[float, float, float]  # direction of increasing row index
    normal: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (between rows, between columns), mm
    slice_spacing: float  # mm, along the normal

    def affine(self) -> np.ndarray:
        """3x4 matrix: patient position = A @ (i, j, k, 1)."""
        a = np.zeros((3, 4))
        a[:, 0] = np.array(self.row_cosines) * self.pixel_spacing[1]
        a[:, 1] = np.array(self.col_cosines) * self.pixel_spacing[0]
        a[:, 2] = np.array(self.normal) * self.slice_spacing
        a[:, 3] = self.origin
        return a

    def to_voxel(self, point: Sequence[float]) -> np.ndarray:
        """Continuous voxel coordinates (i, j, k) of a patient position (mm)."""
        a = self.affine()
        return np.linalg.solve(a[:, :3], np.asarray(point, float) - a[:, 3])

    def to_patient(self, ijk: Sequence[float]) -> np.ndarray:
        a = self.affine()
        return a[:, :3] @ np.asarray(ijk, float) + a[:, 3]

    def planes(self) -> dict[str, dict[str, Any]]:
        """Each plane's images as served: pixel (row r, column c) of image ``index`` is at
        ``origin + index * slice_step + r * row_step + c * col_step``. Axial images are the
        acquired slices; coronal and sagittal ones put the highest slice on the top row."""
        a = self.affine()
        x, y, n, p0 = a[:, 0], a[:, 1], a[:, 2], a[:, 3]
        top = p0 + (self.slices - 1) * n

        def plane(
            count: int, rows: int, cols: int, origin: Any, row: Any, col: Any, step: Any
        ) -> dict[str, Any]:
            return {
                "count": count,
                "rows": rows,
                "cols": cols,
                "origin": _vec(origin),
                "row_step": _vec(row),
                "col_step": _vec(col),
                "slice_step": _vec(step),
                "row_spacing": round(float(np.linalg.norm(row)), 6),
                "col_spacing": round(float(np.linalg.norm(col)), 6),
            }

        return {
            "axial": plane(self.slices, self.rows, self.cols, p0, y, x, n),
            "coronal": plane(self.rows, self.slices, self.cols, top, -n, x, y),
            "sagittal": plane(self.cols, self.slices, self.rows, top, -n, y, x),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "cols": self.cols,
            "slices": self.slices,
            "origin": list(self.origin),
            "row_cosines": list(self.row_cosines),
            "col_cosines": list(self.col_cosines),
            "normal": list(self.normal),
            "pixel_spacing": list(self.pixel_spacing),
            "slice_spacing": self.slice_spacing,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Geometry:
        return cls(
            int(d["rows"]),
            int(d["cols"]),
            int(d["slices"]),
            tuple(d["origin"]),
            tuple(d["row_cosines"]),
            tuple(d["col_cosines"]),
            tuple(d["normal"]),
            tuple(d["pixel_spacing"]),
            float(d["slice_spacing"]),
        )


def _vec(v: Any) -> list[float]:
    return [round(float(x), 6) + 0.0 for x in v]


def plane_index(geometry: Geometry, ijk: np.ndarray) -> dict[str, int]:
    """The image index in each plane that contains voxel ``ijk`` (rounded)."""
    i, j, k = (round(float(v)) for v in ijk)
    return {"axial": k, "coronal": j, "sagittal": i}


@dataclass
class Series:
    """A validated series: its volume (modality values: rescale applied), geometry and the
    attributes the room shows."""

    volume: np.ndarray  # (slices, rows, cols), int16 or float32
    geometry: Geometry
    modality: str
    series_uid: str
    study_uid: str
    frame_of_reference: str
    window: tuple[float, float]  # default (center, width)
    invert: bool  # MONOCHROME1: low values bright
    syntaxes: tuple[str, ...]
    units: str  # "HU" for CT, else the rescale type or "" (stored values)


def _unit_vec(v: Sequence[float]) -> np.ndarray:
    a = np.asarray([float(x) for x in v])
    n = float(np.linalg.norm(a))
    if not math.isfinite(n) or n < 1e-6:
        raise ValueError("zero vector")
    return a / n


def _orientation(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return np.array([1.0, 0, 0]), np.array([0.0, 1, 0])  # secondary capture: a plain image
    try:
        return _unit_vec(iop[:3]), _unit_vec(iop[3:])
    except ValueError:
        raise ImageError("unsupported_image", f"{_name(ds)} has a degenerate orientation") from None


def _position(ds: Dataset) -> np.ndarray | None:
    ipp = ds.get("ImagePositionPatient")
    if ipp is None or len(ipp) != 3:
        return None
    out = np.asarray([float(x) for x in ipp])
    return out if np.isfinite(out).all() else None


def build_series(datasets: Sequence[Dataset], syntaxes: Sequence[str] | None = None) -> Series:
    """Validate ``datasets`` as one series and build its volume (see the module docstring)."""
    syntaxes = list(syntaxes) if syntaxes is not None else supported_syntaxes()
    for ds in datasets:
        check_instance(ds, syntaxes)
    first = datasets[0]

    def same(keyword: str, what: str) -> None:
        values = {str(ds.get(keyword, "")) for ds in datasets}
        if len(values) > 1:
            raise ImageError("mixed_series", f"the files have {len(values)} different {what}")

    same("SeriesInstanceUID", "Series Instance UIDs")
    same("FrameOfReferenceUID", "Frames of Reference")
    same("Modality", "modalities")
    same("Rows", "row counts")
    same("Columns", "column counts")
    same("PhotometricInterpretation", "photometric interpretations")
    same("PixelSpacing", "pixel spacings")
    row0, col0 = _orientation(first)
    for ds in datasets[1:]:
        r, c = _orientation(ds)
        if np.abs(r - row0).max() > ORIENTATION_TOLERANCE or (
            np.abs(c - col0).max() > ORIENTATION_TOLERANCE
        ):
            raise ImageError("mixed_series", "the files have different orientations")
    normal = np.cross(row0, col0)
    normal /= np.linalg.norm(normal)
    found = [_position(ds) for ds in datasets]
    if len(datasets) > 1 and any(p is None for p in found):
        raise ImageError(
            "unsupported_image", "a series of several files needs Image Position (Patient)"
        )
    positions = [p if p is not None else np.zeros(3) for p in found]
    if len(datasets) == 1:
        order = [0]
        p0 = positions[0]
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1)) or 1)
        spacing = thickness if math.isfinite(thickness) and thickness > 0 else 1.0
    else:
        along = np.array([float(np.dot(p, normal)) for p in positions])
        order = list(np.argsort(along, kind="stable"))
        sorted_along = along[order]
        gaps = np.diff(sorted_along)
        if (gaps <= 1e-3).any():
            raise ImageError("mixed_series", "two files are at the same position")
        spacing = float(gaps.mean())
        if float(np.abs(gaps - spacing).max()) > SPACING_TOLERANCE * spacing:
            raise ImageError("unsupported_image", "the slices are not evenly spaced")
        p0 = positions[order[0]]
        # Off-axis positions (a tilted gantry) would need resampling: not supported.
        offsets = np.array(
            [positions[i] - p0 - (along[i] - along[order[0]]) * normal for i in order]
        )
        if float(np.abs(offsets).max()) > max(0.01 * spacing, 1e-3) * len(datasets):
            raise ImageError("unsupported_image", "the slices are sheared (a tilted gantry)")
    ps = first.get("PixelSpacing") or first.get("ImagerPixelSpacing") or [1, 1]
    try:
        pixel_spacing = (float(ps[0]), float(ps[1]))
    except (TypeError, ValueError, IndexError):
        pixel_spacing = (1.0, 1.0)
    if not all(math.isfinite(v) and v > 0 for v in pixel_spacing):
        raise ImageError("unsupported_image", "the pixel spacing is not positive")
    rows, cols = int(first.Rows), int(first.Columns)
    volume = _volume([datasets[i] for i in order], rows, cols)
    geometry = Geometry(
        rows,
        cols,
        len(datasets),
        tuple(float(v) for v in p0),  # type: ignore[arg-type]
        tuple(float(v) for v in row0),  # type: ignore[arg-type]
        tuple(float(v) for v in col0),  # type: ignore[arg-type]
        tuple(float(v) for v in normal),  # type: ignore[arg-type]
        pixel_spacing,
        spacing,
    )
    modality = str(first.get("Modality", "OT"))
    return Series(
        volume,
        geometry,
        modality,
        str(first.get("SeriesInstanceUID", "")),
        str(first.get("StudyInstanceUID", "")),
        str(first.get("FrameOfReferenceUID", "")),
        _default_window(first, volume),
        str(first.PhotometricInterpretation).strip() == "MONOCHROME1",
        tuple(sorted({_syntax(ds) for ds in datasets})),
        "HU" if modality == "CT" else str(first.get("RescaleType", "") or ""),
    )


def _volume(datasets: Sequence[Dataset], rows: int, cols: int) -> np.ndarray:
    """Decode every slice and apply its rescale: int16 while every value is a whole number
    that fits (CT in HU), else float32. Slice by slice, so a 300-slice CT never has a float
    copy of the whole volume in memory."""
    vol: np.ndarray = np.empty((len(datasets), rows, cols), np.int16)
    for k, ds in enumerate(datasets):
        try:
            arr = ds.pixel_array
        except Exception as exc:
            raise ImageError(
                "unsupported_image", f"{_name(ds)}: its pixel data could not be decoded ({exc})"
            ) from None
        if arr.shape != (rows, cols):
            raise ImageError("mixed_series", f"{_name(ds)} is {arr.shape}, not {(rows, cols)}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        values = arr.astype(np.float32)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
        if not np.isfinite(values).all():
            raise ImageError("unsupported_image", f"{_name(ds)}: rescaled values are not finite")
        if vol.dtype == np.int16 and not (
            float(values.min()) >= -32768
            and float(values.max()) <= 32767
            and np.array_equal(values, np.round(values))
        ):
            vol = vol.astype(np.float32)  # this slice does not fit: the whole volume floats
        vol[k] = values
    return vol


def _default_window(ds: Dataset, volume: np.ndarray) -> tuple[float, float]:
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(wc[0] if isinstance(wc, pydicom.multival.MultiValue) else wc)
        w = float(ww[0] if isinstance(ww, pydicom.multival.MultiValue) else ww)
        if math.isfinite(c) and math.isfinite(w) and w >= 1:
            return c, w
    except (TypeError, ValueError):
        pass
    lo, hi = float(volume.min()), float(volume.max())
    return (lo + hi) / 2, max(1.0, hi - lo)


# --------------------------------------------------------------------------- the gate

#: PS3.15 Table E.1-1 (Basic Profile column), the attributes that carry identifying data: the
#: action for each (X remove, Z empty, D dummy value). UIDs (U) are listed in :data:`UIDS`.
PROFILE: dict[str, str] = {
    "AccessionNumber": "Z",
    "AcquisitionComments": "X",
    "AcquisitionDate": "X",
    "AcquisitionDateTime": "X",
    "AcquisitionDeviceProcessingDescription": "X",
    "AcquisitionTime": "X",
    "ActualHumanPerformersSequence": "X",
    "AdditionalPatientHistory": "X",
    "AdmissionID": "X",
    "AdmittingDate": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingTime": "X",
    "Allergies": "X",
    "Arbitrary": "X",
    "AuthorObserverSequence": "X",
    "BranchOfService": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    "ContentCreatorName": "Z",
    "ContentDate": "Z",
    "ContentTime": "Z",
    "ContributionDateTime": "X",
    "CountryOfResidence": "X",
    "CurrentPatientLocation": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "DerivationDescription": "X",
    "DetectorID": "X",
    "DeviceSerialNumber": "X",
    "DigitalSignaturesSequence": "X",
    "DischargeDiagnosisDescription": "X",
    "EthnicGroup": "X",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "FrameComments": "X",
    "GantryID": "X",
    "GeneratorID": "X",
    "IdentifyingComments": "X",
    "ImageComments": "X",
    "ImagePresentationComments": "X",
    "ImagingServiceRequestComments": "X",
    "Impressions": "X",
    "InstanceCreationDate": "X",
    "InstanceCreationTime": "X",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X",
    "InstitutionName": "X",
    "InstitutionalDepartmentName": "X",
    "InsurancePlanIdentification": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "InterpretationApproverSequence": "X",
    "InterpretationAuthor": "X",
    "InterpretationDiagnosisDescription": "X",
    "InterpretationRecorder": "X",
    "InterpretationText": "X",
    "InterpretationTranscriber": "X",
    "IssuerOfAdmissionID": "X",
    "IssuerOfPatientID": "X",
    "LastMenstrualDate": "X",
    "MedicalAlerts": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "ModifiedAttributesSequence": "X",
    "ModifyingDeviceID": "X",
    "ModifyingDeviceManufacturer": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "Occupation": "X",
    "OperatorIdentificationSequence": "X",
    "OperatorsName": "X",
    "OrderCallbackPhoneNumber": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OriginalAttributesSequence": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "OverlayComments": "X",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "ParticipantSequence": "X",
    "PatientAddress": "X",
    "PatientAge": "X",
    "PatientBirthDate": "Z",
    "PatientBirthName": "X",
    "PatientBirthTime": "X",
    "PatientComments": "X",
    "PatientID": "Z",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientMotherBirthName": "X",
    "PatientName": "Z",
    "PatientPrimaryLanguageCodeSequence": "X",
    "PatientReligiousPreference": "X",
    "PatientSex": "Z",
    "PatientSexNeutered": "X",
    "PatientSize": "X",
    "PatientState": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTransportArrangements": "X",
    "PatientWeight": "X",
    "PerformedLocation": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedStationAETitle": "X",
    "PerformedStationName": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PersonAddress": "X",
    "PersonName": "D",
    "PersonTelephoneNumbers": "X",
    "PhysicianApprovingInterpretation": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "PreMedication": "X",
    "PregnancyStatus": "X",
    "ProtocolName": "X",
    "ReasonForStudy": "X",
    "ReasonForTheImagingServiceRequest": "X",
    "ReasonForTheRequestedProcedure": "X",
    "ReferencedPatientAliasSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X",
    "ReferencedStudySequence": "X",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X",
    "RegionOfResidence": "X",
    "RequestAttributesSequence": "X",
    "RequestedContrastAgent": "X",
    "RequestedProcedureComments": "X",
    "RequestedProcedureDescription": "X",
    "RequestedProcedureID": "X",
    "RequestedProcedureLocation": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ResponsibleOrganization": "X",
    "ResponsiblePerson": "X",
    "ResultsComments": "X",
    "ResultsDistributionListSequence": "X",
    "ResultsIDIssuer": "X",
    "ScheduledHumanPerformersSequence": "X",
    "ScheduledPatientInstitutionResidence": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X",
    "ScheduledProcedureStepLocation": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledStationAETitle": "X",
    "ScheduledStationName": "X",
    "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X",
    "SeriesDate": "X",
    "SeriesDescription": "X",
    "SeriesTime": "X",
    "ServiceEpisodeDescription": "X",
    "ServiceEpisodeID": "X",
    "SmokingStatus": "X",
    "SourceImageSequence": "X",
    "SpecialNeeds": "X",
    "StationName": "X",
    "StudyComments": "X",
    "StudyDate": "Z",
    "StudyDescription": "X",
    "StudyID": "Z",
    "StudyIDIssuer": "X",
    "StudyTime": "Z",
    "TextComments": "X",
    "TextString": "X",
    "TopicAuthor": "X",
    "TopicKeywords": "X",
    "TopicSubject": "X",
    "TopicTitle": "X",
    "VerifyingObserverIdentificationCodeSequence": "X",
    "VerifyingObserverName": "D",
    "VerifyingObserverSequence": "X",
    "VerifyingOrganization": "X",
    "VisitComments": "X",
}
#: UIDs the profile replaces (U): remapped consistently, never grounds for refusal (a series
#: de-identified before carries replaced UIDs that look like any others).
UIDS: frozenset[str] = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "MediaStorageSOPInstanceUID",
        "FrameOfReferenceUID",
        "SynchronizationFrameOfReferenceUID",
        "ReferencedSOPInstanceUID",
        "ReferencedFrameOfReferenceUID",
        "RelatedFrameOfReferenceUID",
        "InstanceCreatorUID",
        "IrradiationEventUID",
        "ConcatenationUID",
        "DimensionOrganizationUID",
        "StorageMediaFileSetUID",
        "DeviceUID",
        "UID",
    }
)
_DUMMY = {"PN": "ANONYMOUS", "LO": "ANONYMOUS", "SH": "ANON", "DA": "19000101", "TM": "000000"}
DEIDENTIFICATION_METHOD = "DICOM PS3.15 E.1 Basic Application Level Confidentiality Profile"


def _has_value(elem: Any) -> bool:
    v = elem.value
    if v is None:
        return False
    if isinstance(v, bytes):
        return len(v.strip(b" \x00")) > 0
    if isinstance(v, DicomSequence | list | tuple):
        return len(v) > 0
    return len(str(v).strip(" \x00")) > 0


def _walk(ds: Dataset, found: set[str]) -> None:
    for elem in ds:
        tag = elem.tag
        if tag.is_private:
            found.add(f"private({tag.group:04X},xxxx)")
            continue
        if 0x6000 <= tag.group <= 0x60FF and tag.element in (0x3000, 0x4000):
            found.add("OverlayData" if tag.element == 0x3000 else "OverlayComments")
            continue
        kw = elem.keyword
        if kw in PROFILE and _has_value(elem):
            found.add(kw)
        elif kw == "BurnedInAnnotation" and str(elem.value).strip().upper() == "YES":
            found.add(kw)
        if elem.VR == "SQ" and kw not in PROFILE:
            for item in elem.value:
                _walk(item, found)


def identifying_attributes(datasets: Iterable[Dataset]) -> list[str]:
    """Keywords of the attributes that carry identifying data in any of ``datasets`` (the
    profile's X/Z/D attributes with a value, overlays, private attributes as
    ``private(gggg,xxxx)`` per group, and ``BurnedInAnnotation`` when it is ``YES``), sorted."""
    found: set[str] = set()
    for ds in datasets:
        _walk(ds, found)
    return sorted(found)


def uid_mapper(key: bytes) -> Any:
    """A function mapping a UID to its replacement: ``2.25.`` and a decimal derived from
    HMAC-SHA256(key, uid), so the same original gives the same replacement under one key."""

    def remap(value: str) -> str:
        digest = hmac.new(key, value.strip().encode(), hashlib.sha256).digest()
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    return remap


def _deid_dataset(ds: Dataset, remap: Any, actions: set[str]) -> None:
    for elem in list(ds):
        tag = elem.tag
        if tag.is_private or (0x6000 <= tag.group <= 0x60FF):
            if tag.is_private:
                actions.add("private:X")
            else:
                actions.add("Overlay:X")
            del ds[tag]
            continue
        kw = elem.keyword
        action = PROFILE.get(kw)
        if action == "X":
            if _has_value(elem):
                actions.add(f"{kw}:X")
            del ds[tag]
        elif action == "Z":
            if _has_value(elem):
                actions.add(f"{kw}:Z")
            elem.value = "" if elem.VR != "SQ" else DicomSequence()
        elif action == "D":
            if _has_value(elem):
                actions.add(f"{kw}:D")
            elem.value = _DUMMY.get(elem.VR, "ANONYMOUS")
        elif kw in UIDS and elem.VR == "UI" and elem.value:
            actions.add(f"{kw}:U")
            if elem.VM > 1:
                elem.value = [remap(str(v)) for v in elem.value]
            else:
                elem.value = remap(str(elem.value))
        elif elem.VR == "SQ":
            for item in elem.value:
                _deid_dataset(item, remap, actions)


def deidentify(datasets: Sequence[Dataset], key: bytes) -> list[str]:
    """De-identify ``datasets`` in place with the basic profile (see the module docstring);
    returns what was done as ``keyword:action`` entries, sorted (no values). Refuses (raises
    ``identifiable_data``) a burned-in annotation, which the basic profile cannot remove."""
    burned = [
        ds for ds in datasets if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
    ]
    if burned:
        raise ImageError(
            "identifiable_data",
            "the pixels carry burned-in annotations, which de-identification by attributes "
            "cannot remove",
            ["BurnedInAnnotation"],
        )
    remap = uid_mapper(key)
    actions: set[str] = set()
    for ds in datasets:
        _deid_dataset(ds, remap, actions)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = remap(str(meta.MediaStorageSOPInstanceUID))
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        code = Dataset()
        code.CodeValue = "113100"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        ds.DeidentificationMethodCodeSequence = DicomSequence([code])
    return sorted(actions)


__all__ = [
    "SUPPORTED_SYNTAXES",
    "Geometry",
    "ImageError",
    "Series",
    "build_series",
    "deidentify",
    "identifying_attributes",
    "plane_index",
    "read_files",
    "supported_syntaxes",
    "uid_mapper",
]
