"""examples/http_server.py: start it on localhost, send 200 concurrent requests of mixed
lengths from a real HTTP client, check every answer against the model run alone, stop it."""
import asyncio
import os
import random
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
aiohttp = pytest.importorskip("aiohttp", reason="the HTTP example and its test need aiohttp "
                              "(pip install aiohttp)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import http_server  # noqa: E402

TIMEOUT = 60


def test_the_http_example_answers_200_concurrent_mixed_length_requests_and_stops_cleanly():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "http_server.py"),
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on http://"), (line, proc.stderr.read()
                                                         if proc.poll() is not None else "")
        url = line.split()[-1]
        rng = random.Random(5)
        gen = torch.Generator().manual_seed(5)
        inputs = [torch.randn(rng.randint(1, http_server.MAX_LEN), http_server.DIM, generator=gen)
                  for _ in range(200)]

        async def client():
            async with aiohttp.ClientSession() as session:
                async def one(x):
                    async with session.post(url + "/embed", json={"x": x.tolist()}) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["embedding"]

                answers = await asyncio.wait_for(asyncio.gather(*(one(x) for x in inputs)), TIMEOUT)
                async with session.post(url + "/embed", json={"x": [[1.0, 2.0]]}) as r:
                    bad = (r.status, await r.text())
                async with session.get(url + "/stats") as r:
                    stats = await r.json()
                return answers, bad, stats

        answers, bad, stats = asyncio.run(client())
        model = http_server.build_model("cpu")
        for x, got in zip(inputs, answers):
            want = model(x[None], torch.tensor([x.shape[0]]))[0]
            torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5)
        assert bad[0] == 400 and "vectors of 16 numbers" in bad[1]
        assert stats["answered"] == 200 and stats["mean_batch_size"] > 1, stats
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, err[-2000:]
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
