# syntax=docker/dockerfile:1
#
# Image of the pve-boxes service. One image, two processes (see docker-compose.yml):
#   REST API        uvicorn api.app:app --host 0.0.0.0 --port 8000   (the default CMD)
#   Temporal worker python worker.py
#   admin CLI       boxctl load FILE
# All configuration comes from environment variables (see shared CONTRACT.md);
# no .env file is baked into the image (.dockerignore keeps it out).

FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# Unprivileged runtime user. The code and the installed packages stay owned by root
# (read-only for the service); only /app/var is writable, for the SQLite default
# DATABASE_URL when the image is run without a PostgreSQL URL.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin app

WORKDIR /app

# The runtime dependencies exactly as locked (`make lock`): every file checked against its hash, in a layer of
# their own that a code change does not rebuild.
COPY requirements.lock /app/
RUN pip install --require-hashes -r requirements.lock

COPY . /app

# Non-editable install of the project alone: its dependencies are the lock's (--no-deps), and it is built with
# the locked setuptools just installed (--no-build-isolation), so nothing unhashed is downloaded.
# The sources stay in /app as well, because the worker is started as `python worker.py`
# from the repository root.
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf /app/build /app/*.egg-info \
    && mkdir -p /app/var \
    && chown app:app /app/var

USER app

EXPOSE 8000

CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
