"""Recording webhooks: where a task's final status may be POSTed, and the POST itself.

A webhook is an ``http://`` or ``https://`` URL.  Its host's addresses (an IP literal, or every
address its name resolves to) must not be link-local (169.254.0.0/16, fe80::/10: where clouds
serve instance metadata and credentials), a cloud metadata address outside those
(``fd00:ec2::254``, ``100.100.100.200``, ``192.0.0.192``), unspecified, multicast or broadcast:
an API client must not turn the agent into a way to reach them.  The agent's operator may allow
networks explicitly (``--webhook-allow CIDR``).  The check runs when the task is created and
again when the webhook is called, and the POST goes to the address just checked (a name that
resolves elsewhere in between changes nothing); redirects are not followed.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.parse
from typing import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud metadata services outside the link-local ranges.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("fd00:ec2::254", "100.100.100.200", "192.0.0.192"))


class WebhookRefused(ValueError):
    """A webhook URL that may not be called (one line)."""


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) an operator allows; ValueError on a bad one."""
    return tuple(ipaddress.ip_network(t.strip(), strict=False) for t in texts)


def _refusal(address: Address, allowed: Sequence[Network]) -> str | None:
    """Why the address may not be called, or None."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if any(address in network for network in allowed):
        return None
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_link_local:
        return "link-local (where clouds serve instance metadata)"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address == ipaddress.ip_address("255.255.255.255"):
        return "broadcast"
    return None


def _target(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path and query) of a webhook URL; WebhookRefused when not http(s)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused(f"webhook must be an http:// or https:// URL, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookRefused("webhook must not carry credentials in its URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused(f"webhook has a bad port: {url!r}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


def resolve(url: str, allowed: Sequence[Network] = ()) -> list[Address]:
    """The addresses a webhook may be called at (every one its host resolves to is checked);
    WebhookRefused (one line) when any is refused or the name does not resolve."""
    _, host, port, _ = _target(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"webhook host {host!r} does not resolve: {getattr(exc, 'strerror', None) or exc}") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    for address in addresses:
        why = _refusal(address, allowed)
        if why is not None:
            shown = host if str(address) == host else f"{host} ({address})"
            raise WebhookRefused(f"webhook host {shown} is {why}: refused (the agent's --webhook-allow "
                                 f"CIDR allows it)")
    return addresses


def post(url: str, body: bytes, *, timeout: float, allowed: Sequence[Network] = ()) -> str:
    """POST ``body`` (JSON) to the webhook; the outcome as ``"sent: HTTP 200"`` or ``"failed: …"``."""
    try:
        scheme, host, port, path = _target(url)
        address = str(resolve(url, allowed)[0])
    except WebhookRefused as exc:
        return f"failed: {exc}"
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    # The connection names the host (Host header, TLS server name) but goes to the address checked.
    conn = connection_class(host, port, timeout=timeout)
    conn._create_connection = lambda _address, *args, **kwargs: socket.create_connection(  # type: ignore[attr-defined]
        (address, port), *args, **kwargs)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json",
                                                       "User-Agent": "deetune-recording"})
        reply = conn.getresponse()
        reply.read(65536)
        status = reply.status
    except (OSError, http.client.HTTPException) as exc:
        return f"failed: {getattr(exc, 'strerror', None) or exc or type(exc).__name__}"
    finally:
        conn.close()
    return f"sent: HTTP {status}" if status < 400 else f"failed: HTTP {status}"


__all__ = ["METADATA_ADDRESSES", "WebhookRefused", "parse_networks", "post", "resolve"]
