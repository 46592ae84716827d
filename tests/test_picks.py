"""The matcher's method picks kept on disk (dtm_ops.picks): across real processes, per machine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtm_ops import matching, picks

#: A fresh process that runs auto's best_matches and says how many timings it ran.
CHILD = """
import json, sys
import torch
import torch.nn.functional as F
from dtm_ops import matching

torch.set_num_threads(int(sys.argv[1]))
device, dtype = (torch.device("cuda"), torch.float16) if sys.argv[2] == "cuda" else (torch.device("cpu"), torch.float32)
runs = []
timed = matching._timed
matching._timed = lambda *a, **k: runs.append(1) or timed(*a, **k)
g = torch.Generator().manual_seed(0)
feats = F.normalize(torch.randn(4, 8, 6, 7, generator=g), dim=1).to(device, dtype)
temps = [F.normalize(torch.randn(8, h, w, generator=g), dim=0).to(device, dtype) for h, w in [(2, 3), (3, 3), (2, 3)]]
score, rows, cols = matching.best_matches(feats, temps)
print(json.dumps({"timed": len(runs), "picks": sorted(map(repr, matching._picked.items())),
                  "score": score.tolist(), "rows": rows.tolist(), "cols": cols.tolist()}))
"""


def _child(folder: Path, threads: int, device: str = "cpu") -> dict:
    env = {**os.environ, picks.ENV: str(folder)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), device], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)"))])
def test_a_process_uses_the_picks_an_earlier_one_kept_on_this_machine(tmp_path, device):
    first = _child(tmp_path, 1, device)
    assert first["timed"] > 0 and first["picks"]
    kept = json.loads((tmp_path / picks.FILE).read_text())["picks"]
    assert len(kept) == len(first["picks"])
    assert all(json.loads(k)[0].startswith(device + " ") for k in kept)
    again = _child(tmp_path, 1, device)
    assert again["timed"] == 0  # every pick read from the file, none timed
    assert again["picks"] == first["picks"]
    assert (again["score"], again["rows"], again["cols"]) == (first["score"], first["rows"], first["cols"])
    if device == "cpu":  # another thread count is another machine for CPU picks: timed anew, kept beside
        other = _child(tmp_path, 2, device)
        assert other["timed"] > 0
        assert len(json.loads((tmp_path / picks.FILE).read_text())["picks"]) == 2 * len(kept)


def test_the_file_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(picks.ENV, "off")
    assert picks.path() is None
    monkeypatch.setenv(picks.ENV, str(tmp_path / "c"))
    assert picks.path() == tmp_path / "c" / "picks.json"
    monkeypatch.delenv(picks.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert picks.path() == tmp_path / "x" / "dtm-ops" / "picks.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert picks.path() == tmp_path / "home" / ".cache" / "dtm-ops" / "picks.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored
    assert picks.path() == tmp_path / "home" / ".cache" / "dtm-ops" / "picks.json"
    monkeypatch.setattr(picks.os.path, "expanduser", lambda p: p)  # no home folder: "~" stays "~"
    assert picks.path() is None


def test_off_keeps_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(picks.ENV, "off")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    key = ("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 2, 3), 3)
    picks.remember(key, "fold", 0.5)
    picks.flush()
    assert picks.recall(key) is None and not list(tmp_path.rglob("*"))


def test_processes_writing_one_after_the_other_keep_each_others_picks(monkeypatch, tmp_path):
    monkeypatch.setenv(picks.ENV, str(tmp_path))
    a = ("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 2, 3), 3)
    b = ("best", "cpu", torch.float16, (8, 6, 7), (1, 8, 2, 3), 3)  # the same but the dtype
    monkeypatch.setattr(picks, "_tables", {})  # process 1
    picks.remember(a, "fold", 0.5)
    picks.flush()
    monkeypatch.setattr(picks, "_tables", {})  # process 2, after it
    assert picks.recall(a) == ("fold", 0.5) and picks.recall(b) is None
    picks.remember(b, "conv", 0.25)
    picks.flush()
    monkeypatch.setattr(picks, "_tables", {})  # process 3
    assert (picks.recall(a), picks.recall(b)) == (("fold", 0.5), ("conv", 0.25))


def test_the_file_keeps_the_newest_picks(monkeypatch, tmp_path):
    monkeypatch.setenv(picks.ENV, str(tmp_path))
    monkeypatch.setattr(picks, "_tables", {})
    monkeypatch.setattr(picks, "MAX_PICKS", 3)
    keys = [("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 2, w), 3) for w in range(1, 6)]
    for k, key in enumerate(keys):
        picks.remember(key, "fold", float(k))
        if k in (0, 2, 4):
            picks.flush()
    monkeypatch.setattr(picks, "_tables", {})  # another process
    assert [picks.recall(key) for key in keys] == [None, None, ("fold", 2.0), ("fold", 3.0), ("fold", 4.0)]


@pytest.mark.parametrize("text, says", [
    ('{"format": 2, "picks": {"x": ["fold", 0.5]}}', "format 2"),  # no time
    ('{"format": 1, "picks": {"x": ["fold"]}}', "format 1"),  # no seconds
    ('{"format": 7, "picks": {}}', "format 1 or 2"),
    ('["fold", 0.5]', "format 1 or 2"),
])
def test_an_unreadable_file_is_reported_once_then_rewritten(monkeypatch, tmp_path, caplog, text, says):
    monkeypatch.setenv(picks.ENV, str(tmp_path))
    monkeypatch.setattr(picks, "_tables", {})
    monkeypatch.setattr(picks, "_warned", set())
    (tmp_path / picks.FILE).write_text(text)
    key = ("best-set", "cpu", torch.float32, (8, 6, 7), (((2, 3), (3, 3)), 3), 3)
    with caplog.at_level(logging.WARNING, logger="dtm_ops.picks"):
        assert picks.recall(key) is None
        assert picks.recall(key) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot read {tmp_path / picks.FILE} (not a picks file of {says}); picks are timed anew "
        "(the file is rewritten on the next pick)"
    ]
    picks.remember(key, "fft", 0.125)
    picks.flush()  # the broken file is replaced, not merged
    doc = json.loads((tmp_path / picks.FILE).read_text())
    assert [v[:2] for v in doc["picks"].values()] == [["fft", 0.125]]


def test_a_file_that_cannot_be_written_leaves_the_picks_in_memory(monkeypatch, tmp_path, caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(picks.ENV, str(tmp_path / "a-file"))  # a folder that cannot be made
    monkeypatch.setattr(picks, "_tables", {})
    monkeypatch.setattr(picks, "_warned", set())
    monkeypatch.setattr(matching, "_picked", {})
    monkeypatch.setattr(matching, "_pick_times", {})
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 6, 7), dim=1)
    temps = [torch.nn.functional.normalize(torch.randn(8, 2, 3), dim=0)]
    with caplog.at_level(logging.WARNING, logger="dtm_ops.picks"):
        matching.best_matches(feats, temps)
        matching.best_matches(feats[:1], temps)  # another batch size: another pick
    file = tmp_path / "a-file" / picks.FILE
    assert len(matching._picked) == 2  # kept in memory all the same
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"cannot read {file}", f"cannot write {file}"]


def test_a_folder_that_refuses_locks_still_keeps_the_picks(monkeypatch, tmp_path, caplog):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setenv(picks.ENV, str(tmp_path))
    monkeypatch.setattr(picks, "_tables", {})
    monkeypatch.setattr(picks, "_warned", set())
    monkeypatch.setattr(fcntl, "flock", refuse)
    keys = [("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 2, w), 3) for w in (1, 2)]
    with caplog.at_level(logging.WARNING, logger="dtm_ops.picks"):
        for key in keys:
            picks.remember(key, "fold", 0.5)
            picks.flush()
    monkeypatch.setattr(picks, "_tables", {})  # another process
    assert [picks.recall(key) for key in keys] == [("fold", 0.5)] * 2
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"cannot lock {tmp_path / picks.FILE}"]


def test_a_kept_pick_of_a_method_this_process_lacks_is_timed_anew(monkeypatch, tmp_path):
    """A pick of Triton's "shift", kept by a process that had Triton, is not one here."""
    monkeypatch.setenv(picks.ENV, str(tmp_path))
    monkeypatch.setattr(picks, "_tables", {})
    monkeypatch.setattr(matching, "_picked", {})
    monkeypatch.setattr(matching, "_pick_times", {})
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 6, 7), dim=1)
    group = torch.nn.functional.normalize(torch.randn(1, 8, 2, 3), dim=1)
    key = matching._key("best", feats, group)
    picks.remember(key, "shift", 0.001)
    assert not matching._known(key, ("fold", "slices", "conv"))
    assert key not in matching._picked
    assert matching._known(key, ("fold", "slices", "conv", "shift"))
    assert (matching._picked[key], matching._pick_times[key]) == ("shift", 0.001)


