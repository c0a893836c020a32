# syntax=docker/dockerfile:1
# Build: docker build -t event-processor .
FROM rust:1.95-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake build-essential pkg-config libssl-dev zlib1g-dev \
       libcurl4-openssl-dev libsasl2-dev libzstd-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin event-processor \
    && strip target/release/event-processor

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates libsasl2-2 libzstd1 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app
COPY --from=builder /src/target/release/event-processor /usr/local/bin/event-processor
USER 10001
ENV LOG_FORMAT=json HTTP_PORT=9090
EXPOSE 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 CMD ["event-processor", "healthcheck"]
ENTRYPOINT ["event-processor"]
