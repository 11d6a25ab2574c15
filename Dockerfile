# strangler: the proxy as a container image, from the built wheel.
#   docker build -t strangler .
#   docker run -p 8080:8080 -p 8081:8081 -v $PWD/conf:/etc/strangler strangler
# The full image has the C compiler that compiles the per-request modules (setup.py);
# the runtime image gets only the built wheel.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
COPY adapters ./adapters
COPY flags ./flags
RUN pip install --no-cache-dir build && python -m build --wheel --outdir /dist

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin strangler
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl \
    && strangler --version | grep -q compiled
# Listen on all interfaces inside the container; the admin listener stays a separate port.
ENV STRANGLER_SERVER__HOST=0.0.0.0 \
    STRANGLER_ADMIN__HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
USER strangler
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('STRANGLER_ADMIN__PORT', '8081'), timeout=2)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["strangler"]
CMD ["run", "--config", "/etc/strangler/strangler.toml"]
