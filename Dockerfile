# chatd: one node on the embedded SQLite default. For PostgreSQL set CHATD_DB.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chatd ./chatd
COPY protocol ./protocol
COPY storage ./storage
COPY loadtest ./loadtest
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin chatd \
    && mkdir -p /data && chown chatd /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER chatd
WORKDIR /data
VOLUME ["/data"]
ENV CHATD_DB=sqlite:////data/chatd.db \
    CHATD_HOST=0.0.0.0 \
    CHATD_PORT=8765 \
    PYTHONUNBUFFERED=1
EXPOSE 8765
HEALTHCHECK --interval=10s --timeout=3s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8765/healthz').status != 200)"
STOPSIGNAL SIGTERM
CMD ["chatd", "serve", "--host", "0.0.0.0"]
