"""Data: manifests from npz / folders / CSV / DICOM, readers, splits, preprocessing and caches."""
