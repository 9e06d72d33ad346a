"""The cloud fallback's translator (issue 13): an Ollama-native request as an OpenAI-compatible
cloud reads it, and the cloud's answer, whole or streamed, in Ollama's shape.

One test (or table) per row of ../shared/research/turn2-scale-anchors.md §3.2. Pure functions,
so no servers; the answers are checked against the `ollama` client's own response types and
the edge's own readers (`edge.proxy.usage`), which is what a caller of the edge reads them with.
The SSE samples are written as OpenAI's API sends them (chunk fields, `usage: null` on every
chunk and the usage chunk with empty `choices` under `include_usage`, `data: [DONE]`).
"""

from __future__ import annotations

import base64
import random
from typing import Any

import ollama
import orjson
import pytest

from edge.proxy import usage
from edge.proxy.translate import (
    SseToNdjson,
    TranslationError,
    error_message,
    from_openai_json,
    to_openai,
)

CLOUD = "gpt-4o-mini"
LOCAL = "llama3.2:3b"
_HEAD = (
    '{"id":"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT","object":"chat.completion.chunk",'
    '"created":1741570283,"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
    '"system_fingerprint":"fp_06737a9306",'
)
TEXT_STREAM = (
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"role":"assistant","content":"",'
    '"refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"content":"Hello"}},"logprobs":null,'
    '"finish_reason":null}],"usage":null}\n\n'
    ": keep-alive\n\n"
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"content":" wörld"}},"logprobs":null,'
    '"finish_reason":null}],"usage":null}\n\n'
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{}},"logprobs":null,'
    '"finish_reason":"length"}],"usage":null}\n\n'
    f'data: {_HEAD}"choices":[],"usage":{{"prompt_tokens":19,"completion_tokens":2,'
    '"total_tokens":21,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    '"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    '"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}\n\n'
    "data: [DONE]\n\n"
).encode()


def _tool_delta(tool_call: str, finish: str = "null") -> str:
    return (
        f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"tool_calls":[{tool_call}]}},'
        f'"logprobs":null,"finish_reason":{finish}}}],"usage":null}}\n\n'
    )


TOOL_STREAM = (
    f'data: {_HEAD}"choices":[{{"index":0,"delta":{{"role":"assistant","content":null,'
    '"tool_calls":[{"index":0,"id":"call_DdmO9pD3xa9XTPNJ32zg2hcA","type":"function",'
    '"function":{"name":"get_weather","arguments":""}}],"refusal":null},"logprobs":null,'
    '"finish_reason":null}],"usage":null}\n\n'
    + _tool_delta('{"index":0,"function":{"arguments":"{\\"loc"}}')
    + _tool_delta('{"index":0,"function":{"arguments":"ation\\": \\"Par"}}')
    + _tool_delta('{"index":0,"function":{"arguments":"is\\"}"}}')
    + _tool_delta(
        '{"index":1,"id":"call_2","type":"function","function":{"name":"get_time",'
        '"arguments":"{}"}}'
    )
    + f'data: {_HEAD}"choices":[{{"index":0,"delta":{{}},"logprobs":null,'
    '"finish_reason":"tool_calls"}],"usage":null}\n\n'
    f'data: {_HEAD}"choices":[],"usage":{{"prompt_tokens":80,"completion_tokens":17,'
    '"total_tokens":97}}\n\n'
    "data: [DONE]\n\n"
).encode()


def _lines(converter: SseToNdjson, pieces: list[bytes]) -> list[dict[str, Any]]:
    out: list[bytes] = []
    for piece in pieces:
        out += converter.feed(piece)
    out += converter.finish()
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in out)
    return [orjson.loads(line) for line in out]


def _stream(route: str, data: bytes) -> list[dict[str, Any]]:
    return _lines(SseToNdjson(route, LOCAL), [data])


# Stream default, framing, model names


