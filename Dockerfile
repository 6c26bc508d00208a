# One image for web, worker, beat and the migration step (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CXR_ENV=production \
    CXR_DATA_DIR=/data

WORKDIR /app

# Dependencies first, from the exact pins in pyproject.toml, so code changes do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# The code, installed in place: alembic.ini and migrations/ are read from the source tree.
COPY . .
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /app cxr \
    && mkdir -p /data && chown cxr /data

USER cxr
EXPOSE 8000
CMD ["cxr", "web", "--host", "0.0.0.0", "--port", "8000"]
