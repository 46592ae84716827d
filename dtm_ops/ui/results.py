"""What the results view shows of one mining run, read from its run folder.

No Airflow and no web framework here: :mod:`dtm_ops.ui.app` serves these values, and tests
read them directly. Everything comes from files the run's tasks wrote (see
:mod:`dtm_ops.mining`); a run still in progress shows what exists so far.

Images are served only from the run's rendered report (``report/``), by names that match
what :func:`dtm_ops.report.write_results` writes; anything else is refused before it
reaches the filesystem or S3.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dtm_ops.errors import DtmError
from dtm_ops.mining import RunFolder
from dtm_ops.store.objects import ObjectNotFound, check_key

# heatmaps/<query>/<rank>.png, queries/<query>.png, and their thumbs/... .jpg
_NAME = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}"
IMAGE_PATH = re.compile(
    rf"^(?:(?:heatmaps/{_NAME}/\d{{4}}|queries/{_NAME})\.png|thumbs/(?:heatmaps/{_NAME}/\d{{4}}|queries/{_NAME})\.jpg)$"
)
MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg"}
MAX_PER_PAGE = 200


class NotFound(DtmError):
    """No such run, query or image."""


class BadRequest(DtmError):
    """A parameter the view refuses (a bad path, a bad page)."""


@dataclass(frozen=True)
class QueryPage:
    query: dict  # the report: report_id, class, boxes, frame_uri, ...
    image: str | None  # the query frame with its ROIs (report-relative), once the report is published
    hits: list[dict]  # this page's hits in rank order, each with its push status
    total: int
    page: int
    per_page: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))


class RunResults:
    """One run's results, as the view needs them."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run

    def _lines(self, key: str) -> list[dict] | None:
        try:
            return self.run.get_lines(key)
        except ObjectNotFound:
            return None

    def _json(self, key: str):
        try:
            return self.run.get_json(key)
        except ObjectNotFound:
            return None

    def exists(self) -> bool:
        """Whether the run got as far as writing its reports (a size check, no read)."""
        return self.run.objects.size("reports/raw.jsonl") is not None

    def hits(self) -> list[dict]:
        """Every hit, best first per query: the report's copy (with image paths and frame
        sizes) once published, else the merged results."""
        rows = self._lines("report/results.jsonl")
        return rows if rows is not None else (self._lines("results.jsonl") or [])

    def push_status(self) -> tuple[dict | None, dict[str, str]]:
        """The push ledger and each item key's status (``pushed``, ``already queued``,
        ``would push`` in a dry run)."""
        ledger = self._json("push/ledger.json")
        status: dict[str, str] = {}
        if ledger:
            status |= {k: "would push (dry run)" for k in ledger.get("would_push", [])}
            status |= {k: "already queued" for k in ledger.get("already", [])}
            status |= {k: "pushed" for k in ledger.get("pushed", [])}
        return ledger, status

    def overview(self) -> dict:
        """Queries with their hit counts and best scores, validation, quarantine and push."""
        raw = self._lines("reports/raw.jsonl")
        if raw is None:
            raise NotFound(f"no mining results for this run (nothing in {self.run.uri})")
        queries = self._lines("reports/valid.jsonl") or []
        hits = self.hits()
        per_query: dict[str, list[dict]] = {}
        for h in hits:
            per_query.setdefault(h["query_id"], []).append(h)
        ledger, _ = self.push_status()
        return {
            "run": self.run.uri,
            "queries": [
                {**q, "hits": len(per_query.get(q["report_id"], [])),
                 "best_score": max((h["score"] for h in per_query.get(q["report_id"], [])), default=None)}
                for q in queries
            ],
            "reports": len(raw),
            "quarantine": self._lines("reports/quarantine.jsonl") or [],
            "results_validation": self._json("validation/results.json"),
            "ledger": ledger,
            "summary": self._json("report/summary.json"),
            "hits": len(hits),
        }

    def query(self, query_id: str, page: int = 1, per_page: int = 24) -> QueryPage:
        """One query's hits, ``per_page`` at a time (pages count from 1)."""
        from dtm_ops.report import safe_name, thumb_of
        from dtm_ops.sinks import item_key

        if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
            raise BadRequest(f"page must be >= 1 and per_page in 1..{MAX_PER_PAGE}")
        queries = {q["report_id"]: q for q in self._lines("reports/valid.jsonl") or []}
        if query_id not in queries:
            raise NotFound(f"no query {query_id!r} in this run")
        hits = [h for h in self.hits() if h["query_id"] == query_id]
        ledger, status = self.push_status()
        start = (page - 1) * per_page
        if start and start >= len(hits):
            raise NotFound(f"page {page} is past the last hit ({len(hits)} hits)")
        links = (ledger or {}).get("links", {})
        rows = []
        for h in hits[start : start + per_page]:
            key = item_key(h["query_id"], h["frame_id"])
            rows.append({**h, "push": status.get(key, "not pushed"), "link": links.get(key)})
        published = self.run.objects.size("report/summary.json") is not None
        image = thumb_of(f"queries/{safe_name(query_id)}.png") if published else None
        return QueryPage(query=queries[query_id], image=image, hits=rows, total=len(hits), page=page, per_page=per_page)

    def image(self, path: str) -> tuple[bytes, str]:
        """Bytes and media type of a rendered image of the report (``heatmaps/...``,
        ``queries/...`` or their ``thumbs/...``)."""
        if not IMAGE_PATH.match(path) or ".." in path:
            raise BadRequest(f"not an image of the run report: {path!r}")
        try:
            return self.run.objects.get(check_key(f"report/{path}")), MEDIA_TYPES[path.rsplit(".", 1)[1]]
        except ObjectNotFound:
            raise NotFound(f"no image {path!r} in this run's report") from None
