"""How long the control client waits on a silent scheduler before it fails what is in flight."""

from __future__ import annotations


def test_a_client_gives_a_paused_scheduler_as_long_as_the_launcher_does() -> None:
    """The HTTP front's control client failed its requests with 503 ``scheduler_unavailable`` after 3 unanswered
    pings (0.6 s) while the launcher keeps a scheduler that answers within ``serve.hung_after_s`` (1 s): a busy
    scheduler that paused 0.8 s lost its requests for nothing (an outside audit)."""
    import anyio

    from dualpath.config import load_config
    from dualpath.control.client import ServeClient

    async def main() -> None:
        for serve in ({}, {"heartbeat_s": 0.1}, {"heartbeat_s": 0.5, "scheduler_hung_after_s": 7.0}):
            cfg = load_config(env={}, serve=serve)
            client = ServeClient.from_config("tcp://127.0.0.1:9", cfg)
            try:
                assert client.misses * cfg.serve.heartbeat_s > cfg.serve.hung_after_s(), serve
                assert client.misses >= 3
            finally:
                await client.channel.close()

    anyio.run(main)
