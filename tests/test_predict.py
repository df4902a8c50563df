"""Mixed-task prediction (spot.predict), prompt interpretation (spot.interpret) and
POST /v1/predict, on the tiny random Llama with a byte tokenizer (one token per byte)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from library import Library
from spot.batching import encode
from spot.evaluation import evaluate, score_encoded
from spot.interpret import inspect_prompt, render
from spot.predict import (
    BackboneMismatch,
    Predictor,
    PromptNotFound,
    Request,
    ServeError,
    _Row,  # the cost-model cut test builds rows directly
    combine,
    ensemble_report,
)
from spot.predict_http import add_predict_route
from spot.tasks import Example, Task, register_task

WORDS = ["film", "a plot", "it was", "bad", "fun", "so dull", "fine", "ok"]  # contexts <= 16 bytes:
# one length bucket, so few shapes compile


def _task(name: str, choices: tuple[str, ...], template: str) -> Task:
    rng = np.random.default_rng(len(name))
    rows = [
        Example(template.format(w=WORDS[i]), choices, int(rng.integers(len(choices))))
        for i in range(len(WORDS))
    ]
    splits = {"train": rows, "validation": rows, "test": rows}
    return register_task(
        Task(name, "user", len(choices), ("accuracy",), lambda: splits), replace=True
    )


# single-byte choices take the backbone's one-pass path (k == 1) and share a group whatever
# their number; multi-byte choices repeat the context per choice (k > 1).
TASKS = {
    "serve_k1_three": (("n", "p", "x"), "R: {w}\nL:", 5),
    "serve_k1_two": (("a", "b"), "Q: {w}?", 5),
    "serve_multi": ((" no", " yes"), "{w}\nOK?", 5),
    "serve_short_prompt": ((" n", " p"), "S: {w} ->", 3),
}


@pytest.fixture(scope="module")
def setup(tiny_llama):
    rng = np.random.default_rng(0)
    tasks = {name: _task(name, choices, template) for name, (choices, template, _) in TASKS.items()}
    prompts = {
        name: rng.normal(0, 0.5, (length, tiny_llama.d_model)).astype(np.float32)
        for name, (_, _, length) in TASKS.items()
    }
    return tiny_llama, tasks, prompts


def _mixed_requests(tasks) -> list[tuple[str, int, Request]]:
    """Every task's test rows, interleaved across tasks."""
    out = []
    for i in range(len(WORDS)):
        for name, task in tasks.items():
            out.append((name, i, Request(task.load("test")[i].text, task=name)))
    return out


