"""Pictures of an evaluation: P@K by ROI-area bucket, and a contact sheet of the worst queries.

Drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from dtm_ops.evaluation.metrics import KS
from dtm_ops.evaluation.sets import BUCKETS, EvalSet

COLORS = {"dtm": (220, 50, 47), "global-avg": (38, 139, 210), "global-gem": (108, 113, 196), "roi-pooled": (133, 153, 0),
          "roi>dtm": (203, 75, 22), "dtm+roi": (211, 54, 130)}


def precision_plot(summary: list[dict], methods, path: Path, *, title: str = "") -> None:
    """One panel per K: bars of mean P@K per ROI-area bucket, one bar per method."""
    buckets = [b[0] for b in BUCKETS if any(r["bucket"] == b[0] for r in summary)]
    pw, ph, pad = 420, 300, 50
    img = Image.new("RGB", (pad + len(KS) * (pw + pad), ph + 2 * pad + 20 * (len(methods) // 3 + 2)), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 10), f"{title}: precision@K by query ROI area (share of the frame)", fill="black")
    val = {(r["method"], r["bucket"]): r for r in summary}
    for p, k in enumerate(KS):
        x0, y0 = pad + p * (pw + pad), pad
        d.rectangle((x0, y0, x0 + pw, y0 + ph), outline="black")
        for t in range(0, 11, 2):
            y = y0 + ph - t / 10 * ph
            d.line((x0 - 4, y, x0, y), fill="black")
            d.text((x0 - 28, y - 6), f"{t / 10:.1f}", fill="black")
        d.text((x0 + pw // 2 - 20, y0 - 16), f"P@{k}", fill="black")
        gw = pw / max(1, len(buckets))
        bw = (gw - 16) / max(1, len(methods))
        for b, bucket in enumerate(buckets):
            gx = x0 + b * gw + 8
            d.text((gx + 4, y0 + ph + 6), bucket, fill="black")
            for m, method in enumerate(methods):
                r = val.get((method, bucket))
                if r is None:
                    continue
                v = r[f"P@{k}"]
                d.rectangle((gx + m * bw, y0 + ph - v * ph, gx + (m + 1) * bw - 2, y0 + ph), fill=COLORS.get(method, (90, 90, 90)))
    ly = pad + ph + 30
    for m, method in enumerate(methods):
        lx = pad + (m % 3) * 220
        yy = ly + (m // 3) * 18
        d.rectangle((lx, yy, lx + 12, yy + 12), fill=COLORS.get(method, (90, 90, 90)))
        d.text((lx + 18, yy), method, fill="black")
    img.save(path)


def worst_sheet(es: EvalSet, rows: list[dict], rankings: dict, path: Path, *, method: str = "dtm", queries: int = 6,
                hits: int = 6) -> None:
    """The queries with DTM's lowest AP: the query crop, then its first hits (green frame:
    relevant; red: not) with DTM's box. Writes ``path`` (HTML) and ``path.png``."""
    mine = sorted((r for r in rows if r["method"] == method and r["relevant"]), key=lambda r: (r["AP"], r["query_id"]))[:queries]
    if not mine:
        return
    frames = {f.frame_id: f for f in es.frames}
    by_id = {q.query_id: q for q in es.queries}
    tw, th = 200, 150
    sheet = Image.new("RGB", ((hits + 1) * (tw + 6), len(mine) * (th + 24)), "white")
    d = ImageDraw.Draw(sheet)
    for i, r in enumerate(mine):
        q = by_id[r["query_id"]]
        y = i * (th + 24)
        crop = Image.open(es.path(q.image)).convert("RGB").crop(tuple(round(v) for v in q.box))
        crop.thumbnail((tw, th))
        sheet.paste(crop, (0, y))
        d.text((0, y + th + 4), f"{q.query_id} AP {r['AP']:.2f}", fill="black")
        for j, (fid, box) in enumerate(rankings[(q.query_id, method)][:hits]):
            f = frames[fid]
            im = Image.open(es.path(f.image)).convert("RGB")
            sx, sy = tw / im.width, th / im.height
            im = im.resize((tw, th))
            dd = ImageDraw.Draw(im)
            if box is not None:
                dd.rectangle((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), outline=(0, 229, 255), width=2)
            ok = q.cls in f.classes()
            dd.rectangle((0, 0, tw - 1, th - 1), outline=(0, 170, 0) if ok else (220, 0, 0), width=4)
            x = (j + 1) * (tw + 6)
            sheet.paste(im, (x, y))
            d.text((x, y + th + 4), fid[-28:], fill="black")
    png = path.with_suffix(".png")
    sheet.save(png)
    rows_html = "".join(f"<li>{r['query_id']} ({r['class']}, {r['area'] * 100:.2f}% of the frame): AP {r['AP']:.3f}, "
                        f"P@10 {r['P@10']:.2f}</li>" for r in mine)
    path.write_text(f"<!doctype html><meta charset='utf-8'><title>worst queries</title><h1>Worst queries ({method})</h1>"
                    f"<ul>{rows_html}</ul><img src='{png.name}' alt='worst queries'>")
