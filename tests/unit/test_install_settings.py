"""sagaflow.install(app) on an app in a fresh interpreter (install binds sagaflow's tasks to that app, so never
in the test process): what it sets, what it leaves to the app, and what it reports as contradicting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

CODE = """
import json
from celery import Celery
import sagaflow
from sagaflow.hosting import contradictions

app = Celery("proj", broker="memory://", set_as_current=False)
app.conf.update(worker_prefetch_multiplier=8, beat_schedule={"mine": {"task": "proj.tick", "schedule": 60.0}},
                broker_transport_options={"socket_keepalive": True})
sagaflow.install(app)
good = {k: app.conf[k] for k in ("task_acks_late", "task_reject_on_worker_lost", "task_retry_on_worker_lost",
                                 "worker_prefetch_multiplier", "worker_send_task_events", "worker_consumer")}
bad = Celery("bad", broker="memory://", set_as_current=False)
bad.conf.update(task_acks_late=False, accept_content=["pickle"])
sagaflow.install(bad)
print(json.dumps({"good": good, "beat": sorted(app.conf.beat_schedule), "transport": app.conf.broker_transport_options,
                  "tasks": "sagaflow.on_step_failed" in app.tasks, "good_problems": contradictions(app),
                  "bad_problems": contradictions(bad)}))
"""


def test_install_sets_what_sagaflow_needs_and_keeps_the_apps_own_choices(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAGAFLOW_")}
    done = subprocess.run([sys.executable, "-c", CODE], env={**env, "SAGAFLOW_HOME": str(tmp_path),
                                                              "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["good"] == {"task_acks_late": True, "task_reject_on_worker_lost": False,
                              "task_retry_on_worker_lost": True, "worker_prefetch_multiplier": 8,
                              "worker_send_task_events": False, "worker_consumer": "sagaflow.inbound:Consumer"}
    assert result["beat"] == ["mine", "sagaflow-recover"]
    assert result["transport"] == {"socket_keepalive": True, "visibility_timeout": 7200}
    assert result["tasks"] and result["good_problems"] == []
    assert result["bad_problems"] == [
        "Celery setting task_acks_late=False contradicts sagaflow, which needs True to lose nothing (remove it "
        "from your Celery configuration)",
        "Celery setting accept_content=['pickle'] must include 'json' (sagaflow's messages are JSON)"]
