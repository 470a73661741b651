"""Usage sources (provider, offline tiktoken, heuristic) and ``actorq tiktoken-fetch``.

No tiktoken encoding file ships in any installed package and nothing may be
downloaded, so the tiktoken path is exercised with a small synthetic encoding
in tiktoken's file format, registered like a self-hosted model's vocabulary.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load

from ops.cli import main as cli
from tests.openai_server import FakeOpenAI, Reply
from tests.runtime_support import (
    SYNTHETIC_PAT,
    creds,
    llm,
    model,
    run,
    synthetic_encoding_file,
)
from worker import create_executor
from worker.runtime.usage import (
    ENCODINGS,
    EncodingFetchError,
    EncodingSpec,
    cache_path,
    count_tokens,
    fetch_encodings,
    register_encoding,
)

SYNTH_URL = "https://encodings.example/actorq_synthetic.tiktoken"


@pytest.fixture
def synthetic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[EncodingSpec, str]]:
    """A registered synthetic encoding, a model that counts with it, and an empty cache dir."""
    data, sha = synthetic_encoding_file()
    name = f"synthetic_{sha[:8]}"
    spec = EncodingSpec(name, SYNTH_URL, sha, SYNTHETIC_PAT, {"<|endoftext|>": 10_000})
    m = model("selfhosted")
    register_encoding(spec, models=[m])
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / spec.filename).write_bytes(data)
    yield spec, m
    ENCODINGS.pop(name, None)


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server serving ``tmp_path/files``: the stand-in for the publisher."""
    (tmp_path / "files").mkdir(exist_ok=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "files"))
    handler.log_message = lambda *a: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_no_usage_and_no_encoding_falls_back_to_the_heuristic_with_a_warning(
    openai_server: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing offline
    m = openai_server.script(model("nousage"), Reply(text="twelve chars", usage=False))
    ex = create_executor(llm(m, system_prompt="sys"), creds(openai_server))
    with caplog.at_level(logging.WARNING, logger="actorq.usage"):
        result = run(ex.execute("hello"))
    [node] = result.nodes
    assert node.usage_source == "heuristic"
    assert node.input_tokens == math.ceil(len("sys\nhello") / 4)
    assert node.output_tokens == max(2, math.ceil(len("twelve chars") / 4))  # 2 streamed chunks
    assert any(m in r.getMessage() and "characters / 4" in r.getMessage() for r in caplog.records)
    assert os.listdir(tmp_path) == []  # nothing fetched, nothing written


def test_offline_tiktoken_file_is_used_and_recorded(
    openai_server: FakeOpenAI, synthetic: tuple[EncodingSpec, str]
) -> None:
    spec, m = synthetic
    data, _ = synthetic_encoding_file()
    Path(cache_path(spec)).write_bytes(data)
    openai_server.script(m, Reply(text="hello world hello", usage=False))
    result = run(create_executor(llm(m), creds(openai_server)).execute("hello world"))
    [node] = result.nodes
    assert node.usage_source == "tiktoken"
    # The same file loaded by tiktoken itself, as an independent count.
    ranks = tiktoken.load.load_tiktoken_bpe(cache_path(spec), expected_hash=spec.sha256)
    enc = tiktoken.Encoding(
        "check", pat_str=SYNTHETIC_PAT, mergeable_ranks=ranks, special_tokens={}
    )
    # "hello" and " world" are one token each; " hello" is " " + "hello".
    assert len(enc.encode("hello world hello")) == 4
    assert node.output_tokens == len(enc.encode("hello world hello"))
    assert node.input_tokens == len(enc.encode("hello world"))
    assert node.output_tokens != math.ceil(len("hello world hello") / 4)


def test_provider_usage_wins_over_tiktoken(
    openai_server: FakeOpenAI, synthetic: tuple[EncodingSpec, str]
) -> None:
    spec, m = synthetic
    Path(cache_path(spec)).write_bytes(synthetic_encoding_file()[0])
    openai_server.script(m, Reply(text="hello world"))
    node = run(create_executor(llm(m), creds(openai_server)).execute("hi")).nodes[0]
    assert node.usage_source == "provider" and (node.input_tokens, node.output_tokens) == (1, 2)


def test_a_cache_file_with_the_wrong_hash_is_ignored_not_refetched(
    synthetic: tuple[EncodingSpec, str], caplog: pytest.LogCaptureFixture
) -> None:
    spec, m = synthetic
    path = Path(cache_path(spec))
    path.write_bytes(b"aGVsbG8= 0\n")  # well-formed but not the published file
    with caplog.at_level(logging.WARNING, logger="actorq.usage"):
        assert count_tokens("hello world", m) == (3, "heuristic")
    assert path.read_bytes() == b"aGVsbG8= 0\n"  # tiktoken's loader would delete and download it
    assert any("published hash" in r.getMessage() for r in caplog.records)


def test_fetch_writes_verified_files_where_tiktoken_reads_them(
    synthetic: tuple[EncodingSpec, str], file_server: str, tmp_path: Path
) -> None:
    spec, m = synthetic
    assert count_tokens("hello", m)[1] == "heuristic"
    code = cli(["tiktoken-fetch", "--encoding", spec.name, "--base-url", f"{file_server}/"])
    assert code == 0
    path = cache_path(spec)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == spec.sha256
    assert os.path.basename(path) == hashlib.sha1(SYNTH_URL.encode()).hexdigest()
    # tiktoken's own loader finds it under the canonical URL, with no network.
    ranks = tiktoken.load.load_tiktoken_bpe(SYNTH_URL, expected_hash=spec.sha256)
    assert ranks[b"hello"] == 259
    assert count_tokens("hello", m) == (1, "tiktoken")


def test_fetch_refuses_a_file_that_does_not_match_and_writes_nothing(
    file_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "files" / "cl100k_base.tiktoken").write_bytes(b"aGVsbG8= 0\n")
    cache = tmp_path / "cache"
    code = cli(["tiktoken-fetch", "--encoding", "cl100k_base", "--base-url", file_server,
                "--cache-dir", str(cache)])  # fmt: skip
    assert code == 1
    assert "expected 223921b7" in capsys.readouterr().err
    assert not cache.exists() or os.listdir(cache) == []
    # A missing file (404) and an unknown encoding are clear errors too.
    with pytest.raises(EncodingFetchError, match="o200k_base: cannot download"):
        fetch_encodings(["o200k_base"], base_url=file_server, cache_dir=str(cache))
    with pytest.raises(EncodingFetchError, match="unknown encoding 'p50k'"):
        fetch_encodings(["p50k"], base_url=file_server, cache_dir=str(cache))
    assert os.listdir(cache) == []


def test_a_snapshot_counts_the_call_in_flight_without_ending_it() -> None:
    """What a worker saves with each lease renewal: the call in flight counted as if it
    stopped now (prompt and text so far), while the run goes on and ends as usual."""
    from decimal import Decimal

    from producer.config import Limits, ModelPrice
    from worker.runtime.run import Run

    price = ModelPrice(input=Decimal(1_000_000), output=Decimal(1_000_000))  # $1 a token
    r = Run(Limits(), {"m": price})
    r.begin_model_call("n", "openai", "m", "x" * 40)  # 10 tokens by the heuristic
    for piece in ("abcd", "efgh", "ij"):
        r.on_token(piece)
    first = r.snapshot()
    assert (first.model_calls, first.input_tokens, first.output_tokens) == (1, 10, 3)
    assert first.cost_usd == Decimal(13) and first.text == "" and first.finish_reason == "error"
    assert first.nodes[0].usage_source == "heuristic"
    r.on_token("klmn")
    assert r.snapshot().output_tokens == 4  # later snapshots see the text since
    r.end_model_call({"input_tokens": 11, "output_tokens": 5}, "abcdefghijklmn")
    done = r.result()
    # The snapshots left the call alone: it is counted once, from the provider's usage.
    assert (done.input_tokens, done.output_tokens, done.cost_usd) == (11, 5, Decimal(16))
    assert done.nodes[0].usage_source == "provider" and done.text == "abcdefghijklmn"
    assert r.snapshot().model_dump(exclude={"duration_ms", "time_to_first_token_ms"}) == (
        done.model_copy(update={"text": "", "finish_reason": "error"}).model_dump(
            exclude={"duration_ms", "time_to_first_token_ms"}
        )
    )
