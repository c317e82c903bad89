"""A real slow link on this machine: a private network namespace whose loopback is shaped by a token bucket.

    with shaped_namespace(ShapedLink.parse("100mbit")) as namespace:   # root, iproute2 (ip, tc)
        ...                                                      # processes that enter it talk at 100 Mbit/s

What it builds (``ip netns add``, then inside the namespace ``ip link set lo up`` and
``tc qdisc add dev lo root tbf rate R burst B limit L``):

- rate R: the link's rate in bits per second; every byte any rank sends crosses this one loopback, so R is the
  capacity all ranks share (like one switch port, not one link per pair of ranks).
- burst B: the bucket's depth in bytes, max(256 KiB, 2 ms at the rate). It must exceed the loopback MTU
  (64 KiB): a packet larger than the bucket never passes, and gloo then stalls until its connection times out.
- limit L: bytes that may wait in the queue, max(4 MiB, 100 ms at the rate); beyond it packets are dropped
  and TCP backs off, as on a congested switch.

``tbf`` shapes the rate only: no latency is added (``netem`` is not available on these machines), so the
link's alpha is the loopback's (tens of microseconds) plus whatever TCP and the shaper's queue add.

The namespace is always removed: on leaving the ``with`` block, on an exception and on Ctrl-C. One whose
creating process was killed (SIGKILL leaves no chance to clean up) is removed the next time a link is made:
names carry the creator's pid (``sim-link-<pid>-<n>``), and a namespace of a pid that no longer runs is stale.

Entering: a process joins the namespace with ``setns(2)`` on ``/run/netns/<name>`` (``enter_namespace``);
the ranks of ``sim.run_distributed(..., link=...)`` do so before they create their process group.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

MIN_BURST_BYTES = 256 * 1024  # > the loopback MTU (64 KiB), with room for a few packets
MIN_LIMIT_BYTES = 4 * 1024 * 1024
NETNS_DIR = "/run/netns"
PREFIX = "sim-link-"
CLONE_NEWNET = 0x40000000  # <sched.h>: setns(fd, CLONE_NEWNET) joins a network namespace
UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
_counter = itertools.count()


class LinkUnavailableError(RuntimeError):
    """A shaped link cannot be made here (not root, or iproute2's ``ip``/``tc`` missing); the message says which."""


@dataclass(frozen=True)
class ShapedLink:
    """A shaped link: ``rate_bits`` per second, the token bucket's ``burst_bytes`` and queue ``limit_bytes``."""

    rate_bits: float
    burst_bytes: int
    limit_bytes: int

    @classmethod
    def parse(cls, text: str | ShapedLink) -> ShapedLink:
        """``"100mbit"``, ``"1gbit"``, ``"500kbit"`` (tc's units, decimal) -> a ShapedLink, burst and queue as above."""
        if isinstance(text, ShapedLink):
            return text
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(kbit|mbit|gbit|bit)\s*", str(text).lower()) if isinstance(
            text, str) else None
        if match is None or float(match.group(1)) <= 0:
            raise ValueError(f"link={text!r} is invalid; allowed: a rate such as '100mbit', '1gbit' or '500kbit' "
                             "(tc's units: bits per second, decimal)")
        rate = float(match.group(1)) * UNITS[match.group(2)]
        if rate < 1e5:
            raise ValueError(f"link={text!r} is invalid; allowed: a rate of at least 100kbit (slower links make "
                             "gloo's own connection timeouts the bottleneck)")
        burst = max(MIN_BURST_BYTES, int(rate / 8 * 0.002))
        limit = max(MIN_LIMIT_BYTES, int(rate / 8 * 0.1))
        return cls(rate, burst, limit)

    @property
    def beta(self) -> float:
        """Seconds per byte at the configured rate (the cost model's beta for this link)."""
        return 8.0 / self.rate_bits

    def label(self) -> str:
        for unit in ("gbit", "mbit", "kbit"):
            if self.rate_bits >= UNITS[unit]:
                return f"{self.rate_bits / UNITS[unit]:g}{unit}"
        return f"{self.rate_bits:g}bit"

    def tc_arguments(self) -> list[str]:
        return ["tbf", "rate", f"{int(self.rate_bits)}bit", "burst", str(self.burst_bytes),
                "limit", str(self.limit_bytes)]


def missing_requirements() -> list[str]:
    """What this machine lacks for a shaped link (empty when one can be made)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and tc need it)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            missing.append(f"iproute2's `{tool}` (apt-get install iproute2)")
    return missing


def check_available() -> None:
    """Raise LinkUnavailableError naming what is missing."""
    missing = missing_requirements()
    if missing:
        raise LinkUnavailableError("a shaped link needs " + " and ".join(missing))


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise LinkUnavailableError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> list[str]:
    """Remove the namespaces this module made in processes that no longer run; returns their names."""
    if not os.path.isdir(NETNS_DIR):
        return []
    removed = []
    for name in sorted(os.listdir(NETNS_DIR)):
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-\d+", name)
        if match and not _pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            removed.append(name)
    return removed


@contextlib.contextmanager
def shaped_namespace(link: ShapedLink) -> Iterator[str]:
    """A fresh network namespace with its loopback shaped to ``link``; yields its name, always removes it."""
    check_available()
    remove_stale_namespaces()
    name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", *link.tc_arguments())
        yield name
    finally:  # an exception, Ctrl-C (KeyboardInterrupt) or a normal exit: the namespace goes
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def enter_namespace(name: str) -> None:
    """Move this process (all its future sockets) into the named network namespace (``setns(2)``)."""
    path = os.path.join(NETNS_DIR, name)
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "setns"):  # Python >= 3.12
            os.setns(fd, CLONE_NEWNET)
        else:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                error = ctypes.get_errno()
                raise OSError(error, f"setns({path}): {os.strerror(error)}")
    finally:
        os.close(fd)


def namespace_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))
