# One image for the web, worker and beat services of docker-compose.yml.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PORTAL_VAR_DIR=/var/lib/portal
RUN apt-get update && apt-get install -y --no-install-recommends openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 portal && mkdir -p /var/lib/portal && chown portal /var/lib/portal
WORKDIR /app
COPY pyproject.toml README.md ./
COPY portal portal
COPY catalog catalog
COPY jobs jobs
RUN pip install .
COPY . .
USER portal
EXPOSE 8000
CMD ["scripts/serve", "web"]
