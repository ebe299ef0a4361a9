"""Tests for jaxdml.host: the cores and memory a process may use."""
import os

import pytest

from jaxdml import host


@pytest.mark.parametrize("limit,used,expected_gib", [
    (None, None, 10), ("max\n", str(1 << 30), 10), (str(4 << 30), str(1 << 30), 3),
    (str(40 << 30), str(1 << 30), 10), (str(1 << 30), str(2 << 30), 0)])
def test_available_memory_is_the_kernels_or_less_under_a_cgroup_limit(tmp_path, limit, used,
                                                                      expected_gib):
  meminfo = tmp_path / "meminfo"
  meminfo.write_text(f"MemTotal: {64 << 20} kB\nMemFree: 1 kB\nMemAvailable: {10 << 20} kB\n")
  cgroup = tmp_path / "cgroup"
  cgroup.mkdir()
  if limit is not None:  # a container's cgroup v2 files; none on a bare host
    (cgroup / "memory.max").write_text(limit)
    (cgroup / "memory.current").write_text(used)
  assert host.available_memory_bytes(str(meminfo), str(cgroup)) == expected_gib << 30
  assert host.available_memory_bytes() > 0  # this host's


def test_without_proc_the_answers_are_the_machines_totals(tmp_path, monkeypatch):
  """macOS has neither /proc/meminfo nor sched_getaffinity."""
  physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert host.available_memory_bytes(str(tmp_path / "absent"), str(tmp_path)) == physical
  assert host.cores() == len(os.sched_getaffinity(0))
  monkeypatch.delattr(os, "sched_getaffinity")
  monkeypatch.setattr(os, "cpu_count", lambda: 7)
  assert host.cores() == 7


def test_a_child_process_is_listed_with_its_parent_until_it_is_gone(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                           stdin=subprocess.PIPE)
  try:
    assert child.pid in host.child_pids(os.getpid())
    fields = host.process_stat(child.pid)
    assert fields[0] in "RSD" and fields[1] == str(os.getpid()) and len(fields) > 12
    assert host.child_stats(os.getpid())[child.pid][:2] == fields[:2]
  finally:
    child.communicate(b"")
  assert host.process_stat(child.pid) == [] and child.pid not in host.child_pids(os.getpid())
  # Without /proc (macOS): nothing listed, nothing read.
  assert host.process_stat(os.getpid(), proc=str(tmp_path)) == []
  assert host.child_pids(os.getpid(), proc=str(tmp_path / "absent")) == []
  assert host.child_stats(os.getpid(), proc=str(tmp_path / "absent")) == {}


def test_child_cpu_seconds_adds_user_and_system_ticks(tmp_path):
  tick = os.sysconf("SC_CLK_TCK")
  for pid, ppid, utime, stime in ((31, 7, 3 * tick, tick), (32, 7, tick // 2, 0), (33, 8, tick, tick)):
    (tmp_path / str(pid)).mkdir()
    # The name holds a space and a ')': the fields start after the last ')'.
    (tmp_path / str(pid) / "stat").write_text(
        f"{pid} (a) b) S {ppid} 1 1 0 -1 0 10 0 0 0 {utime} {stime} 0 0 20 0 1 0\n")
  seconds = host.child_cpu_seconds(7, proc=str(tmp_path))
  assert seconds == {31: 4.0, 32: (tick // 2) / tick}
  assert host.child_cpu_seconds(7, proc=str(tmp_path / "absent")) == {}
