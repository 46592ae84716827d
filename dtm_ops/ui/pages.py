"""HTML of the results view: a run overview and one page per query.

Plain server-rendered HTML (no scripts): it works inside the Airflow UI's iframe and on its
own. Every value from a run's files is escaped. Links are absolute paths under ``base``,
the run's root in the plugin app (``<root_path>/runs/<dag_id>/<run_id>``).
"""

from __future__ import annotations

import html
from urllib.parse import quote

from dtm_ops.ui.results import QueryPage

e = html.escape

_STYLE = (
    "body{font:14px system-ui,sans-serif;margin:1.2em;background:#fafafa;color:#1a1a1a}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}"
    "th{background:#eee}.num{text-align:right}.bad{color:#b00020}.ok{color:#1b5e20}"
    ".grid{display:flex;flex-wrap:wrap;gap:12px}.hit{margin:0;width:360px}"
    ".frame{position:relative;line-height:0}.frame img{width:100%;display:block;border-radius:3px}"
    ".box{position:absolute;border:2px solid #00e5ff;box-sizing:border-box;pointer-events:none}"
    "figcaption{font-size:12px;color:#333;padding:4px 0}.query img{max-width:720px;width:100%}"
    "code{color:#0b4f8a}nav a{margin-right:1em}.cards{display:flex;gap:1em;flex-wrap:wrap}"
    ".card{background:#fff;border:1px solid #ddd;border-radius:4px;padding:.6em 1em}.card b{font-size:20px;display:block}"
)


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{body}</body></html>")


