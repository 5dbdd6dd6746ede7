"""Fixtures shared by several test files."""

from __future__ import annotations

import socket

import pytest

_LOCAL = ("127.0.0.1", "::1", "localhost")


@pytest.fixture
def no_network(monkeypatch):
    """Refuse every connection beyond this machine: a test that reaches for the network fails
    there. Returns the list of refused attempts."""
    attempts = []
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex
    create_connection, getaddrinfo = socket.create_connection, socket.getaddrinfo

    def is_local(address) -> bool:
        return not isinstance(address, tuple) or address[0] in _LOCAL

    def guard(real, address_of):
        def call(*args, **kwargs):
            address = address_of(args)
            if is_local(address):
                return real(*args, **kwargs)
            attempts.append(address)
            raise OSError(f"network access in a test: {address}")

        return call

    monkeypatch.setattr(socket.socket, "connect", guard(connect, lambda a: a[1]))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(connect_ex, lambda a: a[1]))
    monkeypatch.setattr(socket, "create_connection", guard(create_connection, lambda a: a[0]))
    monkeypatch.setattr(socket, "getaddrinfo", guard(getaddrinfo, lambda a: (a[0], a[1])))
    return attempts
