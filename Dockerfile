# bq2sftp container image: one static-ish binary on a small Debian base, run as a non-root user.
#
#   docker build -t bq2sftp .
#   docker run --rm bq2sftp export --help
#
# The build uses the repository's Cargo.lock (--locked), so the image has exactly the
# dependencies the tests ran with. Protos compile with protox: no protoc needed.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin bq2sftp \
 && strip target/release/bq2sftp

FROM debian:bookworm-slim
# CA certificates for Google's APIs; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/bq2sftp --create-home bq2sftp
COPY --from=build /src/target/release/bq2sftp /usr/local/bin/bq2sftp
USER 10001:10001
# The state file for --resume lands here (mount a volume to keep it across pods).
WORKDIR /var/lib/bq2sftp
ENTRYPOINT ["/usr/local/bin/bq2sftp"]
CMD ["--help"]
