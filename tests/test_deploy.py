"""The deployment files, checked without a container engine (none runs here): the compose
file's services, health checks, volumes, queues and secrets, the images' pins against the
repository's, and the bound on mapped scan tasks however large the lake."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from dtm_ops.mining import group_shards
from dtm_ops.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
LONG_RUNNING = {"postgres", "redis", "s3", "label-studio", "api-server", "scheduler", "dag-processor", "triggerer",
                "worker-cpu", "worker-gpu"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_has_every_service_with_a_health_check_and_named_volumes(compose):
    services = compose["services"]
    assert LONG_RUNNING | {"airflow-init"} == set(services)
    for name in LONG_RUNNING:
        assert "healthcheck" in services[name], f"{name} has no health check"
        assert services[name].get("restart") == "unless-stopped", name
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "/"))}
    assert used == set(compose["volumes"]), "every volume is named and declared"
    for name in ("api-server", "scheduler", "dag-processor", "triggerer", "worker-cpu", "worker-gpu"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_celery_workers_serve_the_queues_the_dags_route_to(compose):
    s = Settings.from_env()
    services = compose["services"]
    env = services["scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://") and "@redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"]
    assert "@postgres:5432/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    gpu_cmd, cpu_cmd = services["worker-gpu"]["command"], services["worker-cpu"]["command"]
    assert gpu_cmd[gpu_cmd.index("--queues") + 1] == s.gpu_queue
    assert cpu_cmd[cpu_cmd.index("--queues") + 1] == "default"
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    init = " ".join(services["airflow-init"]["command"])
    assert f"pools set {s.gpu_pool} " in init


def test_secrets_are_required_from_the_environment_never_written_in(compose):
    text = (DOCKER / "compose.yaml").read_text()
    for var in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "FERNET_KEY", "JWT_SECRET", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
        assert f"${{{var}:?" in text, f"{var} must be required (${{{var}:?...}})"
    example = (DOCKER / "example.env").read_text()
    assert all(line.endswith(("change-me", "change-me-at-least-8-chars", "=", "8080"))
               for line in example.splitlines() if line and not line.startswith("#"))


def test_images_are_pinned_and_install_the_repositorys_pins():
    pyproject = (REPO / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([\d.]+)"', pyproject).group(1)
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), f"{name}: unpinned base image {base}"
        assert f"torch=={torch_pin}" in text
        assert "-r requirements.lock" in text
        for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
            for path in src.split():
                assert (REPO / path).exists(), f"{name} copies {path}, which is not in the repository"
        assert "USER airflow" in text
    for svc in yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"].values():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"unpinned image {image}"


def test_mapped_scan_tasks_stay_bounded_as_the_lake_grows():
    """A lake of 10 million frames in 256-frame shards still maps to at most the configured
    number of scan tasks, balanced to within one shard's bytes."""
    for frames in (1_000, 100_000, 10_000_000):
        n_shards = -(-frames // 256)
        sizes = [256 * 30_000 + (k * 7919) % 5000 for k in range(n_shards)]
        t0 = time.perf_counter()
        groups = group_shards(sizes, 64)
        took = time.perf_counter() - t0
        assert len(groups) == min(64, n_shards)
        assert sorted(k for g in groups for k in g) == list(range(n_shards))
        loads = [sum(sizes[k] for k in g) for g in groups]
        # largest-first into the lightest group: no group carries more than one shard over another
        assert max(loads) - min(loads) <= max(sizes)
        print(f"{frames:>10} frames, {n_shards:>6} shards -> {len(groups)} tasks (planned in {took * 1000:.0f} ms)")


def test_workers_keep_the_matchers_picks_in_a_volume_the_image_prepares(compose, monkeypatch):
    """A recreated worker container reads the method picks its predecessors timed
    (``dtm_ops/picks.py``) instead of timing every method again in each mapped task: both
    images point ``DTM_PICK_CACHE`` at a folder the airflow user owns, and both workers mount
    a named volume there (a fresh named volume takes the folder's owner from the image)."""
    from dtm_ops import picks

    folders = set()
    for name in ("Dockerfile", "Dockerfile.gpu"):
        text = (DOCKER / name).read_text()
        folder = re.search(r"^\s+DTM_PICK_CACHE=(\S+?)\s*\\?$", text, re.M).group(1)
        setup = text[:text.index("USER airflow")]
        assert re.search(r'mkdir -p [^\n]*"\$DTM_PICK_CACHE"', setup), f"{name}: the pick folder is not made"
        assert re.search(r'chown -R airflow [^\n]*"\$DTM_PICK_CACHE"', setup), f"{name}: not the airflow user's"
        folders.add(folder)
    assert len(folders) == 1, f"the images disagree on DTM_PICK_CACHE: {folders}"
    (folder,) = folders
    for name in ("worker-cpu", "worker-gpu"):
        service = compose["services"][name]
        env = service.get("environment", {})
        assert env.get("DTM_PICK_CACHE", folder) == folder, f"{name} points its picks elsewhere"
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get(folder) in compose["volumes"], f"{name} has no named volume at {folder}"
        assert "/opt/airflow/logs" in mounts, f"{name} lost the shared logs volume"
    monkeypatch.setenv("DTM_PICK_CACHE", folder)
    assert picks.path().parent == Path(folder)  # where the workers' processes will write
