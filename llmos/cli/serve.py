"""`llmos serve`: the API server and the writing studio."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmos.cli.common import ModelOpt, PrecisionOpt, err, fail, load_llm
from llmos.weights.store import MULTILINGUAL_MODEL


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMOS_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 and /api.")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (KV-cache slots).")] = 16,
    max_context: Annotated[int, typer.Option(help="Positions per slot (prompt + output).")] = 2048,
    max_queue: Annotated[int, typer.Option(help="Requests allowed to wait; more get 429.")] = 64,
    timeout: Annotated[float, typer.Option(help="Seconds a request may run before it is ended.")] = 300.0,
    max_body: Annotated[int, typer.Option(help="Largest request body, in bytes (413 above).")] = 1_000_000,
    multilingual: Annotated[str, typer.Option(help="Model for Chinese requests that name no model, loaded on first use when "
                                                   "the served model is English-only ('none': serve them with it).")] = MULTILINGUAL_MODEL,
    precision: PrecisionOpt = "fp16",
):
    """Serve a model over an OpenAI-compatible API (with continuous batching) and the writing
    studio at http://HOST:PORT/ . Remote models from $LLMOS_HOME/config.yaml are served too.

    Examples:

      llmos serve

      llmos serve -m gemma3-270m --port 8001 --api-key secret
    """
    import uvicorn

    from llmos.remote import RemoteError, load_remotes
    from llmos.db import Store, StoreError
    from llmos.server.app import create_app

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        err.print("[yellow]note:[/] serving beyond this machine without --api-key: anyone who can reach the port can use it")
    try:
        remotes = load_remotes()
        store = Store()
    except (RemoteError, StoreError) as e:
        fail(str(e))
    llm = load_llm(model, precision)
    if llm.tokenizer is None:
        fail("serve needs a local model to run (remote ones from config.yaml are served beside it)")
    application = create_app(llm, api_key=api_key, max_batch=max_batch, max_len=max_context, max_queue=max_queue,
                             request_timeout=timeout, max_body=max_body, remotes=remotes, store=store,
                             multilingual=None if multilingual.lower() == "none" else multilingual)
    err.print(f"[green]LLMOS[/] serving {llm.name} at http://{host}:{port}/ (API under /v1, docs at /docs)", highlight=False)
    uvicorn.run(application, host=host, port=port, log_level="warning")
