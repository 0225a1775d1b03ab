"""The Redis event publisher settings README recommends deliver every event.

prefect-redis 0.3.0's publisher clears its batch after awaiting Redis in its
periodic flush, dropping the events the websocket handler added meanwhile: a
task run's Completed event went missing and the API showed it Running. With
one event per batch and no periodic flush, nothing is in flight twice.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest

from tests.support.prefect_server import prefect_redis_available, redis_database, redis_messaging_env

pytestmark = pytest.mark.skipif(not prefect_redis_available(), reason="needs prefect-redis")

EVENTS = 2000


def test_recommended_publisher_settings_deliver_every_event(monkeypatch):
    with redis_database() as url:
        for name, value in redis_messaging_env(url).items():
            monkeypatch.setenv(name, value)
        from prefect_redis.messaging import Cache, Publisher

        import redis

        async def publish_all() -> Publisher:
            publisher = Publisher("prefect-torch-events-test", Cache(topic="prefect-torch-events-test"),
                                  deduplicate_by="id")
            async with publisher:
                for _ in range(EVENTS):
                    await publisher.publish_data(b"{}", {"id": str(uuid.uuid4())})
                    await asyncio.sleep(0.0002)  # a websocket handler waiting for its next event
            return publisher

        publisher = asyncio.run(publish_all())
        assert publisher.batch_size == 1 and publisher.publish_every >= timedelta(hours=1)
        with redis.Redis.from_url(url) as client:
            assert client.xlen(publisher.stream) == EVENTS
