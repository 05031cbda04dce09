# The one image every docker-compose service runs: the runtime requirements only (requirements.txt with its
# constraints; no test packages), sagaflow installed as a package, run as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY sagaflow ./sagaflow
COPY web ./web
COPY tasks ./tasks
COPY config ./config
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 --user-group sagaflow

USER sagaflow
WORKDIR /home/sagaflow
ENV SAGAFLOW_HOME=/home/sagaflow/.sagaflow
CMD ["sagaflow", "--help"]
