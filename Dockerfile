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

COPY . /app

# Non-editable install of the project and its runtime dependencies (no dev extras).
# The sources stay in /app as well, because the worker is started as `python worker.py`
# from the repository root.
RUN pip install . \
    && rm -rf /app/build /app/*.egg-info \
    && mkdir -p /app/var \
    && chown app:app /app/var

USER app

EXPOSE 8000

CMD ["uvicorn", "api.app:app", "--host", "0.0.0.0", "--port", "8000"]
