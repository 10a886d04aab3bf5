# Chat gateway image: slim Python, non-root, data on a volume, health checked on /healthz.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_DB=/data/gateway.db

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY channels ./channels
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app gateway \
    && mkdir -p /data \
    && chown gateway /data
COPY config.yaml ./config.yaml

USER gateway
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"

CMD ["chat-gateway", "serve", "--config", "/app/config.yaml"]
