"""Test-run setup: as root, the whole run moves into its own network namespace.

Only a loopback interface exists there, so no test can resolve a name or send
a packet off the machine, and real MTAs started by tests (which need root)
share that loopback with the bridge and the policies. This happens at
configure time, before any thread exists (a namespace change applies to the
calling thread). MILTER_BRIDGE_TEST_NETNS=0 turns it off.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

import pytest
from hypothesis import settings

# Hypothesis fails an example that takes over 200 ms by default: a timed assertion,
# which a loaded CI machine turns into a random failure. What is tested is behaviour.
settings.register_profile("milter-bridge", deadline=None)
settings.load_profile("milter-bridge")

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def _enter_private_network() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        msg = f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
        raise pytest.UsageError(msg)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() == 0 and os.environ.get("MILTER_BRIDGE_TEST_NETNS", "1") != "0":
        _enter_private_network()
        config.stash[private_network] = True


private_network = pytest.StashKey[bool]()
