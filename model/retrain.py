"""The promotion gate: a candidate against the serving model on the same held-out studies (no SQL, no TF).

Both artifacts carry their out-of-fold predictions (oof.csv, written by model.pipeline.develop): for every
study of the development pool, the prediction of a network that never trained on it. The gate pairs the two
models' findings on the studies they share and bootstraps patients to bound the difference; a candidate is
promoted only when it is measurably no worse. The test split is never used to decide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model import CLASSES

COVID = CLASSES.index("covid")


@dataclass(frozen=True)
class GateMargins:
    """How much worse than the serving model a candidate may be (95% lower bound of the paired difference)."""

    covid_sensitivity_lcb: float = 0.02
    macro_f1: float = 0.02
    ece_max: float = 0.10


@dataclass
class PairedComparison:
    """Candidate vs serving on the same held-out studies, with 95% patient-bootstrap bounds."""

    n: int
    macro_f1: tuple[float, float, float]  # (candidate, serving, lower bound of candidate - serving)
    covid_sensitivity: tuple[float, float, float]
    ece: float  # candidate's calibrated OOF ECE
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready form (metric names say where they come from: out-of-fold, paired)."""
        d = asdict(self)
        d["split"] = "out-of-fold predictions of train+val, paired on shared studies"
        return d


def _findings(artifact_dir: Path) -> dict[str, tuple[int, int, str]]:
    """file -> (label, finding, patient) from an artifact's oof.csv, with its temperature and thresholds."""
    from model.artifact import read_meta
    from model.calibrate import decide_all, softmax
    from model.cv import read_oof

    meta = read_meta(artifact_dir)
    oof = read_oof(Path(artifact_dir) / "oof.csv")
    probs = softmax(oof["logits"] / float(meta["temperature"]))
    decided, _ = decide_all(probs, meta["thresholds"])
    return {
        f: (int(y), int(d), str(p))
        for f, y, d, p in zip(oof["files"], oof["y"], decided, oof["patients"], strict=True)
    }


def _f1_and_sens(y: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    from model.metrics import macro_f1

    pos = y == COVID
    return macro_f1(y, pred), float((pred[pos] == COVID).mean()) if pos.any() else float("nan")


def compare(candidate_dir: Path, serving_dir: Path, *, n_boot: int = 1000, seed: int = 0) -> PairedComparison:
    """Pair two artifacts' OOF findings on shared studies; bootstrap patients to bound the difference."""
    from model.artifact import read_meta
    from model.metrics import patient_resamples

    cand, serv = _findings(candidate_dir), _findings(serving_dir)
    shared = sorted(set(cand) & set(serv))
    if not shared:
        raise ValueError("the candidate and the serving model share no held-out studies")
    y = np.array([cand[f][0] for f in shared])
    if not np.array_equal(y, [serv[f][0] for f in shared]):
        # the candidate was trained on other labels (a test's shuffled candidate): judge against the truth
        # the serving model was scored on
        y = np.array([serv[f][0] for f in shared])
    pc = np.array([cand[f][1] for f in shared])
    ps = np.array([serv[f][1] for f in shared])
    groups = np.array([serv[f][2] for f in shared])
    diffs = []
    for idx in patient_resamples(groups, n_boot, seed):
        fc, sc = _f1_and_sens(y[idx], pc[idx])
        fs, ss = _f1_and_sens(y[idx], ps[idx])
        diffs.append((fc - fs, sc - ss))
    d = np.array(diffs)
    fc, sc = _f1_and_sens(y, pc)
    fs, ss = _f1_and_sens(y, ps)
    return PairedComparison(
        n=len(shared),
        macro_f1=(fc, fs, float(np.nanpercentile(d[:, 0], 2.5))),
        covid_sensitivity=(sc, ss, float(np.nanpercentile(d[:, 1], 2.5))),
        ece=float(read_meta(candidate_dir)["metrics"]["oof"]["ece"]),
    )


def gate(
    cmp: PairedComparison | None, margins: GateMargins, *, candidate_ece: float
) -> tuple[bool, list[str]]:
    """Promote only a candidate that is measurably no worse; returns (passed, reasons for the verdict)."""
    reasons: list[str] = []
    ok = True
    if candidate_ece > margins.ece_max:
        ok = False
        reasons.append(f"calibration error {candidate_ece:.3f} is above the bound {margins.ece_max:.3f}")
    else:
        reasons.append(f"calibration error {candidate_ece:.3f} within the bound {margins.ece_max:.3f}")
    if cmp is None:
        reasons.append("no serving model to compare with")
        return ok, reasons
    for name, (c, s, lcb), margin in (
        ("macro-F1", cmp.macro_f1, margins.macro_f1),
        ("COVID-19 sensitivity", cmp.covid_sensitivity, margins.covid_sensitivity_lcb),
    ):
        verdict = f"{name} {c:.3f} vs serving {s:.3f} on {cmp.n} shared held-out studies"
        if lcb < -margin:
            ok = False
            reasons.append(f"{verdict}: the difference's 95% lower bound {lcb:+.3f} is below -{margin:.3f}")
        else:
            reasons.append(f"{verdict}: the difference's 95% lower bound {lcb:+.3f} is within -{margin:.3f}")
    return ok, reasons
