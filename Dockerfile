# syntax=docker/dockerfile:1
# connect-usage-exporter: multi-stage build. The builder stage makes the wheel (and the
# dependency wheels); the final stage installs them into a venv with no build tools.

FROM python:3.11-slim AS builder
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="connect-usage-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Posit Connect usage data" \
      org.opencontainers.image.source="https://github.com/connect-usage-exporter/connect-usage-exporter" \
      org.opencontainers.image.licenses="MIT"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    CONNECT_EXPORTER_STATE_PATH=/var/lib/connect-usage-exporter/state.sqlite \
    CONNECT_EXPORTER_LISTEN_ADDRESS=0.0.0.0:9741
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links=/wheels connect-usage-exporter \
    && /opt/venv/bin/pip uninstall --yes pip \
    && groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin exporter \
    && mkdir -p /var/lib/connect-usage-exporter \
    && chown 10001:10001 /var/lib/connect-usage-exporter
USER 10001:10001
WORKDIR /var/lib/connect-usage-exporter
VOLUME ["/var/lib/connect-usage-exporter"]
EXPOSE 9741
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9741/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["connect-usage-exporter"]
CMD ["run"]
