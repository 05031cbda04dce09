"""The status page's live workers (/workers) and /api/workers: each live worker with the steps its pool
holds; a dead or stopped worker is not listed. Rendered by the Flask app on SQLite."""

import datetime as dt

from sqlalchemy import update

from sagaflow.store import tables as t
from sagaflow.store.workers import set_current_worker


def test_live_workers_and_the_steps_each_holds_are_shown(app_and_store):
    app, store = app_and_store
    for worker in ("alpha@h:1", "beta@h:2", "dead@h:3"):
        store.heartbeat(worker, "h", int(worker[-1]), "celery,payments")
    with store.engine.begin() as conn:
        conn.execute(update(t.workers).where(t.workers.c.id == "dead@h:3").values(
            heartbeat_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)))
    store.create_run("run-1", "s", 1, {}, [("reserve", True), ("pay", True)])
    set_current_worker("beta@h:2")
    store.claim_step("run-1", 0, "t:0", [], 300)

    page = app.test_client().get("/workers")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "alpha@h:1" in html and "beta@h:2" in html and "dead@h:3" not in html
    assert 'href="/runs/run-1"' in html and "reserve" in html

    items = app.test_client().get("/api/workers").get_json()["items"]
    assert [w["id"] for w in items] == ["alpha@h:1", "beta@h:2"]
    assert items[1]["holds"] == [{"run_id": "run-1", "step": "reserve", "status": "running"}]
    assert items[0]["queues"] == "celery,payments" and items[0]["holds"] == []
    assert app.test_client().get("/api/workers?x=1").status_code == 400

    store.remove_worker("alpha@h:1")  # a clean stop
    assert "alpha@h:1" not in app.test_client().get("/workers").get_data(as_text=True)