def test_stream_is_asked_for_unless_refused_as_ollama_defaults_to_it() -> None:
    path, body, dropped = to_openai("/api/chat", {"model": LOCAL, "messages": []}, CLOUD)
    assert path == "/v1/chat/completions"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == CLOUD and dropped == []
    _, body, _ = to_openai(
        "/api/generate", {"model": LOCAL, "prompt": "hi", "stream": False}, CLOUD
    )
    assert body["stream"] is False and "stream_options" not in body


def test_a_text_stream_becomes_ndjson_with_a_final_done_line() -> None:
    lines = _stream("/api/chat", TEXT_STREAM)
    assert [line["message"]["content"] for line in lines] == ["Hello", " wörld", ""]
    for line in lines:
        ollama.ChatResponse.model_validate(line)
        assert line["model"] == LOCAL and line["created_at"] == "2025-03-10T01:31:23.000000Z"
    assert [line["done"] for line in lines] == [False, False, True]
    final = lines[-1]
    assert final["done_reason"] == "length"
    assert (final["prompt_eval_count"], final["eval_count"]) == (19, 2)


def test_a_generate_stream_carries_response_not_message() -> None:
    lines = _stream("/api/generate", TEXT_STREAM)
    assert [line["response"] for line in lines] == ["Hello", " wörld", ""]
    assert all("message" not in line for line in lines)
    for line in lines:
        ollama.GenerateResponse.model_validate(line)


def test_the_edges_own_readers_count_the_translated_stream() -> None:
    ndjson = b"".join(orjson.dumps(line) + b"\n" for line in _stream("/api/chat", TEXT_STREAM))
    figures = usage.from_ndjson_tail(ndjson)
    assert (figures.prompt_tokens, figures.tokens) == (19, 2)
    count = usage.TokenCount()
    count.feed(ndjson)
    assert count.tokens == 2
    assert not figures.server_speed  # no timings: the edge measures speed itself


@pytest.mark.parametrize("stream", [TEXT_STREAM, TOOL_STREAM])
def test_any_split_of_the_sse_bytes_gives_the_same_ndjson(stream: bytes) -> None:
    whole = _stream("/api/chat", stream)
    for cut in range(len(stream) + 1):
        assert _lines(SseToNdjson("/api/chat", LOCAL), [stream[:cut], stream[cut:]]) == whole
    assert _lines(SseToNdjson("/api/chat", LOCAL), [bytes([b]) for b in stream]) == whole
    rng = random.Random(13)
    for _ in range(200):
        pieces, at = [], 0
        while at < len(stream):
            size = rng.randint(1, 40)
            pieces.append(stream[at : at + size])
            at += size
        assert _lines(SseToNdjson("/api/chat", LOCAL), pieces) == whole


def test_crlf_lines_an_unterminated_done_and_nothing_after_the_end() -> None:
    crlf = TEXT_STREAM.replace(b"\n", b"\r\n")
    assert _stream("/api/chat", crlf) == _stream("/api/chat", TEXT_STREAM)
    converter = SseToNdjson("/api/chat", LOCAL)
    unterminated = TEXT_STREAM.removesuffix(b"\n\n")
    assert _lines(converter, [unterminated]) == _stream("/api/chat", TEXT_STREAM)
    assert converter.done and converter.feed(TEXT_STREAM) == [] and converter.finish() == []


def test_a_stream_cut_before_its_finish_ends_in_an_error_line() -> None:
    cut = TEXT_STREAM[: TEXT_STREAM.index(b'"finish_reason":"length"')]
    lines = _stream("/api/chat", cut[: cut.rindex(b"data:")])
    assert [line.get("message", {}).get("content") for line in lines[:-1]] == ["Hello", " wörld"]
    assert "ended before" in lines[-1]["error"]


def test_a_stream_without_usage_or_done_still_ends_after_its_finish() -> None:
    head = TEXT_STREAM[: TEXT_STREAM.index(b'data: {"id"', TEXT_STREAM.index(b'"length"'))]
    lines = _stream("/api/chat", head)
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "length"
    assert "eval_count" not in lines[-1] and "prompt_eval_count" not in lines[-1]


