"""Retrieval API availability (issue 26): hostile input, heavy writers, a full disk, read-only
and private libraries. Real uvicorn on 127.0.0.1: a subprocess (`tests.test_api.serve`), or in
this process where a failure of the disk has to be injected."""

from __future__ import annotations

import errno
import http.client
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
import uvicorn
from test_api import TOKEN, free_port, prompt, serve

import library.store
from library import Library, encode_prompt
from library.locks import file_lock
from library.manifest import Manifest
from retrieval_api import ApiError, RetrievalClient, create_app

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@contextmanager
def in_process(root: Path, **options: object) -> Iterator[str]:
    """uvicorn serving `create_app(root)` from a thread of this process (so faults can be
    injected with monkeypatch); yields its URL."""
    app = create_app(root, tokens=[TOKEN], **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


class KeepAlive:
    """One HTTP/1.1 connection; `request` fails if the server closed it after the last answer."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.sock: object = None

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], dict[str, object]]:
        self.conn.request(method, path, body=body, headers=headers or {})
        if self.sock is None:
            self.sock = self.conn.sock
        assert self.conn.sock is self.sock, "the server closed the previous connection"
        response = self.conn.getresponse()
        data = json.loads(response.read())
        assert not response.will_close, "the server announced it closes the connection"
        return response.status, dict(response.getheaders()), data


def multipart(files: dict[str, bytes], fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    request = httpx.Request("POST", "http://x/", files=files, data=fields)
    return request.read(), {"Content-Type": request.headers["Content-Type"], **AUTH}


def publish_body(metadata: dict[str, object], key: bytes | None = None) -> tuple[bytes, dict]:
    rng = np.random.default_rng(5)
    key = key if key is not None else encode_prompt(prompt(rng), {})
    return multipart({"key": key}, {"metadata": json.dumps(metadata)})


def filled(root: Path, keys: int = 20) -> Library:
    lib = Library(root)
    rng = np.random.default_rng(0)
    lib.publish_many(
        [(prompt(rng), prompt(rng), {"task": f"t{i}", "backbone": "bb"}) for i in range(keys)]
    )
    return lib


def query_json(rows: int, d: int = 16) -> dict[str, object]:
    return {"backbone": "bb", "prompt": [[0.5] * d] * rows}


# ---- 1. bounded work per query ------------------------------------------------------------


def test_oversize_queries_are_refused_before_parsing(tmp_path: Path) -> None:
    filled(tmp_path / "lib").close()
    extra = ["--max-upload-bytes", str(64 * 2**20), "--max-prompt-length", "64"]
    with serve(tmp_path / "lib", extra) as server, httpx.Client(base_url=server.url) as http:
        limit = 26 * 64 * 16 + 2**20  # JSON bytes of 64 rows of the widest backbone, + slack
        too_long = http.post("/v1/query", json=query_json(65))
        assert too_long.status_code == 400
        assert "max_prompt_length=64" in too_long.json()["error"]
        assert http.post("/v1/query", json=query_json(64)).status_code == 200
        before = peak_rss_kib(server.proc.pid)
        zeros = b'{"backbone": "bb", "prompt": [' + b"[0.0],".join([b""] * 2_000_000)
        big = http.post("/v1/query", content=zeros + b"[0.0]]}")  # 12 MiB, announced
        assert big.status_code == 413 and f"limit of {limit} bytes" in big.json()["error"]
        over = zeros[: limit + 2**17]
        chunks = (over[i : i + 2**16] for i in range(0, len(over), 2**16))
        streamed = http.post("/v1/query", content=chunks)  # no Content-Length: counted
        assert streamed.status_code == 413
        assert peak_rss_kib(server.proc.pid) - before < 64 * 1024
        assert http.get("/healthz").json()["entries"] == 40


# ---- 3. every failure is a clean answer on a live connection -------------------------------


def test_bad_integers_and_headers_get_400_on_a_live_connection(tmp_path: Path) -> None:
    with serve(tmp_path / "lib") as server:
        link = KeepAlive(server.url)
        body, headers = publish_body({"task": "t", "backbone": "bb", "step": 2**63})
        status, _, data = link.request("POST", "/v1/prompts", body, headers)
        assert status == 400 and "'step' must be a finite int within 64 bits" in data["error"]
        good = encode_prompt(np.ones((2, 16), np.float32), {"task": "t", "backbone": "bb"})
        size = int.from_bytes(good[:8], "little")
        header = json.loads(good[8 : 8 + size])
        header["prompt"]["shape"] = [True, 32]
        text = json.dumps(header).encode()
        body, headers = publish_body({}, len(text).to_bytes(8, "little") + text + good[8 + size :])
        status, _, data = link.request("POST", "/v1/prompts", body, headers)
        assert status == 400 and "got shape [True, 32]" in data["error"]
        body, headers = publish_body({"task": "t", "backbone": "bb", "seed": -(2**63)})
        assert link.request("POST", "/v1/prompts", body, headers)[0] == 200


def test_unexpected_error_is_a_500_on_a_live_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object, **__: object) -> int:
        raise RuntimeError(f"internal detail at {tmp_path}")

    with in_process(tmp_path / "lib") as url:
        link = KeepAlive(url)
        monkeypatch.setattr(Library, "count", broken)
        status, _, data = link.request("GET", "/healthz")
        assert status == 500 and data == {"error": "internal error (logged on the server)"}
        monkeypatch.undo()
        assert link.request("GET", "/healthz")[0] == 200


def test_full_disk_gives_507_and_queries_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib"
    filled(root).close()

    def full(path: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(library.store, "atomic_write", full)
    with in_process(root) as url:
        link = KeepAlive(url)
        query = json.dumps({**query_json(4), "k": 3}).encode()
        json_headers = {"Content-Type": "application/json"}
        for _ in range(2):  # the index cannot be saved: it is built and kept in memory
            status, _, data = link.request("POST", "/v1/query", query, json_headers)
            assert status == 200 and len(data["matches"]) == 3
        assert not list((root / "indexes").rglob("*.safetensors"))
        body, headers = publish_body({"task": "new", "backbone": "bb"})
        status, _, data = link.request("POST", "/v1/prompts", body, headers)
        assert status == 507 and "disk is full" in data["error"]
        assert str(tmp_path) not in json.dumps(data)
        assert link.request("GET", "/healthz")[2]["entries"] == 40


def test_sqlite_disk_full_gives_507(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "lib"
    filled(root, 2).close()
    connect = Manifest._conn

    def capped(self: Manifest) -> sqlite3.Connection:  # the database may not grow: SQLITE_FULL
        conn = connect(self)
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
        return conn

    monkeypatch.setattr(Manifest, "_conn", capped)
    with in_process(root) as url:
        link = KeepAlive(url)
        tasks = {f"field{i}": "x" * 4000 for i in range(50)}  # rows larger than the free pages
        rng = np.random.default_rng(9)
        for i in range(3):
            key = encode_prompt(prompt(rng), {})
            body, headers = publish_body({"task": f"n{i}", "backbone": "bb", **tasks}, key)
            status, _, data = link.request("POST", "/v1/prompts", body, headers)
            assert status == 507, data
        assert link.request("GET", "/healthz")[2]["entries"] == 4


# ---- 2. deletes are not starved ------------------------------------------------------------


def test_delete_waiting_too_long_gets_503_with_retry_after(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    key = filled(root, 1).list(role="key")[0].id
    with serve(root) as server, file_lock(root / "lock", shared=True):
        start = time.monotonic()
        response = httpx.delete(f"{server.url}/v1/prompts/{key}", headers=AUTH, timeout=60)
        waited = time.monotonic() - start
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "busy" in response.json()["error"]
        assert library.store.DELETE_LOCK_TIMEOUT <= waited < library.store.DELETE_LOCK_TIMEOUT + 5


# ---- 5. no paths in answers ----------------------------------------------------------------


def test_damaged_objects_do_not_reveal_paths(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    entry = filled(root, 1).list(role="value")[0]
    (root / "objects" / entry.sha256[:2] / f"{entry.sha256}.safetensors").unlink()
    with serve(root) as server:
        response = httpx.get(f"{server.url}/v1/prompts/{entry.id}/file")
        assert response.status_code == 500
        error = response.json()["error"]
        assert f"objects/{entry.sha256[:2]}/" in error and str(tmp_path) not in error


# ---- 6. authentication before the body -----------------------------------------------------


def test_token_is_checked_before_the_body_is_read(tmp_path: Path) -> None:
    with serve(tmp_path / "lib") as server:
        parts = urlsplit(server.url)
        for auth, status in (({}, 401), (AUTH, 413)):
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            conn.putrequest("POST", "/v1/prompts")
            headers = {"Content-Type": "multipart/form-data; boundary=x", **auth}
            for name, value in {**headers, "Content-Length": str(60 * 2**20)}.items():
                conn.putheader(name, value)
            conn.endheaders()  # no body is sent: an answer proves the server read none
            assert conn.getresponse().status == status
            conn.close()


# ---- 7. private means private --------------------------------------------------------------


def test_private_reads_hide_counts_and_backbones(tmp_path: Path) -> None:
    filled(tmp_path / "lib", 2).close()
    with serve(tmp_path / "lib", ["--private-reads"]) as server:
        with httpx.Client(base_url=server.url) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.get("/metrics").status_code == 401
            assert "spot_library_entries" in http.get("/metrics", headers=AUTH).text
            unknown = http.post("/v1/query", json={**query_json(1), "backbone": "x"}, headers=AUTH)
            assert unknown.status_code == 400 and "bb" not in unknown.json()["error"]
        with RetrievalClient(server.url, TOKEN) as client:
            assert client.backbones() == {"bb": 16}
    with serve(tmp_path / "lib", ["--private-reads", "--public-status"]) as server:
        assert httpx.get(f"{server.url}/healthz").json()["entries"] == 4
        assert httpx.get(f"{server.url}/metrics").status_code == 200


# ---- 8. limits -----------------------------------------------------------------------------


def test_metadata_and_prompt_length_limits(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    cases = [
        ({"task": "t" * 900_000, "backbone": "bb"}, None, "max_metadata_value=4096"),
        ({f"f{i}": "x" for i in range(20_000)}, None, "max_metadata_fields=64"),
        ({"task": "t", "backbone": "bb", "k" * 200: "x"}, None, "max_metadata_key=128"),
        (
            {"task": "t", "backbone": "bb"},
            encode_prompt(prompt(rng, 65), {}),
            "length 65, over the limit max_prompt_length=64",
        ),
    ]
    extra = ["--max-upload-bytes", str(64 * 2**20), "--max-prompt-length", "64"]
    with serve(tmp_path / "lib", extra) as server, httpx.Client(base_url=server.url) as http:
        for metadata, key, fragment in cases:
            body, headers = publish_body(metadata, key)
            response = http.post("/v1/prompts", content=body, headers=headers)
            assert response.status_code == 400 and fragment in response.json()["error"]
        assert http.get("/healthz").json()["entries"] == 0


# ---- 9. read-only ----------------------------------------------------------------------------


def test_read_only_library_serves_reads(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    lib = filled(root, 5)
    key = lib.list(role="key")[0]
    lib.close()
    manifest = (root / "manifest.sqlite").read_bytes()
    with serve(root, ["--read-only"]) as server, RetrievalClient(server.url, TOKEN) as client:
        assert [m.entry.id for m in client.query(lib.load(key.id)[0], "bb", "token", k=1)] == [
            key.id
        ]
        assert client.get(key.id) == key
        with pytest.raises(ApiError, match="403.*read-only"):
            client.publish(prompt(np.random.default_rng(1)), None, {"task": "x", "backbone": "bb"})
        with pytest.raises(ApiError, match="403.*read-only"):
            client.delete(key.id)
    assert (root / "manifest.sqlite").read_bytes() == manifest
    assert not list((root / "indexes").rglob("*.safetensors"))


# ---- soak ------------------------------------------------------------------------------------

SOAK_SECONDS = 30
DELETE_BOUND_S = 5.0
HEALTHZ_P99_BOUND_S = 0.5


def test_soak_publishers_deleter_queries(tmp_path: Path) -> None:
    """8 publishers, 1 deleter and 2 query loops for 30 s: deletes finish within a bound,
    /healthz stays fast, and nothing acknowledged is lost."""
    root = tmp_path / "lib"
    published: list[str] = []
    deleted: list[str] = []
    delete_s: list[float] = []
    health_s: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def guarded(loop: Callable[..., None]) -> Callable[..., None]:
        def run(*args: object) -> None:
            try:
                loop(*args)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)
                stop.set()

        return run

    @guarded
    def publisher(url: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with RetrievalClient(url, TOKEN) as client:
            for i in range(10**6):
                if stop.is_set():
                    return
                ids = client.publish(
                    prompt(rng), prompt(rng), {"task": f"{seed}-{i}", "backbone": "bb"}
                )
                published.append(ids.key)

    @guarded
    def deleter(url: str) -> None:
        with RetrievalClient(url, TOKEN) as client:
            while not stop.wait(0.2):
                if len(published) > len(deleted) + 8:
                    victim = published[len(deleted)]  # the oldest key not deleted yet
                    start = time.monotonic()
                    client.delete(victim)
                    delete_s.append(time.monotonic() - start)
                    deleted.append(victim)

    @guarded
    def querier(url: str, seed: int) -> None:
        rng = np.random.default_rng(100 + seed)
        with RetrievalClient(url) as client:
            while not stop.is_set():
                if published:
                    client.query(prompt(rng), "bb", "token", k=5)

    @guarded
    def prober(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.wait(0.05):
                start = time.monotonic()
                http.get("/healthz").raise_for_status()
                health_s.append(time.monotonic() - start)

    with serve(root) as server:
        threads = [threading.Thread(target=publisher, args=(server.url, s)) for s in range(8)]
        threads += [threading.Thread(target=querier, args=(server.url, s)) for s in range(2)]
        threads += [threading.Thread(target=f, args=(server.url,)) for f in (deleter, prober)]
        for thread in threads:
            thread.start()
        stop.wait(SOAK_SECONDS)
        stop.set()
        for thread in threads:
            thread.join(60)
    assert errors == []
    assert len(delete_s) >= 20, delete_s
    print(
        f"deletes {len(delete_s)} max {max(delete_s):.3f}s; publishes {len(published)}; "
        f"healthz p99 {np.percentile(health_s, 99):.3f}s max {max(health_s):.3f}s"
    )
    assert max(delete_s) < DELETE_BOUND_S
    assert np.percentile(health_s, 99) < HEALTHZ_P99_BOUND_S
    with Library(root) as lib:
        gone = set(deleted)
        assert all(lib.get(key).pair for key in published if key not in gone)
        assert lib.count(role="key") == len(set(published) - gone)
        assert lib.verify(repair=False).ok


def test_spot_serve_passes_the_new_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import retrieval_api.app
    from spot.cli import app as cli

    seen: dict[str, object] = {}
    monkeypatch.setattr(retrieval_api.app, "create_app", lambda root, **kw: seen.update(kw))
    monkeypatch.setattr(uvicorn, "run", lambda *_, **__: None)
    argv = ["serve", "--library", str(tmp_path), "--no-open-reads", "--public-status"]
    argv += ["--read-only", "--max-upload-bytes", "1000", "--max-prompt-length", "50"]
    assert CliRunner().invoke(cli, argv).exit_code == 0
    assert (seen["max_upload_bytes"], seen["max_prompt_length"]) == (1000, 50)
    assert seen["read_only"] and seen["public_status"] and not seen["open_reads"]
