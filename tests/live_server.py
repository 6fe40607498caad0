"""A uvicorn server on a free port of 127.0.0.1, run in a thread, for tests that need real HTTP."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from ponder.server import ServerConfig
from ponder.server.guards import uvicorn_server


class LiveServer:
    """``app`` served by plain uvicorn, or, given ``guards``, by ``ponder serve``'s protocol with that config's header
    and send deadlines (``uvicorn_server``). ``options`` go to uvicorn's ``Config``."""

    def __init__(self, app, *, guards: ServerConfig | None = None, **options):
        listener = socket.create_server(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        options.setdefault("log_level", "warning")
        if guards is None:
            self.server = uvicorn.Server(uvicorn.Config(app, **options))
        else:
            self.server = uvicorn_server(app, guards, **options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start within 10 s"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
