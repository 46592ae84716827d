"""Numbers read from the environment and from Airflow connections: a wrong one is an error
that names where it came from and the variable or field, not a bare ``int()`` traceback."""

from __future__ import annotations

import math

import pytest

from dtm_ops.errors import InputError
from dtm_ops.settings import Settings, env_number, number


@pytest.mark.parametrize(
    "raw, whole, expected",
    [("16", True, 16), (" 16 ", True, 16), (16, True, 16), (16.0, True, 16), ("0", True, 0),
     ("2.5", False, 2.5), (" 2.5 ", False, 2.5), (3, False, 3.0), ("1e3", False, 1000.0)],
)
def test_number_reads_text_and_numbers(raw, whole, expected):
    value = number(raw, source="environment", field="X", whole=whole)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "raw, whole, wanted",
    [("16x", True, "a whole number >= 0"), ("2.5", True, "a whole number >= 0"), (2.5, True, "a whole number >= 0"),
     ("1e3", True, "a whole number >= 0"), ("-1", True, "a whole number >= 0"), ("-0.5", False, "a number >= 0"),
     ("", True, "a whole number >= 0"), (None, False, "a number >= 0"), (True, True, "a whole number >= 0"),
     ("nan", False, "a number >= 0"), ("inf", False, "a number >= 0"), (math.inf, True, "a whole number >= 0"),
     ([1], True, "a whole number >= 0")],
)
def test_number_names_the_source_and_field_of_what_is_no_such_number(raw, whole, wanted):
    with pytest.raises(InputError) as err:
        number(raw, source="connection label_studio_default", field="extra.chunk_size", whole=whole)
    assert str(err.value) == f"connection label_studio_default: field 'extra.chunk_size': expected {wanted}, got {raw!r}"
    assert isinstance(err.value, ValueError)


def test_number_bounds_are_inclusive():
    assert number("1", source="s", field="f", minimum=1, maximum=3) == 1
    assert number("3", source="s", field="f", minimum=1, maximum=3) == 3
    for raw in ("0", "4"):
        with pytest.raises(InputError, match=f"expected a whole number from 1 to 3, got '{raw}'"):
            number(raw, source="s", field="f", minimum=1, maximum=3)


def test_env_number_takes_the_default_where_the_variable_is_unset_or_blank():
    assert env_number("DTM_X", 7, {}) == 7
    assert env_number("DTM_X", 7, {"DTM_X": "  "}) == 7
    assert env_number("DTM_X", 7, {"DTM_X": "9"}) == 9
    with pytest.raises(InputError, match="^environment: field 'DTM_X': expected a whole number >= 1, got '0'$"):
        env_number("DTM_X", 7, {"DTM_X": "0"}, minimum=1)


@pytest.mark.parametrize(
    "name, bad, wanted",
    [("DTM_MAX_SCAN_TASKS", "0", "a whole number >= 1"), ("DTM_MAX_INDEX_TASKS", "many", "a whole number >= 1"),
     ("DTM_RETRY_DELAY_S", "30s", "a number >= 0"), ("DTM_GC_GRACE_HOURS", "-1", "a number >= 0")],
)
def test_settings_read_numbers_and_name_a_wrong_variable(monkeypatch, name, bad, wanted):
    for var in ("DTM_MAX_SCAN_TASKS", "DTM_MAX_INDEX_TASKS", "DTM_RETRY_DELAY_S", "DTM_GC_GRACE_HOURS"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.from_env()
    assert (s.max_scan_tasks, s.max_index_tasks, s.retry_delay_s, s.gc_grace_hours) == (16, 16, 30.0, 24.0)
    monkeypatch.setenv("DTM_MAX_SCAN_TASKS", "4")
    monkeypatch.setenv("DTM_GC_GRACE_HOURS", "0.5")
    s = Settings.from_env()
    assert (s.max_scan_tasks, s.gc_grace_hours) == (4, 0.5)
    monkeypatch.setenv(name, bad)
    with pytest.raises(InputError, match=f"^environment: field '{name}': expected {wanted}, got '{bad}'$"):
        Settings.from_env()


def test_s3_and_label_studio_settings_name_a_wrong_number(monkeypatch):
    from dtm_ops.sinks.label_studio import LabelStudioConfig
    from dtm_ops.store.feature_store import FeatureStore
    from dtm_ops.store.objects import S3Config

    assert S3Config.from_env({"DTM_S3_MAX_ATTEMPTS": "2"}).max_attempts == 2
    with pytest.raises(InputError, match="field 'DTM_S3_MAX_ATTEMPTS': expected a whole number >= 1, got '0'"):
        S3Config.from_env({"DTM_S3_MAX_ATTEMPTS": "0"})
    monkeypatch.setenv("DTM_PREFETCH_MB", "64")
    assert FeatureStore(None).prefetch_bytes == 64 << 20
    monkeypatch.setenv("DTM_PREFETCH_MB", "64MB")
    with pytest.raises(InputError, match="field 'DTM_PREFETCH_MB': expected a whole number >= 0, got '64MB'"):
        FeatureStore(None)

    env = {"DTM_LS_CHUNK_SIZE": "100", "DTM_LS_MIN_INTERVAL_S": "0.25"}
    assert (LabelStudioConfig.from_env(env).chunk_size, LabelStudioConfig.from_env(env).min_interval_s) == (100, 0.25)
    with pytest.raises(InputError, match="field 'DTM_LS_CHUNK_SIZE': expected a whole number >= 1, got '0'"):
        LabelStudioConfig.from_env({"DTM_LS_CHUNK_SIZE": "0"})
    for var in ("DTM_LS_CHUNK_SIZE", "DTM_LS_MIN_INTERVAL_S"):
        monkeypatch.delenv(var, raising=False)
    config = LabelStudioConfig.from_connection("http://ls", "t", {"chunk_size": "50", "min_interval_s": 1})
    assert (config.chunk_size, config.min_interval_s) == (50, 1.0)
    with pytest.raises(InputError, match="^connection ls: field 'extra.min_interval_s': expected a number >= 0, "
                                         "got 'soon'$"):
        LabelStudioConfig.from_connection("http://ls", "t", {"min_interval_s": "soon"}, source="connection ls")
