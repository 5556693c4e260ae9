"""On PostgreSQL the API's request sessions wait for the database on the event loop (an
AsyncSession on psycopg 3, app.core.db): no trip to a worker thread, and a slow query stalls
only its own request, never the loop (as blocking driver calls on the loop would)."""

import asyncio
import threading
import time

import pytest

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]


@pytest.fixture
def service_env(postgres_url, new_database) -> dict[str, str]:
    return {"QFORGE_DATABASE_URL": new_database()}


async def _in_a_request(work):
    """`work(session)` with a request's session, opened and closed as FastAPI would."""
    from app.core.db import get_session

    sessions = get_session()
    session = await anext(sessions)
    try:
        return await work(session)
    finally:
        await sessions.aclose()


def test_a_slow_query_leaves_the_loop_free_for_other_requests(settings):
    from sqlalchemy import text

    from app.core.db import run_db

    def sleep_in_database(session, seconds: float) -> str:
        session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
        return threading.current_thread().name

    def quick(session) -> tuple[int, str]:
        return session.execute(text("SELECT 1")).scalar_one(), threading.current_thread().name

    async def scenario():
        slow = asyncio.create_task(_in_a_request(lambda s: run_db(sleep_in_database, s, 1.5)))
        await asyncio.sleep(0.3)  # the slow query is under way
        started = time.perf_counter()
        answer, quick_thread = await _in_a_request(lambda s: run_db(quick, s))
        quick_s = time.perf_counter() - started
        ticks, tick_started = 0, time.perf_counter()
        while not slow.done():  # the loop keeps turning while the slow query waits
            await asyncio.sleep(0.01)
            ticks += 1
        return answer, quick_thread, quick_s, await slow, ticks, time.perf_counter() - tick_started

    answer, quick_thread, quick_s, slow_thread, ticks, ticking_s = asyncio.run(scenario())
    loop_thread = threading.current_thread().name  # asyncio.run runs the loop on this thread
    assert answer == 1
    assert quick_thread == slow_thread == loop_thread  # on the loop, not in a worker thread
    assert quick_s < 0.5, f"the quick request waited {quick_s:.2f} s behind the slow query"
    assert ticks >= 0.5 * ticking_s / 0.01, (ticks, ticking_s)


def test_a_plain_route_using_the_session_works_on_postgres(settings):
    """Plain (sync) routes run their body through `with_request_session`: the key routes and
    the dashboard's sign-in use the request's session directly."""
    from fastapi.testclient import TestClient

    from app import tenants
    from app.core.db import session_scope
    from app.main import app
    from app.models import Scope

    with session_scope() as session:
        tenants.create_tenant(session, "acme")
        admin = tenants.create_key(session, "acme", Scope.ADMIN, "ops").secret
    with TestClient(app, headers={"Authorization": f"Bearer {admin}"}) as client:
        created = client.post("/v1/keys", json={"name": "ci", "scope": "read"})
        assert created.status_code == 201, created.text
        listed = client.get("/v1/keys").json()
        assert sorted(k["name"] for k in listed) == ["ci", "ops"]
        assert client.delete(f"/v1/keys/{created.json()['id']}").status_code == 204
        reader = client.get("/v1/me", headers={"Authorization": f"Bearer {created.json()['key']}"})
        assert reader.status_code == 401  # revoked at once
        signed_in = client.post("/sign-in", data={"api_key": admin}, headers={"Origin": "http://testserver"},
                                follow_redirects=False)
        assert signed_in.status_code == 303, signed_in.text
