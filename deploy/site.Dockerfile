# A hospital's site agent: dials out to the hub's fleet address, runs approved tasks on local
# data, and keeps its site directory (site.toml, keys/, federation.json, audit log) in /site.
# It listens on nothing. Build from the repository root: docker build -f deploy/site.Dockerfile .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Exactly this torch, the CPU build, before the project: left to itself pip resolves a
# multi-GB CUDA torch. The project's own pin (torch==2.13.0) is then already satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

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
# libseccomp: the system-call filter of each task process's sandbox (site_agent.sandbox)
RUN apt-get update && apt-get install -y --no-install-recommends libseccomp2 && rm -rf /var/lib/apt/lists/*

# Not root: tasks run researchers' code. uid 1000 must own the site directory on the host
# (see deploy/README.md); the data under /data is mounted read-only.
RUN groupadd --gid 1000 flip \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash flip \
    && mkdir -p /site /data \
    && chown flip:flip /site
USER flip
WORKDIR /home/flip
VOLUME /site

# Reads /site/federation.json, written by `flip-site join`.
CMD ["flip-site", "start", "/site"]
