# Chat gateway image: slim Python, non-root, data on a volume, health checked on the configured port.
#
#   docker build -t chat-gateway .
#   docker run -p 8080:8080 -v gw-data:/data \
#     -v "$PWD/production.yaml:/config/config.yaml:ro" -e GATEWAY_ADMIN_TOKEN=... chat-gateway
#
# The configuration: /config/config.yaml (mount it), or the file GATEWAY_CONFIG names. With
# neither, the demo configuration (/app/demo-config.yaml: one web chat endpoint, 1-minute
# sessions) runs, and the log says so.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_DB=/data/gateway.db \
    GATEWAY_DEMO_CONFIG=/app/demo-config.yaml

WORKDIR /app

# 1. Dependencies, pinned (requirements.lock), in their own layer: editing the source or the
#    README does not reinstall them.
COPY requirements.lock ./
RUN pip install --no-cache-dir --no-deps -r requirements.lock

# 2. The gateway itself, without resolving dependencies again.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY channels ./channels
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && useradd --system --uid 10001 --home-dir /app gateway \
    && mkdir -p /data /config \
    && chown gateway /data
COPY config.yaml ./demo-config.yaml

USER gateway
VOLUME ["/data"]
# ./config.yaml is looked up here: mount the production configuration at /config/config.yaml.
WORKDIR /config
EXPOSE 8080
# Asks /healthz on the port the configuration in use sets (server.port, e.g. ${GATEWAY_PORT}).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["chat-gateway", "healthcheck"]

CMD ["chat-gateway", "serve"]
