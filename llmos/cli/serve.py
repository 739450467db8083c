"""`llmos serve`: the API server and the writing studio."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmos.cli.common import ModelOpt, PrecisionOpt, SafetyOpt, err, fail, load_llm, safety_policy
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
    max_tokens: Annotated[int, typer.Option(help="Largest max_tokens one request may ask for (400 above).")] = 4096,
    max_tokens_in_flight: Annotated[Optional[int], typer.Option(
        help="Tokens all admitted requests may hold (each: its prompt + n x max_tokens); more get 429. "
             "Default: twice the batch's rows x context.")] = None,
    max_embedding_inputs: Annotated[int, typer.Option(help="Texts per /v1/embeddings request.")] = 256,
    max_embedding_tokens: Annotated[int, typer.Option(help="Tokens per /v1/embeddings request, all texts together.")] = 32_768,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        help="A Host name this server answers to besides localhost, 127.0.0.1 and ::1 (repeatable; '*': any). "
             "Served on loopback, other names are refused so that a web page cannot reach the server "
             "through DNS rebinding.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow serving beyond this machine without --api-key.")] = False,
    multilingual: Annotated[str, typer.Option(help="Model for Chinese requests that name no model, loaded on first use when "
                                                   "the served model is English-only ('none': serve them with it).")] = MULTILINGUAL_MODEL,
    precision: PrecisionOpt = "auto",
    safety: SafetyOpt = "default",
    copy_index: Annotated[Optional[str], typer.Option(
        help="What `check_copying` requests check against when the model was not trained here: a training "
             "run, a dataset or copy index folder, or a folder of texts (as `llmos check --against`).")] = None,
):
    """Serve a model over an OpenAI-compatible API (with continuous batching) and the writing
    studio at http://HOST:PORT/ . Remote models from $LLMOS_HOME/config.yaml are served too.

    Examples:

      llmos serve

      llmos serve -m gemma3-270m --port 8001 --api-key secret

      llmos serve --host 0.0.0.0 --api-key secret   (other machines; the key is then required)

    With --api-key, every route but /health and the studio page needs it (the page asks for
    it). Requests are checked before they reach a model: bodies must be JSON, a web page on
    another site may not change anything, and limits on tokens answer 400 or 429.
    """
    import uvicorn

    from llmos.remote import RemoteError, load_remotes
    from llmos.db import Store, StoreError
    from llmos.server.app import create_app

    from llmos.server.gate import LOOPBACK_HOSTS

    loopback = host in LOOPBACK_HOSTS
    if not loopback and not api_key and not insecure:
        fail(f"serving on {host} (beyond this machine) without an API key would let anyone who can reach the port "
             f"use it: give --api-key KEY (or LLMOS_API_KEY), or --insecure if that is what you want")
    allowed = allowed_host or []
    if "*" in allowed or not loopback:  # beyond loopback the key protects, and clients use any name for the machine
        hosts = None
    else:
        hosts = LOOPBACK_HOSTS | {h.lower() for h in allowed}
    try:
        remotes = load_remotes()
        store = Store()
    except (RemoteError, StoreError) as e:
        fail(str(e))
    policy = safety_policy(safety)
    against = None
    if copy_index:
        from llmos.data.copying import CopyError, resolve_index

        try:
            against = resolve_index(copy_index)
        except CopyError as e:
            fail(str(e))
    llm = load_llm(model, precision)
    if llm.tokenizer is None:
        fail("serve needs a local model to run (remote ones from config.yaml are served beside it)")
    application = create_app(llm, api_key=api_key, max_batch=max_batch, max_len=max_context, max_queue=max_queue,
                             request_timeout=timeout, max_body=max_body, remotes=remotes, store=store,
                             multilingual=None if multilingual.lower() == "none" else multilingual,
                             allowed_hosts=hosts, max_tokens=max_tokens, max_tokens_in_flight=max_tokens_in_flight,
                             max_embedding_inputs=max_embedding_inputs, max_embedding_tokens=max_embedding_tokens,
                             safety=policy, copy_index=against)
    err.print(f"[green]LLMOS[/] serving {llm.name} at http://{host}:{port}/ (API under /v1, docs at /docs)", highlight=False)
    uvicorn.run(application, host=host, port=port, log_level="warning")