def test_model_names_go_out_as_the_clouds_and_come_back_as_the_clients() -> None:
    _, body, _ = to_openai("/api/embed", {"model": LOCAL, "input": "x"}, "text-embedding-3-small")
    assert body["model"] == "text-embedding-3-small"
    answer = from_openai_json("/api/chat", _chat_answer({"content": "ok"}), LOCAL, 0.5)
    assert answer["model"] == LOCAL


# Max output, sampling, stripped fields


def test_the_output_cap_goes_into_one_field() -> None:
    asked = {"model": LOCAL, "prompt": "hi", "options": {"num_predict": 128}}
    _, body, _ = to_openai("/api/generate", asked, CLOUD)
    assert body["max_tokens"] == 128 and "max_completion_tokens" not in body
    _, body, _ = to_openai("/api/generate", asked, "o3", output_field="max_completion_tokens")
    assert body["max_completion_tokens"] == 128 and "max_tokens" not in body
    for unlimited in (-1, -2):
        asked = {"model": LOCAL, "prompt": "hi", "options": {"num_predict": unlimited}}
        _, body, dropped = to_openai("/api/generate", asked, CLOUD)
        assert "max_tokens" not in body and dropped == []


SAMPLED = {
    "temperature": 0.2,
    "top_p": 0.9,
    "seed": 42,
    "stop": ["\n\n", "User:"],
    "frequency_penalty": 0.5,
    "presence_penalty": -0.5,
}
UNSAMPLED = {
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 0.7,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "num_keep": 4,
    "num_ctx": 8192,
    "mirostat": 2,
}


def test_sampling_options_move_to_the_top_level_and_the_rest_are_named() -> None:
    asked = {"model": LOCAL, "messages": [], "options": {**SAMPLED, **UNSAMPLED}}
    _, body, dropped = to_openai("/api/chat", asked, CLOUD)
    assert {name: body[name] for name in SAMPLED} == SAMPLED
    assert "options" not in body
    assert dropped == [f"options.{name}" for name in UNSAMPLED]
    assert not set(UNSAMPLED) & set(body)


def test_ollama_only_fields_are_stripped_and_named_once() -> None:
    asked = {
        "model": LOCAL,
        "prompt": "hi",
        "suffix": "return x",
        "keep_alive": "5m",
        "template": "{{ .Prompt }}",
        "raw": True,
        "context": [1, 2, 3],
        "_debug_render_only": True,
        "truncate": True,
        "shift": True,
        "logprobs": True,
        "options": {"num_ctx": 4096},
    }
    _, body, dropped = to_openai("/api/generate", asked, CLOUD)
    assert dropped == [
        "suffix",
        "keep_alive",
        "template",
        "raw",
        "context",
        "_debug_render_only",
        "truncate",
        "shift",
        "logprobs",
        "options.num_ctx",
    ]
    assert set(body) == {"model", "messages", "stream", "stream_options"}
    chat = {"model": LOCAL, "messages": [_said("assistant", "a", thinking="t")] * 2}
    assert to_openai("/api/chat", chat, CLOUD)[2] == ["messages.thinking"]


def test_generate_is_sent_as_chat_with_its_system_prompt() -> None:
    asked = {"model": LOCAL, "prompt": "Why is the sky blue?", "system": "Be brief."}
    path, body, _ = to_openai("/api/generate", asked, CLOUD)
    assert path == "/v1/chat/completions"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]


# JSON and schemas, images, thinking


def test_format_json_and_a_schema_become_response_format() -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
    cases: list[tuple[Any, Any]] = [
        ("json", {"type": "json_object"}),
        (schema, {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}),
        ("", None),
    ]
    for given, expected in cases:
        asked = {"model": LOCAL, "messages": [], "format": given}
        _, body, dropped = to_openai("/api/chat", asked, CLOUD)
        assert body.get("response_format") == expected and dropped == []
    _, body, dropped = to_openai("/api/chat", {"model": LOCAL, "format": "yaml"}, CLOUD)
    assert "response_format" not in body and dropped == ["format"]


