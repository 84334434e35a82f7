"""Write an audit (``classify.audit``) as ``audit.json`` and one self-contained ``audit.html``.

The page needs no server and no other file: thumbnails are embedded as ``data:`` URIs (JPEG,
``THUMB_PX`` px), styles are inline. At most ``SHOWN_GROUPS`` duplicate groups get thumbnails
(the JSON lists them all).
"""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path

from PIL import Image, ImageOps

from classify.duplicates import EVIDENCE
from classify.label_checks import leak_effect_sentence
from edge.imageio import strict_json

THUMB_PX = 112
SHOWN_GROUPS = 150

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.5em}h2{margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.group{border:1px solid #ccc;border-radius:6px;padding:6px;
margin:6px 0}.leak{border-color:#d77}.conflict{background:#fff4f4}.tile{display:inline-block;width:%dpx;
margin:3px;vertical-align:top;font-size:11px;word-break:break-all}.tile img{width:%dpx;height:%dpx;
object-fit:contain;background:#eee}.flag{color:#b00;font-weight:bold}
""" % (THUMB_PX, THUMB_PX, THUMB_PX)


def thumbnail_uri(path: Path) -> str | None:
    """A small JPEG of ``path`` as a data: URI (None when the file cannot be read)."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB_PX, THUMB_PX))
            img = ImageOps.exif_transpose(img) or img
            img = img.convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            img.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _Thumbs:
    def __init__(self, root: str | None, enabled: bool):
        self.root = Path(root) if root and enabled else None
        self.cache: dict[str, str | None] = {}

    def tile(self, image: dict, caption: str) -> str:
        path = image["path"]
        if self.root is not None and path not in self.cache:
            self.cache[path] = thumbnail_uri(self.root / path)
        uri = self.cache.get(path)
        picture = f'<img src="{uri}" alt="{escape(path)}">' if uri else ""
        return f'<div class="tile">{picture}<br>{escape(path)}<br>{caption}</div>'


def _summary_html(report: dict) -> str:
    s = report["summary"]
    lines = [f"{report['images']} images, {len(report['classes'])} classes, {report['backbone']} features",
             f"{s['duplicate_groups']} duplicate groups ({s['images_in_groups']} images), "
             f"<span class=flag>{s['leak_groups']} across splits</span>, "
             f"<span class=flag>{s['label_conflict_groups']} with conflicting labels</span>",
             f"{s['test_images_with_train_copy']} test images have a copy in train",
             f"out-of-fold accuracy of the linear head: {s['out_of_fold_accuracy']:.3f}"
             if s["out_of_fold_accuracy"] is not None else "too few distinct images to look for mislabels",
             f"{s['outliers']} outliers; audit took {s['seconds']} s"]
    if not report["image_files_read"]:
        lines.append("image files not found: no pixel comparison, no aligned pictures, no thumbnails (identical files from the stored hashes)")
    effect = report.get("leak_effect")
    if effect:
        lines.append(f"{escape(leak_effect_sentence(effect))} ({escape(effect['head'])})")
    return "<ul>" + "".join(f"<li>{line}</li>" for line in lines) + "</ul>"


def _groups_html(report: dict, thumbs: _Thumbs) -> str:
    parts = []
    for k, group in enumerate(report["duplicate_groups"][:SHOWN_GROUPS], 1):
        flags = (["<span class=flag>leak</span>"] if group["leak"] else []) + \
                (["<span class=flag>label conflict</span>"] if group["label_conflict"] else [])
        css = "group" + (" leak" if group["leak"] else "") + (" conflict" if group["label_conflict"] else "")
        tiles = "".join(thumbs.tile(image, f"{escape(image['label'])} · {image['split']}") for image in group["images"])
        evidence = ", ".join(f"{kind} {value}" for kind, value in group["similarity_by_evidence"].items())
        parts.append(f'<div class="{css}"><b>group {k}</b> {" ".join(flags)} evidence: {evidence}<br>{tiles}</div>')
    hidden = len(report["duplicate_groups"]) - SHOWN_GROUPS
    if hidden > 0:
        parts.append(f"<p>... and {hidden} more groups in audit.json</p>")
    return _legend(report) + "".join(parts) if parts else "<p>none found</p>"


def _legend(report: dict) -> str:
    """What each kind of evidence in the groups means and what its number measures."""
    used = sorted({kind for group in report["duplicate_groups"] for kind in group["evidence"]})
    items = "".join(f"<li><b>{kind}</b>: {escape(EVIDENCE[kind])}</li>" for kind in used)
    return f"<p>Evidence, with the best pair's number in the group:</p><ul>{items}</ul>"


def _suspects_html(report: dict, thumbs: _Thumbs) -> str:
    tiles = [thumbs.tile(row, f"label <b>{escape(row['label'])}</b> ({row['p_label']:.2f})<br>suggested "
                              f"<b>{escape(row['suggested'])}</b> ({row['p_suggested']:.2f}) · {row['split']}")
             for row in report["mislabel_suspects"]]
    return "".join(tiles) or "<p>none: every image's label is its most probable class</p>"


def _outliers_html(report: dict, thumbs: _Thumbs) -> str:
    section = report["outliers"]
    tiles = [thumbs.tile(row, f"{escape(row['label'])} · {row['split']}<br>nearest class "
                              f"{row['nearest_class_similarity']:.2f}") for row in section["images"]]
    cut = f"<p>cosine to the nearest class mean below {section['similarity_cut']}</p>"
    return cut + ("".join(tiles) or "<p>none</p>")


def _balance_html(report: dict) -> str:
    head = "<tr><th class=l>class</th><th>total</th><th>train</th><th>validation</th><th>test</th></tr>"
    rows = "".join(f"<tr><td class=l>{escape(r['class'])}</td><td>{r['total']}</td><td>{r['train']}</td>"
                   f"<td>{r['validation']}</td><td>{r['test']}</td></tr>" for r in report["class_balance"])
    return f"<table>{head}{rows}</table>"


def render_html(report: dict, thumbnails: bool = True) -> str:
    thumbs = _Thumbs(report.get("images_root"), thumbnails and report["image_files_read"])
    sections = [
        ("Summary", _summary_html(report)),
        ("Duplicate groups", _groups_html(report, thumbs)),
        (f"Top {len(report['mislabel_suspects'])} mislabel suspects", _suspects_html(report, thumbs)),
        ("Outliers", _outliers_html(report, thumbs)),
        ("Class balance", _balance_html(report)),
    ]
    body = "".join(f"<h2>{title}</h2>{content}" for title, content in sections)
    title = f"Audit of {escape(report.get('store', 'a feature store'))}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>{body}</body></html>\n")


def write_report(report: dict, report_dir: str | Path, thumbnails: bool = True) -> list[str]:
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "audit.json", out / "audit.html"]
    report = {**report, "files": [str(f) for f in files]}
    files[0].write_text(strict_json(report, indent=1) + "\n", encoding="utf-8")
    files[1].write_text(render_html(report, thumbnails), encoding="utf-8")
    return [str(f) for f in files]
