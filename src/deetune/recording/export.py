"""Export formats of a task's exchanges: JSON Lines (what ``python -m deetune.replay`` reads)
and HAR 1.2 (HTTP tasks: browsers' developer tools, proxies and load tools open it).

JSONL: one :meth:`RecordedExchange.to_json` object per line, in sequence order.

HAR: ``{"log": {"version": "1.2", "creator", "entries": [...]}}``, one entry per HTTP
exchange, its request and response parsed from the recorded bytes: headers (as recorded,
so redacted), query string, body (``postData.text`` / ``content.text``; bytes that are not
UTF-8 text are base64 with ``content.encoding: "base64"``; a chunked body is de-chunked).
``headersSize``/``bodySize`` are the sizes on the wire when the stored bytes are complete,
else -1; ``content.size`` is the de-chunked size of the stored body; truncated messages carry
``_truncated: true`` and the comment says so.  Timings: ``send`` 0, ``wait`` the latency,
``receive`` the rest of the duration (ms).  Extra fields start with ``_`` as HAR allows.
"""

from __future__ import annotations

import base64
import datetime
import json
import urllib.parse
from typing import Any, Iterable, Iterator

from deetune import __version__
from deetune.recording.model import RecordedExchange

HAR_VERSION = "1.2"


def jsonl_lines(exchanges: Iterable[RecordedExchange]) -> Iterator[bytes]:
    for exchange in exchanges:
        yield json.dumps(exchange.to_json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def har_document(exchanges: Iterable[RecordedExchange], comment: str = "") -> dict[str, Any]:
    entries = [har_entry(x) for x in exchanges if x.protocol == "http"]
    log: dict[str, Any] = {"version": HAR_VERSION, "creator": {"name": "deetune", "version": __version__},
                           "pages": [], "entries": entries}
    if comment:
        log["comment"] = comment
    return {"log": log}


def _parse(message: bytes) -> tuple[str, list[tuple[str, str]], bytes, bool, int]:
    """(start line, headers, body (de-chunked when possible), head complete, head size incl. CRLFCRLF)."""
    end = message.find(b"\r\n\r\n")
    complete = end >= 0
    head = message[:end] if complete else message
    body = message[end + 4:] if complete else b""
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.append((name.strip(), value.strip()))
    chunked = any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in headers)
    if chunked and body:
        body = _dechunk(body)
    return lines[0], headers, body, complete, (end + 4 if complete else -1)


def _dechunk(body: bytes) -> bytes:
    """The data of a chunked body (as much as is there)."""
    out = []
    pos = 0
    while pos < len(body):
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            break
        try:
            size = int(body[pos:line_end].split(b";", 1)[0].strip() or b"x", 16)
        except ValueError:
            break
        pos = line_end + 2
        if size == 0:
            break
        out.append(body[pos:pos + size])
        pos += size + 2
    return b"".join(out)


def _text(body: bytes, mime: str) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return {"text": base64.b64encode(body).decode(), "encoding": "base64"}
    if any(ord(c) < 32 and c not in "\t\r\n" for c in text):
        return {"text": base64.b64encode(body).decode(), "encoding": "base64"}
    return {"text": text}


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    return next((v for n, v in headers if n.lower() == name), None)


def _cookies(headers: list[tuple[str, str]], name: str) -> list[dict[str, str]]:
    cookies = []
    for n, value in headers:
        if n.lower() != name:
            continue
        parts = value.split(";") if name == "cookie" else value.split(";")[:1]
        for part in parts:
            key, sep, val = part.strip().partition("=")
            if sep:
                cookies.append({"name": key, "value": val})
    return cookies


def _iso(ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def har_entry(x: RecordedExchange) -> dict[str, Any]:
    req_line, req_headers, req_body, req_head_ok, req_head_size = _parse(x.request)
    parts = req_line.split(" ")
    method = parts[0] if parts and parts[0] else x.method
    target = parts[1] if len(parts) > 1 else x.target
    version = parts[2] if len(parts) > 2 else "HTTP/" + str(x.attributes.get("version") or "1.1")
    host = _header(req_headers, "host") or (f"{x.server_address}:{x.server_port}" if x.server_address else x.server)
    url = target if target.startswith(("http://", "https://")) else f"http://{host}{target}"
    query = [{"name": k, "value": v} for k, v in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query,
                                                                         keep_blank_values=True)]
    req_complete = not x.request_truncated
    request: dict[str, Any] = {
        "method": method,
        "url": url,
        "httpVersion": version,
        "cookies": _cookies(req_headers, "cookie"),
        "headers": [{"name": n, "value": v} for n, v in req_headers],
        "queryString": query,
        "headersSize": req_head_size if req_head_ok and req_complete else -1,
        "bodySize": (x.request_size - req_head_size) if req_head_ok and req_complete else -1,
    }
    if req_body or x.attributes.get("request_body_bytes"):
        mime = _header(req_headers, "content-type") or "application/octet-stream"
        post = {"mimeType": mime, "params": [], **_text(req_body, mime)}
        if "encoding" in post:  # HAR 1.2 has no encoding for postData: an extension field
            post["_encoding"] = post.pop("encoding")
        request["postData"] = post
    if x.request_truncated:
        request["_truncated"] = True

    resp_line, resp_headers, resp_body, resp_head_ok, resp_head_size = _parse(x.response)
    status_parts = resp_line.split(" ", 2)
    status = x.status if isinstance(x.status, int) else 0
    status_text = status_parts[2] if len(status_parts) > 2 else str(x.attributes.get("reason") or "")
    resp_complete = not x.response_truncated
    mime = _header(resp_headers, "content-type") or ("x-unknown" if not resp_body else "application/octet-stream")
    content: dict[str, Any] = {"size": len(resp_body), "mimeType": mime}
    if resp_body:
        content.update(_text(resp_body, mime))
    if x.response_truncated:
        content["comment"] = f"truncated: {len(x.response)} of {x.response_size} bytes recorded"
    response: dict[str, Any] = {
        "status": status,
        "statusText": status_text,
        "httpVersion": status_parts[0] if status_parts and status_parts[0].startswith("HTTP/") else version,
        "cookies": _cookies(resp_headers, "set-cookie"),
        "headers": [{"name": n, "value": v} for n, v in resp_headers],
        "content": content,
        "redirectURL": _header(resp_headers, "location") or "",
        "headersSize": resp_head_size if resp_head_ok and resp_complete else -1,
        "bodySize": (x.response_size - resp_head_size) if resp_head_ok and resp_complete else -1,
    }
    if x.response_truncated:
        response["_truncated"] = True
    latency_ms = x.latency_ns / 1e6 if x.latency_ns is not None else -1
    duration_ms = x.duration_ns / 1e6 if x.duration_ns is not None else max(latency_ms, 0)
    receive = max(duration_ms - max(latency_ms, 0), 0)
    entry: dict[str, Any] = {
        "startedDateTime": _iso(x.ts),
        "time": duration_ms,
        "request": request,
        "response": response,
        "cache": {},
        "timings": {"send": 0, "wait": max(latency_ms, 0), "receive": receive},
        "serverIPAddress": x.server_address,
        "_deetune": {"task_id": x.task_id, "seq": x.seq, "client": x.client, "server": x.server,
                     "redactions": list(x.redactions)},
    }
    if x.server_port:
        entry["connection"] = str(x.server_port)
    return entry


__all__ = ["HAR_VERSION", "har_document", "har_entry", "jsonl_lines"]
