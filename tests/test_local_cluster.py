"""Ports for servers this machine starts: picked where no other socket is handed one meanwhile.

A CI run lost its Ray Serve tests because HAProxy's stats port, picked free before Ray started,
was taken by one of Ray's own sockets before HAProxy bound it: a port the kernel hands out on its
own (bind to port 0, outgoing connections) can be taken by anyone between the pick and the bind.
"""

from __future__ import annotations

import socket
from contextlib import closing

import pytest

from lorafleet import local_cluster
from lorafleet.local_cluster import free_port

RAY_WORKER_PORTS = range(10002, 20000)  # Ray's default min/max_worker_port
SERVE_REPLICA_PORTS = (range(30000, 31001), range(40000, 41001))  # Serve's direct-ingress HTTP and gRPC ports


def _ephemeral_ports() -> range:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
        low, high = map(int, ports.read().split())
    return range(low, high + 1)


def test_picked_ports_are_never_ones_the_kernel_or_ray_hand_out_themselves():
    taken_by_others = (_ephemeral_ports(), RAY_WORKER_PORTS, *SERVE_REPLICA_PORTS)
    picks = [free_port() for _ in range(300)]
    assert not [port for port in picks if any(port in ports for ports in taken_by_others)]
    assert len(set(picks)) > 200  # spread out: two servers started at once rarely pick alike


def test_a_port_in_use_is_never_picked(monkeypatch):
    busy = free_port()
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as held:
        held.bind(("127.0.0.1", busy))
        held.listen()
        monkeypatch.setattr(local_cluster, "PICKED_PORTS", range(busy, busy + 1))
        with pytest.raises(RuntimeError, match="no free port"):
            free_port()
        monkeypatch.setattr(local_cluster, "PICKED_PORTS", range(busy - 1, busy + 1))
        assert {free_port() for _ in range(20)} == {busy - 1}
