# The researchers' single-user server, spawned by the hub (DockerSpawner) once per user:
# JupyterLab with FLIP installed and the "FLIP (Python 3)" kernel (magics preloaded).
# Build from the repository root (compose.hub.yml's `singleuser` entry does the same):
#   docker build -f deploy/singleuser.Dockerfile -t "$FLIP_SINGLEUSER_IMAGE" .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Exactly this torch, the CPU build, before the project: left to itself pip resolves a
# multi-GB CUDA torch. The project's own pin (torch==2.13.0) is then already satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Only what the package needs (the repository root also holds virtualenvs and run records).
COPY pyproject.toml README.md /src/
COPY flip_core /src/flip_core
COPY flip_magics /src/flip_magics
COPY site_agent /src/site_agent
COPY coordinator /src/coordinator
COPY hub_config /src/hub_config
COPY flip_local /src/flip_local
# the kernel spec (kernels/flip/kernel.json), which the wheel installs as share/jupyter/kernels/flip
COPY kernels /src/kernels
# The project brings jupyterhub (jupyterhub-singleuser), jupyterlab and ipywidgets with it.
RUN pip install /src \
    && rm -rf /src \
    && flip kernel install

# The worked examples; the hub copies them into each user's volume.
COPY notebooks /srv/flip/notebooks

# The user the hub's images conventionally run as (uid 1000), never root.
RUN groupadd --gid 1000 jovyan \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/jovyan --shell /bin/bash jovyan
USER jovyan
WORKDIR /home/jovyan

EXPOSE 8888
CMD ["jupyterhub-singleuser"]
