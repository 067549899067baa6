# milter-bridge: the bridge (and the milter_policy SDK) in a small image.
#
#   docker build -t milter-bridge .
#   docker run --rm -p 8890:8890 milter-bridge                      # bundled demo policy
#   docker run --rm -p 8890:8890 milter-bridge \
#       --listen inet:0.0.0.0:8890 --upstream dns:///policy.example:50051
#
# The arguments replace the default CMD whole: give --listen and --upstream.
# MILTER_BRIDGE_PORT is the port the HEALTHCHECK probes; when --listen uses
# another port, set it to match (docker run -e MILTER_BRIDGE_PORT=9000 ...).
# On SIGTERM the bridge lets connections finish for --grace-period (30 s):
# stop it with `docker stop --time 35` or a longer timeout.
#
# The install steps live in docker/install.sh, which tests/deploy/test_dockerfile.py
# also runs (and then runs the installed entrypoint).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG PREFIX=/opt/milter-bridge

FROM ${PYTHON_IMAGE} AS builder
ARG PREFIX
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge/ bridge/
COPY sdk/ sdk/
COPY docker/install.sh docker/install.sh
RUN sh docker/install.sh "${PREFIX}" /src

FROM ${PYTHON_IMAGE}
ARG PREFIX
LABEL org.opencontainers.image.title="milter-bridge" \
      org.opencontainers.image.description="Milter for Postfix and Sendmail that forwards SMTP events to gRPC policy services"
RUN groupadd --system --gid 10001 milter \
    && useradd --system --uid 10001 --gid milter --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin milter
COPY --from=builder ${PREFIX} ${PREFIX}
ENV PATH=${PREFIX}/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MILTER_BRIDGE_PORT=8890
USER 10001:10001
EXPOSE 8890
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["sh", "-c", "milter-bridge probe --connect \"inet:127.0.0.1:${MILTER_BRIDGE_PORT}\" || exit 1"]
ENTRYPOINT ["milter-bridge"]
CMD ["--listen", "inet:0.0.0.0:8890", "--upstream", "embedded"]
