"""Settings (issue 13): the database URLs hosting providers hand out, and a database sagaflow does not run on."""

from __future__ import annotations

import pytest

from sagaflow.config.settings import Settings


@pytest.mark.parametrize("given,used", [
    ("postgresql://u:pw@db.example.com:5432/app", "postgresql+psycopg2://u:pw@db.example.com:5432/app"),
    ("postgres://u:pw@db.example.com/app?sslmode=require", "postgresql+psycopg2://u:pw@db.example.com/app?sslmode=require"),
    ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
    ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),  # psycopg 3, named explicitly: kept
    ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
])
def test_plain_postgresql_urls_mean_psycopg2(given, used):
    assert Settings.from_env({"SAGAFLOW_DATABASE_URL": given}).database_url == used
    # a worker started with these settings gets the same URL
    assert Settings.from_env(Settings.from_env({"SAGAFLOW_DATABASE_URL": given}).as_env()).database_url == used


@pytest.mark.parametrize("url", ["mysql://u:s3cret@h/db", "oracle+cx_oracle://u:s3cret@h", "redis://h/0",
                                 "u:s3cret@h/db"])
def test_a_database_sagaflow_does_not_run_on_is_refused_without_echoing_the_url(url):
    with pytest.raises(ValueError, match="^SAGAFLOW_DATABASE_URL") as caught:
        Settings.from_env({"SAGAFLOW_DATABASE_URL": url})
    assert "s3cret" not in str(caught.value) and "postgresql://user:password@host/db" in str(caught.value)


@pytest.mark.parametrize("name,value,message", [
    ("SAGAFLOW_LOG_LEVEL", "verbose", "SAGAFLOW_LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("SAGAFLOW_LOG_FORMAT", "xml", "SAGAFLOW_LOG_FORMAT must be one of logfmt, json"),
    ("SAGAFLOW_CELERY_APP", "proj.celery", "SAGAFLOW_CELERY_APP must be module:attribute"),
    ("SAGAFLOW_CELERY_CONFIG", "proj/celeryconfig.py", "SAGAFLOW_CELERY_CONFIG must be a module name"),
])
def test_each_new_setting_names_itself_and_what_it_accepts(name, value, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env({name: value})


def test_log_level_and_format_accept_any_case():
    settings = Settings.from_env({"SAGAFLOW_LOG_LEVEL": "info", "SAGAFLOW_LOG_FORMAT": "JSON"})
    assert (settings.log_level, settings.log_format) == ("INFO", "json")