IMAGES = {
    "image/png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "image/jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    "image/gif": b"GIF89a\x01\x00\x01\x00\x80\x00",
    "image/webp": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
}


@pytest.mark.parametrize(("media_type", "raw"), [*IMAGES.items(), ("image/png", b"BM6\x00\x00")])
def test_images_become_data_url_parts_typed_by_their_first_bytes(
    media_type: str, raw: bytes
) -> None:
    image = base64.b64encode(raw + bytes(range(40))).decode()
    asked = {"model": LOCAL, "messages": [_said("user", "What is this?", images=[image])]}
    _, body, _ = to_openai("/api/chat", asked, CLOUD)
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{image}"}},
    ]
    asked = {"model": LOCAL, "prompt": "", "images": [image, "not base64!"]}
    _, body, _ = to_openai("/api/generate", asked, CLOUD)
    urls = [part["image_url"]["url"] for part in body["messages"][0]["content"]]
    assert urls == [f"data:{media_type};base64,{image}", "data:image/png;base64,not base64!"]


def test_think_levels_become_reasoning_effort_and_booleans_are_dropped() -> None:
    for think, effort, dropped_as in [("high", "high", []), (True, None, ["think"])]:
        asked = {"model": LOCAL, "messages": [], "think": think}
        _, body, dropped = to_openai("/api/chat", asked, CLOUD)
        assert body.get("reasoning_effort") == effort and dropped == dropped_as
    _, body, dropped = to_openai("/api/chat", {"model": LOCAL, "think": False}, CLOUD)
    assert "reasoning_effort" not in body and dropped == ["think"]


def test_a_clouds_reasoning_comes_back_as_thinking() -> None:
    answer = _chat_answer({"content": "4", "reasoning_content": "2+2"})
    out = from_openai_json("/api/chat", answer, LOCAL, None)
    assert out["message"]["thinking"] == "2+2" and out["message"]["content"] == "4"
    delta = b'data: {"created":1,"choices":[{"index":0,"delta":{"reasoning":"hm"}}]}\n\n'
    lines = _lines(SseToNdjson("/api/generate", LOCAL), [delta])
    assert lines[0]["thinking"] == "hm" and lines[0]["response"] == ""


# Tools, both directions


