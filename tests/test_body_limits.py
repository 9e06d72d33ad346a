"""Context-bomb limits: prompt characters and words, messages, images; each at, below and above."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.errors import InvalidRequest, PayloadTooLarge
from edge.proxy.body_limits import BodyLimits, check, count_words
from tests.support.servers import edge, simulator

LIMITS = BodyLimits(max_prompt_chars=100, max_prompt_words=10, max_messages=3, max_images=2)
IMG = "iVBORw0KGgo="  # base64 bytes; their content does not matter here


def words(n: int) -> str:
    return " ".join(["w"] * n)


def chat(*contents: Any, images: list[str] | None = None) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": c} for c in contents]
    if images is not None:
        messages[-1]["images"] = images
    return {"model": "m", "messages": messages}


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0), ("  ", 0), ("one", 1), (" two  words\n", 2), ("a\tb\x0bc\x1fd", 4),
     ("non\u00a0ascii\u3000spaces here", 4), ("ünïcödé wörds", 2)],
)  # fmt: skip
def test_words_are_counted_as_str_split_counts_them(text: str, expected: int):
    assert count_words(text) == expected == len(text.split())


@pytest.mark.parametrize("n", [9, 10])
def test_prompt_words_below_and_at_the_limit_pass(n: int):
    body = {"model": "m", "system": words(n - 4), "prompt": words(4)}
    assert check(body, LIMITS).words == n


def test_prompt_words_above_the_limit_are_refused():
    with pytest.raises(PayloadTooLarge) as exc:
        check(chat(words(6), [{"type": "text", "text": words(5)}]), LIMITS)
    assert exc.value.status == 413
    assert exc.value.message == (
        "the prompt has 11 words; the limit is 10 (BACKHAUL_EDGE_MAX_PROMPT_WORDS)"
    )


def test_token_ids_count_as_words():
    assert check({"model": "m", "prompt": "a b", "context": list(range(8))}, LIMITS).words == 10
    with pytest.raises(PayloadTooLarge, match="11 words"):
        check({"model": "m", "prompt": [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]}, LIMITS)


def test_embedding_inputs_count():
    assert check({"model": "m", "input": [words(5), words(5)]}, LIMITS).words == 10
    with pytest.raises(PayloadTooLarge, match="11 words"):
        check({"model": "m", "input": [words(5), words(6)]}, LIMITS)


@pytest.mark.parametrize("n", [99, 100])
def test_prompt_chars_below_and_at_the_limit_pass(n: int):
    assert check({"model": "m", "prompt": "x" * n}, LIMITS).chars == n


def test_a_prompt_without_spaces_is_held_by_its_characters():
    with pytest.raises(PayloadTooLarge) as exc:
        check({"model": "m", "prompt": "x" * 101}, LIMITS)
    assert exc.value.message == (
        "the prompt has 101 characters; the limit is 100 (BACKHAUL_EDGE_MAX_PROMPT_CHARS)"
    )


@pytest.mark.parametrize("n", [2, 3])
def test_messages_below_and_at_the_limit_pass(n: int):
    assert check(chat(*["hi"] * n), LIMITS).messages == n


def test_messages_above_the_limit_are_refused():
    with pytest.raises(PayloadTooLarge) as exc:
        check(chat(*["hi"] * 4), LIMITS)
    assert exc.value.message == (
        "the conversation has 4 messages; the limit is 3 (BACKHAUL_EDGE_MAX_MESSAGES)"
    )


def image_part() -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMG}"}}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "look", "images": [IMG, IMG]},  # /api/generate
        chat("look", "and this", images=[IMG, IMG]),  # /api/chat
        chat([{"type": "text", "text": "look"}, image_part()], [image_part()]),  # OpenAI
        {**chat("look", images=[IMG]), "images": [IMG]},  # both kinds add up
    ],
)
def test_images_at_the_limit_pass(body: dict[str, Any]):
    assert check(body, LIMITS).images == 2


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "look", "images": [IMG] * 3},
        chat("look", images=[IMG] * 3),
        chat([image_part(), image_part(), {"type": "text", "text": "look"}, image_part()]),
    ],
)
def test_images_above_the_limit_are_refused(body: dict[str, Any]):
    with pytest.raises(PayloadTooLarge) as exc:
        check(body, LIMITS)
    assert exc.value.message == (
        "the request has 3 images; the limit is 2 (BACKHAUL_EDGE_MAX_IMAGES)"
    )


def test_images_must_be_a_list():
    with pytest.raises(InvalidRequest, match="'images' must be a list"):
        check({"model": "m", "prompt": "x", "images": IMG}, LIMITS)


async def test_the_default_limits_through_the_edge(tmp_path: Path, http: aiohttp.ClientSession):
    """50,000 words and 4 images pass; one more of either is 413 before the upstream."""
    async with simulator(reply_tokens=3) as sim, edge(sim.url, tmp_path) as e:

        async def post(path: str, body: dict[str, Any], request_id: str) -> tuple[int, Any]:
            headers = {"X-Request-Id": request_id}
            async with http.post(f"{e.url}{path}", json=body, headers=headers) as r:
                return r.status, await r.json()

        gen = {"model": "llama3.2:1b", "stream": False}
        status, _ = await post("/api/generate", {**gen, "prompt": words(50_000)}, "at")
        assert status == 200
        status, body = await post("/api/generate", {**gen, "prompt": words(50_001)}, "over")
        assert status == 413
        assert body["type"] == "payload_too_large"
        assert body["error"] == (
            "the prompt has 50001 words; the limit is 50000 (BACKHAUL_EDGE_MAX_PROMPT_WORDS)"
        )
        message: dict[str, Any] = {"role": "user", "content": [image_part()] * 5}
        openai = {"model": "llama3.2:1b", "messages": [message]}
        status, body = await post("/v1/chat/completions", openai, "images")
        assert status == 413
        assert body["error"]["type"] == "payload_too_large"
        assert "5 images; the limit is 4" in body["error"]["message"]
        message["content"] = [image_part()] * 4
        status, _ = await post("/v1/chat/completions", openai, "four")
        assert status == 200
        assert [s.headers["X-Request-Id"] for s in sim.stats.requests if s.method == "POST"] == [
            "at",
            "four",
        ]
        for request_id in ("over", "images"):
            record = await e.record(request_id)
            assert record["status"] == 413 and record["type"] == "payload_too_large"
            assert record["outcome"] == "error" and record["queue_ms"] is None
        assert (await e.record("at"))["prompt_chars"] == len(words(50_000))


async def test_messages_limit_through_the_edge(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path, max_messages=2) as e:
        for n, status in ((1, 200), (2, 200), (3, 413)):
            body = chat(*["hi"] * n) | {"model": "llama3.2:1b", "stream": False}
            async with http.post(
                f"{e.url}/api/chat", json=body, headers={"X-Request-Id": f"m{n}"}
            ) as r:
                assert r.status == status
            assert (await e.record(f"m{n}"))["status"] == status


async def test_body_bytes_at_and_above_the_limit(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim, edge(sim.url, tmp_path, max_body_bytes=2048) as e:
        head = b'{"model": "llama3.2:1b", "stream": false, "prompt": "'
        for size, status in ((2047, 200), (2048, 200), (2049, 413)):
            raw = head + b"x" * (size - len(head) - 2) + b'"}'
            assert len(raw) == size
            async with http.post(
                f"{e.url}/api/generate", data=raw, headers={"X-Request-Id": f"b{size}"}
            ) as r:
                assert r.status == status
            assert (await e.record(f"b{size}"))["status"] == status
        assert len([s for s in sim.stats.requests if s.method == "POST"]) == 2
