"""An HTTP/1.1 server on a free port of 127.0.0.1 (printed) that upgrades to h2c when asked
(``Upgrade: h2c``), made with python-hyper's h2.  Every path answers 200 with a short body;
/missing answers 404."""
import socket
import threading

import h2.config
import h2.connection
import h2.events


def status_of(path: bytes) -> int:
    return 404 if path == b"/missing" else 200


def respond(conn: h2.connection.H2Connection, stream_id: int, path: bytes) -> None:
    body = b"upgraded " + path + b"\n"
    conn.send_headers(stream_id, [(":status", str(status_of(path))), ("content-length", str(len(body)))])
    conn.send_data(stream_id, body, end_stream=True)


def serve(sock: socket.socket) -> None:
    with sock:
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                return
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        path = lines[0].split(b" ")[1]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if headers.get(b"upgrade", b"").lower() != b"h2c":
            body = b"plain " + path + b"\n"
            sock.sendall(b"HTTP/1.1 %d OK\r\nContent-Length: %d\r\n\r\n%s" % (status_of(path), len(body), body))
            return
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_upgrade_connection(headers[b"http2-settings"])
        respond(conn, 1, path)
        sock.sendall(conn.data_to_send())
        paths = {}
        while True:
            data = rest or sock.recv(65536)
            rest = b""
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    paths[event.stream_id] = dict(event.headers)[b":path"]
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id in paths:
                    respond(conn, event.stream_id, paths.pop(event.stream_id))
                elif isinstance(event, h2.events.ConnectionTerminated):
                    sock.sendall(conn.data_to_send())
                    return
            sock.sendall(conn.data_to_send())


server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)


def serve_quietly(sock: socket.socket) -> None:
    try:
        serve(sock)
    except OSError:
        pass  # the client went away


while True:
    client, _ = server.accept()
    threading.Thread(target=serve_quietly, args=(client,), daemon=True).start()
