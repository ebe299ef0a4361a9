"""What this host offers a process: the cores it may run on, the memory it
may still take. Linux answers both exactly (affinity, MemAvailable, cgroup
limits); elsewhere (macOS) the answers are the machine's totals."""
import os


def cores() -> int:
  """Cores this process may run on: its CPU affinity (a `taskset` or a
  container's cpuset), else every core of the machine."""
  if hasattr(os, "sched_getaffinity"):  # Linux
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def available_memory_bytes(meminfo="/proc/meminfo", cgroup="/sys/fs/cgroup") -> int:
  """Memory this process may still take: the kernel's MemAvailable, or less
  under a cgroup (v2) limit, e.g. a container's, which /proc/meminfo does
  not show. Without /proc (macOS): the machine's physical memory."""
  try:
    with open(meminfo) as f:
      free = next(int(line.split()[1]) * 1024 for line in f
                  if line.startswith("MemAvailable:"))
  except (OSError, StopIteration):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    with open(os.path.join(cgroup, "memory.max")) as f:
      limit = f.read().strip()
    with open(os.path.join(cgroup, "memory.current")) as f:
      used = int(f.read())
  except (OSError, ValueError):
    return free
  return free if limit == "max" else min(free, max(0, int(limit) - used))


def process_stat(pid, proc="/proc") -> list[str]:
  """/proc/PID/stat's fields after the command name: state, ppid, ...,
  utime and stime (clock ticks) at 11 and 12; [] for a process that is gone,
  or where there is no /proc (macOS)."""
  try:
    with open(os.path.join(proc, str(pid), "stat")) as f:
      return f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
  except OSError:
    return []


def child_stats(pid, proc="/proc") -> dict[int, list[str]]:
  """`{child pid: process_stat fields}` of the live child processes of
  `pid`, from the one read of each /proc/PID/stat that finds them ({} where
  there is no /proc)."""
  try:
    entries = os.listdir(proc)
  except OSError:
    return {}
  stats = {int(p): process_stat(p, proc) for p in entries if p.isdigit()}
  return {p: fields for p, fields in stats.items() if fields[1:2] == [str(pid)]}


def child_cpu_seconds(pid, proc="/proc") -> dict[int, float]:
  """`{child pid: CPU seconds (user + system)}` of the live child processes
  of `pid` ({} where there is no /proc)."""
  tick = os.sysconf("SC_CLK_TCK")
  return {p: (int(f[11]) + int(f[12])) / tick for p, f in child_stats(pid, proc).items()}


def child_pids(pid, proc="/proc") -> list[int]:
  """Live child processes of `pid` ([] where there is no /proc)."""
  return list(child_stats(pid, proc))
