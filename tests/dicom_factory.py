"""DICOM files written by the tests (pydicom), with known stored pixels."""
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"


def base_dataset(sop_class=DX_STORAGE, ts=ExplicitVRLittleEndian, patient="P001"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.Modality = patient, generate_uid(), "DX"
    return ds


def write_image(path, stored, photometric="MONOCHROME2", bits_stored=12, signed=False, frames=1, **attrs):
    stored = np.asarray(stored)
    ds = base_dataset()
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_rt_plan(path):
    ds = base_dataset(RT_PLAN_STORAGE)
    ds.Modality = "RTPLAN"
    ds.RTPlanLabel = "PLAN"
    ds.save_as(path, enforce_file_format=True)


def voi_lut_sequence(first_mapped, lut, bits):
    item = Dataset()
    item.LUTDescriptor = [len(lut), first_mapped, bits]
    item.LUTData = np.asarray(lut, dtype=np.uint16).tobytes()
    item["LUTData"].VR = "OW"
    return pydicom.Sequence([item])