def _fmt(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else e(str(v))


def query_url(base: str, query_id: str, page: int | None = None) -> str:
    url = f"{base}/queries/{quote(query_id, safe='')}"
    return f"{url}?page={page}" if page else url


def overview(base: str, dag_id: str, run_id: str, data: dict, tasks: list[dict] | None) -> str:
    """The run overview. ``tasks``: the run's task instances (task_id, map_index, state,
    try_number, start_date, duration) from Airflow's database, when available."""
    ledger = data.get("ledger") or {}
    summary = data.get("summary") or {}
    cards = [
        ("reports", data["reports"]),
        ("valid queries", len(data["queries"])),
        ("quarantined", len(data["quarantine"])),
        ("hits", data["hits"]),
    ]
    if ledger:
        if ledger.get("dry_run"):
            cards.append(("would push (dry run)", len(ledger.get("would_push", []))))
        else:
            cards += [(f"pushed to {ledger.get('sink')}", len(ledger.get("pushed", []))),
                      ("already queued", len(ledger.get("already", [])))]
    parts = [
        f"<h1>Mining run <code>{e(run_id)}</code></h1>",
        f"<p>DAG <code>{e(dag_id)}</code> &middot; results in <code>{e(data['run'])}</code>"
        + ("" if summary else " &middot; <i>report not published yet</i>") + "</p>",
        "<div class='cards'>" + "".join(f"<div class='card' data-count='{e(k)}'><b>{v}</b>{e(k)}</div>" for k, v in cards)
        + "</div>",
        "<h2>Queries</h2><table id='queries'><tr><th>query</th><th>class</th><th>error</th><th>ROIs</th>"
        "<th class='num'>hits</th><th class='num'>best score</th><th>frame</th></tr>",
    ]
    for q in data["queries"]:
        parts.append(
            f"<tr><td><a href='{e(query_url(base, q['report_id']))}'>{e(q['report_id'])}</a></td>"
            f"<td>{e(str(q.get('class')))}</td><td>{e(str(q.get('error_type', '')))}</td><td class='num'>{len(q.get('boxes', []))}</td>"
            f"<td class='num'>{q['hits']}</td><td class='num'>{_fmt(q['best_score'])}</td><td><code>{e(q.get('frame_uri', ''))}</code></td></tr>"
        )
    parts.append("</table>")
    parts.append(f"<h2>Quarantine ({len(data['quarantine'])})</h2>")
    if data["quarantine"]:
        parts.append("<table id='quarantine'><tr><th>record</th><th>reasons</th></tr>")
        for q in data["quarantine"]:
            parts.append(f"<tr><td><code>{e(str(q.get('origin')))}</code></td><td class='bad'>{e('; '.join(q.get('reasons', [])))}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='ok'>No record quarantined.</p>")
    check = data.get("results_validation")
    parts.append("<h2>Results validation</h2>")
    if check is None:
        parts.append("<p>Not run yet.</p>")
    elif check.get("success"):
        parts.append("<p class='ok'>Passed: the results were cleared for the push.</p>")
    else:
        parts.append("<p class='bad'>Failed, nothing pushed:</p><ul>"
                     + "".join(f"<li>{e(p)}</li>" for p in check.get("problems", [])) + "</ul>")
    if tasks is not None:
        parts.append("<h2>Tasks</h2><table id='tasks'><tr><th>task</th><th class='num'>map index</th><th>state</th>"
                     "<th class='num'>try</th><th>start</th><th class='num'>duration (s)</th></tr>")
        for t in tasks:
            mi = "" if t.get("map_index", -1) < 0 else t["map_index"]
            parts.append(
                f"<tr><td>{e(t['task_id'])}</td><td class='num'>{mi}</td><td>{e(str(t.get('state')))}</td>"
                f"<td class='num'>{t.get('try_number', '')}</td><td>{e(str(t.get('start_date') or ''))}</td>"
                f"<td class='num'>{_fmt(t.get('duration'), 1)}</td></tr>"
            )
        parts.append("</table>")
    return _page(f"dtm run {run_id}", "".join(parts))


def query_page(base: str, run_id: str, qp: QueryPage) -> str:
    """One query: its frame with the ROIs, then its hits in rank order with box, heat map,
    score, scale, sequence, frame id and push status."""
    q = qp.query
    nav = [f"<a href='{e(base)}'>&larr; run overview</a>"]
    if qp.page > 1:
        nav.append(f"<a rel='prev' href='{e(query_url(base, q['report_id'], qp.page - 1))}'>previous</a>")
    if qp.page < qp.pages:
        nav.append(f"<a rel='next' href='{e(query_url(base, q['report_id'], qp.page + 1))}'>next</a>")
    boxes = "; ".join("[" + ", ".join(f"{v:.0f}" for v in b) + "]" for b in q.get("boxes", []))
    parts = [
        f"<nav>{''.join(nav)}</nav>",
        f"<h1>Query <code>{e(q['report_id'])}</code>: {e(str(q.get('class')))}</h1>",
        f"<p>{e(str(q.get('error_type', '')))} &middot; ROIs {e(boxes)} &middot; <code>{e(q.get('frame_uri', ''))}</code> "
        f"&middot; run <code>{e(run_id)}</code></p>",
    ]
    if qp.image:
        parts.append(f"<div class='query'><img src='{e(base)}/images/{e(qp.image)}' alt='query frame'></div>")
    first = (qp.page - 1) * qp.per_page + 1
    last = first + len(qp.hits) - 1
    parts.append(f"<h2>Hits {first if qp.hits else 0}&ndash;{last if qp.hits else 0} of {qp.total} "
                 f"(page {qp.page} of {qp.pages})</h2><div class='grid' id='hits'>")
    for h in qp.hits:
        parts.append(_hit(base, h))
    parts.append("</div>")
    return _page(f"dtm query {q['report_id']}", "".join(parts))


def _hit(base: str, h: dict) -> str:
    x1, y1, x2, y2 = h["box"]
    size = h.get("frame_size")
    if h.get("thumb"):
        img = f"<a href='{e(base)}/images/{e(h['heatmap'])}'><img class='thumb' src='{e(base)}/images/{e(h['thumb'])}' alt='rank {h['rank']}'></a>"
    elif h.get("image_error"):  # deleted or damaged since it was indexed
        img = f"<i>frame unreadable: {e(h['image_error'])}</i>"
    else:
        img = "<i>image not rendered yet</i>"
    box = ""
    if size:  # the best-match box over the thumbnail, in percent of the frame
        w, h_ = size
        box = (f"<div class='box' style='left:{100 * x1 / w:.3f}%;top:{100 * y1 / h_:.3f}%;"
               f"width:{100 * (x2 - x1) / w:.3f}%;height:{100 * (y2 - y1) / h_:.3f}%'></div>")
    link = f" <a href='{e(h['link'])}' target='_blank'>open</a>" if (h.get("link") or "").startswith(("http://", "https://")) else ""
    return (
        f"<figure class='hit' data-rank='{h['rank']}' data-frame-id='{e(h['frame_id'])}' "
        f"data-box='{x1},{y1},{x2},{y2}' data-frame-size='{'' if not size else f'{size[0]},{size[1]}'}'>"
        f"<div class='frame'>{img}{box}</div>"
        f"<figcaption>#{h['rank']} <b>{e(h['frame_id'])}</b> score {h['score']:.2f} (cos {h['cosine']:.3f}), "
        f"scale {h['scale']:g}<br>sequence <code>{e(str(h['sequence']))}</code> frame {h['index']} &middot; "
        f"box [{', '.join(f'{v:.0f}' for v in h['box'])}]<br>labeling: <span class='push'>{e(h['push'])}</span>{link}"
        "</figcaption></figure>"
    )