def test_mixed_batch_equals_each_task_alone(setup):
    backbone, tasks, prompts = setup
    predictor = Predictor(backbone, prompts=prompts, batch_size=8)
    mixed = _mixed_requests(tasks)
    predictions = predictor.predict([r for _, _, r in mixed])
    mixed_batches = predictor.stats["batches"]
    assert predictor.stats["grouped_prompt_batches"] > 0  # rows of one task share a prompt
    # each distinct prompt ran once, into cached states that every batch and call reuses
    assert predictor.stats["prefix_state_batches"] == mixed_batches
    predictor.predict([r for _, _, r in mixed])
    assert predictor.stats["prefix_states_computed"] == len(TASKS)
    uncached = Predictor(backbone, prompts=prompts, batch_size=8, prefix_cache=False)
    running = uncached.predict([r for _, _, r in mixed])  # prompt groups run as prefix streams
    assert uncached.stats["prefix_state_batches"] == 0 < uncached.stats["grouped_prompt_batches"]
    # a wide length bucket: batches are mostly padding, so they run packed (one stream of the
    # real tokens; each token attends to its own row's cached prompt states)
    wide = Predictor(backbone, prompts=prompts, batch_size=8, bucket=64, max_length=64)
    packed = wide.predict([r for _, _, r in mixed])
    assert wide.stats["packed_batches"] > 0
    # reference: the evaluation path, one task and one shared [L, d] prompt at a time
    reference = {
        name: score_encoded(backbone, prompts[name], encode(backbone, task.load("test")), 8)
        for name, task in tasks.items()
    }
    alone, shared = {}, []
    for name in tasks:  # one task per call: its batches run the prompt once, as a shared prefix
        single = Predictor(backbone, prompts=prompts, batch_size=8)
        alone[name] = single.predict([r for n, _, r in mixed if n == name])
        shared.append(single.stats["shared_prompt_batches"] == single.stats["batches"] > 0)
    assert all(shared)
    for (name, i, _), prediction, ran, pack in zip(mixed, predictions, running, packed, strict=True):
        np.testing.assert_allclose(prediction.scores, reference[name][i], atol=1e-5, rtol=0)
        np.testing.assert_allclose(prediction.scores, alone[name][i].scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(prediction.scores, ran.scores, atol=1e-5, rtol=0)
        np.testing.assert_allclose(prediction.scores, pack.scores, atol=1e-5, rtol=0)
        assert prediction.index == int(np.argmax(reference[name][i]))
        assert prediction.label == tasks[name].load("test")[i].choices[prediction.index]
        assert prediction.choices == TASKS[name][0]
        assert (prediction.task, prediction.prompt_id) == (name, f"task:{name}")
    # 32 rows in 3 shape groups: L=5 & one-token answers (2 tasks with 2 and 3 choices merged),
    # L=5 & multi-token, L=3 & multi-token: 16, 8 and 8 rows, so at least 2 + 1 + 1 batches
    assert mixed_batches >= 4


def test_batches_cut_where_the_cost_model_says(setup):
    """Rows sorted by context length are cut into batches of at most batch_size rows by the
    cost model: padded, short rows apart from long ones; short rows of one length in one
    batch; packed, the cheapest cut (short rows may fill a long batch's stream)."""
    backbone, _, prompts = setup
    predictor = Predictor(backbone, prompts=prompts, batch_size=16, bucket=16, max_length=64)
    padded = Predictor(backbone, prompts=prompts, batch_size=16, bucket=16, max_length=64,
                       pack=False)

    def rows(*lengths):
        return [_Row(prompts["serve_k1_two"], np.zeros(n, np.int32), [[1], [2]]) for n in lengths]

    def cost(cuts, chunk):
        return sum(predictor._cost(chunk[a:b], 1) for a, b in zip(cuts, cuts[1:], strict=False))

    assert predictor._cuts(rows(*[6] * 16), 1) == [0, 16]
    assert padded._cuts(rows(*[4] * 8, *[60] * 8), 1) == [0, 8, 16]
    mixed = rows(*[4] * 8, *[60] * 8)
    cuts = predictor._cuts(mixed, 1)
    alternatives = [[0, 16], [0, 8, 16], [0, 4, 16], [0, 4, 8, 16], [0, 8, 12, 16]]
    assert cost(cuts, mixed) == min(cost(c, mixed) for c in [cuts, *alternatives])
    cuts = predictor._cuts(rows(*[6] * 40), 1)
    assert cuts[0] == 0 and cuts[-1] == 40
    assert all(0 < b - a <= 16 for a, b in zip(cuts, cuts[1:], strict=False))  # batch_size caps


def test_prompts_of_different_lengths_from_the_library(setup, tmp_path):
    backbone, tasks, prompts = setup
    rng = np.random.default_rng(1)
    library = Library(tmp_path / "lib")
    meta = {"task": "serve_multi", "backbone": backbone.identity}
    ids = {}
    for length, score in ((3, 50.0), (7, 90.0), (5, 70.0)):
        key = rng.normal(size=(length, backbone.d_model)).astype(np.float32)
        value = rng.normal(0, 0.5, (length, backbone.d_model)).astype(np.float32)
        ids[length] = library.publish(key, (value, {"score": score, "step": 5}), meta).value
    predictor = Predictor(backbone, library, batch_size=8, cache_size=2)
    assert predictor.best_entry("serve_multi") == ids[7]  # highest validation score
    examples = tasks["serve_multi"].load("test")
    requests = [Request(e.text, prompt_id=ids[length]) for e in examples for length in ids]
    requests[1] = Request(examples[0].text, task="serve_multi")  # resolves to ids[7]
    predictions = predictor.predict(requests)
    assert predictions[1].prompt_id == ids[7]
    for length, entry_id in ids.items():
        prompt, _ = library.load(entry_id)
        assert prompt.shape[0] == length
        reference = score_encoded(backbone, prompt, encode(backbone, examples), 8)
        got = [p.scores for p in predictions if p.prompt_id == entry_id]
        np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    assert all(p.task == "serve_multi" for p in predictions)
    assert predictor.stats["batches"] >= 3  # prompts of different lengths never share a batch
    assert len(predictor._cache) == 2  # LRU bounded
    with pytest.raises(PromptNotFound):
        predictor.predict([Request("x", prompt_id="0" * 16)])
    with pytest.raises(PromptNotFound):
        predictor.predict([Request("x", task="serve_k1_two")])  # no entry for that task


def test_backbone_identity_mismatch_refused(setup, tmp_path):
    backbone, tasks, prompts = setup
    library = Library(tmp_path / "lib")
    other = "llama-000000000000-0000000000000000"
    value = np.ones((3, backbone.d_model), np.float32)
    published = library.publish(value, value * 2, {"task": "serve_multi", "backbone": other})
    predictor = Predictor(backbone, library)
    with pytest.raises(BackboneMismatch, match="trained on backbone"):
        predictor.predict([Request("x", prompt_id=published.value)])
    with pytest.raises(PromptNotFound):  # another backbone's entries never resolve a task
        predictor.predict([Request("x", task="serve_multi")])
    with pytest.raises(BackboneMismatch):
        Predictor(backbone, prompts={"serve_multi": (value, {"backbone": other})})
    with pytest.raises(ServeError, match="d_model"):
        Predictor(backbone, prompts={"serve_multi": np.ones((3, 7), np.float32)})


def test_request_validation(setup):
    backbone, tasks, prompts = setup
    predictor = Predictor(backbone, prompts=prompts)
    with pytest.raises(ServeError):
        Request("text", prompt_id="a", task="b")
    with pytest.raises(ServeError):
        Request("text")
    with pytest.raises(ServeError):
        Request("text", task="serve_multi", choices=(" a", " a"))
    # explicit choices override the task's verbaliser
    predictions = predictor.predict(
        [Request(w, task="serve_multi", choices=(" x", " yy")) for w in WORDS]
    )
    assert all(p.choices == (" x", " yy") and len(p.scores) == 2 for p in predictions)
    assert predictor.predict([]) == []


def test_combine_hand_built():
    scores = np.array([[-1.0, -2.0], [-3.0, -0.5], [-1.5, -2.0]])
    vote, mean_index, votes, mean = combine(scores)
    assert (vote, mean_index, votes.tolist()) == (0, 1, [2, 1])
    np.testing.assert_allclose(mean, [-11 / 6, -1.5])
    # a tied vote goes to the tied choice with the higher mean log-likelihood
    vote, mean_index, votes, _ = combine(np.array([[-1.0, -1.2, -9.0], [-5.0, -0.1, -9.0]]))
    assert (vote, mean_index, votes.tolist()) == (1, 1, [1, 1, 0])


def test_ensemble_matches_single_prompts(setup):
    backbone, tasks, _ = setup
    task = tasks["serve_k1_three"]
    rng = np.random.default_rng(2)
    members = [rng.normal(0, 0.5, (5, backbone.d_model)).astype(np.float32) for _ in range(3)]
    predictor = Predictor(backbone, batch_size=8)
    examples = task.load("test")
    ensemble = predictor.predict_ensemble(examples, members)
    singles = [score_encoded(backbone, p, encode(backbone, examples), 8) for p in members]
    for i, prediction in enumerate(ensemble):
        member_scores = np.stack([s[i] for s in singles])
        vote, mean_index, votes, mean = combine(member_scores)
        assert prediction.member_indices == tuple(member_scores.argmax(axis=1))
        assert (prediction.index, prediction.mean_index) == (vote, mean_index)
        assert prediction.votes == tuple(votes) and sum(prediction.votes) == 3
        np.testing.assert_allclose(prediction.mean_scores, mean, atol=1e-5)
        assert prediction.label == examples[i].choices[vote]
    report = ensemble_report(predictor, task, members, split="test")
    assert report.n_examples == len(examples) and report.metric == "accuracy"
    for j, prompt in enumerate(members):
        assert report.single[j] == pytest.approx(
            evaluate(backbone, prompt, task, "test", batch_size=8)["accuracy"]
        )
    labels = np.array([e.label for e in examples])
    assert report.vote == pytest.approx(100 * np.mean([p.index for p in ensemble] == labels))
    assert report.mean_logprob == pytest.approx(
        100 * np.mean([p.mean_index for p in ensemble] == labels)
    )
    assert report.best == max(report.single)
    assert "majority vote" in report.render()


def test_interpretation_nearest_neighbours(tiny_llama):
    table = np.asarray(tiny_llama.embedding_table)
    # byte-level alphabet ids are not ASCII codes: look the token ids up in the tokenizer
    ids = [tiny_llama.tokenizer.token_to_id(t) for t in ("g", "o", "d")] + [200]
    prompt = table[ids] * np.array([[1.0], [2.0], [0.5], [1.0]], np.float32)
    result = inspect_prompt(tiny_llama, prompt)
    vocab_norms = np.linalg.norm(table, axis=1)
    assert result.length == 4 and result.vocab_size == table.shape[0]
    assert result.vocab_mean_norm == pytest.approx(vocab_norms.mean(), rel=1e-5)
    for token, t, scale in zip(result.tokens, ids, (1.0, 2.0, 0.5, 1.0), strict=True):
        assert len(token.neighbours) == 5
        assert token.neighbours[0].token_id == t
        assert token.neighbours[0].cosine == pytest.approx(1.0, abs=1e-5)
        assert all(n.cosine < 1.0 - 1e-4 for n in token.neighbours[1:])
        cosines = [n.cosine for n in token.neighbours]
        assert cosines == sorted(cosines, reverse=True)
        assert token.norm == pytest.approx(scale * vocab_norms[t], rel=1e-5)
        assert token.norm_ratio == pytest.approx(token.norm / vocab_norms.mean(), rel=1e-5)
    assert result.tokens[0].neighbours[0].text == "g"
    text = render(result)
    assert "'g' 1.000" in text and "vocabulary mean norm" in text
    from rich.table import Table

    assert isinstance(render(result, "rich"), Table)


def test_predict_route(setup, tmp_path):
    backbone, tasks, prompts = setup
    library = Library(tmp_path / "lib")
    value = prompts["serve_multi"] * 0.5
    entry = library.publish(
        value * 3, value, {"task": "serve_multi", "backbone": backbone.identity}
    ).value
    other = library.publish(
        value * 3, value, {"task": "serve_multi", "backbone": "llama-x-y"}
    ).value
    predictor = Predictor(backbone, library, prompts=prompts, batch_size=8)
    # 8 rows of each kind: the shapes compiled by the tests above are reused
    items = [
        item
        for w in WORDS
        for item in (
            {"task": "serve_k1_three", "text": f"R: {w}\nL:"},
            {"prompt_id": entry, "text": f"{w}\nOK?"},
            {"task": "serve_short_prompt", "text": f"S: {w} ->", "choices": [" q", " r"]},
        )
    ]
    expected = predictor.predict(
        [
            Request(
                i["text"],
                i.get("prompt_id"),
                i.get("task"),
                tuple(i["choices"]) if "choices" in i else None,
            )
            for i in items
        ]
    )
    with TestClient(add_predict_route(FastAPI(), predictor)) as client:
        response = client.post("/v1/predict", json={"requests": items})
        assert response.status_code == 200, response.text
        got = response.json()["predictions"]
        assert [p["label"] for p in got] == [p.label for p in expected]
        assert [p["index"] for p in got] == [p.index for p in expected]
        np.testing.assert_allclose(
            [s for p in got for s in p["scores"]],
            [s for p in expected for s in p.scores],
            atol=1e-6,
        )
        assert got[1]["prompt_id"] == entry and got[1]["task"] == "serve_multi"
        assert got[2]["choices"] == [" q", " r"] and got[0]["prompt_id"] == "task:serve_k1_three"

        def post(body):
            return client.post("/v1/predict", json=body)

        for bad in (
            {"requests": []},
            {"requests": [{"text": "x"}]},
            {"items": []},
            {"requests": [{"task": "a", "prompt_id": "b", "text": "x"}]},
            {"requests": [{"task": "a", "text": ""}]},
            [1, 2],
        ):
            response = post(bad)
            assert response.status_code == 422, (bad, response.text)
        assert (
            client.post(
                "/v1/predict", content=b"{not json", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        response = post({"requests": [{"prompt_id": "f" * 16, "text": "x"}]})
        assert response.status_code == 404 and "no library entry" in response.json()["error"]
        response = post({"requests": [{"prompt_id": other, "text": "x"}]})
        assert response.status_code == 409 and "backbone" in response.json()["error"]
        response = post({"requests": [{"task": "serve_multi", "text": "x", "choices": ["a", "a"]}]})
        assert response.status_code == 400 and "distinct" in response.json()["error"]


def test_predict_route_on_the_retrieval_app(setup, tmp_path):
    from retrieval_api import create_app

    backbone, tasks, prompts = setup
    predictor = Predictor(backbone, prompts=prompts)
    app = add_predict_route(create_app(tmp_path / "lib", tokens=[]), predictor)
    with TestClient(app) as client:
        items = [{"task": "serve_k1_three", "text": f"R: {w}\nL:"} for w in WORDS]
        response = client.post("/v1/predict", json={"requests": items})
        assert response.status_code == 200, response.text
        expected = predictor.predict([Request(i["text"], task=i["task"]) for i in items])
        got = response.json()["predictions"]
        for prediction, want in zip(got, expected, strict=True):
            assert prediction["index"] == want.index
            assert prediction["scores"] == pytest.approx(list(want.scores), abs=1e-6)
        assert client.post("/v1/predict", json={"requests": [{"text": "x"}]}).status_code == 422
        assert client.get("/v1/prompts").status_code == 200  # the service's own routes still work
