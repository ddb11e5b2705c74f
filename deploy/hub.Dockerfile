# JupyterHub for a FLIP consortium: OIDC login, one container per user (DockerSpawner),
# idle servers culled, the coordinator registered as a hub service (hub_config/).
# Build from the repository root: docker build -f deploy/hub.Dockerfile .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# configurable-http-proxy here is the Python implementation: no node.js in the image.
RUN pip install \
    jupyterhub==6.1.1 \
    dockerspawner==14.0.0 \
    oauthenticator==17.4.0 \
    jupyterhub-idle-culler==2.0.0 \
    configurable-http-proxy==0.4.0

# hub_config imports only jupyterhub and the standard library: FLIP itself is not installed here.
COPY hub_config /srv/flip/hub_config
ENV PYTHONPATH=/srv/flip \
    FLIP_HUB_PROFILE=production

# The hub's state (jupyterhub.sqlite, jupyterhub_cookie_secret) is written here: a volume.
WORKDIR /srv/jupyterhub

# Runs as root: it talks to the Docker socket to spawn users' containers (root-equivalent anyway).
# 8443: the web address (TLS); 8081: the hub API, for users' servers and the coordinator.
EXPOSE 8443 8081
CMD ["jupyterhub", "-f", "/srv/flip/hub_config/jupyterhub_config.py"]
