"""A real DNS server on loopback for the tests (dnslib's), with records the test changes as it goes."""

from __future__ import annotations

import threading
from typing import Any

from dnslib import QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from .support import free_port


class Records(BaseResolver):  # type: ignore[misc]
    """name -> IPv4 addresses, answered with ``ttl``; unknown names get NXDOMAIN."""

    def __init__(self, ttl: int = 1) -> None:
        self.ttl = ttl
        self.names: dict[str, list[str]] = {}
        self.queries = 0
        self.lock = threading.Lock()

    def set(self, name: str, addresses: list[str]) -> None:
        with self.lock:
            self.names[name.rstrip(".") + "."] = list(addresses)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname)
        with self.lock:
            self.queries += 1
            addresses = self.names.get(qname)
        if addresses is None:
            reply.header.rcode = 3  # NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in addresses:
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
        return reply


#: dnslib logs every query to stdout by default
_QUIET = DNSLogger(logf=lambda line: None)


class LoopbackDns:
    """The server on 127.0.0.1 on a free port, UDP and TCP; ``address`` for routing.dns_nameservers."""

    def __init__(self, ttl: int = 1) -> None:
        self.records = Records(ttl)
        self.port = free_port()
        self.servers = [
            DNSServer(self.records, address="127.0.0.1", port=self.port, tcp=tcp, logger=_QUIET)
            for tcp in (False, True)
        ]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackDns:
        for server in self.servers:
            server.start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self.servers:
            server.stop()
