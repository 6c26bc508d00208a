"""A small lung segmenter for cropping to the lung fields, with a quality check and a whole-image fallback.

    python -m model.lungs train            # -> model/artifacts/lungseg/ (segmenter.keras, .tflite, meta.json)
    python -m model.lungs check            # QC rates per source + docs/model/lungcrop_contact.png

Trained on the 343 human-drawn masks of ../shared/data/lungmasks (COVID-19 images of two collections), only
those whose images are in train+val of the frozen split; 15% of those patients are held out for Dice. Because
it has never seen an NIH or Kermany mask, every prediction passes `check_mask` (two lung fields of plausible
size on either side of the midline) before it is used; otherwise the whole image is kept.
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from model import PACKAGE_DIR, REPO_ROOT, shared_data_dir

SEG_SIZE = 128
SEG_DIR = PACKAGE_DIR / "artifacts" / "lungseg"
SHEET_SOURCES = ("mlwg", "nih", "kermany")
CROP_MARGIN = 0.06  # of the image side, around the union box of the two lung fields


@dataclass(frozen=True)
class LungCheck:
    """The verdict on one predicted mask: ok, why not, and the crop box in original pixels."""

    ok: bool
    reason: str
    box: tuple[int, int, int, int] | None  # top, left, height, width
    area: float  # lung share of the image content


def letterbox(gray: np.ndarray, size: int = SEG_SIZE) -> tuple[np.ndarray, float, int, int]:
    """Resize keeping the aspect ratio into a zero-padded square; returns (image, scale, top, left)."""
    h, w = gray.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    out = np.zeros((size, size), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = cv2.resize(
        gray.astype(np.float32), (nw, nh), interpolation=cv2.INTER_AREA
    )
    return out, scale, top, left


def make_segmenter(size: int = SEG_SIZE):
    """A small U-Net: 4 levels (16-32-64-128 channels), sigmoid lung probability per pixel."""
    import keras
    from keras import layers

    def conv(x, w, name):
        for i in range(2):
            x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"{name}_c{i}")(x)
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
            x = layers.ReLU(name=f"{name}_r{i}")(x)
        return x

    inp = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(4.0, offset=-2.0, name="normalise")(inp)
    skips = []
    for i, w in enumerate((16, 32, 64)):
        x = conv(x, w, f"e{i}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"p{i}")(x)
    x = conv(x, 128, "mid")
    for i, w in reversed(list(enumerate((16, 32, 64)))):
        x = layers.UpSampling2D(2, name=f"u{i}")(x)
        x = layers.Concatenate(name=f"cat{i}")([x, skips[i]])
        x = conv(x, w, f"d{i}")
    out = layers.Conv2D(1, 1, activation="sigmoid", name="lung")(x)
    return keras.Model(inp, out, name="lungseg")


def _mask_pairs(split_path: Path | None = None) -> list[tuple[Path, Path, str, str]]:
    """(image, mask, source, patient) for every mask whose image is in train+val of the split."""
    from model import DEFAULT_SPLIT
    from model.data import read_split

    split = read_split(split_path or DEFAULT_SPLIT)
    dev = {r.file: r.patient_id for r in split["train"] + split["val"]}
    root, cxr = shared_data_dir("lungmasks"), shared_data_dir("cxr")
    with open(root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [
        (cxr / r["image"], root / r["mask"], r["source"], dev[r["image"]]) for r in rows if r["image"] in dev
    ]


def _load_pair(img: Path, mask: Path) -> tuple[np.ndarray, np.ndarray]:
    from model.preprocess import decode_image

    gray = decode_image(img.read_bytes())
    m = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
    m = cv2.resize(m, (gray.shape[1], gray.shape[0]), interpolation=cv2.INTER_NEAREST)
    x, *_ = letterbox(gray)
    y, *_ = letterbox((m > 127).astype(np.float32))
    return x, (y > 0.5).astype(np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks."""
    inter = float((a * b).sum())
    return 2 * inter / max(float(a.sum() + b.sum()), 1e-6)