def test_the_machine_of_a_cpu_pick_includes_torchs_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = picks.device("cpu")
        torch.set_num_threads(2)
        two = picks.device("cpu")
    finally:
        torch.set_num_threads(threads)
    assert one != two and one.replace("threads 1", "threads 2") == two


WRITER = """
import sys
import torch
from dtm_ops import picks

for k in range(40):
    picks.remember(("best", "cpu", torch.float32, (8, 6, 7), (1, 8, int(sys.argv[1]), k + 1), 3), "fold", 0.5)
    picks.flush()
"""


def test_processes_writing_at_once_never_leave_a_broken_file(tmp_path):
    """Four processes flush 40 picks each at the same time while this one reads the file:
    every read parses, and the file ends with every pick of every writer."""
    env = {**os.environ, picks.ENV: str(tmp_path)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(w + 1)], env=env) for w in range(4)]
    reads = 0
    while any(p.poll() is None for p in writers):
        if (tmp_path / picks.FILE).exists():
            picks._read(tmp_path / picks.FILE)  # raises on a half-written file
            reads += 1
    assert [p.returncode for p in writers] == [0] * 4 and reads > 0
    kept = {tuple(json.loads(k)[3][4]) for k in picks._read(tmp_path / picks.FILE)}
    assert kept == {(1, 8, w + 1, k + 1) for w in range(4) for k in range(40)}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


