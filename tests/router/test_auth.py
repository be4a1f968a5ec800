"""API keys, per-key rate limits and the cap on failed authentications (router.app.auth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.tokenizer import Tokenizer
from router.app.auth import FailedAttempts, KeyCheck, KeyLimits, RateLimited, read_keys
from router.config import build_parser, config_from_args
from tests.router.conftest import router_for, run
from tests.router.fake_worker import FakeWorker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_keys_from_env_and_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nk-file-1\n\n  k-file-2  # ops\nk-env\n")
    assert read_keys(" k-env, ,k-env2", str(path)) == ("k-env", "k-env2", "k-file-1", "k-file-2")
    assert read_keys(None, None) == ()
    with pytest.raises(ValueError, match="cannot read the key file"):
        read_keys(None, str(tmp_path / "missing"))


def test_key_check_matches_bearer_only() -> None:
    check = KeyCheck(["alpha", "beta"])
    assert check.match({"authorization": "Bearer beta"}) == 1
    assert check.match({"authorization": "bearer alpha "}) == 0
    assert check.match({"authorization": "Basic alpha"}) is None
    assert check.match({"authorization": "Bearer alph"}) is None
    assert check.match({}) is None
    assert not KeyCheck([])


def test_failed_attempts_lock_an_address_for_a_minute() -> None:
    clock = Clock()
    failures = FailedAttempts(3, clock=clock)
    for _ in range(3):
        failures.check("10.0.0.1")
        failures.failed("10.0.0.1")
        clock.now += 1
    with pytest.raises(RateLimited) as info:
        failures.check("10.0.0.1")
    assert info.value.status == 429 and info.value.retry_after_s == 57
    failures.check("10.0.0.2")  # others are not affected
    clock.now += 58
    failures.check("10.0.0.1")  # the oldest failure is a minute old


def test_key_limits_requests_and_tokens() -> None:
    clock = Clock()
    limits = KeyLimits(rps=2, tpm=600, clock=clock)
    limits.admit(0)
    limits.admit(0)
    with pytest.raises(RateLimited, match="2 requests per second") as info:
        limits.admit(0)
    assert info.value.retry_after_s == 1
    limits.admit(1)  # per key
    clock.now += 0.5
    limits.admit(0)
    limits.charge(0, 900)  # 300 over the minute's 600: 30 s at 10 tokens/s
    with pytest.raises(RateLimited, match="600 tokens per minute") as info:
        limits.admit(0)
    assert info.value.retry_after_s == 30
    clock.now += 30
    limits.admit(0)


def test_config_reads_keys_from_env_and_file(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = tmp_path / "admin"
    admin.write_text("adm-secret-7\n")
    monkeypatch.setenv("PDSERVE_API_KEY", "key-alpha-9,key-beta-9")
    args = build_parser().parse_args(
        ["--model-path", str(model_dir), "--worker", "127.0.0.1:1", "--admin-key-file", str(admin)]
    )
    config = config_from_args(args)
    assert config.api_keys == ("key-alpha-9", "key-beta-9")
    assert config.admin_key == "adm-secret-7"
    assert "key-alpha-9" not in repr(config) and "adm-secret-7" not in repr(config)
    monkeypatch.delenv("PDSERVE_API_KEY")
    args = build_parser().parse_args(
        ["--model-path", str(model_dir), "--worker", "127.0.0.1:1", "--rate-limit-rps", "5"]
    )
    with pytest.raises(ValueError, match="per API key"):
        config_from_args(args)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(r: Any, path: str, body: Any, key: str | None) -> tuple[int, Any, Any]:
    headers = bearer(key) if key is not None else {}
    async with r.http.post(r.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def test_inference_api_needs_a_key_health_and_metrics_do_not(
    model_dir: Path, tokenizer: Tokenizer
) -> None:
    w = FakeWorker()
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2}

    async def main() -> None:
        async with router_for(
            model_dir, workers=(w,), api_keys=("k-one", "k-two"), auth_failures_per_minute=4
        ) as r:
            for key in (None, "k-three", "k-on"):
                status, reply, _ = await post(r, "/v1/completions", body, key)
                assert status == 401, key
                error = reply["error"]
                assert error["code"] == "invalid_api_key"
                assert error["type"] == "authentication_error"
                assert "PDSERVE_API_KEY" in error["message"]
            assert not w.requests
            for key in ("k-one", "k-two"):
                assert (await post(r, "/v1/completions", body, key))[0] == 200
            async with r.http.get(r.url + "/v1/models", headers=bearer("k-one")) as resp:
                assert resp.status == 200
            for path in ("/health", "/metrics"):
                async with r.http.get(r.url + path) as resp:
                    assert resp.status == 200, path
            async with r.http.get(r.url + "/v1/models") as resp:
                assert resp.status == 401
            # Four failures in a minute from this address: locked out, whatever the key.
            status, reply, headers = await post(r, "/v1/completions", body, "k-one")
            assert status == 429 and int(headers["Retry-After"]) >= 1
            assert "failed authentications" in reply["error"]["message"]

    run(main())


def test_per_key_rate_limits_and_admin_failures(model_dir: Path) -> None:
    w = FakeWorker()
    body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 2}

    async def main() -> None:
        async with router_for(
            model_dir,
            workers=(w,),
            api_keys=("k-one", "k-two"),
            rate_limit_rps=2,
            admin_key="adm",
            auth_failures_per_minute=2,
        ) as r:
            statuses = [(await post(r, "/v1/completions", body, "k-one"))[0] for _ in range(3)]
            assert statuses == [200, 200, 429]
            status, reply, headers = await post(r, "/v1/completions", body, "k-one")
            assert status == 429 and reply["error"]["code"] == "rate_limit_exceeded"
            assert headers["Retry-After"] == "1"
            assert (await post(r, "/v1/completions", body, "k-two"))[0] == 200  # its own
            for _ in range(2):
                async with r.http.get(r.url + "/admin/workers", headers=bearer("nope")) as resp:
                    assert resp.status == 401
            async with r.http.get(r.url + "/admin/workers", headers=bearer("adm")) as resp:
                assert resp.status == 429 and "Retry-After" in resp.headers

    run(main())


def test_request_ids_cannot_be_guessed() -> None:
    """Consecutive ids share only the process's prefix; the rest is 96 random bits."""
    from router.app.handlers import _new_id

    ids = [_new_id("cmpl-") for _ in range(1000)]
    assert len(set(ids)) == 1000
    tails = [int(i[len("cmpl-") + 12 :], 16) for i in ids]
    assert all(len(i) == len("cmpl-") + 12 + 24 for i in ids)
    assert len({t >> 64 for t in tails}) > 900  # not a counter in the low bits