def _said(role: str, content: str, **more: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **more}


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments}}


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tools_pass_and_a_tool_history_gets_ids_and_string_arguments() -> None:
    history = [
        _said("user", "Weather in Paris and Rome, and the time?"),
        _said(
            "assistant",
            "",
            tool_calls=[
                _call("get_weather", city="Paris"),
                _call("get_time"),
                _call("get_weather", city="Rome"),
            ],
        ),
        _said("tool", "9°C", tool_name="get_weather"),
        _said("tool", "12:00", tool_name="get_time"),
        _said("tool", "14°C", tool_name="get_weather"),
    ]
    asked = {"model": LOCAL, "messages": history, "tools": [WEATHER_TOOL]}
    _, body, dropped = to_openai("/api/chat", asked, CLOUD)
    assert body["tools"] == [WEATHER_TOOL] and dropped == []
    assistant = body["messages"][1]
    assert assistant["content"] is None
    assert assistant["tool_calls"] == [
        {
            "id": "call_1_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        },
        {"id": "call_1_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        {
            "id": "call_1_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'},
        },
    ]
    results = [(m["tool_call_id"], m["content"]) for m in body["messages"][2:]]
    assert results == [("call_1_0", "9°C"), ("call_1_1", "12:00"), ("call_1_2", "14°C")]
    assert all("tool_name" not in m for m in body["messages"])
    assert to_openai("/api/chat", asked, CLOUD)[1] == body  # the same ids on every turn


def test_a_tool_call_answered_by_the_cloud_round_trips_with_its_id() -> None:
    answer = _chat_answer(
        {
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        finish="tool_calls",
    )
    out = from_openai_json("/api/chat", answer, LOCAL, 1.0)
    ollama.ChatResponse.model_validate(out)
    assert out["done_reason"] == "stop"
    calls = out["message"]["tool_calls"]
    assert calls == [
        {
            "id": "call_abc",
            "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ]
    history = [
        _said("user", "Weather?"),
        out["message"],
        _said("tool", "9°C", tool_name="get_weather"),
    ]
    _, body, _ = to_openai("/api/chat", {"model": LOCAL, "messages": history}, CLOUD)
    assert body["messages"][1]["tool_calls"][0]["id"] == "call_abc"
    assert body["messages"][2]["tool_call_id"] == "call_abc"


def test_streamed_tool_calls_are_gathered_into_one_message_before_the_end() -> None:
    lines = _stream("/api/chat", TOOL_STREAM)
    assert len(lines) == 2
    for line in lines:
        ollama.ChatResponse.model_validate(line)
    assert lines[0]["done"] is False
    assert lines[0]["message"]["tool_calls"] == [
        {
            "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
            "function": {"index": 0, "name": "get_weather", "arguments": {"location": "Paris"}},
        },
        {"id": "call_2", "function": {"index": 1, "name": "get_time", "arguments": {}}},
    ]
    assert lines[1]["done"] is True and lines[1]["done_reason"] == "stop"
    assert (lines[1]["prompt_eval_count"], lines[1]["eval_count"]) == (80, 17)


def test_tool_arguments_that_are_not_an_object_are_an_error() -> None:
    bad = TOOL_STREAM.replace(b'"is\\"}"', b'"is\\""')
    assert "not a JSON object" in _stream("/api/chat", bad)[-1]["error"]
    answer = _chat_answer(
        {
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
            ]
        }
    )
    with pytest.raises(TranslationError, match="not a JSON object"):
        from_openai_json("/api/chat", answer, LOCAL, None)


# Finish, usage, timings: whole answers


def _chat_answer(message: dict[str, Any], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "refusal": None, **message},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


@pytest.mark.parametrize(
    ("finish", "done_reason"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "stop"),
        ("content_filter", "content_filter"),
    ],
)
def test_finish_reasons_become_done_reasons(finish: str, done_reason: str) -> None:
    out = from_openai_json("/api/chat", _chat_answer({"content": "x"}, finish), LOCAL, None)
    assert out["done_reason"] == done_reason and out["done"] is True
    choice = f'{{"index":0,"delta":{{}},"finish_reason":"{finish}"}}'
    chunk = f'data: {{"created":1,"choices":[{choice}]}}\n\n'
    assert _stream("/api/chat", chunk.encode())[-1]["done_reason"] == done_reason


def test_a_whole_chat_answer_has_ollamas_shape_counts_and_no_server_timings() -> None:
    out = from_openai_json("/api/chat", _chat_answer({"content": "Hi there"}), LOCAL, 1.5)
    assert out == {
        "model": LOCAL,
        "created_at": "2025-03-10T01:31:23.000000Z",
        "message": {"role": "assistant", "content": "Hi there"},
        "done": True,
        "done_reason": "stop",
        "total_duration": 1_500_000_000,
        "prompt_eval_count": 12,
        "eval_count": 5,
    }
    ollama.ChatResponse.model_validate(out)
    figures = usage.from_body(orjson.dumps(out), openai=False)
    assert (figures.prompt_tokens, figures.tokens) == (12, 5)
    assert not figures.server_speed and figures.tok_per_s(2.0) == 2.5


def test_a_whole_generate_answer_and_one_without_usage() -> None:
    answer = _chat_answer({"content": "Rayleigh."})
    del answer["usage"]
    out = from_openai_json("/api/generate", answer, LOCAL, None)
    ollama.GenerateResponse.model_validate(out)
    assert out["response"] == "Rayleigh." and "message" not in out
    assert not {"total_duration", "eval_count", "prompt_eval_count", "eval_duration"} & set(out)


# Embeddings, both routes


EMBEDDINGS = {
    "object": "list",
    "data": [
        {"object": "embedding", "index": 1, "embedding": [0.3, 0.4]},
        {"object": "embedding", "index": 0, "embedding": [0.1, -0.2]},
    ],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}


def test_embed_goes_to_v1_embeddings_and_comes_back_in_order() -> None:
    asked = {
        "model": LOCAL,
        "input": ["a", "b"],
        "dimensions": 2,
        "truncate": True,
        "options": {"num_ctx": 512},
    }
    path, body, dropped = to_openai("/api/embed", asked, "text-embedding-3-small")
    assert path == "/v1/embeddings"
    assert body == {
        "model": "text-embedding-3-small",
        "input": ["a", "b"],
        "dimensions": 2,
        "encoding_format": "float",
    }
    assert dropped == ["truncate", "options.num_ctx"]
    out = from_openai_json("/api/embed", EMBEDDINGS, LOCAL, 0.25)
    ollama.EmbedResponse.model_validate(out)
    assert out == {
        "model": LOCAL,
        "embeddings": [[0.1, -0.2], [0.3, 0.4]],
        "total_duration": 250_000_000,
        "prompt_eval_count": 8,
    }


def test_legacy_embeddings_send_the_prompt_as_input_and_get_one_vector() -> None:
    path, body, dropped = to_openai("/api/embeddings", {"model": LOCAL, "prompt": "a"}, "e5")
    assert (path, body, dropped) == (
        "/v1/embeddings",
        {"model": "e5", "input": "a", "encoding_format": "float"},
        [],
    )
    single = {**EMBEDDINGS, "data": [EMBEDDINGS["data"][1]]}  # type: ignore[index]
    out = from_openai_json("/api/embeddings", single, LOCAL, None)
    ollama.EmbeddingsResponse.model_validate(out)
    assert out == {"embedding": [0.1, -0.2]}


# Errors


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"error":{"message":"Incorrect API key provided: sk-abc.",'
            b'"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}',
            "Incorrect API key provided: sk-abc.",
        ),
        (b'{"error":"model \\"x\\" not found"}', 'model "x" not found'),
        (b'{"detail":"Not Found"}', "Not Found"),
        (
            b'[{"error":{"code":400,"message":"API key not valid.","status":"INVALID_ARGUMENT"}}]',
            "API key not valid.",
        ),
        (b"<html>502 Bad Gateway</html>\n", "<html>502 Bad Gateway</html>"),
        (b"", "the cloud model server answered with an empty error"),
        (b"\xff" * 600, "\ufffd" * 500),
    ],
)
def test_error_messages_are_read_from_each_shape(body: bytes, message: str) -> None:
    assert error_message(body) == message


def test_an_error_in_a_stream_ends_it_with_an_ollama_error_line() -> None:
    error = (
        b'data: {"error":{"message":"Rate limit reached","type":"requests",'
        b'"code":"rate_limit_exceeded"}}\n\n'
    )
    head = TEXT_STREAM[: TEXT_STREAM.index(b"data:", 10)]
    lines = _stream("/api/chat", head + error + TEXT_STREAM)
    assert lines == [{"error": "Rate limit reached"}]
    event = b'event: error\ndata: {"message":"overloaded"}\n\n'
    assert _stream("/api/chat", event) == [{"error": "overloaded"}]
    assert "unreadable" in _stream("/api/chat", b"data: {nope\n\n")[0]["error"]


def test_a_whole_answer_that_is_not_one_is_a_translation_error() -> None:
    cases: list[tuple[str, Any, str]] = [
        ("/api/chat", [], "not a JSON object"),
        ("/api/chat", {"error": {"message": "boom"}}, "boom"),
        ("/api/generate", {"choices": []}, "no choices"),
        ("/api/embed", {"data": None}, "no embeddings"),
    ]
    for route, body, message in cases:
        with pytest.raises(TranslationError, match=message):
            from_openai_json(route, body, LOCAL, None)
