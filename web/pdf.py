"""PDF reports with ReportLab: the batch report and one study, the research-use notice on every page.

ReportLab, not WeasyPrint: it is a self-contained wheel (WeasyPrint needs Pango and its fonts from the system,
which the Docker image and the development machines would have to install), it draws images with an alpha
channel over each other (the heat-map overlay), and a page callback puts the notice on every page however the
tables break.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any
from xml.sax.saxutils import escape

from PIL import Image as PILImage
from reportlab.graphics.shapes import Drawing, Rect, String
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4, landscape
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.lib.utils import ImageReader
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    Image,
    KeepTogether,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)

_STYLES = getSampleStyleSheet()
BODY = ParagraphStyle("body", parent=_STYLES["BodyText"], fontSize=8.5, leading=10.5)
SMALL = ParagraphStyle("small", parent=BODY, fontSize=7.5, leading=9)
H1 = _STYLES["Heading1"]
H2 = ParagraphStyle("h2", parent=_STYLES["Heading2"], fontSize=12, spaceBefore=8, spaceAfter=4)
BAND_COLOURS = {
    "COVID-19 suspected": colors.HexColor("#c0392b"),
    "pneumonia suspected": colors.HexColor("#d68910"),
    "likely normal": colors.HexColor("#2e8b57"),
    "refer to a radiologist": colors.HexColor("#6c3483"),
}
TRACK, BAR = colors.HexColor("#e6e9ef"), colors.HexColor("#1f5fbf")
GRID = TableStyle(
    [
        ("GRID", (0, 0), (-1, -1), 0.3, colors.HexColor("#b0b7c3")),
        ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eef1f6")),
        ("VALIGN", (0, 0), (-1, -1), "MIDDLE"),
        ("FONTSIZE", (0, 0), (-1, -1), 8),
    ]
)


def _p(text: object, style: ParagraphStyle = BODY) -> Paragraph:
    return Paragraph(escape(str(text if text is not None else "")), style)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _page_decorator(title: str, notice: str, model_line: str) -> Callable[[Canvas, Any], None]:
    def draw(canvas: Canvas, doc: Any) -> None:
        # On every page, whatever the flowables did: the notice and the model version above the footer rule.
        width, _height = doc.pagesize
        canvas.saveState()
        canvas.setFillColor(colors.HexColor("#fff6dd"))
        canvas.rect(
            doc.leftMargin, 8 * mm, width - doc.leftMargin - doc.rightMargin, 9 * mm, stroke=0, fill=1
        )
        canvas.setFillColor(colors.black)
        canvas.setFont("Helvetica-Bold", 8)
        canvas.drawString(doc.leftMargin + 2 * mm, 13.5 * mm, notice)
        canvas.setFont("Helvetica", 7)
        canvas.drawString(doc.leftMargin + 2 * mm, 10 * mm, f"{title} · {model_line}")
        canvas.drawRightString(width - doc.rightMargin - 2 * mm, 10 * mm, f"page {doc.page}")
        canvas.restoreState()

    return draw


def _document(buf: io.BytesIO, *, title: str, pagesize: tuple[float, float]) -> SimpleDocTemplate:
    return SimpleDocTemplate(
        buf,
        pagesize=pagesize,
        leftMargin=12 * mm,
        rightMargin=12 * mm,
        topMargin=12 * mm,
        bottomMargin=22 * mm,  # room for the notice
        title=title,
        author="CXR screening",
    )


def _legend_table(legend: Sequence[tuple[str, str]]) -> Table:
    rows = [[_p("Band"), _p("Meaning")]] + [[_band_cell(band), _p(text, SMALL)] for band, text in legend]
    table = Table(rows, colWidths=[45 * mm, None], hAlign="LEFT")
    table.setStyle(GRID)
    return table


def _band_cell(band: str | None) -> Paragraph:
    if not band:
        return _p("")
    colour = BAND_COLOURS.get(band, colors.black).hexval()[2:]
    return Paragraph(f'<font color="#{colour}"><b>{escape(band)}</b></font>', BODY)


def _image(png: bytes | None, max_w: float, max_h: float) -> Flowable | str:
    if not png:
        return ""
    reader = ImageReader(io.BytesIO(png))
    w, h = reader.getSize()
    scale = min(max_w / w, max_h / h)
    return Image(io.BytesIO(png), width=w * scale, height=h * scale)


def batch_pdf(
    *,
    batch: Any,
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    progress: dict[str, Any],
    legend: Sequence[tuple[str, str]],
    thumbnails: dict[int, bytes],
    notice: str,
) -> bytes:
    """The batch report as a PDF: summary, band legend, then every study (needs-review-first order)."""
    buf = io.BytesIO()
    versions = sorted({r["model_version"] for r in rows if r.get("model_version")})
    model_line = "model " + (", ".join(versions) if versions else "none yet")
    title = f"Batch {batch.id}: {batch.name}"
    doc = _document(buf, title=title, pagesize=landscape(A4))
    story: list[Flowable] = [
        _p(title, H1),
        _p(f"Owner {batch.owner.username} · created {_when(batch.created_at)} · {model_line}"),
        _p(notice + " Every prediction must be reviewed by a qualified person.", BODY),
        _p("Summary", H2),
    ]
    seconds = summary.get("seconds")
    facts = [
        ["Studies", str(progress["total"])],
        ["Screened", str(progress["done"])],
        ["Failed", str(progress["failed"])],
        ["Reviewed", str(summary.get("reviewed", 0))],
        ["Time taken", f"{seconds:.0f} s" if seconds is not None else "still running"],
        ["Class mix", ", ".join(f"{k}: {v}" for k, v in sorted(summary["classes"].items())) or "none yet"],
    ]
    bands = [[_band_cell(b), str(n)] for b, n in summary["bands"].items()]
    facts_table = Table([[_p(a), _p(b)] for a, b in facts], colWidths=[30 * mm, 90 * mm], hAlign="LEFT")
    facts_table.setStyle(GRID)
    bands_table = Table([[_p("Band"), _p("Studies")]] + bands, colWidths=[50 * mm, 20 * mm], hAlign="LEFT")
    bands_table.setStyle(GRID)
    story.append(Table([[facts_table, bands_table]], hAlign="LEFT"))
    if summary["failures"]:
        story.append(_p("Failures", H2))
        fails = [[_p("Studies"), _p("Reason")]] + [
            [str(f["count"]), _p(f["reason"], SMALL)] for f in summary["failures"]
        ]
        table = Table(fails, colWidths=[18 * mm, None], hAlign="LEFT")
        table.setStyle(GRID)
        story.append(table)
    story += [_p("What the bands mean", H2), _legend_table(legend), _p("Studies, needs review first", H2)]
    header = ["#", "Preview", "File", "Class", "P(COVID-19)", "P(normal)", "P(pneumonia)", "Band", "Status"]
    header.append("Review")
    data: list[list[Any]] = [[_p(h) for h in header]]
    for r in rows:
        probs = [f"{r[k]:.3f}" if r[k] is not None else "" for k in ("p_covid", "p_normal", "p_pneumonia")]
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        review = ""
        if r.get("review_label"):
            review = f"{r['review_label']} ({'confirmed' if r['review_agrees'] else 'corrected'})"
        data.append(
            [
                str(r["study_id"]),
                _image(thumbnails.get(r["study_id"]), 16 * mm, 16 * mm),
                _p(r["file_name"], SMALL),
                r["predicted_class"] or "",
                *probs,
                _band_cell(r["triage"]),
                _p(status, SMALL),
                _p(review, SMALL),
            ]
        )
    widths = [12 * mm, 19 * mm, 62 * mm, 20 * mm, 20 * mm, 18 * mm, 21 * mm, 38 * mm, 30 * mm, 33 * mm]
    table = Table(data, colWidths=widths, repeatRows=1, hAlign="LEFT")
    table.setStyle(GRID)
    story.append(table)
    decorate = _page_decorator(title, notice, model_line)
    doc.build(story, onFirstPage=decorate, onLaterPages=decorate)
    return buf.getvalue()


class _Overlay(Flowable):
    """The image with the heat map drawn over it in the same box (alpha scaled to the given opacity)."""

    def __init__(self, base: bytes, heat: bytes, width: float, height: float, opacity: float = 0.55) -> None:
        super().__init__()
        self.base, self.width, self.height = base, width, height
        rgba = PILImage.open(io.BytesIO(heat)).convert("RGBA")
        alpha = rgba.getchannel("A").point(lambda a: int(a * opacity))
        rgba.putalpha(alpha)
        out = io.BytesIO()
        rgba.save(out, format="PNG")
        self.heat = out.getvalue()

    def draw(self) -> None:
        """Draw the image, then the heat map over it."""
        self.canv.drawImage(ImageReader(io.BytesIO(self.base)), 0, 0, self.width, self.height)
        self.canv.drawImage(ImageReader(io.BytesIO(self.heat)), 0, 0, self.width, self.height, mask="auto")


def _prob_bars(probs: Sequence[tuple[str, float]]) -> Drawing:
    drawing = Drawing(80 * mm, 8 * mm * len(probs))
    for i, (name, p) in enumerate(probs):
        y = (len(probs) - 1 - i) * 8 * mm + 2 * mm
        drawing.add(String(0, y + 1, name, fontSize=8))
        drawing.add(Rect(25 * mm, y, 45 * mm, 4 * mm, fillColor=colors.HexColor("#e6e9ef"), strokeWidth=0))
        drawing.add(
            Rect(25 * mm, y, 45 * mm * p, 4 * mm, fillColor=colors.HexColor("#1f5fbf"), strokeWidth=0)
        )
        drawing.add(String(72 * mm, y + 1, f"{p:.3f}", fontSize=8))
    return drawing


def study_pdf(
    *,
    row: dict[str, Any],
    batch: Any,
    image_png: bytes | None,
    heatmap_png: bytes | None,
    legend: Sequence[tuple[str, str]],
    dicom: Sequence[tuple[str, str]],
    notice: str,
) -> bytes:
    """One study as a PDF: the image and its heat map, probabilities, band and its meaning, review."""
    buf = io.BytesIO()
    model_line = f"model {row['model_version'] or 'none yet'}"
    title = f"Study {row['study_id']} · batch {batch.id}: {batch.name}"
    doc = _document(buf, title=title, pagesize=A4)
    story: list[Flowable] = [_p(title, H1), _p(f"File {row['file_name']} · {model_line}"), Spacer(1, 4 * mm)]
    if image_png:
        w, h = ImageReader(io.BytesIO(image_png)).getSize()
        scale = min(88 * mm / w, 110 * mm / h)
        left: Flowable | str = Image(io.BytesIO(image_png), width=w * scale, height=h * scale)
        right: Flowable | str = (
            _Overlay(image_png, heatmap_png, w * scale, h * scale) if heatmap_png else _p("No heat map.")
        )
        images = Table([[_p("Image"), _p("Grad-CAM heat map of the finding")], [left, right]], hAlign="LEFT")
        story.append(images)
    facts = [
        ["Status", row["status"] + (f": {row['error']}" if row.get("error") else "")],
        ["Finding", row["predicted_class"] or "—"],
    ]
    table = Table([[_p(a), _p(b)] for a, b in facts], colWidths=[35 * mm, 140 * mm], hAlign="LEFT")
    table.setStyle(GRID)
    story += [Spacer(1, 4 * mm), table]
    if row.get("triage"):
        meaning = dict(legend).get(row["triage"], "")
        story += [_p("Triage band", H2), _band_cell(row["triage"]), _p(meaning, SMALL)]
        probs = [("COVID-19", row["p_covid"]), ("normal", row["p_normal"]), ("pneumonia", row["p_pneumonia"])]
        story += [_p("Calibrated probabilities", H2), _prob_bars(probs)]
    if dicom:
        dtable = Table([[_p(a), _p(b)] for a, b in dicom], colWidths=[50 * mm, 60 * mm], hAlign="LEFT")
        dtable.setStyle(GRID)
        story += [_p("DICOM header", H2), dtable]
    if row.get("review_label"):
        verdict = "confirmed" if row["review_agrees"] else "corrected"
        text = f"{row['review_label']} ({verdict} by {row.get('reviewer') or 'unknown'})"
        story += [_p("Review", H2), _p(text), _p(row.get("review_note") or "", SMALL)]
    story.append(KeepTogether([_p("What the bands mean", H2), _legend_table(legend)]))
    decorate = _page_decorator(title, notice, model_line)
    doc.build(story, onFirstPage=decorate, onLaterPages=decorate)
    return buf.getvalue()
