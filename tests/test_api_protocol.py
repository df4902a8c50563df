"""Key protocols over HTTP: listed, fetched, registered; mismatches refused with nothing written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_api import TOKEN, serve

from library import KeyProtocol, Library, ProtocolMismatch
from library.protocol import start_sha256
from retrieval_api import RetrievalClient

D = 16


def protocol_for(start: np.ndarray, recipe: str = "gradient", seed: int = 0) -> KeyProtocol:
    trained = recipe == "trained"
    return KeyProtocol(
        recipe=recipe, backbone="bb", start=start_sha256(start, "bb"), prompt_length=len(start),
        steps=5 if trained else 0, learning_rate=0.01 if trained else 0.0,
        optimizer="adafactor" if trained else "none", objective="choices", batch_size=8,
        examples=64, max_length=128, seed=seed,
    )


def key(protocol: KeyProtocol, array: np.ndarray, task: str):
    return array, {"backbone": "bb", "task": task, "protocol": protocol.to_json()}


def test_protocol_over_http_matches_the_local_library(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, D)).astype(np.float32)
    gradient, trained = protocol_for(start), protocol_for(start, "trained")
    keys = {f"t{i}": rng.normal(size=(4, D)).astype(np.float32) for i in range(6)}
    with serve(tmp_path / "lib") as server, RetrievalClient(server.url, TOKEN) as client:
        assert client.protocol("bb") is None
        client.register_protocol(gradient, start)
        client.register_protocol(trained, start)
        for task, array in keys.items():
            client.publish(key(gradient, array, task), (array, {}), {"task": task, "backbone": "bb"})
            client.publish(key(trained, array + start, task), (array, {}),
                           {"task": task, "backbone": "bb"})
        before = client.count()

        other = protocol_for(start, seed=1)
        with pytest.raises(ProtocolMismatch, match="seed: 1 != 0"):
            client.register_protocol(other, start)
        with pytest.raises(ProtocolMismatch, match="seed: 1 != 0"):
            client.publish(key(other, keys["t0"], "x"), None, {"task": "x", "backbone": "bb"})
        response = httpx.post(f"{server.url}/v1/prompts", files={"key": ("k", b"")},
                              headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 400
        assert client.count() == before  # nothing written

        protocol, fetched = client.protocol("bb")
        assert protocol == gradient  # the first registered is the default
        np.testing.assert_array_equal(fetched, start)
        assert client.protocol("bb", "trained")[0] == trained
        query = rng.normal(size=(4, D)).astype(np.float32)
        remote = {(m.entry.id, round(m.similarity, 5))
                  for m in client.query(query, "bb", "flat", k=4)}
        remote_delta = [m.entry.task for m in
                        client.query(query + start, "bb", "delta-flat", 3, "trained")]

    local = Library(tmp_path / "lib")  # after a restart
    assert {(m.entry.id, round(m.similarity, 5)) for m in local.query(query, "bb", "flat", 4)} \
        == remote
    assert [m.entry.task for m in local.query(query + start, "bb", "delta-flat", 3, "trained")] \
        == remote_delta
    assert [m.entry.task for m in local.query(query, "bb", "flat", 3)] == remote_delta
    assert local.verify().ok and local.protocol("bb", "trained")[0] == trained
    assert dataclasses.asdict(local.protocol("bb")[0]) == dataclasses.asdict(gradient)


def test_client_retries_a_connection_refused_until_the_server_is_up(tmp_path: Path) -> None:
    """The first attempt finds nothing listening; a retry reaches the server once it is up."""
    import http.server
    import socket
    import threading
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Backbones(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = b'{"backbones": {"bb": 16}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    servers = []

    def serve_later() -> None:
        server = http.server.HTTPServer(("127.0.0.1", port), Backbones)
        servers.append(server)
        server.serve_forever()

    timer = threading.Timer(0.2, serve_later)
    timer.start()
    try:
        with RetrievalClient(f"http://127.0.0.1:{port}") as client:
            assert client.backbones() == {"bb": 16}
    finally:
        while not servers:
            time.sleep(0.05)
        servers[0].shutdown()
        timer.join()
