"""Studies in: files, zips and DICOM from an upload, the CLI or a DICOM receiver, validated and stored.

Plain Python (no Flask, no TensorFlow). `intake.formats` owns image formats and pixel limits and imports
nothing of ours, so model.preprocess can use it too; this package file imports nothing, keeping that cheap.
"""
