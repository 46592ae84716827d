"""Label Studio sink: import mined frames as tasks with the best-match box as a prediction.

- The project is found by title (or id) or created with a bounding-box labeling config;
  classes it lacks are added to its config.
- Idempotent: every task carries ``data.dtm_key`` (from report and frame). Before
  importing, the project's keys are read from the server (the source of truth) and only
  missing items are sent, so a rerun, a retried task or overlapping runs never duplicate.
- Resumable: imports go in chunks (``chunk_size``, paced by ``min_interval_s``; Label
  Studio advises no more than one import every 30 s on big projects) and ``on_chunk`` is
  told each chunk that landed (the mining step keeps a ledger). A push cut off midway is
  resumed by the next attempt.
- Frame URIs: ``s3`` keeps ``s3://`` URIs, which Label Studio resolves through an S3
  source storage connected to the project (checked before importing); ``presign`` signs
  HTTPS URLs with boto3 instead. A URI Label Studio cannot resolve is a clear error.
- The API token is never logged, put in an error, or written anywhere.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import quoteattr

from dtm_ops.errors import DtmError
from dtm_ops.settings import env_number, number
from dtm_ops.sinks import PushResult

log = logging.getLogger(__name__)


class LabelingError(DtmError):
    """The labeling server refused or could not be reached; nothing after this chunk was sent."""


@dataclass(frozen=True)
class LabelStudioConfig:
    url: str = "http://127.0.0.1:8080"
    token: str | None = field(default=None, repr=False)
    project: str = "dtm-ops mining"  # title, or a numeric id
    frame_urls: str = "s3"  # s3 | presign
    chunk_size: int = 500
    min_interval_s: float = 0.0
    timeout_s: float = 30.0
    max_attempts: int = 3
    presign_expiry_s: int = 7 * 24 * 3600

    @classmethod
    def from_env(cls, env: dict | None = None) -> "LabelStudioConfig":
        e = os.environ if env is None else env
        return cls(
            url=e.get("DTM_LS_URL", cls.url),
            token=e.get("DTM_LS_TOKEN") or None,
            project=e.get("DTM_LS_PROJECT", cls.project),
            frame_urls=e.get("DTM_LS_FRAME_URLS", cls.frame_urls),
            chunk_size=env_number("DTM_LS_CHUNK_SIZE", cls.chunk_size, e, minimum=1),
            min_interval_s=env_number("DTM_LS_MIN_INTERVAL_S", cls.min_interval_s, e, whole=False),
        )

    @classmethod
    def from_connection(
        cls, host: str, password: str | None, extra: dict | None, source: str = "connection"
    ) -> "LabelStudioConfig":
        """From an Airflow connection (``source`` names it in errors): host = server URL,
        password = API token, extra = ``project``, ``frame_urls``, ``chunk_size``,
        ``min_interval_s``."""
        extra = extra or {}
        base = cls.from_env()
        return cls(
            url=host or base.url,
            token=password or extra.get("token") or base.token,
            project=str(extra.get("project", base.project)),
            frame_urls=extra.get("frame_urls", base.frame_urls),
            chunk_size=number(extra.get("chunk_size", base.chunk_size), source=source, field="extra.chunk_size",
                              minimum=1),
            min_interval_s=number(extra.get("min_interval_s", base.min_interval_s), source=source,
                                  field="extra.min_interval_s", whole=False),
        )


def label_config(labels: Sequence[str]) -> str:
    items = "".join(f"<Label value={quoteattr(label)}/>" for label in sorted(set(labels)))
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{items}</RectangleLabels></View>'
    )


class LabelStudioSink:
    name = "label_studio"

    def __init__(self, config: LabelStudioConfig) -> None:
        import requests

        if not config.token:
            raise LabelingError("Label Studio: no API token configured (connection password, or DTM_LS_TOKEN)")
        if config.frame_urls not in ("s3", "presign"):
            raise LabelingError(f"Label Studio: frame_urls must be 's3' or 'presign', got {config.frame_urls!r}")
        self.config = config
        self.url = config.url.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Token {config.token}"
        self._project: int | None = None

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, **kw):
        import requests

        for attempt in range(self.config.max_attempts):
            try:
                r = self.http.request(method, f"{self.url}{path}", timeout=self.config.timeout_s, **kw)
            except requests.RequestException as exc:
                if attempt + 1 == self.config.max_attempts:
                    raise LabelingError(
                        f"Label Studio at {self.url}: {method} {path} failed after {attempt + 1} attempts: {type(exc).__name__}"
                    ) from None
                time.sleep(min(5.0, 0.5 * 2**attempt))
                continue
            if r.status_code in (401, 403):
                raise LabelingError(
                    f"Label Studio at {self.url} rejected the API token ({r.status_code}); check the connection's token"
                )
            if r.status_code >= 500 and attempt + 1 < self.config.max_attempts:
                time.sleep(min(5.0, 0.5 * 2**attempt))
                continue
            if r.status_code >= 400:
                raise LabelingError(f"Label Studio at {self.url}: {method} {path}: {r.status_code} {r.text[:300]}")
            return r.json() if r.content else None
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ project
    def project_id(self, labels: Sequence[str] = ()) -> int:
        """The project's id (found or created); makes sure every label is in its config."""
        if self._project is None:
            p = self.config.project
            if str(p).isdigit():
                proj = self._request("GET", f"/api/projects/{p}")
            else:
                found = [x for x in self._request("GET", "/api/projects", params={"title": p, "page_size": 100})["results"]
                         if x["title"] == p]
                proj = found[0] if found else self._request(
                    "POST", "/api/projects", json={"title": p, "label_config": label_config(labels or ["object"])}
                )
            self._project = int(proj["id"])
            self._labels = set(_config_labels(proj.get("label_config", "")))
        missing = set(labels) - self._labels
        if missing:
            self._labels |= missing
            self._request("PATCH", f"/api/projects/{self._project}", json={"label_config": label_config(sorted(self._labels))})
        return self._project

    def existing_keys(self, keys: Sequence[str] = ()) -> set[str]:
        """``dtm_key`` of every task in the project."""
        return set(self._task_ids())

    def _task_ids(self) -> dict[str, int]:
        """Task id by ``dtm_key``, for every task in the project (paged)."""
        pid = self.project_id()
        have: dict[str, int] = {}
        page = 1
        while True:
            try:
                j = self._request("GET", "/api/tasks", params={"project": pid, "page": page, "page_size": 1000, "fields": "all"})
            except LabelingError as exc:
                if " 404 " in str(exc):  # past the last page
                    break
                raise
            tasks = j.get("tasks", []) if isinstance(j, dict) else j
            have |= {t["data"]["dtm_key"]: int(t["id"]) for t in tasks if t.get("data", {}).get("dtm_key")}
            if len(tasks) < 1000:
                break
            page += 1
        return have

    # ------------------------------------------------------------------ frames
    def _connected_buckets(self) -> set[str]:
        storages = self._request("GET", "/api/storages/s3", params={"project": self.project_id()}) or []
        return {s.get("bucket") for s in storages}

    def resolve(self, tasks: Sequence[dict]) -> list[dict]:
        """Tasks with frame URIs Label Studio can open; raises naming the first that it cannot."""
        if self.config.frame_urls == "presign":
            from dtm_ops.store.objects import default_s3_config

            client = default_s3_config().client()
        else:
            buckets = self._connected_buckets()
        out = []
        for t in tasks:
            uri = t["data"]["image"]
            if uri.startswith(("http://", "https://")):
                out.append(t)
                continue
            if not uri.startswith("s3://"):
                raise LabelingError(
                    f"task {t['data']['dtm_key']}: frame {uri!r} is a local path, which Label Studio cannot open; "
                    "keep frames in S3 (s3:// URIs) or serve them over HTTP"
                )
            bucket, _, key = uri[5:].partition("/")
            if self.config.frame_urls == "presign":
                url = client.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.config.presign_expiry_s
                )
                out.append({**t, "data": {**t["data"], "image": url, "frame_uri": uri}})
            elif bucket not in buckets:
                raise LabelingError(
                    f"task {t['data']['dtm_key']}: frame {uri!r} cannot be resolved by Label Studio: bucket {bucket!r} is "
                    f"not connected to project {self.config.project!r} as S3 storage (connect it, or use frame_urls=presign)"
                )
            else:
                out.append(t)
        return out

    # ------------------------------------------------------------------ push
    def push(self, tasks: Sequence[dict], on_chunk: Callable[[list[str]], None] | None = None) -> PushResult:
        labels = {r["value"]["rectanglelabels"][0] for t in tasks for p in t.get("predictions", []) for r in p["result"]}
        pid = self.project_id(sorted(labels))
        have = self._task_ids()
        todo = self.resolve([t for t in tasks if t["data"]["dtm_key"] not in have])
        ids = dict(have)
        missing = False
        pushed: list[str] = []
        last = 0.0
        for start in range(0, len(todo), self.config.chunk_size):
            chunk = todo[start : start + self.config.chunk_size]
            wait = self.config.min_interval_s - (time.monotonic() - last)
            if last and wait > 0:
                time.sleep(wait)
            reply = self._request("POST", f"/api/projects/{pid}/import", params={"return_task_ids": "true"}, json=chunk)
            last = time.monotonic()
            keys = [t["data"]["dtm_key"] for t in chunk]
            created = (reply or {}).get("task_ids") or []
            if len(created) == len(keys):  # created in the order sent
                ids.update(zip(keys, map(int, created)))
            else:  # an import the server ran asynchronously: read the ids back at the end
                missing = True
            pushed += keys
            log.info("Label Studio project %s: imported %d tasks (%d/%d)", pid, len(chunk), len(pushed), len(todo))
            if on_chunk:
                on_chunk(keys)
        keys = {t["data"]["dtm_key"] for t in tasks}
        if missing:
            ids = self._task_ids()
        links = {k: f"{self.url}/projects/{pid}/data?task={i}" for k, i in ids.items() if k in keys}
        return PushResult(pushed=pushed, skipped=sorted(set(have) & keys), links=links)


def _config_labels(config: str) -> list[str]:
    import re

    return re.findall(r'<Label\s+value="([^"]*)"', config)
