"""A TCP link in front of an agent that can break an answer off after its headers.

It copies what a client sees when the server's process dies between writing a response's
status line and headers and writing its body (a SIGKILL at that moment, a node lost
mid-write): the headers arrive, then the connection closes with the body missing. Everything
else passes through unchanged, event streams included. Each request gets its own upstream
connection (`Connection: close` is set on the way), so each answer can be cut or passed whole;
`cut_next` says how many chat answers to break off, `cut` how many were, `asked` how many chat
requests came through at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from tests.conftest import free_port

CHAT = b"POST /v1/chat/completions "


class CuttingLink:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cut_next = 0
        self.cut = 0
        self.asked = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> CuttingLink:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop
        ).result(10)
        return self

    def stop(self) -> None:
        async def shut() -> None:
            self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:  # the event streams it still relays
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            kept, length = [lines[0]], 0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                if name not in (b"connection", b"keep-alive"):
                    kept.append(line)
            body = await reader.readexactly(length)
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            upstream.write(b"\r\n".join([*kept, b"Connection: close", b"", b""]) + body)
            await upstream.drain()
            self.asked += lines[0].startswith(CHAT)
            if lines[0].startswith(CHAT) and self.cut_next > 0:
                self.cut_next -= 1
                writer.write(await up_reader.readuntil(b"\r\n\r\n"))  # the headers, no body
                await writer.drain()
                self.cut += 1
                return
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    with contextlib.suppress(ConnectionError):
                        w.close()
