"""A TCP proxy on loopback that records every byte it passes, both ways: what an eavesdropper on
the network between two Parallax processes would see."""

from __future__ import annotations

import socket
import threading

IDLE_TIMEOUT_S = 120.0  # a connection silent this long is closed (the proxy never hangs a test)


class RecordingProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<target_port>; `recorded()` is all it saw."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def recorded(self) -> bytes:
        with self._lock:
            return b"".join(self._chunks)

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for source, sink in ((client, upstream), (upstream, client)):
                source.settimeout(IDLE_TIMEOUT_S)
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closed:
                data = source.recv(65536)
                if not data:
                    break
                with self._lock:
                    self._chunks.append(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
