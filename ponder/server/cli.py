"""``ponder serve``: the OpenAI-compatible server over one engine (in-process llama.cpp or a remote server)."""

from __future__ import annotations

import argparse
import os
import socket

from ..engine import PonderError
from ..options import add_model_arguments, engine_from_args, positive_int
from ..sandbox import UNSANDBOXED_OPT_IN, unsandboxed_opted_in
from .app import ServerConfig, create_app

API_KEY_ENV = "PONDER_API_KEY"
SHUTDOWN_GRACE_S = 10.0


def register(subparsers) -> None:
    defaults = ServerConfig()
    serve = subparsers.add_parser(
        "serve", help="serve an OpenAI-compatible API",
        description="Serve GET /v1/models, POST /v1/chat/completions, GET /health and GET /metrics. The strategy of "
                    "a request comes from its model name (sc-16/MODEL) or its 'ponder' field; see docs/server.md.")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV} if set)")
    serve.add_argument("--strategy", default=defaults.default_strategy,
                       help=f"strategy for requests that name none (default: {defaults.default_strategy})")
    serve.add_argument("--n", type=positive_int, default=defaults.default_n,
                       help=f"branches for requests that give no n (default: {defaults.default_n})")
    serve.add_argument("--max-running", type=positive_int, default=defaults.max_running,
                       help=f"requests decoded at once (default: {defaults.max_running})")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue,
                       help=f"requests waiting beyond those; more are refused with 429 (default: {defaults.max_queue})")
    serve.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE_S, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C, let requests in flight finish for this long, then cancel them and "
                            f"free their branches (default: {SHUTDOWN_GRACE_S:g})")
    serve.add_argument("--allow-unsandboxed-code", action="store_true",
                       help=f"accept {UNSANDBOXED_OPT_IN}=1 where programs cannot be isolated: model-written code, "
                            "steered by remote clients, then runs with this server's rights")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if unsandboxed_opted_in() and not args.allow_unsandboxed_code:
        raise PonderError(f"{UNSANDBOXED_OPT_IN}=1 would let remote clients steer model-written code that runs "
                          "unisolated, with this server's rights; unset it, or add --allow-unsandboxed-code")
    if args.shutdown_grace < 0:
        raise PonderError(f"--shutdown-grace must be 0 or more seconds, got {args.shutdown_grace:g}")
    config = ServerConfig(default_strategy=args.strategy, default_n=args.n,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          max_running=args.max_running, max_queue=args.max_queue)
    listener = _listen(args.host, args.port)  # before loading the model: a busy port fails at once
    engine = engine_from_args(args)
    try:
        app = create_app(engine, config)
        # Without a grace limit uvicorn would wait for every request in flight, however long its strategy runs.
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.shutdown_grace))
        server.run(sockets=[listener])
    finally:
        engine.close()
        listener.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise PonderError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
