# syntax=docker/dockerfile:1
#
# ferry container image.
#
#   docker build -t ferry .
#   docker run --rm -v "$PWD/config/ferry.toml:/etc/ferry/ferry.toml:ro" \
#     -e FERRY_SOURCE__URL=postgres://ferry:secret@db.internal:5432/app \
#     -e FERRY_SINK__URL=http://search.internal:9200 \
#     -e FERRY_ADMIN__LISTEN=0.0.0.0:9187 -p 127.0.0.1:9187:9187 \
#     --stop-timeout 60 ferry
#
# Inside a container 127.0.0.1 is the container itself: the source and sink
# URLs must name hosts the container can reach, and the admin endpoint
# (/healthz /readyz /metrics /status) must listen on 0.0.0.0 to be
# published.
# No configuration is baked in: mount one at /etc/ferry/ferry.toml (or pass
# another path after `run --config`). Keys can be overridden with
# FERRY_<SECTION>__<KEY> variables, see config/README.md.

# --- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Only what cargo needs: the workspace manifest, the lock file and the
# members (crates/* and tests, see Cargo.toml).
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY tests ./tests

# Downloaded crates and compiled dependencies live in BuildKit cache mounts,
# so a rebuild after a source change recompiles only ferry's own crates.
# (Cache mounts instead of a "dummy sources" layer: they keep working when
# a crate is added to the workspace.) The target directory is a cache mount
# too, so the binary is copied out of it within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release -p ferry --locked \
 && install -D -m 0755 target/release/ferry /out/ferry \
 && size="$(stat -c %s /out/ferry)" \
 && if [ "$size" -gt 31457280 ]; then \
      echo "ferry is $size bytes, over 30 MiB: debug info back in [profile.release]?" >&2; exit 1; \
    fi

# --- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="ferry" \
      org.opencontainers.image.description="Keeps OpenSearch indexes in sync with PostgreSQL through logical replication" \
      org.opencontainers.image.licenses="Apache-2.0"

# CA certificates for https:// sink URLs; nothing else is needed (the binary
# links only glibc and libgcc).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 ferry \
 && useradd --system --uid 10001 --gid ferry --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin ferry \
 && mkdir -p /etc/ferry

COPY --from=builder /out/ferry /usr/local/bin/ferry

# Logs go to stderr; no colour codes in collected container logs.
# RUST_LOG (default "info") selects what is logged, e.g. RUST_LOG=ferry=debug;
# FERRY_LOG_FORMAT=json writes one JSON object per line.
ENV NO_COLOR=1

# ferry keeps no local state (its position lives in the replication slot and
# in the index metadata), so no volume is needed and the filesystem can be
# read-only.
USER 10001:10001

# On SIGTERM ferry flushes the in-flight batch and confirms it before
# exiting; give it time with `docker run --stop-timeout 60` or compose's
# stop_grace_period (Docker's default is 10 s).
STOPSIGNAL SIGTERM

# The admin endpoint's port. ferry listens on [admin] listen, 127.0.0.1:9187
# by default, which is reachable only inside the container: set
# admin.listen = "0.0.0.0:9187" (or FERRY_ADMIN__LISTEN=0.0.0.0:9187) and
# publish it (-p 127.0.0.1:9187:9187) for Prometheus and `ferry status`.
EXPOSE 9187

# Liveness through the admin endpoint: `ferry health --config` GETs /healthz
# at the configured admin.listen (FERRY_* overrides applied, 0.0.0.0 probed
# on loopback), no curl needed. Mounting the configuration elsewhere? Set
# FERRY_CONFIG to its path: both `run` and `health` read it.
ENV FERRY_CONFIG=/etc/ferry/ferry.toml
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s CMD ["ferry", "health"]

ENTRYPOINT ["ferry"]
CMD ["run"]
