"""``ponder serve``: the OpenAI-compatible server over one engine (in-process llama.cpp or a remote server).

The server's packages are an optional extra, imported only when ``ponder serve`` runs: every other command, which
imports this module to list ``serve`` in the help, stays free of them.
"""

from __future__ import annotations

import argparse
import os
import socket

from ..engine import PonderError
from ..options import add_model_arguments, engine_from_args, positive_int
from ..programs.sandbox import UNSANDBOXED_OPT_IN, unsandboxed_opted_in
from .config import SERVE_STRATEGY, ServerConfig

API_KEY_ENV = "PONDER_API_KEY"
SHUTDOWN_GRACE_S = 10.0
SERVER_EXTRA = ("fastapi", "starlette", "uvicorn", "prometheus_client", "h11")  # pip install "ponder[server]"


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
    serve.add_argument("--strategy", default=SERVE_STRATEGY,
                       help=f"strategy for requests that name none (default: {SERVE_STRATEGY}; a request's "
                            "reasoning_effort sets auto's effort)")
    serve.add_argument("--n", type=positive_int, default=defaults.default_n,
                       help=f"branches for requests that give no n (default: {defaults.default_n})")
    serve.add_argument("--max-running", type=positive_int, default=defaults.max_running,
                       help=f"requests decoded at once (default: {defaults.max_running})")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue,
                       help=f"requests waiting beyond those; more are refused with 429 (default: {defaults.max_queue})")
    serve.add_argument("--shutdown-grace", type=float, default=SHUTDOWN_GRACE_S, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C, let requests in flight finish for this long, then cancel them and "
                            f"free their branches (default: {SHUTDOWN_GRACE_S:g})")
    limits = serve.add_argument_group("limits", "what one client may ask of the server; see docs/server.md")
    limits.add_argument("--max-per-client", type=positive_int, default=defaults.max_per_client, metavar="N",
                        help="requests in progress from one client address; more are refused with 429 (default: "
                             f"{defaults.max_per_client})")
    limits.add_argument("--client-burst", type=positive_int, default=defaults.client_burst, metavar="N",
                        help="strategy runs one client address may throw away (disconnecting, not reading its answer, "
                             "a prompt too long for the context) before it gets 429; answered runs cost nothing "
                             f"(default: {defaults.client_burst})")
    limits.add_argument("--client-rate", type=float, default=defaults.client_rate_per_min, metavar="PER_MINUTE",
                        help="the runs a client may throw away refill at this rate (default: "
                             f"{defaults.client_rate_per_min:g})")
    limits.add_argument("--max-body-bytes", type=positive_int, default=defaults.max_body_bytes, metavar="BYTES",
                        help=f"larger request bodies are refused with 413 (default: {defaults.max_body_bytes})")
    limits.add_argument("--max-messages", type=positive_int, default=defaults.max_messages, metavar="N",
                        help=f"messages in one request (default: {defaults.max_messages})")
    limits.add_argument("--max-stop", type=int, default=defaults.max_stop, metavar="N",
                        help=f"stop strings in one request (default: {defaults.max_stop})")
    limits.add_argument("--max-prompt-chars", type=positive_int, default=None, metavar="N",
                        help="characters of the user message, refused before tokenizing (default: as many as can "
                             "fit in the context, where the engine knows its vocabulary)")
    limits.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s, metavar="SECONDS",
                        help="a connection that has not sent a request's headers by then is closed (default: "
                             f"{defaults.header_timeout_s:g})")
    limits.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s, metavar="SECONDS",
                        help="a request whose body has not arrived by then is answered 408 (default: "
                             f"{defaults.body_timeout_s:g})")
    limits.add_argument("--send-timeout", type=float, default=defaults.send_timeout_s, metavar="SECONDS",
                        help="a client that reads nothing of its answer for this long is disconnected (default: "
                             f"{defaults.send_timeout_s:g})")
    serve.add_argument("--allow-unsandboxed-code", action="store_true",
                       help=f"accept {UNSANDBOXED_OPT_IN}=1 where programs cannot be isolated: model-written code, "
                            "steered by remote clients, then runs with this server's rights")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .app import create_app
        from .guards import uvicorn_server
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_EXTRA:
            raise
        raise PonderError('ponder serve needs its optional packages: pip install "ponder[server]"') from None
    if unsandboxed_opted_in() and not args.allow_unsandboxed_code:
        raise PonderError(f"{UNSANDBOXED_OPT_IN}=1 would let remote clients steer model-written code that runs "
                          "unisolated, with this server's rights; unset it, or add --allow-unsandboxed-code")
    if args.shutdown_grace < 0:
        raise PonderError(f"--shutdown-grace must be 0 or more seconds, got {args.shutdown_grace:g}")
    config = ServerConfig(default_strategy=args.strategy, default_n=args.n,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                          max_running=args.max_running, max_queue=args.max_queue,
                          max_per_client=args.max_per_client, client_burst=args.client_burst,
                          client_rate_per_min=args.client_rate, max_body_bytes=args.max_body_bytes,
                          max_messages=args.max_messages, max_stop=args.max_stop,
                          max_prompt_chars=args.max_prompt_chars, header_timeout_s=args.header_timeout,
                          body_timeout_s=args.body_timeout, send_timeout_s=args.send_timeout)
    listener = _listen(args.host, args.port)  # before loading the model: a busy port fails at once
    engine = engine_from_args(args)
    try:
        app = create_app(engine, config)
        # Without a grace limit uvicorn would wait for every request in flight, however long its strategy runs.
        server = uvicorn_server(app, config, log_level="info", timeout_graceful_shutdown=args.shutdown_grace)
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
