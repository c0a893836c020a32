# Build: docker build -t event-processor .
FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake build-essential pkg-config libssl-dev zlib1g-dev \
       libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The dependencies in a layer of their own, built against placeholder sources: a change to src/ rebuilds only
# this crate. The manifest names the test, bench and example targets, so their files come along (only the daemon
# is built); a change to them rebuilds the dependencies too.
COPY Cargo.toml Cargo.lock build.rs ./
COPY tests ./tests
COPY benches ./benches
COPY examples ./examples
RUN mkdir -p src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --features static-ssl --bin event-processor \
    && rm -rf src
COPY src ./src
# The commit `event-processor --version` names (the context has no .git): `--build-arg GIT_COMMIT=...`.
ARG GIT_COMMIT=""
# The placeholders' build products are older than the real sources: cargo rebuilds the crate, not the rest.
RUN touch src/lib.rs src/main.rs \
    && cargo build --release --locked --features static-ssl --bin event-processor \
    && strip target/release/event-processor

FROM debian:bookworm-slim
# The binary needs only glibc and zlib from the base (OpenSSL and zstd are linked in), and the CA certificates for
# TLS to brokers, taken from the builder: Debian's ca-certificates package would bring the openssl tools along.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /src/target/release/event-processor /usr/local/bin/event-processor
USER 10001
ENV LOG_FORMAT=json HTTP_PORT=9090
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["event-processor", "healthcheck"]
ENTRYPOINT ["event-processor"]
