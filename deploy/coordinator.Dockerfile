# The hub side of the federation: `flip serve` runs the SuperLink (TLS, node authentication),
# the coordinator and the fleet front in the foreground, with its state (CA, certificates,
# registered sites, runs, models) under /var/lib/flip, a volume kept across restarts.
# Build from the repository root: docker build -f deploy/coordinator.Dockerfile .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Exactly this torch, the CPU build, before the project: left to itself pip resolves a
# multi-GB CUDA torch. The project's own pin (torch==2.13.0) is then already satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# nginx, for FLIP_FLEET_FRONT=nginx: the fleet front with the same allow list, which also sends the
# payload files of large models itself (coordinator/nginx_front.py); it runs as this image's user.
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/*

COPY pyproject.toml README.md /src/
COPY flip_core /src/flip_core
COPY flip_magics /src/flip_magics
COPY site_agent /src/site_agent
COPY coordinator /src/coordinator
COPY hub_config /src/hub_config
COPY flip_local /src/flip_local
# the kernel spec (kernels/flip/kernel.json), which the wheel installs as share/jupyter/kernels/flip
COPY kernels /src/kernels
RUN pip install /src && rm -rf /src

# Not root. The state directory exists in the image owned by `flip`, so a new named volume
# mounted there starts owned by `flip` too; `docker compose exec coordinator flip ...` runs
# as the same user and so cannot leave root-owned files in the state.
RUN groupadd --gid 1000 flip \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash flip \
    && mkdir -p /var/lib/flip \
    && chown flip:flip /var/lib/flip
USER flip
VOLUME /var/lib/flip

# 9092: the fleet front, the sites' only entry (TLS). 8900: the researcher API, for the hub's
# containers only (not published on the host).
EXPOSE 9092 8900
# Shell form for $FLIP_HUB_NAME (the hub's public DNS name, put in the fleet certificate);
# exec so that flip serve is PID 1 and gets docker's SIGTERM.
CMD exec flip serve --state /var/lib/flip --listen 0.0.0.0 --fleet-port 9092 \
    --coordinator-listen 0.0.0.0 --coordinator-port 8900 --hub-name "$FLIP_HUB_NAME" \
    --front "${FLIP_FLEET_FRONT:-python}"
