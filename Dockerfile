# Berth as a drop-in kamal-proxy image.
#
#   docker build -t registry.example.com/berth/kamal-proxy:v0.9.2 .
#
# Kamal runs it as `kamal-proxy run` and drives it with `docker exec kamal-proxy kamal-proxy ...`;
# tag it v0.9.2 or higher (Kamal refuses older proxy versions).

FROM rust:1-bookworm AS build
# The binary is built profile-guided (benches/pgo.sh): built instrumented, run under the
# benchmarks' traffic on loopback, then built again laid out by what the requests ran. That is
# what brings CPU per request under nginx's (benches/RESULTS.md). It needs the training tools and
# an llvm-profdata matched to rustc (rustup's llvm-tools), and about twice the build time;
# `--build-arg PGO=0` builds a plain release binary instead.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends nginx-light wrk nghttp2-client curl openssl \
      && rm -rf /var/lib/apt/lists/* \
      && rustup component add llvm-tools; \
    fi
WORKDIR /src
COPY . .
RUN if [ "$PGO" = 1 ]; then \
      benches/pgo.sh && cp target/pgo/release/proxy /proxy; \
    else \
      cargo build --release --locked --bin proxy && cp target/release/proxy /proxy; \
    fi

FROM debian:bookworm-slim
# ca-certificates: to talk to Let's Encrypt. libcap2-bin: setcap, so a non-root user can bind 80/443.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /proxy /usr/local/bin/proxy
# The user owns the kamal-proxy-config volume, so it must have kamal-proxy's uid and gid or a
# swap in either direction leaves the state and certificates unreadable (state 0600/0644,
# certs/ 0700). kamal-proxy's image runs `useradd kamal-proxy` on ubuntu:noble, where uid and
# gid 1000 already belong to `ubuntu`, so its user is 1001:1001; Debian has no such user, so
# the ids are given here.
RUN ln -s proxy /usr/local/bin/kamal-proxy \
 && setcap cap_net_bind_service=+ep /usr/local/bin/proxy \
 && groupadd --gid 1001 kamal-proxy \
 && useradd --uid 1001 --gid 1001 --create-home --home-dir /home/kamal-proxy --shell /usr/sbin/nologin kamal-proxy \
 && mkdir -p /home/kamal-proxy/.config/kamal-proxy \
 && chmod 0700 /home/kamal-proxy/.config/kamal-proxy \
 && chown -R kamal-proxy:kamal-proxy /home/kamal-proxy
USER kamal-proxy:kamal-proxy
ENV HOME=/home/kamal-proxy
WORKDIR /home/kamal-proxy
VOLUME /home/kamal-proxy/.config/kamal-proxy
EXPOSE 80 443
LABEL org.opencontainers.image.title="kamal-proxy" \
      org.opencontainers.image.description="Berth: a kamal-proxy compatible reverse proxy" \
      org.opencontainers.image.version="v0.9.2"
CMD ["kamal-proxy", "run"]