def train_segmenter(out: Path = SEG_DIR, *, epochs: int = 40, seed: int = 1, log=print) -> dict:
    """Train the U-Net on the train+val masks, report held-out Dice, write Keras + TFLite + meta.json."""
    import keras
    import tensorflow as tf

    from model.artifact import to_tflite
    from model.train import configure_tf

    configure_tf()
    keras.utils.set_random_seed(seed)
    pairs = _mask_pairs()
    patients = sorted({p for *_, p in pairs})
    rng = np.random.default_rng(seed)
    held = set(rng.choice(patients, size=max(1, int(0.15 * len(patients))), replace=False))
    data = [_load_pair(i, m) for i, m, *_ in pairs]
    x = np.stack([d[0] for d in data])[..., None]
    y = np.stack([d[1] for d in data])[..., None]
    te = np.array([p in held for *_, p in pairs])
    aug = keras.Sequential(
        [
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed),
            keras.layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom((-0.12, 0.12), fill_mode="constant", seed=seed + 2),
        ]
    )

    def augment(xb, yb):
        # one geometric transform for image and mask: stack them as channels
        both = aug(tf.concat([xb, yb], axis=-1), training=True)
        xa = both[..., :1] * tf.random.uniform((tf.shape(xb)[0], 1, 1, 1), 0.8, 1.2)
        return tf.clip_by_value(xa, 0.0, 1.0), tf.cast(both[..., 1:] > 0.5, tf.float32)

    ds = tf.data.Dataset.from_tensor_slices((x[~te], y[~te])).shuffle(len(x), seed=seed).batch(16)
    ds = ds.map(augment).prefetch(2)

    def loss(yt, yp):
        inter = tf.reduce_sum(yt * yp, axis=(1, 2, 3))
        d = 1 - (2 * inter + 1) / (tf.reduce_sum(yt + yp, axis=(1, 2, 3)) + 1)
        return tf.reduce_mean(keras.losses.binary_crossentropy(yt, yp), axis=(1, 2)) + d

    model = make_segmenter()
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, epochs * 20)), loss=loss
    )
    hist = model.fit(ds, validation_data=(x[te], y[te]), epochs=epochs, verbose=0)
    pred = model.predict(x[te], verbose=0) > 0.5
    dices = [dice(p[..., 0].astype(np.float32), t[..., 0]) for p, t in zip(pred, y[te], strict=True)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "segmenter.keras")
    (out / "segmenter.tflite").write_bytes(to_tflite(model))
    meta = {
        "size": SEG_SIZE,
        "trained_on": f"{int((~te).sum())} masks (train+val images of the frozen split)",
        "held_out": f"{int(te.sum())} masks of {len(held)} patients",
        "held_out_dice_mean": round(float(np.mean(dices)), 4),
        "held_out_dice_min": round(float(np.min(dices)), 4),
        "epochs": epochs,
        "final_loss": round(hist.history["loss"][-1], 4),
        "reproduce": "python -m model.lungs train",
        "attribution": "lung masks: V7 Labs COVID-19 X-ray dataset (CC BY 4.0)",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    log(json.dumps(meta))
    return meta


class Segmenter:
    """The trained segmenter through LiteRT (no TensorFlow needed), with the crop and its check."""

    def __init__(self, seg_dir: Path = SEG_DIR, num_threads: int = 1) -> None:
        from model.serve import _interpreter_class

        self._interp = _interpreter_class()(
            model_path=str(Path(seg_dir) / "segmenter.tflite"), num_threads=num_threads
        )
        self._in = self._interp.get_input_details()[0]["index"]
        self._out = self._interp.get_output_details()[0]["index"]
        self._n = -1

    def predict(self, xs: np.ndarray) -> np.ndarray:
        """Lung probability maps (N, S, S) for letterboxed images (N, S, S)."""
        xs = np.ascontiguousarray(xs[..., None], dtype=np.float32)
        if self._n != len(xs):
            self._interp.resize_tensor_input(self._in, xs.shape, strict=False)
            self._interp.allocate_tensors()
            self._n = len(xs)
        self._interp.set_tensor(self._in, xs)
        self._interp.invoke()
        return self._interp.get_tensor(self._out)[..., 0].copy()

    def check(self, gray: np.ndarray) -> LungCheck:
        """Segment one decoded image and check the mask; the box is in the image's own pixels."""
        x, scale, top, left = letterbox(gray)
        return check_mask(self.predict(x[None])[0] > 0.5, gray.shape, scale, top, left)


def check_mask(mask: np.ndarray, shape: tuple[int, int], scale: float, top: int, left: int) -> LungCheck:
    """Two lung fields of plausible size on either side of the midline, or the reason why not."""
    h, w = shape
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    content = mask[top : top + ch, left : left + cw].astype(np.uint8)
    n, lab, stats, cent = cv2.connectedComponentsWithStats(content, connectivity=8)
    if n <= 1:
        return LungCheck(False, "no lung field found", None, 0.0)
    order = np.argsort(-stats[1:, cv2.CC_STAT_AREA]) + 1
    total = float(content.size)
    area = float(content.sum()) / total
    if len(order) < 2:
        return LungCheck(False, "only one lung field found", None, area)
    a, b = order[:2]
    sa, sb = stats[a, cv2.CC_STAT_AREA] / total, stats[b, cv2.CC_STAT_AREA] / total
    if min(sa, sb) < 0.03:
        return LungCheck(False, f"second lung field too small ({min(sa, sb):.1%} of the image)", None, area)
    if not 0.12 <= sa + sb <= 0.70:
        return LungCheck(False, f"implausible lung area ({sa + sb:.1%} of the image)", None, area)
    xa, xb = cent[a][0] / cw, cent[b][0] / cw
    if not (min(xa, xb) < 0.5 < max(xa, xb)):
        return LungCheck(False, "lung fields not on both sides of the midline", None, area)
    ys, xs = np.nonzero((lab == a) | (lab == b))
    m = CROP_MARGIN * max(ch, cw)
    y0, y1 = max(0.0, ys.min() - m), min(float(ch), ys.max() + 1 + m)
    x0, x1 = max(0.0, xs.min() - m), min(float(cw), xs.max() + 1 + m)
    box = (int(y0 / scale), int(x0 / scale), max(1, int((y1 - y0) / scale)), max(1, int((x1 - x0) / scale)))
    box = (box[0], box[1], min(box[2], h - box[0]), min(box[3], w - box[1]))
    return LungCheck(True, "two lung fields", box, sa + sb)


def crop(gray: np.ndarray, chk: LungCheck) -> np.ndarray:
    """The image cropped to the checked lung box, or the whole image when the check failed."""
    if not chk.ok or chk.box is None:
        return gray
    t, left, h, w = chk.box
    return gray[t : t + h, left : left + w]


def qc_report(
    seg: Segmenter, data: Path, records: list, *, sheet: Path | None = None, per_source: int = 8
) -> dict:
    """Check rate per source over `records`; optionally a contact sheet of overlays: per_source images of each
    redistributable source, failed checks first, so the sheet shows what the fallback catches."""
    from collections import defaultdict

    from model.preprocess import decode_image

    by_source: dict[str, list] = defaultdict(list)
    seen: list[tuple] = []
    for r in records:
        gray = decode_image((Path(data) / r.file).read_bytes())
        x, scale, top, left = letterbox(gray)
        prob = seg.predict(x[None])[0]
        chk = check_mask(prob > 0.5, gray.shape, scale, top, left)
        by_source[r.source].append(chk)
        seen.append((r, chk))
    out = {
        s: {
            "n": len(v),
            "ok": round(sum(c.ok for c in v) / len(v), 4),
            "lung_area_median": round(float(np.median([c.area for c in v])), 3),
            "reasons": dict(_count(c.reason for c in v if not c.ok)),
        }
        for s, v in sorted(by_source.items())
    }
    if sheet is not None:
        tiles = []
        # only the redistributable collections appear in a committed picture (../shared/data/README.md)
        for src in SHEET_SOURCES:
            mine = [(r, c) for r, c in seen if r.source == src]
            failed = [rc for rc in mine if not rc[1].ok][: per_source // 4]
            picked = failed + [rc for rc in mine if rc[1].ok][: per_source - len(failed)]
            for r, chk in picked:
                gray = decode_image((Path(data) / r.file).read_bytes())
                x, scale, top, left = letterbox(gray)
                mask = seg.predict(x[None])[0] > 0.5
                tiles.append(_tile(x, mask, chk, f"{r.source} {r.label}", scale, top, left))
        cols = per_source
        rows = [
            np.hstack(tiles[i : i + cols] + [np.zeros_like(tiles[0])] * (cols - len(tiles[i : i + cols])))
            for i in range(0, len(tiles), cols)
        ]
        sheet.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(sheet), np.vstack(rows))
    return out


def _count(items):
    from collections import Counter

    return Counter(items).most_common()


def _tile(
    x: np.ndarray, mask: np.ndarray, chk: LungCheck, label: str, scale: float, top: int, left: int
) -> np.ndarray:
    base = cv2.cvtColor(np.clip(x * 255, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    tint = base.copy()
    tint[mask] = (0.5 * tint[mask] + 0.5 * np.array([0, 200, 0])).astype(np.uint8)
    tile = cv2.resize(tint, (160, 160), interpolation=cv2.INTER_NEAREST)
    k = 160 / SEG_SIZE
    if chk.box is not None:
        t, lft, h, w = chk.box
        p0 = (int((lft * scale + left) * k), int((t * scale + top) * k))
        p1 = (int(((lft + w) * scale + left) * k), int(((t + h) * scale + top) * k))
        cv2.rectangle(tile, p0, p1, (0, 255, 255), 1)
    color = (0, 220, 0) if chk.ok else (0, 0, 255)
    cv2.putText(tile, label[:24], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.putText(
        tile,
        ("ok" if chk.ok else chk.reason)[:30],
        (3, 154),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.36,
        color,
        1,
        cv2.LINE_AA,
    )
    return tile


def main() -> None:
    """Command line: train the segmenter, or check it per source and draw the contact sheet."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["train", "check"])
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()
    if args.what == "train":
        train_segmenter(epochs=args.epochs, log=lambda m: print(m, flush=True))
        return
    from model.cv import cv_records

    recs = cv_records()
    rep = qc_report(
        Segmenter(), shared_data_dir("cxr"), recs, sheet=REPO_ROOT / "docs" / "model" / "lungcrop_contact.png"
    )
    (SEG_DIR / "qc.json").write_text(json.dumps(rep, indent=1) + "\n")
    print(json.dumps(rep, indent=1))


if __name__ == "__main__":
    main()