#: A process that keeps one pick; "a" dawdles between reading the file and writing it,
#: "b" flushes in that time.
RACER = """
import sys, time
from pathlib import Path
import torch
from dtm_ops import picks

role, signal = sys.argv[1], Path(sys.argv[2])
picks.remember(("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 2, 3), 3 if role == "a" else 4), role, 0.5)
if role == "a":
    read = picks._read

    def slow_read(file):
        got = read(file)
        signal.touch()
        time.sleep(1.0)
        return got

    picks._read = slow_read
else:
    while not signal.exists():
        time.sleep(0.01)
picks.flush()
"""


def test_a_process_that_flushes_while_another_merges_waits_for_it(tmp_path):
    """B flushes while A holds what it read of the file and has not yet written: B waits
    for A's write and merges with it (without the lock, A's write drops B's pick)."""
    env = {**os.environ, picks.ENV: str(tmp_path / "picks")}
    signal = tmp_path / "a-has-read"
    b = subprocess.Popen([sys.executable, "-c", RACER, "b", str(signal)], env=env)
    a = subprocess.run([sys.executable, "-c", RACER, "a", str(signal)], env=env, timeout=120)
    assert (a.returncode, b.wait(timeout=120)) == (0, 0)
    kept = {json.loads(k)[3][5]: v[0] for k, v in picks._read(tmp_path / "picks" / picks.FILE).items()}
    assert kept == {3: "a", 4: "b"}


def test_a_pick_older_than_a_week_is_timed_again_and_the_latest_timing_wins(monkeypatch, tmp_path):
    """A pick timed while the machine was busy does not stay for good: after MAX_AGE_S it is
    no longer recalled, and the new timing replaces it in the file, even where another
    process still holds the old one in memory."""
    monkeypatch.setenv(picks.ENV, str(tmp_path))
    clock = {"now": 1_000_000.0}
    monkeypatch.setattr(picks, "_now", lambda: clock["now"])
    key = ("best", "cpu", torch.float32, (8, 6, 7), (16, 8, 4, 3), 9)
    monkeypatch.setattr(picks, "_tables", {})  # process 1 times it, busy
    picks.remember(key, "slices", 0.08)
    picks.flush()
    monkeypatch.setattr(picks, "_tables", {})  # process 2, six days on, reads it
    clock["now"] += 6 * 86400
    assert picks.recall(key) == ("slices", 0.08)
    old_reader = picks._tables
    monkeypatch.setattr(picks, "_tables", {})  # process 3, eight days on: too old, timed again
    clock["now"] += 2 * 86400
    assert picks.recall(key) is None
    picks.remember(key, "conv", 0.06)
    picks.flush()
    monkeypatch.setattr(picks, "_tables", old_reader)  # process 2 flushes another pick with its old copy
    other = ("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 4, 3), 9)
    picks.remember(other, "fold", 0.01)
    picks.flush()
    monkeypatch.setattr(picks, "_tables", {})
    assert (picks.recall(key), picks.recall(other)) == (("conv", 0.06), ("fold", 0.01))


def test_a_format_1_file_is_read_and_its_picks_timed_again(monkeypatch, tmp_path):
    """Files written before picks kept their time: no warning, every pick timed again, and the
    file rewritten in format 2."""
    monkeypatch.setenv(picks.ENV, str(tmp_path))
    monkeypatch.setattr(picks, "_tables", {})
    monkeypatch.setattr(picks, "_warned", set())
    key = ("best", "cpu", torch.float32, (8, 6, 7), (1, 8, 2, 3), 3)
    (tmp_path / picks.FILE).write_text(json.dumps({"format": 1, "picks": {picks._entry(key): ["fold", 0.5]}}))
    assert picks.recall(key) is None and not picks._warned
    picks.remember(key, "slices", 0.25)
    picks.flush()
    doc = json.loads((tmp_path / picks.FILE).read_text())
    assert doc["format"] == 2 and [v[:2] for v in doc["picks"].values()] == [["slices", 0.25]]
