# One image with the three binaries: baton-controller (the default command), baton-agent
# and baton. Build: docker build -t baton .
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p baton-controller -p baton-agent -p baton

FROM debian:bookworm-slim
# python3 and git serve the python and aider tools; tini reaps what tools leave behind.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 git tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 999 --user-group --create-home --home-dir /var/lib/baton baton
COPY --from=build /src/target/release/baton-controller /src/target/release/baton-agent /src/target/release/baton /usr/local/bin/
USER baton
WORKDIR /var/lib/baton
ENV BATON_LISTEN=0.0.0.0:7070 BATON_DB=sqlite:///var/lib/baton/baton.db BATON_LOG_FORMAT=json
EXPOSE 7070 9090
VOLUME /var/lib/baton
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["baton-controller"]
