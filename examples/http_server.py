"""An HTTP inference service on agxguard's Batcher: variable-length requests, one model.

Every request is a sequence of feature vectors (a sentence's token embeddings, an audio
clip's frames) of any length up to MAX_LEN; the service answers with the sequence's
embedding (a small transformer encoder, masked mean over the sequence's own tokens).
Concurrent requests of different lengths share one forward pass: the Batcher pads them
(``pad_dim=1``, to buckets so the model sees few shapes) and hands the model each row's
true length for its padding mask. The web framework is aiohttp: an asyncio server that is
well kept, widely deployed, and ships its own HTTP client (the test uses it); handlers
``await batcher.acall(x)``, so no thread is spent per request and the event loop is never
blocked while the model runs.

    python3 examples/http_server.py [--host 127.0.0.1] [--port 8080] [--device cuda]

    POST /embed   {"x": [[f0, ..., f15], ...]}   ->  {"embedding": [e0, ..., e15]}
    GET  /stats   the Batcher's stats() as JSON

Ctrl-C (SIGINT) or SIGTERM stops it cleanly: requests already accepted are answered,
then the Batcher is closed.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import torch
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agxguard.batcher import Batcher  # noqa: E402

DIM = 16
MAX_LEN = 64
BUCKETS = (8, 16, 32, 64)


def build_model(device: str = "cpu") -> Any:
    """The service's model, with fixed weights: ``model(x, lengths)`` maps a padded batch
    (rows, length, DIM) and each row's true length to one embedding per row (rows, DIM)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=DIM, nhead=2, dim_feedforward=32,
                                             batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    encoder = encoder.to(device).eval()

    def model(x: Any, lengths: Any) -> Any:
        pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]
        with torch.no_grad():
            y = encoder(x, src_key_padding_mask=pad)
            keep = (~pad)[..., None].to(y.dtype)
            return (y * keep).sum(1) / lengths[:, None].to(y.dtype)

    return model


def parse_request(body: Any) -> Any:
    """The request's tensor (1, length, DIM), or web.HTTPBadRequest saying what is wrong."""
    x = body.get("x") if isinstance(body, dict) else None
    if not isinstance(x, list) or not 1 <= len(x) <= MAX_LEN:
        raise web.HTTPBadRequest(text=f"'x' must be a list of 1 to {MAX_LEN} vectors of {DIM} numbers")
    try:
        t = torch.tensor(x, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise web.HTTPBadRequest(text=f"'x' must hold vectors of {DIM} numbers") from None
    if t.dim() != 2 or t.shape[1] != DIM:
        raise web.HTTPBadRequest(text=f"'x' must hold vectors of {DIM} numbers, got shape {tuple(t.shape)}")
    return t[None]


def make_app(batcher: Batcher, timeout: float = 10.0) -> web.Application:
    """The aiohttp application serving ``batcher``; it closes the Batcher on cleanup."""

    async def embed(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body must be JSON") from None
        x = parse_request(body)
        try:
            y = await batcher.acall(x, timeout=timeout)
        except TimeoutError:
            raise web.HTTPServiceUnavailable(text="the model did not answer in time") from None
        return web.json_response({"embedding": y[0].tolist()})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(batcher.stats())

    async def close_batcher(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: batcher.close(timeout=timeout))

    app = web.Application()
    app.router.add_post("/embed", embed)
    app.router.add_get("/stats", stats)
    app.on_cleanup.append(close_batcher)
    return app


async def serve(host: str, port: int, device: str) -> None:
    """Run the service until SIGINT or SIGTERM; print the address once listening."""
    dev = device if device in ("cuda", "mps") else None
    # trim=False: the answers are pooled embeddings (width DIM), not sequences; with the
    # default a batch padded to 16 (a bucket, and DIM) would cut them to each request's length
    batcher = Batcher(build_model(device), max_batch=32, max_delay_ms=2.0, pad_dim=1,
                      buckets=BUCKETS, device=dev, name="embed", trim=False)
    runner = web.AppRunner(make_app(batcher))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    print(f"listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()  # stops accepting, finishes handlers, closes the Batcher
    print("stopped", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    a = p.parse_args()
    asyncio.run(serve(a.host, a.port, a.device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
