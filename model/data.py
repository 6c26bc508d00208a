"""Dataset readers (manifest.csv or class folders), the patient-level split, the preprocessed-array cache."""

from __future__ import annotations

import csv
import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model import CLASSES, DEFAULT_SPLIT, REPO_ROOT
from model.preprocess import PREPROCESS_VERSION, decode_image, preprocess

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
SPLIT_SEED = 20260401


@dataclass(frozen=True)
class Record:
    """One image of the dataset."""

    file: str  # relative to the data root
    label: str
    source: str
    patient_id: str


def read_manifest(root: Path) -> list[Record]:
    """Read `<root>/manifest.csv` (file,label,source,patient_id[,license])."""
    with open(Path(root) / "manifest.csv", newline="") as fh:
        rows = [Record(r["file"], r["label"], r["source"], r["patient_id"]) for r in csv.DictReader(fh)]
    bad = {r.label for r in rows} - set(CLASSES)
    if bad:
        raise ValueError(f"unknown labels in manifest: {sorted(bad)}")
    return rows


def read_class_folders(root: Path) -> list[Record]:
    """Read a `<root>/<class>/*.jpg` layout (no patient ids: one patient per image, source 'unknown')."""
    root = Path(root)
    out: list[Record] = []
    for label in CLASSES:
        for p in sorted((root / label).rglob("*")):
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                rel = p.relative_to(root).as_posix()
                out.append(Record(rel, label, "unknown", f"file:{rel}"))
    if not out:
        raise FileNotFoundError(f"no images under {root}/{{{','.join(CLASSES)}}}/")
    return out


def read_dataset(root: Path) -> list[Record]:
    """Read a dataset folder: the manifest when present, else class subfolders."""
    root = Path(root)
    return read_manifest(root) if (root / "manifest.csv").exists() else read_class_folders(root)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(root: Path, records: Iterable[Record]) -> str:
    """sha256 of the manifest (or of the sorted file list when there is no manifest)."""
    root = Path(root)
    if (root / "manifest.csv").exists():
        return sha256_file(root / "manifest.csv")
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.file):
        h.update(f"{r.file},{r.label}\n".encode())
    return h.hexdigest()


def _patient_stratum(recs: list[Record]) -> tuple[str, str]:
    counts = Counter((r.label, r.source) for r in recs)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def make_split(records: list[Record], seed: int = SPLIT_SEED) -> dict[str, str]:
    """Assign every patient to train/val/test, stratified by (label, source), balancing image counts.

    Returns {patient_id: split}. Patients are shuffled with `seed` inside each stratum and each goes to the
    split whose image count is furthest below its target, so patients with many images do not skew the split.
    """
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        strata[_patient_stratum(by_patient[pid])].append(pid)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for key in sorted(strata):
        pids = strata[key]
        rng.shuffle(pids)
        # big patients first so they are placed while there is room, then the rest in shuffled order
        pids.sort(key=lambda p: -len(by_patient[p]))
        counts = dict.fromkeys(SPLITS, 0)
        for pid in pids:
            n = len(by_patient[pid])
            total = sum(counts.values()) + n
            deficits = {s: f * total - counts[s] for s, f in zip(SPLITS, SPLIT_FRACTIONS, strict=True)}
            best = max(SPLITS, key=lambda s: (deficits[s], -SPLITS.index(s)))
            assignment[pid] = best
            counts[best] += n
    return assignment


def write_split(records: list[Record], assignment: dict[str, str], path: Path) -> None:
    """Write the split as CSV: file,label,source,patient_id,split (one row per image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "label", "source", "patient_id", "split"])
        for r in sorted(records, key=lambda r: r.file):
            w.writerow([r.file, r.label, r.source, r.patient_id, assignment[r.patient_id]])


def read_split(path: Path = DEFAULT_SPLIT) -> dict[str, list[Record]]:
    """Read a split CSV into {"train": [...], "val": [...], "test": [...]}."""
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            out[r["split"]].append(Record(r["file"], r["label"], r["source"], r["patient_id"]))
    patients = [{r.patient_id for r in out[s]} for s in SPLITS]
    if patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2]:
        raise ValueError(f"split {path} puts one patient in two splits")
    return out


def load_or_make_split(
    root: Path, split_path: Path = DEFAULT_SPLIT, seed: int = SPLIT_SEED
) -> dict[str, list[Record]]:
    """Read the saved split, or make and save it from the dataset at `root` if it does not exist yet."""
    split_path = Path(split_path)
    if not split_path.exists():
        records = read_dataset(root)
        write_split(records, make_split(records, seed), split_path)
    return read_split(split_path)


def labels_of(records: list[Record]) -> np.ndarray:
    """Integer class indices (CLASSES order) of the records."""
    return np.array([CLASSES.index(r.label) for r in records], dtype=np.int64)


def cache_dir() -> Path:
    """Where preprocessed arrays are cached (git-ignored)."""
    return REPO_ROOT / "runs" / "cache"


def load_arrays(
    root: Path,
    records: list[Record],
    size: int,
    *,
    cache: bool = True,
    lung_crop: bool = False,
    clahe: bool = False,
) -> np.ndarray:
    """Preprocessed float32 (N, size, size, 1) arrays for the records, cached as .npy under runs/cache.

    `lung_crop`: crop each image to its checked lung fields first (model/lungs.py; whole image when the check
    fails), for the cross-validated comparison with and without the crop. `clahe`: preprocess(clahe=True).
    """
    root = Path(root)
    seg_key = ""
    if lung_crop:
        from model.lungs import SEG_DIR, Segmenter, crop

        seg = Segmenter()
        seg_key = "|lungcrop:" + sha256_file(SEG_DIR / "segmenter.tflite")[:12]
    key = hashlib.sha256(
        (
            "\n".join(r.file for r in records)
            + f"|{size}|{PREPROCESS_VERSION}|{root.resolve()}"
            + seg_key
            + ("|clahe" if clahe else "")
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"x_{size}_{key}.npy"
    if cache and path.exists():
        return np.load(path)
    x = np.zeros((len(records), size, size, 1), dtype=np.float32)
    for i, r in enumerate(records):
        gray = decode_image((root / r.file).read_bytes())
        if lung_crop:
            gray = crop(gray, seg.check(gray))
        x[i] = preprocess(gray, size, clahe=clahe)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, x)
        tmp.replace(path)
    return x
